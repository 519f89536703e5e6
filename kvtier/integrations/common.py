"""What the vLLM and SGLang integrations share: the engine's extra-config mapping of kvtier keys, and
the ``kvtier serve`` / ``kvtier serve-sglang`` options and exec tail.

Torch-free and engine-free: the CLI imports it on every start.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
from collections.abc import Mapping
from typing import Any

import typer

from kvtier.errors import ConfigError

__all__ = ["CONFIG_OPTION", "DRY_RUN_OPTION", "HOST_OPTION", "MODEL_OPTION", "NO_KVTIER_OPTION", "PASS_THROUGH",
           "SERVED_NAME_OPTION", "check_engine", "config_overrides", "exec_server"]


def config_overrides(extra: Mapping[str, Any], known: tuple[str, ...], where: str) -> dict[str, Any]:
    """The ``kvtier`` mapping of config overrides in an engine's extra config ``where``.

    Raises :class:`ConfigError` naming the key for a ``kvtier*`` key not in ``known`` (a typo would
    otherwise be ignored silently) and for a ``kvtier`` value that is not a mapping."""
    unknown = [k for k in extra if k.startswith("kvtier") and k not in known]
    if unknown:
        raise ConfigError(f"unknown {where} keys {unknown}; kvtier knows {known}")
    overrides = extra.get("kvtier") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where} 'kvtier' must be a mapping, got {overrides!r}")
    return overrides


# ---- the serve commands -------------------------------------------------------------------------------
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}  # arguments kvtier does not know go on
MODEL_OPTION: Any = typer.Option(None, "--model", "-m", help="HF model directory (default: the embedded SmolLM2).")
HOST_OPTION: Any = typer.Option("127.0.0.1", help="Bind address (loopback by default).")
CONFIG_OPTION: Any = typer.Option(None, "--config", "-c", help="kvtier YAML config (default: $KVTIER_CONFIG).")
SERVED_NAME_OPTION: Any = typer.Option(None, help="Name clients use; also the model part of kvtier keys.")
NO_KVTIER_OPTION: Any = typer.Option(False, "--no-kvtier", help="Plain engine without kvtier (baseline), "
                                                                "same settings.")
DRY_RUN_OPTION: Any = typer.Option(False, help="Print the command instead of running it.")


def check_engine(module: str, install_hint: str, config: str | None, dry_run: bool) -> None:
    """Fail early, with kvtier's message: the engine ``module`` must be importable (unless only printing
    the command) and the kvtier config file must load, rather than failing inside the engine's start-up."""
    if importlib.util.find_spec(module) is None and not dry_run:
        raise ConfigError(f"{module} is not installed in this environment: {install_hint}")
    if config:
        from kvtier.config import load_config

        load_config(config)


def exec_server(argv: list[str], env: dict[str, str], dry_run: bool) -> None:
    """Print ``argv`` (``dry_run``) or replace this process with it, so signals go straight to the server."""
    if dry_run:
        typer.echo(shlex.join(argv))
        return
    os.execve(argv[0], argv, env)
