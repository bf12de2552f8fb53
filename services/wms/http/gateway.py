"""The REST gateway: every RPC with a ``google.api.http`` annotation, served over HTTP/JSON.

The route table is built at start-up from the service descriptors of the servicers the WMS serves,
so a newly annotated RPC is served without a change here. A request is authorized with the same
check as the gRPC interceptor, transcoded into the RPC's request message (transcode.py), and handed
to the servicer in-process with a small servicer context of our own; unary responses go back as
JSON, server streams as Server-Sent Events (sse.py), errors as google.rpc.Status (status.py).
Client-streaming and bidi RPCs cannot be expressed as one HTTP request and are not served.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import structlog
from aiohttp import hdrs, web
from google.api import annotations_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.rpc import status_pb2

from services.auth import set_current_principal
from services.wms import limits
from services.wms.auth_interceptor import authorize_call
from services.wms.http import sse
from services.wms.http.metrics import RPC_KEY
from services.wms.http.status import AbortError, error_response, respond, status_of
from services.wms.http.transcode import PathTemplate, TemplateError, Transcoder, parse_template

log = structlog.get_logger(__name__)

# HttpRule's pattern fields, as HTTP methods.
RULE_METHODS = {"get": "GET", "put": "PUT", "post": "POST", "delete": "DELETE", "patch": "PATCH"}
STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class HttpBinding:
    """One HTTP method and path bound to an RPC (its rule, or one of its additional_bindings)."""

    service: str  # full service name, e.g. ewms.v1.WorkflowService
    rpc: MethodDescriptor
    method: str  # GET, POST, …
    template: PathTemplate
    transcoder: Transcoder

    @property
    def rpc_name(self) -> str:
        """``/ewms.v1.WorkflowService/GetWorkflow``, as gRPC names the method."""
        return f"/{self.service}/{self.rpc.name}"


def service_descriptor(name: str) -> ServiceDescriptor:
    """A service's descriptor from the default pool (its generated module must be imported)."""
    try:
        return descriptor_pool.Default().FindServiceByName(name)
    except KeyError:
        raise TemplateError(f"service {name!r} is not in the descriptor pool") from None


def bindings_of(service: ServiceDescriptor) -> list[HttpBinding]:
    """Every HTTP binding of a service's annotated RPCs, in declaration order."""
    found: list[HttpBinding] = []
    for rpc in service.methods:
        options = rpc.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        where = f"{service.full_name}.{rpc.name}"
        if rpc.client_streaming:
            log.warning("client-streaming rpc has an http annotation; not served", rpc=where)
            continue
        rule = options.Extensions[annotations_pb2.http]
        for r in [rule, *rule.additional_bindings]:
            method, path = _method_and_path(r, where)
            try:
                template = parse_template(path)
                transcoder = Transcoder(
                    rpc.input_type, template, r.body, r.response_body, rpc.output_type
                )
            except TemplateError as exc:
                raise TemplateError(f"{where}: {exc}") from None
            found.append(HttpBinding(service.full_name, rpc, method, template, transcoder))
    return found


def _method_and_path(rule: Any, where: str) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind in RULE_METHODS:
        return RULE_METHODS[kind], str(getattr(rule, kind))
    if kind == "custom":
        return str(rule.custom.kind).upper(), str(rule.custom.path)
    raise TemplateError(f"{where}: http rule without a method and path")


def route_table(service_names: Iterable[str]) -> list[HttpBinding]:
    """The bindings of every annotated RPC of these services; TemplateError on an annotation that
    cannot be served or on two RPCs bound to the same method and path."""
    table: list[HttpBinding] = []
    taken: dict[tuple[str, str], str] = {}
    for name in service_names:
        for binding in bindings_of(service_descriptor(name)):
            key = (binding.method, binding.template.route)
            if key in taken:
                raise TemplateError(
                    f"{binding.method} {binding.template.template} is bound twice: "
                    f"{taken[key]} and {binding.rpc_name}"
                )
            taken[key] = binding.rpc_name
            table.append(binding)
    return table


def add_routes(app: web.Application) -> None:
    """Register a route for every binding of the servicers in the app's HttpDeps."""
    from services.wms.http.server import DEPS, HttpDeps

    deps: HttpDeps = app[DEPS]
    resources: dict[str, web.Resource] = {}
    for binding in route_table(deps.servicers):
        route = binding.template.route
        if route not in resources:
            resources[route] = app.router.add_resource(route)
        servicer = deps.servicers[binding.service]
        resources[route].add_route(binding.method, _handler(deps, binding, servicer))


def _handler(
    deps: Any, binding: HttpBinding, servicer: Any
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    call = getattr(servicer, binding.rpc.name)

    async def handle(request: web.Request) -> web.StreamResponse:
        request[RPC_KEY] = binding.rpc_name  # the metrics label, as on the gRPC side
        # The same check, roles and principal as the gRPC door; errors reach the middleware.
        principal = await authorize_call(
            deps.authority, binding.service, request.headers.get(hdrs.AUTHORIZATION)
        )
        set_current_principal(principal)
        body = await request.read() if request.body_exists else b""
        message = await limits.off_loop_if_large(
            len(body),
            binding.transcoder.request,
            request.match_info,
            request.query.items(),
            body,
            request.headers.get(hdrs.CONTENT_TYPE),
        )
        context = GatewayContext(request)
        if binding.rpc.server_streaming:
            return await sse.stream(request, call(message, context), binding.transcoder.response)
        try:
            response = await call(message, context)
        except Exception as exc:
            # A servicer that set a code before failing (generated base classes do, for
            # UNIMPLEMENTED) answers with it, as grpc does.
            if context.error is not None and not isinstance(exc, AbortError):
                return respond(request, context.error)
            return error_response(request, exc)
        if context.error is not None:
            return respond(request, context.error)
        return web.json_response(binding.transcoder.response(response))

    return handle


class GatewayContext:
    """The part of grpc.aio.ServicerContext the servicers (and services.errors.grpc_errors) use,
    for a call arriving over HTTP. Aborting raises AbortError carrying the rich Status."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._code = grpc.StatusCode.OK
        self._details = ""

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Iterable[tuple[str, str | bytes]] = (),
    ) -> NoReturn:
        """End the call with ``code``; a ``grpc-status-details-bin`` trailer, as
        ``grpc_status.rpc_status.to_status`` puts there, carries the full google.rpc.Status."""
        for key, value in trailing_metadata:
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                raise AbortError(status_pb2.Status.FromString(value))
        raise AbortError(status_of(code, details))

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        """End the call with a ``grpc.Status`` (from ``rpc_status.to_status``)."""
        await self.abort(status.code, status.details, status.trailing_metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The HTTP headers, lower-cased as gRPC metadata keys are."""
        return tuple((key.lower(), value) for key, value in self._request.headers.items())

    def peer(self) -> str:
        """The client's address in gRPC's form (``ipv4:127.0.0.1:5000``)."""
        transport = self._request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if not peer:
            return "unknown"
        host, port = peer[0], peer[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"

    def time_remaining(self) -> float | None:
        """HTTP requests carry no deadline."""
        return None

    def cancelled(self) -> bool:
        """Whether the client has gone away."""
        transport = self._request.transport
        return transport is None or transport.is_closing()

    def done(self) -> bool:
        return self.cancelled()

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        """Accepted and dropped: HTTP responses have no trailers here."""

    async def send_initial_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        """Accepted and dropped: headers are the gateway's."""

    @property
    def error(self) -> status_pb2.Status | None:
        """The Status set with set_code (and set_details), if it is not OK."""
        if self._code == grpc.StatusCode.OK:
            return None
        return status_of(self._code, self._details)
