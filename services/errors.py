"""Errors that are part of the API: each maps to one gRPC status code (and, on the REST gateway, to
one HTTP status), with ``google.rpc`` details where they help the caller fix the request."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = structlog.get_logger(__name__)


class ApiError(Exception):
    """An error the caller should see as is."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[Any]:
        """google.rpc detail messages attached to the status."""
        return []

    def to_status(self) -> status_pb2.Status:
        """The rich google.rpc.Status of this error."""
        packed = []
        for detail in self.details():
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


class InvalidArgument(ApiError):
    """A request with one or more bad fields; every violation is reported at once."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[tuple[str, str]], what: str = "request") -> None:
        self.violations = violations
        if len(violations) == 1:
            field, description = violations[0]
            message = f"invalid {what}: {field}: {description}"
        else:
            message = f"invalid {what}: {len(violations)} problems"
        super().__init__(message)

    def details(self) -> list[Any]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.violations
                ]
            )
        ]


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


def grpc_errors(method: F) -> F:
    """Decorate a servicer method: ApiError becomes its rich status; anything else is logged and
    becomes INTERNAL, so no traceback text leaks to callers."""

    async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, ApiError):
            await context.abort_with_status(rpc_status.to_status(exc.to_status()))
        log.exception("unhandled error in rpc", method=method.__qualname__)
        await context.abort_with_status(
            rpc_status.to_status(
                status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error: {exc!r}")
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
