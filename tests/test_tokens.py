"""Token minting and verification, including the cache of verified tokens."""

from __future__ import annotations

import pytest

from services import auth
from services.auth import Role, TokenAuthority
from services.errors import Unauthenticated

SECRET = b"s" * 32
OTHER = b"o" * 32


def test_verified_token_is_rejected_once_it_expires_even_when_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    authority = TokenAuthority(SECRET)
    token = authority.mint("alice", Role.USER, ttl_seconds=60)
    assert authority.verify(token).subject == "alice"  # now cached
    now = auth.time.time()
    monkeypatch.setattr(auth.time, "time", lambda: now + 61)
    with pytest.raises(Unauthenticated, match="expired"):
        authority.verify(token)


def test_cache_of_verified_tokens_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "VERIFIED_CACHE_SIZE", 3)
    authority = TokenAuthority(SECRET)
    tokens = [authority.mint(f"user{i}", Role.USER, 60) for i in range(5)]
    for token in tokens:
        authority.verify(token)
    assert len(authority._verified) == 3
    assert [authority.verify(t).subject for t in tokens] == [f"user{i}" for i in range(5)]


def test_token_of_another_secret_is_not_verified() -> None:
    token = TokenAuthority(OTHER).mint("mallory", Role.ADMIN, 60)
    with pytest.raises(Unauthenticated, match="signature"):
        TokenAuthority(SECRET).verify(token)


def test_scope_and_role_round_trip() -> None:
    authority = TokenAuthority(SECRET)
    principal = authority.verify(authority.mint("tms-1", Role.TMS, 60, scope="osg"))
    assert (principal.subject, principal.role, principal.scope) == ("tms-1", Role.TMS, "osg")
