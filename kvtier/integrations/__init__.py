"""Engine integrations: each adapter converts one engine's KV layout to and from kvtier's chunks."""
