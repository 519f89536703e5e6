"""kvtier in vLLM: the v1 KV connector and what surrounds it.

``kv_connector_module_path = "kvtier.integrations.vllm"`` names this package; vLLM takes
``KvtierConnector`` from it. Only that attribute (and :func:`reset_engines`, :func:`shared_engine`)
imports vLLM, on first access (:func:`__getattr__`); the pure modules — :mod:`.transfer` (the
``--kv-transfer-config``), :mod:`.plan` (scheduler rules), :mod:`.layout` (paged <-> canonical),
:mod:`.lookup` (scheduler -> worker socket), :mod:`.cli` (``kvtier serve``) — import without it.
:mod:`.stats` and :mod:`.events` build on vLLM's classes and need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvtier.integrations.vllm.transfer import CONNECTOR_NAME, KV_ROLES, MODULE_PATH, kv_transfer_config

if TYPE_CHECKING:
    from kvtier.integrations.vllm.connector import KvtierConnector, reset_engines, shared_engine

__all__ = ["CONNECTOR_NAME", "KV_ROLES", "MODULE_PATH", "KvtierConnector", "kv_transfer_config", "reset_engines",
           "shared_engine"]

_LAZY = ("KvtierConnector", "reset_engines", "shared_engine")


def __getattr__(name: str) -> Any:
    """The connector's names, imported (with vLLM) on first access."""
    if name in _LAZY:
        from kvtier.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
