"""Config: defaults, file, environment, and clear errors naming key, value and choices."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kvtier.config import KvtierConfig, config_reference, load_config, parse_bytes, redacted, with_overrides
from kvtier.config_cli import config_command, flags_of
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
    with pytest.raises(ConfigError, match=r"cpu.promote.*'sometimes'.*boolean"):
        load_config(overrides={"cpu": {"promote": "sometimes"}}, environ={})


def test_promotion_is_on_by_default_and_switched_off_by_env() -> None:
    assert load_config(environ={}).cpu.promote is True
    assert load_config(environ={"KVTIER_CPU__PROMOTE": "false"}).cpu.promote is False


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


# ---- one root schema: controller, router, cluster (agent), server ----------------------------------
def test_process_sections_from_file_and_env(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("controller:\n  ttl_s: 4\n  tokenizers: {m: /tok}\nrouter:\n  backends: ['http://a:1=i0', "
                 "'http://b:2/']\n  max_body_bytes: 1MiB\ncluster:\n  poll_wait_s: 1.5\n  instance_id: g1\n")
    cfg = load_config(f, environ={"KVTIER_ROUTER__POLICY": "roundrobin", "KVTIER_CONTROLLER__HEARTBEAT_S": "0.5",
                                  "KVTIER_ROUTER__PREFILL": '["http://p:3"]', "KVTIER_CLUSTER__BATCH_MAX": "64"})
    assert cfg.controller.ttl_s == 4 and cfg.controller.heartbeat == 0.5 and cfg.controller.tokenizers == {"m": "/tok"}
    assert cfg.router.backends == (("http://a:1", "i0"), ("http://b:2", ""))
    assert cfg.router.prefill == (("http://p:3", ""),)
    assert cfg.router.policy == "roundrobin" and cfg.router.max_body_bytes == 1 << 20
    assert cfg.cluster.poll_wait_s == 1.5 and cfg.cluster.batch_max == 64 and cfg.cluster.instance_id == "g1"
    assert load_config(environ={"KVTIER_CONTROLLER__TTL_S": "20"}).controller.heartbeat == 4  # 0: ttl_s / 5


def test_unknown_key_in_process_sections_names_valid_keys(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("router:\n  polcy: kv\n")
    with pytest.raises(ConfigError, match=r"'router.polcy'.*did you mean 'policy'.*valid keys here: backends, "
                                          r"prefill, host"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match=r"'controller.heartbeat_tll'.*valid keys here: host, port, token"):
        load_config(environ={"KVTIER_CONTROLLER__HEARTBEAT_TLL": "3"})
    with pytest.raises(ConfigError, match=r"'cluster.pol_wait_s'.*did you mean 'poll_wait_s'"):
        load_config(overrides={"cluster": {"pol_wait_s": 1}}, environ={})


def test_bad_values_in_process_sections() -> None:
    with pytest.raises(ConfigError, match=r"router.policy.*'fastest'.*'kv', 'least_loaded' or 'roundrobin'"):
        load_config(environ={"KVTIER_ROUTER__POLICY": "fastest"})
    with pytest.raises(ConfigError, match=r"router.backends.0.*must start with http"):
        load_config(overrides={"router": {"backends": ["ftp://x"]}}, environ={})
    with pytest.raises(ConfigError, match=r"cluster.instance_id.*'a b'"):
        load_config(overrides={"cluster": {"instance_id": "a b"}}, environ={})
    with pytest.raises(ConfigError, match=r"controller.ttl_s.*-1"):
        load_config(overrides={"controller": {"ttl_s": -1}}, environ={})
    with pytest.raises(ConfigError, match=r"heartbeat_s \(20.0\) must be below controller.ttl_s"):
        load_config(overrides={"controller": {"heartbeat_s": 20}}, environ={}).controller.check()


def test_token_variables_are_fallbacks_of_their_keys(tmp_path: Path) -> None:
    env = {"KVTIER_CONTROLLER_TOKEN": "adm", "KVTIER_CONTROLLER_READ_TOKEN": "rd", "KVTIER_ROUTER_TOKEN": "cli"}
    cfg = load_config(environ=env)
    assert (cfg.controller.token, cfg.controller.read_token, cfg.cluster.token) == ("adm", "rd", "adm")
    assert cfg.router.controller_token == "rd" and cfg.router.token == "cli"  # the read token first
    del env["KVTIER_CONTROLLER_READ_TOKEN"]
    assert load_config(environ=env).router.controller_token == "adm"
    f = tmp_path / "c.yaml"
    f.write_text("cluster:\n  token: from-file\n")
    cfg = load_config(f, environ={**env, "KVTIER_ROUTER__TOKEN": "exact"})
    assert cfg.cluster.token == "from-file" and cfg.router.token == "exact" and cfg.controller.token == "adm"


def test_secrets_of_process_sections_are_masked() -> None:
    env = {"KVTIER_CONTROLLER__TOKEN": "s3cret-adm", "KVTIER_ROUTER__BACKEND_TOKEN": "s3cret-be",
           "KVTIER_CLUSTER__TOKEN": "s3cret-ag"}
    cfg = load_config(environ=env)
    for shown in (repr(cfg), str(cfg.router), repr(cfg.cluster), str(redacted(cfg))):
        assert "s3cret" not in shown, shown
    assert "backend_token='***'" in repr(cfg.router)
    with pytest.raises(ConfigError) as err:
        load_config(environ={"KVTIER_CONTROLLER__WORKER_TOKEN": '{"x": "s3cret"}'},
                    overrides={"controller": {"worker_token": ["s3cret"]}})
    assert "s3cret" not in str(err.value) and "controller.worker_token" in str(err.value)


def test_with_overrides_validates_and_keeps_what_was_set() -> None:
    cfg = load_config(environ={}, overrides={"chunk_tokens": 64})
    own = with_overrides(cfg, {"cluster": {"instance_id": "g1-rank1"}})
    assert own.cluster.instance_id == "g1-rank1" and own.chunk_tokens == 64 and "chunk_tokens" in own.model_fields_set
    with pytest.raises(ConfigError, match=r"cluster\.instance_id"):
        with_overrides(cfg, {"cluster": {"instance_id": "no spaces"}})


# ---- command-line options generated from the schema ------------------------------------------------
def _command(keys: list[str]) -> tuple[typer.Typer, list[KvtierConfig]]:
    app, got = typer.Typer(), []

    @config_command(app, "run", keys)
    def run(cfg: KvtierConfig) -> None:
        """Record the config."""
        got.append(cfg)

    @app.command("other")
    def other() -> None:  # a second command keeps typer from collapsing the group
        """Nothing."""

    return app, got


def test_options_override_the_file_and_absent_ones_do_not(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("chunk_tokens: 32\nrouter:\n  backend_header: true\n  policy: least_loaded\n  port: 81\n")
    app, got = _command(["router", "chunk_tokens"])
    args = ["run", "-c", str(f), "--backend", "http://a:1=x", "--decode", "http://b:2", "--controller", "http://c:9",
            "--lookup-timeout", "0.5", "--max-body-bytes", "2MiB", "--port", "82"]
    result = CliRunner().invoke(app, args, env={})
    assert result.exit_code == 0, result.output
    r = got[-1].router
    assert r.backends == (("http://a:1", "x"), ("http://b:2", "")) and r.controller_url == "http://c:9"
    assert r.lookup_timeout_s == 0.5 and r.max_body_bytes == 2 << 20 and r.port == 82
    assert r.backend_header and r.policy == "least_loaded" and got[-1].chunk_tokens == 32  # from the file
    assert CliRunner().invoke(app, ["run", "-c", str(f), "--no-backend-header", "--chunk-tokens", "64"],
                              env={}).exit_code == 0
    assert not got[-1].router.backend_header and got[-1].chunk_tokens == 64


def test_option_names_and_mapping_options() -> None:
    assert flags_of("controller.claim_ttl_s") == ("--claim-ttl",)
    assert flags_of("controller.ttl_s") == ("--heartbeat-ttl",)
    assert flags_of("server.persist_path") == ("--persist",) and flags_of("router.kv_model") == ("--kv-model",)
    app, got = _command(["controller"])
    result = CliRunner().invoke(app, ["run", "--tokenizer", "m=/t.json", "--tokenizer", "n=/u", "--heartbeat", "1"],
                                env={})
    assert result.exit_code == 0, result.output
    assert got[-1].controller.tokenizers == {"m": "/t.json", "n": "/u"} and got[-1].controller.heartbeat == 1
    bad = CliRunner().invoke(app, ["run", "--tokenizer", "m"], env={})
    assert isinstance(bad.exception, ConfigError) and "--tokenizer (config key controller.tokenizers)" in str(
        bad.exception)
    bad = CliRunner().invoke(app, ["run", "--heartbeat-ttl", "-2"], env={})
    assert isinstance(bad.exception, ConfigError) and "controller.ttl_s" in str(bad.exception)


# ---- one file, every process -------------------------------------------------------------------------
def test_one_file_drives_server_controller_router_agent_and_serve(tmp_path: Path) -> None:
    """Real processes: `kvtier server` (file via $KVTIER_CONFIG), `kvtier controller -c`, `kvtier router
    --config`, an engine's cluster agent (load_config) and `kvtier serve --dry-run` read one YAML file."""
    import httpx
    import yaml

    from kvtier.cluster.agent import start_engine
    from kvtier.layout import KVSpec
    from kvtier.procs import Child, free_port

    token = "one-file-token"
    port = {name: free_port() for name in ("server", "controller", "router", "dead")}
    controller = f"http://127.0.0.1:{port['controller']}"
    f = tmp_path / "kvtier.yaml"
    f.write_text(yaml.safe_dump({
        "chunk_tokens": 16, "cpu": {"capacity": "1MiB"}, "remote": {"enabled": True, "port": port["server"]},
        "server": {"port": port["server"], "capacity": "64MiB"},
        "controller": {"port": port["controller"], "ttl_s": 6, "heartbeat_s": 0.3},
        "router": {"port": port["router"], "policy": "roundrobin", "controller_url": controller,
                   "backends": [f"http://127.0.0.1:{port['dead']}=one"]},
        "cluster": {"enabled": True, "controller_url": controller, "instance_id": "one", "poll_wait_s": 1.0},
    }))
    env = {**os.environ, "KVTIER_CONTROLLER_TOKEN": token}  # the one secret, as deployments pass it
    cli = [sys.executable, "-m", "kvtier.cli"]
    children = []
    try:
        for args, extra in ((["server"], {"KVTIER_CONFIG": str(f)}), (["controller", "-c", str(f)], {}),
                            (["router", "--config", str(f)], {})):
            children.append(Child([*cli, *args], log=tmp_path / f"{args[0]}.log", env={**env, **extra}))
        server, ctl, router = children
        assert server.expect(r"listening on 127\.0\.0\.1:(\d+)", 60).group(1) == str(port["server"])
        assert ctl.expect(r"listening on http://127\.0\.0\.1:(\d+) \(tokens: admin", 60).group(1) == str(
            port["controller"])
        assert router.expect(r"listening on http://127\.0\.0\.1:(\d+) \(1 backends, policy roundrobin", 60).group(
            1) == str(port["router"])

        spec = KVSpec(2, 2, 8, "float32", chunk_tokens=16)
        engine, agent = start_engine(spec, "m", load_config(f, environ={"KVTIER_CONTROLLER_TOKEN": token}))
        try:
            assert agent.wait_registered(20) and agent.instance_id == "one"
            listed = httpx.get(f"{controller}/instances", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert "one" in listed.text, listed.text
            assert engine.storage.writable_tiers()[0] == "remote"  # the file's remote section: the server
        finally:
            agent.stop()
            engine.close()
    finally:
        for child in children:
            child.stop()
    dry = subprocess.run([*cli, "serve", "--dry-run", "-c", str(f)], capture_output=True, text=True, env=env)
    assert dry.returncode == 0 and str(f) in dry.stdout, dry.stderr
    f.write_text("router:\n  polcy: kv\n")
    for args in (["controller", "-c", str(f)], ["router", "-c", str(f)], ["server", "-c", str(f)],
                 ["serve", "--dry-run", "-c", str(f)]):
        bad = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=60)
        assert bad.returncode == 2 and "unknown config key 'router.polcy'" in bad.stderr.replace("\n", " "), args


def test_events_section_replaces_the_separate_events_schema() -> None:
    cfg = load_config(environ={"KVTIER_EVENTS__ENABLED": "true", "KVTIER_EVENTS__ENDPOINT": "ipc:///tmp/kv.sock"})
    assert cfg.events.enabled and cfg.events.endpoint == "ipc:///tmp/kv.sock" and cfg.events.replay_endpoint == ""
    with pytest.raises(ConfigError, match=r"'events.topc'.*did you mean 'topic'"):
        with_overrides(cfg, {"events": {"topc": "x"}})  # what the vLLM connector does with kvtier_events
    with pytest.raises(ConfigError, match=r"events.max_queue.*0"):
        load_config(overrides={"events": {"max_queue": 0}}, environ={})


def test_config_show_masks_exactly_the_secret_keys() -> None:
    shown = redacted(load_config(environ={}))
    masked = {f"{section}.{key}" for section, keys in shown.items() if isinstance(keys, dict)
              for key, value in keys.items() if value == "<redacted>"}
    assert masked == {"remote.token", "server.token", "server.admin_token", "cluster.token", "controller.token",
                      "controller.worker_token", "controller.read_token", "router.token", "router.backend_token",
                      "router.controller_token", "auth.secret", "auth.secret_file", "auth.previous_secrets"}
