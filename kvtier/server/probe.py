"""``python -m kvtier.server.probe``: a health probe for the cache server (Docker HEALTHCHECK, Kubernetes
exec probe). The server speaks only its binary protocol, so "healthy" means: a connection is accepted,
the HELLO handshake passes with the token, and one PING is answered, all within ``--timeout`` seconds.

Token: ``--token`` or, by default, ``$KVTIER_SERVER__TOKEN`` (the variable the server itself reads), so
a probe running in the server's container needs no extra setting. Exit status 0 when healthy, 1 with
one line on stderr naming the address and the failure otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

from kvtier.storage.remote import RemoteTier


def probe(host: str, port: int, token: str, timeout_s: float) -> float:
    """Round-trip seconds of one PING; raises (``KvtierError`` / ``OSError``) when the server is not healthy."""
    tier = RemoteTier(host, port, token, timeout_s, pool_size=1, retries=0)
    try:
        return tier.ping()
    finally:
        tier.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtier.server.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7390)
    parser.add_argument("--token", default=None, help="default: $KVTIER_SERVER__TOKEN")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    token = args.token if args.token is not None else os.environ.get("KVTIER_SERVER__TOKEN", "")
    try:
        seconds = probe(args.host, args.port, token, args.timeout)
    except Exception as exc:
        print(f"kvtier server {args.host}:{args.port} unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"kvtier server {args.host}:{args.port} ok ({seconds * 1000:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
