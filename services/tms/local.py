"""The ``local`` scheduler backend: a tiny schedd whose workers are pilot processes on this machine
(the embedded default of ``ewms run`` and ``ewms up``).

Like a schedd it is durable. Every change is appended to a job log, ``<state dir>/local-schedd.log``
(JSON lines, each fsynced; readable by its owner only, as submit records hold the pilots'
credentials). A new instance replays it: workers whose process still runs are re-attached
(``os.pidfd_open``, checked against the start time in ``/proc/<pid>/stat`` so that a reused pid is
never taken for a worker), idle ones are started as slots free, and every job's current state comes
out of :meth:`~LocalScheduler.events` again, so a restarted TMS re-sends its snapshots;
:meth:`~LocalScheduler.find` answers from the log, so a re-sent start never submits a taskforce
twice. The records, each one change of a job (``proc``) or of a cluster:

- ``submit``: the cluster and all that is needed to start its workers (environment, resources,
  input files); its jobs are IDLE;
- ``execute``: a worker's process started (pid, start time, CPUs): RUNNING;
- ``terminated``: it exited (its exit code, ``-signal`` when a signal killed it, ``null`` when it
  was not our child): COMPLETED, reported with that exit (``JobExit``) as HTCondor's JOB_TERMINATED
  event reports a job's return value or the signal that ended it; no exit when it is not known;
- ``held``: a limit was exceeded, or the process could not start (HTCondor's reason and hold code):
  HELD. The process is killed (``exited`` records its end) and the job stays HELD until removed:
  like HTCondor's, but without a release;
- ``remove``: the cluster is being removed; ``aborted``: one of its jobs is gone (its exit code
  as above, if it had a process): REMOVED;
- ``cluster_left``: all its jobs are COMPLETED or REMOVED (HTCondor's cluster-remove event).

At most ``slots`` worker processes run at once (a held or removed worker's process keeps its slot
until it has exited); idle workers start first come, first served, by cluster id and proc id. Each
runs in its own session in ``ewms-taskforce-<uuid>/cluster-<id>/<proc>/`` (its input files copied
in), with stdout and stderr in ``<proc>.out`` and ``<proc>.err`` in the cluster's directory.

Limits, enforced as an HTCondor execution point would:

- ``n_cores``: the worker's CPU affinity, the least used of this process's CPUs (round robin among
  equals). The forking thread's own affinity is narrowed around the fork, so the worker has it from
  its first instruction, before it can start threads or processes of its own.
- ``max_runtime_seconds``: HELD with code 47 (JobExecuteExceeded); the worker's process group gets
  SIGTERM (the pilot drains), the family SIGKILL after ``kill_grace``.
- ``memory_bytes``: the resident memory (RSS) of the worker's process family -- its session plus
  every descendant, as the pilot starts each task in a session of its own -- sampled every
  ``memory_check_interval``; above the limit, HELD with code 34 (JobOutOfResources) and the family
  is killed, as HTCondor's startd policy does. Deliberately not ``RLIMIT_AS``: it counts address
  space reserved but never used (gRPC's threads, glibc's malloc arenas), and it makes allocations
  fail inside tasks, as puzzling task errors, instead of holding the job.

A family is killed by stopping its members (SIGSTOP, again until no new one appears: a stopped
process can neither fork nor be orphaned out of reach), then SIGKILL. A worker this process started
that exits by itself has what it left behind in its session killed the same way, before it is
reaped (until then its pid, the session's id, cannot be reused).

Exits are seen through each worker's pidfd, readable on the event loop when the process ends, and
reaped with ``waitid(P_PIDFD)``: no polling, no SIGCHLD handler, nothing that could reap a process
someone else waits for. :meth:`~LocalScheduler.close` leaves the workers running for the next
instance to adopt; :meth:`~LocalScheduler.shutdown` removes them first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from services.private_files import private_dir
from services.tms.scheduler import (
    COMPLETED,
    HELD,
    IDLE,
    REMOVED,
    RUNNING,
    WORKER_ID_VARIABLE,
    ClusterLeft,
    JobChange,
    JobExit,
    JobState,
    SchedulerError,
    SchedulerEvent,
    SubmitSpec,
    Submitted,
    WorkerResources,
    worker_id,
)

log = structlog.get_logger(__name__)

LOG_NAME = "local-schedd.log"
DATA_DIR_VARIABLE = "EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST"

# HTCondor's hold reason codes (CONDOR_HOLD_CODE) and messages.
HOLD_FAILED_TO_CREATE_PROCESS = 6
HOLD_OUT_OF_RESOURCES = 34
HOLD_EXECUTE_EXCEEDED = 47
MEMORY_HOLD_REASON = "Memory usage exceeds a memory limit"
# Seconds between a slot freeing and idle workers starting in it (see _start_idle_soon).
START_DELAY = 0.05

# Rounds of stopping a family's new members before giving up on a fork bomb and killing what is
# stopped.
_STOP_ROUNDS = 20


def runtime_hold_reason(seconds: int) -> str:
    """The hold reason of a worker that ran longer than ``max_runtime_seconds``."""
    return f"The job exceeded allowed execute duration of {seconds} seconds"


# --- the job log ---------------------------------------------------------------------------------


class _JobLog:
    """The append-only job log: one JSON object a line, each fsynced before the change it records
    is acted on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def read(self) -> list[tuple[int, dict[str, Any]]]:
        """The records with their line numbers. A last line without its newline was cut short by a
        crash while being written: it is dropped (and truncated away). Any other unreadable line
        raises SchedulerError."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SchedulerError(f"cannot read the local job log {self.path}: {exc}") from None
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            os.truncate(self.path, len(data))
        records = []
        for lineno, line in enumerate(data.splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise SchedulerError(f"{self.path}:{lineno}: not a JSON record ({exc})") from None
            if not isinstance(record, dict) or not isinstance(record.get("event"), str):
                raise SchedulerError(f"{self.path}:{lineno}: a record needs an 'event' string")
            records.append((lineno, record))
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it."""
        if self._fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
        os.write(self._fd, json.dumps(record, separators=(",", ":")).encode() + b"\n")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- processes, as /proc shows them --------------------------------------------------------------


class _Stat(NamedTuple):
    """What the scheduler reads of ``/proc/<pid>/stat``."""

    ppid: int
    session: int
    start_time: int  # field 22: clock ticks after boot; tells a reused pid apart
    rss_pages: int  # field 24


def _read_stat(pid: int) -> _Stat | None:
    """The process's stat, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and parentheses.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return _Stat(int(fields[1]), int(fields[3]), int(fields[19]), int(fields[21]))
    except (IndexError, ValueError):
        return None


def _process_table() -> dict[int, _Stat]:
    """Every process on the machine (visible here)."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def _family(table: dict[int, _Stat], root: int) -> set[int]:
    """The worker ``root``'s processes: its session (it is the session leader) and every
    descendant of those, in whatever session (the pilot starts its tasks in sessions of their
    own)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, stat in table.items():
        children[stat.ppid].append(pid)
    members = {pid for pid, stat in table.items() if stat.session == root}
    if root in table:
        members.add(root)
    pending = list(members)
    while pending:
        for child in children[pending.pop()]:
            if child not in members:
                members.add(child)
                pending.append(child)
    return members


def _family_rss(roots: Sequence[int]) -> dict[int, int]:
    """Each root's family's resident memory in bytes (the sum of its processes' RSS)."""
    table = _process_table()
    page = os.sysconf("SC_PAGE_SIZE")
    return {root: sum(table[p].rss_pages for p in _family(table, root)) * page for root in roots}


def _kill_family(root: int) -> None:
    """SIGKILL the worker ``root``'s family: stopped first, until no new member appears, so that
    none forks or is orphaned (and lost to the search) while the others die."""
    stopped: set[int] = set()
    for _ in range(_STOP_ROUNDS):
        new = _family(_process_table(), root) - stopped
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _affinity_for_fork(cpus: frozenset[int]) -> Iterator[None]:
    """Narrow the calling thread's CPU affinity to ``cpus`` while the body forks: the child
    inherits it from its first instruction. Nothing else runs on this thread meanwhile."""
    saved = os.sched_getaffinity(0)  # the calling thread's
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


# --- the queue -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Process:
    """A worker's live process (running, or being killed)."""

    pid: int
    start_time: int
    cpus: frozenset[int]
    started: float  # epoch seconds, so the runtime limit survives a restart
    own_child: bool = False
    pidfd: int | None = None  # None until attached (replayed, not yet checked)
    term_sent: bool = False
    kill_at: float | None = None  # epoch seconds of the pending SIGKILL
    kill_timer: asyncio.TimerHandle | None = None
    runtime_timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Worker:
    cluster: _Cluster
    proc: int
    state: JobState
    time: float  # when it entered its state
    hold_reason: str = ""
    process: _Process | None = None
    held_kill_at: float | None = None  # when a held worker's process must be dead
    job_exit: JobExit | None = None  # how its process ended, once COMPLETED or REMOVED


@dataclass(eq=False)
class _Cluster:
    id: int
    spec: SubmitSpec
    directory: Path
    workers: list[_Worker] = field(default_factory=list)
    removing: bool = False
    remove_kill_at: float = 0.0  # when the removed workers' processes must be dead
    left: float | None = None  # when it left the queue

    def worker_dir(self, proc: int) -> Path:
        return self.directory / str(proc)


def _spec_record(spec: SubmitSpec) -> dict[str, Any]:
    return {
        "taskforce_uuid": spec.taskforce_uuid,
        "n_workers": spec.n_workers,
        "environment": dict(spec.environment),
        "resources": asdict(spec.resources),
        "input_files": list(spec.input_files),
        "pilot_tag": spec.pilot_tag,
        "pilot_image_source": spec.pilot_image_source,
    }


def _spec_from_record(record: dict[str, Any]) -> SubmitSpec:
    return SubmitSpec(
        taskforce_uuid=str(record["taskforce_uuid"]),
        n_workers=int(record["n_workers"]),
        environment={str(k): str(v) for k, v in record["environment"].items()},
        resources=WorkerResources(**record["resources"]),
        input_files=tuple(record["input_files"]),
        pilot_tag=str(record.get("pilot_tag", "latest")),
        pilot_image_source=str(record.get("pilot_image_source", "auto")),
    )


def _job_exit(exit_code: int | None) -> JobExit | None:
    """A recorded exit code (``-signal`` if killed, None if unknown) as the job's exit."""
    if exit_code is None:
        return None
    if exit_code < 0:
        return JobExit(signal=-exit_code)
    return JobExit(exit_code=exit_code)


def _exit_code(pidfd: int) -> int | None:
    """Reap the exited process behind ``pidfd``: its exit code (``-signal`` if killed), or None
    if it is not our child (its status is its parent's)."""
    try:
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return None
    if result is None:  # not ended after all (cannot happen once the pidfd is readable)
        return None
    if result.si_code == os.CLD_EXITED:
        return result.si_status
    return -result.si_status


class LocalScheduler:
    """The local backend of :class:`~services.tms.scheduler.Scheduler`: workers are pilot
    processes on this machine, at most ``slots`` at once. See the module's docstring.

    ``command`` starts one worker (default ``python -m services.pilot``, with ``python``); its
    configuration is its environment. Construction replays the job log in ``state_dir``; following
    the workers starts with the first coroutine call (or :meth:`events`), on that event loop."""

    name = "local"

    def __init__(
        self,
        state_dir: Path,
        *,
        slots: int | None = None,
        kill_grace: float = 15.0,
        memory_check_interval: float = 1.0,
        python: str = sys.executable,
        command: Sequence[str] | None = None,
    ) -> None:
        self.slots = slots if slots is not None else os.cpu_count() or 1
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if kill_grace < 0:
            raise ValueError(f"kill_grace must be >= 0, got {kill_grace}")
        if memory_check_interval <= 0:
            raise ValueError(f"memory_check_interval must be > 0, got {memory_check_interval}")
        self.state_dir = Path(state_dir).absolute()
        self.kill_grace = kill_grace
        self.memory_check_interval = memory_check_interval
        self.command = list(command) if command is not None else [python, "-m", "services.pilot"]
        self._cpus = sorted(os.sched_getaffinity(0))
        self._cpu_cursor = 0
        # Private: the job log holds the pilots' credentials, the workers' directories events.
        private_dir(self.state_dir)
        self._log = _JobLog(self.state_dir / LOG_NAME)
        self._clusters: dict[int, _Cluster] = {}
        self._idle: collections.deque[_Worker] = collections.deque()  # to start, in order
        self._live: set[_Worker] = set()  # workers with a process
        self._events: asyncio.Queue[SchedulerEvent | None] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._all_exited: list[asyncio.Future[None]] = []
        self._start_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._replay()
        self._next_cluster = max(self._clusters, default=0) + 1

    # -- the Scheduler interface ------------------------------------------------------------------

    async def adopt(self, clusters: Sequence[Submitted]) -> None:
        """Follow the clusters of the job log (the WMS's list adds nothing: the log is the truth;
        clusters it does not know are ignored); their states come out of :meth:`events` again."""
        self._follow()
        for submitted in clusters:
            if submitted.cluster_id not in self._clusters:
                log.info("unknown cluster ignored", cluster=submitted.cluster_id)

    async def find(self, taskforce_uuid: str) -> Submitted | None:
        """The taskforce's latest cluster, if the job log has one (also one that has left)."""
        for cluster in reversed(self._clusters.values()):
            if cluster.spec.taskforce_uuid == taskforce_uuid:
                return self._submitted(cluster)
        return None

    async def submit(self, spec: SubmitSpec) -> Submitted:
        """Submit the taskforce's cluster: worker directories made and input files copied in
        (raises SchedulerError, before anything starts, for a missing one), then its workers are
        IDLE and start as slots free."""
        self._follow()
        uuid = spec.taskforce_uuid
        if not uuid or uuid in (".", "..") or "/" in uuid or "\0" in uuid:
            raise SchedulerError(f"taskforce_uuid {uuid!r} cannot name a directory")
        if spec.n_workers < 1:
            raise SchedulerError(f"n_workers must be >= 1, got {spec.n_workers}")
        inputs = await asyncio.to_thread(_existing_inputs, spec.input_files)
        spec = SubmitSpec(
            taskforce_uuid=uuid,
            n_workers=spec.n_workers,
            environment=dict(spec.environment),
            resources=spec.resources,
            input_files=tuple(str(p) for p in inputs),
            pilot_tag=spec.pilot_tag,
            pilot_image_source=spec.pilot_image_source,
        )
        cluster_id = self._next_cluster
        self._next_cluster += 1
        directory = self.state_dir / f"ewms-taskforce-{uuid}" / f"cluster-{cluster_id}"
        try:
            await asyncio.to_thread(_prepare_directories, directory, spec.n_workers, inputs)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise SchedulerError(f"cannot prepare the workers' directories: {exc}") from None
        now = self._record({"event": "submit", "cluster": cluster_id, **_spec_record(spec)})
        cluster = _Cluster(cluster_id, spec, directory)
        self._clusters[cluster_id] = cluster
        for proc in range(spec.n_workers):
            worker = _Worker(cluster, proc, IDLE, now)
            cluster.workers.append(worker)
            self._idle.append(worker)
            self._emit_state(worker)
        log.info("submitted", taskforce=uuid, cluster=cluster_id, workers=spec.n_workers)
        self._start_idle()
        return self._submitted(cluster)

    async def remove(self, cluster_id: int, reason: str) -> None:
        """Remove the cluster's jobs: idle (and held) ones at once; running ones get SIGTERM (the
        pilot drains), their family SIGKILL after ``kill_grace``, and are REMOVED when gone. Returns
        without waiting; removing a cluster that has left does nothing."""
        self._follow()
        self._remove(cluster_id, reason, self.kill_grace)

    async def events(self) -> AsyncIterator[SchedulerEvent]:
        """Job-state changes and cluster departures, in order, until :meth:`close`."""
        if not self._closed:
            self._follow()
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)  # for a later caller too
                return
            yield event

    async def close(self) -> None:
        """Stop following and sampling; the workers are left as they are (a restarted TMS adopts
        them)."""
        if self._closed:
            return
        self._closed = True
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        for worker in list(self._live):
            assert worker.process is not None
            self._detach(worker.process)
        self._live.clear()
        for waiter in self._all_exited:
            if not waiter.done():
                waiter.set_result(None)
        self._log.close()
        self._events.put_nowait(None)

    async def shutdown(self, grace: float) -> None:
        """Remove every cluster's workers -- SIGTERM, SIGKILL after ``grace`` seconds -- wait until
        their processes are gone, and close (the end of ``ewms up`` and ``ewms run``)."""
        if self._closed:
            return
        self._follow()
        for cluster in list(self._clusters.values()):
            if cluster.left is None:
                self._remove(cluster.id, "the local scheduler is shutting down", grace)
        if self._live:
            assert self._loop is not None
            waiter = self._loop.create_future()
            self._all_exited.append(waiter)
            try:
                # SIGKILL is sent after the grace; a process that survives it (stuck in the
                # kernel) is left behind rather than holding up the end forever.
                await asyncio.wait_for(waiter, grace + 10.0)
            except TimeoutError:
                pids = sorted(w.process.pid for w in self._live if w.process is not None)
                log.warning("workers did not exit after SIGKILL", pids=pids)
        await self.close()

    # -- replaying the job log --------------------------------------------------------------------

    def _replay(self) -> None:
        """Rebuild the queue from the job log (nothing is signalled or emitted yet)."""
        for lineno, record in self._log.read():
            try:
                self._apply(record)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                raise SchedulerError(
                    f"{self._log.path}:{lineno}: cannot replay {record.get('event')!r} record "
                    f"({type(exc).__name__}: {exc})"
                ) from None
        self._idle.extend(w for c in self._clusters.values() for w in c.workers if w.state == IDLE)

    def _apply(self, record: dict[str, Any]) -> None:
        kind = record["event"]
        when = float(record["time"])
        if kind == "submit":
            spec = _spec_from_record(record)
            cluster_id = int(record["cluster"])
            directory = self.state_dir / f"ewms-taskforce-{spec.taskforce_uuid}"
            cluster = _Cluster(cluster_id, spec, directory / f"cluster-{cluster_id}")
            cluster.workers = [_Worker(cluster, p, IDLE, when) for p in range(spec.n_workers)]
            self._clusters[cluster_id] = cluster
            return
        cluster = self._clusters[int(record["cluster"])]
        if kind == "remove":
            cluster.removing = True
            cluster.remove_kill_at = when + float(record["grace"])
            return
        if kind == "cluster_left":
            cluster.left = when
            return
        worker = cluster.workers[int(record["proc"])]
        if kind == "execute":
            worker.state, worker.time = RUNNING, when
            worker.process = _Process(
                pid=int(record["pid"]),
                start_time=int(record["start_time"]),
                cpus=frozenset(record["cpus"]),
                started=when,
            )
        elif kind == "terminated":
            worker.state, worker.time, worker.process = COMPLETED, when, None
            worker.job_exit = _job_exit(record["exit_code"])
        elif kind == "held":
            worker.state, worker.time = HELD, when
            worker.hold_reason = str(record["reason"])
            worker.held_kill_at = when + float(record["kill_after"])
        elif kind == "exited":
            worker.process = None
        elif kind == "aborted":
            worker.state, worker.time, worker.process = REMOVED, when, None
            worker.job_exit = _job_exit(record.get("exit_code"))
        else:
            raise ValueError(f"unknown event {kind!r}")

    def _follow(self) -> None:
        """Start following, once, on the running event loop: re-emit every job's state, re-attach
        the processes that still run, resume what the log says was under way (holds, removals),
        start idle workers, start sampling memory."""
        if self._closed:
            raise SchedulerError("the local scheduler is closed")
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for cluster in self._clusters.values():
            for worker in cluster.workers:
                self._emit_state(worker)
            if cluster.left is not None:
                self._emit(ClusterLeft(cluster.spec.taskforce_uuid, cluster.id, cluster.left))
        ended = []
        for cluster in self._clusters.values():
            for worker in cluster.workers:
                process = worker.process
                if process is None:
                    continue
                process.pidfd = _attach(process.pid, process.start_time)
                if process.pidfd is None:
                    ended.append(worker)
                    continue
                log.info("re-attached", worker=worker_id(cluster.id, worker.proc), pid=process.pid)
                self._watch(worker, process)
                if worker.state == HELD or cluster.removing:
                    process.term_sent = True  # before the record was written; never twice
                if worker.state == HELD and worker.held_kill_at is not None:
                    self._schedule_kill(worker, worker.held_kill_at)
                if cluster.removing:
                    self._schedule_kill(worker, cluster.remove_kill_at)
        for worker in ended:
            # It ended while no scheduler watched: its exit status went to its new parent.
            assert worker.process is not None
            self._ended(worker, worker.process, None)
        for cluster in self._clusters.values():
            if cluster.left is None:
                if cluster.removing:
                    for worker in cluster.workers:
                        if worker.process is None and worker.state in (IDLE, HELD):
                            self._abort(worker, None)
                self._check_left(cluster)  # also when it was not recorded before a crash
        self._sampler = self._loop.create_task(self._sample_memory())
        self._start_idle()

    # -- starting workers -------------------------------------------------------------------------

    def _start_idle(self) -> None:
        """Start idle workers, in order, while slots are free."""
        while self._idle and len(self._live) < self.slots:
            worker = self._idle.popleft()
            if worker.state == IDLE and not worker.cluster.removing:
                self._start(worker)

    def _start(self, worker: _Worker) -> None:
        cluster = worker.cluster
        wid = worker_id(cluster.id, worker.proc)
        directory = cluster.worker_dir(worker.proc)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EWMS_")}
        env.update(cluster.spec.environment)
        env[WORKER_ID_VARIABLE] = wid
        env.setdefault(DATA_DIR_VARIABLE, str(directory))
        cpus = self._pick_cpus(cluster.spec.resources.n_cores)
        try:
            with (
                open(cluster.directory / f"{worker.proc}.out", "wb") as out,
                open(cluster.directory / f"{worker.proc}.err", "wb") as err,
                _affinity_for_fork(cpus),
            ):
                popen = subprocess.Popen(
                    self.command,
                    cwd=directory,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
        except (OSError, ValueError) as exc:
            reason = f"Failed to execute {shlex.join(self.command)!r}: {exc}"
            log.warning("worker did not start", worker=wid, error=str(exc))
            self._hold(worker, reason, HOLD_FAILED_TO_CREATE_PROCESS, kill_after=0.0)
            return
        # Reaping is done here, through the pidfd: Popen must not reap it itself (when collected
        # while the child runs, it would, from a later Popen call, and take its exit status).
        popen.returncode = 0
        pidfd = os.pidfd_open(popen.pid)
        stat = _read_stat(popen.pid)  # it cannot be gone: it is not reaped
        now = self._record(
            {
                "event": "execute",
                "cluster": cluster.id,
                "proc": worker.proc,
                "pid": popen.pid,
                "start_time": stat.start_time if stat else 0,
                "cpus": sorted(cpus),
            }
        )
        process = _Process(
            popen.pid, stat.start_time if stat else 0, cpus, now, own_child=True, pidfd=pidfd
        )
        worker.process = process
        self._set_state(worker, RUNNING, now)
        log.info("worker started", worker=wid, pid=popen.pid, cpus=sorted(cpus))
        self._watch(worker, process)

    def _pick_cpus(self, n_cores: int) -> frozenset[int]:
        """``n_cores`` distinct CPUs: the least used by running workers, round robin among
        equals."""
        if n_cores >= len(self._cpus):
            return frozenset(self._cpus)
        use = collections.Counter(c for w in self._live if w.process for c in w.process.cpus)
        start = self._cpu_cursor
        order = self._cpus[start:] + self._cpus[:start]
        chosen = sorted(order, key=lambda cpu: use[cpu])[: max(n_cores, 1)]
        self._cpu_cursor = (self._cpus.index(chosen[-1]) + 1) % len(self._cpus)
        return frozenset(chosen)

    def _watch(self, worker: _Worker, process: _Process) -> None:
        """Follow the attached process: its exit, its runtime limit."""
        assert self._loop is not None and process.pidfd is not None
        self._live.add(worker)
        self._loop.add_reader(process.pidfd, self._on_exit, worker, process)
        limit = worker.cluster.spec.resources.max_runtime_seconds
        if limit > 0 and worker.state == RUNNING:
            delay = max(0.0, process.started + limit - time.time())
            process.runtime_timer = self._loop.call_later(
                delay, self._hold_runtime, worker, process, limit
            )

    # -- limits -----------------------------------------------------------------------------------

    def _hold_runtime(self, worker: _Worker, process: _Process, limit: int) -> None:
        if worker.process is not process or worker.state != RUNNING:
            return
        self._hold(worker, runtime_hold_reason(limit), HOLD_EXECUTE_EXCEEDED, self.kill_grace)
        self._terminate(worker, process, time.time() + self.kill_grace)

    async def _sample_memory(self) -> None:
        """Every ``memory_check_interval``: hold running workers whose family's resident memory
        exceeds their ``memory_bytes``."""
        while True:
            await asyncio.sleep(self.memory_check_interval)
            watched = {
                w.process.pid: (w, w.process)
                for w in self._live
                if w.process is not None
                and w.state == RUNNING
                and w.cluster.spec.resources.memory_bytes > 0
            }
            if not watched:
                continue
            try:
                usage = await asyncio.to_thread(_family_rss, list(watched))
            except OSError as exc:  # /proc unreadable: nothing to enforce with
                log.error("cannot sample memory", error=str(exc))
                continue
            for pid, rss in usage.items():
                worker, process = watched[pid]
                limit = worker.cluster.spec.resources.memory_bytes
                if worker.process is process and worker.state == RUNNING and rss > limit:
                    self._hold(
                        worker, MEMORY_HOLD_REASON, HOLD_OUT_OF_RESOURCES, 0.0, rss_bytes=rss
                    )
                    self._kill(worker, process)

    def _hold(
        self, worker: _Worker, reason: str, code: int, kill_after: float, **extra: Any
    ) -> None:
        """HELD: recorded with HTCondor's reason and code; its process (if any) must be gone
        ``kill_after`` seconds from now."""
        now = self._record(
            {
                "event": "held",
                "cluster": worker.cluster.id,
                "proc": worker.proc,
                "reason": reason,
                "code": code,
                "kill_after": kill_after,
                **extra,
            }
        )
        worker.hold_reason = reason
        worker.held_kill_at = now + kill_after
        log.warning("worker held", worker=worker_id(worker.cluster.id, worker.proc), reason=reason)
        self._set_state(worker, HELD, now)

    # -- stopping workers -------------------------------------------------------------------------

    def _remove(self, cluster_id: int, reason: str, grace: float) -> None:
        cluster = self._clusters.get(cluster_id)
        if cluster is None:
            raise SchedulerError(f"cluster {cluster_id} is unknown to the local scheduler")
        if cluster.left is not None:
            return
        now = time.time()
        if not cluster.removing or now + grace < cluster.remove_kill_at:
            self._record(
                {"event": "remove", "cluster": cluster_id, "reason": reason, "grace": grace}
            )
            cluster.removing = True
            cluster.remove_kill_at = now + grace
            log.info("removing", cluster=cluster_id, reason=reason)
        for worker in cluster.workers:
            if worker.state in (COMPLETED, REMOVED):
                continue
            process = worker.process
            if process is None:
                self._abort(worker, None)
            else:
                self._terminate(worker, process, cluster.remove_kill_at)
        self._check_left(cluster)

    def _terminate(self, worker: _Worker, process: _Process, kill_at: float) -> None:
        """SIGTERM the worker's process group (the pilot drains; a second one would stop it at
        once, so it is sent once), SIGKILL the family at ``kill_at`` (epoch seconds)."""
        if not process.term_sent:
            process.term_sent = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        self._schedule_kill(worker, kill_at)

    def _schedule_kill(self, worker: _Worker, when: float) -> None:
        """SIGKILL the worker's family at ``when`` (epoch seconds), unless it is gone or due
        earlier."""
        process = worker.process
        assert self._loop is not None and process is not None
        if process.kill_at is not None and process.kill_at <= when:
            return
        if process.kill_timer is not None:
            process.kill_timer.cancel()
        process.kill_at = when
        delay = max(0.0, when - time.time())
        process.kill_timer = self._loop.call_later(delay, self._kill, worker, process)

    def _kill(self, worker: _Worker, process: _Process) -> None:
        if worker.process is process:
            log.info("killing", worker=worker_id(worker.cluster.id, worker.proc), pid=process.pid)
            _kill_family(process.pid)

    # -- processes ending -------------------------------------------------------------------------

    def _on_exit(self, worker: _Worker, process: _Process) -> None:
        """The process's pidfd is readable: it has exited."""
        assert process.pidfd is not None
        if process.own_child:
            # Not reaped yet, so its pid (its session's id) cannot be reused meanwhile.
            _kill_family(process.pid)
        self._ended(worker, process, _exit_code(process.pidfd))

    def _ended(self, worker: _Worker, process: _Process, exit_code: int | None) -> None:
        """Record the end of the worker's process; the job is COMPLETED if it was running (REMOVED
        if its cluster is being removed; a held job stays held); its slot is free."""
        self._detach(process)
        worker.process = None
        self._live.discard(worker)
        cluster = worker.cluster
        wid = worker_id(cluster.id, worker.proc)
        log.info("worker exited", worker=wid, pid=process.pid, exit_code=exit_code)
        if cluster.removing:
            self._abort(worker, exit_code)
        elif worker.state == RUNNING:
            now = self._record(
                {
                    "event": "terminated",
                    "cluster": cluster.id,
                    "proc": worker.proc,
                    "exit_code": exit_code,
                }
            )
            worker.job_exit = _job_exit(exit_code)
            self._set_state(worker, COMPLETED, now)
        else:
            self._record(
                {
                    "event": "exited",
                    "cluster": cluster.id,
                    "proc": worker.proc,
                    "exit_code": exit_code,
                }
            )
        self._check_left(cluster)
        if not self._live:
            for waiter in self._all_exited:
                if not waiter.done():
                    waiter.set_result(None)
            self._all_exited.clear()
        self._start_idle_soon()

    def _start_idle_soon(self) -> None:
        """Start idle workers a moment after a slot freed, once: when a workflow is aborted its
        pilots exit at once on the WMS's stop while the TMS's remove is still on its way, and
        starting the next idle workers in that moment would only have them killed."""
        if self._start_timer is None and self._loop is not None and not self._closed:
            self._start_timer = self._loop.call_later(START_DELAY, self._start_idle_due)

    def _start_idle_due(self) -> None:
        self._start_timer = None
        self._start_idle()

    def _detach(self, process: _Process) -> None:
        """Stop following the process (its timers too); it is left running."""
        for timer in (process.kill_timer, process.runtime_timer):
            if timer is not None:
                timer.cancel()
        if process.pidfd is not None:
            if self._loop is not None:
                self._loop.remove_reader(process.pidfd)
            os.close(process.pidfd)
            process.pidfd = None

    def _abort(self, worker: _Worker, exit_code: int | None) -> None:
        now = self._record(
            {
                "event": "aborted",
                "cluster": worker.cluster.id,
                "proc": worker.proc,
                "exit_code": exit_code,
            }
        )
        worker.job_exit = _job_exit(exit_code)
        self._set_state(worker, REMOVED, now)

    def _check_left(self, cluster: _Cluster) -> None:
        """Every job COMPLETED or REMOVED: the cluster leaves the queue."""
        if cluster.left is not None:
            return
        if all(w.state in (COMPLETED, REMOVED) for w in cluster.workers):
            cluster.left = self._record({"event": "cluster_left", "cluster": cluster.id})
            log.info("cluster left", cluster=cluster.id)
            self._emit(ClusterLeft(cluster.spec.taskforce_uuid, cluster.id, cluster.left))

    # -- records and events -----------------------------------------------------------------------

    def _record(self, record: dict[str, Any]) -> float:
        """Append a record (with its time) to the job log; returns the time."""
        now = time.time()
        self._log.append({**record, "time": now})
        return now

    def _set_state(self, worker: _Worker, state: JobState, when: float) -> None:
        worker.state, worker.time = state, when
        self._emit_state(worker)

    def _emit_state(self, worker: _Worker) -> None:
        reason = worker.hold_reason if worker.state == HELD else ""
        uuid = worker.cluster.spec.taskforce_uuid
        ended = worker.job_exit if worker.state in (COMPLETED, REMOVED) else None
        self._emit(
            JobChange(
                uuid, worker.cluster.id, worker.proc, worker.state, worker.time, reason, ended
            )
        )

    def _emit(self, event: SchedulerEvent) -> None:
        self._events.put_nowait(event)

    def _submitted(self, cluster: _Cluster) -> Submitted:
        resources = cluster.spec.resources
        submit = {
            "executable": self.command[0],
            "arguments": shlex.join(self.command[1:]),
            "initialdir": f"{cluster.directory}/$(ProcId)",
            "output": f"{cluster.directory}/$(ProcId).out",
            "error": f"{cluster.directory}/$(ProcId).err",
            "transfer_input_files": ",".join(cluster.spec.input_files),
            "request_cpus": str(resources.n_cores),
            "request_memory": str(resources.memory_bytes),
            "allowed_execute_duration": str(resources.max_runtime_seconds),
            "log": str(self._log.path),
        }
        return Submitted(
            cluster.spec.taskforce_uuid,
            cluster.id,
            cluster.spec.n_workers,
            submit_dict=submit,
            job_event_log_fpath=str(self._log.path),
        )


def _attach(pid: int, start_time: int) -> int | None:
    """A pidfd of the recorded worker process, if it still runs (the same pid and start time)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    # Checked after opening: the pidfd holds on to whatever process had the pid then.
    stat = _read_stat(pid)
    if stat is None or stat.start_time != start_time:
        os.close(pidfd)
        return None
    return pidfd


def _existing_inputs(files: Sequence[str]) -> list[Path]:
    """The input files as absolute paths; SchedulerError names one that does not exist."""
    inputs = [Path(f).absolute() for f in files]
    for path in inputs:
        if not path.exists():
            raise SchedulerError(f"input file {str(path)!r} does not exist")
    return inputs


def _prepare_directories(directory: Path, n_workers: int, inputs: Sequence[Path]) -> None:
    """Each worker's directory with the input files copied in (a directory is copied whole). A
    directory left by a submit that was never recorded is replaced."""
    shutil.rmtree(directory, ignore_errors=True)
    for proc in range(n_workers):
        worker_dir = directory / str(proc)
        worker_dir.mkdir(parents=True)
        for source in inputs:
            if source.is_dir():
                shutil.copytree(source, worker_dir / source.name, symlinks=True)
            else:
                shutil.copy2(source, worker_dir / source.name)
