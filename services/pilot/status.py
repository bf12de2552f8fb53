"""The pilot's link to the WMS: ``PilotService.Connect``.

Status (phase, counters, last error) is sent as it changes, coalesced to at most one message per
``interval``; phase changes go out at once, each in its own message. Task lifecycle events are sent
in order and in batches (``task_events``): a message carries every event buffered when it is
written (at most ``MAX_EVENTS_PER_MESSAGE``), which is whatever accumulated while the previous
message was being written. There is no timer: a lone event goes out at once, and under load events
share messages instead of taking one each. An event leaves the buffer only once the message carrying
it was written, so a lost stream sends it again. Each round sends pending phase changes first, then
lifecycle events, then the coalesced status.

If the WMS goes away the pilot keeps working: this reconnects with jittered exponential backoff
(at most ``BACKOFF_MAX`` apart, so the WMS sees the pilot within seconds of its return, however
long it was away), re-sends its hello and latest status, and sends the lifecycle events buffered
meanwhile (up to a bound; older ones are dropped and counted). Drain and stop commands from the
WMS are handed to callbacks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import time
from collections.abc import Callable

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from ewms.v1 import pilot_service_pb2, pilot_service_pb2_grpc, taskforce_pb2
from services.events.grpc_client import channel_options

log = structlog.get_logger(__name__)

COALESCE_SECONDS = 0.25
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 2.0
MAX_BUFFERED_TASK_EVENTS = 10_000
MAX_EVENTS_PER_MESSAGE = 500
# The WMS keeps no more of an error than this; cutting it here also bounds a batch's size (well
# under the gRPC message limit), whatever a task wrote.
MAX_TASK_ERROR_CHARS = 4096
# Errors that another attempt cannot fix.
PERMANENT = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
}


def now_ts() -> Timestamp:
    """The current time as a protobuf Timestamp."""
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class StatusReporter:
    """Holds the pilot's status and keeps the WMS informed of it."""

    def __init__(
        self,
        address: str,
        token: str,
        hello: pilot_service_pb2.PilotHello,
        *,
        on_drain: Callable[[str], None],
        on_stop: Callable[[str], None],
        interval: float = COALESCE_SECONDS,
    ) -> None:
        self._address = address
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._hello = hello
        self._on_drain = on_drain
        self._on_stop = on_stop
        self._interval = interval
        self.phase = taskforce_pb2.PILOT_PHASE_STARTED
        self.counters = taskforce_pb2.TaskCounters()
        self.last_error = ""
        self._dirty = True
        self._urgent = True
        # Phase changes not yet sent, oldest first (bounded: there are seven phases).
        self._phases: collections.deque[pilot_service_pb2.PilotStatus] = collections.deque(
            maxlen=16
        )
        self._phases.append(self.status())
        self._task_events: collections.deque[pilot_service_pb2.TaskLifecycleEvent] = (
            collections.deque()
        )
        self.dropped_task_events = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        # When the stream was lost (monotonic), until it is restored.
        self._lost_at: float | None = None
        self._last_sent = 0.0

    # -- what the pilot reports --------------------------------------------------------------

    def set_phase(self, phase: int) -> None:
        """A phase change: sent at once, and never coalesced away (each phase is reported)."""
        if phase != self.phase:
            self.phase = phase  # type: ignore[assignment]
            self._phases.append(self.status())
            self._dirty = self._urgent = True
            self._wake.set()

    def changed(self) -> None:
        """Counters or the last error changed: sent within ``interval``."""
        self._dirty = True
        self._wake.set()

    def task_event(self, event: pilot_service_pb2.TaskLifecycleEvent) -> None:
        """Queue a lifecycle event (dropping the oldest beyond the buffer bound); it goes out with
        the next message of lifecycle events."""
        if len(event.error) > MAX_TASK_ERROR_CHARS:
            event.error = event.error[: MAX_TASK_ERROR_CHARS - 1] + "…"
        if len(self._task_events) >= MAX_BUFFERED_TASK_EVENTS:
            self._task_events.popleft()
            self.dropped_task_events += 1
        self._task_events.append(event)
        self._wake.set()

    def status(self) -> pilot_service_pb2.PilotStatus:
        """The current status message."""
        return pilot_service_pb2.PilotStatus(
            phase=self.phase,
            counters=self.counters,
            last_error=self.last_error,
            timestamp=now_ts(),
        )

    # -- the connection ----------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting in the background."""
        self._runner = asyncio.create_task(self._run(), name="pilot-status")

    async def close(self, within: float = 5.0) -> None:
        """Send the final status and what is buffered (up to ``within`` s), then disconnect."""
        if self._runner is None:
            return
        self._closing = True
        self._dirty = self._urgent = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._runner), within)
        except TimeoutError:
            log.warning("status not delivered to the WMS before exit", address=self._address)
        finally:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        if self.dropped_task_events:
            log.warning(
                "task lifecycle events dropped while the WMS was unreachable",
                n=self.dropped_task_events,
            )

    async def _run(self) -> None:
        attempt = 0
        while True:
            channel = grpc.aio.insecure_channel(self._address, options=channel_options())
            try:
                welcomed = await self._session(channel)
                if welcomed and self._closing:
                    return
            except grpc.aio.AioRpcError as exc:
                if exc.code() in PERMANENT:
                    log.error(
                        "the WMS refused this pilot's status stream; status is not reported",
                        code=exc.code().name,
                        details=exc.details(),
                    )
                    return
                self._lost(code=exc.code().name)
                welcomed = False
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as exc:
                self._lost(error=repr(exc))
                welcomed = False
            finally:
                await channel.close()
            if self._closing and not welcomed and attempt >= 2:
                return
            # Bounded: an outage can last thousands of attempts, and 2**attempt would overflow.
            attempt = 0 if welcomed else min(attempt + 1, 16)
            delay = random.uniform(0, min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt))
            await asyncio.sleep(delay)

    def _lost(self, **why: str) -> None:
        """Log the first failure of an outage (every attempt fails until the WMS is back)."""
        if self._lost_at is None:
            self._lost_at = time.monotonic()
            log.warning("status stream to the WMS lost", **why)

    async def _session(self, channel: grpc.aio.Channel) -> bool:
        """One stream; returns whether it was welcomed. Ends when closing is done."""
        stub = pilot_service_pb2_grpc.PilotServiceStub(channel)
        call = stub.Connect(metadata=self._metadata)
        await call.write(pilot_service_pb2.PilotServiceConnectRequest(hello=self._hello))
        first = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "welcome":
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNKNOWN, grpc.aio.Metadata(), grpc.aio.Metadata(), "no welcome"
            )
        self._dirty = self._urgent = True
        if self._lost_at is not None:
            log.info(
                "status stream to the WMS restored",
                down_s=round(time.monotonic() - self._lost_at, 1),
            )
            self._lost_at = None
        reader = asyncio.create_task(self._read(call))
        try:
            await self._write(call, reader)
        finally:
            reader.cancel()
        return True

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            kind = msg.WhichOneof("kind")
            if kind == "drain":
                self._on_drain(msg.drain.reason)
            elif kind == "stop":
                self._on_stop(msg.stop.reason)

    async def _write(self, call: grpc.aio.StreamStreamCall, reader: asyncio.Task[None]) -> None:
        while True:
            while self._phases:
                status = self._phases[0]
                await call.write(pilot_service_pb2.PilotServiceConnectRequest(status=status))
                self._phases.popleft()
            while self._task_events:
                await self._write_task_events(call)
            if self._dirty:
                wait = self._last_sent + self._interval - time.monotonic()
                if wait > 0 and not self._urgent:
                    await asyncio.sleep(wait)
                self._dirty = self._urgent = False
                self._last_sent = time.monotonic()
                await call.write(pilot_service_pb2.PilotServiceConnectRequest(status=self.status()))
                continue
            if self._closing and not self._task_events:
                await call.done_writing()
                # Wait for the WMS to end the stream, so everything written was received.
                await asyncio.wait_for(reader, 5)
                return
            if reader.done():
                reader.result()  # raises the stream's error
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "the WMS ended the stream",
                )
            self._wake.clear()
            waiter = asyncio.create_task(self._wake.wait())
            await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def _write_task_events(self, call: grpc.aio.StreamStreamCall) -> None:
        """Send the oldest buffered lifecycle events (up to MAX_EVENTS_PER_MESSAGE) in one message,
        then remove them from the buffer."""
        n = min(len(self._task_events), MAX_EVENTS_PER_MESSAGE)
        batch = pilot_service_pb2.TaskLifecycleEvents(events=itertools.islice(self._task_events, n))
        dropped = self.dropped_task_events
        await call.write(pilot_service_pb2.PilotServiceConnectRequest(task_events=batch))
        # A full buffer dropped its oldest events during the write: those sent are not lost.
        overlap = min(n, self.dropped_task_events - dropped)
        self.dropped_task_events -= overlap
        for _ in range(n - overlap):
            self._task_events.popleft()
