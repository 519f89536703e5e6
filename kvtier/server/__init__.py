"""The kvtier cache server (``kvtier server``) and its client tier.

- :mod:`kvtier.server.protocol`: the request/response framing shared by both sides.
- :mod:`kvtier.server.app`: the asyncio server; :mod:`kvtier.server.store`: its chunk store.
- :mod:`kvtier.server.client`: :class:`~kvtier.server.client.RemoteTier`, the synchronous client tier.

Nothing is imported here so the server process does not load torch (the client does, via the Tier base).
"""
