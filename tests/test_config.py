"""Config: defaults, file, environment, and clear errors naming key, value and choices."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.config import config_reference, load_config, parse_bytes
from kvtier.errors import ConfigError


def test_defaults() -> None:
    cfg = load_config(environ={})
    assert cfg.chunk_tokens == 256 and cfg.cpu.policy == "lru" and cfg.cpu.capacity == 2 * 1024**3


def test_file_then_env_precedence(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("chunk_tokens: 128\ncpu:\n  capacity: 64MiB\n  policy: lfu\n")
    cfg = load_config(f, environ={"KVTIER_CPU__POLICY": "s3fifo"})
    assert cfg.chunk_tokens == 128 and cfg.cpu.capacity == 64 * 1024**2 and cfg.cpu.policy == "s3fifo"
    cfg = load_config(environ={"KVTIER_CONFIG": str(f), "KVTIER_CHUNK_TOKENS": "512"})
    assert cfg.chunk_tokens == 512 and cfg.cpu.policy == "lfu"


def test_unknown_key_names_nearest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'chunk_tokns'.*did you mean 'chunk_tokens'"):
        load_config(overrides={"chunk_tokns": 3}, environ={})
    with pytest.raises(ConfigError, match=r"'cpu.capactiy'.*did you mean 'capacity'"):
        load_config(environ={"KVTIER_CPU__CAPACTIY": "1GiB"})


def test_bad_values_name_key_value_and_choices() -> None:
    with pytest.raises(ConfigError, match=r"cpu.policy.*'mru'.*'lru', 'lfu', 'fifo' or 's3fifo'"):
        load_config(overrides={"cpu": {"policy": "mru"}}, environ={})
    with pytest.raises(ConfigError, match=r"cpu.capacity.*'lots'.*byte size"):
        load_config(overrides={"cpu": {"capacity": "lots"}}, environ={})
    with pytest.raises(ConfigError, match=r"chunk_tokens.*0"):
        load_config(overrides={"chunk_tokens": 0}, environ={})


def test_bad_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_parse_bytes() -> None:
    assert parse_bytes("1.5GiB") == int(1.5 * 1024**3)
    assert parse_bytes("2 MB") == 2_000_000
    assert parse_bytes(7) == 7
    with pytest.raises(ValueError):
        parse_bytes("3 parsecs")


def test_cli_config_show_and_error() -> None:
    ok = subprocess.run([sys.executable, "-m", "kvtier.cli", "config", "show"], capture_output=True, text=True,
                        env={"KVTIER_CPU__POLICY": "fifo", "PATH": "/usr/bin:/bin"})
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"policy: fifo", ok.stdout)
    bad = subprocess.run([sys.executable, "-m", "kvtier.cli", "config", "show"], capture_output=True, text=True,
                         env={"KVTIER_CPU__POLISY": "fifo", "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "did you mean 'policy'" in bad.stderr.replace("\n", " ")


def test_readme_config_reference_is_current() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert config_reference() in readme, "README config reference is stale: run `kvtier config reference`"
