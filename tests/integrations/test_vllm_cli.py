"""``kvtier serve`` builds the right vLLM command line (no vLLM needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvtier.cli import app
from kvtier.errors import ConfigError
from kvtier.integrations.vllm import kv_transfer_config
from kvtier.integrations.vllm.cli import server_command, server_env


def _arg(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_server_command_defaults_and_kvtier_config(tmp_path: Path) -> None:
    cfg = tmp_path / "kvtier.yaml"
    cfg.write_text("chunk_tokens: 128\n")
    argv = server_command("/models/x", port=8123, config=str(cfg), overrides={"cpu": {"capacity": "1GiB"}},
                          served_model_name="x")
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert _arg(argv, "--host") == "127.0.0.1" and _arg(argv, "--port") == "8123"
    assert _arg(argv, "--dtype") == "float32"  # no CUDA here
    assert "--no-enable-prefix-caching" in argv
    transfer = json.loads(_arg(argv, "--kv-transfer-config"))
    assert transfer["kv_connector"] == "KvtierConnector"
    assert transfer["kv_connector_module_path"] == "kvtier.integrations.vllm"
    assert transfer["kv_load_failure_policy"] == "recompute"
    extra = transfer["kv_connector_extra_config"]
    assert extra == {"kvtier_config": str(cfg.resolve()), "kvtier": {"cpu": {"capacity": "1GiB"}},
                     "kvtier_model_id": "x"}


def test_baseline_has_no_connector_and_extra_args_pass_through() -> None:
    argv = server_command("/models/x", kvtier=False, prefix_caching=True, extra_args=["--max-num-seqs", "4"])
    assert "--kv-transfer-config" not in argv and "--enable-prefix-caching" in argv
    assert argv[-2:] == ["--max-num-seqs", "4"]
    assert kv_transfer_config()["kv_role"] == "kv_both"


def test_server_env_keeps_what_is_set() -> None:
    env = server_env({"OMP_NUM_THREADS": "3"})
    assert env["OMP_NUM_THREADS"] == "3" and env["HF_HUB_OFFLINE"] == "1"


def test_cli_dry_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--port", "9001", "--dry-run",
                                      "--max-num-batched-tokens", "512"])
    assert result.exit_code == 0, result.output
    assert "vllm.entrypoints.openai.api_server" in result.output and "--port 9001" in result.output
    assert result.output.strip().endswith("--max-num-batched-tokens 512")


def test_kv_role_reaches_the_transfer_config() -> None:
    argv = server_command("/models/x", kv_role="kv_producer")
    assert json.loads(_arg(argv, "--kv-transfer-config"))["kv_role"] == "kv_producer"
    result = CliRunner().invoke(app, ["serve", "--model", "/m", "--kv-role", "kv_consumer", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert '"kv_role": "kv_consumer"' in result.output
    with pytest.raises(ConfigError, match="kv_role"):
        kv_transfer_config(kv_role="kv_decoder")


def test_load_async_reaches_the_connector() -> None:
    argv = server_command("/models/x", load_async=True)
    assert json.loads(_arg(argv, "--kv-transfer-config"))["kv_connector_extra_config"]["kvtier_load_async"] is True
    assert "kvtier_load_async" not in _arg(server_command("/models/x"), "--kv-transfer-config")
    result = CliRunner().invoke(app, ["serve", "--model", "/m", "--load-async", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert '"kvtier_load_async": true' in result.output


def test_connector_modes_reach_the_extra_config() -> None:
    extra = json.loads(_arg(server_command("/models/x", load_async=True, layerwise=True),
                            "--kv-transfer-config"))["kv_connector_extra_config"]
    assert extra["kvtier_load_async"] is True and extra["kvtier_layerwise"] is True
    plain = json.loads(_arg(server_command("/models/x"), "--kv-transfer-config"))["kv_connector_extra_config"]
    assert "kvtier_layerwise" not in plain
