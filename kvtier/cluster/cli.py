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
            None, help="Admin bearer token: every route (prefer KVTIER_CONTROLLER_TOKEN: argv is visible to other "
                       "users). Without --worker-token, workers present this one too."
        ),
        worker_token: str = typer.Option(
            None, help="Token of the worker channel only: register, heartbeat, events (prefer "
                       "KVTIER_CONTROLLER_WORKER_TOKEN)."
        ),
        read_token: str = typer.Option(
            None, help="Token of lookups, instances, operation status and metrics only, e.g. for routers (prefer "
                       "KVTIER_CONTROLLER_READ_TOKEN)."
        ),
        ttl: float = typer.Option(10.0, "--heartbeat-ttl", help="Drop a worker silent for this many seconds."),
        claim_ttl: float = typer.Option(60.0, help="Seconds an expired instance's id stays reserved for the "
                                                   "registration that owned it."),
        heartbeat: float = typer.Option(None, "--heartbeat", help="Heartbeat interval advised to workers "
                                                                  "(default ttl/5)."),
        command_timeout: float = typer.Option(30.0, help="Seconds a worker gets to answer a command."),
        max_keys_per_instance: int = typer.Option(1 << 20, help="Index cap per instance (keys)."),
        max_keys_total: int = typer.Option(1 << 24, help="Index cap over all instances (keys)."),
        max_body_bytes: int = typer.Option(64 << 20, help="Largest request body (413 above, before it is read)."),
        tokenizer: list[str] = typer.Option(  # noqa: B008 - typer's idiom
            [], "--tokenizer", help="MODEL=PATH: tokenizer.json, its directory or a locally cached model id for text "
                                    "lookups of MODEL; repeatable. Only these models' text is tokenized."
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

        def secret(given: str | None, env: str) -> str:
            return given if given is not None else os.environ.get(env, "")

        settings = ControllerSettings(
            host=host, port=port, token=secret(token, "KVTIER_CONTROLLER_TOKEN"),
            worker_token=secret(worker_token, "KVTIER_CONTROLLER_WORKER_TOKEN"),
            read_token=secret(read_token, "KVTIER_CONTROLLER_READ_TOKEN"), ttl_s=ttl, claim_ttl_s=claim_ttl,
            heartbeat_s=heartbeat if heartbeat is not None else ttl / 5, command_timeout_s=command_timeout,
            max_keys_per_instance=max_keys_per_instance, max_keys_total=max_keys_total, max_body_bytes=max_body_bytes,
            tokenizers=paths,
        )

        def ready(bound: int) -> None:
            roles = [name for name, t in (("admin", settings.token), ("worker", settings.worker_token),
                                          ("read", settings.read_token)) if t]
            auth = f"tokens: {', '.join(roles)}" if roles else "no token (loopback only)"
            print(f"kvtier controller listening on http://{host}:{bound} ({auth}; OpenAPI at /openapi.json)",
                  flush=True)

        serve(settings, ready)
