"""The scheduler interface of the TMS: submit a taskforce's cluster, remove it, and a stream of
job-state changes. Two backends implement it: ``local`` (pilot processes on this machine) and
``htcondor`` (an HTCondor schedd through ``htcondor2``). What sits above it (the WMS stream, the
per-taskforce aggregation into snapshots) is shared by both.

Job states are ``taskforce_pb2.JobState`` values; workers are named ``"<cluster id>.<proc id>"``,
which is also the pilot's ``EWMS_PILOT_WORKER_ID``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from ewms.v1 import taskforce_pb2
from services.tms.chirps import Chirp

JobState: TypeAlias = taskforce_pb2.JobState.ValueType

IDLE = taskforce_pb2.JOB_STATE_IDLE
RUNNING = taskforce_pb2.JOB_STATE_RUNNING
HELD = taskforce_pb2.JOB_STATE_HELD
SUSPENDED = taskforce_pb2.JOB_STATE_SUSPENDED
COMPLETED = taskforce_pb2.JOB_STATE_COMPLETED
REMOVED = taskforce_pb2.JOB_STATE_REMOVED
TRANSFERRING_OUTPUT = taskforce_pb2.JOB_STATE_TRANSFERRING_OUTPUT

# The pilot environment variable that carries each worker's id.
WORKER_ID_VARIABLE = "EWMS_PILOT_WORKER_ID"


def worker_id(cluster_id: int, proc_id: int) -> str:
    """A worker's id: ``"<cluster id>.<proc id>"`` (HTCondor's job id)."""
    return f"{cluster_id}.{proc_id}"


class SchedulerError(Exception):
    """The scheduler refused or failed an action; the message says why (it goes to the WMS)."""


@dataclass(frozen=True)
class WorkerResources:
    """What each worker of a taskforce asks of the cluster (``WorkerConfig``, normalized)."""

    n_cores: int = 1
    memory_bytes: int = 0  # 0: no limit
    disk_bytes: int = 0  # 0: no limit
    max_runtime_seconds: int = 0  # 0: no limit
    priority: int = 0
    condor_requirements: str = ""
    transfer_stdouterr: bool = False


@dataclass(frozen=True)
class SubmitSpec:
    """Everything a backend needs to submit one taskforce's cluster of ``n_workers`` pilots.

    ``environment`` is the complete pilot environment (``EWMS_PILOT_*``: task, queues with their
    credentials, WMS address, token, taskforce uuid) except the per-worker
    ``EWMS_PILOT_WORKER_ID``, which the backend sets to ``worker_id(cluster, proc)``.
    """

    taskforce_uuid: str
    n_workers: int
    environment: Mapping[str, str]
    resources: WorkerResources
    # Files on this machine copied (transferred) into each worker's directory.
    input_files: Sequence[str] = ()
    pilot_tag: str = "latest"
    pilot_image_source: str = "auto"


@dataclass(frozen=True)
class Submitted:
    """A submitted cluster, as the TMS confirms it to the WMS."""

    taskforce_uuid: str
    cluster_id: int
    n_workers: int
    submit_dict: Mapping[str, str] = field(default_factory=dict)
    job_event_log_fpath: str = ""


@dataclass(frozen=True)
class JobExit:
    """How a worker's process ended: its exit code, or the signal that killed it (HTCondor's
    JOB_TERMINATED event: ReturnValue, or TerminatedBySignal)."""

    exit_code: int = 0
    signal: int = 0


@dataclass(frozen=True)
class JobChange:
    """One worker's new job state. ``time`` is when the scheduler recorded it (epoch seconds);
    ``job_exit``, for a job that ended, how its process did, if the scheduler saw it."""

    taskforce_uuid: str
    cluster_id: int
    proc_id: int
    state: JobState
    time: float
    hold_reason: str = ""
    job_exit: JobExit | None = None

    @property
    def worker_id(self) -> str:
        return worker_id(self.cluster_id, self.proc_id)


@dataclass(frozen=True)
class ClusterLeft:
    """Every job of the cluster has left the scheduler's queue (ended or removed)."""

    taskforce_uuid: str
    cluster_id: int
    time: float


@dataclass(frozen=True)
class PilotChirp:
    """Something a worker's pilot chirped (HTChirp into the job event log: HTCondor only).
    ``time`` is when the scheduler recorded it (epoch seconds)."""

    taskforce_uuid: str
    cluster_id: int
    proc_id: int
    chirp: Chirp
    time: float

    @property
    def worker_id(self) -> str:
        return worker_id(self.cluster_id, self.proc_id)


SchedulerEvent = JobChange | PilotChirp | ClusterLeft


class Scheduler(Protocol):
    """A scheduler backend. All methods run on the TMS's event loop."""

    name: str

    async def adopt(self, clusters: Sequence[Submitted]) -> None:
        """Follow clusters submitted earlier (by this or a previous TMS process), as the WMS knows
        them; their current job states come out of ``events()`` again. Unknown ones are ignored."""
        ...

    async def find(self, taskforce_uuid: str) -> Submitted | None:
        """The cluster already submitted for this taskforce, if any: a re-sent start command must
        never submit a taskforce twice."""
        ...

    async def submit(self, spec: SubmitSpec) -> Submitted:
        """Submit the taskforce's cluster; raises SchedulerError."""
        ...

    async def remove(self, cluster_id: int, reason: str) -> None:
        """Remove the cluster's jobs (running pilots get SIGTERM, i.e. drain, then SIGKILL after a
        grace period); raises SchedulerError. Removing a cluster that already left is not an
        error."""
        ...

    def events(self) -> AsyncIterator[SchedulerEvent]:
        """Job-state changes, pilot chirps and cluster departures, in order, as they happen. One
        consumer."""
        ...

    async def close(self) -> None:
        """Stop following; jobs are left as they are (a restarted TMS adopts them)."""
        ...
