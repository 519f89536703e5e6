"""CacheBlend: reuse the KV of separately cached segments anywhere in a prompt, recomputing a few tokens.

- :mod:`kvtier.blend.segments` splits prompts into segments, separators and the query;
- :mod:`kvtier.blend.rope` moves cached keys to new positions with the model's RoPE;
- :mod:`kvtier.blend.llama` runs a transformers Llama-family model layer by layer;
- :mod:`kvtier.blend.engine` puts them together (:class:`BlendEngine`).

Knobs live in the ``blend`` config section (:class:`kvtier.config.BlendConfig`). See docs/blend.md.
"""

from __future__ import annotations

from kvtier.blend.engine import BlendEngine, BlendStats, Prefill, kv_spec
from kvtier.blend.rope import Rerotator
from kvtier.blend.segments import Plan, join, separator_ids, split

__all__ = ["BlendEngine", "BlendStats", "Plan", "Prefill", "Rerotator", "join", "kv_spec", "separator_ids", "split"]
