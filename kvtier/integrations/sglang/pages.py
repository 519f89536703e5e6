"""SGLang pages as kvtier objects: keys, page identity and canonical views of SGLang's host pool.

Pure (torch and blake3, no SGLang): unit tests and the benchmark use it without an engine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np
import torch

from kvtier.errors import LayoutError
from kvtier.keys import KEY_BYTES, ChunkKey, Namespace
from kvtier.layout import KVSpec
from kvtier.record import ChunkRecord, Kind
from kvtier.tensors import dtype_name
from kvtier.wire import MAX_PAGE_IDENTITY

__all__ = ["LAYOUTS", "PageKeys", "PoolView", "copy_page", "namespace_model"]

LAYOUTS = ("layer_first", "page_first")  # host layouts whose page is one strided view


def namespace_model(model: str, tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1) -> str:
    """The model part of the namespace: ranks hold different heads / layers under the same page hash."""
    text = f"sglang-page/{model}"
    if tp_size > 1 or pp_size > 1:
        text += f"|tp{tp_rank}/{tp_size}|pp{pp_rank}/{pp_size}"
    return text


@dataclass(frozen=True)
class PageKeys:
    """Maps SGLang page hashes onto kvtier keys of one namespace. Stateless, thread-safe.

    Invariant: ``key(h)`` and ``identity(h)`` depend only on the namespace and ``h``; two hashes that
    differ never share an identity (for pages of at least 8 tokens the identity *is* the hash).
    """

    namespace: Namespace

    @property
    def page_tokens(self) -> int:
        return self.namespace.spec.chunk_tokens

    @functools.cached_property
    def root(self) -> ChunkKey:
        return self.namespace.root()

    @staticmethod
    def raw(page_hash: str) -> bytes:
        """The hash's bytes (hex decoded; any other key text as UTF-8)."""
        try:
            return bytes.fromhex(page_hash)
        except ValueError:
            return page_hash.encode()

    def key(self, page_hash: str) -> ChunkKey:
        return blake3.blake3(self.root + self.raw(page_hash)).digest(length=KEY_BYTES)

    def identity(self, page_hash: str) -> bytes:
        """The bytes a page is verified by: the raw hash, or a 32-byte BLAKE3 digest of an overlong one."""
        raw = self.raw(page_hash)
        return raw if 0 < len(raw) <= MAX_PAGE_IDENTITY else blake3.blake3(raw).digest()

    def record(self, page_hash: str) -> ChunkRecord:
        """The kvtier record of a page (kind ``PAGE``, parent = the namespace root)."""
        return ChunkRecord(self.key(page_hash), self.root, self.identity(page_hash), Kind.PAGE, self.page_tokens)


class PoolView:
    """Canonical ``[layers, 2, page_size, heads, head_dim]`` views of pages of SGLang's MHA host pool.

    Needs only the pool's ``layout``, ``kv_buffer`` (``[2, layers, tokens, heads, dim]`` for
    layer_first, ``[2, tokens, layers, heads, dim]`` for page_first), ``page_size``, ``layer_num``,
    ``head_num``, ``head_dim`` and ``dtype``; raises :class:`LayoutError` for anything else.
    """

    def __init__(self, pool: Any) -> None:
        layout = getattr(pool, "layout", None)
        if layout not in LAYOUTS:
            raise LayoutError(f"host pool layout {layout!r} is not supported; use one of {LAYOUTS}")
        if getattr(pool, "v_head_dim", pool.head_dim) != pool.head_dim:
            raise LayoutError("K and V head dims differ (MLA-style pool); kvtier supports MHA pools")
        self.pool = pool
        self.layout: str = layout
        self.page_size = int(pool.page_size)
        self.spec = KVSpec(int(pool.layer_num), int(pool.head_num), int(pool.head_dim),
                           dtype_name(pool.dtype), chunk_tokens=self.page_size)
        buffer = pool.kv_buffer
        want = (2, self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim)
        got = (buffer.shape[0], buffer.shape[1 if layout == "layer_first" else 2], *buffer.shape[3:])
        if buffer.dim() != 5 or tuple(got) != want:
            raise LayoutError(f"host KV buffer {tuple(buffer.shape)} does not match layout {layout} and {self.spec}")

    def page(self, index: int) -> torch.Tensor:
        """The page starting at host slot ``index`` (a multiple of ``page_size``), as a canonical view."""
        if index % self.page_size:
            raise LayoutError(f"host index {index} is not at a page start (page size {self.page_size})")
        buffer = self.pool.kv_buffer
        if self.layout == "layer_first":
            return buffer[:, :, index : index + self.page_size].permute(1, 0, 2, 3, 4)
        return buffer[:, index : index + self.page_size].permute(2, 0, 1, 3, 4)

    def page_starts(self, host_indices: torch.Tensor, pages: int) -> list[int]:
        """First host slot of each of ``pages`` pages (SGLang passes ``page_size`` slots per key)."""
        if host_indices.numel() < pages * self.page_size:
            raise LayoutError(f"{host_indices.numel()} host slots for {pages} pages of {self.page_size}")
        return [int(i) for i in host_indices[:: self.page_size][:pages].tolist()]

    def from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Canonical view of a flat page as SGLang's legacy (non-v1) path passes it."""
        n, spec = self.page_size, self.spec
        if self.layout == "layer_first":
            return flat.view(2, spec.num_layers, n, spec.num_kv_heads, spec.head_dim).permute(1, 0, 2, 3, 4)
        return flat.view(2, n, spec.num_layers, spec.num_kv_heads, spec.head_dim).permute(2, 0, 1, 3, 4)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def copy_page(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for one page of any strides, single-threaded (numpy on an integer view).

    torch spreads a strided copy over every intra-op thread; for a 360 KiB page on a busy 2-core
    machine that measured 11 ms against 0.02 ms here (benchmarks/sglang_bench.py), and SGLang's
    forward pass needs those threads. Bytes are copied exactly (no dtype conversion).
    """
    if dst.dtype != src.dtype or dst.shape != src.shape:
        raise LayoutError(f"page copy from {src.dtype}{tuple(src.shape)} to {dst.dtype}{tuple(dst.shape)}")
    as_int = _SAME_SIZE_INT[dst.element_size()]
    np.copyto(dst.view(as_int).numpy(), src.view(as_int).numpy())


