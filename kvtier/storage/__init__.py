"""Storage tiers and the manager that orders them."""
