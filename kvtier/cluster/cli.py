"""``kvtier controller``: run the cluster controller (HTTP API + worker channel)."""

from __future__ import annotations

import logging
import os

import typer


def register(app: typer.Typer) -> None:
    @app.command("controller")
    def controller(
        host: str = typer.Option("127.0.0.1", help="Bind address; anything but loopback requires a token."),
        port: int = typer.Option(9000, help="HTTP port (0 picks a free one)."),
        token: str = typer.Option(
            None, help="Bearer token clients and workers must present (prefer KVTIER_CONTROLLER_TOKEN: argv is "
                       "visible to other users)."
        ),
        ttl: float = typer.Option(10.0, "--heartbeat-ttl", help="Drop a worker silent for this many seconds."),
        heartbeat: float = typer.Option(None, "--heartbeat", help="Heartbeat interval advised to workers "
                                                                  "(default ttl/5)."),
        command_timeout: float = typer.Option(30.0, help="Seconds a worker gets to answer a command."),
        max_keys_per_instance: int = typer.Option(1 << 20, help="Index cap per instance (keys)."),
        max_keys_total: int = typer.Option(1 << 24, help="Index cap over all instances (keys)."),
        tokenizer: list[str] = typer.Option(  # noqa: B008 - typer's idiom
            [], "--tokenizer", help="MODEL=PATH: tokenizer.json (or its directory) for text lookups; repeatable."
        ),
        log_level: str = typer.Option("info", help="Logging level: debug, info, warning, error."),
    ) -> None:
        """Run the controller until SIGTERM / SIGINT."""
        from kvtier.cluster.controller import ControllerSettings, serve
        from kvtier.errors import ConfigError

        logging.getLogger("kvtier").setLevel(log_level.upper())
        paths: dict[str, str] = {}
        for item in tokenizer:
            model, sep, path = item.partition("=")
            if not sep or not model or not path:
                raise ConfigError(f"--tokenizer expects MODEL=PATH, got {item!r}")
            paths[model] = path
        settings = ControllerSettings(
            host=host, port=port, token=token if token is not None else os.environ.get("KVTIER_CONTROLLER_TOKEN", ""),
            ttl_s=ttl, heartbeat_s=heartbeat if heartbeat is not None else ttl / 5, command_timeout_s=command_timeout,
            max_keys_per_instance=max_keys_per_instance, max_keys_total=max_keys_total, tokenizers=paths,
        )

        def ready(bound: int) -> None:
            auth = "token required" if settings.token else "no token (loopback only)"
            print(f"kvtier controller listening on http://{host}:{bound} ({auth}; OpenAPI at /openapi.json)",
                  flush=True)

        serve(settings, ready)
