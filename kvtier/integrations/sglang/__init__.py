"""kvtier as SGLang's HiCache L3 storage backend.

SGLang loads the backend by module path and class name (``"module_path": "kvtier.integrations.sglang",
"class_name": "KvtierStorage"``), so that path stays valid: the names below resolve lazily, and the
pure submodules (:mod:`.cli`, :mod:`.stats`, :mod:`.pages`) import neither SGLang nor the backend.

- :mod:`.backend`: :class:`KvtierStorage`, the ``HiCacheStorage`` implementation;
- :mod:`.pages`: page keys, multi-page object groups and host-pool views (pure, torch only);
- :mod:`.stats`: the I/O records SGLang's ``/metrics`` reads;
- :mod:`.cli`: ``kvtier serve-sglang`` and the command builders tests and benchmarks use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"KvtierStorage": "backend", "EXTRA_KEYS": "backend"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
