"""Re-rotation of cached keys (kvtier.blend.rope) is exact: rotating a key computed at position p by
q - p equals computing it at q."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvtier.blend.rope import Rerotator
from kvtier.errors import ConfigError

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
}


def rotary_for(params: dict) -> LlamaRotaryEmbedding:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=4096, rope_parameters=params)
    return LlamaRotaryEmbedding(config)


def rope_tolerance(keys: torch.Tensor, max_position: int) -> float:
    """Float32 RoPE at position q is itself only accurate to about q * eps * |k| (the angle q * freq is
    rounded), so "exact" means equal within a few times that."""
    return 8 * torch.finfo(torch.float32).eps * max_position * float(keys.abs().max()) + 1e-6


def rope_at(rotary: LlamaRotaryEmbedding, raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = rotary(raw, positions.reshape(1, -1))
    _, k = apply_rotary_pos_emb(raw, raw, cos, sin)
    return k


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rerotation_matches_direct_rope(kind: str) -> None:
    torch.manual_seed(0)
    rotary = rotary_for(ROPES[kind])
    raw = torch.randn(1, 2, 40, 16)  # [batch, kv_heads, tokens, head_dim], before RoPE
    old = torch.arange(40)
    new = torch.arange(40) + torch.tensor([1000] * 20 + [3] * 20)  # two segments, different shifts
    cached = rope_at(rotary, raw, old)
    rr = Rerotator(rotary, head_dim=16)
    cos, sin = rr.cos_sin(new - old)
    moved = Rerotator.apply_(cached.clone()[0], cos, sin)
    torch.testing.assert_close(moved, rope_at(rotary, raw, new)[0], atol=rope_tolerance(raw, 1040), rtol=0)


def test_zero_shift_is_identity() -> None:
    rotary = rotary_for(ROPES["default"])
    keys = torch.randn(3, 10, 16)
    cos, sin = Rerotator(rotary, 16).cos_sin(torch.zeros(10, dtype=torch.long))
    assert torch.equal(Rerotator.apply_(keys.clone(), cos, sin), keys)


def test_sequence_dependent_rope_refused() -> None:
    with pytest.raises(ConfigError, match="dynamic"):
        Rerotator(rotary_for({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), 16)
    with pytest.raises(ConfigError, match="head_dim"):
        Rerotator(rotary_for(ROPES["default"]), 32)


@pytest.mark.slow
def test_layer0_keys_of_real_model(model_dir) -> None:
    """Layer-0 keys of SmolLM2 (float32) computed at p and moved to q equal those computed at q."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = torch.arange(100, 164)
    with torch.inference_mode():
        layer = model.model.layers[0]
        x = layer.input_layernorm(model.model.embed_tokens(tokens.reshape(1, -1)))
        raw = layer.self_attn.k_proj(x).view(1, 64, -1, 64).transpose(1, 2)
        rotary = model.model.rotary_emb
        p, q = torch.arange(64), torch.arange(64) + 2500
        moved = Rerotator(rotary, 64)
        cos, sin = moved.cos_sin(q - p)
        got = Rerotator.apply_(rope_at(rotary, raw, p)[0].clone(), cos, sin)
        torch.testing.assert_close(got, rope_at(rotary, raw, q)[0], atol=rope_tolerance(raw, 2564), rtol=0)
