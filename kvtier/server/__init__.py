"""The kvtier cache server (``kvtier server``).

- :mod:`kvtier.server.app`: the asyncio server; :mod:`kvtier.server.store`: its chunk store.
- Its protocol is :mod:`kvtier.storage.remote_protocol`, shared with the client tier
  :class:`~kvtier.storage.remote.RemoteTier` (:mod:`kvtier.storage.remote`).

Nothing is imported here so the server process does not load torch.
"""
