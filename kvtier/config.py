"""Typed configuration: defaults < YAML file < ``KVTIER_*`` environment variables < explicit overrides.

Environment: ``KVTIER_CONFIG`` names a YAML file; ``KVTIER_<KEY>`` sets a top-level key and
``KVTIER_<SECTION>__<KEY>`` a key of a section. An environment value is read as the key's type: a
string stays exactly the string given (``KVTIER_SERVER__TOKEN='abc #x'`` is ``abc #x``), numbers and
booleans are converted by the schema, lists and mappings are JSON. Every unknown key, in the file or the
environment, is an error naming the key and the nearest valid one; every bad value is an error naming
the key, the value and what is allowed.

Invariants:
- Every problem is one :class:`ConfigError` with a one-line message: unreadable, oversize (over
  :data:`MAX_FILE_BYTES`) or non-UTF-8 files, YAML syntax, a non-mapping document, unknown keys, bad
  values. Nothing else escapes :func:`load_config`.
- YAML aliases are refused (a config needs none, and they allow exponential "billion laughs" bombs).
- A secret (a key with a ``_``-separated word token, secret(s), password(s), passwd or credential(s),
  or ending in key / keys) is never echoed in an error, and URLs in echoed values lose their
  ``user:password@``; :func:`redacted` does the same for showing a whole config.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from kvtier.errors import ConfigError
from kvtier.net import is_loopback, redact_url

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_bytes(value: Any) -> int:
    """Parse ``1234``, ``"512MiB"``, ``"2GB"`` or ``"1.5 GiB"`` into a byte count."""
    if isinstance(value, bool):
        raise ValueError("expected a byte size such as 1073741824 or '1GiB'")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"expected a byte size such as 1073741824 or '1GiB', units {sorted(set(_UNITS) - {''})}")


GiB = 1024**3
MiB = 1024**2

ByteSize = Annotated[int, BeforeValidator(parse_bytes), Field(ge=0)]
Policy = Literal["lru", "lfu", "fifo", "s3fifo"]
CodecName = str  # validated against the codec registry by the tier that uses it
MAX_BATCH_KEYS = 1 << 16  # keys in one controller request (kvtier.cluster.schema.MAX_KEYS)
# Where no config sets ``chunk_tokens``: the vLLM connector chunks by the smallest multiple of vLLM's
# block size that is at least this (128 on CPU and for GPU blocks of 16-128), and the router's prefix
# table by this, so that both agree.
MIN_DEFAULT_CHUNK = 128


class _Section(BaseModel):
    """A config section: unknown keys refused, immutable, secrets masked in ``repr``."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, ("***" if value and name and is_secret(name) else value)


class CpuConfig(_Section):
    """CPU memory tier: a preallocated arena of fixed-size chunk slots."""

    capacity: ByteSize = Field(2 * GiB, description="Arena size in bytes (allocated once at start).")
    policy: Policy = Field("lru", description="Eviction policy: lru, lfu, fifo or s3fifo.")
    promote: bool = Field(
        True,
        description="Admit lower-tier hits to the CPU tier (the next retrieve of them is a CPU hit). "
        "False: a lower-tier hit is read for that retrieve only, straight into the caller's tensor where "
        "its layout allows, and the CPU tier is left as it was (no admission, no eviction), so one-off "
        "reads of a big remote cache do not flush the hot CPU set; a repeated read pays the lower tier again.",
    )


class DiskConfig(_Section):
    """Local disk tier: one checksummed file per chunk, written atomically."""

    enabled: bool = Field(False, description="Use the local disk tier.")
    path: str = Field("~/.cache/kvtier/disk", description="Directory holding the chunk files.")
    capacity: ByteSize = Field(20 * GiB, description="Byte cap of the directory; oldest chunks are evicted.")
    policy: Policy = Field("lru", description="Eviction policy when the cap is reached.")
    codec: CodecName = Field("raw", description="Codec for chunks written to disk.")
    fsync: bool = Field(True, description="fsync each file before publishing it (crash safety).")


class RemoteConfig(_Section):
    """Client of a kvtier cache server (``kvtier server``)."""

    enabled: bool = Field(False, description="Use a kvtier cache server as a tier.")
    host: str = Field("127.0.0.1", description="Server host.")
    port: int = Field(7390, ge=1, le=65535, description="Server port.")
    token: str = Field("", description="Shared secret sent to the server (required if it is not on loopback).")
    codec: CodecName = Field("raw", description="Codec for chunks sent to the server.")
    timeout_s: float = Field(2.0, gt=0, description="Per-request timeout in seconds.")
    pool_size: int = Field(4, ge=1, description="Connections kept open to the server.")
    retries: int = Field(2, ge=0, description="Retries of a failed request (with exponential backoff).")
    max_reply_bytes: ByteSize = Field(
        512 * MiB, description="Largest reply body accepted (this client's cap, whatever the server says)."
    )


class RedisConfig(_Section):
    """Redis / Valkey tier (single node, Sentinel or Cluster)."""

    enabled: bool = Field(False, description="Use Redis / Valkey as a tier.")
    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// URL of one node (or a seed node).")
    mode: Literal["single", "cluster", "sentinel"] = Field("single", description="Deployment kind.")
    sentinel_master: str = Field("mymaster", description="Master name when mode is sentinel.")
    ttl_s: int = Field(0, ge=0, description="Expiry of stored chunks in seconds; 0 keeps them.")
    codec: CodecName = Field("raw", description="Codec for chunks sent to Redis.")
    timeout_s: float = Field(2.0, gt=0, description="Socket timeout in seconds.")
    key_prefix: str = Field("kvtier:", description="Prefix of every Redis key kvtier writes (and clears).")


class FsConfig(_Section):
    """Shared-filesystem tier: a directory several kvtier processes read and write concurrently."""

    enabled: bool = Field(False, description="Use a shared directory as a tier.")
    path: str = Field("", description="Shared directory (e.g. an NFS mount).")
    codec: CodecName = Field("raw", description="Codec for chunks written to the shared directory.")
    fsync: bool = Field(True, description="fsync each file before publishing it (crash safety).")


class MooncakeConfig(_Section):
    """Mooncake Store tier (``mooncake-transfer-engine-non-cuda``): a ``mooncake_master`` plus the
    memory segments its clients (every kvtier process using it) contribute."""

    enabled: bool = Field(False, description="Use a Mooncake Store as a tier.")
    master: str = Field("127.0.0.1:50051", description="host:port of mooncake_master's RPC service.")
    metadata_server: str = Field("http://127.0.0.1:8080/metadata", description="Transfer-engine metadata URL.")
    local_hostname: str = Field("127.0.0.1", description="Address other Mooncake clients reach this one at.")
    protocol: Literal["tcp", "rdma"] = Field("tcp", description="Transfer protocol.")
    device: str = Field("", description="RDMA device names (protocol rdma only).")
    segment: ByteSize = Field(1 * GiB, description="Memory this process contributes to the store.")
    buffer: ByteSize = Field(256 * MiB, description="Client-local transfer buffer.")
    key_prefix: str = Field("kvtier:", description="Prefix of every Mooncake key kvtier writes.")
    max_frame_bytes: ByteSize = Field(256 * MiB, description="Largest frame read back (bigger is a miss).")
    codec: CodecName = Field("raw", description="Codec for chunks sent to Mooncake.")


class ServerConfig(_Section):
    """``kvtier server``: the asyncio cache server."""

    host: str = Field("127.0.0.1", description="Bind address; anything but loopback requires a token.")
    port: int = Field(7390, ge=0, le=65535, description="TCP port (0 picks a free one).")
    token: str = Field("", description="Shared secret clients must present (the default tenant).")
    admin_token: str = Field("", description="Token allowed LIST, STATS and CLEAR ('' with no tenants: any client).")
    tenants: dict[str, str] = Field({}, description="Token -> tenant name; each tenant sees only its own chunks.")
    tenant_quotas: dict[str, ByteSize] = Field(
        {}, description="Tenant name -> byte cap of its chunks (memory and persistence)."
    )
    auth_timeout_s: float = Field(
        10.0, gt=0, description="Close a connection not authenticated this long after it opened."
    )
    capacity: ByteSize = Field(4 * GiB, description="Byte cap of chunks held in memory.")
    policy: Policy = Field("lru", description="Eviction policy of the in-memory store.")
    persist_path: str = Field("", description="If set, chunks are also kept in a disk tier here.")
    max_connections: int = Field(256, ge=1, description="Connections accepted at once.")
    max_message_bytes: ByteSize = Field(256 * MiB, description="Largest frame accepted.")
    max_inflight_bytes: ByteSize = Field(
        1 * GiB, description="Bytes of requests in progress plus receive buffers kept for reuse.")
    persist_capacity: ByteSize = Field(20 * GiB, description="Byte cap of the persistence directory.")
    persist_fsync: bool = Field(True, description="fsync persisted chunks before acknowledging a put.")
    idle_timeout_s: float = Field(300.0, gt=0, description="Close a connection idle this long.")
    read_timeout_s: float = Field(30.0, gt=0, description="Close a connection stalled mid-message this long.")
    shutdown_grace_s: float = Field(10.0, ge=0, description="Time in-flight requests get on SIGTERM.")
    io_threads: int = Field(8, ge=0, description="Threads moving large bodies by plain socket calls (0: none).")


class BlendConfig(_Section):
    """CacheBlend (:mod:`kvtier.blend`): reuse separately cached segments anywhere, recompute a few tokens."""

    separator: str = Field("\n\n", description="Text whose token run separates segments ('' = no splitting).")
    recompute_ratio: float = Field(
        0.15, ge=0.0, le=1.0,
        description="Fraction of reused segment tokens recomputed (separators, query, last token: always fresh).",
    )
    check_layer: int = Field(1, ge=0, description="Layer where fresh and reused KV are compared (all tokens below).")
    metric: Literal["key", "value"] = Field("key", description="Which of K or V the deviation is measured on.")
    min_segment_tokens: int = Field(1, ge=1, description="Shorter segments are computed fresh, never cached.")
    prefix_piece: bool = Field(
        True, description="Split mode: the first piece (and its separator) is the prefix segments are computed after."
    )


class ClusterConfig(_Section):
    """Joining a controller (``kvtier controller``): the settings of the engine's cluster agent, which
    reports the engine's chunks, takes commands and, with ``p2p``, serves chunks to peers and fetches
    missing ones from them."""

    enabled: bool = Field(False, description="Register this engine with a controller.")
    controller_url: str = Field("http://127.0.0.1:9000", description="Base URL of the controller.")
    instance_id: str = Field("", max_length=128, pattern=r"^[A-Za-z0-9._:-]*$",
                             description="Name of this engine in the cluster ('' = host:pid).")
    token: str = Field("", description="Controller bearer token; also guards the P2P server.")
    replace: bool = Field(False, description="Take over the instance id from a live session.")
    p2p: bool = Field(True, description="Serve chunks to peers and fetch missing chunks from them.")
    p2p_host: str = Field("127.0.0.1", description="Bind address of the P2P server.")
    p2p_port: int = Field(0, ge=0, le=65535, description="P2P server port (0: a free one).")
    advertise_host: str = Field("", description="Address peers dial (default p2p_host; required for 0.0.0.0).")
    request_timeout_s: float = Field(2.0, gt=0, description="Timeout of one controller request.")
    peer_timeout_s: float = Field(1.0, gt=0, description="Timeout of one peer request.")
    locate_timeout_s: float = Field(
        0.5, gt=0, description="Timeout of asking the controller who holds chunks (on the engine's lookup path)."
    )
    flush_interval_s: float = Field(0.05, gt=0, description="Longest time an event waits before it is sent.")
    poll_wait_s: float = Field(5.0, gt=0, le=30, description="Long-poll duration for commands.")
    event_queue: int = Field(1 << 16, ge=16, description="Events buffered before the agent falls back to a snapshot.")
    batch_max: int = Field(4096, ge=1, le=MAX_BATCH_KEYS, description="Events per batch.")
    command_threads: int = Field(2, ge=1, le=16, description="Commands run at once.")


class ControllerConfig(_Section):
    """``kvtier controller``: the cluster's global index and command channel (HTTP API)."""

    host: str = Field("127.0.0.1", description="Bind address; anything but loopback requires a token.")
    port: int = Field(9000, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    token: str = Field("", description="Admin bearer token: every route. Without worker_token, workers present "
                                       "this one too.")
    worker_token: str = Field("", description="Token of the worker channel only: register, heartbeat, events.")
    read_token: str = Field("", description="Token of lookups, instances, operation status and metrics only, e.g. "
                                            "for routers.")
    ttl_s: float = Field(10.0, gt=0, description="Drop a worker silent for this many seconds.")
    claim_ttl_s: float = Field(
        60.0, gt=0, description="Seconds an expired instance's id stays reserved for the registration that owned it."
    )
    heartbeat_s: float = Field(0.0, ge=0, description="Heartbeat interval advised to workers (0: ttl_s / 5).")
    command_timeout_s: float = Field(30.0, gt=0, description="Seconds a worker gets to answer a command.")
    max_instances: int = Field(1024, ge=1, description="Instances registered at once.")
    max_keys_per_instance: int = Field(1 << 20, ge=1, description="Index cap per instance (keys).")
    max_keys_total: int = Field(1 << 24, ge=1, description="Index cap over all instances (keys).")
    max_ops: int = Field(1024, ge=1, description="Operations (moves, clears, ...) remembered for status queries.")
    max_body_bytes: ByteSize = Field(64 * MiB, description="Largest request body (413 above, before it is read).")
    command_queue: int = Field(64, ge=1, description="Commands queued per worker.")
    tokenizers: dict[str, str] = Field(
        {}, description="Model -> tokenizer.json, its directory or a locally cached model id, for text lookups; "
                        "only these models' text is tokenized."
    )

    @property
    def heartbeat(self) -> float:
        """The heartbeat interval advised to workers (``heartbeat_s``, or ``ttl_s / 5`` when 0)."""
        return self.heartbeat_s or self.ttl_s / 5

    def check(self) -> None:
        """Raise :class:`ConfigError` on unsafe or inconsistent settings (at start: a token may come
        from the controller's own environment only)."""
        if not self.token and not is_loopback(self.host):
            raise ConfigError(
                f"controller host {self.host!r} is not a loopback address; set a token (--token or "
                "KVTIER_CONTROLLER_TOKEN) so clients must authenticate, or bind 127.0.0.1"
            )
        if (self.worker_token or self.read_token) and not self.token:
            raise ConfigError("a worker or read token is set but no admin token: set --token (or "
                              "KVTIER_CONTROLLER_TOKEN) too, or every admin route would be open")
        given = [t for t in (self.token, self.worker_token, self.read_token) if t]
        if len(set(given)) != len(given):
            raise ConfigError("the admin, worker and read tokens must differ (equal tokens grant equal rights)")
        if not self.heartbeat < self.ttl_s:
            raise ConfigError(f"controller.heartbeat_s ({self.heartbeat_s}) must be below controller.ttl_s "
                              f"({self.ttl_s})")


RoutingPolicy = Literal["kv", "least_loaded", "roundrobin"]


def parse_backend(spec: Any) -> Any:
    """``"URL"`` or ``"URL=INSTANCE_ID"`` (the id the backend's kvtier registers with the controller) ->
    ``(url, instance_id)``; other values pass through to validation."""
    if not isinstance(spec, str):
        return spec
    url, sep, instance = spec.rpartition("=")
    if not sep:
        url, instance = spec, ""
    if not url or (sep and not instance):
        raise ValueError(f"a backend is URL or URL=INSTANCE_ID, got {redact_url(spec)!r}")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"backend URL {redact_url(url)!r} must start with http:// or https://")
    return url.rstrip("/"), instance


BackendSpec = Annotated[tuple[str, str], BeforeValidator(parse_backend)]


class RouterConfig(_Section):
    """``kvtier router``: the KV-aware OpenAI-compatible proxy (and disaggregated-prefill proxy). Its own
    prefix table chunks prompts by the root ``chunk_tokens`` when the config sets it, else by 128
    tokens, the chunk of a vLLM engine whose config does not set it."""

    backends: tuple[BackendSpec, ...] = Field(
        (), description="Engines as URL or URL=INSTANCE_ID (decoders with prefill); INSTANCE_ID is the id its "
                        "kvtier registers with the controller."
    )
    prefill: tuple[BackendSpec, ...] = Field(
        (), description="Prefillers (URL or URL=INSTANCE_ID): disaggregated mode (prompt there first, max_tokens=1)."
    )
    host: str = Field("127.0.0.1", description="Bind address; anything but loopback requires a token.")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    token: str = Field("", description="Bearer token clients must present.")
    backend_token: str = Field("", description="Bearer token sent to the backends (e.g. vLLM's --api-key).")
    backend_header: bool = Field(False, description="Name the chosen backend in an x-kvtier-backend response header "
                                                    "(its instance id, else decode-N / prefill-N).")
    policy: RoutingPolicy = Field("kv", description="kv (longest cached prefix, then least loaded), least_loaded, "
                                                    "roundrobin.")
    controller_url: str = Field("", description="kvtier controller URL for prefix lookups ('' = the router's own "
                                                "prefix table only).")
    controller_token: str = Field("", description="Token of controller lookups.")
    lookup_timeout_s: float = Field(
        0.25, gt=0, description="Seconds a controller lookup may take before the router's prefix table answers instead."
    )
    controller_backoff_s: float = Field(5.0, gt=0, description="Seconds the controller is skipped after it failed.")
    tokenizer: str = Field("", description="Local tokenizer directory of the served model (text prompts are routed "
                                           "by load without one).")
    kv_model: str = Field("", description="Model id the instances report to the controller ('' = the request's "
                                          "model).")
    table_size: int = Field(1 << 18, ge=1, description="Chunk keys kept in the router's own prefix table.")
    max_concurrent: int = Field(256, ge=1, description="Requests in flight before new ones get 429.")
    max_body_bytes: ByteSize = Field(16 * MiB, description="Largest request body (413 above).")
    connect_timeout_s: float = Field(2.0, gt=0, description="Seconds to connect to a backend.")
    read_timeout_s: float = Field(600.0, gt=0, description="Seconds a backend may stay silent.")
    backoff_s: float = Field(1.0, gt=0, description="First pause of a failed backend (doubles per failure).")
    max_backoff_s: float = Field(30.0, gt=0, description="Longest pause of a failed backend.")

    def check(self) -> None:
        """Raise :class:`ConfigError` on unsafe or inconsistent settings (at start: a token may come
        from the router's own environment only)."""
        if not self.token and not is_loopback(self.host):
            raise ConfigError(f"router host {self.host!r} is not a loopback address; set a token (--token or "
                              "KVTIER_ROUTER_TOKEN) so clients must authenticate, or bind 127.0.0.1")
        if not self.backends:
            raise ConfigError("the router needs at least one backend (--backend or router.backends; a decoder in "
                              "disaggregated mode)")
        urls = [url for url, _ in (*self.backends, *self.prefill)]
        if len(set(urls)) != len(urls):
            raise ConfigError(f"a backend URL is given twice: {[redact_url(u) for u in urls]}")


class EventsConfig(_Section):
    """KV events (:mod:`kvtier.events`): what the engine stores and evicts, published as vLLM KV-event
    batches over ZMQ (vLLM: also enabled by ``kv_connector_extra_config.kvtier_events``, a mapping of
    these keys)."""

    enabled: bool = Field(False, description="Publish the engine's stores and evictions as KV events.")
    endpoint: str = Field("tcp://127.0.0.1:5567", description="ZMQ PUB endpoint events are published on.")
    replay_endpoint: str = Field("", description="ZMQ ROUTER endpoint answering replay requests ('' = none).")
    topic: str = Field("kvtier", description="Topic of every message.")
    buffer_steps: int = Field(10_000, ge=1, description="Batches kept for replay.")
    max_queue: int = Field(10_000, ge=1, description="Batches queued before new ones are dropped (counted).")
    allow_remote: bool = Field(False, description="Accept endpoints other than loopback / ipc / inproc (ZMQ has "
                                                  "no authentication: only behind a network boundary).")
    max_chunks: int = Field(65_536, ge=1, description="Chunk descriptions kept to name evicted blocks.")


def _comma_list(value: Any) -> Any:
    """A ``KVTIER_*`` value arrives as one string: ``"a,b"`` -> ``("a", "b")``."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class AuthConfig(_Section):
    """Authenticated chunks (:mod:`kvtier.frame_auth`): a per-tenant secret that MACs every frame this
    process writes to a lower tier and is required on every frame it reads from one."""

    secret: str = Field("", description="Tenant secret (>= 16 bytes; '' = frames carry only a checksum).")
    secret_file: str = Field("", description="File holding the tenant secret (instead of auth.secret).")
    previous_secrets: Annotated[tuple[str, ...], BeforeValidator(_comma_list)] = Field(
        (), description="Retired secrets still accepted for reading (key rotation; a JSON list in env)."
    )


class KvtierConfig(_Section):
    """Everything kvtier can be told. Section classes document their own keys."""

    chunk_tokens: int = Field(256, ge=1, le=1 << 20, description="Tokens per chunk (the unit of storage).")
    tenant: str = Field("", description="Salt mixed into every key: caches with different tenants never share.")
    save_partial_chunks: bool = Field(True, description="Store a trailing chunk shorter than chunk_tokens.")
    store_queue: int = Field(64, ge=1, description="Chunks queued for lower tiers before writes are dropped.")
    cpu: CpuConfig = Field(default_factory=CpuConfig)
    disk: DiskConfig = Field(default_factory=DiskConfig)
    remote: RemoteConfig = Field(default_factory=RemoteConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    fs: FsConfig = Field(default_factory=FsConfig)
    mooncake: MooncakeConfig = Field(default_factory=MooncakeConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    blend: BlendConfig = Field(default_factory=BlendConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)


def _section_fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(path: tuple[str | int, ...]) -> type[BaseModel]:
    model: type[BaseModel] = KvtierConfig
    for part in path:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            break
    return model


MAX_FILE_BYTES = 1 << 20
_SECRET_NAME = re.compile(r"(^|_)(token|secrets?|passwords?|passwd|credentials?)($|_)|(^|_)keys?$", re.IGNORECASE)


def is_secret(name: str | int) -> bool:
    return isinstance(name, str) and bool(_SECRET_NAME.search(name))


def _shown(name: str | int, value: Any) -> Any:
    """``value`` of key ``name`` as it may appear in an error: secrets masked, URL credentials removed."""
    if is_secret(name):
        return "<redacted>"
    if isinstance(value, Mapping):
        return {k: _shown(k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shown(name, v) for v in value]
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


def redacted(cfg: KvtierConfig) -> dict[str, Any]:
    """The config as a plain mapping with every secret masked (what ``kvtier config show`` prints)."""
    shown: dict[str, Any] = _shown("", cfg.model_dump())
    return shown


def _explain(err: ValidationError) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            valid = _section_fields(_model_at(loc[:-1]))
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            lines.append(f"unknown config key {key!r}{hint} valid keys here: {', '.join(valid)}")
        else:
            value = _shown(loc[-1] if loc else "", e.get("input"))
            lines.append(f"bad value for config key {key!r}: {value!r}: {e['msg']}")
    return ConfigError("; ".join(line.replace("\n", " ") for line in lines))


# Token variables deployments set once per host or pod (deploy/, docs/deployment.md): each is the
# fallback of the keys listed, used only where the file, KVTIER_<SECTION>__<KEY> and the overrides leave
# the key unset. A key with several names takes the first one set.
TOKEN_ENV: dict[str, tuple[str, ...]] = {
    "controller.token": ("KVTIER_CONTROLLER_TOKEN",),
    "controller.worker_token": ("KVTIER_CONTROLLER_WORKER_TOKEN",),
    "controller.read_token": ("KVTIER_CONTROLLER_READ_TOKEN",),
    "cluster.token": ("KVTIER_CONTROLLER_TOKEN",),
    "router.token": ("KVTIER_ROUTER_TOKEN",),
    "router.backend_token": ("KVTIER_ROUTER_BACKEND_TOKEN",),
    "router.controller_token": ("KVTIER_CONTROLLER_READ_TOKEN", "KVTIER_CONTROLLER_TOKEN"),
}

# KVTIER_* variables that are not config keys (the token fallbacks above; the rest read elsewhere,
# KVTIER_HF_PYTHON by the cross-engine test); every other KVTIER_* name must be one.
RESERVED_ENV = frozenset({name for names in TOKEN_ENV.values() for name in names}) | frozenset({
    "KVTIER_CONFIG", "KVTIER_HOME", "KVTIER_LOG_LEVEL", "KVTIER_SKIP_VLLM", "KVTIER_SKIP_SGLANG", "KVTIER_HF_PYTHON",
    "KVTIER_PROTOCOL_FD"})


def _field_at(parts: list[str]) -> FieldInfo | None:
    """The schema field a ``KVTIER_A__B`` path names (None: no such key; validation reports it)."""
    model: type[BaseModel] = KvtierConfig
    found: FieldInfo | None = None
    for part in parts:
        if found is not None:
            ann = found.annotation
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return None
            model = ann
        found = model.model_fields.get(part)
        if found is None:
            return None
    return found


def _structured(ann: Any) -> bool:
    """Whether a value of type ``ann`` (or of one member of a union) is a list or mapping."""
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_structured(arg) for arg in typing.get_args(ann))
    return origin in (list, dict, tuple, set, frozenset) or ann in (list, dict, tuple, set, frozenset)


def _env_value(name: str, parts: list[str], raw: str) -> Any:
    """``raw`` as the value of the key it names: the string itself, or JSON for lists and mappings."""
    field = _field_at(parts)
    if field is None:
        return raw
    ann = field.annotation
    key = ".".join(parts)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        raise ConfigError(f"environment variable {name} names the section {key!r}, not a key: set "
                          f"{name}__<KEY> (keys: {', '.join(_section_fields(ann))})")
    if _structured(ann):
        try:
            return json.loads(raw)
        except ValueError as exc:
            shown = "<redacted>" if is_secret(parts[-1]) else repr(raw)
            raise ConfigError(f"environment variable {name} (config key {key!r}) must be JSON, got {shown}: "
                              f"{exc}") from None
    return raw


def fallback_note(key: str) -> str:
    """`` Unset: `$NAME`.`` for a key of :data:`TOKEN_ENV` (what docs and ``--help`` add), else ``''``."""
    names = TOKEN_ENV.get(key)
    return f" Unset: {' else '.join(f'`${n}`' for n in names)}." if names else ""


def _token_fallbacks(environ: Mapping[str, str]) -> dict[str, Any]:
    """The keys of :data:`TOKEN_ENV` whose variables are set, as a nested mapping."""
    out: dict[str, dict[str, Any]] = {}
    for key, names in TOKEN_ENV.items():
        value = next((environ[n] for n in names if environ.get(n)), None)
        if value is not None:
            section, name = key.split(".")
            out.setdefault(section, {})[name] = value
    return out


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith("KVTIER_") or name in RESERVED_ENV:
            continue
        parts = name[len("KVTIER_") :].lower().split("__")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with another KVTIER_ variable")
        node[parts[-1]] = _env_value(name, parts, raw)
    return out


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed",
                                              event.start_mark)
        return super().compose_node(parent, index)


def _read_file(file: str | Path) -> dict[str, Any]:
    """The mapping in YAML file ``file``; any problem is one ConfigError line."""
    where = Path(file).expanduser()
    try:
        with where.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"config file {file} is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {file} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                          f"{exc.start})") from None
    try:
        loaded = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader without aliases
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or type(exc).__name__
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {file} is not valid YAML: {problem}{at}".replace("\n", " ")) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {file} must hold a mapping, got {type(loaded).__name__}")
    bad = [k for k in (loaded or {}) if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config file {file}: keys must be strings, got {bad[0]!r}")
    return loaded or {}


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> KvtierConfig:
    """Build the effective config; raise :class:`ConfigError` on any unknown key or bad value."""
    env = os.environ if environ is None else environ
    data = _token_fallbacks(env)
    file = path or env.get("KVTIER_CONFIG")
    if file:
        data = _merge(data, _read_file(file))
    data = _merge(data, _env_overrides(env))
    return _validated(_merge(data, overrides or {}))


def with_overrides(cfg: KvtierConfig, overrides: Mapping[str, Any]) -> KvtierConfig:
    """``cfg`` with ``overrides`` (a nested mapping) applied and validated like :func:`load_config`'s."""
    return _validated(_merge(cfg.model_dump(exclude_unset=True), overrides))


def _validated(data: dict[str, Any]) -> KvtierConfig:
    try:
        return KvtierConfig.model_validate(data)
    except ValidationError as err:
        raise _explain(err) from None


def _show_default(field: FieldInfo) -> str:
    is_size = any(getattr(m, "func", None) is parse_bytes for m in field.metadata)
    value = field.default
    if is_size and isinstance(value, int) and value:
        for unit, size in (("GiB", GiB), ("MiB", MiB)):
            if value % size == 0:
                return f"{value // size}{unit}"
    return repr(value)


def config_reference() -> str:
    """Markdown table of every key, its type, default and doc (kept in README by a test)."""
    rows = ["| key | default | description |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            rows.append(f"| `{prefix}{name}` | `{_show_default(field)}` | {field.description or ''}"
                        f"{fallback_note(prefix + name)} |")

    walk(KvtierConfig, "")
    return "\n".join(rows)
