"""Config loading under hostile or careless input: environment strings stay strings, secrets are never
echoed, every problem is one clear line naming the key, YAML aliases are refused, and the CLI prints
error text as text (never as rich markup)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.config import load_config
from kvtier.errors import ConfigError


def one_line_error(path: Path | None = None, **environ: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, environ=environ)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_environment_strings_stay_strings() -> None:
    cfg = load_config(environ={"KVTIER_SERVER__TOKEN": "abc #x", "KVTIER_REMOTE__TOKEN": "123",
                               "KVTIER_CLUSTER__INSTANCE_ID": "null", "KVTIER_TENANT": "[team-a]"})
    assert cfg.server.token == "abc #x"  # YAML would have cut it at the comment
    assert cfg.remote.token == "123" and cfg.cluster.instance_id == "null" and cfg.tenant == "[team-a]"
    typed = load_config(environ={"KVTIER_DISK__ENABLED": "true", "KVTIER_CHUNK_TOKENS": "128",
                                 "KVTIER_CPU__CAPACITY": "64MiB", "KVTIER_REMOTE__TIMEOUT_S": "0.5"})
    assert typed.disk.enabled is True and typed.chunk_tokens == 128 and typed.cpu.capacity == 64 << 20
    assert typed.remote.timeout_s == 0.5
    rotated = load_config(environ={"KVTIER_AUTH__PREVIOUS_SECRETS": '["old #1", "older"]'})
    assert rotated.auth.previous_secrets == ("old #1", "older")  # lists and mappings are JSON
    assert "must be JSON" in one_line_error(KVTIER_AUTH__PREVIOUS_SECRETS="[hunter2")
    assert "hunter2" not in one_line_error(KVTIER_AUTH__PREVIOUS_SECRETS="[hunter2")
    assert "names the section 'server'" in one_line_error(KVTIER_SERVER="x")


def test_secrets_are_never_echoed(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("server:\n  token: [hunter2]\nremote:\n  port: {password: hunter2}\n")
    message = one_line_error(f)
    assert "server.token" in message and "remote.port" in message and "hunter2" not in message
    bad_section = one_line_error(KVTIER_REDIS__TTL_S="x", KVTIER_REDIS__URL="redis://u:hunter2@h:1/0")
    assert "redis.ttl_s" in bad_section and "hunter2" not in bad_section
    from kvtier.config import redacted

    shown = redacted(load_config(environ={"KVTIER_SERVER__TOKEN": "hunter2", "KVTIER_AUTH__SECRET": "hunter2" * 3,
                                          "KVTIER_AUTH__PREVIOUS_SECRETS": '["hunter2"]',
                                          "KVTIER_REDIS__URL": "redis://u:hunter2@h:1/0"}))
    assert "hunter2" not in repr(shown) and shown["redis"]["url"] == "redis://***@h:1/0"


@pytest.mark.parametrize(("content", "expect"), [
    (b"cpu:\n  policy: lru\n\xff\xfe\n", "not UTF-8 text"),
    (b"cpu: [unclosed\n", "not valid YAML"),
    (b"- a\n- b\n", "must hold a mapping"),
    (b"cpu:\n  policy: lfu\n1: 2\n", "keys must be strings"),
    (b"cpu: &c {policy: lfu}\ndisk: *c\n", "aliases"),
])
def test_file_problems_are_one_clear_line(tmp_path: Path, content: bytes, expect: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    message = one_line_error(f)
    assert expect in message and str(f) in message, message


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]" for i in range(1, 7)]
    f = tmp_path / "bomb.yaml"
    f.write_text("\n".join(lines) + "\ntenant: *a6\n")
    message = one_line_error(f)
    assert "aliases" in message and len(message) < 500, message[:500]


def test_cli_prints_error_text_verbatim_not_as_markup(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KVTIER_SERVER__PORT": "[/x] [bold]y"}
    bad = subprocess.run([sys.executable, "-m", "kvtier.cli", "config", "show"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert "server.port" in bad.stderr and "[/x] [bold]y" in bad.stderr
    shown = subprocess.run([sys.executable, "-m", "kvtier.cli", "config", "show"], capture_output=True, text=True,
                           env={"PATH": env["PATH"], "KVTIER_SERVER__TOKEN": "hunter2"}, timeout=120)
    assert shown.returncode == 0 and "hunter2" not in shown.stdout and "<redacted>" in shown.stdout
