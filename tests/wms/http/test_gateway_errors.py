"""Errors on the HTTP face: every failure is a google.rpc.Status JSON body ({code, message,
details}) sent with the HTTP status google/rpc/code.proto maps its code to -- servicer errors, the
gateway's own 400s, aiohttp's 404/405/413 and unexpected exceptions alike."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.auth import Role
from services.errors import NotFound
from services.wms import start_wms
from services.wms.http import status
from tests.conftest import seed_request, wms_settings
from tests.wms.http.conftest import auth
from tests.wms.http.test_gateway_routes import submit_seed

BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


async def error_of(
    resp: aiohttp.ClientResponse, http: int, code: grpc.StatusCode
) -> dict[str, Any]:
    """The Status body of an error response, checked for its HTTP status and code."""
    assert resp.status == http, await resp.text()
    assert resp.content_type == "application/json"
    body: dict[str, Any] = await resp.json()
    assert set(body) == {"code", "message", "details"}
    assert body["code"] == code.value[0], body
    assert body["message"]
    return body


def violations(body: dict[str, Any]) -> dict[str, str]:
    """The BadRequest field violations of a Status body, by field."""
    found = {}
    for detail in body["details"]:
        if detail["@type"] == BAD_REQUEST:
            found.update({v["field"]: v["description"] for v in detail["field_violations"]})
    return found


@pytest.fixture
def alice_token(token_for: Any) -> str:
    return str(token_for("alice"))


# --- 400 ---


async def test_a_bad_field_is_400_with_its_field_violation(
    http: aiohttp.ClientSession, alice_token: str
) -> None:
    body = {**seed_request(), "priority": 500}
    async with http.post("/v1/workflows", json=body, headers=auth(alice_token)) as resp:
        error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert "between 0 and 100" in violations(error)["priority"]


async def test_unknown_json_fields_are_400_naming_each_with_its_path(
    http: aiohttp.ClientSession, alice_token: str
) -> None:
    body = seed_request()
    body["colour"] = "blue"
    body["tasks"][0]["worker_config"]["n_gpus"] = 1
    async with http.post("/v1/workflows", json=body, headers=auth(alice_token)) as resp:
        error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    found = violations(error)
    assert set(found) == {"colour", "tasks[0].worker_config.n_gpus"}
    assert "unknown field of ewms.v1.CreateWorkflowRequest" in found["colour"]
    assert "n_cores" in found["tasks[0].worker_config.n_gpus"]  # the known fields are listed


async def test_a_value_of_the_wrong_kind_is_400_naming_the_field(
    http: aiohttp.ClientSession, alice_token: str
) -> None:
    body = seed_request()
    body["tasks"][0]["n_workers"] = "many"
    async with http.post("/v1/workflows", json=body, headers=auth(alice_token)) as resp:
        error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(error) == {"tasks[0].n_workers": 'expected an integer (int32), got "many"'}


async def test_malformed_json_is_400(http: aiohttp.ClientSession, alice_token: str) -> None:
    headers = {**auth(alice_token), "Content-Type": "application/json"}
    async with http.post("/v1/workflows", data=b'{"tasks": [', headers=headers) as resp:
        error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert error["message"].startswith("malformed JSON body: ")


async def test_a_body_that_is_not_application_json_is_400(
    http: aiohttp.ClientSession, alice_token: str
) -> None:
    headers = {**auth(alice_token), "Content-Type": "text/plain"}
    async with http.post("/v1/workflows", data=b"{}", headers=headers) as resp:
        error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert "Content-Type: application/json" in error["message"]
    assert "text/plain" in error["message"]


async def test_a_charset_parameter_on_application_json_is_accepted(
    http: aiohttp.ClientSession, alice_token: str
) -> None:
    headers = {**auth(alice_token), "Content-Type": "application/json; charset=UTF-8"}
    data = json.dumps(seed_request()).encode()
    async with http.post("/v1/workflows", data=data, headers=headers) as resp:
        assert resp.status == 200, await resp.text()


async def test_an_empty_body_on_a_body_star_post_is_an_empty_request(
    http: aiohttp.ClientSession, alice_token: str
) -> None:
    created = await submit_seed(http, alice_token)
    task_id = created["task_directives"][0]["task_id"]
    # No body and no Content-Type: the servicer gets an empty AddWorkersRequest and names what
    # is missing.
    path = f"/v1/task-directives/{task_id}/actions/add-workers"
    async with http.post(path, headers=auth(alice_token)) as resp:
        error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert set(violations(error)) == {"cluster_location", "n_workers"}


async def test_an_unknown_query_parameter_is_400_naming_it(
    http: aiohttp.ClientSession, alice_token: str
) -> None:
    async with http.get("/v1/workflows?page_size=2&colour=blue", headers=auth(alice_token)) as resp:
        error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    found = violations(error)
    assert set(found) == {"colour"}
    assert "unknown query parameter" in found["colour"]
    assert "page_size" in found["colour"]  # the known ones are listed


async def test_a_query_parameter_on_a_body_star_method_is_400(
    http: aiohttp.ClientSession, alice_token: str
) -> None:
    path = "/v1/workflows?priority=3"
    async with http.post(path, json=seed_request(), headers=auth(alice_token)) as resp:
        error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert "JSON body" in violations(error)["priority"]


async def test_a_body_on_a_method_without_one_is_400(
    http: aiohttp.ClientSession, alice_token: str
) -> None:
    created = await submit_seed(http, alice_token)
    path = f"/v1/workflows/{created['workflow']['workflow_id']}/actions/abort"
    async with http.post(path, json={"reason": "x"}, headers=auth(alice_token)) as resp:
        error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert "takes no request body" in error["message"]
    async with http.post(path, json={}, headers=auth(alice_token)) as resp:
        assert resp.status == 200  # an empty object is no body


# --- 401, 403, 404 ---


async def test_no_token_is_401(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/workflows") as resp:
        error = await error_of(resp, 401, grpc.StatusCode.UNAUTHENTICATED)
    assert "bearer" in error["message"]


async def test_an_invalid_token_is_401(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/workflows", headers=auth("not-a-token")) as resp:
        await error_of(resp, 401, grpc.StatusCode.UNAUTHENTICATED)


async def test_a_pilot_token_on_workflow_service_is_403(
    http: aiohttp.ClientSession, token_for: Any
) -> None:
    token = token_for("pilot-1", Role.PILOT)
    async with http.get("/v1/workflows", headers=auth(token)) as resp:
        error = await error_of(resp, 403, grpc.StatusCode.PERMISSION_DENIED)
    assert "ewms.v1.WorkflowService" in error["message"]


async def test_an_unknown_workflow_is_404(http: aiohttp.ClientSession, alice_token: str) -> None:
    async with http.get("/v1/workflows/WF-nope", headers=auth(alice_token)) as resp:
        error = await error_of(resp, 404, grpc.StatusCode.NOT_FOUND)
    assert "WF-nope" in error["message"]


async def test_another_users_workflow_is_404(http: aiohttp.ClientSession, token_for: Any) -> None:
    created = await submit_seed(http, token_for("alice"))
    path = f"/v1/workflows/{created['workflow']['workflow_id']}"
    async with http.get(path, headers=auth(token_for("bob"))) as resp:
        await error_of(resp, 404, grpc.StatusCode.NOT_FOUND)


async def test_an_unknown_path_is_404_with_a_status_body(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/no-such-thing") as resp:
        error = await error_of(resp, 404, grpc.StatusCode.NOT_FOUND)
    assert "/v1/no-such-thing" in error["message"]


async def test_a_wrong_method_is_405_unimplemented_with_allow(http: aiohttp.ClientSession) -> None:
    async with http.delete("/v1/workflows") as resp:
        error = await error_of(resp, 405, grpc.StatusCode.UNIMPLEMENTED)
        assert set(resp.headers["Allow"].split(",")) == {"GET", "POST"}
    assert "DELETE" in error["message"]


# --- 400 for FAILED_PRECONDITION, 413, 500 ---


async def test_aborting_twice_is_failed_precondition_400(
    http: aiohttp.ClientSession, alice_token: str
) -> None:
    created = await submit_seed(http, alice_token)
    path = f"/v1/workflows/{created['workflow']['workflow_id']}/actions/abort"
    async with http.post(path, headers=auth(alice_token)) as resp:
        assert resp.status == 200
    async with http.post(path, headers=auth(alice_token)) as resp:
        error = await error_of(resp, 400, grpc.StatusCode.FAILED_PRECONDITION)
    assert "already deactivated" in error["message"]


@pytest.fixture
async def small_wms_http(tmp_path: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A WMS whose events may be at most 1000 bytes (so its body limit is ~1 MiB + 1333 bytes)."""
    settings = dataclasses.replace(wms_settings(tmp_path / "small"), max_event_bytes=1000)
    wms = await start_wms(settings)
    try:
        async with aiohttp.ClientSession(base_url=wms.http_url) as session:
            yield session, wms.authority.mint("alice", Role.USER, 3600)
    finally:
        await wms.stop(grace=None)


async def test_a_body_over_the_limit_is_413_resource_exhausted(
    small_wms_http: tuple[aiohttp.ClientSession, str],
) -> None:
    http, token = small_wms_http
    headers = {**auth(token), "Content-Type": "application/json"}
    body = b'{"tasks": [], "x": "' + b"a" * (1024 * 1024 + 10_000) + b'"}'
    async with http.post("/v1/workflows", data=body, headers=headers) as resp:
        error = await error_of(resp, 413, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "too large" in error["message"]


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_every_grpc_code_maps_to_its_http_status(code: grpc.StatusCode) -> None:
    # google/rpc/code.proto's mapping (429 for RESOURCE_EXHAUSTED is not reachable through the
    # servicers today, so the table itself is the check).
    expected = {
        "OK": 200,
        "CANCELLED": 499,
        "UNKNOWN": 500,
        "INVALID_ARGUMENT": 400,
        "DEADLINE_EXCEEDED": 504,
        "NOT_FOUND": 404,
        "ALREADY_EXISTS": 409,
        "PERMISSION_DENIED": 403,
        "RESOURCE_EXHAUSTED": 429,
        "FAILED_PRECONDITION": 400,
        "ABORTED": 409,
        "OUT_OF_RANGE": 400,
        "UNIMPLEMENTED": 501,
        "INTERNAL": 500,
        "UNAVAILABLE": 503,
        "DATA_LOSS": 500,
        "UNAUTHENTICATED": 401,
    }
    assert status.HTTP_STATUS[code] == expected[code.name]
    assert status.http_status(code.value[0]) == expected[code.name]


def test_a_code_number_outside_the_enum_is_500() -> None:
    assert status.http_status(99) == 500


# --- the middleware, on routes other than the gateway's ---


@pytest.fixture
async def bare_app() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """An app with only the error middleware and a few routes of other kinds."""

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="# metrics\n", content_type="text/plain")

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    async def api_error(request: web.Request) -> web.Response:
        raise NotFound("thing 'x' not found")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/text")

    async def returned_error(request: web.Request) -> web.Response:
        return web.json_response({"status": "unready"}, status=503)

    app = web.Application()
    status.install(app)
    app.router.add_get("/text", text)
    app.router.add_get("/broken", broken)
    app.router.add_get("/api-error", api_error)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/returned", returned_error)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_a_successful_non_json_route_is_left_alone(
    bare_app: TestClient[web.Request, web.Application],
) -> None:
    resp = await bare_app.get("/text")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    assert await resp.text() == "# metrics\n"


async def test_an_unexpected_exception_is_500_internal(
    bare_app: TestClient[web.Request, web.Application],
) -> None:
    resp = await bare_app.get("/broken")
    error = await error_of(resp, 500, grpc.StatusCode.INTERNAL)
    assert "boom" in error["message"]


async def test_an_api_error_raised_by_any_route_is_its_status(
    bare_app: TestClient[web.Request, web.Application],
) -> None:
    resp = await bare_app.get("/api-error")
    await error_of(resp, 404, grpc.StatusCode.NOT_FOUND)


async def test_redirects_and_returned_errors_are_not_rewritten(
    bare_app: TestClient[web.Request, web.Application],
) -> None:
    resp = await bare_app.get("/redirect", allow_redirects=False)
    assert resp.status == 302
    resp = await bare_app.get("/returned")
    assert resp.status == 503
    assert await resp.json() == {"status": "unready"}
