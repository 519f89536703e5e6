"""Running a transformers Llama-family decoder one layer at a time over a chosen set of tokens.

The blend needs what ``model.forward`` cannot give: per layer, queries for only some tokens attending to a
KV buffer that mixes reused and fresh entries. :class:`LlamaStack` calls the model's own submodules
(``input_layernorm``, ``q/k/v/o_proj``, ``post_attention_layernorm``, ``mlp``, ``rotary_emb``, ``norm``,
``lm_head``) in the order ``LlamaDecoderLayer.forward`` does (transformers 5.x), so with every token
active it reproduces the model's own prefill up to float rounding.

Attention masks are built from absolute positions: a query at position ``p`` sees exactly the keys at
positions ``<= p``, whichever subset of queries is computed (no bottom-right alignment assumptions).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kvtier.blend.rope import rotate_half
from kvtier.errors import ConfigError


class LlamaStack:
    """Layer-by-layer access to a ``*ForCausalLM`` with the Llama layout (batch size 1).

    Supported: ``model.model.layers[i]`` with ``self_attn.{q,k,v,o}_proj`` (bias allowed), RMSNorms,
    gated MLP, one rotary module and full (not sliding-window) attention. Refused with
    :class:`ConfigError`: per-head q/k norms, sliding windows, rotary dim != head dim.
    """

    def __init__(self, model: Any) -> None:
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None or not hasattr(model, "lm_head"):
            raise ConfigError(f"blending needs a Llama-style *ForCausalLM, got {type(model).__name__}")
        cfg = model.config
        attn = layers[0].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                raise ConfigError(f"blending needs self_attn.{name} ({type(attn).__name__} has none)")
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise ConfigError(f"{type(attn).__name__} uses q/k norms, not supported by blending yet")
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            raise ConfigError("sliding-window attention is not supported by blending")
        self.model = model
        self.inner = inner
        self.layers = layers
        self.config = cfg
        self.num_layers = len(layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.scaling = float(attn.scaling)
        self.rotary = inner.rotary_emb

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.embed_tokens.weight.dtype

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[1, T, hidden]`` of token ids ``[T]``."""
        return self.inner.embed_tokens(tokens.reshape(1, -1))

    def rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model cos/sin ``[1, T, head_dim]`` for absolute ``positions`` ``[T]``."""
        cos, sin = self.rotary(hidden, positions.reshape(1, -1))
        return cos, sin

    def qkv(
        self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated Q ``[1, heads, T, D]``, rotated K and V ``[1, kv_heads, T, D]`` of ``hidden``."""
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        shape = (1, x.shape[1], -1, self.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        return q, k, v

    def finish_layer(
        self,
        layer: int,
        hidden: torch.Tensor,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of ``q`` over ``keys``/``values`` (all positions), then the MLP; new ``hidden``.

        ``mask`` is a boolean ``[T_q, T_k]`` (True = may attend) or ``None`` for plain causal attention
        when the queries are exactly all the keys.
        """
        block = self.layers[layer]
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None, scale=self.scaling,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        out = out.transpose(1, 2).reshape(1, q.shape[2], -1)
        hidden = hidden + block.self_attn.o_proj(out)
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[vocab]`` of the last position of ``hidden``."""
        return self.model.lm_head(self.inner.norm(hidden[:, -1:]))[0, -1].float()

    # ---- plain model paths (reference prefill and decoding) -------------------------------------
    def prefill(self, tokens: torch.Tensor, cache: Any = None, start: int = 0) -> tuple[Any, torch.Tensor]:
        """The model's own forward over ``tokens`` at positions ``start..``; ``(cache, last logits)``."""
        positions = torch.arange(start, start + tokens.numel()).reshape(1, -1)
        out = self.model(
            input_ids=tokens.reshape(1, -1), position_ids=positions, cache=cache, use_cache=True,
            logits_to_keep=1,
        )
        return out.cache, out.logits[0, -1].float()

    def decode(
        self, cache: Any, first_logits: torch.Tensor, position: int, max_new_tokens: int,
        stop: set[int] | None = None,
    ) -> list[int]:
        """Greedy tokens continuing ``cache`` (which holds positions ``< position``)."""
        out: list[int] = []
        logits = first_logits
        for i in range(max_new_tokens):
            token = int(torch.argmax(logits))
            out.append(token)
            if (stop and token in stop) or i == max_new_tokens - 1:
                break
            cache, logits = self.prefill(torch.tensor([token]), cache, position + i)
        return out

