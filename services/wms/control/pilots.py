"""PilotService and the pilot registry: the WMS's side of every pilot's stream.

A pilot says hello, then streams its status and per-task lifecycle events (in batches, or one per
message from older pilots); the WMS can send it drain and stop. The registry keeps the latest state
of every pilot in memory and writes it behind: one flusher task, started when something becomes
dirty and ended when nothing is, commits the dirty pilots, their taskforces' roll-ups
(``Taskforce.counters``, ``top_task_errors``) and new commands in one transaction at most every
``flush_interval`` seconds. Lifecycle events are kept in memory only (the last
``RECENT_TASK_EVENTS`` per taskforce) and handed to listeners, one change per event, whether they
came alone or in a batch. A worker whose pilot never opened a stream is known by what it chirped
into its HTCondor job event log, as its TMS reports it (``report_chirps``); a pilot's own stream
wins (``joined_pilots``). A pilot whose stream ends without DONE or FATAL_ERROR is LOST as soon as
its TMS reports its job ended (``report_job_states``), or after ``LOST_AFTER`` seconds without a
reconnect; a pilot that reconnects is live again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import heapq
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from ewms.v1 import (
    pilot_service_pb2,
    pilot_service_pb2_grpc,
    taskforce_pb2,
    workflow_pb2,
)
from services.auth import Role, current_principal
from services.errors import ApiError, InvalidArgument, NotFound, PermissionDenied, grpc_errors
from services.wms.control.streams import Outbox
from services.wms.store import TASKFORCES, WORKFLOWS, Store, Tx
from services.wms.validation import Violations, check_timestamp

log = structlog.get_logger(__name__)

Ctx = Any  # grpc.aio.ServicerContext; grpc ships no type information
Response = pilot_service_pb2.PilotServiceConnectResponse
PilotPhase = taskforce_pb2.PilotPhase

FLUSH_INTERVAL = 0.25
# After a failed flush the dirty state stays in memory and is tried again this much later.
FLUSH_RETRY_SECONDS = 5.0
RECENT_TASK_EVENTS = 100
TOP_TASK_ERRORS = 10
MAX_ERROR_CHARS = 4096
MAX_WORKER_ID_CHARS = 128
MAX_HOST_CHARS = 255
MAX_VERSION_CHARS = 128
# A counter no pilot reaches; summed over a taskforce's pilots it stays an int64 (beyond one, the
# roll-up cannot be stored, and every pilot's write-behind failed with it).
MAX_COUNTER = 10**12
TASK_EVENT_KINDS = (
    pilot_service_pb2.TASK_EVENT_KIND_STARTED,
    pilot_service_pb2.TASK_EVENT_KIND_FINISHED,
    pilot_service_pb2.TASK_EVENT_KIND_FAILED,
)
REASON_WORKFLOW_FINISHED = "workflow finished"
REASON_WORKFLOW_ABORTED = "workflow aborted"
# Seconds a pilot whose stream ended without DONE or FATAL_ERROR has to reconnect (its backoff
# tops out at 30 s) before it is LOST, counted from this WMS's start at the earliest: an outage of
# the WMS is no pilot's fault.
LOST_AFTER = 120.0
# Phases after which a stream's end loses nothing: the pilot said how it ended (or was lost).
FINAL_PHASES = frozenset(
    {PilotPhase.PILOT_PHASE_DONE, PilotPhase.PILOT_PHASE_FATAL_ERROR, PilotPhase.PILOT_PHASE_LOST}
)
# Job states of a job whose process is gone: its pilot cannot come back.
ENDED_JOB_STATES = frozenset(
    {
        taskforce_pb2.JOB_STATE_COMPLETED,
        taskforce_pb2.JOB_STATE_REMOVED,
        taskforce_pb2.JOB_STATE_HELD,
    }
)


class Replaced(ApiError):
    """The pilot opened a newer stream; this one is ended."""

    code = grpc.StatusCode.ABORTED


class ShuttingDown(ApiError):
    """The WMS is stopping; the pilot should reconnect (to the next WMS)."""

    code = grpc.StatusCode.UNAVAILABLE


def _error_text(error: str) -> str:
    return error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 1] + "…"


# --- what the registry holds and hands out (immutable, so listeners may keep them) ---


@dataclass(frozen=True, slots=True)
class Counters:
    """A pilot's counters (``TaskCounters``)."""

    events_received: int = 0
    tasks_succeeded: int = 0
    tasks_failed: int = 0
    events_published: int = 0

    @classmethod
    def from_proto(cls, msg: taskforce_pb2.TaskCounters) -> Counters:
        return cls(msg.events_received, msg.tasks_succeeded, msg.tasks_failed, msg.events_published)

    def to_proto(self) -> taskforce_pb2.TaskCounters:
        return taskforce_pb2.TaskCounters(**dataclasses.asdict(self))

    def __add__(self, other: Counters) -> Counters:
        return Counters(
            self.events_received + other.events_received,
            self.tasks_succeeded + other.tasks_succeeded,
            self.tasks_failed + other.tasks_failed,
            self.events_published + other.events_published,
        )

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.events_received - other.events_received,
            self.tasks_succeeded - other.tasks_succeeded,
            self.tasks_failed - other.tasks_failed,
            self.events_published - other.events_published,
        )


@dataclass(frozen=True, slots=True)
class PilotState:
    """The latest state of one pilot, keyed (taskforce_uuid, worker_id). Times are epoch seconds;
    ``status_time`` is the pilot's own timestamp of its last status (None before one)."""

    taskforce_uuid: str
    worker_id: str
    host: str
    pilot_version: str
    phase: taskforce_pb2.PilotPhase.ValueType
    counters: Counters
    last_error: str
    connected: bool
    first_seen: float
    last_seen: float
    status_time: float | None = None


@dataclass(frozen=True, slots=True)
class TaskEventRecord:
    """A task lifecycle event and the pilot that reported it."""

    taskforce_uuid: str
    worker_id: str
    event: pilot_service_pb2.TaskLifecycleEvent


class ChangeKind(enum.StrEnum):
    """What happened to a pilot."""

    CONNECTED = "connected"
    STATUS = "status"
    TASK_EVENT = "task_event"
    DISCONNECTED = "disconnected"
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class PilotChange:
    """One change, as listeners receive it: the pilot's state after it, and for TASK_EVENT the
    event (do not modify it)."""

    kind: ChangeKind
    workflow_id: str
    pilot: PilotState
    task_event: pilot_service_pb2.TaskLifecycleEvent | None = None


PilotListener = Callable[[PilotChange], None]


class CommandKind(enum.StrEnum):
    """What the WMS tells a taskforce's pilots; STOP outranks DRAIN."""

    DRAIN = "drain"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class PilotCommand:
    """A command for every pilot of a taskforce, now and later."""

    kind: CommandKind
    reason: str

    def message(self) -> pilot_service_pb2.PilotServiceConnectResponse:
        """The command as the stream carries it."""
        if self.kind is CommandKind.STOP:
            return Response(stop=pilot_service_pb2.PilotStop(reason=self.reason))
        return Response(drain=pilot_service_pb2.PilotDrain(reason=self.reason))


def deactivation_command(kind: workflow_pb2.Deactivation.ValueType) -> PilotCommand | None:
    """What a workflow's pilots are told when it is deactivated: finished drains, aborted stops."""
    if kind == workflow_pb2.DEACTIVATION_FINISHED:
        return PilotCommand(CommandKind.DRAIN, REASON_WORKFLOW_FINISHED)
    if kind == workflow_pb2.DEACTIVATION_ABORTED:
        return PilotCommand(CommandKind.STOP, REASON_WORKFLOW_ABORTED)
    return None


def top_errors(errors: Mapping[str, int]) -> dict[str, int]:
    """A taskforce's top task errors from how many of its pilots last reported each error: the
    most frequent (at most TOP_TASK_ERRORS), ties broken by the error text, so the choice is
    stable."""
    return dict(heapq.nsmallest(TOP_TASK_ERRORS, errors.items(), key=lambda e: (-e[1], e[0])))


# --- one open stream ---


class PilotSession(Outbox[Response]):
    """One pilot's open stream: what to send down it, and how it ends."""

    def __init__(self, taskforce_uuid: str, worker_id: str) -> None:
        super().__init__()
        self.taskforce_uuid = taskforce_uuid
        self.worker_id = worker_id


@dataclass
class _Taskforce:
    """A taskforce's pilots (every one ever stored, once loaded), streams and recent events, and
    what its TMS says its pilots chirped (memory only: a TMS re-sends it after a reconnect).

    Its roll-up (counters summed over the joined pilots, how many last reported each error) is
    kept current one worker at a time, so ``pilots`` and ``chirped`` change only through
    ``set_pilot`` and ``set_chirped``: a pass over thousands of pilots per status or per watch
    message is what saturated the WMS."""

    workflow_id: str
    pilots: dict[str, PilotState]
    sessions: dict[str, PilotSession] = field(default_factory=dict)
    events: deque[TaskEventRecord] = field(default_factory=lambda: deque(maxlen=RECENT_TASK_EVENTS))
    chirped: dict[str, PilotState] = field(default_factory=dict)
    # Workers whose job its TMS says has ended (ENDED_JOB_STATES); memory only, like ``chirped``.
    ended_jobs: set[str] = field(default_factory=set)
    total: Counters = field(default_factory=Counters)
    errors: Counter[str] = field(default_factory=Counter)
    top: dict[str, int] | None = None

    def __post_init__(self) -> None:
        for pilot in _joined(self).values():
            self._moved(None, pilot)

    def joined(self, worker_id: str) -> PilotState | None:
        """The worker's state as ``_joined`` has it: its pilot's own, else what it chirped."""
        pilot = self.pilots.get(worker_id)
        return pilot if pilot is not None else self.chirped.get(worker_id)

    def set_pilot(self, pilot: PilotState) -> None:
        """A pilot's new state (from its stream, or loaded)."""
        old = self.joined(pilot.worker_id)
        self.pilots[pilot.worker_id] = pilot
        self._moved(old, pilot)

    def set_chirped(self, worker_id: str, chirped: PilotState | None) -> bool:
        """What the worker's pilot chirped (None: nothing); whether that changed."""
        if self.chirped.get(worker_id) == chirped:
            return False
        old = self.joined(worker_id)
        if chirped is None:
            del self.chirped[worker_id]
        else:
            self.chirped[worker_id] = chirped
        self._moved(old, self.joined(worker_id))
        return True

    def rollup(self) -> tuple[Counters, dict[str, int]]:
        """Counters summed over the joined pilots, and the top task errors (do not modify)."""
        if self.top is None:
            self.top = top_errors(self.errors)
        return self.total, self.top

    def _moved(self, old: PilotState | None, new: PilotState | None) -> None:
        """One worker's joined state went from ``old`` to ``new``: adjust the roll-up."""
        old_counters = old.counters if old is not None else None
        new_counters = new.counters if new is not None else None
        if old_counters != new_counters:
            if old_counters is not None:
                self.total -= old_counters
            if new_counters is not None:
                self.total += new_counters
        old_error = old.last_error if old is not None else ""
        new_error = new.last_error if new is not None else ""
        if old_error != new_error:
            if old_error:
                self.errors[old_error] -= 1
                if not self.errors[old_error]:
                    del self.errors[old_error]
            if new_error:
                self.errors[new_error] += 1
            self.top = None


_PILOT_COLUMNS = (
    "taskforce_uuid, worker_id, host, pilot_version, phase, events_received, tasks_succeeded, "
    "tasks_failed, events_published, last_error, connected, first_seen, last_seen, status_ts"
)
_UPSERT_PILOT = (
    f"INSERT INTO pilots ({_PILOT_COLUMNS}) VALUES ({', '.join('?' * 14)}) "
    "ON CONFLICT (taskforce_uuid, worker_id) DO UPDATE SET host = excluded.host, "
    "pilot_version = excluded.pilot_version, phase = excluded.phase, "
    "events_received = excluded.events_received, tasks_succeeded = excluded.tasks_succeeded, "
    "tasks_failed = excluded.tasks_failed, events_published = excluded.events_published, "
    "last_error = excluded.last_error, connected = excluded.connected, "
    "first_seen = excluded.first_seen, last_seen = excluded.last_seen, "
    "status_ts = excluded.status_ts"
)
_UPSERT_COMMAND = (
    "INSERT INTO pilot_commands (taskforce_uuid, command, reason, recorded) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (taskforce_uuid) DO UPDATE SET command = excluded.command, "
    "reason = excluded.reason, recorded = excluded.recorded"
)


def _row(p: PilotState) -> tuple[Any, ...]:
    c = p.counters
    return (
        p.taskforce_uuid,
        p.worker_id,
        p.host,
        p.pilot_version,
        int(p.phase),
        c.events_received,
        c.tasks_succeeded,
        c.tasks_failed,
        c.events_published,
        p.last_error,
        int(p.connected),
        p.first_seen,
        p.last_seen,
        p.status_time,
    )


def _from_row(row: tuple[Any, ...]) -> PilotState:
    return PilotState(
        taskforce_uuid=row[0],
        worker_id=row[1],
        host=row[2],
        pilot_version=row[3],
        phase=row[4],
        counters=Counters(row[5], row[6], row[7], row[8]),
        last_error=row[9],
        connected=bool(row[10]),
        first_seen=row[11],
        last_seen=row[12],
        status_time=row[13],
    )


def _joined(tf: _Taskforce) -> dict[str, PilotState]:
    if not tf.chirped:
        return tf.pilots
    return {**tf.chirped, **tf.pilots}


def _caught_up(pilot: PilotState, events: Sequence[TaskEventRecord]) -> Counters:
    """The pilot's counters plus its lifecycle events stamped after its last status (as far as
    the taskforce's recent events still hold them): the pilot counts an event (received,
    succeeded, failed) in the same step as it makes its lifecycle event, so a status counts exactly
    the events stamped before it. ``events_published`` has no lifecycle event and stays."""
    since = pilot.status_time
    kinds: Counter[int] = Counter()
    for record in events:
        stamp = record.event.timestamp.ToNanoseconds() / 1e9
        if record.worker_id == pilot.worker_id and (since is None or stamp > since):
            kinds[record.event.kind] += 1
    c = pilot.counters
    return Counters(
        c.events_received + kinds[pilot_service_pb2.TASK_EVENT_KIND_STARTED],
        c.tasks_succeeded + kinds[pilot_service_pb2.TASK_EVENT_KIND_FINISHED],
        c.tasks_failed + kinds[pilot_service_pb2.TASK_EVENT_KIND_FAILED],
        c.events_published,
    )


# --- the registry ---


class PilotRegistry:
    """Every pilot's latest state, their open streams and the taskforces' commands.

    Open with ``await PilotRegistry.open(store)``; ``await close()`` flushes what is pending. All
    methods run on the event loop; listeners are called there, synchronously, and must not block.
    """

    def __init__(
        self,
        store: Store,
        commands: dict[str, PilotCommand],
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self._store = store
        self._commands = commands
        self._flush_interval = flush_interval
        self._taskforces: dict[str, _Taskforce] = {}
        self._listeners: list[PilotListener] = []
        self._dirty_pilots: set[tuple[str, str]] = set()
        self._dirty_commands: set[str] = set()
        # Taskforces whose roll-up changed with no pilot row to write (chirps).
        self._dirty_rollups: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        # Store transactions made for pilot state (one per flush), so coalescing can be observed.
        self.flushes = 0
        # Seconds a pilot gone without a word may take to reconnect before it is LOST (tests
        # shorten it); the timers of the pilots being waited for.
        self.lost_after = LOST_AFTER
        self._opened = time.time()
        self._lost_timers: dict[tuple[str, str], asyncio.TimerHandle] = {}

    @classmethod
    async def open(cls, store: Store, flush_interval: float = FLUSH_INTERVAL) -> PilotRegistry:
        """A registry over ``store``: pilots stored as connected lost their stream when the last
        WMS stopped, so they are marked disconnected; the taskforces' commands are loaded."""

        def load(tx: Tx) -> dict[str, PilotCommand]:
            tx.sql.execute("UPDATE pilots SET connected = 0 WHERE connected = 1")
            rows = tx.sql.execute("SELECT taskforce_uuid, command, reason FROM pilot_commands")
            return {uuid: PilotCommand(CommandKind(kind), reason) for uuid, kind, reason in rows}

        return cls(store, await store.run(load), flush_interval)

    async def close(self) -> None:
        """End every stream (UNAVAILABLE: the pilots reconnect to the next WMS), mark its pilot
        disconnected and commit everything pending. New streams are refused from now on."""
        if self._closing.is_set():
            return
        # Set first: streams ended by the WMS's own stop lose no pilot (they reconnect).
        self._closing.set()
        for tf in self._taskforces.values():
            for session in list(tf.sessions.values()):
                session.end(ShuttingDown("the WMS is shutting down; reconnect"))
                self.disconnect(session)
        for timer in self._lost_timers.values():
            timer.cancel()
        self._lost_timers.clear()
        if self._flusher is not None:
            await self._flusher
        if self._dirty_pilots or self._dirty_commands or self._dirty_rollups:
            await self._flush()

    # --- in-process API ---

    def drain(self, taskforce_uuid: str, reason: str) -> int:
        """Tell the taskforce's pilots to drain; see ``command``."""
        return self.command(taskforce_uuid, PilotCommand(CommandKind.DRAIN, reason))

    def stop(self, taskforce_uuid: str, reason: str) -> int:
        """Tell the taskforce's pilots to stop; see ``command``."""
        return self.command(taskforce_uuid, PilotCommand(CommandKind.STOP, reason))

    def command(self, taskforce_uuid: str, command: PilotCommand) -> int:
        """Send ``command`` to every connected pilot of the taskforce and remember it (durably,
        with the next flush), so pilots connecting later get it right after their welcome.
        A drain after a stop changes nothing. Returns how many pilots it was sent to."""
        current = self._commands.get(taskforce_uuid)
        if (
            current is not None
            and current.kind is CommandKind.STOP
            and command.kind is not CommandKind.STOP
        ):
            return 0
        if current != command:
            self._commands[taskforce_uuid] = command
            self._dirty_commands.add(taskforce_uuid)
            self._schedule_flush()
        tf = self._taskforces.get(taskforce_uuid)
        sessions = list(tf.sessions.values()) if tf is not None else []
        msg = command.message()
        for session in sessions:
            session.send(msg)
        log.info(
            "pilot command",
            taskforce_uuid=taskforce_uuid,
            command=command.kind.value,
            reason=command.reason,
            n_pilots=len(sessions),
        )
        return len(sessions)

    def command_of(self, taskforce_uuid: str) -> PilotCommand | None:
        """The command the taskforce's pilots were given, if any."""
        return self._commands.get(taskforce_uuid)

    async def pilots(self, taskforce_uuid: str) -> list[PilotState]:
        """Every pilot the taskforce ever had, in order of first hello; NOT_FOUND if the taskforce
        does not exist."""
        tf = await self._taskforce(taskforce_uuid)
        return sorted(tf.pilots.values(), key=lambda p: (p.first_seen, p.worker_id))

    async def load(self, taskforce_uuid: str) -> None:
        """Load the taskforce's stored pilots into memory, if not yet (NOT_FOUND if it does not
        exist)."""
        await self._taskforce(taskforce_uuid)

    def loaded_pilots(self, taskforce_uuid: str) -> dict[str, PilotState] | None:
        """The taskforce's pilots by worker id, if loaded (do not modify)."""
        tf = self._taskforces.get(taskforce_uuid)
        return tf.pilots if tf is not None else None

    def joined_pilots(self, taskforce_uuid: str) -> dict[str, PilotState] | None:
        """``loaded_pilots`` and, for workers no pilot of which ever opened a stream, the state
        their pilots chirped: a pilot's own stream wins (do not modify)."""
        tf = self._taskforces.get(taskforce_uuid)
        if tf is None:
            return None
        return _joined(tf)

    def joined(self, taskforce_uuid: str, worker_id: str) -> PilotState | None:
        """One worker's entry of ``joined_pilots`` (None if the taskforce is not loaded)."""
        tf = self._taskforces.get(taskforce_uuid)
        return tf.joined(worker_id) if tf is not None else None

    def rollup(self, taskforce_uuid: str) -> tuple[Counters, dict[str, int]] | None:
        """The taskforce's counters, summed over ``joined_pilots``, and its top task errors: the
        most frequent non-empty ``last_error`` values with how many pilots last reported each
        (``top_errors``); None if it is not loaded or has no pilots (do not modify)."""
        tf = self._taskforces.get(taskforce_uuid)
        if tf is None or not (tf.pilots or tf.chirped):
            return None
        return tf.rollup()

    def report_chirps(
        self, taskforce_uuid: str, chirped: Mapping[str, PilotState | None], *, full: bool
    ) -> None:
        """What the taskforce's TMS says its pilots chirped, by worker id (None: nothing), every
        worker when ``full``; the taskforce must be loaded. Changes the roll-up (written behind),
        not the pilots: listeners are not told."""
        tf = self._taskforces[taskforce_uuid]
        changed = False
        if full:
            for worker in [w for w in tf.chirped if chirped.get(w) is None]:
                changed |= tf.set_chirped(worker, None)
        for worker, state in chirped.items():
            changed |= tf.set_chirped(worker, state)
        if changed:
            self._dirty_rollups.add(taskforce_uuid)
            self._schedule_flush()

    def report_job_states(
        self, taskforce_uuid: str, states: Mapping[str, int], *, full: bool
    ) -> None:
        """The scheduler's job states of the taskforce's workers, by worker id (every worker when
        ``full``); the taskforce must be loaded. A worker whose job has ended (COMPLETED, REMOVED,
        HELD: its process is gone) while its pilot's stream is gone without DONE or FATAL_ERROR
        is LOST now, whichever of the two was heard first."""
        tf = self._taskforces[taskforce_uuid]
        if full:
            tf.ended_jobs.clear()
        for worker, state in states.items():
            if state in ENDED_JOB_STATES:
                tf.ended_jobs.add(worker)
            else:
                tf.ended_jobs.discard(worker)
        for worker in tf.ended_jobs.intersection(states):
            self._lose_if_gone(tf, worker, "its job ended")

    def recent_task_events(self, taskforce_uuid: str) -> list[TaskEventRecord]:
        """The taskforce's last RECENT_TASK_EVENTS task lifecycle events since this WMS started,
        oldest first."""
        tf = self._taskforces.get(taskforce_uuid)
        return list(tf.events) if tf is not None else []

    def connected_count(self) -> int:
        """How many pilots have a stream open now."""
        return sum(len(tf.sessions) for tf in self._taskforces.values())

    def listen(self, listener: PilotListener) -> Callable[[], None]:
        """Call ``listener`` with every pilot change from now on; returns the function that stops
        it. A listener that raises is logged and kept."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    # --- used by the PilotService stream ---

    async def connect(self, hello: pilot_service_pb2.PilotHello) -> PilotSession:
        """Register a validated hello's stream, replacing the pilot's previous one; queue the
        taskforce's command, if any. NOT_FOUND if the taskforce does not exist."""
        tf = await self._taskforce(hello.taskforce_uuid)
        if self._closing.is_set():
            raise ShuttingDown("the WMS is shutting down; reconnect")
        now = time.time()
        worker = hello.worker_id
        previous = tf.pilots.get(worker)
        self._stop_waiting(hello.taskforce_uuid, worker)
        if previous is not None and previous.phase == PilotPhase.PILOT_PHASE_LOST:
            # Live again (it was cut off, not dead): its status follows its hello at once.
            log.info("lost pilot is back", taskforce_uuid=hello.taskforce_uuid, worker_id=worker)
            previous = dataclasses.replace(previous, phase=PilotPhase.PILOT_PHASE_UNSPECIFIED)
        tf.set_pilot(
            PilotState(
                taskforce_uuid=hello.taskforce_uuid,
                worker_id=worker,
                host=hello.host,
                pilot_version=hello.pilot_version,
                phase=previous.phase if previous else PilotPhase.PILOT_PHASE_UNSPECIFIED,
                counters=previous.counters if previous else Counters(),
                last_error=previous.last_error if previous else "",
                connected=True,
                first_seen=previous.first_seen if previous else now,
                last_seen=now,
                status_time=previous.status_time if previous else None,
            )
        )
        session = PilotSession(hello.taskforce_uuid, worker)
        old = tf.sessions.get(worker)
        tf.sessions[worker] = session
        if old is not None:
            old.end(Replaced(f"pilot {worker} of {hello.taskforce_uuid} opened a newer stream"))
        command = self._commands.get(hello.taskforce_uuid)
        if command is not None:
            session.send(command.message())
        self._changed(tf, worker, ChangeKind.CONNECTED)
        return session

    def report_status(self, session: PilotSession, status: pilot_service_pb2.PilotStatus) -> None:
        """Apply a validated status (ignored from a replaced stream)."""
        tf = self._current(session)
        if tf is None:
            return
        pilot = tf.pilots[session.worker_id]
        tf.set_pilot(
            dataclasses.replace(
                pilot,
                phase=status.phase,
                counters=Counters.from_proto(status.counters),
                last_error=_error_text(status.last_error),
                last_seen=time.time(),
                status_time=(
                    status.timestamp.ToNanoseconds() / 1e9
                    if status.HasField("timestamp")
                    else pilot.status_time
                ),
            )
        )
        self._changed(tf, session.worker_id, ChangeKind.STATUS)

    def report_task_event(
        self, session: PilotSession, event: pilot_service_pb2.TaskLifecycleEvent
    ) -> None:
        """Keep a validated lifecycle event in memory and tell listeners (not stored)."""
        self.report_task_events(session, (event,))

    def report_task_events(
        self, session: PilotSession, events: Sequence[pilot_service_pb2.TaskLifecycleEvent]
    ) -> None:
        """Keep validated lifecycle events in memory, in order, and tell listeners of each, one
        TASK_EVENT change per event (not stored; ignored from a replaced stream). The pilot's own
        state is touched once per batch, which is what makes batches cheap."""
        tf = self._current(session)
        if tf is None or not events:
            return
        now_ns = time.time_ns()
        worker = session.worker_id
        pilot = dataclasses.replace(tf.pilots[worker], last_seen=now_ns / 1e9)
        tf.set_pilot(pilot)
        self._touched(pilot)
        notify = bool(self._listeners)
        for event in events:
            if not event.HasField("timestamp"):
                event.timestamp.FromNanoseconds(now_ns)
            if len(event.error) > MAX_ERROR_CHARS:
                event.error = _error_text(event.error)
            tf.events.append(TaskEventRecord(session.taskforce_uuid, worker, event))
            if notify:
                self._notify(PilotChange(ChangeKind.TASK_EVENT, tf.workflow_id, pilot, event))

    def disconnect(self, session: PilotSession) -> None:
        """The stream ended: its pilot is disconnected (unless a newer stream replaced it); its
        last phase stays. Unless that phase is final, the pilot is LOST if its job has ended, or
        if it does not reconnect within ``lost_after`` seconds."""
        tf = self._current(session)
        if tf is None:
            return
        del tf.sessions[session.worker_id]
        tf.set_pilot(
            dataclasses.replace(
                tf.pilots[session.worker_id], connected=False, last_seen=time.time()
            )
        )
        self._changed(tf, session.worker_id, ChangeKind.DISCONNECTED)
        if session.worker_id in tf.ended_jobs:
            self._lose_if_gone(tf, session.worker_id, "its job ended")
        else:
            self._wait_for_reconnect(tf, session.worker_id, self.lost_after)

    # --- lost pilots ---

    def _wait_for_reconnect(self, tf: _Taskforce, worker_id: str, delay: float) -> None:
        """LOST in ``delay`` seconds unless the pilot reconnects (or is final) by then."""
        pilot = tf.pilots[worker_id]
        if self._closing.is_set() or pilot.connected or pilot.phase in FINAL_PHASES:
            return
        key = (pilot.taskforce_uuid, worker_id)
        self._stop_waiting(*key)
        self._lost_timers[key] = asyncio.get_running_loop().call_later(
            max(0.0, delay), self._reconnect_overdue, tf, worker_id
        )

    def _stop_waiting(self, taskforce_uuid: str, worker_id: str) -> None:
        timer = self._lost_timers.pop((taskforce_uuid, worker_id), None)
        if timer is not None:
            timer.cancel()

    def _reconnect_overdue(self, tf: _Taskforce, worker_id: str) -> None:
        self._lost_timers.pop((tf.pilots[worker_id].taskforce_uuid, worker_id), None)
        self._lose_if_gone(tf, worker_id, f"no reconnect within {self.lost_after:g} s")

    def _lose_if_gone(self, tf: _Taskforce, worker_id: str, why: str) -> None:
        """Mark the pilot LOST if its stream is gone and it never said how it ended; its counters
        catch up with the lifecycle events it sent after its last status (the status that would
        have counted them never comes)."""
        pilot = tf.pilots.get(worker_id)
        if self._closing.is_set() or pilot is None or pilot.connected:
            return
        if pilot.phase in FINAL_PHASES:
            return
        self._stop_waiting(pilot.taskforce_uuid, worker_id)
        counters = _caught_up(pilot, tf.events)
        log.warning(
            "pilot lost",
            taskforce_uuid=pilot.taskforce_uuid,
            worker_id=worker_id,
            why=why,
            last_phase=PilotPhase.Name(pilot.phase),
        )
        tf.set_pilot(
            dataclasses.replace(pilot, phase=PilotPhase.PILOT_PHASE_LOST, counters=counters)
        )
        self._changed(tf, worker_id, ChangeKind.LOST)

    # --- internals ---

    def _current(self, session: PilotSession) -> _Taskforce | None:
        """The session's taskforce, if the session is still its pilot's stream."""
        tf = self._taskforces.get(session.taskforce_uuid)
        if tf is None or tf.sessions.get(session.worker_id) is not session:
            return None
        return tf

    async def _taskforce(self, taskforce_uuid: str) -> _Taskforce:
        """The taskforce's in-memory state, loaded with its stored pilots on first use."""
        tf = self._taskforces.get(taskforce_uuid)
        if tf is not None:
            return tf

        def load(
            tx: Tx,
        ) -> tuple[taskforce_pb2.Taskforce | None, workflow_pb2.Workflow | None, list[PilotState]]:
            found = tx.get(TASKFORCES, taskforce_uuid)
            if found is None:
                return None, None, []
            wf = tx.get(WORKFLOWS, found.workflow_id)
            rows = tx.sql.execute(
                f"SELECT {_PILOT_COLUMNS} FROM pilots WHERE taskforce_uuid = ?", (taskforce_uuid,)
            )
            return found, wf, [_from_row(row) for row in rows]

        found, wf, stored = await self._store.run(load, write=False)
        if found is None:
            raise NotFound(f"taskforce {taskforce_uuid!r} not found")
        # Another caller may have loaded it meanwhile; its state is newer than the store's.
        loaded = _Taskforce(found.workflow_id, {p.worker_id: p for p in stored})
        tf = self._taskforces.setdefault(taskforce_uuid, loaded)
        if tf is loaded:
            # Stored pilots have no stream to this WMS: they are waited for as if theirs had just
            # ended, at the earliest when this WMS started.
            now = time.time()
            for p in stored:
                due = max(p.last_seen, self._opened) + self.lost_after
                self._wait_for_reconnect(tf, p.worker_id, due - now)
        if wf is not None and taskforce_uuid not in self._commands:
            # The workflow was deactivated but its command never reached the store (the WMS
            # stopped in between): derive it again.
            derived = deactivation_command(wf.deactivated)
            if derived is not None:
                self._commands[taskforce_uuid] = derived
        return tf

    def _changed(
        self,
        tf: _Taskforce,
        worker_id: str,
        kind: ChangeKind,
        task_event: pilot_service_pb2.TaskLifecycleEvent | None = None,
    ) -> None:
        pilot = tf.pilots[worker_id]
        self._touched(pilot)
        if self._listeners:
            self._notify(PilotChange(kind, tf.workflow_id, pilot, task_event))

    def _touched(self, pilot: PilotState) -> None:
        """The pilot's state changed: write it behind."""
        self._dirty_pilots.add((pilot.taskforce_uuid, pilot.worker_id))
        self._schedule_flush()

    def _notify(self, change: PilotChange) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("pilot change listener failed", kind=change.kind.value)

    def _schedule_flush(self) -> None:
        if self._flusher is None and not self._closing.is_set():
            self._flusher = asyncio.create_task(self._flush_while_dirty(), name="pilot-flusher")

    async def _flush_while_dirty(self) -> None:
        """Flush now, then at most once per interval while there is something to flush; end when
        there is nothing (the next change starts a new flusher)."""
        try:
            while self._dirty_pilots or self._dirty_commands or self._dirty_rollups:
                ok = await self._flush()
                if self._closing.is_set():
                    return
                pause = self._flush_interval if ok else FLUSH_RETRY_SECONDS
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), pause)
        finally:
            self._flusher = None

    async def _flush(self) -> bool:
        """Commit the dirty pilots, their taskforces' roll-ups and new commands in one
        transaction; on failure they stay dirty. Returns whether it committed."""
        keys, self._dirty_pilots = self._dirty_pilots, set()
        command_keys, self._dirty_commands = self._dirty_commands, set()
        rollup_keys, self._dirty_rollups = self._dirty_rollups, set()
        rows = [_row(self._taskforces[uuid].pilots[worker]) for uuid, worker in keys]
        rollups = {
            uuid: self._taskforces[uuid].rollup() for uuid in {u for u, _ in keys} | rollup_keys
        }
        now = time.time()
        commands = [
            (uuid, c.kind.value, c.reason, now)
            for uuid in command_keys
            if (c := self._commands.get(uuid)) is not None
        ]

        def write(tx: Tx) -> None:
            tx.sql.executemany(_UPSERT_PILOT, rows)
            for uuid, (counters, errors) in rollups.items():
                found = tx.get(TASKFORCES, uuid)
                if found is None:
                    continue
                found.counters.CopyFrom(counters.to_proto())
                found.top_task_errors.clear()
                found.top_task_errors.update(errors)
                tx.update(TASKFORCES, found)
            tx.sql.executemany(_UPSERT_COMMAND, commands)

        try:
            await self._store.run(write)
        except Exception:
            log.exception("pilot state flush failed", n_pilots=len(rows), n_commands=len(commands))
            self._dirty_pilots |= keys
            self._dirty_commands |= command_keys
            self._dirty_rollups |= rollup_keys
            return False
        self.flushes += 1
        return True


# --- the RPC ---


def _validate_hello(
    req: pilot_service_pb2.PilotServiceConnectRequest,
) -> pilot_service_pb2.PilotHello:
    if req.WhichOneof("kind") != "hello":
        raise InvalidArgument([("hello", "the first message must be a hello")])
    hello = req.hello
    v = Violations()
    if not hello.taskforce_uuid:
        v.add("hello.taskforce_uuid", "required")
    if not hello.worker_id:
        v.add("hello.worker_id", "required")
    elif len(hello.worker_id) > MAX_WORKER_ID_CHARS or not hello.worker_id.isprintable():
        v.add("hello.worker_id", f"must be printable and at most {MAX_WORKER_ID_CHARS} characters")
    if len(hello.host) > MAX_HOST_CHARS:
        v.add("hello.host", f"at most {MAX_HOST_CHARS} characters")
    if len(hello.pilot_version) > MAX_VERSION_CHARS:
        v.add("hello.pilot_version", f"at most {MAX_VERSION_CHARS} characters")
    v.raise_if_any()
    return hello


# Checked on every status (with thousands of pilots, hundreds a second): no lists or dicts built.
_PHASES = frozenset(PilotPhase.values())
_COUNTER_NAMES = tuple(f.name for f in dataclasses.fields(Counters))


def _validate_status(status: pilot_service_pb2.PilotStatus) -> None:
    v = Violations()
    if status.phase not in _PHASES:
        v.add("status.phase", f"unknown pilot phase {status.phase}")
    elif status.phase == PilotPhase.PILOT_PHASE_LOST:
        v.add("status.phase", "LOST is the WMS's finding about a pilot, not a phase it reports")
    for name in _COUNTER_NAMES:
        if not 0 <= (value := getattr(status.counters, name)) <= MAX_COUNTER:
            v.add(f"status.counters.{name}", f"must be 0 to {MAX_COUNTER} (got {value})")
    check_timestamp(v, "status.timestamp", status.timestamp)
    v.raise_if_any()


def _kind_rule(kind: int) -> str:
    return f"must be STARTED, FINISHED or FAILED (got {kind})"


def _validate_task_event(event: pilot_service_pb2.TaskLifecycleEvent) -> None:
    if event.kind not in TASK_EVENT_KINDS:
        raise InvalidArgument([("task_event.kind", _kind_rule(event.kind))])
    v = Violations()
    check_timestamp(v, "task_event.timestamp", event.timestamp)
    v.raise_if_any()


def _validate_task_events(batch: pilot_service_pb2.TaskLifecycleEvents) -> None:
    """Every event of a batch, each named by its index; one bad event rejects the whole batch."""
    v = Violations()
    if not batch.events:
        v.add("task_events.events", "must not be empty")
    for i, event in enumerate(batch.events):
        if event.kind not in TASK_EVENT_KINDS:
            v.add(f"task_events.events[{i}].kind", _kind_rule(event.kind))
        check_timestamp(v, f"task_events.events[{i}].timestamp", event.timestamp)
    v.raise_if_any()


class PilotService(pilot_service_pb2_grpc.PilotServiceServicer):
    """Pilots' streams: hello, then status and task events up; drain and stop down."""

    def __init__(self, registry: PilotRegistry) -> None:
        self._registry = registry

    @grpc_errors
    async def Connect(
        self,
        request_iterator: AsyncIterator[pilot_service_pb2.PilotServiceConnectRequest],
        context: Ctx,
    ) -> Any:
        principal = current_principal()
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        hello = _validate_hello(first)
        if principal.role is Role.PILOT and principal.scope != hello.taskforce_uuid:
            raise PermissionDenied(
                f"this pilot token is for taskforce {principal.scope!r}, "
                f"not {hello.taskforce_uuid!r}"
            )
        session = await self._registry.connect(hello)
        log.info(
            "pilot connected",
            taskforce_uuid=hello.taskforce_uuid,
            worker_id=hello.worker_id,
            host=hello.host,
            pilot_version=hello.pilot_version,
        )
        reader = asyncio.create_task(
            self._read(session, requests), name=f"pilot-{hello.taskforce_uuid}-{hello.worker_id}"
        )
        try:
            yield Response(
                welcome=pilot_service_pb2.PilotWelcome(taskforce_uuid=session.taskforce_uuid)
            )
            while (msg := await session.next()) is not None:
                yield msg
        finally:
            reader.cancel()
            self._registry.disconnect(session)
            log.info(
                "pilot disconnected", taskforce_uuid=hello.taskforce_uuid, worker_id=hello.worker_id
            )

    async def _read(
        self,
        session: PilotSession,
        requests: AsyncIterator[pilot_service_pb2.PilotServiceConnectRequest],
    ) -> None:
        """Apply what the pilot sends; end the session when it half-closes or sends something
        invalid."""
        try:
            async for req in requests:
                kind = req.WhichOneof("kind")
                if kind == "status":
                    _validate_status(req.status)
                    self._registry.report_status(session, req.status)
                elif kind == "task_events":
                    _validate_task_events(req.task_events)
                    self._registry.report_task_events(session, req.task_events.events)
                elif kind == "task_event":
                    _validate_task_event(req.task_event)
                    self._registry.report_task_event(session, req.task_event)
                elif kind == "hello":
                    raise InvalidArgument([("hello", "only the first message may be a hello")])
                else:
                    raise InvalidArgument(
                        [("kind", "one of status, task_events or task_event is required")]
                    )
        except (asyncio.CancelledError, grpc.RpcError):
            return
        except Exception as exc:
            session.end(exc)
            return
        session.end()
