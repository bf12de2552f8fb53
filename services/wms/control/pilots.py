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
wins (``joined_pilots``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
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
from services.wms.validation import Violations

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
TASK_EVENT_KINDS = (
    pilot_service_pb2.TASK_EVENT_KIND_STARTED,
    pilot_service_pb2.TASK_EVENT_KIND_FINISHED,
    pilot_service_pb2.TASK_EVENT_KIND_FAILED,
)
REASON_WORKFLOW_FINISHED = "workflow finished"
REASON_WORKFLOW_ABORTED = "workflow aborted"


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


def rollup(pilots: Iterable[PilotState]) -> tuple[Counters, dict[str, int]]:
    """A taskforce's counters (summed over its pilots) and top task errors: the most frequent
    non-empty ``last_error`` values (at most TOP_TASK_ERRORS) with how many pilots last reported
    each; ties broken by the error text, so the choice is stable."""
    total = Counters()
    errors: Counter[str] = Counter()
    for p in pilots:
        total += p.counters
        if p.last_error:
            errors[p.last_error] += 1
    top = sorted(errors.items(), key=lambda item: (-item[1], item[0]))[:TOP_TASK_ERRORS]
    return total, dict(top)


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
    what its TMS says its pilots chirped (memory only: a TMS re-sends it after a reconnect)."""

    workflow_id: str
    pilots: dict[str, PilotState]
    sessions: dict[str, PilotSession] = field(default_factory=dict)
    events: deque[TaskEventRecord] = field(default_factory=lambda: deque(maxlen=RECENT_TASK_EVENTS))
    chirped: dict[str, PilotState] = field(default_factory=dict)


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
        for tf in self._taskforces.values():
            for session in list(tf.sessions.values()):
                session.end(ShuttingDown("the WMS is shutting down; reconnect"))
                self.disconnect(session)
        self._closing.set()
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

    def report_chirps(
        self, taskforce_uuid: str, chirped: Mapping[str, PilotState | None], *, full: bool
    ) -> None:
        """What the taskforce's TMS says its pilots chirped, by worker id (None: nothing), every
        worker when ``full``; the taskforce must be loaded. Changes the roll-up (written behind),
        not the pilots: listeners are not told."""
        known = self._taskforces[taskforce_uuid].chirped
        changed = False
        if full:
            for worker in [w for w in known if chirped.get(w) is None]:
                del known[worker]
                changed = True
        for worker, state in chirped.items():
            if state is None:
                changed |= known.pop(worker, None) is not None
            elif known.get(worker) != state:
                known[worker] = state
                changed = True
        if changed:
            self._dirty_rollups.add(taskforce_uuid)
            self._schedule_flush()

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
        tf.pilots[worker] = PilotState(
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
        tf.pilots[session.worker_id] = dataclasses.replace(
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
        tf.pilots[worker] = pilot
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
        last phase stays."""
        tf = self._current(session)
        if tf is None:
            return
        del tf.sessions[session.worker_id]
        tf.pilots[session.worker_id] = dataclasses.replace(
            tf.pilots[session.worker_id], connected=False, last_seen=time.time()
        )
        self._changed(tf, session.worker_id, ChangeKind.DISCONNECTED)

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
        tf = self._taskforces.setdefault(
            taskforce_uuid, _Taskforce(found.workflow_id, {p.worker_id: p for p in stored})
        )
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
            uuid: rollup(_joined(self._taskforces[uuid]).values())
            for uuid in {u for u, _ in keys} | rollup_keys
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


def _validate_status(status: pilot_service_pb2.PilotStatus) -> None:
    v = Violations()
    if status.phase not in PilotPhase.values():
        v.add("status.phase", f"unknown pilot phase {status.phase}")
    for name, value in dataclasses.asdict(Counters.from_proto(status.counters)).items():
        if value < 0:
            v.add(f"status.counters.{name}", f"must not be negative (got {value})")
    v.raise_if_any()


def _kind_rule(kind: int) -> str:
    return f"must be STARTED, FINISHED or FAILED (got {kind})"


def _validate_task_event(event: pilot_service_pb2.TaskLifecycleEvent) -> None:
    if event.kind not in TASK_EVENT_KINDS:
        raise InvalidArgument([("task_event.kind", _kind_rule(event.kind))])


def _validate_task_events(batch: pilot_service_pb2.TaskLifecycleEvents) -> None:
    """Every event of a batch, each named by its index; one bad event rejects the whole batch."""
    v = Violations()
    if not batch.events:
        v.add("task_events.events", "must not be empty")
    for i, event in enumerate(batch.events):
        if event.kind not in TASK_EVENT_KINDS:
            v.add(f"task_events.events[{i}].kind", _kind_rule(event.kind))
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
