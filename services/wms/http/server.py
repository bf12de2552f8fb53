"""The HTTP server of the WMS: one aiohttp application, assembled from the parts of this package,
served on ``EWMS_HTTP_HOST:EWMS_HTTP_PORT`` by the WMS's own event loop."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from services.auth import TokenAuthority
from services.config import WmsSettings
from services.errors import PortInUse
from services.wms.control.pilots import PilotRegistry
from services.wms.control.tms import Dispatcher
from services.wms.control.watch import WatchHub
from services.wms.metrics import WmsMetrics
from services.wms.queues.manager import QueueManager
from services.wms.store import Store

log = structlog.get_logger(__name__)

# A request body may carry one event of the largest allowed size plus this much JSON framing
# (base64 grows a payload by a third; field names, headers and other events share the rest).
BODY_FRAMING = 1024 * 1024


@dataclass
class HttpDeps:
    """What the HTTP handlers reach: the same objects the gRPC servicers use."""

    settings: WmsSettings
    authority: TokenAuthority
    # Full service name (``ewms.v1.WorkflowService``) → the servicer instance gRPC serves.
    servicers: dict[str, Any]
    store: Store
    queues: QueueManager
    pilots: PilotRegistry
    dispatcher: Dispatcher
    hub: WatchHub
    # This WMS's metrics (served at /metrics); a fresh set when none is given.
    metrics: WmsMetrics = field(default_factory=WmsMetrics)


DEPS = web.AppKey("deps", HttpDeps)


def max_body_bytes(settings: WmsSettings) -> int:
    """The largest request body accepted (413 above it)."""
    return settings.max_event_bytes * 4 // 3 + BODY_FRAMING


def build_app(deps: HttpDeps) -> web.Application:
    """The whole HTTP face, every part registered on one application."""
    from services.wms.http import gateway, health, metrics, openapi, original, status, ui

    app = web.Application(client_max_size=max_body_bytes(deps.settings))
    app[DEPS] = deps
    metrics.install(app)
    # Inside the metrics middleware, so that metrics see the Status responses it makes of errors.
    status.install(app)
    health.add_routes(app)
    openapi.add_routes(app)
    original.add_routes(app, deps.settings.original_base_path)
    gateway.add_routes(app)
    ui.add_routes(app)
    return app


@dataclass
class HttpServer:
    """A started HTTP face."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        """The base URL local clients use."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting, end open requests (SSE streams included) and free the port."""
        await self.runner.cleanup()


async def start_http(deps: HttpDeps) -> HttpServer:
    """Serve the HTTP face on the settings' host and port (0: any free port)."""
    settings = deps.settings
    runner = web.AppRunner(build_app(deps), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        error = PortInUse if exc.errno == errno.EADDRINUSE else OSError
        raise error(
            f"cannot serve HTTP on {settings.http_host}:{settings.http_port}: {exc.strerror or exc}"
            " (set EWMS_HTTP_PORT to a free port, or 0 for any)"
        ) from exc
    sockets = site._server.sockets if site._server is not None else []  # type: ignore[union-attr,attr-defined]
    port = sockets[0].getsockname()[1] if sockets else settings.http_port
    return HttpServer(runner, settings.http_host, port)
