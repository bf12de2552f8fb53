"""``GET /metrics`` (no token): this WMS's Prometheus metrics (``services/wms/metrics.py``), and the
middleware that counts and times every REST request like the gRPC interceptor does every RPC.

Gauges of live state -- pilots and TMSs connected, taskforces by phase -- are read when scraped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ewms.v1 import taskforce_pb2
from services.wms.http.server import DEPS, HttpDeps
from services.wms.store import Tx

log = structlog.get_logger(__name__)

METRICS_PATH = "/metrics"
# What a handler may put on the request for the metrics (the REST gateway does): the RPC it calls,
# used as the method label; and the gRPC status code name its answer carries, more precise than
# one derived from the HTTP status (several codes share 400 or 409).
RPC_KEY = web.RequestKey("rpc", str)
CODE_KEY = web.RequestKey("grpc_code", str)
UNMATCHED = "unmatched"
# The gRPC status code an HTTP status stands for, when the handler did not say.
HTTP_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    413: "RESOURCE_EXHAUSTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# Phase value → the original EWMS's name (TASKFORCE_PHASE_CONDOR_SUBMIT → condor-submit).
PHASE_NAMES = {
    value: name.removeprefix("TASKFORCE_PHASE_").lower().replace("_", "-")
    for name, value in taskforce_pb2.TaskforcePhase.items()
    if value != taskforce_pb2.TASKFORCE_PHASE_UNSPECIFIED
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install(app: web.Application) -> None:
    """Register /metrics and the request middleware (installed first, so it is the outermost and
    sees every answer, errors of the other middlewares included)."""
    app.middlewares.append(count_requests)
    app.router.add_get(METRICS_PATH, scrape)


async def scrape(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    await observe_state(deps)
    return web.Response(
        body=generate_latest(deps.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def observe_state(deps: HttpDeps) -> None:
    """Set the gauges of live state: from the session registries, and one grouped count in the
    store (in the store's thread)."""
    metrics = deps.metrics
    metrics.pilots_connected.set(deps.pilots.connected_count())
    metrics.tms_connected.set(len(deps.dispatcher.connected_locations()))
    try:
        counts = await deps.store.run(taskforces_by_phase, write=False)
    except Exception as exc:
        # Absent rather than stale; the rest of the metrics are still served.
        log.warning("cannot count taskforces for /metrics", error=repr(exc))
        metrics.taskforces.clear()
        return
    for value, name in PHASE_NAMES.items():
        metrics.taskforces.labels(name).set(counts.get(value, 0))


def taskforces_by_phase(tx: Tx) -> dict[int, int]:
    """How many taskforces are in each phase (by phase value)."""
    rows = tx.sql.execute("SELECT phase, count(*) FROM taskforces GROUP BY phase")
    return {int(phase): int(n) for phase, n in rows}


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every request by method label and code, and time those answered in one response
    (streams such as server-sent events are counted when they end)."""
    if request.path == METRICS_PATH:
        return await handler(request)
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _done(request, exc.status, started, timed=True)
        raise
    except asyncio.CancelledError:
        _done(request, 499, started, timed=True)
        raise
    except Exception:
        _done(request, 500, started, timed=True)
        raise
    _done(request, response.status, started, timed=isinstance(response, web.Response))
    return response


def _done(request: web.Request, status: int, started: float, *, timed: bool) -> None:
    seconds = time.perf_counter() - started if timed else None
    request.app[DEPS].metrics.request_done(
        "rest",
        method_label(request),
        code_label(request, status),
        seconds=seconds,
        status=str(status),
    )


def method_label(request: web.Request) -> str:
    """The RPC the request called, else its route as ``<verb> <path template>``; never the raw
    path, which would give every workflow id its own series."""
    rpc: str = request.get(RPC_KEY, "")
    if rpc:
        return rpc
    route = request.match_info.route
    if route.resource is None:
        return UNMATCHED
    return f"{route.method} {route.resource.canonical}"


def code_label(request: web.Request, status: int) -> str:
    """The gRPC status code name the answer carries: as the handler set it, else from the HTTP
    status."""
    code: str = request.get(CODE_KEY, "")
    if code:
        return code
    return "OK" if status < 400 else HTTP_CODES.get(status, "UNKNOWN")
