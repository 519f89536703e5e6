"""``kvtier server``: run the cache server (settings: the ``server`` config section, then options)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    @app.command("server")
    def server(
        host: str = typer.Option(None, help="Bind address (default server.host, 127.0.0.1)."),
        port: int = typer.Option(None, help="TCP port; 0 picks a free one (default server.port, 7390)."),
        token: str = typer.Option(
            None, help="Shared secret clients must present (prefer KVTIER_SERVER__TOKEN: argv is visible)."
        ),
        capacity: str = typer.Option(None, help="Byte cap of chunks in memory, e.g. 4GiB."),
        persist: str = typer.Option(None, "--persist", help="Directory for persistence (a disk tier)."),
        config: str = typer.Option(None, "--config", "-c", help="YAML config file (default $KVTIER_CONFIG)."),
        log_level: str = typer.Option("info", help="Logging level: debug, info, warning, error."),
    ) -> None:
        """Run the kvtier cache server until SIGTERM / SIGINT (then finish in-flight requests and stop)."""
        from kvtier.config import load_config
        from kvtier.server.app import CacheServer, run

        logging.getLogger("kvtier").setLevel(log_level.upper())
        overrides: dict[str, Any] = {}
        for key, value in (("host", host), ("port", port), ("token", token), ("capacity", capacity),
                           ("persist_path", persist)):
            if value is not None:
                overrides[key] = value
        cfg = load_config(config, overrides={"server": overrides}).server

        def ready(srv: CacheServer) -> None:
            where = f"persisting to {cfg.persist_path}" if cfg.persist_path else "memory only"
            auth = (f"token required; {len(set(cfg.tenants.values()))} tenants; admin token "
                    f"{'set' if cfg.admin_token else 'unset'}" if srv.auth_required else "no token (loopback only)")
            print(f"kvtier server listening on {cfg.host}:{srv.port} ({where}; {auth}; capacity "
                  f"{cfg.capacity} bytes)", flush=True)

        run(cfg, ready)
        print("kvtier server stopped", file=sys.stderr, flush=True)
