"""``kvtier router``: the KV-aware OpenAI-compatible proxy (and disaggregated-prefill proxy)."""

from __future__ import annotations

import logging
import os

import typer


def register(app: typer.Typer) -> None:
    @app.command("router")
    def router(
        backend: list[str] = typer.Option(  # noqa: B008 - typer's idiom
            [], "--backend", "--decode", help="URL or URL=INSTANCE_ID of an engine (a decoder with --prefill); "
                                              "repeatable. INSTANCE_ID is the id its kvtier registers with the "
                                              "controller."),
        prefill: list[str] = typer.Option(  # noqa: B008
            [], "--prefill", help="URL of a prefiller: disaggregated mode (prompt there first, max_tokens=1)."),
        host: str = typer.Option("127.0.0.1", help="Bind address; anything but loopback requires a token."),
        port: int = typer.Option(8080, help="HTTP port (0 picks a free one)."),
        token: str = typer.Option(None, help="Bearer token clients must present (prefer KVTIER_ROUTER_TOKEN)."),
        policy: str = typer.Option("kv", help="kv (longest cached prefix, then least loaded), least_loaded, "
                                              "roundrobin."),
        controller: str = typer.Option("", "--controller", help="kvtier controller URL for prefix lookups, with "
                                                                "$KVTIER_CONTROLLER_READ_TOKEN (else its admin token) "
                                                                "('' = the router's own prefix table only)."),
        lookup_timeout: float = typer.Option(0.25, help="Seconds a controller lookup may take before the "
                                                        "router's prefix table answers instead."),
        tokenizer: str = typer.Option("", help="Local tokenizer directory of the served model (text prompts "
                                               "are routed by load without one)."),
        kv_model: str = typer.Option("", help="Model id the instances report to the controller (default: the "
                                              "request's model)."),
        chunk_tokens: int = typer.Option(256, help="Chunk size of the router's own prefix table."),
        max_concurrent: int = typer.Option(256, help="Requests in flight before new ones get 429."),
        max_body_bytes: int = typer.Option(16 << 20, help="Largest request body (413 above)."),
        connect_timeout: float = typer.Option(2.0, help="Seconds to connect to a backend."),
        read_timeout: float = typer.Option(600.0, help="Seconds a backend may stay silent."),
        backend_header: bool = typer.Option(False, help="Name the chosen backend in an x-kvtier-backend response "
                                                       "header (its instance id, else decode-N / prefill-N)."),
        log_level: str = typer.Option("warning", help="Logging level: debug, info, warning, error."),
    ) -> None:
        """Route OpenAI requests to the engine holding the longest cached prefix, until SIGTERM / SIGINT."""
        from kvtier.router.app import RouterSettings, parse_backend, serve

        logging.getLogger("kvtier").setLevel(log_level.upper())
        settings = RouterSettings(
            backends=tuple(parse_backend(b) for b in backend), prefill=tuple(parse_backend(p) for p in prefill),
            host=host, port=port, token=token if token is not None else os.environ.get("KVTIER_ROUTER_TOKEN", ""),
            backend_token=os.environ.get("KVTIER_ROUTER_BACKEND_TOKEN", ""), backend_header=backend_header,
            policy=policy,  # type: ignore[arg-type]
            controller_url=controller, controller_token=os.environ.get("KVTIER_CONTROLLER_READ_TOKEN")
            or os.environ.get("KVTIER_CONTROLLER_TOKEN", ""),
            lookup_timeout_s=lookup_timeout, tokenizer=tokenizer, kv_model=kv_model, chunk_tokens=chunk_tokens,
            max_concurrent=max_concurrent, max_body_bytes=max_body_bytes, connect_timeout_s=connect_timeout,
            read_timeout_s=read_timeout,
        )

        def ready(bound: int) -> None:
            auth = "token required" if settings.token else "no token (loopback only)"
            mode = f"{len(settings.prefill)} prefill + {len(settings.backends)} decode" if settings.prefill \
                else f"{len(settings.backends)} backends"
            print(f"kvtier router listening on http://{host}:{bound} ({mode}, policy {settings.policy}; {auth})",
                  flush=True)

        serve(settings, ready)
