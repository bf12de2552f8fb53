"""The embedded stack of ``ewms run`` and ``ewms up``: a WMS (SQLite + embedded broker) and a local
TMS, in this process, sharing its event loop. The local TMS's workers are pilot processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from services.auth import Role
from services.config import ClusterLocations, ConfigError, WmsSettings
from services.tms.client import TmsClient
from services.tms.local import LocalScheduler
from services.tms.pilot_env import PilotEnvError, SiteEnv
from services.wms.server import RunningWms, start_wms

log = structlog.get_logger(__name__)

LOCAL_LOCATION = "local"
TMS_TOKEN_TTL = 365 * 24 * 3600
CLIENT_TOKEN_TTL = 7 * 24 * 3600


@dataclass
class LocalStack:
    """A running embedded WMS and local TMS; ``await stop()`` ends both (workers drain first)."""

    wms: RunningWms
    tms: TmsClient
    scheduler: LocalScheduler
    tms_task: asyncio.Task[None]
    token: str

    @property
    def address(self) -> str:
        return self.wms.address

    async def stop(self, grace: float = 15.0) -> None:
        """Stop the workers (SIGTERM: they drain; SIGKILL after ``grace``), then the TMS and the
        WMS."""
        with contextlib.suppress(Exception):
            await self.scheduler.shutdown(grace)
        self.tms.stop()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self.tms_task
        await self.scheduler.close()
        await self.wms.stop()


async def start_local_stack(
    data_dir: Path,
    *,
    settings: WmsSettings | None = None,
    slots: int | None = None,
    port: int = 0,
    http_port: int | None = None,
) -> LocalStack:
    """Start a WMS on ``127.0.0.1:port`` (0: any free port) with its data in ``data_dir`` and a
    local TMS with ``slots`` concurrent workers (default: the CPUs). Its HTTP face listens on
    ``http_port`` (default: the settings')."""
    base = settings or WmsSettings.from_env()
    try:
        # bwrap tasks must not read the WMS's secret and database beside them.
        site_env = SiteEnv.from_env().hiding(data_dir)
    except PilotEnvError as exc:
        raise ConfigError(str(exc)) from None
    if http_port is not None:
        base = replace(base, http_port=http_port)
    # Only the local TMS runs here, so "local" is the one location.
    locations = ClusterLocations((LOCAL_LOCATION,))
    wms = await start_wms(
        replace(
            base,
            data_dir=data_dir,
            grpc_host="127.0.0.1",
            grpc_port=port,
            cluster_locations=locations,
        )
    )
    try:
        scheduler = LocalScheduler(data_dir / "tms-local", slots=slots or os.cpu_count() or 1)
        tms_token = wms.authority.mint("tms-local", Role.TMS, TMS_TOKEN_TTL, scope=LOCAL_LOCATION)
        tms = TmsClient(wms.address, tms_token, LOCAL_LOCATION, scheduler, site_env=site_env)
        task = asyncio.create_task(tms.run(), name="local-tms")
        token = wms.authority.mint("admin", Role.ADMIN, CLIENT_TOKEN_TTL)
        await asyncio.wait_for(_first_welcome(tms, task), 30)
    except BaseException:
        await wms.stop()
        raise
    log.info("local stack up", wms_address=wms.address, data_dir=str(data_dir))
    return LocalStack(wms, tms, scheduler, task, token)


async def _first_welcome(tms: TmsClient, task: asyncio.Task[None]) -> None:
    waiter = asyncio.create_task(tms.connected.wait())
    done, _ = await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
        raise RuntimeError("the local TMS ended before connecting")
