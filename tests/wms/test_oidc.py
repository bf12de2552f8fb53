"""Tokens of an external OIDC issuer on a real WMS, through both doors (gRPC and the REST gateway).

The issuer is a minimal identity provider served by the test on 127.0.0.1: a discovery document and
a JWKS of real RS256 and ES256 keys. The WMS fetches both over HTTP, as it would from Keycloak."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ewms.v1 import workflow_service_pb2
from services import oidc
from services.auth import ANY_LOCATION, Principal, Role
from services.config import ConfigError, WmsSettings, check_auth_settings
from services.errors import PermissionDenied, Unauthenticated
from services.oidc import OidcVerifier
from tests.conftest import bearer
from tests.wms.helpers import Env, StartEnv
from tests.wms.requests import seed

AUDIENCE = "ewms-test"
# The issuer's path, as Keycloak's (https://host/realms/<realm>).
REALM = "/realms/test"
LIST_WORKFLOWS = workflow_service_pb2.ListWorkflowsRequest()


@dataclasses.dataclass
class SigningKey:
    """A private key of the issuer, with the kid and algorithm it signs with."""

    kid: str
    alg: str
    private: Any

    @classmethod
    def rsa(cls, kid: str) -> SigningKey:
        return cls(kid, "RS256", _rsa_private_key(kid))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.alg == "RS256" else ECAlgorithm
        jwk: dict[str, Any] = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


@functools.cache
def _rsa_private_key(kid: str) -> rsa.RSAPrivateKey:
    # One key per kid for the whole run: generating RSA keys takes up to seconds.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Issuer:
    """A minimal OIDC identity provider: ``{issuer}/.well-known/openid-configuration`` and
    ``{issuer}/jwks``."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.down = False
        self.jwks_requests = 0
        self.url = ""
        app = web.Application()
        app.router.add_get(f"{REALM}/.well-known/openid-configuration", self._discovery)
        app.router.add_get(f"{REALM}/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}{REALM}"

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _discovery(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503, text="down for maintenance")
        return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/jwks"})

    async def _jwks(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503, text="down for maintenance")
        self.jwks_requests += 1
        return web.json_response({"keys": [key.jwk() for key in self.keys]})

    def claims(
        self, sub: str = "alice-sub", roles: Any = ("user",), **claims: Any
    ) -> dict[str, Any]:
        """Keycloak-like claims; a claim given as None is left out."""
        now = int(time.time())
        base: dict[str, Any] = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": now,
            "exp": now + 300,
            "realm_access": {"roles": list(roles)},
        }
        base.update(claims)
        return {name: value for name, value in base.items() if value is not None}

    def token(self, key: SigningKey, sub: str = "alice-sub", **claims: Any) -> str:
        """A token signed with ``key`` (which need not be published)."""
        return jwt.encode(
            self.claims(sub, **claims), key.private, algorithm=key.alg, headers={"kid": key.kid}
        )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


def hs256_with_public_key(issuer: Issuer, key: SigningKey) -> str:
    """The key-confusion forgery: HS256 'signed' with the issuer's public key PEM as the HMAC
    secret (PyJWT refuses to make one, so it is built by hand)."""
    signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": key.kid}, issuer.claims())
    mac = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


@pytest.fixture
def rsa_key() -> SigningKey:
    return SigningKey.rsa("rsa-1")


@pytest.fixture
def ec_key() -> SigningKey:
    return SigningKey.ec("ec-1")


@pytest.fixture
async def issuer(rsa_key: SigningKey, ec_key: SigningKey) -> AsyncIterator[Issuer]:
    idp = Issuer(rsa_key, ec_key)
    await idp.start()
    yield idp
    await idp.stop()


@pytest.fixture
async def oidc_env(start_env: StartEnv, issuer: Issuer, monkeypatch: pytest.MonkeyPatch) -> Env:
    """A WMS trusting ``issuer``; unknown kids are looked up again at once (no rate limit)."""
    monkeypatch.setattr(oidc, "JWKS_REFETCH_INTERVAL", 0.0)
    return await start_env(auth_issuer=issuer.url, auth_audience=AUDIENCE)


@dataclasses.dataclass
class Outcome:
    """How a door answered ``ListWorkflows``: ``OK`` or the gRPC status name, and the text
    (the response, or the error message)."""

    status: str
    text: str


HTTP_STATUS = {200: "OK", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}
ListCall = Callable[[str], Awaitable[Outcome]]


@pytest.fixture(params=["grpc", "rest"])
async def list_workflows(request: pytest.FixtureRequest, oidc_env: Env) -> AsyncIterator[ListCall]:
    """``ListWorkflows`` with a bearer token, over gRPC or over REST (``GET /v1/workflows``)."""
    if request.param == "grpc":

        async def over_grpc(token: str) -> Outcome:
            try:
                resp = await oidc_env.workflows.ListWorkflows(
                    LIST_WORKFLOWS, metadata=bearer(token)
                )
            except grpc.aio.AioRpcError as err:
                return Outcome(err.code().name, err.details() or "")
            return Outcome("OK", str(resp))

        yield over_grpc
        return
    async with aiohttp.ClientSession(base_url=oidc_env.wms.http_url) as session:

        async def over_rest(token: str) -> Outcome:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get("/v1/workflows", headers=headers) as resp:
                text = await resp.text()
                return Outcome(HTTP_STATUS.get(resp.status, f"HTTP {resp.status}"), text)

        yield over_rest


async def create_as(env: Env, token: str) -> str:
    resp = await env.workflows.CreateWorkflow(seed(), metadata=bearer(token))
    return str(resp.workflow.workflow_id)


# --- Accepted tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key"])
async def test_user_token_of_the_issuer_sees_only_its_own_workflows(
    oidc_env: Env,
    issuer: Issuer,
    list_workflows: ListCall,
    key_name: str,
    request: pytest.FixtureRequest,
) -> None:
    token = issuer.token(request.getfixturevalue(key_name), sub="alice-sub")
    own = await create_as(oidc_env, token)
    others = await create_as(oidc_env, oidc_env.wms.authority.mint("bob", Role.USER, 3600))

    outcome = await list_workflows(token)

    assert outcome.status == "OK", outcome.text
    assert own in outcome.text
    assert others not in outcome.text


async def test_admin_role_of_the_issuer_sees_every_workflow(
    oidc_env: Env, issuer: Issuer, ec_key: SigningKey, list_workflows: ListCall
) -> None:
    alices = await create_as(oidc_env, issuer.token(ec_key, sub="alice-sub"))
    bobs = await create_as(oidc_env, oidc_env.wms.authority.mint("bob", Role.USER, 3600))

    outcome = await list_workflows(issuer.token(ec_key, sub="ops", roles=["user", "admin"]))

    assert outcome.status == "OK", outcome.text
    assert alices in outcome.text
    assert bobs in outcome.text


async def test_the_wms_own_tokens_still_work_beside_the_issuer(
    oidc_env: Env, list_workflows: ListCall
) -> None:
    outcome = await list_workflows(oidc_env.wms.authority.mint("carol", Role.USER, 3600))

    assert outcome.status == "OK", outcome.text


async def test_key_added_to_the_jwks_after_start_is_accepted(
    oidc_env: Env, issuer: Issuer, rsa_key: SigningKey, list_workflows: ListCall
) -> None:
    assert (await list_workflows(issuer.token(rsa_key))).status == "OK"  # keys now cached
    rotated = SigningKey.rsa("rsa-2")
    issuer.keys.append(rotated)

    outcome = await list_workflows(issuer.token(rotated))

    assert outcome.status == "OK", outcome.text


async def test_system_tms_role_may_connect_as_the_tms_of_any_location(
    oidc_env: Env, issuer: Issuer, rsa_key: SigningKey
) -> None:
    token = issuer.token(rsa_key, sub="tms-client", roles=["system-tms"])

    welcome = await oidc_env.tms(token=token).hello(location="osg")

    assert welcome.cluster_location == "osg"


# --- Refused tokens -------------------------------------------------------------------------------

Forge = Callable[[Issuer, SigningKey], str]
REFUSED: dict[str, tuple[Forge, str]] = {
    "wrong issuer": (
        lambda idp, key: idp.token(key, iss="https://elsewhere.example/realms/x"),
        "not trusted",
    ),
    "wrong audience": (lambda idp, key: idp.token(key, aud="another-client"), "audience"),
    "no audience": (lambda idp, key: idp.token(key, aud=None), "'aud'"),
    "expired": (
        lambda idp, key: idp.token(key, iat=int(time.time()) - 900, exp=int(time.time()) - 600),
        "expired",
    ),
    "issued in the future": (
        lambda idp, key: idp.token(key, iat=int(time.time()) + 600, exp=int(time.time()) + 900),
        "not valid yet",
    ),
    "unknown kid": (lambda idp, key: idp.token(SigningKey.rsa("rogue")), "'rogue'"),
    "published kid, other key": (
        lambda idp, key: idp.token(dataclasses.replace(SigningKey.rsa("other"), kid=key.kid)),
        "signature is invalid",
    ),
    "alg none": (
        lambda idp, key: unsigned({"alg": "none", "kid": key.kid}, idp.claims()) + ".",
        "algorithm 'none' is not accepted",
    ),
    "HS256 signed with the public key": (
        hs256_with_public_key,
        "algorithm 'HS256' is not accepted",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
async def test_invalid_token_of_the_issuer_is_unauthenticated(
    issuer: Issuer, rsa_key: SigningKey, list_workflows: ListCall, case: str
) -> None:
    forge, reason = REFUSED[case]

    outcome = await list_workflows(forge(issuer, rsa_key))

    assert outcome.status == "UNAUTHENTICATED", outcome.text
    assert reason in outcome.text


@pytest.mark.parametrize("roles", [[], ["offline_access", "uma_authorization"], ["pilot"]])
async def test_token_without_an_ewms_role_is_permission_denied(
    issuer: Issuer, rsa_key: SigningKey, list_workflows: ListCall, roles: list[str]
) -> None:
    outcome = await list_workflows(issuer.token(rsa_key, roles=roles))

    assert outcome.status == "PERMISSION_DENIED", outcome.text
    assert "no EWMS role in claim realm_access.roles" in outcome.text


async def test_tms_role_of_the_issuer_may_not_list_workflows(
    issuer: Issuer, rsa_key: SigningKey, list_workflows: ListCall
) -> None:
    outcome = await list_workflows(issuer.token(rsa_key, roles=["system-tms"]))

    assert outcome.status == "PERMISSION_DENIED", outcome.text


async def test_unreachable_jwks_is_unauthenticated_with_the_reason(
    issuer: Issuer, rsa_key: SigningKey, list_workflows: ListCall
) -> None:
    issuer.down = True

    outcome = await list_workflows(issuer.token(rsa_key))

    assert outcome.status == "UNAUTHENTICATED", outcome.text
    assert "cannot fetch the signing keys" in outcome.text
    assert "503" in outcome.text


async def test_keys_are_fetched_again_once_the_jwks_is_back(
    issuer: Issuer, rsa_key: SigningKey, list_workflows: ListCall
) -> None:
    issuer.down = True
    assert (await list_workflows(issuer.token(rsa_key))).status == "UNAUTHENTICATED"
    issuer.down = False

    outcome = await list_workflows(issuer.token(rsa_key))

    assert outcome.status == "OK", outcome.text


# --- The verifier on its own: key fetching and role claims ----------------------------------------


def verifier(issuer: Issuer, **kwargs: Any) -> OidcVerifier:
    return OidcVerifier(issuer.url, AUDIENCE, **kwargs)


async def test_unknown_kids_do_not_make_the_wms_hammer_the_issuer(
    issuer: Issuer, rsa_key: SigningKey
) -> None:
    v = verifier(issuer, refetch_interval=3600)
    await v.verify(issuer.token(rsa_key))

    for i in range(5):
        with pytest.raises(Unauthenticated, match="at most every 3600s"):
            await v.verify(issuer.token(SigningKey.ec(f"random-{i}")))

    assert issuer.jwks_requests == 1


async def test_unknown_kid_is_looked_up_once_when_allowed(
    issuer: Issuer, rsa_key: SigningKey
) -> None:
    v = verifier(issuer, refetch_interval=0)
    await v.verify(issuer.token(rsa_key))

    with pytest.raises(Unauthenticated, match="'rogue' is not among the signing keys"):
        await v.verify(issuer.token(SigningKey.rsa("rogue")))

    assert issuer.jwks_requests == 2


async def test_key_withdrawn_from_the_jwks_is_refused_once_the_keys_are_stale(
    issuer: Issuer, rsa_key: SigningKey
) -> None:
    v = verifier(issuer, keys_max_age=0, refetch_interval=0)
    await v.verify(issuer.token(rsa_key, sub="first"))
    issuer.keys.remove(rsa_key)

    with pytest.raises(Unauthenticated, match="'rsa-1' is not among the signing keys"):
        await v.verify(issuer.token(rsa_key, sub="second"))


async def test_known_keys_stay_in_use_while_the_issuer_is_down(
    issuer: Issuer, rsa_key: SigningKey
) -> None:
    v = verifier(issuer, keys_max_age=0, refetch_interval=0)
    await v.verify(issuer.token(rsa_key, sub="first"))
    issuer.down = True

    principal = await v.verify(issuer.token(rsa_key, sub="second"))

    assert principal.subject == "second"


async def test_concurrent_first_calls_share_one_key_fetch(
    issuer: Issuer, rsa_key: SigningKey
) -> None:
    v = verifier(issuer)
    tokens = [issuer.token(rsa_key, sub=f"user-{i}") for i in range(20)]

    principals = await asyncio.gather(*(v.verify(t) for t in tokens))

    assert [p.subject for p in principals] == [f"user-{i}" for i in range(20)]
    assert issuer.jwks_requests == 1


async def test_configured_jwks_url_skips_discovery(issuer: Issuer, rsa_key: SigningKey) -> None:
    v = verifier(issuer, jwks_url=f"{issuer.url}/jwks")

    assert await v.verify(issuer.token(rsa_key)) == Principal("alice-sub", Role.USER)


@pytest.mark.parametrize(
    ("claim", "value", "role"),
    [
        ("realm_access.roles", {"realm_access": {"roles": ["user"]}}, Role.USER),
        ("realm_access.roles", {"realm_access": {"roles": ["user", "admin"]}}, Role.ADMIN),
        ("realm_access.roles", {"realm_access": {"roles": ["tms", "user"]}}, Role.USER),
        ("realm_access.roles", {"realm_access": {"roles": ["system-tms"]}}, Role.TMS),
        ("ewms_role", {"ewms_role": "system-tms"}, Role.TMS),
        ("groups", {"groups": "offline_access user"}, Role.USER),
        (
            "resource_access.ewms.roles",
            {"resource_access": {"ewms": {"roles": ["admin"]}}},
            Role.ADMIN,
        ),
    ],
)
async def test_role_is_read_from_the_configured_claim(
    issuer: Issuer, rsa_key: SigningKey, claim: str, value: dict[str, Any], role: Role
) -> None:
    v = verifier(issuer, role_claim=claim)

    principal = await v.verify(issuer.token(rsa_key, **{"realm_access": None, **value}))

    # The original's system-tms serves every location, and says so.
    scope = ANY_LOCATION if role is Role.TMS else ""
    assert principal == Principal("alice-sub", role, scope=scope)


async def test_role_claim_of_the_wrong_shape_is_permission_denied(
    issuer: Issuer, rsa_key: SigningKey
) -> None:
    v = verifier(issuer)

    with pytest.raises(PermissionDenied, match="found: none"):
        await v.verify(issuer.token(rsa_key, realm_access=["user"]))


# --- Configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"EWMS_AUTH_ISSUER": "http://idp.example/realms/x"}, "EWMS_AUTH_ISSUER"),
        ({"EWMS_AUTH_ISSUER": "https://idp.example/realms/x"}, "EWMS_AUTH_AUDIENCE"),
        (
            {
                "EWMS_AUTH_ISSUER": "https://idp.example/realms/x",
                "EWMS_AUTH_AUDIENCE": "ewms",
                "EWMS_AUTH_JWKS_URL": "http://idp.example/certs",
            },
            "EWMS_AUTH_JWKS_URL",
        ),
        (
            {
                "EWMS_AUTH_ISSUER": "https://idp.example/realms/x",
                "EWMS_AUTH_AUDIENCE": "ewms",
                "EWMS_AUTH_ROLE_CLAIM": "realm_access..roles",
            },
            "EWMS_AUTH_ROLE_CLAIM",
        ),
        ({"EWMS_AUTH_AUDIENCE": "ewms"}, "EWMS_AUTH_AUDIENCE"),
    ],
)
def test_unsafe_oidc_settings_are_a_config_error_naming_the_variable(
    env: dict[str, str], variable: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=variable):
        WmsSettings.from_env({"EWMS_DATA_DIR": str(tmp_path), **env})


@pytest.mark.parametrize(
    "issuer", ["https://keycloak.example/realms/ewms", "http://127.0.0.1:8080/realms/x"]
)
def test_https_issuer_or_loopback_http_is_accepted(issuer: str) -> None:
    check_auth_settings(issuer, "ewms", "", "realm_access.roles")
