"""TaskManagerService and the dispatcher: the WMS's side of every TMS's stream.

One ``Dispatcher`` owns what happens to taskforces between creation and completion:

- **Launch control** moves taskforces from pre-launch to pending-starter in priority order (then
  oldest first) the moment they are due, with no per-second throttle, while their location has
  capacity (``EWMS_LOCATION_MAX_WORKERS``: workers of taskforces launched and not complete).
- **Commands** go down the location's TMS stream as soon as they are due: start for pending-starter,
  stop for pending-stopper. A command is sent once per stream; one not confirmed when the stream
  ends is sent again on the next. Phases advance only on the TMS's confirmation; failures are
  ``phase_change_log`` entries, retried after ``tms_retry_delay`` until ``tms_action_retries``
  failures, as in the original.
- **Compound statuses** join each worker's job state and, once it ended, its exit (from the TMS's
  snapshots) with its pilot's phase (from the pilot stream, or, for a worker no pilot of which ever
  opened one, what the pilot chirped, as the snapshot carries it; LOST when the pilot vanished, see
  pilots.py); a taskforce whose jobs have all left the queue is complete.

Every pass is triggered by something that happened (a new workflow, a confirmation, a freed slot,
a TMS connecting, a retry coming due); nothing polls.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
import structlog
from google.protobuf import timestamp_pb2

from ewms.v1 import (
    queue_pb2,
    task_manager_service_pb2,
    task_manager_service_pb2_grpc,
    taskforce_pb2,
)
from services.auth import ANY_LOCATION, Role, TokenAuthority, current_principal
from services.config import ClusterLocations
from services.errors import ApiError, InvalidArgument, PermissionDenied, grpc_errors
from services.wms.control.phases import log_phase
from services.wms.control.pilots import (
    MAX_COUNTER,
    Counters,
    PilotChange,
    PilotRegistry,
    PilotState,
)
from services.wms.control.streams import Outbox
from services.wms.store import QUEUES, TASK_DIRECTIVES, TASKFORCES, Store, Tx
from services.wms.validation import Violations, check_timestamp

log = structlog.get_logger(__name__)

Ctx = Any  # grpc.aio.ServicerContext
Phase = taskforce_pb2.TaskforcePhase
JobState = taskforce_pb2.JobState
Request = task_manager_service_pb2.TaskManagerServiceConnectRequest
Response = task_manager_service_pb2.TaskManagerServiceConnectResponse

SOURCE_TMS = "TMS"
FAILURE_PREFIX = "ERROR: "
SOURCE_LAUNCH_CONTROL = "Launch Control"
SOURCE_MQ_ACTIVATOR = "Workflow MQ Activator"
SCHEDULERS = ("htcondor", "local")
# Phases whose workers count against their location's capacity.
LAUNCHED = (
    Phase.TASKFORCE_PHASE_PENDING_STARTER,
    Phase.TASKFORCE_PHASE_CONDOR_SUBMIT,
    Phase.TASKFORCE_PHASE_PENDING_STOPPER,
    Phase.TASKFORCE_PHASE_CONDOR_RM,
)
# Phases in which the cluster may still be in the scheduler's queue.
SUBMITTED = (
    Phase.TASKFORCE_PHASE_CONDOR_SUBMIT,
    Phase.TASKFORCE_PHASE_PENDING_STOPPER,
    Phase.TASKFORCE_PHASE_CONDOR_RM,
)
# Job states of jobs that have left the queue.
LEFT = (JobState.JOB_STATE_COMPLETED, JobState.JOB_STATE_REMOVED)
DEFAULT_PILOT_TOKEN_TTL = 30 * 24 * 3600
FLUSH_INTERVAL = 0.25
# Seconds a complete taskforce's job states stay in memory, and how many complete taskforces are
# remembered as such (so that late messages do not bring them back).
FORGET_AFTER = 60.0
MAX_FORGOTTEN = 100_000
MAX_ERROR_CHARS = 4096
MAX_TEXT_CHARS = 256
MAX_SUBMIT_DICT_ENTRIES = 200
# The largest signal number a wait status can carry (7 bits).
MAX_SIGNAL = 127
# A worker as every scheduler names it: "<cluster id>.<proc id>" (services/tms/scheduler.py).
WORKER_ID = re.compile(r"(0|[1-9][0-9]{0,9})\.(0|[1-9][0-9]{0,9})")


def failures(tf: taskforce_pb2.Taskforce, target: taskforce_pb2.TaskforcePhase.ValueType) -> int:
    """Failed attempts at ``target`` the TMS reported (``ERROR: …`` entries; entries noting an
    ignored confirmation do not count)."""
    return sum(1 for e in tf.phase_change_log if e.target_phase == target and _is_failure(e))


def _is_failure(entry: taskforce_pb2.PhaseChange) -> bool:
    return (
        not entry.was_successful
        and entry.source_entity == SOURCE_TMS
        and entry.context.startswith(FAILURE_PREFIX)
    )


# A worker's job as its TMS reports it: (job state, hold reason, job exit), the exit being
# (exit code, signal) for an ended job whose exit the scheduler saw, else ().
Job = tuple[int, str, tuple[int, ...]]
Key = tuple[int, str, tuple[int, ...], int]  # (job state, hold reason, job exit, pilot phase)


def _job(worker: task_manager_service_pb2.WorkerJobState) -> Job:
    end = (worker.job_exit.exit_code, worker.job_exit.signal) if worker.HasField("job_exit") else ()
    return int(worker.job_state), worker.hold_reason, end


def _job_exit(end: tuple[int, ...]) -> taskforce_pb2.JobExit | None:
    return taskforce_pb2.JobExit(exit_code=end[0], signal=end[1]) if end else None


def _key(job: Job | None, pilot: PilotState | None) -> Key | None:
    """Where a worker counts: (job state, hold reason, job exit, pilot phase), a side that has
    not reported it counting as UNSPECIFIED there; None for a worker neither side knows."""
    if job is None:
        if pilot is None:
            return None
        job = (JobState.JOB_STATE_UNSPECIFIED, "", ())
    return (*job, pilot.phase if pilot is not None else taskforce_pb2.PILOT_PHASE_UNSPECIFIED)


class CompoundTally:
    """A taskforce's compound statuses: its workers counted by (job state, hold reason, pilot
    phase), kept current one worker at a time. A change costs O(1), not a pass over every worker:
    with 2,000 pilots reporting every 5 s, those passes took all of the WMS's CPU."""

    def __init__(self) -> None:
        self._keys: dict[str, Key] = {}
        self._counts: Counter[Key] = Counter()
        self._statuses: list[taskforce_pb2.CompoundStatus] | None = None

    @classmethod
    def of(cls, job_states: Mapping[str, Job], pilots: Mapping[str, PilotState]) -> CompoundTally:
        """Counted from scratch, over every worker either side knows."""
        tally = cls()
        for worker in job_states.keys() | pilots.keys():
            tally.set(worker, job_states.get(worker), pilots.get(worker))
        return tally

    def workers(self) -> list[str]:
        """Every worker counted."""
        return list(self._keys)

    def set(self, worker: str, job: Job | None, pilot: PilotState | None) -> bool:
        """Count ``worker`` where its job state and pilot put it now; whether that moved it."""
        key = _key(job, pilot)
        old = self._keys.get(worker)
        if key == old:
            return False
        if old is not None:
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        if key is None:
            del self._keys[worker]
        else:
            self._keys[worker] = key
            self._counts[key] += 1
        self._statuses = None
        return True

    def jobs_in(self, states: Iterable[int]) -> int:
        """How many workers have a job in one of ``states``."""
        wanted = set(states)
        return sum(n for (state, *_), n in self._counts.items() if state in wanted)

    def statuses(self) -> list[taskforce_pb2.CompoundStatus]:
        """The counts in (job state, hold reason, job exit, pilot phase) order (do not
        modify)."""
        if self._statuses is None:
            self._statuses = [
                taskforce_pb2.CompoundStatus(
                    job_state=state,  # type: ignore[arg-type]
                    hold_reason=reason,
                    pilot_phase=phase,  # type: ignore[arg-type]
                    count=n,
                    job_exit=_job_exit(end),
                )
                for (state, reason, end, phase), n in sorted(self._counts.items())
            ]
        return self._statuses


def _chirped(uuid: str, worker: task_manager_service_pb2.WorkerJobState) -> PilotState | None:
    """The pilot state a worker's chirps stand for, if it chirped."""
    if not worker.HasField("chirps"):
        return None
    c = worker.chirps
    last_updated = c.last_updated.ToNanoseconds() / 1e9 if c.HasField("last_updated") else None
    return PilotState(
        taskforce_uuid=uuid,
        worker_id=worker.worker_id,
        host="",
        pilot_version="",
        phase=c.phase,
        counters=Counters.from_proto(c.counters),
        last_error=c.last_error,
        connected=False,
        first_seen=c.started.ToNanoseconds() / 1e9 if c.HasField("started") else 0.0,
        last_seen=last_updated or 0.0,
        status_time=last_updated,
    )


def _get_taskforces(tx: Tx, uuids: Iterable[str]) -> dict[str, taskforce_pb2.Taskforce]:
    return {uuid: tf for uuid in uuids if (tf := tx.get(TASKFORCES, uuid)) is not None}


def _own(
    tf: taskforce_pb2.Taskforce | None, uuid: str, location: str, path: str
) -> taskforce_pb2.Taskforce:
    """``tf`` if it is a taskforce of the TMS's location; else INVALID_ARGUMENT naming ``path``
    (a TMS only hears of its own location's taskforces: one naming another is broken, or talks to
    the wrong WMS, and is told so rather than ignored)."""
    if tf is None:
        raise InvalidArgument([(path, f"no taskforce {uuid!r}")])
    if tf.cluster_location != location:
        raise InvalidArgument(
            [(path, f"a taskforce of {tf.cluster_location!r}, not of this TMS's {location!r}")]
        )
    return tf


def _cluster_of(worker_id: str) -> int:
    """The cluster id of a worker id that matched WORKER_ID."""
    return int(worker_id.partition(".")[0])


@dataclass(frozen=True)
class Bounds:
    """What a snapshot of a taskforce is checked against: its cluster (0 until the TMS confirmed
    one) and how many workers it has (asked for, then submitted). Fixed once the cluster is."""

    cluster_id: int
    n_workers: int

    @classmethod
    def of(cls, tf: taskforce_pb2.Taskforce) -> Bounds | None:
        """None for a taskforce no start command was sent for (so no TMS can know its jobs)."""
        started = tf.cluster_id or any(
            e.target_phase == Phase.TASKFORCE_PHASE_PENDING_STARTER and e.was_successful
            for e in tf.phase_change_log
        )
        return cls(tf.cluster_id, tf.n_workers) if started else None


class Replaced(ApiError):
    """Another TMS of the same location connected; this stream is ended."""

    code = grpc.StatusCode.ABORTED


class ShuttingDown(ApiError):
    """The WMS is stopping."""

    code = grpc.StatusCode.UNAVAILABLE


class TmsSession(Outbox[Response]):
    """One TMS's open stream: what to send down it, and the commands sent and not yet
    confirmed."""

    def __init__(self, location: str, tms_id: str) -> None:
        super().__init__()
        self.location = location
        self.tms_id = tms_id
        self.sent: set[tuple[str, str]] = set()


@dataclass
class DispatchSettings:
    """The dispatcher's knobs (from WmsSettings)."""

    location_max_workers: Mapping[str, int] = field(default_factory=dict)
    tms_action_retries: int = 2
    tms_retry_delay: float = 10.0
    pilot_token_ttl: int = DEFAULT_PILOT_TOKEN_TTL

    def capacity(self, location: str) -> int | None:
        return self.location_max_workers.get(location, self.location_max_workers.get("*"))


TaskforceListener = Callable[[str, Iterable[str]], None]


class Dispatcher:
    """Launch control, TMS commands and compound statuses. ``start()`` after construction,
    ``await close()`` at the end. ``on_change(workflow_id, taskforce_uuids)`` is called on the
    event loop after every change to taskforces (phase, compound statuses, counters)."""

    def __init__(
        self,
        store: Store,
        authority: TokenAuthority,
        locations: ClusterLocations,
        pilots: PilotRegistry,
        settings: DispatchSettings,
    ) -> None:
        self._store = store
        self._authority = authority
        self._locations = locations
        self._pilots = pilots
        self._settings = settings
        self.public_address = ""
        self._listeners: list[TaskforceListener] = []
        self._sessions: dict[str, TmsSession] = {}
        self._job_states: dict[str, dict[str, Job]] = {}
        self._tallies: dict[str, CompoundTally] = {}
        self._workflow_of: dict[str, str] = {}
        # Bounds of taskforces whose cluster is confirmed (they no longer change).
        self._bounds: dict[str, Bounds] = {}
        self._dirty: set[str] = set()
        self._forgotten: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._wake = asyncio.Event()
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._stop_listening: Callable[[], None] | None = None
        self._retry_handles: list[asyncio.TimerHandle] = []
        # Passes made, so tests can see that work is event-driven.
        self.passes = 0

    # --- life cycle ---

    def start(self) -> None:
        self._stop_listening = self._pilots.listen(self._pilot_changed)
        self._loop_task = asyncio.create_task(self._run(), name="tms-dispatcher")
        self.wake()

    async def close(self) -> None:
        self._closing = True
        if self._stop_listening is not None:
            self._stop_listening()
        for handle in self._retry_handles:
            handle.cancel()
        for session in list(self._sessions.values()):
            session.end(ShuttingDown("the WMS is shutting down; reconnect"))
        self._sessions.clear()
        for task in (self._loop_task, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._dirty:
            await self._flush()

    def listen(self, listener: TaskforceListener) -> None:
        self._listeners.append(listener)

    def wake(self) -> None:
        """Something changed: make a pass soon (passes coalesce)."""
        self._wake.set()

    def connected_locations(self) -> list[str]:
        return sorted(self._sessions)

    # --- live state for readers ---

    def live(self, tf: taskforce_pb2.Taskforce) -> taskforce_pb2.Taskforce:
        """``tf`` with its in-memory compound statuses, counters and top errors (newer than the
        store's, which are written behind)."""
        tally = self._tallies.get(tf.taskforce_uuid)
        if tally is not None:
            del tf.compound_statuses[:]
            tf.compound_statuses.extend(tally.statuses())
        rolled = self._pilots.rollup(tf.taskforce_uuid)
        if rolled is not None:
            counters, errors = rolled
            tf.counters.CopyFrom(counters.to_proto())
            tf.top_task_errors.clear()
            tf.top_task_errors.update(errors)
        return tf

    # --- the pass ---

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._pass()
            except Exception:
                log.exception("dispatch pass failed; retrying in 1 s")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _pass(self) -> None:
        self.passes += 1
        changed = await self._store.run(self._launch_control)
        self._notify(changed)
        for session in list(self._sessions.values()):
            await self._send_due(session)

    def _launch_control(self, tx: Tx) -> dict[str, list[str]]:
        """Activate and launch what is due; returns the changed taskforces by workflow."""
        changed: dict[str, list[str]] = {}
        for _, tf in tx.select(
            TASKFORCES, [("phase = ?", int(Phase.TASKFORCE_PHASE_PRE_MQ_ACTIVATION))]
        ):
            # Queues are provisioned before the workflow is stored, so they are active.
            log_phase(
                tf,
                Phase.TASKFORCE_PHASE_PRE_LAUNCH,
                ok=True,
                source=SOURCE_MQ_ACTIVATOR,
                context="the workflow's queues are active",
            )
            tx.update(TASKFORCES, tf)
            changed.setdefault(tf.workflow_id, []).append(tf.taskforce_uuid)
        marks = ", ".join("?" * len(LAUNCHED))
        used: Counter[str] = Counter()
        retries = self._settings.tms_action_retries
        for _, tf in tx.select(TASKFORCES, [(f"phase IN ({marks})", [int(p) for p in LAUNCHED])]):
            given_up = (
                tf.phase == Phase.TASKFORCE_PHASE_PENDING_STARTER
                and failures(tf, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT) > retries
            )
            if not given_up:
                used[tf.cluster_location] += tf.n_workers
        waiting = [
            tf
            for _, tf in tx.select(
                TASKFORCES, [("phase = ?", int(Phase.TASKFORCE_PHASE_PRE_LAUNCH))]
            )
        ]
        waiting.sort(key=lambda t: (-t.priority, t.timestamp.ToNanoseconds(), t.taskforce_uuid))
        blocked: set[str] = set()
        for tf in waiting:
            location = tf.cluster_location
            if location in blocked:
                continue
            capacity = self._settings.capacity(location)
            if capacity is not None and used[location] and used[location] + tf.n_workers > capacity:
                # Strict priority order: lower-priority taskforces do not overtake this one.
                blocked.add(location)
                continue
            used[location] += tf.n_workers
            context = "released by priority"
            if capacity is not None:
                context += f" ({used[location]} of {capacity} workers at {location})"
            log_phase(
                tf,
                Phase.TASKFORCE_PHASE_PENDING_STARTER,
                ok=True,
                source=SOURCE_LAUNCH_CONTROL,
                context=context,
            )
            tx.update(TASKFORCES, tf)
            changed.setdefault(tf.workflow_id, []).append(tf.taskforce_uuid)
        return changed

    async def _send_due(self, session: TmsSession) -> None:
        retries = self._settings.tms_action_retries
        now = time.time()
        # When the earliest retry held back in this pass comes due (the pass runs in the store's
        # thread, so the wake is scheduled once it is back on the event loop).
        retry_at: list[float] = []

        def pending(tf: taskforce_pb2.Taskforce) -> bool:
            at = self._retry_due(tf, now)
            if at is not None:
                retry_at.append(at)
            return at is not None

        def due(tx: Tx) -> list[Response]:
            out: list[Response] = []
            starting = [
                tf
                for _, tf in tx.select(
                    TASKFORCES,
                    [
                        ("phase = ?", int(Phase.TASKFORCE_PHASE_PENDING_STARTER)),
                        ("cluster_location = ?", session.location),
                    ],
                )
                if ("start", tf.taskforce_uuid) not in session.sent
            ]
            keyed = []
            for tf in starting:
                n_failed = failures(tf, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)
                if n_failed > retries or pending(tf):
                    continue
                keyed.append(((-tf.priority, n_failed, tf.timestamp.ToNanoseconds()), tf))
            keyed.sort(key=lambda kt: kt[0])
            queues_of: dict[str, dict[str, queue_pb2.Queue]] = {}
            for _, tf in keyed:
                td = tx.get(TASK_DIRECTIVES, tf.task_id)
                if td is None:
                    continue
                if tf.workflow_id not in queues_of:
                    queues_of[tf.workflow_id] = {
                        q.queue_id: q
                        for _, q in tx.select(QUEUES, [("workflow_id = ?", tf.workflow_id)])
                    }
                wanted = [*td.input_queues, *td.output_queues]
                qs = queues_of[tf.workflow_id]
                start = task_manager_service_pb2.StartTaskforce(
                    taskforce=tf,
                    task_directive=td,
                    queues=[qs[q] for q in dict.fromkeys(wanted) if q in qs],
                    pilot_token=self._authority.mint(
                        f"pilot-{tf.taskforce_uuid}",
                        Role.PILOT,
                        self._settings.pilot_token_ttl,
                        scope=tf.taskforce_uuid,
                    ),
                    wms_address=self.public_address,
                )
                out.append(Response(start=start))
            for _, tf in tx.select(
                TASKFORCES,
                [
                    ("phase = ?", int(Phase.TASKFORCE_PHASE_PENDING_STOPPER)),
                    ("cluster_location = ?", session.location),
                ],
            ):
                if ("stop", tf.taskforce_uuid) in session.sent or not tf.cluster_id:
                    continue
                if failures(tf, Phase.TASKFORCE_PHASE_CONDOR_RM) > retries:
                    continue
                if pending(tf):
                    continue
                reason = next(
                    (
                        e.context
                        for e in reversed(tf.phase_change_log)
                        if e.target_phase == Phase.TASKFORCE_PHASE_PENDING_STOPPER
                        and e.was_successful
                    ),
                    "stop requested",
                )
                out.append(
                    Response(
                        stop=task_manager_service_pb2.StopTaskforce(
                            taskforce_uuid=tf.taskforce_uuid,
                            cluster_id=tf.cluster_id,
                            reason=reason,
                        )
                    )
                )
            return out

        messages = await self._store.run(due, write=False)
        if retry_at:
            self._wake_at(min(retry_at) - time.time())
        for msg in messages:
            if session.ended:
                return
            kind = str(msg.WhichOneof("kind"))
            uuid = (
                msg.start.taskforce.taskforce_uuid if kind == "start" else msg.stop.taskforce_uuid
            )
            session.sent.add((kind, uuid))
            session.send(msg)
            log.info("tms command", command=kind, taskforce_uuid=uuid, location=session.location)

    def _retry_due(self, tf: taskforce_pb2.Taskforce, now: float) -> float | None:
        """When the taskforce's last TMS failure may be retried, if that is after ``now``."""
        last = next(
            (e for e in reversed(tf.phase_change_log) if e.source_entity == SOURCE_TMS), None
        )
        if last is None or not _is_failure(last):
            return None
        due = last.timestamp.ToNanoseconds() / 1e9 + self._settings.tms_retry_delay
        return due if due > now else None

    def _wake_at(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        # Keep only the handles still to fire (fired ones are not "cancelled").
        now = loop.time()
        self._retry_handles = [
            h for h in self._retry_handles if not h.cancelled() and h.when() > now
        ]
        self._retry_handles.append(loop.call_later(max(0.0, delay), self.wake))

    # --- the TMS's messages ---

    async def connect(self, hello: task_manager_service_pb2.TmsHello, location: str) -> TmsSession:
        """Register a TMS stream for ``location`` (replacing an older one) and queue its welcome."""
        if self._closing:
            raise ShuttingDown("the WMS is shutting down; reconnect")

        def clusters(tx: Tx) -> list[task_manager_service_pb2.TaskforceCluster]:
            marks = ", ".join("?" * len(SUBMITTED))
            return [
                task_manager_service_pb2.TaskforceCluster(
                    taskforce_uuid=tf.taskforce_uuid,
                    cluster_id=tf.cluster_id,
                    n_workers=tf.n_workers,
                    job_event_log_fpath=tf.job_event_log_fpath,
                )
                for _, tf in tx.select(
                    TASKFORCES,
                    [
                        ("cluster_location = ?", location),
                        (f"phase IN ({marks})", [int(p) for p in SUBMITTED]),
                    ],
                )
                if tf.cluster_id
            ]

        known = await self._store.run(clusters, write=False)
        # Registered only now, with no await until it is returned: a stream cancelled meanwhile
        # leaves no session behind, and no pass can send a command before the welcome.
        if self._closing:
            raise ShuttingDown("the WMS is shutting down; reconnect")
        session = TmsSession(location, hello.tms_id)
        old = self._sessions.get(location)
        self._sessions[location] = session
        if old is not None:
            old.end(Replaced(f"another TMS connected for {location}"))
        session.send(
            Response(
                welcome=task_manager_service_pb2.TmsWelcome(
                    cluster_location=location, clusters=known
                )
            )
        )
        self.wake()
        return session

    def disconnect(self, session: TmsSession) -> None:
        if self._sessions.get(session.location) is session:
            del self._sessions[session.location]

    async def submitted(
        self, session: TmsSession, msg: task_manager_service_pb2.TaskforceSubmitted
    ) -> None:
        uuid = msg.taskforce_uuid

        def apply(tx: Tx) -> str | None:
            tf = _own(tx.get(TASKFORCES, uuid), uuid, session.location, "submitted.taskforce_uuid")
            if tf.cluster_id and tf.cluster_id == msg.cluster_id:
                return None  # a confirmation sent again after a reconnect
            what = f"cluster {msg.cluster_id} of {msg.n_workers} workers (TMS {session.tms_id})"
            if tf.phase == Phase.TASKFORCE_PHASE_PENDING_STARTER:
                self._record_cluster(tf, msg)
                log_phase(
                    tf,
                    Phase.TASKFORCE_PHASE_CONDOR_SUBMIT,
                    ok=True,
                    source=SOURCE_TMS,
                    context=f"submitted {what}",
                )
            elif tf.phase == Phase.TASKFORCE_PHASE_CANCELLED and not tf.cluster_id:
                # Deactivated while the start command was on its way: remove what was submitted.
                self._record_cluster(tf, msg)
                log_phase(
                    tf,
                    Phase.TASKFORCE_PHASE_CONDOR_SUBMIT,
                    ok=False,
                    source=SOURCE_TMS,
                    context=f"submitted {what} after the taskforce was cancelled; removing it",
                )
                log_phase(
                    tf,
                    Phase.TASKFORCE_PHASE_PENDING_STOPPER,
                    ok=True,
                    source=SOURCE_TMS,
                    context="cancelled before its submission was confirmed",
                )
            else:
                log_phase(
                    tf,
                    Phase.TASKFORCE_PHASE_CONDOR_SUBMIT,
                    ok=False,
                    source=SOURCE_TMS,
                    context=f"ignored: submitted {what} while {Phase.Name(tf.phase)}",
                )
            tx.update(TASKFORCES, tf)
            return tf.workflow_id

        await self._apply(uuid, apply, session, ("start", uuid))

    @staticmethod
    def _record_cluster(
        tf: taskforce_pb2.Taskforce, msg: task_manager_service_pb2.TaskforceSubmitted
    ) -> None:
        tf.cluster_id = msg.cluster_id
        tf.n_workers = msg.n_workers
        tf.submit_dict.clear()
        tf.submit_dict.update(msg.submit_dict)
        tf.job_event_log_fpath = msg.job_event_log_fpath

    async def failed(
        self,
        session: TmsSession,
        msg: task_manager_service_pb2.TaskforceCommandFailed,
        target: taskforce_pb2.TaskforcePhase.ValueType,
    ) -> None:
        uuid = msg.taskforce_uuid
        kind = "start" if target == Phase.TASKFORCE_PHASE_CONDOR_SUBMIT else "stop"
        path = f"{'submit' if kind == 'start' else 'remove'}_failed.taskforce_uuid"
        expected = (
            Phase.TASKFORCE_PHASE_PENDING_STARTER
            if kind == "start"
            else Phase.TASKFORCE_PHASE_PENDING_STOPPER
        )
        retries = self._settings.tms_action_retries

        def apply(tx: Tx) -> str | None:
            tf = _own(tx.get(TASKFORCES, uuid), uuid, session.location, path)
            error = msg.error[:MAX_ERROR_CHARS] or "(no error given)"
            if tf.phase != expected:
                # A failure reported after the taskforce moved on (e.g. a stale answer).
                log_phase(
                    tf,
                    target,
                    ok=False,
                    source=SOURCE_TMS,
                    context=f"ignored: {error} (while {Phase.Name(tf.phase)})",
                )
                tx.update(TASKFORCES, tf)
                return tf.workflow_id
            context = f"{FAILURE_PREFIX}{error}"
            if tf.phase == expected and failures(tf, target) + 1 > retries:
                context += (
                    f" (attempt {failures(tf, target) + 1}; giving up after {retries} retries)"
                )
            log_phase(tf, target, ok=False, source=SOURCE_TMS, context=context)
            tx.update(TASKFORCES, tf)
            return tf.workflow_id

        await self._apply(uuid, apply, session, (kind, uuid))
        self._wake_at(self._settings.tms_retry_delay)

    async def removed(
        self, session: TmsSession, msg: task_manager_service_pb2.TaskforceRemoved
    ) -> None:
        uuid = msg.taskforce_uuid

        def apply(tx: Tx) -> str | None:
            tf = _own(tx.get(TASKFORCES, uuid), uuid, session.location, "removed.taskforce_uuid")
            if tf.phase != Phase.TASKFORCE_PHASE_PENDING_STOPPER:
                return None
            log_phase(
                tf,
                Phase.TASKFORCE_PHASE_CONDOR_RM,
                ok=True,
                source=SOURCE_TMS,
                context=f"cluster {tf.cluster_id} removed (TMS {session.tms_id})",
            )
            tx.update(TASKFORCES, tf)
            return tf.workflow_id

        await self._apply(uuid, apply, session, ("stop", uuid))

    async def completed(
        self, session: TmsSession, msg: task_manager_service_pb2.TaskforceCompleted
    ) -> None:
        when = msg.complete_ts if msg.HasField("complete_ts") else None
        tally = self._tallies.get(msg.taskforce_uuid)
        compound = tally.statuses() if tally is not None else None
        done: list[str] = []

        def complete(tx: Tx) -> str | None:
            uuid = msg.taskforce_uuid
            _own(tx.get(TASKFORCES, uuid), uuid, session.location, "completed.taskforce_uuid")
            wf = self._complete(tx, uuid, "the cluster left the queue", compound, when)
            if wf is not None:
                done.append(msg.taskforce_uuid)
            return wf

        await self._apply(msg.taskforce_uuid, complete)
        for uuid in done:
            self._forget_later(uuid)

    def _forget_later(self, uuid: str) -> None:
        """A complete taskforce's job states and compound statuses leave memory after a while
        (stragglers, e.g. a pilot's last status, still count until then)."""
        asyncio.get_running_loop().call_later(FORGET_AFTER, self._forget, uuid)

    def _forget(self, uuid: str) -> None:
        for known in (self._job_states, self._tallies, self._workflow_of, self._bounds):
            known.pop(uuid, None)
        self._dirty.discard(uuid)
        self._forgotten[uuid] = None
        while len(self._forgotten) > MAX_FORGOTTEN:
            self._forgotten.popitem(last=False)

    def _complete(
        self,
        tx: Tx,
        uuid: str,
        context: str,
        compound: list[taskforce_pb2.CompoundStatus] | None,
        when: timestamp_pb2.Timestamp | None = None,
    ) -> str | None:
        """Complete a submitted taskforce, with its last ``compound`` statuses if known (taken on
        the event loop: this runs in the store's thread)."""
        tf = tx.get(TASKFORCES, uuid)
        if tf is None or tf.phase not in SUBMITTED:
            return None
        log_phase(
            tf,
            Phase.TASKFORCE_PHASE_CONDOR_COMPLETE,
            ok=True,
            source=SOURCE_TMS,
            context=context,
            source_event_time=when,
        )
        if compound is not None:
            del tf.compound_statuses[:]
            tf.compound_statuses.extend(compound)
        tx.update(TASKFORCES, tf)
        return tf.workflow_id

    async def _apply(
        self,
        uuid: str,
        fn: Callable[[Tx], str | None],
        session: TmsSession | None = None,
        confirmed: tuple[str, str] | None = None,
    ) -> None:
        """Apply a TMS's message; ``confirmed``, the command it answers, counts as unconfirmed on
        ``session`` until the change is committed (or a pass in between would send it again)."""
        workflow_id = await self._store.run(fn)
        if session is not None and confirmed is not None:
            session.sent.discard(confirmed)
        if workflow_id is not None:
            self._workflow_of[uuid] = workflow_id
            self._notify({workflow_id: [uuid]})
        self.wake()

    async def snapshot(
        self, session: TmsSession, msg: task_manager_service_pb2.JobStatusSnapshot
    ) -> None:
        await self._check_snapshot(session, msg)
        for status in msg.taskforces:
            uuid = status.taskforce_uuid
            if uuid in self._forgotten:
                continue  # complete: its compound statuses are final
            states = self._job_states.setdefault(uuid, {})
            if status.full:
                states.clear()
            for worker in status.workers:
                states[worker.worker_id] = _job(worker)
            await self._pilots.load(uuid)
            self._pilots.report_job_states(
                uuid, {w.worker_id: w.job_state for w in status.workers}, full=status.full
            )
            self._pilots.report_chirps(
                uuid,
                {w.worker_id: _chirped(uuid, w) for w in status.workers},
                full=status.full,
            )
            self._update(uuid, [w.worker_id for w in status.workers], everyone=status.full)

    async def _check_snapshot(
        self, session: TmsSession, msg: task_manager_service_pb2.JobStatusSnapshot
    ) -> None:
        """INVALID_ARGUMENT naming every offending field, before anything of the snapshot is
        applied, unless each entry is about a taskforce of this TMS's location that a start
        command was sent for, its workers are jobs of the taskforce's cluster, and the workers
        known after it are at most its n_workers. A not yet confirmed cluster is accepted (its
        workers must then share one cluster): after a reconnect a TMS re-sends its full snapshot
        before it answers the start sent again. A correct TMS never breaks these rules, so the
        stream ends: the WMS has no way to refuse one message and go on, and the TMS stops
        (TmsClient treats INVALID_ARGUMENT as final) instead of sending more of the same."""
        wanted = {s.taskforce_uuid for s in msg.taskforces}
        wanted -= self._forgotten.keys() | self._bounds.keys()
        found = await self._store.run(partial(_get_taskforces, uuids=wanted), write=False)
        v = Violations()
        known: dict[str, set[str]] = {}  # each taskforce's workers once the entries so far apply
        for i, status in enumerate(msg.taskforces):
            uuid = status.taskforce_uuid
            if uuid in self._forgotten:
                continue
            path = f"snapshot.taskforces[{i}]"
            bounds = self._bounds.get(uuid)
            if bounds is None:
                try:
                    tf = _own(found.get(uuid), uuid, session.location, f"{path}.taskforce_uuid")
                except InvalidArgument as e:
                    v.items.extend(e.violations)
                    continue
                self._workflow_of[uuid] = tf.workflow_id
                bounds = Bounds.of(tf)
                if bounds is None:
                    v.add(f"{path}.taskforce_uuid", "no start command was sent for it")
                    continue
                if bounds.cluster_id:
                    self._bounds[uuid] = bounds
            workers = known.setdefault(uuid, set(self._job_states.get(uuid, ())))
            _check_workers(v, path, status, bounds, workers)
        v.raise_if_any()

    def _update(self, uuid: str, workers: Iterable[str], *, everyone: bool = False) -> None:
        """Count ``workers`` (with ``everyone``, also every worker counted before) where both sides
        last put them; the first time, count the taskforce from scratch (its pilots must be
        loaded). Changed compound statuses are written behind; watchers are told either way
        (counters may have changed)."""
        jobs = self._job_states.get(uuid, {})
        tally = self._tallies.get(uuid)
        if tally is None:
            self._tallies[uuid] = CompoundTally.of(jobs, self._pilots.joined_pilots(uuid) or {})
            changed = True
        else:
            if everyone:
                workers = {*tally.workers(), *workers}
            changed = False
            for worker in workers:
                changed |= tally.set(worker, jobs.get(worker), self._pilots.joined(uuid, worker))
        if changed:
            self._dirty.add(uuid)
            if self._flusher is None and not self._closing:
                self._flusher = asyncio.create_task(self._flush_soon(), name="compound-flusher")
        workflow_id = self._workflow_of.get(uuid)
        if workflow_id is not None:
            self._notify({workflow_id: [uuid]})

    def _pilot_changed(self, change: PilotChange) -> None:
        if change.task_event is not None or change.pilot.taskforce_uuid in self._forgotten:
            return
        uuid = change.pilot.taskforce_uuid
        self._workflow_of.setdefault(uuid, change.workflow_id)
        self._update(uuid, (change.pilot.worker_id,))

    async def _flush_soon(self) -> None:
        try:
            while self._dirty:
                await asyncio.sleep(FLUSH_INTERVAL)
                await self._flush()
        finally:
            self._flusher = None

    async def _flush(self) -> None:
        """Write the dirty compound statuses; a taskforce whose jobs have all left is complete."""
        dirty, self._dirty = self._dirty, set()
        # Taken on the event loop, which alone changes the tallies: (statuses, jobs, jobs left).
        values = {
            uuid: (t.statuses(), len(self._job_states.get(uuid, ())), t.jobs_in(LEFT))
            for uuid in dirty
            if (t := self._tallies.get(uuid)) is not None
        }

        def write(tx: Tx) -> dict[str, list[str]]:
            changed: dict[str, list[str]] = {}
            for uuid, (compound, n_jobs, n_left) in values.items():
                tf = tx.get(TASKFORCES, uuid)
                if tf is None:
                    continue
                del tf.compound_statuses[:]
                tf.compound_statuses.extend(compound)
                tx.update(TASKFORCES, tf)
                if tf.phase in SUBMITTED and tf.n_workers and n_left == n_jobs >= tf.n_workers:
                    wf = self._complete(tx, uuid, "all its jobs have left the queue", compound)
                    if wf is not None:
                        changed.setdefault(wf, []).append(uuid)
            return changed

        try:
            changed = await self._store.run(write)
        except Exception:
            log.exception("compound status flush failed")
            self._dirty |= dirty
            return
        if changed:
            self._notify(changed)
            for uuids in changed.values():
                for uuid in uuids:
                    self._forget_later(uuid)
            self.wake()

    def _notify(self, changed: Mapping[str, Iterable[str]]) -> None:
        for workflow_id, uuids in changed.items():
            uuids = list(uuids)
            for uuid in uuids:
                self._workflow_of[uuid] = workflow_id
            for listener in self._listeners:
                try:
                    listener(workflow_id, uuids)
                except Exception:
                    log.exception("taskforce listener failed")


def _check_workers(
    v: Violations,
    path: str,
    status: task_manager_service_pb2.TaskforceJobStatus,
    bounds: Bounds,
    workers: set[str],
) -> None:
    """One snapshot entry's workers against the taskforce; ``workers``, those known before it,
    becomes those known after it."""
    if status.full:
        workers.clear()
    cluster = bounds.cluster_id or min(
        map(_cluster_of, workers or [w.worker_id for w in status.workers[:1]]), default=0
    )
    for j, w in enumerate(status.workers):
        if _cluster_of(w.worker_id) != cluster:
            v.add(
                f"{path}.workers[{j}].worker_id",
                f"must be a job of the taskforce's cluster {cluster} (got {w.worker_id!r})",
            )
        workers.add(w.worker_id)
    if len(workers) > bounds.n_workers:
        v.add(
            f"{path}.workers",
            f"the taskforce has {bounds.n_workers} workers; this would make {len(workers)}",
        )


# --- the RPC ---


def _validate_hello(
    req: Request, locations: ClusterLocations
) -> tuple[task_manager_service_pb2.TmsHello, str]:
    if req.WhichOneof("kind") != "hello":
        raise InvalidArgument([("hello", "the first message must be a hello")])
    hello = req.hello
    v = Violations()
    location = locations.resolve(hello.cluster_location) if hello.cluster_location else None
    if not hello.cluster_location:
        v.add("hello.cluster_location", "required")
    elif location is None:
        v.add(
            "hello.cluster_location",
            f"unknown cluster location {hello.cluster_location!r}; known: {locations.describe()}",
        )
    if hello.scheduler not in SCHEDULERS:
        v.add(
            "hello.scheduler", f"must be one of {', '.join(SCHEDULERS)} (got {hello.scheduler!r})"
        )
    for name in ("tms_id", "version"):
        value = getattr(hello, name)
        if len(value) > MAX_TEXT_CHARS or not value.isprintable():
            v.add(f"hello.{name}", f"must be printable and at most {MAX_TEXT_CHARS} characters")
    v.raise_if_any()
    assert location is not None
    return hello, location


def _validate_chirps(v: Violations, path: str, c: task_manager_service_pb2.PilotChirps) -> None:
    if c.phase not in taskforce_pb2.PilotPhase.values():
        v.add(f"{path}.phase", f"must be a known pilot phase (got {c.phase})")
    if len(c.last_error) > MAX_ERROR_CHARS:
        v.add(f"{path}.last_error", f"at most {MAX_ERROR_CHARS} characters")
    check_timestamp(v, f"{path}.started", c.started)
    check_timestamp(v, f"{path}.last_updated", c.last_updated)
    for name, value in dataclasses.asdict(Counters.from_proto(c.counters)).items():
        if not 0 <= value <= MAX_COUNTER:
            v.add(f"{path}.counters.{name}", f"must be 0 to {MAX_COUNTER} (got {value})")


def _validate_job_exit(
    v: Violations, path: str, w: task_manager_service_pb2.WorkerJobState
) -> None:
    if w.job_state not in LEFT:
        v.add(path, f"only for a COMPLETED or REMOVED job (got {JobState.Name(w.job_state)})")
    if not 0 <= w.job_exit.signal <= MAX_SIGNAL:
        v.add(f"{path}.signal", f"must be 0 to {MAX_SIGNAL} (got {w.job_exit.signal})")
    elif w.job_exit.signal and w.job_exit.exit_code:
        v.add(f"{path}.exit_code", "must be 0 when signal is set: a process exits or is killed")


def _validate(req: Request) -> None:
    kind = req.WhichOneof("kind")
    v = Violations()
    if kind == "submitted":
        if not req.submitted.taskforce_uuid:
            v.add("submitted.taskforce_uuid", "required")
        if req.submitted.cluster_id < 1:
            v.add("submitted.cluster_id", f"must be positive (got {req.submitted.cluster_id})")
        if req.submitted.n_workers < 0:
            v.add("submitted.n_workers", f"must not be negative (got {req.submitted.n_workers})")
        if len(req.submitted.submit_dict) > MAX_SUBMIT_DICT_ENTRIES:
            v.add("submitted.submit_dict", f"at most {MAX_SUBMIT_DICT_ENTRIES} entries")
    elif kind in ("submit_failed", "remove_failed", "removed", "completed"):
        if not getattr(req, kind).taskforce_uuid:
            v.add(f"{kind}.taskforce_uuid", "required")
        if kind == "completed":
            check_timestamp(v, "completed.complete_ts", req.completed.complete_ts)
    elif kind == "snapshot":
        for i, tf in enumerate(req.snapshot.taskforces):
            if not tf.taskforce_uuid:
                v.add(f"snapshot.taskforces[{i}].taskforce_uuid", "required")
            for j, w in enumerate(tf.workers):
                path = f"snapshot.taskforces[{i}].workers[{j}]"
                if not w.worker_id:
                    v.add(f"{path}.worker_id", "required")
                elif not WORKER_ID.fullmatch(w.worker_id):
                    v.add(
                        f"{path}.worker_id",
                        f"must be <cluster id>.<proc id>, e.g. 7.0 (got {w.worker_id!r})",
                    )
                if w.job_state not in JobState.values() or w.job_state == 0:
                    v.add(f"{path}.job_state", f"must be a known job state (got {w.job_state})")
                if len(w.hold_reason) > MAX_ERROR_CHARS:
                    v.add(f"{path}.hold_reason", f"at most {MAX_ERROR_CHARS} characters")
                check_timestamp(v, f"{path}.timestamp", w.timestamp)
                if w.HasField("chirps"):
                    _validate_chirps(v, f"{path}.chirps", w.chirps)
                if w.HasField("job_exit"):
                    _validate_job_exit(v, f"{path}.job_exit", w)
    elif kind == "hello":
        v.add("hello", "only the first message may be a hello")
    else:
        v.add("kind", "required")
    v.raise_if_any()


class TaskManagerService(task_manager_service_pb2_grpc.TaskManagerServiceServicer):
    """TMS streams: hello, then confirmations and job states up; start and stop down."""

    def __init__(self, dispatcher: Dispatcher, locations: ClusterLocations) -> None:
        self._dispatcher = dispatcher
        self._locations = locations

    @grpc_errors
    async def Connect(self, request_iterator: AsyncIterator[Request], context: Ctx) -> Any:
        principal = current_principal()
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        hello, location = _validate_hello(first, self._locations)
        # The token's scope may name the location by an alias.
        if (
            principal.role is Role.TMS
            and principal.scope != ANY_LOCATION
            and self._locations.resolve(principal.scope) != location
        ):
            raise PermissionDenied(
                f"this TMS token is for cluster location {principal.scope!r}, not {location!r}"
            )
        session = await self._dispatcher.connect(hello, location)
        log.info(
            "tms connected",
            location=location,
            tms_id=hello.tms_id,
            scheduler=hello.scheduler,
            version=hello.version,
        )
        reader = asyncio.create_task(self._read(session, requests), name=f"tms-{location}")
        try:
            while (msg := await session.next()) is not None:
                yield msg
        finally:
            reader.cancel()
            self._dispatcher.disconnect(session)
            log.info("tms disconnected", location=location, tms_id=hello.tms_id)

    async def _read(self, session: TmsSession, requests: AsyncIterator[Request]) -> None:
        d = self._dispatcher
        try:
            async for req in requests:
                _validate(req)
                kind = req.WhichOneof("kind")
                if kind == "submitted":
                    await d.submitted(session, req.submitted)
                elif kind == "submit_failed":
                    await d.failed(session, req.submit_failed, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)
                elif kind == "removed":
                    await d.removed(session, req.removed)
                elif kind == "remove_failed":
                    await d.failed(session, req.remove_failed, Phase.TASKFORCE_PHASE_CONDOR_RM)
                elif kind == "completed":
                    await d.completed(session, req.completed)
                elif kind == "snapshot":
                    await d.snapshot(session, req.snapshot)
        except (asyncio.CancelledError, grpc.RpcError):
            return
        except Exception as exc:
            if not isinstance(exc, ApiError):
                log.exception("tms stream failed", location=session.location)
            session.end(exc)
            return
        session.end()
