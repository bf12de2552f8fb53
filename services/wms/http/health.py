"""``/healthz`` (the process answers) and ``/readyz`` (the store is open and every queue backend
is reachable), both without a token, for load balancers and orchestrators."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the probes."""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    from services.wms.http.server import DEPS

    deps = request.app[DEPS]
    problems = await deps.queues.problems()
    problems = [*(await deps.store.problems()), *problems]
    if problems:
        return web.json_response({"status": "unready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})
