"""Optional dependencies: import one, or fail with the ``pip install 'kvtier[EXTRA]'`` that provides it.

The core install carries what the cache itself needs; the extras (``hf``, ``vllm``, ``sglang``, ``redis``,
``router``, ``bench``) carry what one integration or tool needs. Code that uses an extra's package
imports it through :func:`require` at the point of use, never at module import time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kvtier.errors import KvtierError


class MissingExtra(KvtierError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str) -> ModuleType:
    """``import module``; raises :class:`MissingExtra` naming ``kvtier[extra]`` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".", 1)[0]
        if exc.name is None or exc.name.split(".", 1)[0] != top:
            raise  # the package is there but something it imports is broken: not ours to rename
        raise MissingExtra(f"{module} is not installed; it comes with kvtier's '{extra}' extra: "
                           f"pip install 'kvtier[{extra}]'") from exc
