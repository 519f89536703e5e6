"""``kvtier router``: the KV-aware OpenAI-compatible proxy (and disaggregated-prefill proxy); settings:
the ``router`` config section and the root ``chunk_tokens`` (its prefix table's chunk size), each key also
an option (:mod:`kvtier.config_cli`)."""

from __future__ import annotations

import typer

from kvtier.config import KvtierConfig
from kvtier.config_cli import config_command


def register(app: typer.Typer) -> None:
    @config_command(app, "router", ["router", "chunk_tokens"], log_level="warning")
    def router(config: KvtierConfig) -> None:
        """Route OpenAI requests to the engine holding the longest cached prefix, until SIGTERM / SIGINT.
        Prefer the token variables to the token options: argv is visible to other users."""
        from kvtier.router.app import serve

        settings = config.router

        def ready(bound: int) -> None:
            auth = "token required" if settings.token else "no token (loopback only)"
            mode = f"{len(settings.prefill)} prefill + {len(settings.backends)} decode" if settings.prefill \
                else f"{len(settings.backends)} backends"
            print(f"kvtier router listening on http://{settings.host}:{bound} ({mode}, policy {settings.policy}; "
                  f"{auth})", flush=True)

        serve(config, ready)
