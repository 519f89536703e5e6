"""The ``kvtier`` command.

Subcommands live in the modules listed in :data:`COMMAND_MODULES`; each exposes
``register(app: typer.Typer) -> None`` and keeps heavy imports (torch, transformers) inside its command
functions so ``kvtier --help`` stays fast. Benchmarks register under ``kvtier bench``.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from kvtier.errors import KvtierError

app = typer.Typer(help="kvtier: a tiered KV-cache layer for LLM inference engines.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (JSON + PNG under results/).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")

COMMAND_MODULES = (
    "kvtier.demo",
    "kvtier.server.cli",
    "kvtier.storage.cli",
    "kvtier.integrations.vllm.cli",
    "kvtier.integrations.sglang.cli",
    "kvtier.cluster.cli",
    "kvtier.router.cli",
)
# One ``kvtier bench <name>`` per module (shape: kvtier/bench/common.py). Engine benchmarks are listed here
# too and run in the engine's own environment (``.venv-vllm/bin/kvtier bench router``); their ``run``
# calls ``kvtier.bench.common.require_engine`` first, so elsewhere they fail with that command.
BENCH_MODULES = (
    "kvtier.bench.ttft",
    "kvtier.bench.cpu",
    "kvtier.bench.lookup",
    "kvtier.bench.disk",
    "kvtier.bench.server",
    "kvtier.bench.redis",
    "kvtier.bench.tiers",
    "kvtier.bench.codecs",
    "kvtier.bench.blend",
    "kvtier.bench.auth",
    "kvtier.bench.startup",
    # engine benchmarks
    "kvtier.bench.router",
    "kvtier.bench.vllm",
    "kvtier.bench.sglang",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kvtier {installed_version()}")
        raise typer.Exit()


def installed_version() -> str:
    """The version in kvtier's installed package metadata (``kvtier.__version__`` when run from a source
    tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvtier")
    except PackageNotFoundError:
        import kvtier

        return kvtier.__version__


@app.callback()
def _root(
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="Print kvtier's version and exit."),
) -> None:
    """kvtier: a tiered KV-cache layer for LLM inference engines."""


@bench_app.callback()
def _bench() -> None:
    """Benchmarks (JSON + PNG under results/)."""
    from kvtier.extras import require

    require("matplotlib", "bench")  # every benchmark plots: fail before measuring, not after


@config_app.command("show")
def config_show(
    file: str = typer.Option(None, "--file", "-f", help="YAML config file (default: $KVTIER_CONFIG)."),
) -> None:
    """Print the effective configuration (defaults < file < KVTIER_* environment), secrets masked."""
    import yaml

    from kvtier.config import load_config, redacted

    cfg = load_config(file)
    typer.echo(yaml.safe_dump(redacted(cfg), sort_keys=False))


@config_app.command("reference")
def config_reference_cmd() -> None:
    """Print the table of every config key (as in the README)."""
    from kvtier.config import config_reference

    typer.echo(config_reference())


def _register(target: typer.Typer, modules: tuple[str, ...]) -> None:
    for name in modules:
        importlib.import_module(name).register(target)


_register(app, COMMAND_MODULES)
_register(bench_app, BENCH_MODULES)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KvtierError as exc:
        # the message is plain text (it may quote values such as "[/x]"), never markup
        Console(stderr=True).print("[red]error:[/red]", escape(str(exc)), soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
