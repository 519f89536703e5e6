"""``kvtier server``: run the cache server (settings: the ``server`` config section; each key is also an
option, see :mod:`kvtier.config_cli`)."""

from __future__ import annotations

import sys

import typer

from kvtier.config import KvtierConfig
from kvtier.config_cli import config_command


def register(app: typer.Typer) -> None:
    @config_command(app, "server", ["server"])
    def server(config: KvtierConfig) -> None:
        """Run the kvtier cache server until SIGTERM / SIGINT (then finish in-flight requests and stop).
        Prefer KVTIER_SERVER__TOKEN to --token: argv is visible to other users."""
        from kvtier.server.app import CacheServer, run

        cfg = config.server

        def ready(srv: CacheServer) -> None:
            where = f"persisting to {cfg.persist_path}" if cfg.persist_path else "memory only"
            auth = (f"token required; {len(set(cfg.tenants.values()))} tenants; admin token "
                    f"{'set' if cfg.admin_token else 'unset'}" if srv.auth_required else "no token (loopback only)")
            print(f"kvtier server listening on {cfg.host}:{srv.port} ({where}; {auth}; capacity "
                  f"{cfg.capacity} bytes)", flush=True)

        run(cfg, ready)
        print("kvtier server stopped", file=sys.stderr, flush=True)
