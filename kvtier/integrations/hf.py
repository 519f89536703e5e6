"""Hugging Face transformers adapter for Llama-family causal LMs (batch size 1, greedy decoding).

How one generation goes:

1. ``lookup`` the prompt; ``retrieve`` the cached prefix straight into per-layer ``[1, H, T, D]`` K/V
   buffers (kvtier writes through transposed ``[T, H, D]`` views, so no extra layout copy).
2. Wrap them in a ``DynamicCache`` and prefill only the rest of the prompt, with explicit
   ``position_ids`` continuing after the hit (transformers 5.x derives the cache position from them).
   At least the last prompt token is always computed (its logits give the first new token), so a
   full hit is used as ``n - 1`` tokens.
3. ``store`` the prompt's new chunks from views of the cache's own tensors (``skip_tokens=hit``).
4. Greedy decode.

Invariants: the KV the model attends to is bit-for-bit what a full prefill would have produced for the
reused positions (kvtier only moves bytes), so greedy output matches the no-cache path whenever the
model's kernels are row-independent (they are on CPU for the embedded model, see the tests). Any failure
inside kvtier is logged and answered by recomputing: inference never fails because of the cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.config import KvtierConfig, load_config
from kvtier.engine import CacheEngine
from kvtier.layout import KVSpec
from kvtier.tensors import dtype_name

log = logging.getLogger(__name__)


def kv_spec_for(model: Any, chunk_tokens: int = 256) -> KVSpec:
    """The :class:`KVSpec` of a Llama-family HF model (layers, KV heads, head dim, parameter dtype)."""
    cfg = model.config.get_text_config(decoder=True)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return KVSpec(int(cfg.num_hidden_layers), kv_heads, head_dim, dtype_name(model.dtype), chunk_tokens)


def model_id_for(model: Any) -> str:
    """The model part of kvtier's key namespace for an HF model: the hub id or path it was loaded from
    (``config.name_or_path``). vLLM's kvtier connector uses the same string by default (its served
    model name, which defaults to the ``--model`` argument), so an HF process and a vLLM server loading
    the same path share chunks; pass ``model_id`` / ``kvtier_model_id`` on both sides otherwise."""
    name = str(getattr(model.config, "name_or_path", "") or "")
    if not name:
        raise ValueError("the model has no config.name_or_path; pass model_id explicitly")
    return name


def cache_engine_for(model: Any, config: KvtierConfig | None = None, *, model_id: str | None = None) -> CacheEngine:
    """A :class:`CacheEngine` for ``model`` keyed like vLLM's kvtier connector keys the same model:
    model id :func:`model_id_for` (unless given), the model's KV geometry and parameter dtype, and the
    config's ``chunk_tokens`` and ``tenant``. Sharing with vLLM also needs vLLM's ``--dtype`` equal to
    the model's dtype here and the same ``chunk_tokens`` on both sides (vLLM's connector defaults to its
    block size, 128 on CPU, when the config does not set it)."""
    config = config or load_config()
    return CacheEngine(kv_spec_for(model, config.chunk_tokens), model_id or model_id_for(model), config)


@dataclass(frozen=True)
class GenerationResult:
    """One generation: new token ids (prompt excluded), time to first token and in total (seconds),
    prompt tokens taken from kvtier and prompt tokens computed (``hit + prefilled == len(prompt)``)."""

    tokens: list[int]
    ttft_s: float
    hit_tokens: int
    prefilled_tokens: int
    total_s: float


class HFCachedLM:
    """A causal LM whose prompt prefill reuses KV cached in a :class:`CacheEngine` (``None`` = no cache).

    The engine's spec must equal :func:`kv_spec_for` of the model (up to ``chunk_tokens``).
    """

    def __init__(self, model: Any, tokenizer: Any = None, engine: CacheEngine | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.engine = engine
        self.spec = kv_spec_for(model, engine.spec.chunk_tokens if engine else 256)
        if engine is not None and engine.spec != self.spec:
            raise ValueError(f"engine spec {engine.spec.fingerprint()} != model spec {self.spec.fingerprint()}")
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        self.stop_ids: set[int] = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    # ---- kvtier side (every call guarded: a failure means recompute) --------------------------------
    def _reuse(self, tokens: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Retrieve the cached prefix of ``tokens``; return (usable hit, per-layer [1,H,hit,D] K/V)."""
        assert self.engine is not None
        try:
            if self.engine.lookup(tokens) == 0:
                return 0, None
            s = self.spec
            shape = (1, s.num_kv_heads, len(tokens), s.head_dim)
            bufs = [(torch.empty(shape, dtype=s.torch_dtype), torch.empty(shape, dtype=s.torch_dtype))
                    for _ in range(s.num_layers)]
            hit = self.engine.retrieve(tokens, [(k[0].transpose(0, 1), v[0].transpose(0, 1)) for k, v in bufs])
        except Exception:
            log.exception("kvtier retrieve failed; recomputing the whole prompt")
            return 0, None
        hit = min(hit, len(tokens) - 1)  # the last prompt token is always computed
        if hit <= 0:
            return 0, None
        return hit, [(k[:, :, :hit], v[:, :, :hit]) for k, v in bufs]

    def _store(self, tokens: list[int], cache: Any, skip: int) -> None:
        assert self.engine is not None
        try:
            kv = [(layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)) for layer in cache.layers]
            self.engine.store(tokens, kv, skip_tokens=skip)
        except Exception:
            log.exception("kvtier store failed; continuing without caching this prompt")

    # ---- generation ---------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, cache: Any, start: int) -> torch.Tensor:
        """Run ``ids`` ([1, n]) at positions ``start..start+n-1``; return the last position's logits."""
        pos = torch.arange(start, start + ids.shape[1])
        out = self.model(input_ids=ids, cache=cache, use_cache=True, position_ids=pos.unsqueeze(0),
                         logits_to_keep=1)
        return out.logits[0, -1]

    @torch.inference_mode()
    def generate(self, input_ids: Sequence[int] | torch.Tensor, max_new_tokens: int = 32,
                 use_kvtier: bool = True) -> GenerationResult:
        """Greedy-generate up to ``max_new_tokens`` after ``input_ids`` (stops after an EOS token)."""
        from transformers import DynamicCache

        tokens = [int(t) for t in (input_ids.reshape(-1).tolist() if isinstance(input_ids, torch.Tensor)
                                   else input_ids)]
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        start = time.perf_counter()
        cached = use_kvtier and self.engine is not None
        hit, kv = self._reuse(tokens) if cached else (0, None)
        cache = DynamicCache(ddp_cache_data=kv, config=self.model.config)
        ids = torch.tensor([tokens[hit:]], dtype=torch.long)
        next_id = int(self._forward(ids, cache, hit).argmax())
        ttft = time.perf_counter() - start
        if cached:
            self._store(tokens, cache, hit)
        out = [next_id]
        while len(out) < max_new_tokens and next_id not in self.stop_ids:
            step = torch.tensor([[next_id]], dtype=torch.long)
            next_id = int(self._forward(step, cache, len(tokens) + len(out) - 1).argmax())
            out.append(next_id)
        return GenerationResult(out, ttft, hit, len(tokens) - hit, time.perf_counter() - start)
