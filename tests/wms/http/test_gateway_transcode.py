"""google.api.http transcoding beyond what the ewms.v1 contracts use today: patterned and dotted
path variables, verbs, additional bindings, ``body: "field"``, ``response_body``, repeated, nested,
enum, bool, Timestamp and wrapper query parameters, and typed path variables -- on a test service
(built at import into the default descriptor pool) served by the real gateway with a fake servicer.
Also the path-template parser on its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from google.api import annotations_pb2  # noqa: F401  (registers the http option for text_format)
from google.protobuf import (  # noqa: F401  (timestamp, wrappers: the test proto's imports)
    descriptor_pb2,
    descriptor_pool,
    json_format,
    text_format,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from services.auth import Role
from services.errors import NotFound, grpc_errors
from services.wms import RunningWms
from services.wms.http import gateway, sse, status
from services.wms.http.server import DEPS, HttpDeps
from services.wms.http.transcode import TemplateError, parse_template
from tests.wms.http.conftest import auth
from tests.wms.http.test_gateway_errors import error_of, violations

PACKAGE = "ewms.gatewaytest.v1"
SERVICE = f"{PACKAGE}.Shelves"
TEST_PROTO = """
name: "ewms/gatewaytest/v1/shelves.proto"
package: "ewms.gatewaytest.v1"
syntax: "proto3"
dependency: "google/api/annotations.proto"
dependency: "google/protobuf/timestamp.proto"
dependency: "google/protobuf/wrappers.proto"
enum_type {
  name: "Color"
  value { name: "COLOR_UNSPECIFIED" number: 0 }
  value { name: "COLOR_RED" number: 1 }
  value { name: "COLOR_BLUE" number: 2 }
}
message_type {
  name: "Page"
  field { name: "size" number: 1 type: TYPE_INT32 label: LABEL_OPTIONAL }
  field { name: "token" number: 2 type: TYPE_STRING label: LABEL_OPTIONAL }
}
message_type {
  name: "Book"
  field { name: "title" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
  field { name: "pages" number: 2 type: TYPE_INT64 label: LABEL_OPTIONAL }
}
message_type {
  name: "Request"
  field { name: "name" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
  field { name: "number" number: 2 type: TYPE_INT32 label: LABEL_OPTIONAL }
  field { name: "page" number: 3 type: TYPE_MESSAGE type_name: ".ewms.gatewaytest.v1.Page"
          label: LABEL_OPTIONAL }
  field { name: "colors" number: 4 type: TYPE_ENUM type_name: ".ewms.gatewaytest.v1.Color"
          label: LABEL_REPEATED }
  field { name: "ids" number: 5 type: TYPE_INT32 label: LABEL_REPEATED }
  field { name: "flag" number: 6 type: TYPE_BOOL label: LABEL_OPTIONAL }
  field { name: "after" number: 7 type: TYPE_MESSAGE type_name: ".google.protobuf.Timestamp"
          label: LABEL_OPTIONAL }
  field { name: "limit" number: 8 type: TYPE_MESSAGE type_name: ".google.protobuf.Int32Value"
          label: LABEL_OPTIONAL }
  field { name: "book" number: 9 type: TYPE_MESSAGE type_name: ".ewms.gatewaytest.v1.Book"
          label: LABEL_OPTIONAL }
  field { name: "books" number: 10 type: TYPE_MESSAGE type_name: ".ewms.gatewaytest.v1.Book"
          label: LABEL_REPEATED }
  field { name: "shelf_id" number: 11 type: TYPE_STRING label: LABEL_OPTIONAL }
}
message_type {
  name: "Response"
  field { name: "echo" number: 1 type: TYPE_MESSAGE type_name: ".ewms.gatewaytest.v1.Request"
          label: LABEL_OPTIONAL }
  field { name: "note" number: 2 type: TYPE_STRING label: LABEL_OPTIONAL }
}
service {
  name: "Shelves"
  method {
    name: "Get" input_type: ".ewms.gatewaytest.v1.Request"
    output_type: ".ewms.gatewaytest.v1.Response"
    options { [google.api.http] {
      get: "/v1/{name=shelves/*}/items/{number}"
      additional_bindings { get: "/v1/numbers/{number}:lookup" }
    } }
  }
  method {
    name: "UpdateBook" input_type: ".ewms.gatewaytest.v1.Request"
    output_type: ".ewms.gatewaytest.v1.Response"
    options { [google.api.http] {
      patch: "/v1/{name=shelves/*}/books/{page.token}" body: "book" response_body: "echo"
    } }
  }
  method {
    name: "Create" input_type: ".ewms.gatewaytest.v1.Request"
    output_type: ".ewms.gatewaytest.v1.Response"
    options { [google.api.http] { post: "/v1/shelves/{name}" body: "*" } }
  }
  method {
    name: "Watch" input_type: ".ewms.gatewaytest.v1.Request"
    output_type: ".ewms.gatewaytest.v1.Response" server_streaming: true
    options { [google.api.http] { get: "/v1/watch/{name}" } }
  }
  method {
    name: "Fail" input_type: ".ewms.gatewaytest.v1.Request"
    output_type: ".ewms.gatewaytest.v1.Response"
    options { [google.api.http] { get: "/v1/fail" } }
  }
  method {
    name: "Missing" input_type: ".ewms.gatewaytest.v1.Request"
    output_type: ".ewms.gatewaytest.v1.Response"
    options { [google.api.http] { delete: "/v1/missing" } }
  }
  method {
    name: "Upload" input_type: ".ewms.gatewaytest.v1.Request"
    output_type: ".ewms.gatewaytest.v1.Response" client_streaming: true
    options { [google.api.http] { post: "/v1/upload" body: "*" } }
  }
}
"""


def _register() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("ewms/gatewaytest/v1/shelves.proto")
    except KeyError:
        proto = text_format.Parse(TEST_PROTO, descriptor_pb2.FileDescriptorProto())
        pool.AddSerializedFile(proto.SerializeToString())


_register()
Request: Any = GetMessageClass(
    descriptor_pool.Default().FindMessageTypeByName(f"{PACKAGE}.Request")
)
Response: Any = GetMessageClass(
    descriptor_pool.Default().FindMessageTypeByName(f"{PACKAGE}.Response")
)


class FakeShelves:
    """Echoes requests; streams as the request says."""

    def __init__(self) -> None:
        self.watch_closed = asyncio.Event()

    @grpc_errors
    async def Get(self, request: Message, context: Any) -> Any:
        return Response(echo=request, note="get")

    @grpc_errors
    async def UpdateBook(self, request: Message, context: Any) -> Any:
        return Response(echo=request, note="not sent: response_body is echo")

    @grpc_errors
    async def Create(self, request: Message, context: Any) -> Any:
        return Response(echo=request, note="created")

    @grpc_errors
    async def Watch(self, request: Any, context: Any) -> Any:
        """``number`` messages; then NotFound if ``flag``, else the end; for ``name`` "forever",
        one message and then nothing until closed."""
        try:
            if request.name == "forever":
                yield Response(note="0")
                await asyncio.Event().wait()
            if request.number < 0:
                raise NotFound("nothing to watch")
            for i in range(request.number):
                yield Response(note=str(i))
            if request.flag:
                raise NotFound("the shelf went away")
        finally:
            self.watch_closed.set()

    @grpc_errors
    async def Fail(self, request: Message, context: Any) -> Message:
        raise RuntimeError("kaput")

    async def Missing(self, request: Message, context: Any) -> Message:
        # What a generated servicer base class does for an RPC it does not implement.
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")

    async def Upload(self, requests: Any, context: Any) -> Message:
        raise AssertionError("client streams are not served over HTTP")


@pytest.fixture
def shelves() -> FakeShelves:
    return FakeShelves()


@pytest.fixture
async def client(
    shelves: FakeShelves, wms: RunningWms, token_for: Any
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """The gateway serving only the test service (with the test WMS's token authority); the
    client sends an admin token, the only role allowed on a service outside SERVICE_ROLES."""
    app = web.Application()
    status.install(app)
    # The gateway reads only servicers and authority from HttpDeps.
    app[DEPS] = cast(
        HttpDeps, SimpleNamespace(servicers={SERVICE: shelves}, authority=wms.authority)
    )
    gateway.add_routes(app)
    headers = auth(token_for("root", Role.ADMIN))
    async with TestClient(TestServer(app), headers=headers) as c:
        yield c


def echo(body: dict[str, Any]) -> Any:
    return json_format.ParseDict(body["echo"], Request())


# --- routes ---


async def test_a_patterned_variable_and_a_typed_one_fill_their_fields(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/v1/shelves/s1/items/42")
    assert resp.status == 200, await resp.text()
    got = echo(await resp.json())
    assert (got.name, got.number) == ("shelves/s1", 42)


async def test_a_path_outside_the_pattern_is_404(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/v1/racks/s1/items/42")
    await error_of(resp, 404, grpc.StatusCode.NOT_FOUND)


async def test_an_additional_binding_with_a_verb_is_served(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/v1/numbers/7:lookup")
    assert resp.status == 200, await resp.text()
    assert echo(await resp.json()).number == 7


async def test_a_bad_typed_path_variable_is_400_naming_its_field(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/v1/shelves/s1/items/forty-two")
    error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(error) == {"number": 'expected an integer (int32), got "forty-two"'}


async def test_body_field_dotted_path_variable_and_response_body(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.patch("/v1/shelves/s1/books/tok-9", json={"title": "Dune", "pages": "412"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    # response_body "echo": the Request alone, not the Response around it.
    got: Any = json_format.ParseDict(body, Request())
    assert got.name == "shelves/s1"
    assert got.page.token == "tok-9"
    assert (got.book.title, got.book.pages) == ("Dune", 412)


async def test_a_body_field_rejects_unknown_fields_with_their_path(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.patch("/v1/shelves/s1/books/t", json={"title": "x", "author": "y"})
    error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert set(violations(error)) == {"book.author"}


async def test_path_variables_win_over_the_body(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.post("/v1/shelves/from-path", json={"name": "from-body", "number": 3})
    assert resp.status == 200, await resp.text()
    got = echo(await resp.json())
    assert (got.name, got.number) == ("from-path", 3)


async def test_every_bad_body_field_is_reported_at_once(
    client: TestClient[web.Request, web.Application],
) -> None:
    body = {
        "number": "x",
        "colors": ["COLOR_GREEN"],
        "after": "yesterday",
        "books": [{"title": "ok"}, {"titel": "typo"}],
        "page": {"size": 1, "sizee": 2},
        "flag": "yes",
        "pageX": 1,
    }
    resp = await client.post("/v1/shelves/s", json=body)
    error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert set(violations(error)) == {
        "number",
        "colors",
        "after",
        "books[1].titel",
        "page.sizee",
        "flag",
        "pageX",
    }
    assert "RFC 3339" in violations(error)["after"]


async def test_json_names_are_accepted_in_the_body_but_not_twice(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.post("/v1/shelves/s", json={"shelfId": "a"})
    assert resp.status == 200, await resp.text()
    assert echo(await resp.json()).shelf_id == "a"
    resp = await client.post("/v1/shelves/s", json={"shelf_id": "a", "shelfId": "b"})
    error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(error) == {"shelf_id": "given twice, as 'shelf_id' and 'shelfId'"}


# --- query parameters ---


async def test_query_parameters_fill_repeated_nested_enum_bool_timestamp_and_wrapper_fields(
    client: TestClient[web.Request, web.Application],
) -> None:
    query = (
        "ids=1&ids=2&colors=COLOR_RED&colors=2&page.size=3&page.token=t&flag=true"
        "&after=2024-01-31T12:00:00Z&limit=5"
    )
    resp = await client.get(f"/v1/shelves/s1/items/1?{query}")
    assert resp.status == 200, await resp.text()
    got = echo(await resp.json())
    assert list(got.ids) == [1, 2]
    assert list(got.colors) == [1, 2]
    assert (got.page.size, got.page.token) == (3, "t")
    assert got.flag is True
    assert got.after.ToJsonString() == "2024-01-31T12:00:00Z"
    assert got.HasField("limit") and got.limit.value == 5


async def test_json_names_work_as_query_parameters(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/v1/shelves/s1/items/1?shelfId=a&flag=false")
    assert resp.status == 200, await resp.text()
    assert echo(await resp.json()).shelf_id == "a"


async def test_bad_query_parameters_are_each_a_field_violation(
    client: TestClient[web.Request, web.Application],
) -> None:
    query = (
        "flag=yes&colors=COLOR_GREEN&colors=9&page.size=big&limit=1&limit=2&page=3&book.x=1"
        "&number=5&name=n&after=soon"
    )
    resp = await client.get(f"/v1/shelves/s1/items/1?{query}")
    error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    found = violations(error)
    assert set(found) == {
        "flag",
        "colors",
        "page.size",
        "limit",
        "page",
        "book.x",
        "number",
        "name",
        "after",
    }
    assert found["flag"] == 'expected true or false, got "yes"'
    assert "COLOR_RED" in found["colors"]
    assert found["limit"] == "given 2 times; it takes one value"
    assert "give its fields as page.<field>" in found["page"]
    assert "no field 'x'" in found["book.x"]
    assert "set by the path" in found["number"]


async def test_a_query_parameter_cannot_set_the_body_field(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.patch("/v1/shelves/s1/books/t?book.title=x", json={})
    error = await error_of(resp, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert violations(error) == {"book.title": "is set by the request body"}


# --- calls ---


async def test_an_exception_in_a_servicer_is_500_internal(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/v1/fail")
    error = await error_of(resp, 500, grpc.StatusCode.INTERNAL)
    assert "kaput" in error["message"]


async def test_an_unimplemented_servicer_method_is_501(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.delete("/v1/missing")
    await error_of(resp, 501, grpc.StatusCode.UNIMPLEMENTED)


async def test_a_client_streaming_rpc_is_not_served_even_if_annotated(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.post("/v1/upload", json={})
    await error_of(resp, 404, grpc.StatusCode.NOT_FOUND)


async def test_a_non_admin_is_refused_on_a_service_without_roles(
    client: TestClient[web.Request, web.Application], token_for: Any
) -> None:
    resp = await client.get("/v1/fail", headers=auth(token_for("alice")))
    await error_of(resp, 403, grpc.StatusCode.PERMISSION_DENIED)


# --- server streams ---


async def read_events(resp: Any) -> list[tuple[str, str]]:
    """Every (field, value) line of an SSE response until it closes (comments as ("", text))."""
    lines = []
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line:
            field, _, value = line.partition(":")
            lines.append((field, value.strip()))
    return lines


async def test_a_server_stream_is_events_then_end(
    client: TestClient[web.Request, web.Application], shelves: FakeShelves
) -> None:
    resp = await client.get("/v1/watch/s?number=2")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache"
    assert await asyncio.wait_for(read_events(resp), 5) == [
        ("id", "1"),
        ("event", "message"),
        ("data", '{"note":"0"}'),
        ("id", "2"),
        ("event", "message"),
        ("data", '{"note":"1"}'),
        ("event", "end"),
        ("data", "{}"),
    ]
    assert shelves.watch_closed.is_set()


async def test_an_error_before_the_first_message_is_a_json_error(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/v1/watch/s?number=-1")
    error = await error_of(resp, 404, grpc.StatusCode.NOT_FOUND)
    assert error["message"] == "nothing to watch"


async def test_an_error_mid_stream_is_an_error_event_with_the_status(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/v1/watch/s?number=1&flag=true")
    assert resp.status == 200
    lines = await asyncio.wait_for(read_events(resp), 5)
    assert lines[:3] == [("id", "1"), ("event", "message"), ("data", '{"note":"0"}')]
    assert lines[3:5] == [
        ("event", "error"),
        ("data", '{"code":5,"message":"the shelf went away","details":[]}'),
    ]
    assert len(lines) == 5


async def test_a_quiet_stream_sends_keep_alives_and_stops_its_generator_when_the_client_leaves(
    client: TestClient[web.Request, web.Application],
    shelves: FakeShelves,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sse, "KEEPALIVE_SECONDS", 0.05)
    monkeypatch.setattr(sse, "DISCONNECT_CHECK_SECONDS", 0.05)
    resp = await client.get("/v1/watch/forever")
    assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5) == (
        b'id: 1\nevent: message\ndata: {"note":"0"}\n\n'
    )
    assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5) == b": keep-alive\n\n"
    resp.close()
    await asyncio.wait_for(shelves.watch_closed.wait(), 5)


# --- the template parser ---


@pytest.mark.parametrize(
    ("template", "route", "variables"),
    [
        ("/v1/workflows", "/v1/workflows", ()),
        (
            "/v1/workflows/{workflow_id}",
            "/v1/workflows/{workflow_id}",
            (("workflow_id", "workflow_id"),),
        ),
        ("/v1/{name=shelves/*}", "/v1/{name:shelves/[^/]+}", (("name", "name"),)),
        ("/v1/{name=shelves/**}", "/v1/{name:shelves/.*}", (("name", "name"),)),
        ("/v1/{a.b}/x", "/v1/{a__b}/x", (("a__b", "a.b"),)),
        ("/v1/{n}:cancel", "/v1/{n}:cancel", (("n", "n"),)),
        ("/v1/*/x", "/v1/{_wildcard1:[^/]+}/x", ()),
    ],
)
def test_templates_become_aiohttp_routes(
    template: str, route: str, variables: tuple[tuple[str, str], ...]
) -> None:
    parsed = parse_template(template)
    assert parsed.route == route
    assert parsed.variables == variables


@pytest.mark.parametrize(
    "template",
    ["v1/x", "/v1//x", "/v1/{a", "/v1/{a{b}}", "/v1/{a-b}", "/v1/{a}/{a}", "/v1/x:", "/v1/{a=x{}"],
)
def test_bad_templates_are_refused_at_start_up(template: str) -> None:
    with pytest.raises(TemplateError):
        parse_template(template)
