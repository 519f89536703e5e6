"""``kvtier serve-sglang``: SGLang's server with kvtier as its HiCache L3 storage backend.

Importable without SGLang (the CLI registers it everywhere); SGLang is only needed when the command
runs. The pure functions here (:func:`backend_extra_config`, :func:`sglang_server_command`,
:func:`sglang_server_env`) are what the tests and ``kvtier bench sglang`` use.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from kvtier.integrations.common import (
    CONFIG_OPTION,
    DRY_RUN_OPTION,
    HOST_OPTION,
    MODEL_OPTION,
    NO_KVTIER_OPTION,
    PASS_THROUGH,
    SERVED_NAME_OPTION,
    check_engine,
    exec_server,
)

BACKEND_NAME = "kvtier"
MODULE_PATH = "kvtier.integrations.sglang"
CLASS_NAME = "KvtierStorage"


def backend_extra_config(config: str | None = None, overrides: dict[str, Any] | None = None,
                         model_id: str | None = None, prefetch_threshold: int | None = None) -> dict[str, Any]:
    """The ``--hicache-storage-backend-extra-config`` mapping that loads kvtier (``dynamic`` backend,
    zero-copy v1 interface, prefix keys passed). ``prefetch_threshold``: SGLang's minimum storage hit in tokens (its
    default is 256)."""
    extra: dict[str, Any] = {"backend_name": BACKEND_NAME, "module_path": MODULE_PATH,
                             "class_name": CLASS_NAME, "interface_v1": 1,
                             # page positions, so that several pages go into one stored object
                             "hicache_storage_pass_prefix_keys": True}
    if config:
        extra["kvtier_config"] = str(Path(config).expanduser().resolve())
    if overrides:
        extra["kvtier"] = overrides
    if model_id:
        extra["kvtier_model_id"] = model_id
    if prefetch_threshold is not None:
        extra["prefetch_threshold"] = prefetch_threshold
    return extra


# What production SGLang uses for HiCache on a GPU: the page-major host layout (one contiguous page per
# key, which kvtier reads as one strided view) moved by SGLang's copy kernel, and 64-token pages.
PRODUCTION_HICACHE = ("--hicache-mem-layout", "page_first", "--hicache-io-backend", "kernel")
PRODUCTION_PAGE_SIZE = 64
# The CPU test rig (tests/sglang_cpu): stock SGLang 0.5.23 has no CPU copy kernel and forces page_first
# to page_first_direct with the direct backend, so the rig runs layer_first + direct on plain CPU memory,
# with small pages and a small KV pool for a 2-core, 24 GB machine.
CPU_RIG_HICACHE = ("--hicache-mem-layout", "layer_first", "--hicache-io-backend", "direct")
CPU_RIG_PAGE_SIZE = 16
CPU_RIG_MAX_TOTAL_TOKENS = 32768
CPU_RIG_HICACHE_GB = 1


def sglang_server_command(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 30000,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    served_model_name: str | None = None,
    device: str | None = None,
    page_size: int | None = None,
    max_total_tokens: int | None = None,
    hicache_size_gb: int | None = None,
    prefetch_threshold: int | None = None,
    kvtier: bool = True,
    cpu_test_rig: bool = False,
    extra_args: list[str] | None = None,
) -> list[str]:
    """The argv that starts SGLang (``python -m sglang.launch_server`` of this interpreter).

    ``kvtier=True``: hierarchical cache on, kvtier as its storage backend (``dynamic``, zero-copy v1).
    Production defaults: host layout ``page_first`` with the ``kernel`` copy, 64-token pages, SGLang's
    own device choice and pool sizes. ``cpu_test_rig=True``: the settings of this project's CPU test
    setup (``--device cpu``, ``layer_first`` + ``direct``, 16-token pages, a 32K-token pool, 1 GB of
    host cache); they need tests/sglang_cpu installed and are never the default.
    ``kvtier=False``: plain SGLang without the hierarchical cache, same settings otherwise (the
    baseline of tests and benchmarks). Defaults: the embedded SmolLM2, loopback only. Explicit
    arguments win over both sets of defaults.
    """
    if model is None:
        from kvtier.models import EMBEDDED_MODEL_ID, ensure_embedded_model

        model = str(ensure_embedded_model())
        served_model_name = served_model_name or EMBEDDED_MODEL_ID
    if cpu_test_rig:
        device = device or "cpu"
        page_size = page_size or CPU_RIG_PAGE_SIZE
        max_total_tokens = max_total_tokens or CPU_RIG_MAX_TOTAL_TOKENS
        hicache_size_gb = hicache_size_gb or CPU_RIG_HICACHE_GB
    argv = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", model,
        "--host", host,
        "--port", str(port),
        "--page-size", str(page_size or PRODUCTION_PAGE_SIZE),
        "--enable-cache-report",
    ]
    if device:
        argv += ["--device", device]
    if max_total_tokens:
        argv += ["--max-total-tokens", str(max_total_tokens)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if kvtier:
        extra = backend_extra_config(config, overrides, served_model_name, prefetch_threshold)
        argv += ["--enable-hierarchical-cache", *(CPU_RIG_HICACHE if cpu_test_rig else PRODUCTION_HICACHE)]
        if hicache_size_gb:
            argv += ["--hicache-size", str(hicache_size_gb)]
        argv += [
            "--hicache-storage-backend", "dynamic",
            "--hicache-storage-backend-extra-config", json.dumps(extra),
        ]
    return argv + list(extra_args or [])


def sglang_server_env(base: dict[str, str] | None = None, device: str | None = None) -> dict[str, str]:
    """Environment for the server: offline hub; with ``device="cpu"`` also ``SGLANG_USE_CPU_ENGINE=1``
    (SGLang's CPU model path) and torch threads = CPUs unless set."""
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if device == "cpu":
        env.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


@contextlib.contextmanager
def running_server(argv: list[str], log_path: Path | str, env: dict[str, str] | None = None,
                   timeout_s: float = 300.0) -> Iterator[str]:
    """Run the server of ``argv`` (from :func:`sglang_server_command`) for a script or test; yield its
    base URL once healthy; stop it (SIGTERM, then SIGKILL) on exit. Output goes to ``log_path``."""
    from kvtier.procs import wait_healthy

    port = argv[argv.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        device = argv[argv.index("--device") + 1] if "--device" in argv else None
        proc = subprocess.Popen(argv, env=env or sglang_server_env(device=device), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_healthy(url, proc, timeout_s, what="SGLang")
            yield url
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen[Any], timeout_s: float = 30.0) -> None:
    """Stop the server, then whatever is left of its process group (SGLang's scheduler and
    detokenizer are its children; the server stops them itself on SIGTERM)."""
    import signal

    from kvtier.procs import stop_process

    stop_process(proc, timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def generate(url: str, input_ids: list[int], max_new_tokens: int = 16, timeout_s: float = 600.0) -> dict[str, Any]:
    """One greedy ``/generate`` call; returns SGLang's reply (``text``, ``meta_info`` with
    ``cached_tokens_details`` when the server runs with ``--enable-cache-report``)."""
    body = json.dumps({"input_ids": input_ids,
                       "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens}}).encode()
    request = urllib.request.Request(f"{url}/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as reply:
        result: dict[str, Any] = json.loads(reply.read())
    return result


def flush_cache(url: str, timeout_s: float = 120.0) -> None:
    """Empty SGLang's device and host caches (``/flush_cache``); kvtier's tiers keep their pages.

    SGLang refuses (HTTP 400) while requests or cache write-backs are in flight: wait and retry until
    it flushes or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        request = urllib.request.Request(f"{url}/flush_cache?timeout=10", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60):
                return
        except urllib.error.HTTPError as exc:
            if exc.code != 400 or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def launch(model: str | None, *, host: str, port: int, config: str | None, served_model_name: str | None,
           device: str | None = None, page_size: int | None = None, max_total_tokens: int | None = None,
           kvtier: bool = True, cpu_test_rig: bool = False, dry_run: bool = False,
           extra_args: list[str] | None = None) -> None:
    """Check the config, then replace this process with SGLang's server (or print its command line)."""
    check_engine("sglang", "on a CPU-only machine see scripts/install-sglang.sh and docs/sglang.md", config, dry_run)
    argv = sglang_server_command(model, host=host, port=port, config=config, served_model_name=served_model_name,
                                 device=device, page_size=page_size, max_total_tokens=max_total_tokens,
                                 kvtier=kvtier, cpu_test_rig=cpu_test_rig, extra_args=extra_args)
    exec_server(argv, sglang_server_env(device="cpu" if cpu_test_rig else device), dry_run)


def register(app: typer.Typer) -> None:
    @app.command("serve-sglang", context_settings=PASS_THROUGH)
    def serve_sglang(
        ctx: typer.Context,
        model: str = MODEL_OPTION,
        host: str = HOST_OPTION,
        port: int = typer.Option(30000, help="HTTP port."),
        config: str = CONFIG_OPTION,
        served_model_name: str = SERVED_NAME_OPTION,
        device: str = typer.Option(None, help="SGLang --device (default: SGLang's choice)."),
        page_size: int = typer.Option(None, help="SGLang --page-size, tokens per page = per kvtier object "
                                                 f"(default {PRODUCTION_PAGE_SIZE}; {CPU_RIG_PAGE_SIZE} with "
                                                 "--cpu-test-rig)."),
        max_total_tokens: int = typer.Option(None, help="SGLang --max-total-tokens (default: SGLang's; "
                                                        f"{CPU_RIG_MAX_TOTAL_TOKENS} with --cpu-test-rig)."),
        no_kvtier: bool = NO_KVTIER_OPTION,
        cpu_test_rig: bool = typer.Option(False, "--cpu-test-rig", help="This project's CPU test settings "
                                                                        "(needs tests/sglang_cpu installed): "
                                                                        "--device cpu, layer_first + direct, "
                                                                        "small pages and pools."),
        dry_run: bool = DRY_RUN_OPTION,
    ) -> None:
        """Start SGLang's server with kvtier as its HiCache storage backend (extra arguments go to SGLang)."""
        launch(model, host=host, port=port, config=config, served_model_name=served_model_name, device=device,
               page_size=page_size, max_total_tokens=max_total_tokens or None, kvtier=not no_kvtier,
               cpu_test_rig=cpu_test_rig, dry_run=dry_run, extra_args=list(ctx.args))
