"""The pilot process: ``ewms pilot`` and ``python -m services.pilot``.

Exit codes: 0 finished (idle, drained, or told to stop); 1 fatal error (init task failed, the
runtime is unusable, a task failed with ``EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR=true``, the input
queue was lost); 2 invalid configuration (nothing was consumed). By default a failed task does not
end the pilot: its event is nacked (and dead-lettered at the queue's ``max_attempts``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping

import structlog

from ewms.v1 import pilot_service_pb2
from services.events.client import QueueError
from services.logs import configure_logging
from services.pilot.chirp import Chirper, htchirp_sender
from services.pilot.config import PilotConfigError, PilotSettings, describe, load_settings
from services.pilot.pilot import EventsSink, Pilot
from services.pilot.runtimes import RuntimeOptions, make_runtime
from services.pilot.status import StatusReporter

log = structlog.get_logger(__name__)

PILOT_VERSION = "0.1.0"
EXIT_CONFIG = 2


async def run_pilot(settings: PilotSettings) -> int:
    """Run one pilot with ``settings``; returns its exit code."""
    runtime = make_runtime(
        settings.runtime,
        RuntimeOptions(
            task_network=settings.task_network,
            container_debug=settings.container_debug,
            apptainer_build_workdir=settings.apptainer_build_workdir,
            apptainer_image_must_be_present=settings.apptainer_image_must_be_present,
            docker_shm_size=settings.docker_shm_size,
            hidden_directories=settings.hidden_directories,
            # Tasks never see the pilot's own settings (they hold its tokens).
            host_env={
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("EWMS_PILOT_", "_EWMS_PILOT_"))
            },
        ),
    )
    sink: EventsSink | None = None
    if settings.events_exchange:
        from services.pilot.hyperflow import EventsExchange

        try:
            sink = await EventsExchange.open(
                settings.events_url,
                settings.events_exchange,
                executor_id=settings.worker_id,
                hostname=settings.hostname,
            )
        except QueueError as exc:
            print(f"EWMS_PILOT_EVENTS_EXCHANGE: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    pilot: Pilot
    reporter = None
    if settings.wms_address:
        reporter = StatusReporter(
            settings.wms_address,
            settings.token,
            pilot_service_pb2.PilotHello(
                taskforce_uuid=settings.taskforce_uuid,
                worker_id=settings.worker_id,
                host=settings.hostname,
                pilot_version=PILOT_VERSION,
            ),
            on_drain=lambda reason: pilot.drain(f"the WMS asked: {reason}"),
            on_stop=lambda reason: pilot.stop(f"the WMS asked: {reason}"),
        )
    chirper = None
    if settings.htchirp:
        chirper = Chirper(
            htchirp_sender(settings.htchirp_dest), settings.htchirp_ratelimit_interval
        )
    pilot = Pilot(settings, runtime, reporter=reporter, sink=sink, chirper=chirper)
    pilot.install_signal_handlers()
    if reporter:
        reporter.start()
    return await pilot.run()


def main(env: Mapping[str, str] | None = None) -> int:
    """Read the configuration from the environment and run; returns the exit code."""
    try:
        settings = load_settings(env)
    except PilotConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level)
    log.info("pilot starting", version=PILOT_VERSION, settings=describe(settings))
    return asyncio.run(run_pilot(settings))
