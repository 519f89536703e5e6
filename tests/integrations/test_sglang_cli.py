"""``kvtier serve-sglang`` and its pure command builders (no SGLang needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from kvtier.cli import app
from kvtier.integrations.sglang.cli import backend_extra_config, sglang_server_command, sglang_server_env


def _arg(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_command_loads_kvtier_through_the_dynamic_backend(tmp_path: Path) -> None:
    cfg = tmp_path / "kv.yaml"
    argv = sglang_server_command("/models/m", port=31000, config=str(cfg), overrides={"tenant": "a"},
                                 served_model_name="m", prefetch_threshold=16)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert _arg(argv, "--model-path") == "/models/m" and _arg(argv, "--host") == "127.0.0.1"
    assert "--enable-hierarchical-cache" in argv and _arg(argv, "--hicache-storage-backend") == "dynamic"
    extra = json.loads(_arg(argv, "--hicache-storage-backend-extra-config"))
    assert extra == backend_extra_config(str(cfg), {"tenant": "a"}, "m", 16)
    assert extra["module_path"] == "kvtier.integrations.sglang" and extra["class_name"] == "KvtierStorage"
    assert extra["interface_v1"] == 1 and extra["kvtier_config"] == str(cfg.resolve())


def test_production_defaults_force_no_cpu_test_settings() -> None:
    argv = sglang_server_command("/models/m")
    assert _arg(argv, "--hicache-mem-layout") == "page_first" and _arg(argv, "--hicache-io-backend") == "kernel"
    assert _arg(argv, "--page-size") == "64"
    assert not {"--device", "--max-total-tokens", "--hicache-size"} & set(argv)  # SGLang's own choices


def test_cpu_test_rig_is_opt_in_and_explicit_values_win() -> None:
    argv = sglang_server_command("/models/m", cpu_test_rig=True)
    assert _arg(argv, "--device") == "cpu" and _arg(argv, "--page-size") == "16"
    assert _arg(argv, "--hicache-mem-layout") == "layer_first" and _arg(argv, "--hicache-io-backend") == "direct"
    assert _arg(argv, "--max-total-tokens") == "32768" and _arg(argv, "--hicache-size") == "1"
    argv = sglang_server_command("/models/m", cpu_test_rig=True, page_size=32, max_total_tokens=4096)
    assert _arg(argv, "--page-size") == "32" and _arg(argv, "--max-total-tokens") == "4096"


def test_baseline_has_no_hierarchical_cache_and_extra_args_pass_through() -> None:
    argv = sglang_server_command("/models/m", device="cpu", kvtier=False, extra_args=["--log-level", "debug"])
    assert not any(a.startswith("--hicache") or a == "--enable-hierarchical-cache" for a in argv)
    assert argv[-2:] == ["--log-level", "debug"]


def test_env_selects_the_cpu_engine_and_keeps_what_is_set() -> None:
    env = sglang_server_env({"OMP_NUM_THREADS": "1"}, device="cpu")
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["OMP_NUM_THREADS"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert "SGLANG_USE_CPU_ENGINE" not in sglang_server_env({}, device="cuda")
    assert "SGLANG_USE_CPU_ENGINE" not in sglang_server_env({})  # never by default


def test_cli_dry_run(tmp_path: Path) -> None:
    cfg = tmp_path / "kv.yaml"
    cfg.write_text("disk:\n  enabled: true\n")
    result = CliRunner().invoke(app, ["serve-sglang", "--model", "/models/m", "--config", str(cfg), "--dry-run",
                                      "--", "--log-level", "debug"])
    assert result.exit_code == 0, result.output
    assert "sglang.launch_server" in result.output and "KvtierStorage" in result.output
    assert result.output.strip().endswith("--log-level debug")
    assert "--device" not in result.output and "page_first" in result.output
    rig = CliRunner().invoke(app, ["serve-sglang", "--model", "/models/m", "--cpu-test-rig", "--dry-run"])
    assert rig.exit_code == 0 and "--device cpu" in rig.output and "layer_first" in rig.output


def test_one_sglang_command() -> None:
    """SGLang starts through ``kvtier serve-sglang`` only; ``kvtier serve`` is vLLM's and has no --engine."""
    assert "--engine" not in CliRunner().invoke(app, ["serve", "--help"]).output
    passed_on = CliRunner().invoke(app, ["serve", "--model", "/models/m", "--dry-run", "--engine", "sglang"])
    assert "vllm.entrypoints.openai.api_server" in passed_on.output  # an unknown option goes to vLLM
    assert "sglang.launch_server" not in passed_on.output


def test_module_path_resolves_lazily() -> None:
    """SGLang's dynamic backend imports the documented module path and takes the class from it; the
    pure submodules load neither the backend nor SGLang (checked in a fresh interpreter)."""
    code = ("import importlib, sys\n"
            "import kvtier.integrations.sglang.cli, kvtier.integrations.sglang.pages\n"
            "import kvtier.integrations.sglang.stats\n"
            "assert 'kvtier.integrations.sglang.backend' not in sys.modules\n"
            "extra = kvtier.integrations.sglang.cli.backend_extra_config()\n"
            "cls = getattr(importlib.import_module(extra['module_path']), extra['class_name'])\n"
            "assert cls.__module__ == 'kvtier.integrations.sglang.backend', cls\n"
            "try:\n    kvtier.integrations.sglang.NoSuchThing\nexcept AttributeError:\n    print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr
