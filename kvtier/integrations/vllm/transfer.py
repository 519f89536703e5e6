"""The ``--kv-transfer-config`` that plugs kvtier into vLLM: names and roles shared by the connector and
the CLI. Pure Python (no vLLM, no torch)."""

from __future__ import annotations

from typing import Any

from kvtier.errors import ConfigError

CONNECTOR_NAME = "KvtierConnector"
MODULE_PATH = "kvtier.integrations.vllm"
KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")
#: the connector's info line for every whole-request load: request id, ``sync``/``async``, the end of
#: what was loaded, the promised end, the load's span on the system-wide monotonic clock
#: (``time.monotonic``; ``kvtier bench vllm --scenario async-itl`` reads it from the server's log)
LOAD_SPAN_LOG = "kvtier: load of %s (%s) reached %d of %d tokens, monotonic %.6f to %.6f"


def kv_transfer_config(extra: dict[str, Any] | None = None, kv_role: str = "kv_both") -> dict[str, Any]:
    """The ``--kv-transfer-config`` mapping that plugs kvtier into vLLM; failed kvtier loads are
    recomputed (vLLM's default policy would fail the request instead). ``kv_role``: ``kv_both``,
    ``kv_producer`` (prefill instance: saves, never loads) or ``kv_consumer`` (decode instance: loads,
    never saves)."""
    if kv_role not in KV_ROLES:
        raise ConfigError(f"kv_role must be one of {KV_ROLES}, got {kv_role!r}")
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": MODULE_PATH,
        "kv_role": kv_role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": dict(extra or {}),
    }
