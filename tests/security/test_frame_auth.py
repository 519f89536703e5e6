"""Authenticated chunks (issue 14): a frame another process wrote to a shared tier is used only if it
carries a valid MAC under a key of this tenant's keyring. Real disk directories and a real cache-server
process; the attacker is this test process writing to those tiers the way any client can."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash

from kvtier import wire
from kvtier.config import load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError, CorruptChunk, FrameAuthError
from kvtier.frame_auth import FrameKeys
from kvtier.frames import pack, unpack_into
from kvtier.layout import KVSpec
from kvtier.record import token_record
from kvtier.storage.disk import chunk_path
from kvtier.storage.remote import RemoteTier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from server_support import ServerProcess

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=16)
TOKENS = np.arange(1000, 1000 + 3 * SPEC.chunk_tokens, dtype=np.uint32)
SECRET = "tenant-a: 0123456789abcdef"
OTHER = "tenant-b: fedcba9876543210"


def make_engine(tiers: dict[str, Any], secret: str = SECRET, previous: tuple[str, ...] = ()) -> CacheEngine:
    cfg = load_config(environ={}, overrides={
        "chunk_tokens": SPEC.chunk_tokens, "cpu": {"capacity": "1MiB"}, **tiers,
        "auth": {"secret": secret, "previous_secrets": list(previous)},
    })
    return CacheEngine(SPEC, "auth-test", cfg)


def kv_for(seed: int) -> torch.Tensor:
    return torch.randn(SPEC.chunk_shape(len(TOKENS)), generator=torch.Generator().manual_seed(seed))


def write(tiers: dict[str, Any], secret: str = SECRET) -> tuple[torch.Tensor, list[bytes]]:
    """Store TOKENS through an engine holding ``secret``; return the KV and the chunk keys."""
    kv = kv_for(1)
    with make_engine(tiers, secret) as engine:
        assert engine.store(TOKENS, kv) == len(TOKENS)
        assert engine.storage.flush()
        _arr, chunks = engine.chunker.chunks(TOKENS)
    return kv, [c.key for c in chunks]


def read(tiers: dict[str, Any], tier: str, secret: str = SECRET,
         previous: tuple[str, ...] = ()) -> tuple[int, torch.Tensor, dict[str, Any]]:
    """Retrieve TOKENS through a fresh engine (empty CPU tier); return hit length, output, tier stats."""
    out = torch.zeros(SPEC.chunk_shape(len(TOKENS)))
    with make_engine(tiers, secret, previous) as engine:
        hit = engine.retrieve(TOKENS, out)
        stats = engine.stats()[tier]
    return hit, out, stats


def forge_payload(frame: bytes) -> bytes:
    """The frame with the attacker's payload and a recomputed checksum; header, metadata and MAC kept."""
    head, payload = wire.split(frame)
    h = wire.read_header(head)
    evil = torch.full((len(payload) // 4,), 7.0).numpy().tobytes()
    meta = bytes(head[wire.HEADER_BYTES :])
    checksum = xxhash.xxh3_64_intdigest(meta + evil)
    flags = wire.FLAG_MAC if h.key_id else 0
    header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, flags, h.meta_len, h.payload_len, checksum, h.key_id, h.mac)
    return header + meta + evil


def forge_unauthenticated(key_index: int) -> bytes:
    """What anyone who knows the prompt can write: a valid, checksummed frame without a MAC."""
    chunk = make_chunks()[key_index]
    return pack(token_record(chunk, TOKENS), torch.full(SPEC.chunk_shape(chunk.num_tokens), 7.0), SPEC)


def make_chunks() -> list[Any]:
    from kvtier.keys import Chunker, Namespace

    return Chunker(Namespace("auth-test", SPEC)).chunks(TOKENS)[1]


# ---- tiers --------------------------------------------------------------------------------------------
@pytest.fixture
def disk(tmp_path: Path) -> dict[str, Any]:
    return {"disk": {"enabled": True, "path": str(tmp_path / "disk"), "fsync": False}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path_factory.mktemp("server")) as proc:
        yield proc


@pytest.fixture
def remote(server: ServerProcess) -> Iterator[dict[str, Any]]:
    yield {"remote": {"enabled": True, "port": server.port}}
    client = RemoteTier("127.0.0.1", server.port, "", 5.0)
    client.clear()
    client.close()


def overwrite(tiers: dict[str, Any], key: bytes, make: Any) -> None:
    """Replace the stored frame of ``key`` with ``make(old_frame)``, as a client of that tier can."""
    if "disk" in tiers:
        path = chunk_path(Path(tiers["disk"]["path"]), key)
        path.write_bytes(make(path.read_bytes()))
        return
    client = RemoteTier("127.0.0.1", tiers["remote"]["port"], "", 5.0)
    try:
        old = client.get(key)
        assert old is not None
        client.put(key, make(old))  # the server checks the checksum only: it has no tenant keys
    finally:
        client.close()


TIERS = ["disk", "remote"]


@pytest.fixture(params=TIERS)
def tiers(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def tier_name(tiers: dict[str, Any]) -> str:
    return "disk" if "disk" in tiers else "remote"


# ---- tests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("forge", ["recomputed_checksum", "no_mac"])
def test_forged_frame_is_a_counted_miss(tiers: dict[str, Any], forge: str) -> None:
    kv, keys = write(tiers)
    c = SPEC.chunk_tokens
    if forge == "recomputed_checksum":
        overwrite(tiers, keys[1], forge_payload)
    else:
        overwrite(tiers, keys[1], lambda _old: forge_unauthenticated(1))
    hit, out, stats = read(tiers, tier_name(tiers))
    assert hit == c  # chunk 0 verified, the forged chunk 1 is a miss and ends the prefix
    assert torch.equal(out[:, :, :c], kv[:, :, :c])
    assert not torch.any(out[:, :, c:] == 7.0), "attacker's KV reached the engine"
    assert stats["mac_failures"] == 1 and stats.get("corrupt", 0) == 0


def test_without_a_secret_shared_tiers_trust_their_writers(disk: dict[str, Any]) -> None:
    """The documented trade-off: no auth.secret means checksum only, so a forger with the prompt wins."""
    cfg = load_config(environ={}, overrides={"chunk_tokens": SPEC.chunk_tokens, **disk})
    with CacheEngine(SPEC, "auth-test", cfg) as engine:
        engine.store(TOKENS, kv_for(1))
        assert engine.storage.flush()
        assert engine.storage.auth is None
    key = make_chunks()[0].key
    overwrite(disk, key, lambda _old: forge_unauthenticated(0))
    out = torch.zeros(SPEC.chunk_shape(len(TOKENS)))
    with CacheEngine(SPEC, "auth-test", cfg) as engine:
        assert engine.retrieve(TOKENS, out) == len(TOKENS)
    assert torch.all(out[:, :, : SPEC.chunk_tokens] == 7.0)


def test_another_tenants_frames_are_a_miss_and_stay_theirs(tiers: dict[str, Any]) -> None:
    kv, _keys = write(tiers, secret=OTHER)
    name = tier_name(tiers)
    hit, _out, stats = read(tiers, name, secret=SECRET)
    assert hit == 0 and stats["mac_failures"] == 1
    hit, out, _stats = read(tiers, name, secret=OTHER)  # not discarded: still valid for its owner
    assert hit == len(TOKENS) and torch.equal(out, kv)


def test_key_rotation_keeps_old_frames_readable_only_while_the_old_key_is_kept(disk: dict[str, Any]) -> None:
    kv, keys = write(disk, secret=OTHER)  # written before the rotation
    hit, out, _stats = read(disk, "disk", secret=SECRET, previous=(OTHER,))
    assert hit == len(TOKENS) and torch.equal(out, kv)
    hit, _out, stats = read(disk, "disk", secret=SECRET)  # old key dropped
    assert hit == 0 and stats["mac_failures"] == 1
    with make_engine(disk, SECRET, previous=(OTHER,)) as engine:  # new writes use the current key
        engine.remove(TOKENS)
        engine.store(TOKENS, kv)
        assert engine.storage.flush()
    head = chunk_path(Path(disk["disk"]["path"]), keys[0]).read_bytes()
    assert wire.read_header(head).key_id == FrameKeys(SECRET.encode()).key_id


@pytest.mark.parametrize("where", ["payload", "mac", "key_id"])
def test_flipped_byte_is_a_miss(disk: dict[str, Any], where: str) -> None:
    _kv, keys = write(disk)
    offset = {"payload": -5, "mac": wire.MAC_COVERS + 3, "key_id": wire.MAC_COVERS - 2}[where]

    def flip(frame: bytes) -> bytes:
        data = bytearray(frame)
        data[offset] ^= 0x01
        return bytes(data)

    overwrite(disk, keys[0], flip)
    hit, _out, stats = read(disk, "disk")
    assert hit == 0
    failures = stats.get("corrupt", 0) + stats.get("mac_failures", 0)
    assert failures == 1
    if where == "mac":
        assert stats["mac_failures"] == 1  # checksum still fine: only the MAC catches it


def test_frame_level_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame whose MAC verifies is not checksummed again (the MAC covers the checksum field and every
    byte it covers); one whose MAC fails is, to tell damage (CorruptChunk, discarded by the tiers) from
    another writer's frame (FrameAuthError, kept)."""
    chunk = make_chunks()[0]
    record = token_record(chunk, TOKENS)
    kv = torch.randn(SPEC.chunk_shape(chunk.num_tokens))
    keys = FrameKeys(SECRET.encode())
    frame = pack(record, kv, SPEC, auth=keys)
    out = torch.empty_like(kv)
    passes: list[int] = []
    real = wire._checksum
    monkeypatch.setattr(wire, "_checksum", lambda meta, payload: passes.append(len(payload)) or real(meta, payload))
    assert unpack_into(frame, SPEC, out, chunk.key, keys).record() == record and torch.equal(out, kv)
    assert passes == []
    unpack_into(frame, SPEC, out, chunk.key)  # a reader without keys checks the checksum only
    assert len(passes) == 1
    damaged = bytearray(frame)
    damaged[-5] ^= 0x01
    with pytest.raises(CorruptChunk, match="checksum mismatch") as caught:
        unpack_into(bytes(damaged), SPEC, out, chunk.key, keys)
    assert not isinstance(caught.value, FrameAuthError)
    wire.check_intact(frame, chunk.key)  # so does the cache server reloading its disk
    with pytest.raises(FrameAuthError, match="does not hold"):
        unpack_into(frame, SPEC, out, chunk.key, FrameKeys(OTHER.encode()))
    with pytest.raises(FrameAuthError, match="no MAC"):
        unpack_into(pack(record, kv, SPEC), SPEC, out, chunk.key, keys)


def test_secret_config(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    file_config = load_config(environ={}, overrides={"auth": {"secret_file": str(secret_file)}})
    from_file = FrameKeys.from_config(file_config.auth)
    from_env = FrameKeys.from_config(load_config(environ={"KVTIER_AUTH__SECRET": SECRET}).auth)
    assert from_file is not None and from_env is not None
    assert from_file.key_id == from_env.key_id == FrameKeys(SECRET.encode()).key_id
    assert FrameKeys.from_config(load_config(environ={}).auth) is None
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        FrameKeys.from_config(load_config(environ={}, overrides={"auth": {"secret": "short"}}).auth)
    with pytest.raises(ConfigError, match="not both"):
        FrameKeys.from_config(load_config(environ={}, overrides={
            "auth": {"secret": SECRET, "secret_file": str(secret_file)}}).auth)
    assert SECRET not in repr(load_config(environ={}, overrides={"auth": {"secret": SECRET}}))


def test_peer_frames_carry_the_engines_mac() -> None:
    """What a P2P server hands out is MAC'd with the serving engine's current key, so a fetching engine
    of the same tenant accepts it and anyone else's keyring rejects it."""
    from kvtier.cluster.p2p import frame_of
    from kvtier.storage.cpu import CpuTier

    cpu = CpuTier(SPEC, 4 * SPEC.chunk_bytes)
    record = token_record(make_chunks()[0], TOKENS)
    kv = torch.randn(SPEC.chunk_shape(record.num_tokens))

    def fill(slots: list[int]) -> int:
        cpu.arena.view(slots[0], record.num_tokens).copy_(kv)
        return 1

    assert cpu.admit([record], fill) not in ([], [None])
    keys = FrameKeys(SECRET.encode())
    frame = frame_of(cpu, record.key, keys)
    assert frame is not None and wire.read_header(frame).key_id == keys.key_id
    out = torch.empty_like(kv)
    assert unpack_into(frame, SPEC, out, record.key, keys).record() == record and torch.equal(out, kv)
    with pytest.raises(FrameAuthError):
        unpack_into(frame, SPEC, out, record.key, FrameKeys(OTHER.encode()))


def test_previous_secrets_from_the_environment() -> None:
    old = "old-secret-0123456789"
    config = load_config(environ={"KVTIER_AUTH__SECRET": SECRET,
                                  "KVTIER_AUTH__PREVIOUS_SECRETS": f'["{old}", "{OTHER}"]'})
    assert config.auth.previous_secrets == (old, OTHER)
    keys = FrameKeys.from_config(config.auth)
    assert keys is not None
    record = token_record(make_chunks()[0], TOKENS)
    kv = torch.randn(SPEC.chunk_shape(record.num_tokens))
    frame = pack(record, kv, SPEC, auth=FrameKeys(old.encode()))
    unpack_into(frame, SPEC, torch.empty_like(kv), record.key, keys)  # an old key still reads

