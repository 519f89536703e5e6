"""Benchmarks. Each module registers ``kvtier bench <name>``; shared helpers are in ``common``."""
