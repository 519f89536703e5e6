"""SGLang pages as kvtier objects: keys, multi-page objects, page identity and canonical views of
SGLang's host pool.

Pure (torch and blake3, no SGLang): unit tests and the benchmark use it without an engine.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Sequence
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

__all__ = ["LAYOUTS", "PageIndex", "PageKeys", "PoolView", "Span", "as_raw", "auto_pages_per_object", "copy_page",
           "matching_pages", "namespace_model", "pages_of", "spans"]

LAYOUTS = ("layer_first", "page_first")  # host layouts whose page is one strided view


def namespace_model(model: str, tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1) -> str:
    """The model part of the namespace: ranks hold different heads / layers under the same page hash."""
    text = f"sglang-page/{model}"
    if tp_size > 1 or pp_size > 1:
        text += f"|tp{tp_rank}/{tp_size}|pp{pp_rank}/{pp_size}"
    return text


PAGE_ID_BYTES = 32
MAX_PAGES_PER_OBJECT = MAX_PAGE_IDENTITY // PAGE_ID_BYTES  # the identity holds one page id per page
AUTO_OBJECT_BYTES = 4 << 20  # ``pages_per_object`` "auto": objects of at most this many bytes


def auto_pages_per_object(page_bytes: int) -> int:
    """The largest power of two of pages whose object stays within :data:`AUTO_OBJECT_BYTES` (at least 1;
    a power of two so that groups tile SGLang's 128-page storage batches)."""
    pages = 1
    while pages * 2 <= MAX_PAGES_PER_OBJECT and pages * 2 * page_bytes <= AUTO_OBJECT_BYTES:
        pages *= 2
    return pages


@dataclass(frozen=True)
class PageKeys:
    """Maps runs of SGLang page hashes onto kvtier objects of one namespace. Stateless, thread-safe.

    An object holds consecutive pages ``hashes`` (1 to :data:`MAX_PAGES_PER_OBJECT`). Its key is
    ``BLAKE3(namespace_root || u16 page count || last page hash)``: SGLang's hash of the last page
    commits to every page before it, so a key names one exact content and two different runs never
    share a key (no overwrite of one prompt's pages by another's). Its identity is the 32-byte
    :meth:`page_id` of every page in order, verified on every hit, which is what lets a reader use a
    leading part of an object whose later pages it does not know or that differ from its own.
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

    def page_id(self, page_hash: str) -> bytes:
        """The 32 bytes a page is verified by: SGLang's SHA-256 itself, or a BLAKE3 digest of any other
        key text. Two hashes that differ never share an id."""
        raw = self.raw(page_hash)
        return raw if len(raw) == PAGE_ID_BYTES else blake3.blake3(raw).digest()

    def key(self, last_hash: str, pages: int) -> ChunkKey:
        """Key of the object of ``pages`` pages whose last page is ``last_hash``."""
        return blake3.blake3(self.root + pages.to_bytes(2, "little") + self.raw(last_hash)).digest(length=KEY_BYTES)

    def record(self, hashes: Sequence[str]) -> ChunkRecord:
        """The kvtier record of the object holding pages ``hashes`` (kind ``PAGE``, parent = the root)."""
        if not 0 < len(hashes) <= MAX_PAGES_PER_OBJECT:
            raise LayoutError(f"an object holds 1..{MAX_PAGES_PER_OBJECT} pages, not {len(hashes)}")
        ids = b"".join(self.page_id(h) for h in hashes)
        return ChunkRecord(self.key(hashes[-1], len(hashes)), self.root, ids, Kind.PAGE,
                           len(hashes) * self.page_tokens)


def pages_of(record: ChunkRecord) -> int:
    """How many pages the object of ``record`` holds."""
    return len(record.identity) // PAGE_ID_BYTES


def matching_pages(record: ChunkRecord, ids: Sequence[bytes], offset: int = 0) -> int:
    """How many pages of ``record``, from page ``offset`` on, equal ``ids[offset:]`` in order."""
    n, stored = 0, record.identity
    for i in range(offset, min(pages_of(record), len(ids))):
        if stored[i * PAGE_ID_BYTES : (i + 1) * PAGE_ID_BYTES] != ids[i]:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Span:
    """The pages of one call that fall into one object group, as absolute page positions in the
    sequence: the group starts at ``start`` (a multiple of the group size), the call's pages in it are
    ``[first, end)``."""

    start: int
    first: int
    end: int


def spans(first: int, count: int, group: int) -> list[Span]:
    """Cut absolute pages ``[first, first + count)`` at multiples of ``group``. Groups sit at fixed
    positions of the sequence, so every call, whatever radix boundary it starts at, names the same
    objects for the same pages; only the first span can start inside its group, only the last end
    before the group's end (a prompt's tail is a short object, never dropped)."""
    if group < 1:
        raise ValueError(f"group size must be >= 1, got {group}")
    out: list[Span] = []
    page, stop = first, first + count
    while page < stop:
        start = page - page % group
        end = min(start + group, stop)
        out.append(Span(start, page, end))
        page = end
    return out


class PageIndex:
    """Which object this process wrote or read holds a page: page id -> (object record, page offset).

    Lets a reader find an object by a page in its middle, whose own key it cannot compute (the object
    ends with pages the reader does not have). Bounded: at most ``max_pages`` entries (about 240 bytes
    each), the least recently added or found dropped first. Lost on restart (then only objects whose every page the
    reader knows are found). Thread-safe.
    """

    def __init__(self, max_pages: int = 1 << 18) -> None:
        self.max_pages = max_pages
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[ChunkRecord, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, record: ChunkRecord) -> None:
        with self._lock:
            for i in range(pages_of(record)):
                page_id = record.identity[i * PAGE_ID_BYTES : (i + 1) * PAGE_ID_BYTES]
                self._entries[page_id] = (record, i)
                self._entries.move_to_end(page_id)
            while len(self._entries) > self.max_pages:
                self._entries.popitem(last=False)

    def find(self, page_id: bytes) -> tuple[ChunkRecord, int] | None:
        with self._lock:
            found = self._entries.get(page_id)
            if found is not None:
                self._entries.move_to_end(page_id)
            return found


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

    def page(self, index: int, raw: bool = False) -> torch.Tensor:
        """The page starting at host slot ``index`` (a multiple of ``page_size``), as a canonical view;
        ``raw``: of the same bytes as integers (:func:`as_raw`, what :func:`copy_page` copies fastest)."""
        if index % self.page_size:
            raise LayoutError(f"host index {index} is not at a page start (page size {self.page_size})")
        buffer = self._raw_buffer if raw else self.pool.kv_buffer
        if self.layout == "layer_first":
            return buffer[:, :, index : index + self.page_size].permute(1, 0, 2, 3, 4)
        return buffer[:, index : index + self.page_size].permute(2, 0, 1, 3, 4)

    @functools.cached_property
    def _raw_buffer(self) -> torch.Tensor:
        return as_raw(self.pool.kv_buffer)

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


def as_raw(tensor: torch.Tensor) -> torch.Tensor:
    """The same bytes as a tensor of the same-size integer type (a view; a no-op for integers)."""
    as_int = _SAME_SIZE_INT[tensor.element_size()]
    return tensor if tensor.dtype == as_int else tensor.view(as_int)


def copy_page(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for one page of any strides, single-threaded (numpy on an integer view).

    torch spreads a strided copy over every intra-op thread; for a 360 KiB page on a busy 2-core
    machine that measured 11 ms against 0.02 ms here (kvtier bench sglang), and SGLang's
    forward pass needs those threads. Bytes are copied exactly (no dtype conversion). Pages already
    :func:`as_raw` skip the dtype view per call (it costs as much as a small copy).
    """
    if dst.dtype != src.dtype or dst.shape != src.shape:
        raise LayoutError(f"page copy from {src.dtype}{tuple(src.shape)} to {dst.dtype}{tuple(dst.shape)}")
    np.copyto(as_raw(dst).numpy(), as_raw(src).numpy())


