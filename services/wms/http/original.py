"""The original EWMS's REST dialect under its own base path (``EWMS_HTTP_ORIGINAL_BASE``, default
``/original``): an existing client of the original works unchanged once its base URL is
``http://host:port/original``.

Its user routes only (UPSTREAM §1.4), plus the MQS route its clients poll for queue tokens (§4).
Each request is authorized like a gRPC call of WorkflowService, then served by calling that
servicer in-process, so validation, ownership and state rules are exactly the gRPC ones; only the
shapes are the original's (``original_shapes``), its FindObject is a safe subset
(``original_query``), and errors are its ``{"code", "error"}`` with its status codes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from ewms.v1 import taskforce_pb2, workflow_service_pb2
from services.auth import set_current_principal
from services.errors import ApiError, InvalidArgument
from services.wms.auth_interceptor import authorize_call
from services.wms.http import original_query as query
from services.wms.http import original_shapes as shapes
from services.wms.http.gateway import GatewayContext
from services.wms.http.server import DEPS, HttpDeps
from services.wms.http.status import AbortError
from services.wms.http.transcode import merge_json

SERVICE = "ewms.v1.WorkflowService"
ws = workflow_service_pb2
Phase = taskforce_pb2.TaskforcePhase
# The HTTP status of each gRPC code, as the original answers the same situations.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    # The original's "workflow is deactivated" on add-workers; deactivation overrides it (404).
    grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}
STATES_BY_DEACTIVATION = {
    None: ws.WORKFLOW_STATE_ACTIVE,
    "ABORTED": ws.WORKFLOW_STATE_ABORTED,
    "FINISHED": ws.WORKFLOW_STATE_FINISHED,
}
ADD_WORKERS_KEYS = {"cluster_location": str, "n_workers": int}


class OriginalError(Exception):
    """An error answered as the original's ``{"code": status, "error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- calling the servicer in-process --------------------------------------------------------------


def _status_error(status: status_pb2.Status, failed_precondition: int) -> OriginalError:
    """The original's error for the Status an in-process call aborted with."""
    code = GRPC_CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    http = failed_precondition if code == grpc.StatusCode.FAILED_PRECONDITION else None
    return OriginalError(http or HTTP_STATUS.get(code, 500), _error_text(status))


def _api_error(exc: ApiError) -> OriginalError:
    return OriginalError(HTTP_STATUS.get(exc.code, 500), _error_text(exc.to_status()))


def _error_text(status: status_pb2.Status) -> str:
    """The status message; when it only counts several field violations, followed by each."""
    violations: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(f"{v.field}: {v.description}" for v in bad.field_violations)
    if len(violations) > 1:
        return f"{status.message}: {'; '.join(violations)}"
    return str(status.message)


@dataclass
class Call:
    """One request of the dialect, authorized: its body and the servicer, for a route handler."""

    request: web.Request
    deps: HttpDeps
    base: str

    async def rpc(self, method: str, message: Message, *, failed_precondition: int = 422) -> Any:
        """Call a WorkflowService method in-process; OriginalError when it fails
        (FAILED_PRECONDITION answers ``failed_precondition``)."""
        servicer = self.deps.servicers[SERVICE]
        try:
            # The REST gateway's servicer context: aborting raises AbortError with the Status.
            return await getattr(servicer, method)(message, GatewayContext(self.request))
        except AbortError as exc:
            raise _status_error(exc.status, failed_precondition) from None

    async def json_body(self) -> Any:
        """The request's JSON body; 400 if there is none or it is not JSON."""
        text = await self.request.text()
        if not text.strip():
            raise OriginalError(400, "a JSON request body is required")
        try:
            return json.loads(text)
        except ValueError as exc:
            raise OriginalError(400, f"the request body is not valid JSON: {exc}") from None


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    """One route of the dialect: also its entry in the small OpenAPI document."""

    method: str
    path: str
    handler: Handler
    summary: str


def add_routes(app: web.Application, base: str) -> None:
    """Register the dialect's routes under ``base`` (``/original``), and a last route answering
    any other path under it with the original's 404 or 405."""
    for route in ROUTES:
        app.router.add_route(route.method, base + route.path, _endpoint(route.handler, base))
    app.router.add_route("*", base + "/{tail:.*}", unmatched)


def _endpoint(handler: Handler, base: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def endpoint(request: web.Request) -> web.Response:
        deps = request.app[DEPS]
        try:
            principal = await authorize_call(
                deps.authority, SERVICE, request.headers.get("Authorization")
            )
            set_current_principal(principal)
            return web.json_response(await handler(Call(request, deps, base)))
        except OriginalError as exc:
            return error_response(exc.status, exc.message)
        except ApiError as exc:
            error = _api_error(exc)
            return error_response(error.status, error.message)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc.status, exc.text or exc.reason)

    return endpoint


def error_response(status: int, message: str, **headers: str) -> web.Response:
    """The original's error body."""
    return web.json_response({"code": status, "error": message}, status=status, headers=headers)


async def unmatched(request: web.Request) -> web.Response:
    """A path under the base that no route serves (e.g. the original's TMS routes): 405 naming
    the allowed methods if the path is one of ours, else 404."""
    path = "/" + request.match_info["tail"]
    allowed = sorted({r.method for r in ROUTES if _PATTERNS[r.path].fullmatch(path)})
    if allowed:
        message = (
            f"{request.method} is not allowed on {request.path} (allowed: {', '.join(allowed)})"
        )
        return error_response(405, message, Allow=", ".join(allowed))
    return error_response(404, f"{request.path}: no such route in the original's user API")


# --- routes ---------------------------------------------------------------------------------------


async def root(call: Call) -> dict[str, Any]:
    return {}


async def openapi(call: Call) -> dict[str, Any]:
    """A short description of the dialect (its paths), not the original's full document."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = {"summary": route.summary}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "EWMS Workflow Management Service (the original's REST dialect, on ewms)",
            "version": "1",
        },
        "servers": [{"url": call.base}],
        "paths": paths,
    }


async def create_workflow(call: Call) -> dict[str, Any]:
    body = await call.json_body()
    resp: ws.CreateWorkflowResponse = await call.rpc("CreateWorkflow", parse_workflow_request(body))
    sizes = _sizes_as_sent(body, resp)
    return {
        "workflow": shapes.workflow(resp.workflow),
        "task_directives": [shapes.task_directive(td) for td in resp.task_directives],
        "taskforces": [shapes.taskforce(tf, sizes.get(tf.task_id)) for tf in resp.taskforces],
    }


async def get_workflow(call: Call) -> dict[str, Any]:
    workflow_id = call.request.match_info["workflow_id"]
    return shapes.workflow(
        await call.rpc("GetWorkflow", ws.GetWorkflowRequest(workflow_id=workflow_id))
    )


async def abort_workflow(call: Call) -> dict[str, Any]:
    workflow_id = call.request.match_info["workflow_id"]
    return await _deactivate(
        call, "AbortWorkflow", ws.AbortWorkflowRequest(workflow_id=workflow_id)
    )


async def finish_workflow(call: Call) -> dict[str, Any]:
    workflow_id = call.request.match_info["workflow_id"]
    return await _deactivate(
        call, "FinishWorkflow", ws.FinishWorkflowRequest(workflow_id=workflow_id)
    )


async def _deactivate(call: Call, method: str, request: Message) -> dict[str, Any]:
    # As the original: a workflow already deactivated is "not found" among the active ones.
    resp: ws.DeactivateWorkflowResponse = await call.rpc(method, request, failed_precondition=404)
    return shapes.deactivated(resp.workflow_id, resp.n_taskforces)


async def get_task_directive(call: Call) -> dict[str, Any]:
    task_id = call.request.match_info["task_id"]
    td = await call.rpc("GetTaskDirective", ws.GetTaskDirectiveRequest(task_id=task_id))
    return shapes.task_directive(td)


async def add_workers(call: Call) -> dict[str, Any]:
    body = await call.json_body()
    if not isinstance(body, dict):
        raise OriginalError(400, "the request body must be {cluster_location, n_workers}")
    for key in body:
        if key not in ADD_WORKERS_KEYS:
            raise OriginalError(400, f"unknown field {key!r} (fields: cluster_location, n_workers)")
    for key, kind in ADD_WORKERS_KEYS.items():
        if key not in body:
            raise OriginalError(400, f"{key}: required")
        if not isinstance(body[key], kind) or isinstance(body[key], bool):
            raise OriginalError(
                400, f"{key}: must be {'a string' if kind is str else 'an integer'}"
            )
    request = ws.AddWorkersRequest(
        task_id=call.request.match_info["task_id"],
        cluster_location=body["cluster_location"],
        n_workers=_int32(body["n_workers"], "n_workers"),
    )
    return shapes.taskforce(await call.rpc("AddWorkers", request))


async def get_taskforce(call: Call) -> dict[str, Any]:
    uuid = call.request.match_info["taskforce_uuid"]
    return shapes.taskforce(
        await call.rpc("GetTaskforce", ws.GetTaskforceRequest(taskforce_uuid=uuid))
    )


async def query_workflows(call: Call) -> dict[str, Any]:
    find = await _find(call, query.WORKFLOWS)

    async def get(workflow_id: str) -> dict[str, Any]:
        return shapes.workflow(
            await call.rpc("GetWorkflow", ws.GetWorkflowRequest(workflow_id=workflow_id))
        )

    found, state = find.only("deactivated")
    workflow_state = ws.WORKFLOW_STATE_UNSPECIFIED
    if found and (state is None or isinstance(state, str)):
        workflow_state = STATES_BY_DEACTIVATION.get(state, ws.WORKFLOW_STATE_UNSPECIFIED)

    async def page(size: int, token: str) -> tuple[list[dict[str, Any]], str]:
        request = ws.ListWorkflowsRequest(state=workflow_state, page_size=size, page_token=token)
        resp = await call.rpc("ListWorkflows", request)
        return [shapes.workflow(wf) for wf in resp.workflows], resp.next_page_token

    return await _answer(find, get, page)


async def query_task_directives(call: Call) -> dict[str, Any]:
    find = await _find(call, query.TASK_DIRECTIVES)

    async def get(task_id: str) -> dict[str, Any]:
        td = await call.rpc("GetTaskDirective", ws.GetTaskDirectiveRequest(task_id=task_id))
        return shapes.task_directive(td)

    workflow_id = _only_string(find, "workflow_id")

    async def page(size: int, token: str) -> tuple[list[dict[str, Any]], str]:
        request = ws.ListTaskDirectivesRequest(
            workflow_id=workflow_id, page_size=size, page_token=token
        )
        resp = await call.rpc("ListTaskDirectives", request)
        return [shapes.task_directive(td) for td in resp.task_directives], resp.next_page_token

    return await _answer(find, get, page)


async def query_taskforces(call: Call) -> dict[str, Any]:
    find = await _find(call, query.TASKFORCES)

    async def get(uuid: str) -> dict[str, Any]:
        tf = await call.rpc("GetTaskforce", ws.GetTaskforceRequest(taskforce_uuid=uuid))
        return shapes.taskforce(tf)

    # The List filters only narrow what is read; the query itself is checked on every object.
    location = _only_string(find, "schedd")
    if location not in call.deps.settings.cluster_locations.names:
        location = ""
    phase = _only_string(find, "phase")
    phases = [p for p, name in shapes.PHASES.items() if name == phase]
    filters = ws.ListTaskforcesRequest(
        workflow_id=_only_string(find, "workflow_id"),
        task_id=_only_string(find, "task_id"),
        cluster_location=location,
        phase=phases[0] if len(phases) == 1 else Phase.TASKFORCE_PHASE_UNSPECIFIED,  # type: ignore[arg-type]
    )

    async def page(size: int, token: str) -> tuple[list[dict[str, Any]], str]:
        request = ws.ListTaskforcesRequest()
        request.CopyFrom(filters)
        request.page_size, request.page_token = size, token
        resp = await call.rpc("ListTaskforces", request)
        return [shapes.taskforce(tf) for tf in resp.taskforces], resp.next_page_token

    return await _answer(find, get, page)


async def _find(call: Call, kind: query.Kind) -> query.Find:
    try:
        return query.parse_find(await call.json_body(), kind)
    except query.QueryError as exc:
        raise OriginalError(400, str(exc)) from None


def _only_string(find: query.Find, field: str) -> str:
    """The one string ``field`` must equal, or "" (no List filter)."""
    found, value = find.only(field)
    return value if found and isinstance(value, str) else ""


async def _answer(
    find: query.Find,
    get: Callable[[str], Awaitable[dict[str, Any]]],
    page: query.ListPage,
) -> dict[str, Any]:
    """The query's response: by lookups when it names the objects' ids, else by a List scan."""
    ids = find.conditions.get(find.kind.id_field)
    if ids is not None and not find.page_token:
        objects = []
        for object_id in dict.fromkeys(v for v in ids if isinstance(v, str)):
            try:
                objects.append(await get(object_id))
            except OriginalError as exc:
                if exc.status != 404:
                    raise
        return {find.kind.name: query.filter_found(find, objects), "next_after": None}
    found, next_after = await query.find_page(find, page)
    return {find.kind.name: found, "next_after": next_after}


async def mq_profiles(call: Call) -> dict[str, Any]:
    """The MQS's public MQ profiles of a workflow, from its queues (with credentials: the caller
    owns it)."""
    workflow_id = call.request.match_info["workflow_id"]
    wf = await call.rpc("GetWorkflow", ws.GetWorkflowRequest(workflow_id=workflow_id))
    listed = await call.rpc("ListQueues", ws.ListQueuesRequest(workflow_id=workflow_id))
    return {"mqprofiles": [shapes.mq_profile(q, wf) for q in listed.queues if q.public]}


# --- the workflow request -------------------------------------------------------------------------


def parse_workflow_request(body: object) -> ws.CreateWorkflowRequest:
    """The original's ``POST /v1/workflows`` JSON as a CreateWorkflowRequest (whose JSON form it
    is), read as the REST gateway reads it: every unknown or mistyped field is reported at once.
    The rest is CreateWorkflow's own validation."""
    request = ws.CreateWorkflowRequest()
    violations: list[tuple[str, str]] = []
    merge_json(body, request, "", violations)
    if violations:
        raise InvalidArgument(violations, "workflow request")
    return request


def _sizes_as_sent(
    body: dict[str, Any], resp: ws.CreateWorkflowResponse
) -> dict[str, dict[str, Any]]:
    """worker_disk and worker_memory as the request wrote them, by task id (the task directives
    are in request order). Stored taskforces keep bytes only, so only this response has them."""
    sizes: dict[str, dict[str, Any]] = {}
    for task, td in zip(body.get("tasks", []), resp.task_directives, strict=False):
        config = task.get("worker_config") if isinstance(task, dict) else None
        if isinstance(config, dict):
            sizes[td.task_id] = {
                k: config[k] for k in ("worker_disk", "worker_memory") if k in config
            }
    return sizes


def _int32(value: int, field: str) -> int:
    if not -(2**31) <= value < 2**31:
        raise OriginalError(400, f"{field}: out of range (got {value})")
    return value


ROUTES = (
    Route("GET", "/v1/", root, "An empty response."),
    Route("GET", "/v1/schema/openapi", openapi, "This short description of the dialect."),
    Route("POST", "/v1/workflows", create_workflow, "Create a workflow."),
    Route("GET", "/v1/workflows/{workflow_id}", get_workflow, "A workflow."),
    Route(
        "POST",
        "/v1/workflows/{workflow_id}/actions/abort",
        abort_workflow,
        "Deactivate a workflow as ABORTED; 404 if missing or already deactivated.",
    ),
    Route(
        "POST",
        "/v1/workflows/{workflow_id}/actions/finished",
        finish_workflow,
        "Deactivate a workflow as FINISHED; 404 if missing or already deactivated.",
    ),
    Route("GET", "/v1/task-directives/{task_id}", get_task_directive, "A task directive."),
    Route(
        "POST",
        "/v1/task-directives/{task_id}/actions/add-workers",
        add_workers,
        "Add a taskforce of n_workers at cluster_location; 422 if the workflow is deactivated.",
    ),
    Route("GET", "/v1/taskforces/{taskforce_uuid}", get_taskforce, "A taskforce."),
    Route(
        "POST",
        "/v1/query/workflows",
        query_workflows,
        "Find workflows: equality or $in on top-level fields.",
    ),
    Route(
        "POST",
        "/v1/query/task-directives",
        query_task_directives,
        "Find task directives: equality or $in on top-level fields.",
    ),
    Route(
        "POST",
        "/v1/query/taskforces",
        query_taskforces,
        "Find taskforces: equality or $in on top-level fields.",
    ),
    Route(
        "GET",
        "/v1/mqs/workflows/{workflow_id}/mq-profiles/public",
        mq_profiles,
        "The MQ profiles (broker, address, token) of a workflow's public queues.",
    ),
)
# Each route's path as a regex (a variable is one path segment), for ``unmatched``.
_PATTERNS = {r.path: re.compile(re.sub(r"\{\w+\}", "[^/]+", r.path)) for r in ROUTES}
