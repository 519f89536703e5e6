"""KV geometry (:class:`KVSpec`): a plain record, torch-free.

The canonical chunk layout it describes is one contiguous tensor ``[layers, 2, tokens, kv_heads,
head_dim]`` (K at index 0 of the second axis, V at index 1) in the engine's dtype; the tensor helpers
that move KV in and out of that layout live in :mod:`kvtier.tensors`. The controller, router and cache
server import this module (through :mod:`kvtier.keys`) and must not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.errors import LayoutError

if TYPE_CHECKING:
    import torch

# dtype name -> bytes per element; the names are torch's (``torch.<name>``)
DTYPE_SIZES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


def check_dtype_name(name: str) -> None:
    """Raise :class:`LayoutError` listing the valid names unless ``name`` is a supported KV dtype."""
    if name not in DTYPE_SIZES:
        raise LayoutError(f"unknown KV dtype {name!r}; expected one of {sorted(DTYPE_SIZES)}")


@dataclass(frozen=True)
class KVSpec:
    """Geometry of one model's KV cache, as kvtier stores it.

    Invariant: two engines exchange chunks only if their specs are equal (the spec is part of every
    key's namespace, see :mod:`kvtier.keys`).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    chunk_tokens: int = 256

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "chunk_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise LayoutError(f"KVSpec.{field} must be a positive int, got {value!r}")
        check_dtype_name(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype (imports torch: only for code that moves tensors)."""
        from kvtier.tensors import dtype_from_name

        return dtype_from_name(self.dtype)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one full chunk in the canonical layout."""
        return self.bytes_per_token * self.chunk_tokens

    def chunk_shape(self, tokens: int | None = None) -> tuple[int, int, int, int, int]:
        """Canonical shape of a chunk of ``tokens`` tokens (default: a full chunk)."""
        n = self.chunk_tokens if tokens is None else tokens
        return (self.num_layers, 2, n, self.num_kv_heads, self.head_dim)

    def fingerprint(self) -> str:
        """Stable text form used in key namespaces and wire headers."""
        return (
            f"L{self.num_layers}-H{self.num_kv_heads}-D{self.head_dim}-{self.dtype}-C{self.chunk_tokens}"
        )
