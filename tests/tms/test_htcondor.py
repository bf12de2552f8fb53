"""The htcondor scheduler: the exact submit description and envfile, job states read from
job event logs in HTCondor's own text format, starts and stops through a schedd, and the JEL
directory's file rules.

HTCondor's daemons cannot run here, so ``FakeSchedd`` stands in for the schedd: it keeps a job
queue of ClassAds, evaluates constraints with the real ClassAd library, and writes the submit
events to the JEL a description names, as the schedd does. Everything else is real: ``htcondor2``
builds the descriptions and parses the logs.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import stat
import tarfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any

import classad2  # type: ignore[import-untyped]
import htcondor2  # type: ignore[import-untyped]
import pytest

from services.tms import htcondor
from services.tms.files import DAY, Expiries, FileManager
from services.tms.htcondor import (
    HTCondorScheduler,
    build_submit,
    condor_size,
    priority_expression,
    write_envfile,
)
from services.tms.scheduler import (
    COMPLETED,
    HELD,
    IDLE,
    REMOVED,
    RUNNING,
    SUSPENDED,
    ClusterLeft,
    JobChange,
    JobExit,
    JobState,
    SchedulerError,
    SchedulerEvent,
    SubmitSpec,
    Submitted,
    WorkerResources,
)

UUID = "6e1d9c0a-5d0e-4b5e-9a4f-0123456789ab"
TODAY = date(2026, 11, 21)
CVMFS = "/cvmfs/example.org/ewms-pilot"
WAIT = 10.0  # seconds any expected event may take

EXPECTED_REQUIREMENTS = (
    "ifthenelse(!isUndefined(HAS_SINGULARITY), HAS_SINGULARITY, HasSingularity)"
    " && HAS_CVMFS_icecube_opensciencegrid_org"
    " && HasUserNamespaces =?= true"
    ' && GLIDEIN_Site =!= "AMNH"'
    ' && GLIDEIN_Site =!= "Kansas State University"'
    ' && GLIDEIN_Site =!= "NotreDame"'
    ' && GLIDEIN_Site =!= "Rhodes-HPC"'
    ' && GLIDEIN_Site =!= "SDSC-PRP"'
    ' && GLIDEIN_Site =!= "SU-ITS"'
    ' && GLIDEIN_Site =!= "San Diego Supercomputer Center"'
    ' && OSG_SITE_NAME =!= "Wichita State University"'
)


def spec(n_workers: int = 4, **resources: Any) -> SubmitSpec:
    return SubmitSpec(
        taskforce_uuid=UUID,
        n_workers=n_workers,
        environment={
            "EWMS_PILOT_TASK_IMAGE": "/cvmfs/example.org/task:1",
            "EWMS_PILOT_QUEUE_INCOMING_AUTH_TOKEN": "secret token",
            "EWMS_PILOT_TASK_ARGS": "--in 'a b'\n--out c",
        },
        resources=WorkerResources(**resources),
        input_files=("/data/a.json", "/data/b.json"),
        pilot_tag="1.2.3",
    )


# --- the submit description ------------------------------------------------------------------


def test_submit_description_is_the_originals_key_for_key(tmp_path: Path) -> None:
    description, submit_dict = build_submit(
        spec(
            n_workers=4,
            n_cores=2,
            memory_bytes=536870912,
            disk_bytes=8 * 1024**3,
            max_runtime_seconds=3600,
            priority=100,
        ),
        job_event_log_dir=tmp_path,
        cvmfs_pilot_path=CVMFS,
        today=TODAY,
    )
    tf_dir = tmp_path / f"ewms-taskforce-{UUID}"
    assert submit_dict == {
        "universe": "container",
        "+should_transfer_container": "no",
        "container_image": f"{CVMFS}:1.2.3",
        "Requirements": EXPECTED_REQUIREMENTS,
        "+FileSystemDomain": '"blah"',
        "log": f"{tmp_path}/2026-11-21.tms.jel",
        "transfer_input_files": f"/data/a.json,/data/b.json,{tf_dir}/ewms_htcondor_envfile.sh",
        "transfer_output_files": "",
        "should_transfer_files": "YES",
        "when_to_transfer_output": "ON_EXIT_OR_EVICT",
        "transfer_executable": "false",
        "environment": '"EWMS_PILOT_WORKER_ID=$(ClusterId).$(ProcId)"',
        "request_cpus": "2",
        "request_memory": "512 MB",
        "request_disk": "8 GB",
        "priority": "100 - ( ($(ProcId) * 50) / 3 )",
        "+WantIOProxy": "true",
        "+OriginalTime": "3600",
        "+EWMSTaskforceUUID": f'"{UUID}"',
        "job_ad_information_attrs": "EWMSTaskforceUUID",
    }
    # htcondor2 reads "+Attr" as "MY.Attr" and keeps every value as given.
    assert dict(description) == {
        (f"MY.{k[1:]}" if k.startswith("+") else k): v for k, v in submit_dict.items()
    }
    assert f'MY.EWMSTaskforceUUID = "{UUID}"\n' in str(description)


def test_each_pilot_gets_its_worker_id_from_the_submit_environment(tmp_path: Path) -> None:
    description, _ = build_submit(
        spec(), job_event_log_dir=tmp_path, cvmfs_pilot_path=CVMFS, today=TODAY
    )
    assert description.expand("environment") == '"EWMS_PILOT_WORKER_ID=1.0"'


def test_user_condor_requirements_are_anded_to_the_defaults(tmp_path: Path) -> None:
    _, submit_dict = build_submit(
        spec(condor_requirements=" HAS_AVX2 == true "),
        job_event_log_dir=tmp_path,
        cvmfs_pilot_path=CVMFS,
        today=TODAY,
    )
    assert submit_dict["Requirements"] == EXPECTED_REQUIREMENTS + " && (HAS_AVX2 == true)"


def test_stdout_and_stderr_go_to_a_per_cluster_directory_only_when_asked(tmp_path: Path) -> None:
    _, without = build_submit(
        spec(), job_event_log_dir=tmp_path, cvmfs_pilot_path=CVMFS, today=TODAY
    )
    _, with_ = build_submit(
        spec(transfer_stdouterr=True),
        job_event_log_dir=tmp_path,
        cvmfs_pilot_path=CVMFS,
        today=TODAY,
    )
    assert "output" not in without and "error" not in without
    tf_dir = tmp_path / f"ewms-taskforce-{UUID}"
    assert with_["output"] == f"{tf_dir}/cluster-$(ClusterId)/$(ProcId).out"
    assert with_["error"] == f"{tf_dir}/cluster-$(ClusterId)/$(ProcId).err"


def test_zero_memory_disk_and_runtime_set_no_limit(tmp_path: Path) -> None:
    _, submit_dict = build_submit(
        spec(memory_bytes=0, disk_bytes=0, max_runtime_seconds=0),
        job_event_log_dir=tmp_path,
        cvmfs_pilot_path=CVMFS,
        today=TODAY,
    )
    assert "request_memory" not in submit_dict
    assert "request_disk" not in submit_dict
    assert "+OriginalTime" not in submit_dict


@pytest.mark.parametrize(
    ("priority", "n_workers", "expected"),
    [
        (100, 5, "100 - ( ($(ProcId) * 50) / 4 )"),
        (7, 3, "7 - ( ($(ProcId) * 3) / 2 )"),
        (100, 1, "100"),  # one worker: nothing to interleave
        (1, 5, "1"),
        (0, 5, "0"),
    ],
)
def test_priority_ramp(priority: int, n_workers: int, expected: str) -> None:
    assert priority_expression(priority, n_workers) == expected


def test_priority_ramp_runs_from_the_priority_down_to_about_half() -> None:
    expression = priority_expression(100, 5)
    values = [
        classad2.ExprTree(expression.replace("$(ProcId)", str(proc))).eval() for proc in range(5)
    ]
    assert values == [100, 88, 75, 63, 50]  # ClassAd integer arithmetic


@pytest.mark.parametrize(
    ("num_bytes", "expected"),
    [
        (536870912, "512 MB"),
        (1024**3, "1 GB"),
        (3 * 1024**3 // 2, "1.5 GB"),
        (123456789, "117.74 MB"),
        (2048, "2 KB"),
        (5 * 1024**4, "5 TB"),
        (100, "1 KB"),
    ],
)
def test_sizes_are_written_in_binary_units_without_the_i(num_bytes: int, expected: str) -> None:
    assert condor_size(num_bytes) == expected


def test_only_cvmfs_pilot_images_are_submitted(tmp_path: Path) -> None:
    with pytest.raises(SchedulerError, match="image_source 'docker'"):
        build_submit(
            replace(spec(), pilot_image_source="docker"),
            job_event_log_dir=tmp_path,
            cvmfs_pilot_path=CVMFS,
            today=TODAY,
        )


def test_envfile_exports_the_sorted_environment_readable_only_by_its_owner(
    tmp_path: Path,
) -> None:
    path = write_envfile(spec(), tmp_path)
    assert path == tmp_path / f"ewms-taskforce-{UUID}" / "ewms_htcondor_envfile.sh"
    assert path.read_text() == (
        "#!/bin/bash\n"
        "export EWMS_PILOT_QUEUE_INCOMING_AUTH_TOKEN='secret token'\n"
        "export EWMS_PILOT_TASK_ARGS='--in '\"'\"'a b'\"'\"' --out c'\n"
        "export EWMS_PILOT_TASK_IMAGE=/cvmfs/example.org/task:1\n"
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_rewritten_envfile_keeps_its_mode(tmp_path: Path) -> None:
    path = write_envfile(spec(), tmp_path)
    path.chmod(0o755)
    write_envfile(spec(), tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


# --- job event logs in HTCondor's text format ------------------------------------------------


def ev(code: int, job: str, when: str, title: str, *body: str) -> str:
    """One event as the schedd writes it: ``NNN (cluster.proc.subproc) date time title``,
    tab-indented body lines, then ``...``."""
    cluster, proc = job.split(".")
    head = f"{code:03d} ({int(cluster):03d}.{int(proc):03d}.000) 2026-11-21 {when} {title}"
    return "\n".join([head, *(f"\t{line}" for line in body), "..."]) + "\n"


def submitted(job: str, when: str) -> str:
    return ev(0, job, when, "Job submitted from host: <127.0.0.1:9618?addrs=127.0.0.1-9618&noUDP>")


def executing(job: str, when: str) -> str:
    return ev(
        1,
        job,
        when,
        "Job executing on host: <10.0.0.5:9618?addrs=10.0.0.5-9618&noUDP>",
        "SlotName: slot1_1@ep.example.org",
    )


def evicted(job: str, when: str) -> str:
    return ev(
        4,
        job,
        when,
        "Job was evicted.",
        "(0) CPU times",
        "\tUsr 0 00:00:00, Sys 0 00:00:00  -  Run Remote Usage",
        "\tUsr 0 00:00:00, Sys 0 00:00:00  -  Run Local Usage",
        "0  -  Run Bytes Sent By Job",
        "0  -  Run Bytes Received By Job",
    )


def held(job: str, when: str, reason: str, code: int, subcode: int = 0) -> str:
    return ev(12, job, when, "Job was held.", reason, f"Code {code} Subcode {subcode}")


def released(job: str, when: str) -> str:
    return ev(13, job, when, "Job was released.", "via condor_release (by user ewms)")


def aborted(job: str, when: str) -> str:
    return ev(9, job, when, "Job was aborted.", "via condor_rm (by user ewms)")


def terminated(job: str, when: str, return_value: int = 0, signal: int = 0) -> str:
    """A JOB_TERMINATED event: the job exited with ``return_value``, or ``signal`` killed it."""
    how = (
        [f"(0) Abnormal termination (signal {signal})", "(0) No core file"]
        if signal
        else [f"(1) Normal termination (return value {return_value})"]
    )
    return ev(
        5,
        job,
        when,
        "Job terminated.",
        *how,
        "\tUsr 0 00:00:01, Sys 0 00:00:00  -  Run Remote Usage",
        "\tUsr 0 00:00:00, Sys 0 00:00:00  -  Run Local Usage",
        "\tUsr 0 00:00:01, Sys 0 00:00:00  -  Total Remote Usage",
        "\tUsr 0 00:00:00, Sys 0 00:00:00  -  Total Local Usage",
        "120  -  Run Bytes Sent By Job",
        "4096  -  Run Bytes Received By Job",
        "120  -  Total Bytes Sent By Job",
        "4096  -  Total Bytes Received By Job",
        "Partitionable Resources :    Usage  Request Allocated",
        "   Cpus                 :                 1         1",
        "   Disk (KB)            :       12   1048576   1048576",
        "   Memory (MB)          :       40       512       512",
    )


def shadow_exception(job: str, when: str) -> str:
    return ev(
        7,
        job,
        when,
        "Shadow exception!",
        "Error from slot1_1@ep.example.org: Cannot start container",
        "0  -  Run Bytes Sent By Job",
        "0  -  Run Bytes Received By Job",
    )


def suspended(job: str, when: str) -> str:
    return ev(10, job, when, "Job was suspended.", "Number of processes actually suspended: 1")


def unsuspended(job: str, when: str) -> str:
    return ev(11, job, when, "Job was unsuspended.")


def reconnect_failed(job: str, when: str) -> str:
    # This event's body is indented with spaces, not tabs.
    cluster, proc = job.split(".")
    return (
        f"024 ({int(cluster):03d}.{int(proc):03d}.000) 2026-11-21 {when} Job reconnection failed\n"
        "    Job not found at execution machine\n"
        "    Can not reconnect to slot1_1@ep.example.org, rescheduling job\n...\n"
    )


def cluster_removed(cluster: int, when: str) -> str:
    # The schedd writes cluster events with proc and subproc -1.
    return (
        f"036 ({cluster:03d}.-01.-01) 2026-11-21 {when} Cluster removed\n"
        "\tMaterialized 2 jobs from 0 items. Complete\n...\n"
    )


def generic(job: str, when: str, info: str) -> str:
    """A GENERIC event (what ``condor_chirp ulog`` and HTChirp's ``ulog`` write, e.g. a pilot's
    chirp): ``008``, the job, the time, then the text on the event's own line."""
    return ev(8, job, when, info)


def image_size(job: str, when: str) -> str:
    return ev(6, job, when, "Image size of job updated: 2048", "40  -  MemoryUsage of job (MB)")


# A terminated event whose body is garbage: htcondor2 raises ULOG_RD_ERROR for it.
CORRUPT = "005 (123.000.000) 2026-11-21 10:01:00 Job terminated.\n\t#%! garbage\n...\n"


def at(when: str) -> float:
    """An event time: the JEL's local time."""
    return datetime.fromisoformat(f"2026-11-21T{when}").timestamp()


def change(
    job: str, state: JobState, when: str, hold_reason: str = "", job_exit: JobExit | None = None
) -> JobChange:
    cluster, proc = job.split(".")
    return JobChange(
        taskforce_uuid=UUID,
        cluster_id=int(cluster),
        proc_id=int(proc),
        state=state,
        time=at(when),
        hold_reason=hold_reason,
        job_exit=job_exit,
    )


async def take(scheduler: HTCondorScheduler, n: int) -> list[SchedulerEvent]:
    """The scheduler's next ``n`` events, failing after WAIT seconds."""
    out: list[SchedulerEvent] = []
    stream = scheduler.events()
    async with asyncio.timeout(WAIT):
        while len(out) < n:
            out.append(await anext(stream))
    return out


def cluster(cluster_id: int, jel: Path, n_workers: int = 2, uuid: str = UUID) -> Submitted:
    return Submitted(
        taskforce_uuid=uuid,
        cluster_id=cluster_id,
        n_workers=n_workers,
        job_event_log_fpath=str(jel),
    )


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[HTCondorScheduler]:
    s = HTCondorScheduler(tmp_path, FakeSchedd(), poll_interval=0.02, clock=lambda: TODAY)
    yield s
    await s.close()


async def test_events_become_job_states_in_order(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(
        submitted("123.0", "10:00:00")
        + submitted("123.1", "10:00:00")
        + executing("123.0", "10:01:00")
        + image_size("123.0", "10:01:30")
        + evicted("123.0", "10:02:00")
        + executing("123.0", "10:03:00")
        + held("123.0", "10:04:00", "Error from slot1_1@ep: memory usage exceeded", 34)
        + released("123.0", "10:05:00")
        + shadow_exception("123.0", "10:06:00")
        + executing("123.1", "10:07:00")
        + suspended("123.1", "10:08:00")
        + unsuspended("123.1", "10:09:00")
        + reconnect_failed("123.1", "10:10:00")
        + terminated("123.0", "10:11:00")
    )
    await scheduler.adopt([cluster(123, jel)])
    # Events of other types (006, image size) and proc 123.1 still idle: no departure.
    assert await take(scheduler, 13) == [
        change("123.0", IDLE, "10:00:00"),
        change("123.1", IDLE, "10:00:00"),
        change("123.0", RUNNING, "10:01:00"),
        change("123.0", IDLE, "10:02:00"),
        change("123.0", RUNNING, "10:03:00"),
        change(
            "123.0",
            HELD,
            "10:04:00",
            "Memory usage exceeds a memory limit: Error from slot1_1@ep: memory usage exceeded",
        ),
        change("123.0", IDLE, "10:05:00"),
        change("123.0", IDLE, "10:06:00"),
        change("123.1", RUNNING, "10:07:00"),
        change("123.1", SUSPENDED, "10:08:00"),
        change("123.1", IDLE, "10:09:00"),
        change("123.1", IDLE, "10:10:00"),
        change("123.0", COMPLETED, "10:11:00", job_exit=JobExit()),
    ]


async def test_events_of_unknown_clusters_are_ignored(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(
        submitted("999.0", "10:00:00")
        + executing("999.0", "10:01:00")
        + submitted("123.0", "10:02:00")
    )
    await scheduler.adopt([cluster(123, jel)])
    assert await take(scheduler, 1) == [change("123.0", IDLE, "10:02:00")]


async def test_a_corrupt_event_is_skipped_and_reading_goes_on(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(submitted("123.0", "10:00:00") + CORRUPT + executing("123.0", "10:02:00"))
    await scheduler.adopt([cluster(123, jel)])
    assert await take(scheduler, 2) == [
        change("123.0", IDLE, "10:00:00"),
        change("123.0", RUNNING, "10:02:00"),
    ]


async def test_events_appended_later_are_followed(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(submitted("123.0", "10:00:00"))
    await scheduler.adopt([cluster(123, jel)])
    assert await take(scheduler, 1) == [change("123.0", IDLE, "10:00:00")]

    event = executing("123.0", "10:01:00")
    with jel.open("a") as f:  # an event written in two parts is read once whole
        f.write(event[:40])
        f.flush()
        await asyncio.sleep(0.1)  # let the follower meet the partial event
        f.write(event[40:])
    assert await take(scheduler, 1) == [change("123.0", RUNNING, "10:01:00")]


async def test_cluster_remove_event_means_the_cluster_left(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    # Late materialization: 3 workers asked, 2 materialized before the removal.
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(
        submitted("123.0", "10:00:00")
        + submitted("123.1", "10:00:00")
        + aborted("123.0", "10:01:00")
        + aborted("123.1", "10:01:00")
        + cluster_removed(123, "10:02:00")
    )
    await scheduler.adopt([cluster(123, jel, n_workers=3)])
    assert await take(scheduler, 5) == [
        change("123.0", IDLE, "10:00:00"),
        change("123.1", IDLE, "10:00:00"),
        change("123.0", REMOVED, "10:01:00"),
        change("123.1", REMOVED, "10:01:00"),
        ClusterLeft(taskforce_uuid=UUID, cluster_id=123, time=at("10:02:00")),
    ]


async def test_a_cluster_whose_every_job_ended_has_left_once(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(
        submitted("123.0", "10:00:00")
        + submitted("123.1", "10:00:00")
        + terminated("123.0", "10:01:00")
        + aborted("123.1", "10:02:00")
        + cluster_removed(123, "10:03:00")  # not a second departure
        + submitted("124.0", "10:04:00")
    )
    await scheduler.adopt([cluster(123, jel), cluster(124, jel, n_workers=1, uuid="other")])
    events = await take(scheduler, 6)
    assert events[2:] == [
        change("123.0", COMPLETED, "10:01:00", job_exit=JobExit()),
        change("123.1", REMOVED, "10:02:00"),
        ClusterLeft(taskforce_uuid=UUID, cluster_id=123, time=at("10:02:00")),
        replace(change("124.0", IDLE, "10:04:00"), taskforce_uuid="other"),
    ]
    assert scheduler.job_event_log_in_use(jel)  # cluster 124 is still on it


async def test_a_job_killed_by_a_signal_completes_with_the_signal_as_its_exit(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(
        submitted("123.0", "10:00:00")
        + submitted("123.1", "10:00:00")
        + terminated("123.0", "10:01:00", signal=9)
        + terminated("123.1", "10:02:00", return_value=3)
    )
    await scheduler.adopt([cluster(123, jel)])
    events = await take(scheduler, 5)
    assert events[2:4] == [
        change("123.0", COMPLETED, "10:01:00", job_exit=JobExit(signal=9)),
        change("123.1", COMPLETED, "10:02:00", job_exit=JobExit(exit_code=3)),
    ]


async def test_a_restarted_scheduler_reads_adopted_logs_from_the_top(tmp_path: Path) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(submitted("123.0", "10:00:00") + executing("123.0", "10:01:00"))
    expected = [change("123.0", IDLE, "10:00:00"), change("123.0", RUNNING, "10:01:00")]
    for _ in range(2):
        s = HTCondorScheduler(tmp_path, FakeSchedd(), poll_interval=0.02)
        try:
            await s.adopt([cluster(123, jel)])
            assert await take(s, 2) == expected
        finally:
            await s.close()


async def test_a_cluster_adopted_into_a_followed_log_gets_its_earlier_events(
    tmp_path: Path,
) -> None:
    scheduler = HTCondorScheduler(tmp_path, FakeSchedd(), poll_interval=0.02)
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(submitted("124.0", "10:00:00") + submitted("123.0", "10:01:00"))
    await scheduler.adopt([cluster(123, jel)])
    assert await take(scheduler, 1) == [change("123.0", IDLE, "10:01:00")]

    await scheduler.adopt([cluster(124, jel, uuid="other")])
    assert await take(scheduler, 2) == [  # the log again, from the top
        replace(change("124.0", IDLE, "10:00:00"), taskforce_uuid="other"),
        change("123.0", IDLE, "10:01:00"),
    ]
    # ... by one follower: later events come once.
    with jel.open("a") as f:
        f.write(executing("123.0", "10:02:00") + executing("124.0", "10:03:00"))
    assert await take(scheduler, 2) == [
        change("123.0", RUNNING, "10:02:00"),
        replace(change("124.0", RUNNING, "10:03:00"), taskforce_uuid="other"),
    ]
    await scheduler.close()
    # The replaced follower ended too: nothing keeps reading.
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("follow ")]


def held_without_code(job: str, when: str, reason: str) -> str:
    # A hold written with no "Code" line (htcondor2 reads it as code 0).
    return ev(12, job, when, "Job was held.", reason)


MEMORY = "Memory usage exceeds a memory limit"
INPUT_TRANSFER = "An error occurred while transferring job input files"
OUTPUT_TRANSFER = "An error occurred while transferring job output files or self-checkpoint files"
OOM = "Error from slot1_1@ep.example.org: Job has gone over cgroup memory limit of 512 megabytes."
PELICAN = "Transfer input files failure at execution point slot1_1@ep using protocol osdf."


@pytest.mark.parametrize(
    ("event", "hold_reason"),
    [
        # Subcode 0 is none: the original's "HELD: Memory usage exceeds a memory limit".
        (held("123.0", "10:01:00", OOM, 34), f"{MEMORY}: {OOM}"),
        # HTCondor >= 24 names the resource that ran out.
        (held("123.0", "10:01:00", OOM, 34, 102), f"{MEMORY}: {OOM}"),
        (
            held("123.0", "10:01:00", "Disk usage exceeded", 34, 104),
            "Disk usage exceeds a disk limit: Disk usage exceeded",
        ),
        # Transfer errors: an errno, or a file-transfer plug-in's exit code (<< 8) or timeout.
        (
            held("123.0", "10:01:00", PELICAN, 13, 2),
            f"{INPUT_TRANSFER}: subcode 2 (ENOENT): {PELICAN}",
        ),
        (
            held("123.0", "10:01:00", PELICAN, 13, 256),
            f"{INPUT_TRANSFER}: subcode 256 (plug-in exit code 1): {PELICAN}",
        ),
        (
            held("123.0", "10:01:00", "plugin timed out", 12, 62),
            f"{OUTPUT_TRANSFER}: subcode 62 (ETIME: plug-in timed out): plugin timed out",
        ),
        (
            held("123.0", "10:01:00", "Cannot execute /bin/pilot", 6, 13),
            "The condor_starter failed to start the executable: subcode 13 (EACCES): "
            "Cannot execute /bin/pilot",
        ),
        (
            held("123.0", "10:01:00", "The job attribute PeriodicHold expression is true", 3, 7),
            "The PERIODIC_HOLD expression evaluated to True. Or, ON_EXIT_HOLD was true: "
            "subcode 7 (user provided): The job attribute PeriodicHold expression is true",
        ),
        # Subcodes with a message of their own.
        (
            held("123.0", "10:01:00", "no key", 37, 1),
            "User error in the EC2 universe: Public key file not defined: no key",
        ),
        (
            held("123.0", "10:01:00", "via condor_hold (by user ewms)", 1),
            "The user put the job on hold with condor_hold: via condor_hold (by user ewms)",
        ),
        (held("123.0", "10:01:00", "", 47), "The job's allowed execution time was exceeded"),
        (held_without_code("123.0", "10:01:00", "held"), "Unspecified hold reason: held"),
        # A code HTCondor's table lacks (newer than ours, or retired).
        (held("123.0", "10:01:00", "new", 97, 3), "Hold reason code 97: subcode 3: new"),
    ],
)
async def test_a_held_jobs_reason_is_its_codes_meaning_subcode_and_the_events_text(
    scheduler: HTCondorScheduler, tmp_path: Path, event: str, hold_reason: str
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(submitted("123.0", "10:00:00") + event)
    await scheduler.adopt([cluster(123, jel)])
    assert await take(scheduler, 2) == [
        change("123.0", IDLE, "10:00:00"),
        change("123.0", HELD, "10:01:00", hold_reason),
    ]


async def test_a_hold_reason_is_cut_to_what_the_wms_takes(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(held("123.0", "10:01:00", "x" * 6000, 13, 2))
    await scheduler.adopt([cluster(123, jel)])
    [got] = await take(scheduler, 1)
    assert isinstance(got, JobChange)
    assert len(got.hold_reason) == 4096
    assert got.hold_reason.startswith(f"{INPUT_TRANSFER}: subcode 2 (ENOENT): xxx")
    assert got.hold_reason.endswith("x…")


# --- starts and stops through the schedd -----------------------------------------------------


@dataclass
class FakeResult:
    cluster_id: int
    procs: int

    def cluster(self) -> int:
        return self.cluster_id

    def num_procs(self) -> int:
        return self.procs


@dataclass
class FakeSchedd:
    """The schedd's job queue: ClassAds, constraints evaluated by the ClassAd library. A submit
    writes the jobs' submit events to the description's ``log``, as the schedd does."""

    next_cluster: int = 123
    jobs: list[classad2.ClassAd] = field(default_factory=list)
    submits: list[tuple[Any, int]] = field(default_factory=list)
    acts: list[tuple[Any, str, str]] = field(default_factory=list)
    queries: list[tuple[str, list[str]]] = field(default_factory=list)
    fail: Exception | None = None
    answer_delay: float = 0.0  # seconds between writing the submit events and answering
    writes_log: bool = True

    def submit(self, description: Any, count: int) -> FakeResult:
        if self.fail:
            raise self.fail
        cluster_id, self.next_cluster = self.next_cluster, self.next_cluster + 1
        self.submits.append((description, count))
        log_path = Path(description["log"])
        for proc in range(count):
            ad = classad2.ClassAd({"ClusterId": cluster_id, "ProcId": proc})
            ad["EWMSTaskforceUUID"] = classad2.ExprTree(description["MY.EWMSTaskforceUUID"]).eval()
            ad["UserLog"] = str(log_path)
            self.jobs.append(ad)
            if not self.writes_log:
                continue
            with log_path.open("a") as f:
                f.write(submitted(f"{cluster_id}.{proc}", "10:00:00"))
        time.sleep(self.answer_delay)
        return FakeResult(cluster_id, count)

    def act(self, action: Any, job_spec: str, reason: str) -> object:
        self.acts.append((action, job_spec, reason))
        if self.fail:
            raise self.fail
        self.jobs = [ad for ad in self.jobs if not classad2.ExprTree(job_spec).eval(ad)]
        return {}

    def query(self, constraint: str, projection: list[str]) -> Sequence[Mapping[str, Any]]:
        self.queries.append((constraint, projection))
        matching = [ad for ad in self.jobs if classad2.ExprTree(constraint).eval(ad) is True]
        return [{k: ad[k] for k in projection if k in ad} for ad in matching]


async def test_submit_sends_the_description_for_n_workers_and_follows_its_log(
    tmp_path: Path,
) -> None:
    schedd = FakeSchedd()
    s = HTCondorScheduler(tmp_path, schedd, poll_interval=0.02, clock=lambda: TODAY)
    try:
        result = await s.submit(spec(n_workers=3, transfer_stdouterr=True))
        [(description, count)] = schedd.submits
        expected_description, expected_dict = build_submit(
            spec(n_workers=3, transfer_stdouterr=True),
            job_event_log_dir=tmp_path,
            cvmfs_pilot_path=htcondor.DEFAULT_CVMFS_PILOT_PATH,
            today=TODAY,
        )
        assert count == 3
        assert str(description) == str(expected_description)
        assert result == Submitted(
            taskforce_uuid=UUID,
            cluster_id=123,
            n_workers=3,
            submit_dict=expected_dict,
            job_event_log_fpath=str(tmp_path / "2026-11-21.tms.jel"),
        )
        tf_dir = tmp_path / f"ewms-taskforce-{UUID}"
        assert (tf_dir / "ewms_htcondor_envfile.sh").is_file()
        assert (tf_dir / "cluster-123").is_dir()
        assert await take(s, 3) == [
            change("123.0", IDLE, "10:00:00"),
            change("123.1", IDLE, "10:00:00"),
            change("123.2", IDLE, "10:00:00"),
        ]
    finally:
        await s.close()


async def test_events_the_schedd_writes_before_answering_a_submit_are_not_lost(
    tmp_path: Path,
) -> None:
    schedd = FakeSchedd()
    s = HTCondorScheduler(tmp_path, schedd, poll_interval=0.02, clock=lambda: TODAY)
    try:
        await s.submit(replace(spec(n_workers=1), taskforce_uuid="first"))
        await take(s, 1)  # today's log is followed now
        # The follower reads cluster 124's events (every 0.02 s) before the schedd answers.
        schedd.answer_delay = 0.3
        await s.submit(spec(n_workers=1))
        assert await take(s, 1) == [change("124.0", IDLE, "10:00:00")]
    finally:
        await s.close()


async def test_a_log_the_schedd_has_not_created_yet_is_waited_for(tmp_path: Path) -> None:
    s = HTCondorScheduler(
        tmp_path, FakeSchedd(writes_log=False), poll_interval=0.02, clock=lambda: TODAY
    )
    try:
        result = await s.submit(spec(n_workers=1))
        await asyncio.sleep(0.1)  # the follower looks for the log a few times meanwhile
        jel = Path(result.job_event_log_fpath)
        await asyncio.to_thread(jel.write_text, submitted("123.0", "10:00:00"))
        assert await take(s, 1) == [change("123.0", IDLE, "10:00:00")]
    finally:
        await s.close()


async def test_a_restarted_scheduler_finds_the_submitted_cluster_instead_of_submitting_again(
    tmp_path: Path,
) -> None:
    schedd = FakeSchedd()
    first = HTCondorScheduler(tmp_path, schedd, poll_interval=0.02, clock=lambda: TODAY)
    submitted_first = await first.submit(spec(n_workers=2))
    await first.close()

    second = HTCondorScheduler(tmp_path, schedd, poll_interval=0.02, clock=lambda: TODAY)
    try:
        found = await second.find(UUID)
        assert found == Submitted(
            taskforce_uuid=UUID,
            cluster_id=submitted_first.cluster_id,
            n_workers=2,
            job_event_log_fpath=submitted_first.job_event_log_fpath,
        )
        assert schedd.queries[-1][0] == f'EWMSTaskforceUUID == "{UUID}"'
        assert len(schedd.submits) == 1
        # Found clusters are followed: their jobs' states come out.
        assert await take(second, 2) == [
            change("123.0", IDLE, "10:00:00"),
            change("123.1", IDLE, "10:00:00"),
        ]
        assert await second.find("never-submitted") is None
    finally:
        await second.close()


async def test_find_answers_from_memory_what_this_process_submitted(tmp_path: Path) -> None:
    schedd = FakeSchedd()
    s = HTCondorScheduler(tmp_path, schedd, poll_interval=0.02, clock=lambda: TODAY)
    try:
        result = await s.submit(spec())
        assert await s.find(UUID) == result  # with its submit_dict, which the queue lacks
        assert schedd.queries == []
    finally:
        await s.close()


async def test_schedd_errors_become_scheduler_errors(tmp_path: Path) -> None:
    schedd = FakeSchedd(fail=htcondor2.HTCondorException("Failed to connect to schedd"))
    s = HTCondorScheduler(tmp_path, schedd, poll_interval=0.02, clock=lambda: TODAY)
    with pytest.raises(SchedulerError, match=r"^Failed to connect to schedd$"):
        await s.submit(spec())
    await s.close()


async def test_an_unwritable_log_directory_is_a_scheduler_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    s = HTCondorScheduler(not_a_dir, FakeSchedd(), clock=lambda: TODAY)
    with pytest.raises(SchedulerError):
        await s.submit(spec())
    await s.close()


async def test_remove_asks_the_schedd_to_remove_the_cluster(tmp_path: Path) -> None:
    schedd = FakeSchedd()
    s = HTCondorScheduler(tmp_path, schedd, poll_interval=0.02, clock=lambda: TODAY)
    try:
        await s.submit(spec(n_workers=2))
        await s.remove(123, "Requested by EWMS")
        assert schedd.acts == [
            (htcondor2.JobAction.Remove, "ClusterId == 123", "Requested by EWMS")
        ]
        assert schedd.jobs == []
    finally:
        await s.close()


async def test_removing_a_cluster_already_gone_is_not_an_error(tmp_path: Path) -> None:
    schedd = FakeSchedd(fail=htcondor2.HTCondorException("no such job"))
    s = HTCondorScheduler(tmp_path, schedd)
    await s.remove(77, "Requested by EWMS")
    assert schedd.queries == [("ClusterId == 77", ["ClusterId", "ProcId"])]


async def test_a_refused_remove_of_a_queued_cluster_is_a_scheduler_error(tmp_path: Path) -> None:
    schedd = FakeSchedd()
    s = HTCondorScheduler(tmp_path, schedd, clock=lambda: TODAY)
    await s.submit(spec(n_workers=1))
    schedd.fail = htcondor2.HTCondorException("permission denied")
    with pytest.raises(SchedulerError, match="permission denied"):
        await s.remove(123, "Requested by EWMS")
    await s.close()


# --- the JEL directory's file rules ----------------------------------------------------------

NOW = 1_800_000_000.0


def aged(path: Path, days: float, content: str = "x") -> Path:
    """A file last modified ``days`` before NOW."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    os.utime(path, (NOW - days * DAY, NOW - days * DAY))
    return path


def test_an_idle_log_no_taskforce_uses_is_gzipped_after_a_day(tmp_path: Path) -> None:
    idle = aged(tmp_path / "2026-11-01.tms.jel", 1.5, "events")
    used = aged(tmp_path / "2026-11-02.tms.jel", 1.5)
    fresh = aged(tmp_path / "2026-11-03.tms.jel", 0.5)
    FileManager(tmp_path, in_use=lambda p: p == used).run_once(NOW)
    assert not idle.exists()
    assert gzip.decompress((tmp_path / "2026-11-01.tms.jel.gz").read_bytes()) == b"events"
    assert used.exists() and fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "2026-11-01.tms.jel.gz",
        "2026-11-02.tms.jel",
        "2026-11-03.tms.jel",
    ]


def test_a_log_idle_for_a_week_is_gzipped_even_in_use(tmp_path: Path) -> None:
    old = aged(tmp_path / "2026-11-01.tms.jel", 7.5)
    FileManager(tmp_path, in_use=lambda p: True).run_once(NOW)
    assert not old.exists() and (tmp_path / "2026-11-01.tms.jel.gz").exists()


def test_a_log_whose_use_is_unknown_is_kept(tmp_path: Path) -> None:
    log_file = aged(tmp_path / "2026-11-01.tms.jel", 2)

    def in_use(path: Path) -> bool:
        raise RuntimeError("WMS unreachable")

    FileManager(tmp_path, in_use=in_use).run_once(NOW)
    assert log_file.exists()


def test_log_archives_are_deleted_after_a_week(tmp_path: Path) -> None:
    old = aged(tmp_path / "2026-10-01.tms.jel.gz", 7.5)
    young = aged(tmp_path / "2026-11-01.tms.jel.gz", 6.5)
    FileManager(tmp_path, in_use=lambda p: False).run_once(NOW)
    assert not old.exists() and young.exists()


def test_an_idle_taskforce_directory_is_tarred_then_removed(tmp_path: Path) -> None:
    directory = tmp_path / "ewms-taskforce-aaa"
    aged(directory / "cluster-1" / "0.out", 6, "out")
    aged(directory / "ewms_htcondor_envfile.sh", 6)
    os.utime(directory / "cluster-1", (NOW - 6 * DAY, NOW - 6 * DAY))
    os.utime(directory, (NOW - 6 * DAY, NOW - 6 * DAY))
    FileManager(tmp_path, in_use=lambda p: False).run_once(NOW)
    assert not directory.exists()
    with tarfile.open(tmp_path / "ewms-taskforce-aaa.tar.gz") as tar:
        assert sorted(tar.getnames()) == [
            "ewms-taskforce-aaa",
            "ewms-taskforce-aaa/cluster-1",
            "ewms-taskforce-aaa/cluster-1/0.out",
            "ewms-taskforce-aaa/ewms_htcondor_envfile.sh",
        ]
        member = tar.extractfile("ewms-taskforce-aaa/cluster-1/0.out")
        assert member is not None and member.read() == b"out"


def test_a_taskforce_directory_with_a_recent_file_deep_inside_is_kept(tmp_path: Path) -> None:
    directory = tmp_path / "ewms-taskforce-bbb"
    aged(directory / "ewms_htcondor_envfile.sh", 6)
    aged(directory / "cluster-1" / "0.err", 1)
    os.utime(directory / "cluster-1", (NOW - 6 * DAY, NOW - 6 * DAY))
    os.utime(directory, (NOW - 6 * DAY, NOW - 6 * DAY))
    FileManager(tmp_path, in_use=lambda p: False).run_once(NOW)
    assert directory.is_dir()
    assert not (tmp_path / "ewms-taskforce-bbb.tar.gz").exists()


def test_taskforce_tarballs_are_deleted_after_five_days(tmp_path: Path) -> None:
    old = aged(tmp_path / "ewms-taskforce-ccc.tar.gz", 5.5)
    young = aged(tmp_path / "ewms-taskforce-ddd.tar.gz", 4.5)
    FileManager(tmp_path, in_use=lambda p: False).run_once(NOW)
    assert not old.exists() and young.exists()


def test_a_failed_action_is_skipped_and_the_pass_goes_on(tmp_path: Path) -> None:
    blocked = aged(tmp_path / "2026-11-01.tms.jel", 2, "events")
    (tmp_path / "2026-11-01.tms.jel.gz").mkdir()  # the archive's name is taken
    other = aged(tmp_path / "2026-11-02.tms.jel", 2)
    old_archive = aged(tmp_path / "2026-10-01.tms.jel.gz", 8)
    FileManager(tmp_path, in_use=lambda p: False).run_once(NOW)
    assert blocked.read_text() == "events"
    assert not other.exists() and (tmp_path / "2026-11-02.tms.jel.gz").is_file()
    assert not old_archive.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_long_expiry_may_not_be_shorter_than_the_short_one() -> None:
    with pytest.raises(ValueError, match="long expiry"):
        Expiries(jel_short=2 * DAY, jel_long=DAY)


async def test_the_file_manager_runs_a_pass_at_once_then_every_interval(tmp_path: Path) -> None:
    idle = aged(tmp_path / "2026-11-01.tms.jel", 0)
    two_days_ago = time.time() - 2 * DAY
    os.utime(idle, (two_days_ago, two_days_ago))
    runner = asyncio.create_task(FileManager(tmp_path, in_use=lambda p: False).run(3600))
    try:
        deadline = time.monotonic() + WAIT
        while await asyncio.to_thread(idle.exists):
            assert time.monotonic() < deadline, "the idle log was never gzipped"
            await asyncio.sleep(0.02)
        assert (tmp_path / "2026-11-01.tms.jel.gz").is_file()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_the_file_manager_asks_the_scheduler_which_logs_are_in_use(tmp_path: Path) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(submitted("123.0", "10:00:00"))
    old = NOW - 2 * DAY
    os.utime(jel, (old, old))
    s = HTCondorScheduler(tmp_path, FakeSchedd(), poll_interval=0.02)
    try:
        await s.adopt([cluster(123, jel, n_workers=1)])
        FileManager(tmp_path, in_use=s.job_event_log_in_use).run_once(NOW)
        assert jel.exists()  # cluster 123 has not left

        with jel.open("a") as f:
            f.write(aborted("123.0", "10:01:00"))
        events = await take(s, 3)
        assert isinstance(events[-1], ClusterLeft)
        os.utime(jel, (old, old))
        FileManager(tmp_path, in_use=s.job_event_log_in_use).run_once(NOW)
        assert not jel.exists()
    finally:
        await s.close()
