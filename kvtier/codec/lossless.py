"""Lossless codecs: ``zstd`` and ``lz4``, optionally over byte-shuffled planes.

Byte shuffling: the chunk's bytes are viewed as ``[n, itemsize]`` and transposed to ``[itemsize, n]``
before compression, so for bf16 all the sign/exponent bytes (few distinct values, compressible) come
first and the mantissa bytes (close to random) after. Measured on SmolLM2 bf16 KV it is what makes
``zstd`` worth anything (see docs/codecs.md); it is the default and recorded as param ``shuffle``.

Invariant: decode reproduces the encoded tensor bit for bit, or raises :class:`CorruptChunk` (library
error, a payload size other than the recorded ``csize``, or a decoded size other than the chunk's).
Params: ``shuffle`` (bool), ``csize`` (payload bytes), zstd ``level``, plus the geometry record of
:mod:`kvtier.codec._common`.
"""

from __future__ import annotations

import threading
import warnings

import lz4.block
import torch
import zstandard

from kvtier.codec._common import as_bytes, check_geometry, check_input, geometry, param
from kvtier.codec.base import Codec, Params, fill_from_bytes, register_codec, tensor_bytes
from kvtier.errors import CorruptChunk
from kvtier.layout import KVSpec
from kvtier.tensors import copy_one_thread


def shuffle_bytes(chunk: torch.Tensor) -> memoryview:
    """The chunk's bytes, plane by plane: byte 0 of every element, then byte 1, ..."""
    t = chunk.contiguous()
    size = t.element_size()
    raw = t.view(torch.uint8).view(-1, size)
    if size == 1:
        return as_bytes(raw)
    planes = torch.empty(size, raw.shape[0], dtype=torch.uint8)
    for i in range(size):  # one strided copy per plane: ~20x faster than a transposed copy in torch
        copy_one_thread(planes[i], raw[:, i])
    return as_bytes(planes)


def unshuffle_into(data: bytes | memoryview, out: torch.Tensor) -> None:
    """Inverse of :func:`shuffle_bytes`, written straight into ``out`` (contiguous or not)."""
    size = out.element_size()
    expected = out.numel() * size
    if memoryview(data).nbytes != expected:
        raise CorruptChunk(f"payload decodes to {memoryview(data).nbytes} bytes, chunk needs {expected}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only source buffer; we only read it
        src = torch.frombuffer(data, dtype=torch.uint8).view(size, -1)
    target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    dst = target.view(torch.uint8).view(-1, size)
    for i in range(size):
        copy_one_thread(dst[:, i], src[i])
    if target is not out:
        copy_one_thread(out, target)


class _Lossless(Codec):
    lossless = True

    def __init__(self, shuffle: bool = True) -> None:
        self.shuffle = shuffle

    def _compress(self, data: memoryview) -> bytes:
        raise NotImplementedError

    def _decompress(self, payload: memoryview, size: int) -> bytes:
        raise NotImplementedError

    def encode(self, chunk: torch.Tensor, spec: KVSpec) -> tuple[bytes | memoryview, Params]:
        tokens = check_input(chunk, spec)
        data = shuffle_bytes(chunk) if self.shuffle else tensor_bytes(chunk)
        payload = self._compress(data)
        return payload, {**geometry(spec, tokens), **self._params(), "csize": len(payload)}

    def _params(self) -> Params:
        return {"shuffle": self.shuffle}

    def decode(self, payload: memoryview, params: Params, spec: KVSpec, out: torch.Tensor) -> None:
        check_geometry(params, spec, out)
        shuffled = param(params, "shuffle", bool)
        if memoryview(payload).nbytes != param(params, "csize", int):  # the libraries ignore trailing bytes
            raise CorruptChunk(
                f"payload is {memoryview(payload).nbytes} bytes, codec params say {params['csize']}"
            )
        data = self._decompress(payload, out.numel() * out.element_size())
        if shuffled:
            unshuffle_into(data, out)
        else:
            fill_from_bytes(out, data)


class ZstdCodec(_Lossless):
    """zstd at ``level`` over byte-shuffled planes (``shuffle=True``). Default level 1: on SmolLM2 KV
    it compresses as well as levels 3-9 and is the fastest."""

    name = "zstd"

    def __init__(self, level: int = 1, shuffle: bool = True) -> None:
        super().__init__(shuffle)
        self.level = level
        self._local = threading.local()  # zstandard (de)compressor objects are not thread-safe

    def _objects(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        objs = getattr(self._local, "objs", None)
        if objs is None:
            objs = (zstandard.ZstdCompressor(level=self.level), zstandard.ZstdDecompressor())
            self._local.objs = objs
        return objs

    def _params(self) -> Params:
        return {"shuffle": self.shuffle, "level": self.level}

    def _compress(self, data: memoryview) -> bytes:
        return self._objects()[0].compress(data)

    def _decompress(self, payload: memoryview, size: int) -> bytes:
        try:
            if zstandard.frame_content_size(payload) != size:
                raise CorruptChunk(f"zstd frame announces {zstandard.frame_content_size(payload)} bytes, "
                                   f"chunk needs {size}")
            return self._objects()[1].decompress(payload, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"zstd payload does not decode: {exc}") from exc


class Lz4Codec(_Lossless):
    """LZ4 block format (fast, modest ratio) over byte-shuffled planes (``shuffle=True``)."""

    name = "lz4"

    def _compress(self, data: memoryview) -> bytes:
        return lz4.block.compress(data, store_size=False)

    def _decompress(self, payload: memoryview, size: int) -> bytes:
        try:
            data = lz4.block.decompress(payload, uncompressed_size=size)
        except lz4.block.LZ4BlockError as exc:
            raise CorruptChunk(f"lz4 payload does not decode: {exc}") from exc
        if len(data) != size:
            raise CorruptChunk(f"lz4 payload decodes to {len(data)} bytes, chunk needs {size}")
        return data


register_codec(ZstdCodec())
register_codec(Lz4Codec())
