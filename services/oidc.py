"""Tokens of an external OpenID Connect issuer (e.g. Keycloak), accepted beside the WMS's own.

Keys come from the issuer's JWKS (``jwks_uri`` of ``{issuer}/.well-known/openid-configuration``,
or ``EWMS_AUTH_JWKS_URL``) and are parsed by PyJWT's ``PyJWKSet``. They are fetched on first use,
off the event loop, and cached; an unknown ``kid`` (a rotated key) or keys older than
``JWKS_MAX_AGE`` trigger one new fetch, at most every ``JWKS_REFETCH_INTERVAL`` seconds, so tokens
with random key ids cannot make the WMS hammer the identity provider.

Only RS256 and ES256 are accepted; ``iss``, ``aud``, ``exp``, ``iat`` and ``nbf`` are checked with
``LEEWAY`` seconds of clock skew. Roles come from a dotted claim (Keycloak realm roles,
``realm_access.roles``, by default); see ``ROLE_NAMES``.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import jwt
import structlog

from services.auth import ANY_LOCATION, VERIFIED_CACHE_SIZE, Principal, Role
from services.config import (
    DEFAULT_AUTH_ROLE_CLAIM,
    ConfigError,
    WmsSettings,
    check_auth_settings,
    check_auth_url,
)
from services.errors import PermissionDenied, Unauthenticated

log = structlog.get_logger(__name__)

# Asymmetric only: HS256 would let anyone holding the public key sign (the key-confusion attack).
ALGORITHMS = ("RS256", "ES256")
LEEWAY = 30
# A new JWKS fetch (unknown kid, stale keys, or a failed fetch) happens at most this often.
JWKS_REFETCH_INTERVAL = 30.0
# Keys are looked up again after this long, so a key the issuer withdrew stops being accepted.
JWKS_MAX_AGE = 300.0
FETCH_TIMEOUT = 5.0
MAX_DOCUMENT_BYTES = 1024 * 1024
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]
# Role names in the role claim → our roles. ``system-tms`` is the original EWMS's name for its TMS
# (its ``ewms_role`` claim); ``pilot`` is absent on purpose: a pilot token is scoped to a taskforce,
# which only the WMS knows (it mints them at launch); an unscoped one could do nothing.
ROLE_NAMES: dict[str, Role] = {
    "admin": Role.ADMIN,
    "user": Role.USER,
    "tms": Role.TMS,
    "system-tms": Role.TMS,
}
# A token naming several roles gets the first of these it has.
ROLE_PRECEDENCE = (Role.ADMIN, Role.USER, Role.TMS)


class JwksUnavailable(Exception):
    """The issuer's discovery document or key set could not be fetched or used."""


class OidcVerifier:
    """Verifies the tokens of one OIDC issuer into principals.

    Subjects are the ``sub`` claim. TMS principals get the scope ``ANY_LOCATION``, the power of the
    original's ``system-tms``."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str = "",
        role_claim: str = DEFAULT_AUTH_ROLE_CLAIM,
        *,
        refetch_interval: float = JWKS_REFETCH_INTERVAL,
        keys_max_age: float = JWKS_MAX_AGE,
        fetch_timeout: float = FETCH_TIMEOUT,
    ) -> None:
        if not issuer:
            raise ConfigError("EWMS_AUTH_ISSUER is required for an OIDC verifier")
        check_auth_settings(issuer, audience, jwks_url, role_claim)
        self._issuer = issuer
        self._audience = audience
        self._jwks_url = jwks_url
        self._role_claim = role_claim
        self._refetch_interval = refetch_interval
        self._keys_max_age = keys_max_age
        self._fetch_timeout = fetch_timeout
        self._discovered_jwks_url = ""
        self._keys: dict[str, jwt.PyJWK] = {}
        self._loaded_at = float("-inf")
        self._attempted_at: float | None = None
        self._error: str | None = None
        self._refreshing: asyncio.Future[None] | None = None
        self._verified: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def from_settings(cls, settings: WmsSettings) -> OidcVerifier | None:
        """The verifier the settings ask for, or None when no external issuer is configured."""
        if not settings.auth_issuer:
            return None
        verifier = cls(
            settings.auth_issuer,
            settings.auth_audience,
            settings.auth_jwks_url,
            settings.auth_role_claim,
            # Read when called, not when defined: the WMS's tests lift the limit.
            refetch_interval=JWKS_REFETCH_INTERVAL,
        )
        log.info(
            "oidc issuer trusted",
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
            jwks_url=settings.auth_jwks_url or "(discovered)",
            role_claim=settings.auth_role_claim,
        )
        return verifier

    @property
    def issuer(self) -> str:
        """The ``iss`` of the tokens this verifier accepts."""
        return self._issuer

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token of this issuer: UNAUTHENTICATED if it is not valid
        (with the reason), PERMISSION_DENIED if it carries no EWMS role."""
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires:
                return principal
            del self._verified[token]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"malformed token: {exc}") from None
        alg, kid = header.get("alg"), header.get("kid")
        # Checked before any key lookup, so tokens with odd headers never cause a fetch.
        if alg not in ALGORITHMS:
            raise Unauthenticated(
                f"token algorithm {alg!r} is not accepted from {self._issuer} "
                f"(accepted: {', '.join(ALGORITHMS)})"
            )
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("token header has no 'kid' (key id)")
        key = await self._signing_key(kid)
        if key.algorithm_name != alg:
            raise Unauthenticated(
                f"token algorithm {alg} does not match its key {kid!r} ({key.algorithm_name})"
            )
        claims = self._decode(token, key)
        role = self._role(claims)
        # The original's system-tms serves every location: say so, as an unscoped one is refused.
        scope = ANY_LOCATION if role is Role.TMS else ""
        principal = Principal(subject=str(claims["sub"]), role=role, scope=scope)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (principal, float(claims["exp"]))
        return principal

    def _decode(self, token: str, key: jwt.PyJWK) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                issuer=self._issuer,
                audience=self._audience,
                leeway=LEEWAY,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired") from None
        except jwt.ImmatureSignatureError:
            msg = "token is not valid yet (its iat or nbf is in the future)"
            raise Unauthenticated(msg) from None
        except jwt.InvalidSignatureError:
            msg = f"token signature is invalid (not signed by {self._issuer})"
            raise Unauthenticated(msg) from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"token audience is not {self._audience!r}") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"token issuer is not {self._issuer!r}") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"malformed token: {exc}") from None
        if not claims["sub"]:
            raise Unauthenticated("token has an empty 'sub' claim")
        return claims

    def _role(self, claims: dict[str, Any]) -> Role:
        names = roles_in(claims, self._role_claim)
        have = {ROLE_NAMES[name] for name in names if name in ROLE_NAMES}
        for role in ROLE_PRECEDENCE:
            if role in have:
                return role
        found = ", ".join(names[:10]) or "none"
        raise PermissionDenied(
            f"token carries no EWMS role in claim {self._role_claim} (found: {found}; "
            f"accepted: {', '.join(ROLE_NAMES)})"
        )

    async def _signing_key(self, kid: str) -> jwt.PyJWK:
        key = self._keys.get(kid)
        # A stale key is still used while a fetch is in flight, rather than waiting for it.
        if key is not None and (self._fresh() or self._refreshing is not None):
            return key
        fetched = False
        if self._refreshing is not None or self._may_fetch():
            await self._refresh()
            fetched = True
            key = self._keys.get(kid)
        if key is not None:
            # Possibly stale, if the fetch failed: the issuer being down should not lock out
            # every caller at once.
            return key
        if self._error is not None:
            raise Unauthenticated(
                f"cannot fetch the signing keys of OIDC issuer {self._issuer}: {self._error}"
            )
        reason = f"token key id {kid!r} is not among the signing keys of {self._issuer}"
        if not fetched and self._attempted_at is not None:
            ago = time.monotonic() - self._attempted_at
            reason += (
                f" (looked up {ago:.0f}s ago; unknown key ids cause a new look-up at most every "
                f"{self._refetch_interval:g}s)"
            )
        raise Unauthenticated(reason)

    def _fresh(self) -> bool:
        return time.monotonic() - self._loaded_at < self._keys_max_age

    def _may_fetch(self) -> bool:
        return (
            self._attempted_at is None
            or time.monotonic() - self._attempted_at >= self._refetch_interval
        )

    async def _refresh(self) -> None:
        """Fetch the keys once, however many calls wait for them; a caller that goes away does not
        cancel the fetch the others wait on."""
        if self._refreshing is None:
            self._attempted_at = time.monotonic()
            self._refreshing = asyncio.ensure_future(self._fetch())
        refreshing = self._refreshing
        await asyncio.shield(refreshing)

    async def _fetch(self) -> None:
        try:
            url, keys = await asyncio.to_thread(
                load_keys,
                self._issuer,
                self._jwks_url or self._discovered_jwks_url,
                self._fetch_timeout,
            )
        except JwksUnavailable as exc:
            self._error = str(exc)
            self._discovered_jwks_url = ""
            log.warning("oidc keys unavailable", issuer=self._issuer, error=self._error)
            return
        finally:
            self._refreshing = None
        if not self._jwks_url:
            self._discovered_jwks_url = url
        self._keys, self._loaded_at, self._error = keys, time.monotonic(), None
        log.info("oidc keys loaded", issuer=self._issuer, jwks_url=url, kids=sorted(keys))


def roles_in(claims: dict[str, Any], path: str) -> list[str]:
    """The role names at a dotted claim path: a list of strings, or one string of
    space-separated names; anything else is no roles."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return []
        value = value.get(part)
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def load_keys(issuer: str, jwks_url: str, timeout: float) -> tuple[str, dict[str, jwt.PyJWK]]:
    """The JWKS URL (discovered if ``jwks_url`` is empty) and its RS256/ES256 signing keys by
    kid. Blocking: call it off the event loop."""
    if not jwks_url:
        discovery = issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = _get_json(discovery, timeout)
        if document.get("issuer") != issuer:
            raise JwksUnavailable(
                f"{discovery} names issuer {document.get('issuer')!r}, not {issuer!r}"
            )
        jwks_url = document.get("jwks_uri", "")
        if not isinstance(jwks_url, str) or not jwks_url:
            raise JwksUnavailable(f"{discovery} has no jwks_uri")
        try:
            check_auth_url("jwks_uri", jwks_url)
        except ConfigError as exc:
            raise JwksUnavailable(f"{discovery}: {exc}") from None
    try:
        keyset = jwt.PyJWKSet.from_dict(_get_json(jwks_url, timeout))
    except jwt.PyJWTError as exc:
        raise JwksUnavailable(f"{jwks_url}: {exc}") from None
    keys = {
        key.key_id: key
        for key in keyset
        if key.key_id and key.algorithm_name in ALGORITHMS and key.public_key_use in (None, "sig")
    }
    if not keys:
        raise JwksUnavailable(f"{jwks_url} has no RS256 or ES256 signing key with a kid")
    return jwks_url, keys


def _get_json(url: str, timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(MAX_DOCUMENT_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise JwksUnavailable(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise JwksUnavailable(f"{url}: {exc.reason}") from None
    except TimeoutError:
        raise JwksUnavailable(f"{url}: no answer within {timeout:g}s") from None
    except OSError as exc:
        raise JwksUnavailable(f"{url}: {exc}") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise JwksUnavailable(f"{url}: larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        document = json.loads(body)
    except ValueError:
        raise JwksUnavailable(f"{url}: not JSON") from None
    if not isinstance(document, dict):
        raise JwksUnavailable(f"{url}: not a JSON object")
    return document
