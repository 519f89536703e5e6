"""One vLLM step's loads and saves, one attention layer at a time (``kvtier_layerwise``).

vLLM calls ``wait_for_layer_load(layer)`` just before each attention layer and ``save_kv_layer(layer)``
just after it (its ``maybe_transfer_kv_layer`` wrapper, on CPU as on GPU). :class:`LayerwiseStep` holds
the step's :class:`~kvtier.engine.LayerwiseRetrieve` readers (opened before the forward pass, so the hit
length — and any shortfall to report — is known before anything attends to it) and
:class:`~kvtier.engine.LayerwiseStore` writers (opened at the first saved layer), and moves one layer of
each per hook call between kvtier's CPU slots and vLLM's paged buffers.

Invariants:
- a load is complete only when every layer was copied; :meth:`LayerwiseStep.close` returns the loads
  that were not (vLLM then recomputes their blocks), never a partly loaded request as a hit;
- a save is committed (:meth:`LayerwiseStep.commit`) only when every layer was written, else aborted;
  its slots are reserved from the first layer to the commit;
- every reader's slots are released by :meth:`LayerwiseStep.close`, whatever happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvtier.engine import CacheEngine, LayerwiseRetrieve, LayerwiseStore
from kvtier.integrations.vllm import layout as vllm_layout
from kvtier.integrations.vllm.plan import LoadReq, SaveReq


@dataclass
class _Load:
    req: LoadReq
    end: int  # positions [req.start, end) are copied, layer by layer
    reader: LayerwiseRetrieve
    layers_done: set[int] = field(default_factory=set)


class LayerwiseStep:
    """Layer-by-layer transfers of one step (create one per step in ``start_load_kv``).

    ``stage(tokens)`` gives a canonical ``[layers, 2, tokens, heads, dim]`` staging view; layer ``l``'s
    slice carries layer ``l`` only, so loads (before the layer) and saves (after it) can share it.
    """

    def __init__(self, engine: CacheEngine, layout: str, layers: Sequence[torch.Tensor], head_dim: int,
                 stage: Callable[[int], torch.Tensor]) -> None:
        self._engine = engine
        self._layout = layout
        self._layers = layers
        self._head_dim = head_dim
        self._stage = stage
        self._loads: list[_Load] = []
        self.writers: list[tuple[SaveReq, LayerwiseStore]] | None = None  # opened at the first saved layer
        self.load_s = 0.0
        self.save_s = 0.0

    def begin_load(self, load: LoadReq) -> int:
        """Hold the cached prefix of ``load.tokens``; return the end of what will be copied
        (``load.end`` when all of it is cached; ``<= load.start``: nothing)."""
        began = time.perf_counter()
        reader = LayerwiseRetrieve(self._engine, load.tokens)
        end = min(reader.hit_tokens, load.end)
        if end <= load.start:
            reader.close()
        else:
            self._loads.append(_Load(load, end, reader))
        self.load_s += time.perf_counter() - began
        return end

    def load_layer(self, index: int) -> None:
        """Copy layer ``index`` of every held load into vLLM's blocks."""
        began = time.perf_counter()
        for load in self._loads:
            req = load.req
            staging = self._stage(len(req.tokens))[index]
            load.reader.layer(index, staging[0], staging[1])
            vllm_layout.scatter_span(self._layout, [self._layers[index]], req.block_ids, req.start, load.end,
                                     staging[None, :, req.start : load.end], self._head_dim)
            load.layers_done.add(index)
        self.load_s += time.perf_counter() - began

    def save_layer(self, index: int, saves: Sequence[SaveReq]) -> None:
        """Copy layer ``index`` of every save out of vLLM's blocks into its reserved slots; the first
        call opens a writer per save."""
        began = time.perf_counter()
        if self.writers is None:
            self.writers = [(save, LayerwiseStore(self._engine, save.tokens, min(save.skip, len(save.tokens))))
                            for save in saves]
        for save, writer in self.writers:
            n = len(save.tokens)
            skip = min(save.skip, n)
            staging = self._stage(n)[index]
            vllm_layout.gather_span(self._layout, [self._layers[index]], save.block_ids, skip, n,
                                    staging[None, :, skip:n], self._head_dim)
            writer.layer(index, staging[0], staging[1])
        self.save_s += time.perf_counter() - began

    def close(self) -> list[tuple[LoadReq, int]]:
        """Release every reader; return ``(load, end)`` for the loads not copied into every layer."""
        incomplete = [(load.req, load.end) for load in self._loads if len(load.layers_done) < len(self._layers)]
        for load in self._loads:
            load.reader.close()
        self._loads = []
        return incomplete
