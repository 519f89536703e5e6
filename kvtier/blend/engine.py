"""BlendEngine: prefill a prompt of separately cached segments (any order, any offset) with CacheBlend.

Segment KV and its keys
    Prompts look like ``prefix seg_1 SEP ... seg_n SEP query`` (:mod:`kvtier.blend.segments`). A
    segment's KV is computed right after the prefix and nothing else: it is the KV of the tokens
    ``prefix + segment`` run as a prompt of their own (with an empty prefix: the segment alone at
    positions ``0..n-1``). It is stored in a :class:`~kvtier.engine.CacheEngine` under the ordinary
    chained chunk keys of ``prefix + segment``, so the key depends on those tokens only (not on where
    the segment is used), every hit is verified against the stored token ids by the CPU tier, and the
    entry is by construction exactly the prefix-cache entry of that prompt: the blend shares its
    CacheEngine and namespace with the plain prefix cache without ever mixing incompatible bytes.
    Positions are implied by the key (chunk ``i`` covers positions ``[iC, iC + len)``), not stored.
    Computing segments after the real prefix (the system prompt) instead of alone avoids giving every
    segment a fake first-token attention sink. A partly cached entry (e.g. its tail was evicted) is
    completed by an ordinary prefix-cached forward over the missing tokens, then stored.

Prefill
    1. Retrieve the prefix and every segment into one KV buffer at the prompt's positions; re-rotate
       segment K from the cached positions to the new ones (:class:`~kvtier.blend.rope.Rerotator`).
    2. Layers ``< check_layer``: compute every token fresh (full causal attention).
    3. At ``check_layer``: compute fresh K/V for every token, measure per segment token the squared
       deviation of fresh vs reused K (or V, ``metric``), keep the top ``ceil(ratio * segment tokens)``
       of them plus every fresh token (separators, short pieces, query, and always the last token).
       Prefix tokens are exact and never recomputed.
    4. Layers ``>= check_layer``: compute only the kept tokens; their fresh K/V overwrite the reused
       entries; each attends to every position ``<=`` its own in the blended buffer.
    The returned cache holds the blended KV of all layers, ready for decoding at position ``len``.

Invariants: ``recompute_ratio = 1`` equals a full prefill up to float rounding; the KV of positions
before the query does not depend on the query; a segment's cached KV does not depend on where it was
first seen.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache

from kvtier.blend.llama import LlamaStack
from kvtier.blend.rope import Rerotator
from kvtier.blend.segments import Plan, TokenIds, join, separator_ids, split
from kvtier.config import BlendConfig, KvtierConfig
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError
from kvtier.layout import KVSpec
from kvtier.tensors import dtype_name

Text = str | TokenIds


@dataclass(frozen=True)
class BlendStats:
    """What one prefill did. ``prefix + reused + fresh == tokens``; ``recomputed <= reused``."""

    tokens: int
    prefix: int  # prefix tokens (reused exactly, never recomputed)
    reused: int  # segment tokens whose KV came from the cache
    recomputed: int  # segment tokens selected for recompute at the check layer
    fresh: int  # tokens always computed (separators, short pieces, query, last token)
    segment_hits: int  # segments found whole in the cache
    segment_misses: int  # segments (partly) computed during this prefill
    segment_computed_tokens: int  # tokens computed to complete missing cache entries (prefix included)


class Prefill(NamedTuple):
    """Result of :meth:`BlendEngine.prefill`: the blended ``DynamicCache``, the float32 logits of the
    next token ``[vocab]`` and the :class:`BlendStats`."""

    cache: Any
    logits: torch.Tensor
    stats: BlendStats


def kv_spec(model: Any, chunk_tokens: int = 256) -> KVSpec:
    """The :class:`KVSpec` of a transformers causal LM (its parameters' dtype)."""
    stack = LlamaStack(model)
    return KVSpec(stack.num_layers, stack.num_kv_heads, stack.head_dim, dtype_name(stack.dtype), chunk_tokens)


class BlendEngine:
    """CacheBlend prefill and greedy generation for one model over one :class:`CacheEngine`.

    ``config`` defaults to the cache engine's ``blend`` section. Calls may run from several threads
    (counters are locked; the model runs under ``torch.inference_mode``).
    """

    def __init__(self, model: Any, tokenizer: Any, cache: CacheEngine, config: BlendConfig | None = None) -> None:
        self.stack = LlamaStack(model)
        self.tokenizer = tokenizer
        self.cache = cache
        self.config = config or cache.config.blend
        if self.config.check_layer >= self.stack.num_layers:
            raise ConfigError(
                f"blend.check_layer must be below the model's {self.stack.num_layers} layers, "
                f"got {self.config.check_layer}"
            )
        want = kv_spec(model, cache.spec.chunk_tokens)
        if want != cache.spec:
            raise ConfigError(f"cache engine spec {cache.spec.fingerprint()} != model spec {want.fingerprint()}")
        self.rerotator = Rerotator(self.stack.rotary, self.stack.head_dim)
        self.separator = separator_ids(tokenizer, self.config.separator)
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()

    @classmethod
    def create(cls, model: Any, tokenizer: Any, config: KvtierConfig | None = None,
               model_id: str | None = None) -> BlendEngine:
        """Build a :class:`CacheEngine` for ``model`` (namespace = ``model_id`` or its path) and wrap it."""
        from kvtier.config import load_config

        cfg = config or load_config()
        name = model_id or str(getattr(model, "name_or_path", "") or type(model).__name__)
        return cls(model, tokenizer, CacheEngine(kv_spec(model, cfg.chunk_tokens), name, cfg), cfg.blend)

    # ---- planning ------------------------------------------------------------------------------
    def encode(self, text: Text) -> list[int]:
        """Token ids of ``text`` (no special tokens added); token sequences pass through."""
        if isinstance(text, str):
            return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        return [int(t) for t in text]

    def plan(self, segments: Sequence[Text], query: Text, prefix: Text = ()) -> Plan:
        """Layout of ``prefix seg_1 SEP ... seg_n SEP query`` with the segments taken as given."""
        return join([self.encode(s) for s in segments], self.encode(query), self.separator,
                    self.config.min_segment_tokens, self.encode(prefix))

    def plan_tokens(self, tokens: TokenIds) -> Plan:
        """Layout of a whole prompt split at the separator (the last piece is the query; the first is
        the prefix when ``prefix_piece`` is set)."""
        return split(tokens, self.separator, self.config.min_segment_tokens, self.config.prefix_piece)

    # ---- cache entries ------------------------------------------------------------------------
    def _load_entry(self, entry: Sequence[int], keys: list[torch.Tensor], values: list[torch.Tensor],
                    offset: int) -> int:
        """Write the KV of ``entry`` run as a prompt of its own (positions ``0..n-1``) into buffer
        positions ``[offset, offset + n)``, computing and storing what the cache lacks; return the
        number of tokens computed."""
        n = len(entry)
        views = [(k[0, :, offset : offset + n].transpose(0, 1), v[0, :, offset : offset + n].transpose(0, 1))
                 for k, v in zip(keys, values)]
        hit = self.cache.retrieve(entry, views)
        if hit == n:
            return 0
        past = None
        if hit:
            past = DynamicCache(
                ddp_cache_data=[(k[:, :, offset : offset + hit], v[:, :, offset : offset + hit])
                                for k, v in zip(keys, values)],
                config=self.stack.config,
            )
        computed, _ = self.stack.prefill(torch.tensor(entry[hit:]), past, start=hit)
        for layer, (k, v) in enumerate(zip(keys, values)):
            k[:, :, offset + hit : offset + n].copy_(computed.layers[layer].keys[:, :, hit:n])
            v[:, :, offset + hit : offset + n].copy_(computed.layers[layer].values[:, :, hit:n])
        self.cache.store(entry, views, skip_tokens=hit)
        return n - hit

    def _buffers(self, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shape = (1, self.stack.num_kv_heads, n, self.stack.head_dim)
        dtype = self.stack.dtype
        return ([torch.zeros(shape, dtype=dtype) for _ in range(self.stack.num_layers)],
                [torch.zeros(shape, dtype=dtype) for _ in range(self.stack.num_layers)])

    @torch.inference_mode()
    def cache_segments(self, segments: Sequence[Text], prefix: Text = ()) -> int:
        """Make sure the prefix and every segment (computed after it) are cached; return tokens computed."""
        head = self.encode(prefix)
        entries = [head] if head else []
        entries += [head + seg for seg in map(self.encode, segments) if len(seg) >= self.config.min_segment_tokens]
        total = 0
        for entry in entries:
            keys, values = self._buffers(len(entry))
            total += self._load_entry(entry, keys, values, 0)
        return total

    # ---- prefill -------------------------------------------------------------------------------
    def prefill(self, segments: Sequence[Text], query: Text, prefix: Text = ()) -> Prefill:
        """Blend-prefill ``prefix seg_1 SEP ... seg_n SEP query``."""
        return self.prefill_plan(self.plan(segments, query, prefix))

    def prefill_tokens(self, tokens: TokenIds) -> Prefill:
        """Blend-prefill a whole prompt split at the separator."""
        return self.prefill_plan(self.plan_tokens(tokens))

    @torch.inference_mode()
    def prefill_plan(self, plan: Plan) -> Prefill:
        """Blend-prefill ``plan``; the cache covers positions ``[0, plan.num_tokens)``."""
        n, a = plan.num_tokens, plan.prefix_end
        if n == 0:
            raise ValueError("cannot prefill an empty prompt")
        keys, values = self._buffers(n)
        reused = torch.zeros(n, dtype=torch.bool)
        delta = torch.zeros(n, dtype=torch.long)
        hits = misses = computed = 0
        # Segment i's entry is prefix + segment, written at [start - a, end): its prefix part lands on
        # earlier positions. Loading the last segment first and the prefix last leaves every segment and
        # the prefix intact; the leftovers only land on fresh positions, which are always recomputed.
        for start, end in reversed(plan.segments):
            done = self._load_entry(plan.prefix + plan.tokens[start:end], keys, values, start - a)
            hits, misses, computed = hits + (done == 0), misses + (done > 0), computed + done
            reused[start:end] = True
            delta[start:end] = start - a  # cached at a..a+len-1, now at start..end-1
        if a:
            computed += self._load_entry(plan.prefix, keys, values, 0)
        reused[n - 1] = False  # the last token's logits are the output: always computed
        if bool(delta.any()):
            cos, sin = self.rerotator.cos_sin(delta)
            for k in keys:
                Rerotator.apply_(k[0], cos, sin)
        fresh = ~reused
        fresh[: min(a, n - 1)] = False
        logits, recomputed = self._blend(torch.tensor(plan.tokens), keys, values, reused, fresh)
        cache = DynamicCache(ddp_cache_data=list(zip(keys, values)), config=self.stack.config)
        num_reused, num_fresh = int(reused.sum()), int(fresh.sum())
        stats = BlendStats(n, n - num_reused - num_fresh, num_reused, recomputed, num_fresh, hits, misses,
                           computed)
        with self._lock:
            self.counters.update(prefills=1, tokens=n, reused_tokens=num_reused, recomputed_tokens=recomputed,
                                 segment_hits=hits, segment_misses=misses, segment_computed_tokens=computed)
        return Prefill(cache, logits, stats)

    def _select(self, fresh: torch.Tensor, cached: torch.Tensor, reused_idx: torch.Tensor) -> torch.Tensor:
        """Indices (into the prompt) of the reused tokens whose fresh entry deviates most."""
        count = min(reused_idx.numel(), math.ceil(self.config.recompute_ratio * reused_idx.numel() - 1e-9))
        if count <= 0:
            return reused_idx[:0]
        diff = fresh.index_select(2, reused_idx).float() - cached.index_select(2, reused_idx).float()
        deviation = diff.pow(2).sum(dim=(0, 1, 3))
        return reused_idx[torch.topk(deviation, count).indices]

    def _blend(self, tokens: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
               reused: torch.Tensor, fresh: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Run the layers over the buffer holding reused KV; return (last logits, tokens recomputed).

        ``reused`` marks the recompute candidates, ``fresh`` the tokens computed at every layer; the
        rest (the prefix) keeps its cached KV from the check layer on."""
        stack, check = self.stack, self.config.check_layer
        n = tokens.numel()
        positions = torch.arange(n)
        hidden = stack.embed(tokens)
        cos, sin = stack.rope(hidden, positions)
        reused_idx = reused.nonzero().reshape(-1)
        active: torch.Tensor | None = None  # None: every token is computed at this layer
        mask: torch.Tensor | None = None
        recomputed = 0
        for layer in range(stack.num_layers):
            q, k, v = stack.qkv(layer, hidden, cos, sin)
            if active is None and layer == check and (reused_idx.numel() or not fresh.all()):
                cached = keys[layer] if self.config.metric == "key" else values[layer]
                chosen = self._select(k if self.config.metric == "key" else v, cached, reused_idx)
                recomputed = chosen.numel()
                active = torch.cat([fresh.nonzero().reshape(-1), chosen]).sort().values
                q, k, v = q[:, :, active], k[:, :, active], v[:, :, active]
                hidden, cos, sin = hidden[:, active], cos[:, active], sin[:, active]
                mask = positions[None, :] <= active[:, None]
            if active is None:
                keys[layer].copy_(k)
                values[layer].copy_(v)
            else:
                keys[layer].index_copy_(2, active, k)
                values[layer].index_copy_(2, active, v)
            hidden = stack.finish_layer(layer, hidden, q, keys[layer], values[layer], mask)
        return stack.logits(hidden), recomputed

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, segments: Sequence[Text], query: Text, prefix: Text = (), max_new_tokens: int = 32,
                 stop: set[int] | None = None) -> list[int]:
        """Greedy continuation after a blend prefill; stops after an EOS (or ``stop``) token."""
        result = self.prefill(segments, query, prefix)
        if stop is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            stop = {int(eos)} if eos is not None else set()
        with torch.inference_mode():
            return self.stack.decode(result.cache, result.logits, result.stats.tokens, max_new_tokens, stop)
