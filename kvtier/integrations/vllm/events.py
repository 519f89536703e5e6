"""Start kvtier's KV-event publisher (:mod:`kvtier.events`) for a vLLM connector's engine.

Enabled by the config's ``events`` section or ``kv_connector_extra_config.kvtier_events`` (a mapping of
:class:`~kvtier.config.EventsConfig` keys, e.g. ``{"endpoint": "tcp://127.0.0.1:5567",
"replay_endpoint": "tcp://127.0.0.1:5568", "topic": "kvtier"}``). Block hashes follow the serving vLLM:
its ``prefix_caching_hash_algo``, its ``block_size`` and the NONE_HASH seed it resolved in this process
(``PYTHONHASHSEED`` or vLLM's default seed), so a router sees kvtier's blocks under the hashes vLLM
itself publishes for the same tokens. One publisher per process-wide engine.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvtier.errors import ConfigError
from kvtier.events.bridge import start_events
from kvtier.events.hashing import BlockHasher

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from kvtier.config import EventsConfig

log = logging.getLogger(__name__)


def hasher_for(vllm_config: VllmConfig) -> BlockHasher:
    """The :class:`BlockHasher` that reproduces ``vllm_config``'s prefix-cache block hashes."""
    cache = vllm_config.cache_config
    algo = str(getattr(cache, "prefix_caching_hash_algo", "sha256"))
    seed: str | None = None
    try:  # the seed vLLM resolved in this process (set once its scheduler initialized the hasher)
        from vllm.v1.core import kv_cache_utils

        if getattr(kv_cache_utils, "_NONE_HASH_SEED", None) is not None:
            seed = kv_cache_utils.get_none_hash_seed()
    except ImportError:
        pass
    return BlockHasher(algo, int(cache.block_size), seed)


def ensure_events(shared: Any, vllm_config: VllmConfig, config: EventsConfig) -> None:
    """Attach a publisher to ``shared.engine`` unless one is attached; a bad endpoint raises ConfigError."""
    if shared.events is not None:
        return
    try:
        hasher = hasher_for(vllm_config)
    except ValueError as exc:
        raise ConfigError(f"kvtier_events: {exc}") from exc
    if shared.engine.spec.chunk_tokens % hasher.block_size:
        log.warning("kvtier events: chunk_tokens %d is not a multiple of vLLM's block size %d; blocks that "
                    "straddle chunks are not published", shared.engine.spec.chunk_tokens, hasher.block_size)
    shared.events = start_events(shared.engine, config, hasher)
