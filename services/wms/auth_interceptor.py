"""Server interceptor: verifies the bearer token of every RPC and checks the caller's role for the
service. Health and reflection are open. The verified Principal is bound to the RPC's context, where
servicers read it with ``services.auth.current_principal()``.

It wraps the real handler's behaviour (same cardinality) and aborts from inside it, the pattern
grpc.aio supports for every RPC kind. It also makes a request that is no valid protobuf message
(corrupt wire bytes, invalid UTF-8 in a string) an INVALID_ARGUMENT naming the request, where grpc
itself would answer UNKNOWN: the deserializer hands such a request on as ``Undecodable`` and the
wrapped behaviour refuses it, after authorization.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from services.auth import (
    Principal,
    Role,
    TokenAuthority,
    require_scope,
    set_current_principal,
)
from services.errors import ApiError, InvalidArgument, PermissionDenied, Unauthenticated

OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
# Which roles may call each service (admins may call everything).
SERVICE_ROLES: dict[str, frozenset[Role]] = {
    "ewms.v1.WorkflowService": frozenset({Role.USER}),
    "ewms.v1.EventService": frozenset({Role.USER, Role.PILOT}),
    "ewms.v1.TaskManagerService": frozenset({Role.TMS}),
    "ewms.v1.PilotService": frozenset({Role.PILOT}),
}

Authorize = Callable[[grpc.aio.ServicerContext], Awaitable[None]]  # type: ignore[type-arg]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates and authorizes every RPC outside OPEN_SERVICES."""

    def __init__(self, authority: TokenAuthority) -> None:
        self._authority = authority

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        if handler is None or service in OPEN_SERVICES:
            return handler

        async def authorize(context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
            try:
                principal = await authorize_call(
                    self._authority, service, bearer_of(context.invocation_metadata() or ())
                )
            except ApiError as exc:
                await context.abort_with_status(rpc_status.to_status(exc.to_status()))
            set_current_principal(principal)

        return _wrap(handler, authorize)


def bearer_of(metadata: Any) -> str | None:
    """The ``authorization`` entry of gRPC metadata, if any."""
    for key, value in metadata:
        if key == "authorization":
            return str(value)
    return None


async def authorize_call(
    authority: TokenAuthority, service: str, authorization: str | None
) -> Principal:
    """The verified caller of a call to ``service`` (a full service name), from its
    ``Authorization`` value (``Bearer <token>``): the one check behind both doors, the gRPC
    interceptor and the HTTP gateway. UNAUTHENTICATED or PERMISSION_DENIED otherwise."""
    if authorization is None:
        raise Unauthenticated("missing bearer token: send 'authorization: Bearer <token>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    principal = await authority.verify_any(token.strip())
    roles = SERVICE_ROLES.get(service, frozenset())
    if principal.role not in roles and not principal.is_admin:
        allowed = ", ".join(sorted(r.value for r in roles)) or "admin"
        raise PermissionDenied(
            f"role {principal.role.value!r} may not call {service} (allowed: {allowed})"
        )
    require_scope(principal)
    return principal


class Undecodable:
    """A request whose bytes are no valid message, with the parser's complaint."""

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer``, returning ``Undecodable`` instead of raising."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # protobuf's DecodeError, or a UnicodeDecodeError in a string
            return Undecodable(f"{type(exc).__name__}: {exc}")

    return deserialize


async def _refuse_undecodable(request: Any, context: Any) -> None:
    if isinstance(request, Undecodable):
        error = InvalidArgument([("request", f"is not a valid protobuf message ({request.error})")])
        await context.abort_with_status(rpc_status.to_status(error.to_status()))


async def _decoded(request_iterator: Any, context: Any) -> Any:
    """The stream's requests, ending the call at the first undecodable one."""
    async for request in request_iterator:
        await _refuse_undecodable(request, context)
        yield request


def _wrap(handler: grpc.RpcMethodHandler, authorize: Authorize) -> grpc.RpcMethodHandler:
    """The same handler, with ``authorize`` run first inside each call and undecodable requests
    refused."""
    kwargs = {
        "request_deserializer": _tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await authorize(context)
            await _refuse_undecodable(request, context)
            return await uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)
    if handler.stream_unary:
        su = handler.stream_unary

        async def stream_unary(request_iterator: Any, context: Any) -> Any:
            await authorize(context)
            return await su(_decoded(request_iterator, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
    if handler.unary_stream:
        us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> Any:
            await authorize(context)
            await _refuse_undecodable(request, context)
            async for item in _responses(us(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
    ss = handler.stream_stream

    async def stream_stream(request_iterator: Any, context: Any) -> Any:
        await authorize(context)
        async for item in _responses(ss(_decoded(request_iterator, context), context)):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


async def _responses(result: Any) -> Any:
    """Yield from an async-generator behaviour, or await one that writes with context.write()."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    else:
        await result
