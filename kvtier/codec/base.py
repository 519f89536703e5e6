"""Codec contract and registry.

A codec turns one canonical chunk ``[layers, 2, tokens, kv_heads, head_dim]`` into bytes and back.

Contract: ``encode(chunk, spec)`` returns ``(payload, params)`` where ``params`` is a small JSON-able
dict the codec needs to decode (it travels in the wire header); ``decode(payload, params, spec,
out)`` fills ``out`` (a canonical chunk tensor of the right shape and the spec's dtype) completely or
raises :class:`~kvtier.errors.CorruptChunk`. Lossless codecs reproduce the input bit for bit; lossy
codecs document their error bound. Codecs are stateless and thread-safe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from kvtier.errors import ConfigError, CorruptChunk
from kvtier.layout import KVSpec

Params = dict[str, Any]


class Codec(ABC):
    name: str = ""
    lossless: bool = True

    @abstractmethod
    def encode(self, chunk: torch.Tensor, spec: KVSpec) -> tuple[bytes | memoryview, Params]: ...

    @abstractmethod
    def decode(self, payload: memoryview, params: Params, spec: KVSpec, out: torch.Tensor) -> None: ...


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw bytes of a tensor (contiguous copy only if needed)."""
    t = tensor.contiguous()
    return t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else memoryview(b"")


def fill_from_bytes(out: torch.Tensor, data: bytes | bytearray | memoryview) -> None:
    """Copy raw bytes into ``out`` (any strides with a contiguous last axis, e.g. a slot view holding
    fewer tokens than a full chunk) without an intermediate copy; raise :class:`CorruptChunk` if the
    length is wrong."""
    expected = out.numel() * out.element_size()
    nbytes = memoryview(data).nbytes
    if nbytes != expected:
        raise CorruptChunk(f"payload decodes to {nbytes} bytes, chunk needs {expected}")
    if expected == 0:
        return
    dst = out.view(torch.uint8).numpy()  # read-only sources are fine: numpy only reads them
    np.copyto(dst, np.frombuffer(data, dtype=np.uint8).reshape(dst.shape))


class RawCodec(Codec):
    """The bytes of the tensor as they are (default)."""

    name = "raw"

    def encode(self, chunk: torch.Tensor, spec: KVSpec) -> tuple[bytes | memoryview, Params]:
        return tensor_bytes(chunk), {}

    def decode(self, payload: memoryview, params: Params, spec: KVSpec, out: torch.Tensor) -> None:
        fill_from_bytes(out, payload)


_REGISTRY: dict[str, Codec] = {"raw": RawCodec()}


def register_codec(codec: Codec) -> None:
    """Make ``codec`` available under ``codec.name``."""
    _REGISTRY[codec.name] = codec


def get_codec(name: str) -> Codec:
    """Return the codec called ``name``; raise :class:`ConfigError` listing the registered names."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown codec {name!r}; expected one of {sorted(_REGISTRY)}") from None


def codec_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    """Import the built-in codec modules (each registers itself)."""
    import importlib

    for module in ("kvtier.codec.lossless", "kvtier.codec.quant", "kvtier.codec.cachegen"):
        importlib.import_module(module)
