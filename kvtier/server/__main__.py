"""``python -m kvtier.server``: the ``kvtier server`` command alone, without the other subcommands'
imports (starts faster; used by tests and benchmarks)."""

from __future__ import annotations

import logging
import sys

import typer

from kvtier.errors import KvtierError
from kvtier.server.cli import register


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = typer.Typer(add_completion=False)
    register(app)
    try:
        app()
    except KvtierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
