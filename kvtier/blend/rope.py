"""Moving cached keys to new positions with the model's own rotary embedding.

RoPE rotates each pair of key channels ``(i, i + d/2)`` by the angle ``pos * inv_freq[i]``. Rotations
compose, so a key cached at position ``p`` becomes the key at ``q`` after one more rotation by
``q - p``: ``R(q) k = R(q - p) R(p) k``. This holds for every RoPE whose ``inv_freq`` does not depend on
the sequence (``default``, ``linear``, ``llama3``, ``yarn``): scaling only changes ``inv_freq``, which we
take from the model's rotary module. ``yarn`` also multiplies cos/sin by an attention factor; that factor
is already inside the cached key, so the extra rotation divides it out. Types whose frequencies change
with the sequence length (``dynamic``, ``longrope``) cannot be re-rotated exactly and are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from kvtier.errors import ConfigError

SHIFTABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type(rotary: Any) -> str:
    """The rope type the rotary module was built with (``"default"`` when it does not say)."""
    kind = getattr(rotary, "rope_type", "default")
    if not isinstance(kind, str):
        raise ConfigError(f"per-layer rope types are not supported by blending, got {kind!r}")
    return kind


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split on the last axis (the Llama pairing of channels)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rerotator:
    """Re-rotates keys by per-token position offsets using ``rotary`` (a transformers rotary module)."""

    def __init__(self, rotary: Any, head_dim: int) -> None:
        kind = rope_type(rotary)
        if kind not in SHIFTABLE_ROPE_TYPES:
            raise ConfigError(
                f"rope type {kind!r} cannot be re-rotated exactly; blending supports {SHIFTABLE_ROPE_TYPES}"
            )
        inv_freq = getattr(rotary, "inv_freq", None)
        if inv_freq is None or 2 * inv_freq.numel() != head_dim:
            found = None if inv_freq is None else 2 * inv_freq.numel()
            raise ConfigError(f"blending needs rotary dim == head_dim ({head_dim}), found {found}")
        self.rotary = rotary
        self.head_dim = head_dim
        self.scaling = float(getattr(rotary, "attention_scaling", 1.0))

    def cos_sin(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``cos, sin`` of shape ``[len(delta), head_dim]`` for a pure rotation by ``delta``."""
        probe = torch.empty(0, dtype=torch.float32, device=delta.device)
        cos, sin = self.rotary(probe, delta.reshape(1, -1).to(torch.long))
        return cos[0].float() / self.scaling, sin[0].float() / self.scaling

    @staticmethod
    def apply_(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``keys`` (``[..., tokens, head_dim]``) in place, computing in float32; return it.

        ``cos``/``sin`` are ``[tokens, head_dim]``; a zero offset leaves a key unchanged up to rounding
        to the key dtype (exactly unchanged in float32).
        """
        k = keys.float()
        keys.copy_(k * cos + rotate_half(k) * sin)
        return keys
