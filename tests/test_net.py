"""kvtier.net: loopback checks, bearer parsing, constant-time token roles, URL redaction."""

from __future__ import annotations

import pytest

from kvtier.net import BearerAuth, bearer, is_loopback, redact_url, token_matches


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    for host in ("", "0.0.0.0", "10.1.2.3", "no-such-host.invalid"):
        assert not is_loopback(host), host


def test_bearer_header_parsing() -> None:
    assert bearer("Bearer abc") == "abc" and bearer(b"bearer  abc ") == "abc"
    for header in (None, "", "Bearer", "Bearer   ", "Basic abc", "abc"):
        assert bearer(header) is None, header


def test_token_roles() -> None:
    assert not token_matches("", "") and not token_matches("x", "") and token_matches(b"x", "x")
    auth = BearerAuth({"admin": frozenset({"admin", "read"}), "reader": frozenset({"read"}), "": frozenset({"x"})})
    assert not auth.open and BearerAuth({"": frozenset({"x"})}).open
    assert auth.roles("admin") == {"admin", "read"} and auth.roles("reader") == {"read"}
    assert auth.roles("") == frozenset() and auth.roles("admi") == frozenset()


@pytest.mark.parametrize(("url", "shown"), [
    ("http://user:pw@10.0.0.1:8000/v1", "http://***@10.0.0.1:8000/v1"),
    ("https://token@host", "https://***@host"),
    ("http://host:1/a?b=c", "http://host:1/a?b=c"),
    ("redis://:pw@h:6379/0", "redis://***@h:6379/0"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
