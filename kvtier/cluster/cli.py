"""``kvtier controller``: run the cluster controller (HTTP API + worker channel); settings: the
``controller`` config section, each key also an option (:mod:`kvtier.config_cli`)."""

from __future__ import annotations

import typer

from kvtier.config import KvtierConfig
from kvtier.config_cli import config_command


def register(app: typer.Typer) -> None:
    @config_command(app, "controller", ["controller"])
    def controller(config: KvtierConfig) -> None:
        """Run the controller until SIGTERM / SIGINT. Prefer the token variables to the token options: argv
        is visible to other users."""
        from kvtier.cluster.controller import serve

        settings = config.controller

        def ready(bound: int) -> None:
            roles = [name for name, t in (("admin", settings.token), ("worker", settings.worker_token),
                                          ("read", settings.read_token)) if t]
            auth = f"tokens: {', '.join(roles)}" if roles else "no token (loopback only)"
            print(f"kvtier controller listening on http://{settings.host}:{bound} ({auth}; OpenAPI at "
                  "/openapi.json)", flush=True)

        serve(settings, ready)
