"""Errors that are part of the API: each maps to one gRPC status code (and, on the REST gateway, to
one HTTP status), with ``google.rpc`` details where they help the caller fix the request.

Every status leaves through ``ApiError.to_status`` or ``fit_status``, which keep it small. A gRPC
status travels in HTTP/2 trailers (``grpc-message`` and ``grpc-status-details-bin``), and clients
refuse trailers beyond their metadata limit (8 KiB soft, 16 KiB hard by default): an error echoing
a megabyte of garbage, or listing hundreds of violations, would reach its caller as
RESOURCE_EXHAUSTED instead. So quoted input is cut (``quoted``, ``clip``), at most MAX_VIOLATIONS
violations are listed and one more says how many were left out, and the whole status takes at most
STATUS_METADATA_BUDGET bytes of trailers.
"""

from __future__ import annotations

import base64
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 512
MAX_VIOLATIONS = 20
MAX_VIOLATION_BYTES = 3072  # every listed violation together
MAX_FIELD_BYTES = 128
MAX_DESCRIPTION_BYTES = 512
MAX_QUOTED_CHARS = 80
# Trailer bytes a status may take: well under the default soft limit (8 KiB), leaving room for the
# other trailers.
STATUS_METADATA_BUDGET = 5120
# clip's "… (N more characters)" takes at most this many bytes.
_CLIP_SUFFIX_BYTES = 32
_TOP_LEVEL_FIELD = re.compile(r"[^.\[]*")


def clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` bytes of UTF-8, saying how many characters were cut.
    A lone surrogate (JSON can carry "\\ud800") is written as its escape: a status must be UTF-8."""
    raw = text.encode(errors="backslashreplace")
    if len(raw) <= max_bytes:
        return raw.decode()
    head = raw[: max(max_bytes - _CLIP_SUFFIX_BYTES, 0)].decode(errors="ignore")
    return f"{head}… ({len(text) - len(head)} more characters)"


def quoted(value: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``value`` quoted for an error message (as ``repr``), cut after ``limit`` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value) - limit} more characters)"


def metadata_bytes(status: status_pb2.Status) -> int:
    """The trailer bytes a status takes: ``grpc-status-details-bin`` (base64 of the serialized
    status) and ``grpc-message`` (percent-encoded outside printable ASCII)."""
    details = len(base64.b64encode(status.SerializeToString()))
    message = sum(3 if b < 0x20 or b > 0x7E or b == 0x25 else 1 for b in status.message.encode())
    return details + message


def fit_status(status: status_pb2.Status) -> status_pb2.Status:
    """``status`` with its message clipped to MAX_MESSAGE_BYTES and, should the whole still exceed
    STATUS_METADATA_BUDGET, clipped further; details are dropped only as a last resort."""
    fitted = status_pb2.Status()
    fitted.CopyFrom(status)
    limit = MAX_MESSAGE_BYTES
    fitted.message = clip(status.message, limit)
    while metadata_bytes(fitted) > STATUS_METADATA_BUDGET and limit > _CLIP_SUFFIX_BYTES * 2:
        limit //= 2
        fitted.message = clip(status.message, limit)
    if metadata_bytes(fitted) > STATUS_METADATA_BUDGET:
        del fitted.details[:]
    return fitted


class ApiError(Exception):
    """An error the caller should see as is."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        message = clip(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message

    def details(self) -> list[Any]:
        """google.rpc detail messages attached to the status."""
        return []

    def to_status(self) -> status_pb2.Status:
        """The rich google.rpc.Status of this error, fitted to the trailer budget."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details():
            status.details.add().Pack(detail)
        return fit_status(status)


class InvalidArgument(ApiError):
    """A request with one or more bad fields; every violation is reported at once (``violations``
    keeps them all; the status lists the first ones that fit)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[tuple[str, str]], what: str = "request") -> None:
        self.violations = violations
        self.listed = _listed(violations)
        super().__init__(self._message(what))
        # Only text far beyond printable ASCII gets here: fewer violations, so none is dropped.
        while len(self.listed) > 1 and metadata_bytes(self.to_status()) > STATUS_METADATA_BUDGET:
            self.listed.pop()
            self.message = self._message(what)

    def _message(self, what: str) -> str:
        if len(self.violations) == 1:
            field, description = self.listed[0]
            return clip(f"invalid {what}: {field}: {description}", MAX_MESSAGE_BYTES)
        message = f"invalid {what}: {len(self.violations)} problems"
        if len(self.listed) < len(self.violations):
            message += f" (the first {len(self.listed)} listed)"
        return message

    def details(self) -> list[Any]:
        bad_request = error_details_pb2.BadRequest()
        for field, description in self.listed:
            bad_request.field_violations.add(field=field, description=description)
        omitted = self.violations[len(self.listed) :]
        if omitted:
            # Where the rest are, by the request's top-level fields (``tasks`` of ``tasks[3].x``).
            where = list(dict.fromkeys(_top_level(field) for field, _ in omitted))
            bad_request.field_violations.add(
                field=where[0],
                description=clip(
                    f"and {len(omitted)} more violations, not listed (of {len(self.violations)}), "
                    f"in {', '.join(where)}",
                    MAX_DESCRIPTION_BYTES,
                ),
            )
        return [bad_request]


def _listed(violations: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The violations that fit in a status: the first ones, each clipped."""
    listed: list[tuple[str, str]] = []
    size = 0
    for field, description in violations[:MAX_VIOLATIONS]:
        item = (clip(field, MAX_FIELD_BYTES), clip(description, MAX_DESCRIPTION_BYTES))
        size += sum(len(part.encode()) for part in item)
        if listed and size > MAX_VIOLATION_BYTES:
            break
        listed.append(item)
    return listed


def _top_level(field: str) -> str:
    match = _TOP_LEVEL_FIELD.match(field)
    return clip(match.group() if match is not None else field, MAX_FIELD_BYTES) or "request"


class NotFound(ApiError):
    """The named object does not exist, or the caller may not see it."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ApiError):
    """The object is not in a state that allows the action."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(ApiError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(ApiError):
    """The RPC is part of the contract but not served yet."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ApiError):
    """The caller presented no valid token."""

    code = grpc.StatusCode.UNAUTHENTICATED


F = TypeVar("F", bound=Callable[..., Any])


class CannotServe(OSError):
    """The WMS cannot start serving because something it needs is taken (a port, its data
    directory). ``ewms wms serve``, ``ewms up`` and ``ewms run`` print it and exit 1."""


class PortInUse(CannotServe):
    """A WMS address (gRPC or HTTP) cannot be bound: another process, likely another WMS, has it.
    ``ewms wms serve`` prints it and exits 1."""


class DataDirInUse(CannotServe):
    """Another WMS serves from the same data directory (it holds the directory's lock): two would
    hand out the same queue sequence numbers and deliver events twice. ``ewms wms serve`` and
    ``ewms up`` print it and exit 1."""


def grpc_errors(method: F) -> F:
    """Decorate a servicer method: ApiError becomes its rich status; anything else is logged and
    becomes INTERNAL, so no traceback text leaks to callers."""

    async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, ApiError):
            await context.abort_with_status(rpc_status.to_status(exc.to_status()))
        log.exception("unhandled error in rpc", method=method.__qualname__)
        await context.abort_with_status(
            rpc_status.to_status(
                fit_status(
                    status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error: {exc!r}")
                )
            )
        )

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> Any:
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as exc:
                if _is_abort(exc):
                    raise
                await _abort(context, exc)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, exc)

    return unary_wrapper  # type: ignore[return-value]


def _is_abort(exc: BaseException) -> bool:
    # grpc.aio's context.abort raises AbortError; it must propagate untouched.
    return type(exc).__name__ == "AbortError"


def field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    """The BadRequest field violations carried by a failed call (client side); [] if none."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return []
    found: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.extend((v.field, v.description) for v in bad_request.field_violations)
    return found
