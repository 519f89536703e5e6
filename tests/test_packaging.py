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
