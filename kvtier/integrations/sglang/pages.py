"""SGLang pages as kvtier objects: keys, multi-page objects, page identity and canonical views of
SGLang's host pool.

Pure (torch and blake3, no SGLang): unit tests and the benchmark use it without an engine.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
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
from kvtier.tensors import dtype_name, int_view
from kvtier.wire import MAX_PAGE_IDENTITY

__all__ = ["LAYOUTS", "HostPages", "PageIndex", "PageKeys", "PageList", "Pages", "PoolView", "Span",
           "auto_pages_per_object", "copy_exact", "matching_pages", "namespace_model", "object_pages", "object_slabs",
           "pages_of", "spans"]

LAYOUTS = ("layer_first", "page_first", "page_first_direct")  # host layouts whose page is one strided view


def namespace_model(model: str, tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1) -> str:
    """The model part of the namespace: ranks hold different heads / layers under the same page hash."""
    text = f"sglang-page/{model}"
    if tp_size > 1 or pp_size > 1:
        text += f"|tp{tp_rank}/{tp_size}|pp{pp_rank}/{pp_size}"
    return text


PAGE_ID_BYTES = 32
MAX_PAGES_PER_OBJECT = MAX_PAGE_IDENTITY // PAGE_ID_BYTES  # the identity holds one page id per page
AUTO_OBJECT_BYTES = 16 << 20  # ``pages_per_object`` "auto": objects of at most this many bytes (docs/sglang.md)


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
    """Canonical views of pages of SGLang's MHA host pool: one page is ``[layers, 2, page_size, heads,
    head_dim]``, a run of ``n`` consecutive pages ``[layers, 2, n, page_size, heads, head_dim]``.

    Needs only the pool's ``layout``, ``kv_buffer`` (``[2, layers, tokens, heads, dim]`` for
    layer_first, ``[2, tokens, layers, heads, dim]`` for page_first, ``[2, pages, layers, page_size,
    heads, dim]`` for page_first_direct), ``page_size``, ``layer_num``, ``head_num``, ``head_dim`` and
    ``dtype``; raises :class:`LayoutError` for anything else.
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
        spec = self.spec
        want = {"layer_first": (2, spec.num_layers, None, spec.num_kv_heads, spec.head_dim),
                "page_first": (2, None, spec.num_layers, spec.num_kv_heads, spec.head_dim),
                "page_first_direct": (2, None, spec.num_layers, self.page_size, spec.num_kv_heads,
                                      spec.head_dim)}[layout]
        got = tuple(buffer.shape)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            raise LayoutError(f"host KV buffer {got} does not match layout {layout} and {self.spec}")

    def raw_pages(self, index: int, count: int = 1) -> np.ndarray:
        """The ``count`` consecutive pages from host slot ``index`` (a multiple of ``page_size``) as one
        ``[layers, 2, count, page_size, heads, head_dim]`` numpy view of the pool's bytes as integers
        (:func:`~kvtier.tensors.int_view`): what :class:`HostPages` copies, single-threaded, without a torch call."""
        if index % self.page_size:
            raise LayoutError(f"host index {index} is not at a page start (page size {self.page_size})")
        buffer, n = self._raw_buffer, self.page_size
        if self.layout == "page_first_direct":
            return buffer[:, index // n : index // n + count].transpose(2, 0, 1, 3, 4, 5)
        tokens = slice(index, index + count * n)
        run = buffer[:, :, tokens].transpose(1, 0, 2, 3, 4) if self.layout == "layer_first" else \
            buffer[:, tokens].transpose(2, 0, 1, 3, 4)
        return run.reshape(*run.shape[:2], count, n, *run.shape[3:])  # splits one axis: stays a view

    def pages(self, index: int, count: int = 1) -> torch.Tensor:
        """:meth:`raw_pages` as a tensor of the pool's dtype (a view)."""
        return torch.from_numpy(self.raw_pages(index, count)).view(self.pool.kv_buffer.dtype)

    def page(self, index: int) -> torch.Tensor:
        """The page starting at host slot ``index`` as a canonical ``[layers, 2, page_size, heads,
        head_dim]`` view (see :meth:`pages`)."""
        return self.pages(index, 1)[:, :, 0]

    @functools.cached_property
    def _raw_buffer(self) -> np.ndarray:
        return int_view(self.pool.kv_buffer).numpy()

    def page_starts(self, host_indices: torch.Tensor, pages: int) -> list[int]:
        """First host slot of each of ``pages`` pages (SGLang passes ``page_size`` slots per key)."""
        if host_indices.numel() < pages * self.page_size:
            raise LayoutError(f"{host_indices.numel()} host slots for {pages} pages of {self.page_size}")
        return [int(i) for i in host_indices[:: self.page_size][:pages].tolist()]

    def from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Canonical view of a flat page as SGLang's legacy (non-v1) path passes it (the pool's own
        order of one page)."""
        n, spec = self.page_size, self.spec
        if self.layout == "layer_first":
            return flat.view(2, spec.num_layers, n, spec.num_kv_heads, spec.head_dim).permute(1, 0, 2, 3, 4)
        if self.layout == "page_first":
            return flat.view(2, n, spec.num_layers, spec.num_kv_heads, spec.head_dim).permute(2, 0, 1, 3, 4)
        return flat.view(2, spec.num_layers, n, spec.num_kv_heads, spec.head_dim).permute(1, 0, 2, 3, 4)


def object_pages(obj: torch.Tensor, page_size: int) -> np.ndarray:
    """A canonical object ``[layers, 2, pages * page_size, heads, head_dim]`` as the same bytes in
    ``[layers, 2, pages, page_size, heads, head_dim]`` (a numpy view of integers, :func:`~kvtier.tensors.int_view`)."""
    flat = int_view(obj).numpy()
    return flat.reshape(*flat.shape[:2], -1, page_size, *flat.shape[3:])


def object_slabs(runs: Sequence[np.ndarray]) -> list[memoryview] | None:
    """The bytes of the object made of ``runs`` (``[layers, 2, n, page_size, heads, head_dim]`` raw
    views, in page order) in canonical order (per layer, K then V, each run's pages in turn) as
    memoryviews of the runs' own memory: what ``writev`` sends and ``preadv`` fills, with no copy.
    ``None`` when a run's pages of one layer and K or V are not one contiguous block (the page_first
    layouts): the caller then copies through a canonical buffer."""
    blocks: list[list[memoryview]] = []
    for run in runs:
        block = run[0, 0]
        if not block.flags.c_contiguous or min(run.strides[:2]) < 0:
            return None
        layers, kv = run.shape[:2]
        step_layer, step_kv = run.strides[:2]
        extent = (layers - 1) * step_layer + (kv - 1) * step_kv + block.nbytes
        whole = np.lib.stride_tricks.as_strided(run.view(np.uint8), shape=(extent,), strides=(1,)).data
        blocks.append([whole[at : at + block.nbytes] for layer in range(layers) for k in range(kv)
                       for at in (layer * step_layer + k * step_kv,)])
    return [run_blocks[i] for i in range(len(blocks[0]) if blocks else 0) for run_blocks in blocks]


def copy_exact(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for integer views of any strides, single-threaded, bytes exactly (no cast).

    torch spreads a strided copy over every intra-op thread; for a 360 KiB page on a busy 2-core
    machine that measured 11 ms against 0.02 ms here (kvtier bench sglang), and SGLang's forward pass
    needs those threads. numpy copies one run per call with one ``memcpy`` per contiguous block."""
    if dst.dtype != src.dtype or dst.shape != src.shape:
        raise LayoutError(f"copy from {src.dtype}{src.shape} to {dst.dtype}{dst.shape}")
    np.copyto(dst, src, casting="no")


class Pages(ABC):
    """The pages one SGLang call names (``0 .. len - 1``, in key order), wherever they live, moved to
    and from canonical objects (:func:`object_pages` views) in runs: one single-threaded strided copy
    (:func:`copy_exact`) per run of pages that sit next to each other."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def runs(self, first: int, count: int) -> list[tuple[int, np.ndarray]]:
        """Pages ``[first, first + count)`` as ``(offset from first, [layers, 2, n, page_size, heads,
        head_dim] raw view)`` runs, in order, covering them exactly once."""

    def scatter(self, obj: np.ndarray, at: int, first: int, count: int) -> None:
        """Copy pages ``[at, at + count)`` of ``obj`` (an :func:`object_pages` view) into pages
        ``[first, first + count)``."""
        for offset, run in self.runs(first, count):
            copy_exact(run, obj[:, :, at + offset : at + offset + run.shape[2]])

    def gather(self, obj: np.ndarray, at: int, first: int, count: int) -> None:
        """Copy pages ``[first, first + count)`` into pages ``[at, at + count)`` of ``obj``."""
        for offset, run in self.runs(first, count):
            copy_exact(obj[:, :, at + offset : at + offset + run.shape[2]], run)


class HostPages(Pages):
    """Pages of SGLang's host pool at host slots ``starts``; consecutive host pages form one run (SGLang
    allocates a request's pages mostly in order, so a batch is a few runs, often one per object)."""

    def __init__(self, view: PoolView, starts: Sequence[int]) -> None:
        self.view = view
        self.starts = list(starts)

    def __len__(self) -> int:
        return len(self.starts)

    def runs(self, first: int, count: int) -> list[tuple[int, np.ndarray]]:
        out: list[tuple[int, np.ndarray]] = []
        starts, n = self.starts, self.view.page_size
        i, stop = first, first + count
        while i < stop:
            j = i + 1
            while j < stop and starts[j] == starts[j - 1] + n:
                j += 1
            out.append((i - first, self.view.raw_pages(starts[i], j - i)))
            i = j
        return out


class PageList(Pages):
    """Pages given one by one as ``[layers, 2, 1, page_size, heads, head_dim]`` raw views (SGLang's
    legacy flat pages, the pages of an object being built): one run per page."""

    def __init__(self, pages: Sequence[np.ndarray]) -> None:
        self.pages = list(pages)

    @classmethod
    def of_tensors(cls, pages: Sequence[torch.Tensor]) -> PageList:
        """From canonical ``[layers, 2, page_size, heads, head_dim]`` tensor views."""
        return cls([int_view(p).numpy()[:, :, None] for p in pages])

    @classmethod
    def of_object(cls, obj: np.ndarray) -> PageList:
        """The pages of an :func:`object_pages` view."""
        return cls([obj[:, :, i : i + 1] for i in range(obj.shape[2])])

    def __len__(self) -> int:
        return len(self.pages)

    def runs(self, first: int, count: int) -> list[tuple[int, np.ndarray]]:
        return [(i, self.pages[first + i]) for i in range(count)]
