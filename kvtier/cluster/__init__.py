"""Several engine instances as one cache.

- :mod:`kvtier.cluster.index`: the controller's bounded global index (instance, tier -> chunk keys).
- :mod:`kvtier.cluster.schema`: request/response records of the HTTP API and the worker channel.
- :mod:`kvtier.cluster.controller`: ``kvtier controller`` (FastAPI app; no torch).
- :mod:`kvtier.cluster.agent`: the worker side that runs beside a :class:`~kvtier.engine.CacheEngine`.
- :mod:`kvtier.cluster.p2p`: peer-to-peer chunk transfer over the cache server protocol.

Nothing is imported here so the controller process does not load torch.
"""
