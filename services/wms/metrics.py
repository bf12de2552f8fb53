"""The WMS's Prometheus metrics: one registry per WMS (a process may run several, as the tests do),
and the gRPC interceptor that counts and times every RPC. ``services/wms/http/metrics.py`` serves
them at ``GET /metrics`` and counts REST requests.

The lowest layer of the WMS: it imports nothing of it, so the store, the queue backends and the
control loops can all report here without import cycles.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 0.5 ms to 10 s: a cached read answers in well under a millisecond, a long-poll Receive waits
# seconds.
REQUEST_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# 100 µs (a read by primary key) to 5 s (SQLite's busy timeout).
STORE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
_WMS_ONLY = (
    " Counted by the WMS: with RabbitMQ, clients holding the workflow's AMQP credentials (pilots) "
    "use RabbitMQ directly, and RabbitMQ dead-letters at its delivery limit by itself; neither is "
    "seen here."
)


@dataclass(frozen=True)
class EventCounters:
    """The event counters of one queue backend, bound to its ``backend`` label: what a broker
    increments."""

    published: Counter
    delivered: Counter
    acked: Counter
    dead_lettered: Counter

    @classmethod
    def unregistered(cls, backend: str) -> EventCounters:
        """Counters nobody scrapes, for a broker used outside a WMS (tools, benchmarks)."""
        return WmsMetrics().events(backend)


class WmsMetrics:
    """Every metric of one WMS, in its own registry (``registry``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ewms_requests",
            "Requests answered, by transport (grpc, rest), method (the gRPC method; for REST the "
            "RPC the route calls, else '<verb> <path template>', 'unmatched' for unknown paths), "
            "gRPC status code name (both transports) and HTTP status (REST only). Streams are "
            "counted when they end.",
            ["transport", "method", "code", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "ewms_request_seconds",
            "Time to answer a request with a single response (streams are not timed), by "
            "transport, method and code as in ewms_requests_total.",
            ["transport", "method", "code"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.events_published = Counter(
            "ewms_events_published",
            "Events stored into a queue, by queue backend." + _WMS_ONLY,
            ["backend"],
            registry=r,
        )
        self.events_delivered = Counter(
            "ewms_events_delivered",
            "Deliveries of events to consumers (each attempt), by queue backend." + _WMS_ONLY,
            ["backend"],
            registry=r,
        )
        self.events_acked = Counter(
            "ewms_events_acked",
            "Events acked (done, gone from their queue), by queue backend." + _WMS_ONLY,
            ["backend"],
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "ewms_events_dead_lettered",
            "Events dead-lettered (nacked so, or out of attempts), by queue backend." + _WMS_ONLY,
            ["backend"],
            registry=r,
        )
        self.pilots_connected = Gauge(
            "ewms_pilots_connected",
            "Pilots with an open PilotService stream to this WMS.",
            registry=r,
        )
        self.tms_connected = Gauge(
            "ewms_tms_connected",
            "Task managers (one per cluster location) with an open TaskManagerService stream.",
            registry=r,
        )
        self.taskforces = Gauge(
            "ewms_taskforces",
            "Taskforces in the store, by phase (the original EWMS's phase names).",
            ["phase"],
            registry=r,
        )
        self.store_transaction_seconds = Histogram(
            "ewms_store_transaction_seconds",
            "Time a store transaction takes in the store's one thread (waiting for the thread not "
            "included; the rate of _sum is how busy that thread is), by kind (read, write).",
            ["kind"],
            buckets=STORE_BUCKETS,
            registry=r,
        )

    def events(self, backend: str) -> EventCounters:
        """The event counters of queue backend ``backend`` (embedded, rabbitmq)."""
        return EventCounters(
            self.events_published.labels(backend),
            self.events_delivered.labels(backend),
            self.events_acked.labels(backend),
            self.events_dead_lettered.labels(backend),
        )

    def request_done(
        self,
        transport: str,
        method: str,
        code: str,
        *,
        seconds: float | None,
        status: str = "",
    ) -> None:
        """Count one answered request; time it unless ``seconds`` is None (a stream)."""
        self.requests.labels(transport, method, code, status).inc()
        if seconds is not None:
            self.request_seconds.labels(transport, method, code).observe(seconds)


# --- gRPC ---

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


class RequestMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every RPC by method and status code, and times those with a single response.
    Install it first (outermost), so that calls the inner interceptors refuse are counted too."""

    def __init__(self, metrics: WmsMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # an unknown method: label values would be unbounded
        return _measured(handler, handler_call_details.method, self._metrics)


def status_name(context: Any, error: BaseException | None) -> str:
    """The name of the status code a call ended with: the one set on its context (an abort sets
    it), else OK, CANCELLED (the caller went away) or UNKNOWN (an unhandled exception)."""
    code = context.code()
    if code is not None:
        return str(getattr(code, "name", code))
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"


def _measured(
    handler: grpc.RpcMethodHandler, method: str, metrics: WmsMetrics
) -> grpc.RpcMethodHandler:
    """The same handler (same cardinality), counted and, for a single response, timed."""

    def done(context: Any, error: BaseException | None, started: float, timed: bool) -> None:
        seconds = time.perf_counter() - started if timed else None
        metrics.request_done("grpc", method, status_name(context, error), seconds=seconds)

    def single(call: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Any]:
        async def behaviour(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            try:
                response = await call(request, context)
            except BaseException as exc:
                done(context, exc, started, True)
                raise
            done(context, None, started, True)
            return response

        return behaviour

    def streamed(call: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        async def behaviour(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            try:
                async for item in _responses(call(request, context)):
                    yield item
            except BaseException as exc:
                done(context, exc, started, False)
                raise
            done(context, None, started, False)

        return behaviour

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(single(handler.unary_unary), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(single(handler.stream_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streamed(handler.unary_stream), **kwargs)
    return grpc.stream_stream_rpc_method_handler(streamed(handler.stream_stream), **kwargs)


async def _responses(result: Any) -> Any:
    """Yield from an async-generator behaviour, or await one that writes with context.write()."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    else:
        await result
