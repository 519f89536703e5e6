"""BlendEngine invariants: ratio 1.0 equals a full prefill; segment KV is order-independent and counted;
re-rotated reused keys equal fresh ones at layer 0; KV before the query does not depend on the query."""

from __future__ import annotations

import pytest
import torch

from kvtier.blend import BlendEngine, kv_spec
from kvtier.config import BlendConfig, load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError

PREFIX = "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nNotes:\n\n"
DOCS = [
    "The harbour town of Vellmoor exports smoked herring packed in pine crates.",
    "Marta Quell made 94 violins in the hill village of Tessaro, marking each with an acorn.",
    "The Gorran Tunnel on the Hallow railway is 3.4 kilometres long and took three years to dig.",
]
QUERY = "Question: where did Marta Quell work?<|im_end|>\n<|im_start|>assistant\n"


def kv_config(**overrides):
    return load_config(environ={}, overrides={"chunk_tokens": 16, "cpu": {"capacity": "96MiB"}, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CI box is 2 shared cores; with 2 OpenMP threads on an oversubscribed CPU these small forwards
    spend most of their time in barriers (measured ~3x slower). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smol(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def make(smol, cache=None, **blend):
    model, tok = smol
    cache = cache or CacheEngine(kv_spec(model, 16), "smol", kv_config())
    return BlendEngine(model, tok, cache, BlendConfig(**blend))


def full_prefill(engine: BlendEngine, tokens):
    with torch.inference_mode():
        return engine.stack.prefill(torch.tensor(tokens))


def greedy(engine: BlendEngine, cache, logits, position, n=6):
    with torch.inference_mode():
        return engine.stack.decode(cache, logits, position, n)


@pytest.mark.slow
@pytest.mark.parametrize("prefix", [PREFIX, ""], ids=["prefix", "alone"])
def test_ratio_one_equals_full_prefill(smol, prefix: str) -> None:
    engine = make(smol, recompute_ratio=1.0)
    engine.cache_segments(DOCS, prefix)  # cached in this order, used in another
    docs = [DOCS[2], DOCS[0], DOCS[1]]
    plan = engine.plan(docs, QUERY, prefix)
    out = engine.prefill(docs, QUERY, prefix)
    assert out.stats.segment_hits == 3 and out.stats.recomputed == out.stats.reused > 0
    ref_cache, ref_logits = full_prefill(engine, plan.tokens)
    torch.testing.assert_close(out.logits, ref_logits, atol=2e-3, rtol=1e-4)
    for layer in (0, 1, 15, 29):
        torch.testing.assert_close(out.cache.layers[layer].keys, ref_cache.layers[layer].keys, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(out.cache.layers[layer].values, ref_cache.layers[layer].values,
                                   atol=1e-3, rtol=1e-4)
    n = plan.num_tokens
    assert greedy(engine, out.cache, out.logits, n) == greedy(engine, ref_cache, ref_logits, n)


@pytest.mark.slow
def test_reused_keys_rerotated_exactly_at_layer0(smol) -> None:
    """Naive reuse (check layer 0, ratio 0) keeps the cached, re-rotated layer-0 KV of every segment
    token; layer-0 KV depends only on token and position, so it must equal the full prefill's."""
    engine = make(smol, recompute_ratio=0.0, check_layer=0)
    docs = [DOCS[1], DOCS[2], DOCS[0]]
    plan = engine.plan(docs, QUERY, PREFIX)
    out = engine.prefill(docs, QUERY, PREFIX)
    assert out.stats.recomputed == 0
    ref_cache, _ = full_prefill(engine, plan.tokens)
    for start, end in plan.segments:
        got = out.cache.layers[0].keys[:, :, start:end]
        want = ref_cache.layers[0].keys[:, :, start:end]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.cache.layers[0].values[:, :, start:end],
                                   ref_cache.layers[0].values[:, :, start:end], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_segment_caching_is_order_independent(smol) -> None:
    engine = make(smol)
    first = engine.prefill([DOCS[0], DOCS[1]], QUERY, PREFIX)
    assert (first.stats.segment_hits, first.stats.segment_misses) == (0, 2)
    hits_before = engine.cache.stats()["engine"]["retrieve_hit_tokens"]
    second = engine.prefill([DOCS[2], DOCS[1], DOCS[0]], QUERY, PREFIX)
    assert (second.stats.segment_hits, second.stats.segment_misses) == (2, 1)
    assert engine.counters["segment_hits"] == 2 and engine.counters["segment_misses"] == 3
    assert engine.cache.stats()["engine"]["retrieve_hit_tokens"] > hits_before
    # the cached entry of DOCS[1] (first seen after DOCS[0]) is exactly PREFIX + DOCS[1] computed alone
    entry = engine.encode(PREFIX) + engine.encode(DOCS[1])
    alone, _ = full_prefill(engine, entry)
    spec = engine.cache.spec
    got = torch.zeros(spec.num_layers, 2, len(entry), spec.num_kv_heads, spec.head_dim)
    assert engine.cache.retrieve(entry, got) == len(entry)
    for layer in (0, 29):
        want = alone.layers[layer].keys[0].transpose(0, 1)
        torch.testing.assert_close(got[layer, 0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_missing_tail_is_recomputed(smol) -> None:
    engine = make(smol)
    first = engine.prefill(DOCS, QUERY, PREFIX)
    entry = engine.encode(PREFIX) + engine.encode(DOCS[2])
    _arr, chunks = engine.cache.chunker.chunks(entry)
    assert engine.cache.cpu.remove(chunks[-1].key)  # evict the last chunk of one segment
    second = engine.prefill(DOCS, QUERY, PREFIX)
    assert second.stats.segment_misses == 1
    assert second.stats.segment_computed_tokens == chunks[-1].num_tokens
    torch.testing.assert_close(second.logits, first.logits, atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_kv_before_query_does_not_depend_on_query(smol) -> None:
    engine = make(smol, recompute_ratio=0.3)
    engine.cache_segments(DOCS, PREFIX)
    a = engine.prefill(DOCS, QUERY, PREFIX)
    b = engine.prefill(DOCS, "Question: how long is the Gorran Tunnel, in kilometres?", PREFIX)
    cut = engine.plan(DOCS, QUERY, PREFIX).query_start
    for layer in (1, 10, 29):
        torch.testing.assert_close(a.cache.layers[layer].keys[:, :, :cut], b.cache.layers[layer].keys[:, :, :cut],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_prefill_tokens_splits_at_separator(smol) -> None:
    engine = make(smol, recompute_ratio=1.0)
    plan = engine.plan(DOCS, QUERY, PREFIX)
    split = engine.plan_tokens(plan.tokens)
    assert split.prefix_end > 0 and len(split.segments) >= 3
    out = engine.prefill_tokens(plan.tokens)
    _cache, ref = full_prefill(engine, plan.tokens)
    torch.testing.assert_close(out.logits, ref, atol=2e-3, rtol=1e-4)


@pytest.mark.slow
def test_bad_config_refused(smol) -> None:
    with pytest.raises(ConfigError, match="check_layer"):
        make(smol, check_layer=30)
    model, tok = smol
    from kvtier.layout import KVSpec

    wrong = CacheEngine(KVSpec(30, 3, 64, "bfloat16", 16), "smol", kv_config())
    with pytest.raises(ConfigError, match="spec"):
        BlendEngine(model, tok, wrong)


class CharTokenizer:
    """Stand-in tokenizer for the tiny random model: one token per character."""

    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 200 for c in text]}


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama with llama3 RoPE scaling (fast; exercises a scaled RoPE end to end)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    model = LlamaForCausalLM(cfg).eval()
    return model, CacheEngine(kv_spec(model, 16), "tiny", kv_config())


def tiny_engine(tiny, **blend) -> BlendEngine:
    model, cache = tiny
    return BlendEngine(model, CharTokenizer(), cache, BlendConfig(separator="|", **blend))


def test_scaled_rope_model_ratio_one_and_naive_layer0(tiny) -> None:
    """ratio 1.0 equals full prefill, and naive reuse keeps exactly re-rotated layer-0 keys."""
    segs = [list(range(10, 50)), list(range(60, 85)), list(range(100, 170))]
    prefix, query = [1, 2, 3, 4, 5], [7, 8, 9]
    full = tiny_engine(tiny, recompute_ratio=1.0)
    full.cache_segments(segs[::-1], prefix)
    plan = full.plan(segs, query, prefix)
    out = full.prefill(segs, query, prefix)
    ref_cache, ref_logits = full_prefill(full, plan.tokens)
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=1e-4)
    out = tiny_engine(tiny, recompute_ratio=0.0, check_layer=0).prefill(segs, query, prefix)
    assert out.stats.segment_hits == 3
    torch.testing.assert_close(out.cache.layers[0].keys, ref_cache.layers[0].keys, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ratio", [0.0, 0.15])
def test_prompts_without_segments_are_full_prefills(tiny, ratio: float) -> None:
    engine = tiny_engine(tiny, recompute_ratio=ratio)
    sep = list(engine.separator)
    cases = [
        list(range(20, 60)),  # no separator at all: all query
        sep + sep + list(range(20, 60)),  # only empty pieces before the query
        list(range(20, 60)) + sep,  # prefix piece, empty query: the separator is the fresh tail
    ]
    for tokens in cases:
        out = engine.prefill_tokens(tokens)
        assert out.stats.reused == 0 and out.stats.segment_hits + out.stats.segment_misses == 0
        torch.testing.assert_close(out.logits, full_prefill(engine, tokens)[1], atol=1e-4, rtol=1e-4)
    out = engine.prefill([], [7, 8, 9], prefix=[1, 2, 3])  # no segments, just prefix + query
    torch.testing.assert_close(out.logits, full_prefill(engine, [1, 2, 3, 7, 8, 9])[1], atol=1e-4, rtol=1e-4)
    out = engine.prefill([[], [11, 12]], [7])  # an empty segment is skipped, not separated
    assert out.stats.tokens == 2 + len(sep) + 1
