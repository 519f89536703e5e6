"""SGLang general plugin for kvtier's CPU test setup (test-only; not part of kvtier's adapter).

Stock SGLang 0.5.23 cannot run its hierarchical cache with ``--device cpu``:

- the host KV pool is allocated through ``ALLOC_MEMORY_FUNCS[device]``, whose default registers the
  memory with CUDA (``torch.cuda.cudart()``), which a CPU torch lacks;
- the device<->host copy ``transfer_kv_direct`` is imported only on CUDA/HIP/XPU, so the first backup
  fails with a NameError;
- the host pool must fit in available memory minus a 10 GiB reserve
  (``HICACHE_HOST_MEMORY_RESERVE_BYTES``), sized for a GPU server: a 24 GB test machine shared with
  other test suites often has less, and SGLang refuses to start.

:func:`load` (entry point group ``sglang.srt.plugins``, run early in every SGLang process) gives CPU a
plain ``torch.empty`` allocator, a pure-torch ``transfer_kv_direct`` (one ``index_select`` +
``index_copy_`` per layer tensor) and a 1 GiB reserve. Run SGLang with ``--hicache-mem-layout layer_first
--hicache-io-backend direct``, the only combination these two cover. On a GPU host none of this is
installed: SGLang's own kernels do the job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)
HOST_MEMORY_RESERVE_BYTES = 1 << 30


def _alloc_cpu(dims: tuple[int, ...], dtype: torch.dtype, device: Any, pin_memory: bool, allocator: Any = None,
               registration_granularity_bytes: int | None = None) -> torch.Tensor:
    """Host pool memory on a CPU-only machine: ordinary (unpinned, unregistered) memory."""
    return torch.empty(dims, dtype=dtype, device="cpu")


def _transfer_kv_direct(src_layers: Sequence[torch.Tensor], dst_layers: Sequence[torch.Tensor],
                        src_indices: torch.Tensor, dst_indices: torch.Tensor, page_size: int = 1) -> None:
    """Copy token rows ``src_indices`` of every source tensor to rows ``dst_indices`` of its partner."""
    if len(src_layers) != len(dst_layers):
        raise ValueError(f"{len(src_layers)} source tensors for {len(dst_layers)} destinations")
    src_i = src_indices.to(torch.long)
    dst_i = dst_indices.to(torch.long)
    for src, dst in zip(src_layers, dst_layers, strict=True):
        dst.index_copy_(0, dst_i.to(dst.device), src.index_select(0, src_i.to(src.device)).to(dst.device))


def load() -> None:
    """Install both workarounds (idempotent); only when torch has no CUDA."""
    if torch.cuda.is_available():
        return
    from sglang.srt.mem_cache.pool_host import base, common, mha

    common.ALLOC_MEMORY_FUNCS["cpu"] = _alloc_cpu
    mha.transfer_kv_direct = _transfer_kv_direct
    base.HICACHE_HOST_MEMORY_RESERVE_BYTES = HOST_MEMORY_RESERVE_BYTES
    log.info("kvtier CPU test setup: host pool on plain CPU memory, torch transfer_kv_direct, 1 GiB reserve")
