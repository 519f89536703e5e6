"""``cachegen``: CacheGen-style lossy KV compression with entropy coding.

A chunk ``[L, 2, T, H, D]`` is handled as ``2L`` planes (layer x K/V) of ``T`` tokens x ``C = H·D``
channels. Each chunk is self-contained: everything needed to decode it is in its payload and params.

1. **Anchor tokens**: tokens ``0, G, 2G, ...`` of the chunk (``G = anchor_every``) are stored verbatim
   in the engine dtype (exact). The first token of a sequence is the attention sink of most models and
   very sensitive to error (measured: quantizing it triples the perplexity cost); it is always an
   anchor because chunk 0 starts there.
2. **Delta against the anchor** (``delta=True``): each value is coded as a residual against a
   per-channel reference: either the channel's chunk mean (stored as bf16) or the channel's value in
   the token's anchor, whichever gives the smaller total absolute residual for that channel (one flag
   bit per channel). On SmolLM2 few channels pick the anchor (tokens are weakly correlated); see
   docs/codecs.md for the measured effect.
3. **Per-layer-group bins**: layers are split into ``len(alpha_k)`` consecutive groups; a plane of group
   ``g`` is quantized uniformly with step ``s = alpha[g] · mean_c(rms_c(residual))`` (one float32 step per
   layer and K/V): ``q = round(residual / s)``. Smaller alpha = more bins = better quality. Default
   ``(0.4, 0.5, 0.6)`` for the first, middle and last third of the layers (shallow layers finer, as
   CacheGen observes; on SmolLM2 the measured difference to a flat 0.5 is within noise). One step per
   plane rather than per channel: channels with a larger spread get more bins, which measured clearly
   better than per-channel steps at the same size (dot products with the query weigh every channel).
4. **Per-channel symbol statistics**: channels are sorted into classes by the spread of their symbols
   (half-octave buckets of the RMS of ``q``); the symbols of one (layer, K/V, class) group are coded
   together with that group's own statistics.
5. **Entropy coding** (``entropy``), both in native library code:
   ``"ans"``: ``constriction``'s ANS coder with one categorical model per group, built from 16-bit
   frequency counts stored in the chunk (best ratio; ~15-25 ns per symbol to decode).
   ``"zstd"``: the class-sorted symbol bytes through zstd (its Huffman literal coder adapts per block
   of about one group; ~3-7% larger, an order of magnitude faster to decode). Default, because
   only this one meets the decode goal (100 MB/s of bf16 on one core) here.

Error bound (before the cast to the engine dtype): anchors are exact; every other value satisfies
``|x - x̂| ≤ s/2`` with ``s`` its plane's step (up to float32 rounding, ~1e-6 relative); the cast adds at
most ``u·|x̂|`` (``u`` = 2^-8 for bf16). :meth:`CacheGenCodec.error_bound` returns the bound per
element. If a plane would need more than ``MAX_SYMBOLS`` bins, its step grows to fit (the bound holds
with that step). Zero or constant rows are fine; non-finite input raises :class:`LayoutError` at
encode. Decode raises :class:`CorruptChunk` when a section has the wrong size, a table is inconsistent,
or the coded stream does not decode to exactly the expected symbols.
"""

from __future__ import annotations

import functools
import threading
import warnings

import constriction
import numpy as np
import torch
import zstandard

from kvtier.codec._common import (
    as_bytes,
    check_finite,
    check_geometry,
    check_input,
    frombuffer,
    geometry,
    pack_sections,
    param,
    store_planes,
    unpack_sections,
)
from kvtier.codec.base import Codec, Params, register_codec
from kvtier.errors import ConfigError, CorruptChunk
from kvtier.layout import KVSpec

MAX_SYMBOLS = 4095  # bins per plane at most (|q| <= 2047)
NUM_CLASSES = 16  # channel classes per plane (half-octave buckets of the symbol RMS)
_CLASS_OFFSET = 4  # class 0 holds channels with RMS(q) < 2^-2
_SECTIONS = 9
ENTROPY = ("zstd", "ans")
_ZSTD_PARAMS = dict(strategy=zstandard.STRATEGY_FAST, min_match=7, window_log=17, hash_log=12,
                    chain_log=12, search_log=1)  # few LZ matches: the literal coder does the work


@functools.cache
def coder_id(entropy: str) -> str:
    """Entropy back-end and its library release line: constriction models built from the same counts
    by another release might differ, so a chunk decodes only with the release line that wrote it."""
    from importlib.metadata import version

    if entropy == "ans":
        return "constriction-" + ".".join(version("constriction").split(".")[:2]) + "-ans"
    return "zstd-" + str(zstandard.ZSTD_VERSION[0])


class CacheGenCodec(Codec):
    """CacheGen-style codec; see the module docstring for the format and the error bound."""

    name = "cachegen"
    lossless = False

    def __init__(
        self,
        alpha_k: tuple[float, ...] = (0.4, 0.5, 0.6),
        alpha_v: tuple[float, ...] = (0.4, 0.5, 0.6),
        anchor_every: int = 256,
        delta: bool = True,
        entropy: str = "zstd",
    ) -> None:
        if not alpha_k or len(alpha_k) != len(alpha_v) or min(*alpha_k, *alpha_v) <= 0:
            raise ConfigError("cachegen alpha_k/alpha_v must be equally long lists of positive numbers")
        if anchor_every < 1:
            raise ConfigError(f"cachegen anchor_every must be >= 1, got {anchor_every}")
        if entropy not in ENTROPY:
            raise ConfigError(f"cachegen entropy must be one of {ENTROPY}, got {entropy!r}")
        self.alpha_k, self.alpha_v = tuple(alpha_k), tuple(alpha_v)
        self.anchor_every = anchor_every
        self.delta = delta
        self.entropy = entropy
        self._local = threading.local()

    # ---- shared pieces -------------------------------------------------------------------------
    def _alpha(self, num_layers: int) -> torch.Tensor:
        """``[L, 2]`` alpha per layer and K/V."""
        g = torch.div(torch.arange(num_layers) * len(self.alpha_k), num_layers, rounding_mode="floor")
        return torch.stack([torch.tensor(self.alpha_k)[g], torch.tensor(self.alpha_v)[g]], 1)

    def _analyse(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """From ``x = [L, 2, T, C]`` float32: ``(anchors, mean, flags, residual, step)``."""
        T = x.shape[2]
        anchors = x[:, :, :: self.anchor_every]
        own = _own_anchor(anchors, T, self.anchor_every)
        rest = _non_anchor(T, self.anchor_every)
        mean = x[:, :, rest].mean(2).to(torch.bfloat16).float() if rest.numel() else x.new_zeros(x[:, :, 0].shape)
        if self.delta and rest.numel():
            flags = (x - own).abs()[:, :, rest].sum(2) < (x - mean[:, :, None]).abs()[:, :, rest].sum(2)
            residual = x - torch.where(flags[:, :, None], own, mean[:, :, None])
        else:
            flags = torch.zeros(mean.shape, dtype=torch.bool)
            residual = x - mean[:, :, None]
        residual[:, :, :: self.anchor_every] = 0.0  # anchors are stored exactly
        step = _steps(residual, self._alpha(x.shape[0]), T)
        return anchors, mean, flags, residual, step

    def _zstd(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        objs = getattr(self._local, "zstd", None)
        if objs is None:  # zstandard objects are not thread-safe: one pair per thread
            params = zstandard.ZstdCompressionParameters(**_ZSTD_PARAMS)
            objs = (zstandard.ZstdCompressor(compression_params=params), zstandard.ZstdDecompressor())
            self._local.zstd = objs
        return objs

    # ---- encode --------------------------------------------------------------------------------
    def encode(self, chunk: torch.Tensor, spec: KVSpec) -> tuple[bytes | memoryview, Params]:
        tokens = check_input(chunk, spec)
        L, _, T, H, D = chunk.shape
        C = H * D
        x = chunk.reshape(L, 2, T, C).float()
        check_finite(x, self.name)
        _anchors, mean, flags, residual, step = self._analyse(x)
        q = torch.round(residual.div_(step[:, :, None, None])).to(torch.int32)
        streams = q.transpose(2, 3).reshape(L * 2 * C, T).numpy()  # one row per channel
        classes = _classify(streams)
        order, sizes = _groups(classes, L * 2, C)
        rows = streams[order]
        if self.entropy == "ans":  # smallest alphabet per group
            lo = np.minimum.reduceat(rows.min(1), np.concatenate([[0], np.cumsum(sizes)])[:-1])
            rows -= np.repeat(lo, sizes)[:, None]
            length, counts, words = _ans_encode(rows, sizes)
            coded: bytes | memoryview = _bytes(words)
        else:  # one fixed offset, so that neighbouring groups share the byte for q = 0
            wide = bool(rows.size) and (int(rows.min()) < -128 or int(rows.max()) > 127)
            lo = np.full(len(sizes), -32768 if wide else -128, dtype=np.int64)
            rows -= lo[0]
            length, counts = np.zeros(0, "<u2"), np.zeros(0, "<u2")
            coded = self._zstd()[0].compress(rows.astype("<u2" if wide else np.uint8).tobytes())
        sections: list[bytes | memoryview] = [
            _bytes(chunk[:, :, :: self.anchor_every]),
            _bytes(mean.to(torch.bfloat16)),
            _bytes(step),
            _bytes(np.packbits(flags.numpy().reshape(-1))),
            _bytes(_pack_nibbles(classes)),
            _bytes(lo.astype("<i2")),
            _bytes(length),
            _bytes(counts),
            coded,
        ]
        params = {**geometry(spec, tokens), "anchor_every": self.anchor_every, "coder": coder_id(self.entropy)}
        return pack_sections(sections), params

    # ---- decode --------------------------------------------------------------------------------
    def decode(self, payload: memoryview, params: Params, spec: KVSpec, out: torch.Tensor) -> None:
        T = check_geometry(params, spec, out)
        every = param(params, "anchor_every", int, 1, 1 << 30)
        coder = param(params, "coder", str)
        entropy = next((e for e in ENTROPY if coder == coder_id(e)), None)
        if entropy is None:
            raise CorruptChunk(f"chunk was coded with {coder!r}; this build decodes "
                               f"{[coder_id(e) for e in ENTROPY]}")
        L, C = spec.num_layers, spec.num_kv_heads * spec.head_dim
        S, A = L * 2 * C, len(range(0, T, every))
        parts = unpack_sections(payload, _SECTIONS)
        anchors = frombuffer(parts[0], spec.torch_dtype, L * 2 * A * C).view(L, 2, A, C).float()
        mean = frombuffer(parts[1], torch.bfloat16, L * 2 * C).view(L, 2, C).float()
        step = frombuffer(parts[2], torch.float32, L * 2).view(L, 2)
        flag_bits = frombuffer(parts[3], torch.uint8, (S + 7) // 8).numpy()
        flags = torch.from_numpy(np.unpackbits(flag_bits, count=S).astype(bool)).view(L, 2, C)
        classes = _unpack_nibbles(frombuffer(parts[4], torch.uint8, (S + 1) // 2).numpy(), S)
        if not (bool(torch.isfinite(step).all()) and bool((step > 0).all()) and bool(torch.isfinite(mean).all())):
            raise CorruptChunk("cachegen steps/means are not finite and positive")
        order, sizes = _groups(classes, L * 2, C)
        lo = frombuffer(parts[5], torch.int16, len(sizes)).numpy().astype(np.float32)
        if entropy == "ans":
            rows = _ans_decode(parts[6], parts[7], parts[8], sizes, T)
        else:
            rows = self._zstd_decode(parts[8], S, T)
        # symbols back to channel order, then x̂ = sym·s + (lo·s + reference), written token-major
        inverse = np.empty_like(order)
        inverse[order] = np.arange(S)
        with warnings.catch_warnings():  # rows may be a read-only view of the decompressed bytes
            warnings.simplefilter("ignore", UserWarning)
            symbols = torch.from_numpy(rows)
        sym = symbols.index_select(0, torch.from_numpy(inverse)).view(L, 2, C, T).transpose(2, 3)
        lo_c = torch.from_numpy(np.repeat(lo, sizes)[inverse]).view(L, 2, C)
        bias = lo_c * step[:, :, None] + torch.where(flags, 0.0, mean)
        direct = out.dtype == torch.float32 and out.is_contiguous()
        x = out.view(L, 2, T, C) if direct else torch.empty(L, 2, T, C)
        x.copy_(sym)
        x.mul_(step[:, :, None, None]).add_(bias[:, :, None, :])
        if bool(flags.any()):  # delta channels: add their anchor values, channel by channel
            plane, channel = torch.nonzero(flags.view(L * 2, C), as_tuple=True)
            planes = x.view(L * 2, T, C)
            own = _own_anchor(anchors, T, every).reshape(L * 2, T, C)
            planes[plane, :, channel] += own[plane, :, channel]
        x[:, :, ::every] = anchors
        if not direct:
            store_planes(out, x)

    def _zstd_decode(self, coded: memoryview, S: int, T: int) -> np.ndarray:
        """Symbol rows ``[S, T]`` (uint8, or uint16 when the widest group needs it) from zstd."""
        try:
            size = zstandard.frame_content_size(coded)
            if size not in (S * T, 2 * S * T):
                raise CorruptChunk(f"cachegen symbol frame holds {size} bytes for {S * T} symbols")
            data = self._zstd()[1].decompress(coded, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"cachegen symbol frame does not decode: {exc}") from exc
        if len(data) != size:
            raise CorruptChunk(f"cachegen symbol frame decodes to {len(data)} bytes, expected {size}")
        return np.frombuffer(data, dtype=np.uint8 if size == S * T else "<u2").reshape(S, T)

    def error_bound(self, chunk: torch.Tensor) -> torch.Tensor:
        """Elementwise bound on ``|x - x̂|`` before the cast to the engine dtype."""
        L, _, T, H, D = chunk.shape
        x = chunk.reshape(L, 2, T, H * D).float()
        step = self._analyse(x)[-1]
        bound = (step / 2)[:, :, None, None].expand_as(x).clone()
        bound[:, :, :: self.anchor_every] = 0.0
        return bound.view(chunk.shape)


# ---- quantization ------------------------------------------------------------------------------
def _non_anchor(tokens: int, every: int) -> torch.Tensor:
    mask = torch.ones(tokens, dtype=torch.bool)
    mask[::every] = False
    return torch.nonzero(mask).view(-1)


def _own_anchor(anchors: torch.Tensor, tokens: int, every: int) -> torch.Tensor:
    """``[L, 2, T, C]``: for every token the values of its anchor (token ``every·floor(t/every)``)."""
    if anchors.shape[2] == 1:
        return anchors.expand(-1, -1, tokens, -1)
    return anchors.repeat_interleave(every, 2)[:, :, :tokens]


def _steps(residual: torch.Tensor, alpha: torch.Tensor, tokens: int) -> torch.Tensor:
    """``[L, 2]`` float32 steps: alpha x mean channel RMS, grown so that ``|q| <= MAX_SYMBOLS // 2``."""
    rms = residual.square().mean(2).sqrt().mean(2)
    peak = residual.abs().amax(dim=(2, 3))
    step = torch.maximum(alpha * rms, peak / (MAX_SYMBOLS // 2 - 0.5))
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(step > tiny, step, torch.ones_like(step)).float()


def _classify(streams: np.ndarray) -> np.ndarray:
    """Class of each channel row: half-octave bucket of the RMS of its symbols, in ``[0, NUM_CLASSES)``."""
    rms = np.sqrt(np.square(streams, dtype=np.float32).mean(1)).clip(min=1e-3)
    cls = np.floor(2 * np.log2(rms)) + _CLASS_OFFSET
    return cls.clip(0, NUM_CLASSES - 1).astype(np.uint8)


def _groups(classes: np.ndarray, planes: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order, sizes)``: the channel order that makes every (plane, class) group contiguous, and the
    number of channels in each non-empty group, in that order."""
    gid = (np.arange(planes)[:, None] * NUM_CLASSES + classes.reshape(planes, channels)).reshape(-1)
    order = np.argsort(gid, kind="stable")
    return order, np.unique(gid, return_counts=True)[1]


# ---- entropy coding ----------------------------------------------------------------------------
def _ans_encode(rows: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ANS-code non-negative symbol rows, one categorical model per group of ``sizes[g]`` rows.

    Returns the alphabet length per group (uint16, >= 2), the concatenated frequency counts (uint16,
    each group's largest scaled to 65535; a symbol that occurs never gets 0) and the coder words.
    """
    groups = len(sizes)
    group_of_row = np.repeat(np.arange(groups), sizes)
    length = np.maximum(np.maximum.reduceat(rows.max(1), np.concatenate([[0], np.cumsum(sizes)])[:-1]) + 1, 2)
    width = int(length.max())
    hist = np.bincount((group_of_row[:, None] * width + rows).reshape(-1), minlength=groups * width)
    hist = hist.reshape(groups, width)
    top = hist.max(1, keepdims=True).clip(min=1)
    counts = np.where(hist > 0, np.maximum(1, np.round(hist * (65535.0 / top))), 0)
    coder = constriction.stream.stack.AnsCoder()
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    symbols = rows.astype(np.int32)
    for g in range(groups - 1, -1, -1):  # a stack: encode the last group first
        model = constriction.stream.model.Categorical(counts[g, : length[g]].astype(np.float64), perfect=False)
        coder.encode_reverse(symbols[bounds[g] : bounds[g + 1]].reshape(-1), model)
    table = np.concatenate([counts[g, : length[g]] for g in range(groups)]).astype("<u2")
    return length.astype("<u2"), table, coder.get_compressed().astype("<u4")


def _ans_decode(len_part: memoryview, count_part: memoryview, words: memoryview, sizes: np.ndarray,
                T: int) -> np.ndarray:
    """Inverse of :func:`_ans_encode`: the ``[S, T]`` int32 symbol rows in group order."""
    groups = len(sizes)
    length = frombuffer(len_part, torch.int16, groups).numpy().view(np.uint16).astype(np.int64)
    if (length < 2).any() or (length > MAX_SYMBOLS + 1).any():
        raise CorruptChunk("cachegen symbol tables are out of range")
    counts = frombuffer(count_part, torch.int16, int(length.sum())).numpy().view(np.uint16).astype(np.float64)
    if memoryview(words).nbytes % 4:
        raise CorruptChunk("cachegen coder stream is not a whole number of 32-bit words")
    S = int(sizes.sum())
    flat = np.empty(S * T, dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(length)])
    pos = 0
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(words, dtype="<u4"))
        for g in range(groups):
            table = counts[starts[g] : starts[g + 1]]
            if not table.any():
                raise CorruptChunk(f"cachegen frequency table {g} is empty")
            count = int(sizes[g]) * T
            flat[pos : pos + count] = coder.decode(constriction.stream.model.Categorical(table, perfect=False), count)
            pos += count
        exhausted = coder.is_empty()
    except CorruptChunk:
        raise
    except Exception as exc:  # the library rejects a damaged stream in its own way
        raise CorruptChunk(f"cachegen coder stream does not decode: {exc}") from exc
    if not exhausted:
        raise CorruptChunk("cachegen coder stream has data left after the last symbol")
    return flat.reshape(S, T)


# ---- small helpers -----------------------------------------------------------------------------
_bytes = as_bytes


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    flat = values.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    return np.stack([packed & 15, packed >> 4], 1).reshape(-1)[:count]


class CacheGenAnsCodec(CacheGenCodec):
    """``cachegen`` with the constriction ANS back-end (smaller, slower to decode)."""

    name = "cachegen-ans"

    def __init__(self, **options: object) -> None:
        options.setdefault("entropy", "ans")
        super().__init__(**options)  # type: ignore[arg-type]


register_codec(CacheGenCodec())
register_codec(CacheGenAnsCodec())
