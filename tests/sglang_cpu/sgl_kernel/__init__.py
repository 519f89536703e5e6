"""Test-only stand-in for SGLang's compiled ``sgl_kernel`` package (CPU test setup, not kvtier code).

PyPI has no CPU build of ``sgl-kernel``, yet SGLang imports a few of its names at start-up when
``SGLANG_USE_CPU_ENGINE=1``. Every name resolves to a function that raises if it is ever *called*: with
the ``torch_native`` attention backend and a Llama model none is (shared/RECIPES-sglang.md), so a call
would mean the test runs a code path this setup does not support, and it fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__version__ = "0.0.0+kvtier-cpu-stub"


def __getattr__(name: str) -> Callable[..., Any]:
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError(f"sgl_kernel.{name} is not available in kvtier's CPU test setup")

    unavailable.__name__ = name
    return unavailable
