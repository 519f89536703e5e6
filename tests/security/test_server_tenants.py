"""Tenants on one cache server: each token is a namespace; another tenant's keys are neither listed
nor readable nor deletable, LIST/STATS/CLEAR need the admin token, quotas cap a tenant's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from server_attack import ServerProcess, hello, make_frames, read_reply, request

from kvtier.errors import TierUnavailable
from kvtier.storage import remote_protocol as P
from kvtier.storage.remote import RemoteTier

pytestmark = pytest.mark.slow

TENANTS = {"tenants": {"tok-a": "alpha", "tok-b": "beta"}, "admin_token": "tok-admin"}


def _config(tmp_path: Path, **server: object) -> dict[str, str]:
    """Environment naming a YAML config file with these ``server`` settings (JSON is valid YAML)."""
    path = tmp_path / "kvtier.yaml"
    path.write_text(json.dumps({"server": {**TENANTS, **server}}))
    return {"KVTIER_CONFIG": str(path)}


def _tier(srv: ServerProcess, token: str) -> RemoteTier:
    return RemoteTier("127.0.0.1", srv.port, token, timeout_s=10.0, pool_size=1, retries=0)


def test_other_tenants_keys_are_unreadable_and_unlisted(tmp_path: Path) -> None:
    frames = make_frames(6, seed=31)
    keys = [k for k, _f in frames]
    with ServerProcess(tmp_path, env=_config(tmp_path), persist=tmp_path / "persist") as srv:
        alpha, beta, admin = _tier(srv, "tok-a"), _tier(srv, "tok-b"), _tier(srv, "tok-admin")
        try:
            alpha.put_many([(k, (f,)) for k, f in frames])
            assert alpha.get_many(keys) == [f for _k, f in frames]
            assert beta.get_many(keys) == [None] * len(keys)  # same key, other tenant: a miss
            assert beta.get(keys[0]) is None and beta.exists(keys) == [False] * len(keys)
            assert beta.delete_many(keys) == [False] * len(keys)
            for tier in (alpha, beta):
                with pytest.raises(TierUnavailable, match="FORBIDDEN"):
                    tier.list_keys()
                with pytest.raises(TierUnavailable, match="FORBIDDEN"):
                    tier.server_stats()
                with pytest.raises(TierUnavailable, match="FORBIDDEN"):
                    tier.clear()
            assert alpha.get_many(keys) == [f for _k, f in frames]  # refusals left the tier usable
            assert admin.list_keys(tenant="alpha") == sorted(keys)
            assert admin.list_keys(tenant="beta") == [] and admin.list_keys() == []
            beta.put(*frames[0])  # beta's own copy does not touch alpha's
            assert beta.get(keys[0]) == frames[0][1] and alpha.delete(keys[0])
            assert beta.get(keys[0]) == frames[0][1]
        finally:
            for tier in (alpha, beta, admin):
                tier.close()
        with srv.connect() as sock:  # a raw LIST naming another tenant, from a tenant: refused too
            body = P.ListRequest(tenant="alpha")
            sock.sendall(hello("tok-b") + request(P.Op.LIST, 2, msgspec.msgpack.encode(body)))
            assert read_reply(sock)[0].status == P.Status.OK
            assert read_reply(sock)[0].status == P.Status.FORBIDDEN


def test_tenant_quota_caps_its_bytes_and_spares_others(tmp_path: Path) -> None:
    frames = make_frames(8, seed=32)
    size = len(frames[0][1])
    with ServerProcess(tmp_path, env=_config(tmp_path, tenant_quotas={"beta": 3 * (size + 200)})) as srv:
        alpha, beta = _tier(srv, "tok-a"), _tier(srv, "tok-b")
        try:
            alpha.put_many([(k, (f,)) for k, f in frames])
            beta.put_many([(k, (f,)) for k, f in frames])
            assert alpha.exists([k for k, _f in frames]) == [True] * 8
            held = beta.exists([k for k, _f in frames])
            assert sum(held) == 3 and held[-3:] == [True] * 3  # its own oldest were evicted
        finally:
            alpha.close()
            beta.close()
