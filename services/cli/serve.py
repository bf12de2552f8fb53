"""The servers: ``ewms wms serve``, ``ewms tms serve``, and ``ewms up`` (both in one process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from services.cli.connection import resolve_token
from services.cli.options import Parents, positive_int
from services.cli.workflows import UsageError
from services.config import ClientSettings, WmsSettings
from services.errors import CannotServe
from services.logs import configure_logging
from services.wms import serve


def add_commands(sub: Any, parents: Parents) -> None:
    """Register ``wms serve``, ``tms serve`` and ``up``."""
    wms = sub.add_parser("wms", help="run the WMS").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = wms.add_parser(
        "serve", parents=[parents.data_dir], help="serve the WMS's gRPC API until stopped"
    )
    p.add_argument("--port", type=int, help="gRPC port (default EWMS_GRPC_PORT or 50051; 0: any)")
    p.add_argument("--host", help="address to bind (default EWMS_GRPC_HOST or 127.0.0.1)")
    p.add_argument(
        "--http-port", type=int, help="HTTP port (default EWMS_HTTP_PORT or 8080; 0: any)"
    )
    p.set_defaults(run=run_wms, needs_wms=False)

    tms = sub.add_parser("tms", help="run a TMS").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = tms.add_parser(
        "serve", parents=[parents.connect], help="serve one cluster location until stopped"
    )
    p.add_argument("--location", required=True, help="the cluster location this TMS serves")
    p.add_argument(
        "--scheduler",
        choices=("local", "htcondor"),
        default="local",
        help="where workers run: 'local' pilot processes on this machine (default) or an "
        "HTCondor schedd through the htcondor2 bindings",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="local: job log and worker directories (default <data dir>/tms-<location>)",
    )
    p.add_argument("--slots", type=positive_int, help="local: workers at once (default: the CPUs)")
    p.add_argument(
        "--job-event-log-dir", type=Path, help="htcondor: JOB_EVENT_LOG_DIR (envfiles, logs)"
    )
    p.set_defaults(run=tms_command, needs_wms=False)

    p = sub.add_parser(
        "up", parents=[parents.data_dir], help="run an embedded WMS and a local TMS until Ctrl-C"
    )
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0: any)")
    p.add_argument(
        "--workers", type=positive_int, help="local TMS: workers at once (default: the CPUs)"
    )
    p.set_defaults(run=up_command, needs_wms=False)


def run_wms(args: Any) -> int:
    """Serve with settings from the environment, overridden by flags; exit code 1 if the port
    cannot be bound (never a second WMS sharing it)."""
    settings = WmsSettings.from_env()
    if args.port is not None:
        settings = replace(settings, grpc_port=args.port)
    if args.host:
        settings = replace(settings, grpc_host=args.host)
    if args.http_port is not None:
        settings = replace(settings, http_port=args.http_port)
    if args.data_dir:
        settings = replace(settings, data_dir=args.data_dir)
    configure_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except CannotServe as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def tms_command(args: Any) -> int:
    from services.tms.client import TmsClient, TmsError
    from services.tms.pilot_env import PilotEnvError, SiteEnv
    from services.tms.scheduler import Scheduler

    settings = ClientSettings.from_env()
    address = args.wms or settings.wms_address
    data_dir = args.data_dir or settings.data_dir
    token = resolve_token(args.token, settings, address, data_dir)
    configure_logging(os.environ.get("EWMS_LOG_LEVEL", "INFO"))
    try:
        site_env = SiteEnv.from_env()
    except PilotEnvError as exc:
        raise UsageError(str(exc)) from None
    scheduler: Scheduler
    files: Any = None
    if args.scheduler == "local":
        from services.tms.local import LocalScheduler

        state_dir = args.state_dir or data_dir / f"tms-{args.location}"
        scheduler = LocalScheduler(state_dir, slots=args.slots or os.cpu_count() or 1)
        # A WMS on this machine keeps its secret and database here: bwrap tasks must not read it.
        site_env = site_env.hiding(data_dir)
    else:
        from services.tms.htcondor import HTCondorScheduler

        jel_dir = args.job_event_log_dir or Path(os.environ.get("JOB_EVENT_LOG_DIR", ""))
        if not str(jel_dir) or str(jel_dir) == ".":
            raise UsageError("--job-event-log-dir (or JOB_EVENT_LOG_DIR) is required for htcondor")
        from services.tms.files import FileManager

        condor = HTCondorScheduler(jel_dir)
        scheduler = condor
        # As the original: old job event logs and taskforce directories are archived, then
        # deleted (a pass once connected, then hourly).
        files = FileManager(jel_dir, condor.job_event_log_in_use)
    client = TmsClient(address, token, args.location, scheduler, site_env=site_env)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, client.stop)

        async def archive() -> None:
            # After the welcome: only then does the scheduler know which logs are in use.
            await client.connected.wait()
            await files.run()

        housekeeping = asyncio.create_task(archive()) if files is not None else None
        try:
            await client.run()
        finally:
            if housekeeping is not None:
                housekeeping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await housekeeping
            await scheduler.close()

    try:
        asyncio.run(serve())
    except TmsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def up_command(args: Any) -> int:
    from services.local_stack import start_local_stack

    settings = WmsSettings.from_env()
    data_dir = args.data_dir or settings.data_dir
    configure_logging(settings.log_level)

    async def up() -> None:
        stack = await start_local_stack(
            data_dir, settings=settings, slots=args.workers, port=args.port
        )
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        print(
            f"ewms up: WMS at {stack.address}, HTTP at {stack.wms.http_url}, "
            f"dashboard at {stack.wms.http_url}/, data in {data_dir}, "
            "local TMS with "
            f"{args.workers or os.cpu_count()} worker slot(s); Ctrl-C stops",
            file=sys.stderr,
        )
        await stopping.wait()
        await stack.stop()

    try:
        asyncio.run(up())
    except CannotServe as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
