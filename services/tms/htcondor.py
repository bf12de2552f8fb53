"""The ``htcondor`` scheduler backend: one HTCondor cluster of pilot jobs per taskforce, submitted
to the local schedd through ``htcondor2``, and job states read back from the job event logs (JELs)
the schedd writes (UPSTREAM.md §2.3 and §2.4).

The submit description is the original TMS's, key for key (``build_submit``), with one deliberate
difference: ``environment`` sets ``EWMS_PILOT_WORKER_ID=$(ClusterId).$(ProcId)``, so that each
pilot knows its worker id. Everything else the pilot needs travels, as in the original, in an
envfile the pilot's entrypoint sources; unlike the original (its quirk #13), that file carries
credentials and is written mode 0700, not 0755.

All taskforces submitted on one day share that day's JEL (``{dir}/{date}.tms.jel``). One task
follows each JEL: there is no file-change notification in the standard library, so it polls
(``JobEventLog.events(stop_after=0)``, every ``poll_interval`` seconds while idle), which is cheap
for a file only the schedd appends to. A restarted TMS ``adopt``s the clusters the WMS knows and
re-reads their JELs from the top, so every job's state is sent again (the WMS overwrites).
Reading a JEL is job_event_log.py's; a held job's reason is rendered by hold_reasons.py; a pilot's
chirps (GENERIC events, chirps.py) come out as ``PilotChirp`` events.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any, Protocol, TypeVar

import htcondor2  # type: ignore[import-untyped]
import structlog

from services.tms.hold_reasons import hold_reason_text
from services.tms.job_event_log import (
    CLUSTER_REMOVE,
    EVENT_STATES,
    GENERIC,
    SUBMIT,
    JelReader,
    LogEvent,
)
from services.tms.scheduler import (
    COMPLETED,
    HELD,
    REMOVED,
    WORKER_ID_VARIABLE,
    ClusterLeft,
    JobChange,
    PilotChirp,
    SchedulerError,
    SchedulerEvent,
    SubmitSpec,
    Submitted,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

DEFAULT_CVMFS_PILOT_PATH = (
    "/cvmfs/icecube.opensciencegrid.org/containers/ewms/observation-management-service/ewms-pilot"
)
DEFAULT_POLL_INTERVAL = 0.5
ENVFILE_NAME = "ewms_htcondor_envfile.sh"
PRIORITY_MAX_DEDUCTION_FACTOR = 0.5
IMAGE_SOURCES = ("auto", "cvmfs")  # both mean CVMFS, as in the original

# Where pilots may run. Each site exclusion answers a failure seen there: apptainer mount-hook
# failures, fuse-overlayfs, "user namespace disabled", AMQPConnectionError.
DEFAULT_CONDOR_REQUIREMENTS = " && ".join(
    [
        "ifthenelse(!isUndefined(HAS_SINGULARITY), HAS_SINGULARITY, HasSingularity)",
        "HAS_CVMFS_icecube_opensciencegrid_org",
        # Task containers run apptainer-in-apptainer.
        "HasUserNamespaces =?= true",
        'GLIDEIN_Site =!= "AMNH"',
        'GLIDEIN_Site =!= "Kansas State University"',
        'GLIDEIN_Site =!= "NotreDame"',
        'GLIDEIN_Site =!= "Rhodes-HPC"',
        'GLIDEIN_Site =!= "SDSC-PRP"',
        'GLIDEIN_Site =!= "SU-ITS"',
        'GLIDEIN_Site =!= "San Diego Supercomputer Center"',
        'OSG_SITE_NAME =!= "Wichita State University"',
    ]
)


# --- the schedd -------------------------------------------------------------------------------


class SubmitResultLike(Protocol):
    """What ``Schedd.submit`` returns."""

    def cluster(self) -> int: ...

    def num_procs(self) -> int: ...


class ScheddLike(Protocol):
    """What the scheduler needs of an ``htcondor2.Schedd``; all calls block."""

    def submit(self, description: Any, count: int) -> SubmitResultLike: ...

    def act(self, action: Any, job_spec: str, reason: str) -> object: ...

    def query(self, constraint: str, projection: list[str]) -> Sequence[Mapping[str, Any]]: ...


class _LocalSchedd:
    """The local schedd through ``htcondor2``. Its ``act`` drops a plain-string ``reason`` (25.x
    only reads a ``(reason, code)`` tuple), so the reason goes as a tuple."""

    def __init__(self) -> None:
        self._schedd = htcondor2.Schedd()

    def submit(self, description: Any, count: int) -> SubmitResultLike:
        result: SubmitResultLike = self._schedd.submit(description, count=count)
        return result

    def act(self, action: Any, job_spec: str, reason: str) -> object:
        result: object = self._schedd.act(action, job_spec, reason=(reason, None))
        return result

    def query(self, constraint: str, projection: list[str]) -> Sequence[Mapping[str, Any]]:
        ads: Sequence[Mapping[str, Any]] = self._schedd.query(
            constraint=constraint, projection=projection
        )
        return ads


# --- the submit description ------------------------------------------------------------------


def taskforce_dir(job_event_log_dir: Path, taskforce_uuid: str) -> Path:
    """The taskforce's own directory next to the JELs: its envfile and its pilots' stdout/err."""
    return job_event_log_dir / f"ewms-taskforce-{taskforce_uuid}"


def job_event_log_path(job_event_log_dir: Path, day: date) -> Path:
    """The JEL of everything submitted on ``day``."""
    return job_event_log_dir / f"{day.isoformat()}.tms.jel"


def condor_size(num_bytes: int) -> str:
    """A size as the original wrote it: binary units, at most two decimals, the "i" dropped
    (536870912 → "512 MB"; HTCondor reads MB as MiB). Below 1 KiB, "1 KB": HTCondor's smallest
    unit (the original wrote "N bytes", which HTCondor does not read as bytes)."""
    for symbol, exponent in (("PB", 5), ("TB", 4), ("GB", 3), ("MB", 2), ("KB", 1)):
        divider = 1024**exponent
        if num_bytes >= divider:
            number = f"{num_bytes / divider:.2f}".rstrip("0").rstrip(".")
            return f"{number} {symbol}"
    return "1 KB"


def priority_expression(priority: int, n_workers: int) -> str:
    """The per-proc priority ramp: the first proc gets ``priority``, the last about half of it, so
    that two equal-priority clusters interleave instead of running one after the other."""
    if n_workers <= 1 or priority <= 1:
        return str(priority)
    deduction = int(priority * PRIORITY_MAX_DEDUCTION_FACTOR)
    return f"{priority} - ( ($(ProcId) * {deduction}) / {n_workers - 1} )"


def envfile_text(environment: Mapping[str, str]) -> str:
    """The envfile the pilot entrypoint sources: sorted ``export`` lines, newlines in values
    flattened to spaces. Unlike the original's, without ``set -x``: that echoed every export,
    tokens included, into the pilot's stderr, which comes back to the access point."""
    lines = ["#!/bin/bash"]
    for name in sorted(environment):
        value = str(environment[name]).replace("\n", " ")
        lines.append(f"export {name}={shlex.quote(value)}")
    return "\n".join(lines) + "\n"


def write_envfile(spec: SubmitSpec, job_event_log_dir: Path) -> Path:
    """Write the taskforce's envfile (mode 0700: it holds credentials) atomically; its path."""
    directory = taskforce_dir(job_event_log_dir, spec.taskforce_uuid)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ENVFILE_NAME
    tmp = directory / f".{ENVFILE_NAME}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    try:
        os.fchmod(fd, 0o700)  # also when tmp existed with another mode
        os.write(fd, envfile_text(spec.environment).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def build_submit(
    spec: SubmitSpec, *, job_event_log_dir: Path, cvmfs_pilot_path: str, today: date
) -> tuple[Any, dict[str, str]]:
    """The taskforce's submit description (``htcondor2.Submit``) and the same as a plain dict
    (the ``submit_dict`` the WMS keeps). The envfile it transfers is ``write_envfile``'s."""
    if spec.pilot_image_source not in IMAGE_SOURCES:
        raise SchedulerError(
            f"pilot_config.image_source {spec.pilot_image_source!r}: the htcondor scheduler runs "
            f"pilots from CVMFS only (one of {', '.join(IMAGE_SOURCES)})"
        )
    res = spec.resources
    requirements = DEFAULT_CONDOR_REQUIREMENTS
    if res.condor_requirements.strip():
        requirements += f" && ({res.condor_requirements.strip()})"
    directory = taskforce_dir(job_event_log_dir, spec.taskforce_uuid)
    input_files = [*spec.input_files, str(directory / ENVFILE_NAME)]

    sub: dict[str, str] = {
        "universe": "container",
        "+should_transfer_container": "no",
        "container_image": f"{cvmfs_pilot_path}:{spec.pilot_tag}",
        "Requirements": requirements,
        # No shared-filesystem matching: every input is transferred.
        "+FileSystemDomain": '"blah"',
        "log": str(job_event_log_path(job_event_log_dir, today)),
        "transfer_input_files": ",".join(input_files),
        "transfer_output_files": "",
        "should_transfer_files": "YES",
        "when_to_transfer_output": "ON_EXIT_OR_EVICT",
        "transfer_executable": "false",
        # Not in the original: each pilot's worker id (the rest of its environment is the envfile).
        "environment": f'"{WORKER_ID_VARIABLE}=$(ClusterId).$(ProcId)"',
        "request_cpus": str(res.n_cores),
    }
    if res.memory_bytes > 0:
        sub["request_memory"] = condor_size(res.memory_bytes)
    if res.disk_bytes > 0:
        sub["request_disk"] = condor_size(res.disk_bytes)
    sub["priority"] = priority_expression(res.priority, spec.n_workers)
    sub["+WantIOProxy"] = "true"  # HTChirp
    if res.max_runtime_seconds > 0:
        sub["+OriginalTime"] = str(res.max_runtime_seconds)  # OSG's expected runtime
    sub["+EWMSTaskforceUUID"] = f'"{spec.taskforce_uuid}"'
    sub["job_ad_information_attrs"] = "EWMSTaskforceUUID"
    if res.transfer_stdouterr:
        sub["output"] = str(directory / "cluster-$(ClusterId)" / "$(ProcId).out")
        sub["error"] = str(directory / "cluster-$(ClusterId)" / "$(ProcId).err")
    return htcondor2.Submit(sub), sub


# --- the scheduler ---------------------------------------------------------------------------


def _classad_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class HTCondorScheduler:
    """Pilots as HTCondor jobs of the local schedd (``Scheduler``)."""

    name = "htcondor"

    def __init__(
        self,
        job_event_log_dir: Path,
        schedd: ScheddLike | None = None,
        *,
        cvmfs_pilot_path: str = DEFAULT_CVMFS_PILOT_PATH,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        clock: Callable[[], date] = date.today,
    ) -> None:
        """``schedd``: the local schedd when None (created on first use). ``clock``: today's
        date, which names the JEL a submit writes to."""
        self._dir = job_event_log_dir
        self._schedd = schedd
        self._schedd_lock = threading.Lock()
        self._cvmfs = cvmfs_pilot_path
        self._poll = poll_interval
        self._clock = clock
        self._queue: asyncio.Queue[SchedulerEvent] = asyncio.Queue()
        self._clusters: dict[int, Submitted] = {}
        self._followers: dict[Path, asyncio.Task[None]] = {}
        # Held while a submit is in flight and while events are handled, so that the events of
        # a cluster just submitted are never judged before the cluster is known.
        self._handling = asyncio.Lock()
        self._submitted_procs: defaultdict[int, set[int]] = defaultdict(set)
        self._ended_procs: defaultdict[int, set[int]] = defaultdict(set)
        self._left: set[int] = set()

    # -- the Scheduler protocol

    async def adopt(self, clusters: Sequence[Submitted]) -> None:
        """Follow these clusters' JELs from the top. A JEL already followed is re-read from the
        top when it gains a cluster, so nothing read before is lost; a missing JEL (archived)
        is not followed."""
        to_follow: set[Path] = set()
        for submitted in clusters:
            if submitted.cluster_id in self._clusters:
                continue
            self._clusters[submitted.cluster_id] = submitted
            if submitted.job_event_log_fpath:
                to_follow.add(Path(submitted.job_event_log_fpath))
        for path in sorted(to_follow):
            if not path.exists():
                log.warning("job event log missing; its clusters are not followed", jel=str(path))
                continue
            task = self._followers.pop(path, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            self._follow(path)

    async def find(self, taskforce_uuid: str) -> Submitted | None:
        """This process's record, else the schedd's queue (a cluster submitted by a process that
        died before the WMS heard of it); a cluster found there is followed from then on."""
        for submitted in self._clusters.values():
            if submitted.taskforce_uuid == taskforce_uuid:
                return submitted
        constraint = f"EWMSTaskforceUUID == {_classad_string(taskforce_uuid)}"
        projection = ["ClusterId", "ProcId", "EWMSTaskforceUUID", "UserLog"]
        ads = await self._call(lambda s: s.query(constraint=constraint, projection=projection))
        if not ads:
            return None
        cluster_id = min(int(ad["ClusterId"]) for ad in ads)
        procs = [ad for ad in ads if int(ad["ClusterId"]) == cluster_id]
        submitted = Submitted(
            taskforce_uuid=taskforce_uuid,
            cluster_id=cluster_id,
            n_workers=len(procs),
            job_event_log_fpath=str(procs[0].get("UserLog", "") or ""),
        )
        await self.adopt([submitted])
        return submitted

    async def submit(self, spec: SubmitSpec) -> Submitted:
        """Write the envfile, submit ``n_workers`` pilots and follow today's JEL."""
        today = self._clock()
        try:
            await asyncio.to_thread(write_envfile, spec, self._dir)
            description, submit_dict = build_submit(
                spec, job_event_log_dir=self._dir, cvmfs_pilot_path=self._cvmfs, today=today
            )
            async with self._handling:
                result = await self._call(lambda s: s.submit(description, count=spec.n_workers))
                submitted = Submitted(
                    taskforce_uuid=spec.taskforce_uuid,
                    cluster_id=int(result.cluster()),
                    n_workers=int(result.num_procs()),
                    submit_dict=submit_dict,
                    job_event_log_fpath=submit_dict["log"],
                )
                self._clusters[submitted.cluster_id] = submitted
        except (htcondor2.HTCondorException, OSError) as e:
            raise SchedulerError(str(e) or type(e).__name__) from e
        log.info(
            "submitted",
            taskforce=spec.taskforce_uuid,
            cluster=submitted.cluster_id,
            n_workers=submitted.n_workers,
        )
        if spec.resources.transfer_stdouterr:
            out_dir = taskforce_dir(self._dir, spec.taskforce_uuid) / (
                f"cluster-{submitted.cluster_id}"
            )
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                # The cluster exists: report it, not a failed submit (a retry would find it).
                log.error("pilot stdout/err directory not created", dir=str(out_dir), error=str(e))
        path = Path(submitted.job_event_log_fpath)
        if path not in self._followers:
            self._follow(path)
        return submitted

    async def remove(self, cluster_id: int, reason: str) -> None:
        """``condor_rm`` the cluster. A refusal is no error when no job of it is left."""
        constraint = f"ClusterId == {int(cluster_id)}"
        try:
            await self._call(lambda s: s.act(htcondor2.JobAction.Remove, constraint, reason=reason))
        except (htcondor2.HTCondorException, OSError) as e:
            try:
                left = await self._call(
                    lambda s: s.query(constraint=constraint, projection=["ClusterId", "ProcId"])
                )
            except (htcondor2.HTCondorException, OSError):
                left = [{}]
            if left:
                raise SchedulerError(str(e) or type(e).__name__) from e
        log.info("removed", cluster=cluster_id, reason=reason)

    async def events(self) -> AsyncIterator[SchedulerEvent]:
        while True:
            yield await self._queue.get()

    async def close(self) -> None:
        tasks = list(self._followers.values())
        self._followers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- for the file manager

    def job_event_log_in_use(self, path: Path) -> bool:
        """Whether a cluster this scheduler follows, and that has not left, writes to ``path``."""
        return any(
            Path(s.job_event_log_fpath) == path and s.cluster_id not in self._left
            for s in self._clusters.values()
        )

    # -- internals

    async def _call(self, action: Callable[[ScheddLike], T]) -> T:
        def run() -> T:
            with self._schedd_lock:
                if self._schedd is None:
                    self._schedd = _LocalSchedd()
                schedd = self._schedd
            return action(schedd)

        return await asyncio.to_thread(run)

    def _follow(self, path: Path) -> None:
        task = asyncio.create_task(self._follow_jel(path), name=f"follow {path.name}")
        self._followers[path] = task

    async def _follow_jel(self, path: Path) -> None:
        reader = JelReader(path)
        try:
            while True:
                events = await asyncio.to_thread(reader.read)
                if events:
                    async with self._handling:
                        for event in events:
                            self._handle(event)
                    continue
                if reader.opened and not await asyncio.to_thread(path.exists):
                    log.info("job event log gone (archived); no longer followed", jel=str(path))
                    return
                await asyncio.sleep(self._poll)
        except (htcondor2.HTCondorException, OSError) as e:
            log.error("job event log unreadable; no longer followed", jel=str(path), error=str(e))
        finally:
            if self._followers.get(path) is asyncio.current_task():
                del self._followers[path]
            await asyncio.to_thread(reader.close)

    def _handle(self, event: LogEvent) -> None:
        submitted = self._clusters.get(event.cluster)
        if submitted is None or event.cluster in self._left:
            return  # not ours (or no longer)
        if event.type == CLUSTER_REMOVE:
            self._leave(submitted, event.time)
            return
        if event.type == GENERIC:
            if event.chirp is not None and event.proc >= 0:
                self._queue.put_nowait(
                    PilotChirp(
                        taskforce_uuid=submitted.taskforce_uuid,
                        cluster_id=event.cluster,
                        proc_id=event.proc,
                        chirp=event.chirp,
                        time=event.time,
                    )
                )
            return
        state = EVENT_STATES.get(event.type)
        if state is None or event.proc < 0:
            return
        hold_reason = ""
        if state == HELD:
            hold_reason = hold_reason_text(event.hold_code, event.hold_subcode, event.hold_reason)
        self._queue.put_nowait(
            JobChange(
                taskforce_uuid=submitted.taskforce_uuid,
                cluster_id=event.cluster,
                proc_id=event.proc,
                state=state,
                time=event.time,
                hold_reason=hold_reason,
                job_exit=event.job_exit,
            )
        )
        if event.type == SUBMIT:
            self._submitted_procs[event.cluster].add(event.proc)
        if state in (COMPLETED, REMOVED):
            self._ended_procs[event.cluster].add(event.proc)
        # HTCondor writes CLUSTER_REMOVE only for late-materialized clusters: a cluster has also
        # left once every proc submitted (at least n_workers) has ended.
        procs = self._submitted_procs[event.cluster]
        ended = self._ended_procs[event.cluster]
        if procs and len(procs) >= submitted.n_workers and procs <= ended:
            self._leave(submitted, event.time)

    def _leave(self, submitted: Submitted, time: float) -> None:
        self._left.add(submitted.cluster_id)
        self._submitted_procs.pop(submitted.cluster_id, None)
        self._ended_procs.pop(submitted.cluster_id, None)
        self._queue.put_nowait(
            ClusterLeft(
                taskforce_uuid=submitted.taskforce_uuid, cluster_id=submitted.cluster_id, time=time
            )
        )
