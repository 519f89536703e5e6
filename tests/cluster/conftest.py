"""Fixtures of the cluster tests (helpers live in ``cluster_support``)."""

from __future__ import annotations

from cluster_support import cluster

__all__ = ["cluster"]
