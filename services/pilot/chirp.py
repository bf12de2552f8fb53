"""HTChirp, the original pilot's side channel to its HTCondor job ad (``EWMS_PILOT_HTCHIRP``).

Our pilots report to the WMS over ``PilotService.Connect``; chirps are kept for HTCondor tools that
read the job ad or the job event log (UPSTREAM.md §3.7). Same attributes and status names as the
original; status changes go out at once, counters at most every
``EWMS_PILOT_HTCHIRP_RATELIMIT_INTERVAL`` seconds. Chirp I/O is blocking, so it runs in a thread; a
failed chirp keeps its backlog for the next attempt and never stops the pilot.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from ewms.v1 import taskforce_pb2

log = structlog.get_logger(__name__)

PREFIX = "HTChirpEWMSPilot"
STATUS_NAMES = {
    taskforce_pb2.PILOT_PHASE_STARTED: "Started",
    taskforce_pb2.PILOT_PHASE_RUNNING_INIT: "RunningInitCommand",
    taskforce_pb2.PILOT_PHASE_AWAITING_FIRST_EVENT: "AwaitingFirstMessage",
    taskforce_pb2.PILOT_PHASE_TASKING: "Tasking",
    taskforce_pb2.PILOT_PHASE_DRAINING: "PendingRemainingTasks",
    taskforce_pb2.PILOT_PHASE_FATAL_ERROR: "FatalError",
    taskforce_pb2.PILOT_PHASE_DONE: "Done",
}
FLUSH_AT_EXIT_SECONDS = 10.0

Sender = Callable[[list[tuple[str, str]]], None]


def classad_string(text: str) -> str:
    """A ClassAd string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def chirp_config_present() -> bool:
    """Whether this process runs in an HTCondor job that can chirp."""
    path = os.environ.get("_CONDOR_CHIRP_CONFIG", ".chirp.config")
    return Path(path).is_file()


def htchirp_sender(destination: str) -> Sender:
    """Sends through the ``htchirp`` library: job attributes, or job event log lines."""

    def send(items: list[tuple[str, str]]) -> None:
        from htchirp import HTChirp  # type: ignore[import-untyped]

        with HTChirp() as chirp:
            for attr, value in items:
                if destination == "JOB_EVENT_LOG":
                    chirp.ulog(f"{attr}: {value}")
                else:
                    chirp.set_job_attr(attr, value)

    return send


class Chirper:
    """The backlog of chirps and its flushing."""

    def __init__(self, send: Sender, ratelimit_seconds: float) -> None:
        self._send = send
        self._ratelimit = ratelimit_seconds
        self._backlog: dict[str, str] = {}
        self._last_counters = 0.0
        self._flushing: asyncio.Task[None] | None = None
        self.failures = 0

    def started(self) -> None:
        """The pilot started."""
        self._backlog[f"{PREFIX}StartedTimestamp"] = str(int(time.time()))
        self.phase(taskforce_pb2.PILOT_PHASE_STARTED)

    def phase(self, phase: int) -> None:
        """A status change: flushed at once."""
        name = STATUS_NAMES.get(phase)  # type: ignore[call-overload]
        if name:
            self._backlog[f"{PREFIX}Status"] = classad_string(name)
            self._flush_soon()

    def counters(self, counters: taskforce_pb2.TaskCounters) -> None:
        """Counters changed: flushed at most once per rate-limit interval."""
        self._backlog[f"{PREFIX}TasksTotal"] = str(counters.events_received)
        self._backlog[f"{PREFIX}TasksSuccess"] = str(counters.tasks_succeeded)
        self._backlog[f"{PREFIX}TasksFailed"] = str(counters.tasks_failed)
        if time.monotonic() - self._last_counters >= self._ratelimit:
            self._flush_soon()

    def error(self, text: str, traceback: str = "") -> None:
        """The fatal error that ends the pilot."""
        self._backlog[f"{PREFIX}Error"] = classad_string(text)
        if traceback:
            self._backlog[f"{PREFIX}ErrorTraceback"] = classad_string(traceback)
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        """Send the backlog (in a thread); on failure it stays for the next flush."""
        if not self._backlog:
            return
        self._last_counters = time.monotonic()
        self._backlog[f"{PREFIX}LastUpdatedTimestamp"] = str(int(time.time()))
        items, self._backlog = list(self._backlog.items()), {}
        try:
            await asyncio.to_thread(self._send, items)
        except Exception as exc:
            self.failures += 1
            log.warning("chirp failed; kept for the next one", error=repr(exc))
            self._backlog = {**dict(items), **self._backlog}

    async def close(self) -> None:
        """Flush what is left (bounded), as the original does at exit."""
        deadline = time.monotonic() + FLUSH_AT_EXIT_SECONDS
        while time.monotonic() < deadline:
            if self._flushing is not None:
                await self._flushing
            if not self._backlog:
                return
            await self.flush()
            if self._backlog:
                await asyncio.sleep(1)
