"""The TMS process: one bidirectional stream to the WMS over one scheduler backend.

Down the stream come start and stop commands; up go their confirmations and the workers' job
states (with how an ended job's process exited, and their pilots' chirps, HTCondor only) the
moment they change. ``JobBook`` is the
aggregation shared by every backend: it keeps each worker's latest job state and chirps per
taskforce and hands out what changed since the last message (or everything, after a reconnect).
The TMS keeps no state of its own: a restarted TMS adopts the clusters the WMS lists in its
welcome, re-sends full snapshots, and answers a re-sent start with the cluster it already
submitted (``Scheduler.find``), so a taskforce is never submitted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from google.protobuf import timestamp_pb2

from ewms.v1 import task_manager_service_pb2 as tms_pb2
from ewms.v1 import task_manager_service_pb2_grpc
from services.tms.chirps import apply_chirp
from services.tms.pilot_env import PilotEnvError, SiteEnv, submit_spec
from services.tms.scheduler import (
    ClusterLeft,
    PilotChirp,
    Scheduler,
    SchedulerError,
    SchedulerEvent,
    Submitted,
)

log = structlog.get_logger(__name__)

Request = tms_pb2.TaskManagerServiceConnectRequest
VERSION = "0.1.0"
RECONNECT_FIRST_DELAY = 0.25
# Attempts at most 2 s apart, and the channel's own reconnects too (gRPC's default backoff grows
# to 120 s): the TMS is back within seconds of the WMS's return, however long it was away.
RECONNECT_MAX_DELAY = 2.0
# Keepalive for the long-lived stream (GRPC-PRACTICE.md): ping every 30 s, allowed by the WMS.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class TmsError(RuntimeError):
    """The TMS cannot go on (e.g. the WMS refused it, or stayed unreachable too long)."""


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


@dataclass
class JobBook:
    """Every worker's latest job state and chirps, by taskforce, and what changed since it was
    last sent. A worker is sent once it has a job state (its pilot may chirp before the scheduler's
    first event about its job is read)."""

    workers: dict[str, dict[str, tms_pb2.WorkerJobState]] = field(default_factory=dict)
    dirty: dict[str, set[str]] = field(default_factory=dict)
    left: dict[str, float] = field(default_factory=dict)

    def apply(self, event: SchedulerEvent) -> None:
        if isinstance(event, ClusterLeft):
            self.left[event.taskforce_uuid] = event.time
            return
        known = self.workers.setdefault(event.taskforce_uuid, {})
        state = known.get(event.worker_id)
        if state is None:
            state = known[event.worker_id] = tms_pb2.WorkerJobState(worker_id=event.worker_id)
        if isinstance(event, PilotChirp):
            if not apply_chirp(state.chirps, event.chirp):
                return
        else:
            state.job_state = event.state
            state.hold_reason = event.hold_reason
            state.timestamp.CopyFrom(_ts(event.time))
            if event.job_exit is None:
                state.ClearField("job_exit")
            else:
                state.job_exit.exit_code = event.job_exit.exit_code
                state.job_exit.signal = event.job_exit.signal
        self.dirty.setdefault(event.taskforce_uuid, set()).add(event.worker_id)

    def changes(self) -> tms_pb2.JobStatusSnapshot | None:
        """What changed since the last call, or None."""
        snap = tms_pb2.JobStatusSnapshot()
        for uuid, ids in sorted(self.dirty.items()):
            known = self.workers[uuid]
            workers = [known[w] for w in sorted(ids) if known[w].job_state]
            if workers:
                snap.taskforces.add(taskforce_uuid=uuid, workers=workers)
        # A worker with chirps and no job state yet stays dirty until it has one.
        self.dirty = {
            uuid: waiting
            for uuid, ids in self.dirty.items()
            if (waiting := {w for w in ids if not self.workers[uuid][w].job_state})
        }
        return snap if snap.taskforces else None

    def full(self) -> tms_pb2.JobStatusSnapshot | None:
        """Every taskforce's every worker (after a reconnect); clears what was pending."""
        self.dirty.clear()
        snap = tms_pb2.JobStatusSnapshot()
        for uuid, known in sorted(self.workers.items()):
            workers = [known[w] for w in sorted(known) if known[w].job_state]
            if workers:
                snap.taskforces.add(taskforce_uuid=uuid, full=True, workers=workers)
        return snap if snap.taskforces else None


class TmsClient:
    """Runs one location's TMS until ``stop()``: connects (and reconnects) to the WMS, executes
    commands on ``scheduler`` and streams job states."""

    def __init__(
        self,
        wms_address: str,
        token: str,
        location: str,
        scheduler: Scheduler,
        *,
        site_env: SiteEnv | None = None,
        reconnect_limit: float = 600.0,
        tms_id: str = "",
    ) -> None:
        self._address = wms_address
        self._token = token
        self._location = location
        self._scheduler = scheduler
        self._site_env = site_env or SiteEnv()
        self._reconnect_limit = reconnect_limit
        self.tms_id = tms_id or f"{socket.gethostname()}-{os.getpid()}"
        self.book = JobBook()
        self._outbox: asyncio.Queue[Request | None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._stopping = asyncio.Event()
        self._flush_wanted = asyncio.Event()
        self._commands: set[asyncio.Task[None]] = set()
        # Set once the first welcome arrived (tests and `ewms run` wait for it).
        self.connected = asyncio.Event()
        self.submits = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Until ``stop()``; raises TmsError if the WMS refuses the TMS or stays unreachable for
        ``reconnect_limit`` seconds."""
        events = asyncio.create_task(self._follow_scheduler(), name="tms-scheduler-events")
        flusher = asyncio.create_task(self._flush_changes(), name="tms-flusher")
        delay = RECONNECT_FIRST_DELAY
        down_since = time.monotonic()
        try:
            async with grpc.aio.insecure_channel(self._address, options=CHANNEL_OPTIONS) as ch:
                stub = task_manager_service_pb2_grpc.TaskManagerServiceStub(ch)
                while not self._stopping.is_set():
                    welcomed = False
                    try:
                        welcomed = await self._session(stub)
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code()
                        if code in (
                            grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.UNAUTHENTICATED,
                            grpc.StatusCode.PERMISSION_DENIED,
                        ):
                            raise TmsError(
                                f"the WMS refused this TMS: {code.name}: {exc.details()}"
                            ) from None
                        log.warning("tms stream ended", code=code.name, details=exc.details())
                    if self._stopping.is_set():
                        break
                    if welcomed:
                        delay, down_since = RECONNECT_FIRST_DELAY, time.monotonic()
                    if time.monotonic() - down_since > self._reconnect_limit:
                        raise TmsError(
                            f"the WMS at {self._address} was unreachable for more than "
                            f"{self._reconnect_limit:.0f} s"
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    delay = min(delay * 2, RECONNECT_MAX_DELAY)
        finally:
            for task in (events, flusher, *self._commands):
                task.cancel()
            for task in (events, flusher, *self._commands):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _session(self, stub: task_manager_service_pb2_grpc.TaskManagerServiceStub) -> bool:
        """One stream, until it ends; returns whether the WMS welcomed it."""
        outbox: asyncio.Queue[Request | None] = asyncio.Queue()
        outbox.put_nowait(
            Request(
                hello=tms_pb2.TmsHello(
                    cluster_location=self._location,
                    scheduler=self._scheduler.name,
                    tms_id=self.tms_id,
                    version=VERSION,
                )
            )
        )

        async def requests() -> AsyncIterator[Request]:
            while (item := await outbox.get()) is not None:
                yield item

        metadata = (("authorization", f"Bearer {self._token}"),) if self._token else ()
        call = stub.Connect(requests(), metadata=metadata)
        stopper = asyncio.create_task(self._stopping.wait())
        welcomed = False
        try:
            reader = aiter(call)
            while True:
                next_msg = asyncio.ensure_future(anext(reader))
                done, _ = await asyncio.wait(
                    {next_msg, stopper}, return_when=asyncio.FIRST_COMPLETED
                )
                if stopper in done:
                    next_msg.cancel()
                    return welcomed
                try:
                    msg = next_msg.result()
                except StopAsyncIteration:
                    return welcomed
                kind = msg.WhichOneof("kind")
                if kind == "welcome":
                    welcomed = True
                    await self._welcomed(msg.welcome, outbox)
                elif kind == "start":
                    self._spawn(self._start(msg.start))
                elif kind == "stop":
                    self._spawn(self._stop(msg.stop))
        finally:
            stopper.cancel()
            if self._outbox is outbox:
                self._outbox = None
            outbox.put_nowait(None)
            call.cancel()

    async def _welcomed(
        self, welcome: tms_pb2.TmsWelcome, outbox: asyncio.Queue[Request | None]
    ) -> None:
        log.info(
            "tms connected", location=welcome.cluster_location, n_clusters=len(welcome.clusters)
        )
        await self._scheduler.adopt(
            [
                Submitted(
                    taskforce_uuid=c.taskforce_uuid,
                    cluster_id=c.cluster_id,
                    n_workers=c.n_workers,
                    job_event_log_fpath=c.job_event_log_fpath,
                )
                for c in welcome.clusters
            ]
        )
        snap = self.book.full()
        if snap is not None:
            outbox.put_nowait(Request(snapshot=snap))
        for c in welcome.clusters:
            when = self.book.left.get(c.taskforce_uuid)
            if when is not None:
                outbox.put_nowait(self._completed(c.taskforce_uuid, when))
        self._outbox = outbox
        self.connected.set()

    def _send(self, req: Request) -> None:
        """Up the stream if connected; else dropped (the WMS re-sends its command, and job states
        go in the next full snapshot)."""
        if self._outbox is not None:
            self._outbox.put_nowait(req)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _start(self, start: tms_pb2.StartTaskforce) -> None:
        uuid = start.taskforce.taskforce_uuid
        # Starts of one taskforce run one at a time: a re-sent start finds the first's cluster.
        async with self._locks.setdefault(uuid, asyncio.Lock()):
            try:
                found = await self._scheduler.find(uuid)
                if found is None:
                    spec = submit_spec(start, self._site_env)
                    found = await self._scheduler.submit(spec)
                    self.submits += 1
                    log.info(
                        "taskforce submitted",
                        taskforce_uuid=uuid,
                        cluster_id=found.cluster_id,
                        n_workers=found.n_workers,
                    )
                else:
                    log.info(
                        "taskforce already submitted",
                        taskforce_uuid=uuid,
                        cluster_id=found.cluster_id,
                    )
            except (SchedulerError, PilotEnvError, OSError) as exc:
                log.warning("submit failed", taskforce_uuid=uuid, error=str(exc))
                self._send(
                    Request(
                        submit_failed=tms_pb2.TaskforceCommandFailed(
                            taskforce_uuid=uuid, error=str(exc) or type(exc).__name__
                        )
                    )
                )
                return
        self._send(
            Request(
                submitted=tms_pb2.TaskforceSubmitted(
                    taskforce_uuid=uuid,
                    cluster_id=found.cluster_id,
                    n_workers=found.n_workers,
                    submit_dict=dict(found.submit_dict),
                    job_event_log_fpath=found.job_event_log_fpath,
                )
            )
        )

    async def _stop(self, stop: tms_pb2.StopTaskforce) -> None:
        uuid = stop.taskforce_uuid
        async with self._locks.setdefault(uuid, asyncio.Lock()):
            try:
                await self._scheduler.remove(stop.cluster_id, stop.reason or "Requested by EWMS")
            except (SchedulerError, OSError) as exc:
                log.warning("remove failed", taskforce_uuid=uuid, error=str(exc))
                self._send(
                    Request(
                        remove_failed=tms_pb2.TaskforceCommandFailed(
                            taskforce_uuid=uuid, error=str(exc) or type(exc).__name__
                        )
                    )
                )
                return
        log.info("taskforce removed", taskforce_uuid=uuid, cluster_id=stop.cluster_id)
        self._send(Request(removed=tms_pb2.TaskforceRemoved(taskforce_uuid=uuid)))

    @staticmethod
    def _completed(uuid: str, when: float) -> Request:
        return Request(
            completed=tms_pb2.TaskforceCompleted(taskforce_uuid=uuid, complete_ts=_ts(when))
        )

    async def _follow_scheduler(self) -> None:
        async for event in self._scheduler.events():
            self.book.apply(event)
            if not isinstance(event, ClusterLeft):
                self._flush_wanted.set()
            else:
                # Job states first, so the WMS sees every job leave before the cluster does.
                self._flush()
                self._send(self._completed(event.taskforce_uuid, event.time))

    async def _flush_changes(self) -> None:
        """Send what changed, coalescing the changes that arrive together."""
        while True:
            await self._flush_wanted.wait()
            await asyncio.sleep(0)
            self._flush_wanted.clear()
            self._flush()

    def _flush(self) -> None:
        if self._outbox is None:
            return  # the next welcome sends everything
        snap = self.book.changes()
        if snap is not None:
            self._send(Request(snapshot=snap))
