"""Chunk codecs and their registry. See :mod:`kvtier.codec.base` for the contract."""

from kvtier.codec.base import Codec, get_codec, register_codec

__all__ = ["Codec", "get_codec", "register_codec"]
