"""The HTTP face's one error shape: a ``google.rpc.Status`` as JSON (``{"code", "message",
"details"}``), sent with the HTTP status that ``google/rpc/code.proto`` maps its code to.

Servicer errors, the gateway's own 400s, aiohttp's 404/405/413 and unexpected exceptions all leave
through here, so a client parses one body for every failure on every route. The middleware converts
only what a handler raises; a response a handler returns (``/readyz``'s 503, say) is its own choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import grpc
import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from google.protobuf import json_format
from google.rpc import status_pb2

from services.errors import MAX_MESSAGE_BYTES, ApiError, clip, fit_status
from services.wms.http.metrics import CODE_KEY

log = structlog.get_logger(__name__)

C = grpc.StatusCode
# gRPC code → HTTP status, as google/rpc/code.proto documents it (and Envoy's transcoder does).
HTTP_STATUS: Final[Mapping[grpc.StatusCode, int]] = MappingProxyType(
    {
        C.OK: 200,
        C.CANCELLED: 499,
        C.UNKNOWN: 500,
        C.INVALID_ARGUMENT: 400,
        C.DEADLINE_EXCEEDED: 504,
        C.NOT_FOUND: 404,
        C.ALREADY_EXISTS: 409,
        C.PERMISSION_DENIED: 403,
        C.RESOURCE_EXHAUSTED: 429,
        C.FAILED_PRECONDITION: 400,
        C.ABORTED: 409,
        C.OUT_OF_RANGE: 400,
        C.UNIMPLEMENTED: 501,
        C.INTERNAL: 500,
        C.UNAVAILABLE: 503,
        C.DATA_LOSS: 500,
        C.UNAUTHENTICATED: 401,
    }
)
_HTTP_BY_NUMBER: Final = {code.value[0]: status for code, status in HTTP_STATUS.items()}
_NAME_BY_NUMBER: Final = {code.value[0]: code.name for code in grpc.StatusCode}

# The other way, for errors aiohttp raises itself (unknown path, wrong method, body too large, …):
# the code put in the body; the HTTP status stays aiohttp's. 405 is UNIMPLEMENTED: the path exists,
# but no RPC is bound to it for this method.
CODE_OF_HTTP_STATUS: Final[Mapping[int, grpc.StatusCode]] = MappingProxyType(
    {
        400: C.INVALID_ARGUMENT,
        401: C.UNAUTHENTICATED,
        403: C.PERMISSION_DENIED,
        404: C.NOT_FOUND,
        405: C.UNIMPLEMENTED,
        408: C.DEADLINE_EXCEEDED,
        409: C.ABORTED,
        412: C.FAILED_PRECONDITION,
        413: C.RESOURCE_EXHAUSTED,
        414: C.RESOURCE_EXHAUSTED,
        415: C.INVALID_ARGUMENT,
        429: C.RESOURCE_EXHAUSTED,
        431: C.RESOURCE_EXHAUSTED,
        499: C.CANCELLED,
        501: C.UNIMPLEMENTED,
        503: C.UNAVAILABLE,
        504: C.DEADLINE_EXCEEDED,
    }
)


class AbortError(Exception):
    """A call ended with ``status`` (raised by the gateway's servicer context on abort).

    Named as grpc.aio's own abort exception is: ``services.errors.grpc_errors`` recognises aborts
    by that name and lets them pass instead of turning them into INTERNAL."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def http_status(code: int) -> int:
    """The HTTP status of a google.rpc code number (500 for a number outside the enum)."""
    return _HTTP_BY_NUMBER.get(code, 500)


def code_of_http_status(status: int) -> grpc.StatusCode:
    """The gRPC code reported in the body of an HTTP error that did not come from a servicer."""
    return CODE_OF_HTTP_STATUS.get(status, C.INTERNAL if status >= 500 else C.UNKNOWN)


def status_body(status: status_pb2.Status) -> dict[str, Any]:
    """The JSON body of a Status, with proto field names; ``message`` and ``details`` are always
    present so that clients can read them without checks."""
    try:
        body = json_format.MessageToDict(status, preserving_proto_field_name=True)
    except TypeError:
        # A detail whose type is not linked into this process cannot be rendered: drop details
        # rather than fail the error response itself.
        log.warning("status detail of unknown type dropped", code=status.code)
        body = {"code": status.code, "message": status.message}
    body.setdefault("code", status.code)
    body.setdefault("message", "")
    body.setdefault("details", [])
    return body


def status_response(
    status: status_pb2.Status,
    http: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON error response carrying ``status``; its HTTP status from the code unless given."""
    return web.json_response(
        status_body(status),
        status=http if http is not None else http_status(status.code),
        headers=headers,
    )


def respond(
    request: web.Request,
    status: status_pb2.Status,
    http: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """status_response, with the code noted on the request for the metrics middleware (several
    codes share an HTTP status)."""
    note_code(request, status.code)
    return status_response(status, http, headers)


def note_code(request: web.Request, code: int) -> None:
    """Record the gRPC code name a request was answered with."""
    request[CODE_KEY] = _NAME_BY_NUMBER.get(code, "UNKNOWN")


def error_response(request: web.Request, exc: BaseException) -> web.Response:
    """The Status response reporting ``exc`` (see error_status)."""
    status, http, headers = error_status(exc, request)
    return respond(request, status, http, headers)


def status_of(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    """A Status without details, its message clipped as every status's is (services.errors)."""
    return fit_status(
        status_pb2.Status(code=code.value[0], message=clip(message, MAX_MESSAGE_BYTES))
    )


def error_status(
    exc: BaseException, request: web.Request | None = None
) -> tuple[status_pb2.Status, int, dict[str, str]]:
    """The Status, HTTP status and extra headers that report ``exc``. Unexpected exceptions are
    logged and become INTERNAL."""
    if isinstance(exc, AbortError):
        return exc.status, http_status(exc.status.code), {}
    if isinstance(exc, ApiError):
        status = exc.to_status()
        return status, http_status(status.code), {}
    if isinstance(exc, web.HTTPException):
        message = _describe_http_error(exc, request)
        # Keep what the client needs (Allow on a 405), not the plain-text body's headers.
        headers = {
            k: v
            for k, v in exc.headers.items()
            if k not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH)
        }
        return status_of(code_of_http_status(exc.status), message), exc.status, headers
    where = {"method": request.method, "path": request.path} if request is not None else {}
    log.error("unhandled error in HTTP request", exc_info=exc, **where)
    return status_of(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}"), 500, {}


def _describe_http_error(exc: web.HTTPException, request: web.Request | None) -> str:
    text = exc.text or ""
    custom = bool(text) and text != f"{exc.status}: {exc.reason}"
    what = f"{request.method} {request.path}" if request is not None else "this request"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"{what}: method {exc.method} is not allowed here (allowed: {allowed})"
    if isinstance(exc, web.HTTPNotFound) and not custom:
        return f"{what}: no such path"
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return f"request body too large: {text}"
    return text if custom else f"{what}: {exc.reason}"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error a handler raises, on every route, becomes a Status JSON response."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        return error_response(request, exc)
    except ConnectionResetError:
        raise  # the client is gone: nobody to answer
    except Exception as exc:
        return error_response(request, exc)


def install(app: web.Application) -> None:
    """Add the error middleware. Register it after middlewares that should see final responses
    (metrics): the last registered runs closest to the handler."""
    app.middlewares.append(error_middleware)
