"""Bearer tokens: HS256 JWTs signed with the WMS's secret, carrying a subject and one role.

Roles: ``user`` (owns workflows), ``tms`` (a task management service, scoped to a cluster location),
``pilot`` (scoped to one taskforce), ``admin`` (everything). A tms or pilot token without its scope
is refused: it would otherwise act for every location (``ANY_LOCATION`` says that explicitly, for
the OIDC issuer's ``system-tms``). The WMS creates its signing secret and an admin token in its
data directory on first start (mode 0600); ``ewms token create`` mints more. With
``EWMS_AUTH_ISSUER`` set, the tokens of that OIDC issuer are accepted too (``services.oidc``).
"""

from __future__ import annotations

import contextvars
import enum
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import jwt

from services.errors import PermissionDenied, Unauthenticated
from services.private_files import PRIVATE_FILE, private_dir, tighten, write_private

ISSUER = "ewms"
SECRET_FILE = "secret.key"
ADMIN_TOKEN_FILE = "admin.token"
ADMIN_TOKEN_TTL = 365 * 24 * 3600
# Verified tokens kept so a client's repeated calls skip the HMAC and JSON work (~75 µs a call);
# expiry is still checked on every call.
VERIFIED_CACHE_SIZE = 4096
# The scope of a tms principal that may serve every cluster location (the original's system-tms).
ANY_LOCATION = "*"


class Role(enum.StrEnum):
    """What a token's holder may do."""

    USER = "user"
    TMS = "tms"
    PILOT = "pilot"
    ADMIN = "admin"


# What the scope of each scoped role names; a principal of one of these roles without a scope is
# refused (``require_scope``).
SCOPES = {Role.TMS: "cluster location", Role.PILOT: "taskforce"}


@dataclass(frozen=True)
class Principal:
    """The verified caller of an RPC."""

    subject: str
    role: Role
    # Scope of tms and pilot tokens: a cluster location, or a taskforce.
    scope: str = ""

    @property
    def is_admin(self) -> bool:
        """Whether the caller may see and act on everything."""
        return self.role is Role.ADMIN


_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("ewms_principal")


def current_principal() -> Principal:
    """The caller of the RPC being served (set by the WMS's auth interceptor)."""
    try:
        return _current.get()
    except LookupError:
        raise Unauthenticated("no authenticated caller") from None


def set_current_principal(principal: Principal) -> None:
    """Bind the caller to the running RPC's context."""
    _current.set(principal)


def require_scope(principal: Principal) -> None:
    """PERMISSION_DENIED if a tms or pilot principal names no scope: it must say which location
    or taskforce it acts for."""
    what = SCOPES.get(principal.role)
    if what is not None and not principal.scope:
        raise PermissionDenied(
            f"this {principal.role.value!r} token names no {what} (its scope), so it may act for "
            f"none; mint one with: ewms token create --role {principal.role.value} --scope <{what}>"
        )


def require_role(principal: Principal, *roles: Role) -> None:
    """PERMISSION_DENIED unless the caller has one of these roles (admins always pass)."""
    if principal.role not in roles and not principal.is_admin:
        allowed = ", ".join(r.value for r in roles)
        raise PermissionDenied(f"role {principal.role.value!r} may not do this (needs: {allowed})")


class ExternalVerifier(Protocol):
    """Verifies the tokens of one external issuer (``services.oidc.OidcVerifier``)."""

    @property
    def issuer(self) -> str:
        """The ``iss`` of the tokens it verifies."""
        ...

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token; UNAUTHENTICATED or PERMISSION_DENIED otherwise."""
        ...


class TokenAuthority:
    """Mints and verifies tokens with one secret; with ``external``, also accepts the tokens of an
    external issuer (an OIDC identity provider) through ``verify_any``."""

    def __init__(self, secret: bytes, external: ExternalVerifier | None = None) -> None:
        self._secret = secret
        self._verified: dict[str, tuple[Principal, float]] = {}
        self.external = external

    async def verify_any(self, token: str) -> Principal:
        """The principal of a valid token of this WMS or of the external issuer, chosen by the
        token's (unverified) ``iss``; UNAUTHENTICATED or PERMISSION_DENIED otherwise."""
        if self.external is None or token in self._verified:
            return self.verify(token)
        issuer = _unverified_issuer(token)
        if issuer == self.external.issuer:
            return await self.external.verify(token)
        if issuer != ISSUER:
            raise Unauthenticated(
                f"token issuer {issuer!r} is not trusted "
                f"(accepted: {ISSUER!r}, {self.external.issuer!r})"
            )
        return self.verify(token)

    def mint(self, subject: str, role: Role, ttl_seconds: int, scope: str = "") -> str:
        """A signed token for ``subject`` with ``role``, valid for ``ttl_seconds``."""
        if not subject:
            raise ValueError("subject must not be empty")
        if ttl_seconds < 1:
            raise ValueError("ttl must be at least one second")
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": ISSUER,
            "sub": subject,
            "role": role.value,
            "iat": now,
            "exp": now + ttl_seconds,
        }
        if scope:
            claims["scope"] = scope
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify(self, token: str) -> Principal:
        """The principal of a valid token; UNAUTHENTICATED with the reason otherwise."""
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires:
                return principal
            del self._verified[token]
            raise Unauthenticated("token has expired")
        principal, expires = self._decode(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (principal, expires)
        return principal

    def _decode(self, token: str) -> tuple[Principal, float]:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                issuer=ISSUER,
                options={"require": ["exp", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("token signature is invalid (not signed by this WMS)") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"token issuer is not {ISSUER!r}") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"malformed token: {exc}") from None
        try:
            role = Role(claims.get("role", ""))
        except ValueError:
            raise Unauthenticated(f"token has unknown role {claims.get('role')!r}") from None
        principal = Principal(
            subject=str(claims["sub"]), role=role, scope=str(claims.get("scope", ""))
        )
        return principal, float(claims["exp"])


def _unverified_issuer(token: str) -> str | None:
    """The ``iss`` a token claims, read without checking anything: it only picks the verifier."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise Unauthenticated(f"malformed token: {exc}") from None
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) else None


def load_or_create_secret(data_dir: Path) -> bytes:
    """The signing secret in ``data_dir``, created (0600) if missing; the directory is made
    private (0700), and both are tightened if found looser."""
    private_dir(data_dir)
    path = data_dir / SECRET_FILE
    if path.exists():
        tighten(path, PRIVATE_FILE)
    else:
        write_private(path, secrets.token_hex(32) + "\n")
    return path.read_text().strip().encode()


def ensure_admin_token(data_dir: Path, authority: TokenAuthority) -> Path:
    """Make sure ``data_dir`` holds a valid admin token (0600); (re)write it if missing, expired or
    signed with another secret. Returns its path."""
    path = data_dir / ADMIN_TOKEN_FILE
    if path.exists():
        tighten(path, PRIVATE_FILE)
        try:
            principal = authority.verify(path.read_text().strip())
            if principal.is_admin:
                return path
        except Unauthenticated:
            pass
    write_private(path, authority.mint("admin", Role.ADMIN, ADMIN_TOKEN_TTL) + "\n")
    return path


def read_admin_token(data_dir: Path) -> str | None:
    """The local admin token, if this data directory has one."""
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
