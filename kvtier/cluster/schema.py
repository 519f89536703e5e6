"""Records of the controller's HTTP API and of its worker channel (JSON; validated by pydantic).

Chunk keys travel as 32 lowercase hex digits. Every list has a maximum length, so a request's size and
the work it causes are bounded before any handler runs. Shared by the controller (FastAPI) and the
agent (which builds the worker-channel requests from the same models).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvtier.config import MAX_BATCH_KEYS

MAX_TOKENS = 1 << 20  # token ids in one request
MAX_KEYS = MAX_BATCH_KEYS  # keys in one event, locate request or command
MAX_SNAPSHOT_KEYS = 1 << 20  # keys of one tier in a snapshot

KeyHex = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="A 16-byte chunk key in hex.")]
InstanceId = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$", description="Instance name.")
]
TierName = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9_-]+$")]
TokenId = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_TOKENS, description="Token ids (uint32).")]
Model = Annotated[str, Field(min_length=1, max_length=512, description="Model id the instances report.")]
WaitS = Annotated[
    float, Field(ge=0.0, le=60.0, description="Seconds to wait for the operation before answering (0: don't).")
]
Session = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]
Secret = Annotated[str, Field(max_length=128, pattern=r"^([0-9a-f]{32,128})?$",
                              description="The instance's secret from its first registration ('' = none yet).")]
_ADDRESS = r"^(|[A-Za-z0-9._-]+:[0-9]{1,5}|\[[0-9A-Fa-f:.]+\]:[0-9]{1,5})$"  # '' or host:port or [v6]:port
Address = Annotated[str, Field(max_length=262, pattern=_ADDRESS)]
Snapshot = Annotated[dict[TierName, Annotated[list[KeyHex], Field(max_length=MAX_SNAPSHOT_KEYS)]],
                     Field(max_length=16)]
OpStatus = Literal["pending", "running", "done", "failed"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- worker channel --------------------------------------------------------------------------------
class RegisterRequest(_Record):
    """A worker announces itself, with the namespace its keys live in and a snapshot of its keys."""

    instance_id: InstanceId
    model: Model
    spec: str = Field(min_length=1, max_length=128, description="KVSpec.fingerprint() of the engine.")
    root: KeyHex = Field(description="Namespace root key k_0 (covers model, spec, codec, tenant).")
    chunk_tokens: int = Field(ge=1, le=1 << 20)
    partial: bool = Field(True, description="Whether a trailing partial chunk gets a key.")
    p2p_address: Address = Field("", description="host:port peers fetch chunks from ('' = none).")
    codecs: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=64)] = []
    tiers: Snapshot = {}
    replace: bool = Field(False, description="Take over the id even while another session holds it (needs the "
                                             "id's secret, like every registration of a claimed id).")
    secret: Secret = ""


class RegisterResponse(_Record):
    session: str
    secret: str = Field(description="Proof of ownership of the instance id: keep it, send it when registering again.")
    heartbeat_s: float
    ttl_s: float


class SessionRequest(_Record):
    session: Session


class Event(_Record):
    kind: Literal["admit", "evict"]
    tier: TierName
    keys: Annotated[list[KeyHex], Field(max_length=MAX_KEYS)]


class EventsRequest(_Record):
    """Events in the order they happened; ``seq`` is the previous batch's plus one."""

    session: Session
    seq: int = Field(ge=1)
    events: Annotated[list[Event], Field(max_length=4096)]


class SnapshotRequest(_Record):
    """The worker's whole state; later event batches continue from ``seq``."""

    session: Session
    seq: int = Field(ge=0)
    tiers: Snapshot


class SeqResponse(_Record):
    seq: int


class PollRequest(_Record):
    session: Session
    wait_s: float = Field(5.0, ge=0.0, le=30.0)
    max_commands: int = Field(8, ge=1, le=64)


class Command(_Record):
    id: str
    kind: Literal["clear", "pin", "unpin", "fetch", "remove", "compress", "health"]
    args: dict[str, Any] = {}


class PollResponse(_Record):
    commands: list[Command]


class ResultRequest(_Record):
    session: Session
    command_id: str = Field(min_length=1, max_length=64)
    ok: bool
    result: dict[str, Any] = {}
    error: str = Field("", max_length=4096)


class Accepted(_Record):
    accepted: bool


class LocateRequest(_Record):
    session: Session
    keys: Annotated[list[KeyHex], Field(max_length=MAX_KEYS)]


class Holder(_Record):
    instance_id: str
    address: str


class LocateResponse(_Record):
    holders: list[list[Holder]] = Field(description="Per key, the live peers holding it (never the asker).")


# ---- public API ------------------------------------------------------------------------------------
class LookupRequest(_Record):
    """Exactly one of ``token_ids`` and ``text`` (text is tokenized with the model's tokenizer)."""

    model: Model
    token_ids: TokenIds | None = None
    text: str | None = Field(None, max_length=1 << 22)

    @model_validator(mode="after")
    def _one_input(self) -> LookupRequest:
        if (self.token_ids is None) == (self.text is None):
            raise ValueError("give exactly one of token_ids and text")
        return self


class InstanceHit(_Record):
    hit_tokens: int
    hit_chunks: int


class LookupResponse(_Record):
    model: str
    num_tokens: int
    instances: dict[str, InstanceHit] = Field(description="Instances with a non-empty cached prefix.")
    best: str | None = Field(description="Instance with the longest cached prefix (None: no hit).")


class ClearRequest(_Record):
    instance_id: InstanceId
    tier: Literal["cpu", "all"] = Field("all", description="Only the CPU tier, or every tier of the instance.")
    wait_s: WaitS = 0.0


class PinRequest(_Record):
    instance_id: InstanceId
    token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKENS)]
    ttl_s: float | None = Field(None, gt=0, le=7 * 86400, description="Unpin automatically after this long.")
    wait_s: WaitS = 0.0


class UnpinRequest(_Record):
    instance_id: InstanceId
    token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKENS)]
    wait_s: WaitS = 0.0


class MoveRequest(_Record):
    """Copy chunks from ``source`` to ``destination`` (the destination pulls them from the source's peer
    server); ``token_ids`` selects a prompt's chunks, omitted means every chunk the source reported."""

    source: InstanceId
    destination: InstanceId
    token_ids: TokenIds | None = None
    copy_chunks: bool = Field(True, alias="copy", description="Keep the source's chunks (false: remove them).")
    wait_s: WaitS = 0.0

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CompressRequest(_Record):
    """Re-encode an instance's chunks with ``codec`` into its serialized tiers (disk, server, ...)."""

    instance_id: InstanceId
    codec: str = Field(min_length=1, max_length=64)
    token_ids: TokenIds | None = None
    wait_s: WaitS = 0.0


class CheckFinishRequest(_Record):
    op_id: str = Field(min_length=1, max_length=64)


class OpResponse(_Record):
    op_id: str
    kind: str
    status: OpStatus
    result: dict[str, Any] = {}
    error: str = ""
    age_s: float


class HealthRequest(_Record):
    instance_id: InstanceId
    timeout_s: float = Field(2.0, ge=0.05, le=30.0)


class InstanceHealth(_Record):
    instance_id: str
    status: Literal["ok", "timeout", "error"]
    latency_s: float
    detail: dict[str, Any] = {}


class InstanceInfo(_Record):
    instance_id: str
    model: str
    spec: str
    chunk_tokens: int
    p2p_address: str
    codecs: list[str]
    keys: dict[str, int]
    truncated: bool
    age_s: float
    last_seen_s: float


class InstancesResponse(_Record):
    instances: list[InstanceInfo]


class ControllerHealth(_Record):
    status: Literal["ok"]
    instances: int
    index_keys: int
    uptime_s: float
