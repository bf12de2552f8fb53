"""The TMS client over a real WMS: the HTCondor backend through the schedd double (the one test
double of the suite) with real-format job event logs, the aggregation into snapshots, and a TMS
that dies between submitting and confirming."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.protobuf import timestamp_pb2

from ewms.v1 import task_manager_service_pb2 as tms_pb2
from ewms.v1 import taskforce_pb2, workflow_service_pb2, workflow_service_pb2_grpc
from services.auth import Role
from services.tms.chirps import Chirp
from services.tms.client import JobBook, TmsClient
from services.tms.htcondor import HTCondorScheduler
from services.tms.scheduler import (
    COMPLETED,
    IDLE,
    RUNNING,
    ClusterLeft,
    JobChange,
    JobExit,
    PilotChirp,
)
from services.wms import RunningWms
from tests.conftest import bearer
from tests.tms.test_htcondor import (
    FakeSchedd,
    aborted,
    cluster_removed,
    executing,
    generic,
    held,
)
from tests.wms.requests import minimal_task, workflow_request

Phase = taskforce_pb2.TaskforcePhase
T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    deadline = time.monotonic() + 30
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_the_job_book_sends_changes_then_everything_after_a_reconnect() -> None:
    book = JobBook()
    book.apply(JobChange("TF-a", 7, 0, RUNNING, 1.0))
    book.apply(JobChange("TF-a", 7, 1, RUNNING, 1.0))
    first = book.changes()
    assert first is not None
    assert [w.worker_id for w in first.taskforces[0].workers] == ["7.0", "7.1"]
    assert book.changes() is None
    book.apply(JobChange("TF-a", 7, 1, COMPLETED, 2.0))
    (only,) = book.changes().taskforces  # type: ignore[union-attr]
    assert [(w.worker_id, w.job_state) for w in only.workers] == [("7.1", COMPLETED)]
    assert not only.full
    book.apply(ClusterLeft("TF-a", 7, 3.0))
    full = book.full()
    assert full is not None and full.taskforces[0].full
    assert [(w.worker_id, w.job_state) for w in full.taskforces[0].workers] == [
        ("7.0", RUNNING),
        ("7.1", COMPLETED),
    ]
    assert book.left == {"TF-a": 3.0}


def test_the_job_book_sends_how_an_ended_job_exited_until_the_job_runs_again() -> None:
    book = JobBook()
    book.apply(JobChange("TF-a", 7, 0, COMPLETED, 1.0, job_exit=JobExit(signal=9)))
    (worker,) = book.changes().taskforces[0].workers  # type: ignore[union-attr]
    assert worker.job_exit == taskforce_pb2.JobExit(signal=9)
    # A later state without an exit clears it: the book never sends a stale one.
    book.apply(JobChange("TF-a", 7, 0, IDLE, 2.0))
    (worker,) = book.full().taskforces[0].workers  # type: ignore[union-attr]
    assert not worker.HasField("job_exit")


def test_the_job_book_sends_each_workers_chirps_with_its_job_state() -> None:
    book = JobBook()
    book.apply(JobChange("TF-a", 7, 0, RUNNING, 1.0))
    book.apply(PilotChirp("TF-a", 7, 0, Chirp("Status", "Tasking"), 2.0))
    book.apply(PilotChirp("TF-a", 7, 0, Chirp("TasksTotal", 4), 2.0))
    book.apply(PilotChirp("TF-a", 7, 0, Chirp("Error", "task failed: exit 3\nstderr: boom"), 2.0))
    book.apply(PilotChirp("TF-a", 7, 0, Chirp("LastUpdatedTimestamp", 1795860061), 2.0))
    (worker,) = book.changes().taskforces[0].workers  # type: ignore[union-attr]
    assert worker.job_state == RUNNING
    assert worker.chirps == tms_pb2.PilotChirps(
        phase=taskforce_pb2.PILOT_PHASE_TASKING,
        last_error="task failed: exit 3",  # the first line, as a pilot's own stream says it
        counters=taskforce_pb2.TaskCounters(events_received=4),
        last_updated=timestamp_pb2.Timestamp(seconds=1795860061),
    )
    # The same again changes nothing; nor does a status no pilot has.
    book.apply(PilotChirp("TF-a", 7, 0, Chirp("Status", "Tasking"), 3.0))
    book.apply(PilotChirp("TF-a", 7, 0, Chirp("Status", "Napping"), 3.0))
    book.apply(PilotChirp("TF-a", 7, 0, Chirp("ErrorTraceback", "Traceback …"), 3.0))
    assert book.changes() is None


def test_chirps_of_a_worker_with_no_job_state_yet_wait_for_it() -> None:
    book = JobBook()
    book.apply(PilotChirp("TF-a", 7, 0, Chirp("Status", "Started"), 1.0))
    assert book.changes() is None
    assert book.full() is None
    book.apply(JobChange("TF-a", 7, 0, RUNNING, 2.0))
    (worker,) = book.changes().taskforces[0].workers  # type: ignore[union-attr]
    assert (worker.job_state, worker.chirps.phase) == (RUNNING, taskforce_pb2.PILOT_PHASE_STARTED)


@pytest.fixture
async def stub(wms: RunningWms) -> AsyncIterator[workflow_service_pb2_grpc.WorkflowServiceStub]:
    async with grpc.aio.insecure_channel(wms.address) as channel:
        yield workflow_service_pb2_grpc.WorkflowServiceStub(channel)


class Tms:
    """A TMS for location osg over an HTCondorScheduler and a schedd double."""

    def __init__(self, wms: RunningWms, jel_dir: Path, schedd: FakeSchedd) -> None:
        self.scheduler = HTCondorScheduler(jel_dir, schedd, poll_interval=0.02)
        token = wms.authority.mint("tms-osg", Role.TMS, 3600, scope="osg")
        self.client = TmsClient(wms.address, token, "osg", self.scheduler)
        self.task = asyncio.create_task(self.client.run())

    async def crash(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.scheduler.close()

    async def stop(self) -> None:
        self.client.stop()
        await self.task
        await self.scheduler.close()


async def test_an_htcondor_taskforce_is_submitted_followed_and_removed(
    wms: RunningWms, stub: workflow_service_pb2_grpc.WorkflowServiceStub, tmp_path: Path
) -> None:
    admin = bearer(wms.authority.mint("root", Role.ADMIN, 3600))
    schedd = FakeSchedd()
    tms = Tms(wms, tmp_path / "jel", schedd)
    try:
        created = await stub.CreateWorkflow(
            workflow_request(minimal_task(cluster_locations=["osg"], n_workers=2)),
            metadata=admin,
        )
        uuid = created.taskforces[0].taskforce_uuid

        async def taskforce() -> taskforce_pb2.Taskforce:
            return await stub.GetTaskforce(
                workflow_service_pb2.GetTaskforceRequest(taskforce_uuid=uuid), metadata=admin
            )

        async def in_phase(phase: int) -> taskforce_pb2.Taskforce | None:
            tf = await taskforce()
            return tf if tf.phase == phase else None

        tf = await eventually(lambda: in_phase(Phase.TASKFORCE_PHASE_CONDOR_SUBMIT), "submit")
        (description, count), *more = schedd.submits
        assert not more and count == 2
        assert tf.cluster_id == 123
        assert tf.submit_dict["+EWMSTaskforceUUID"] == f'"{uuid}"'
        assert tf.submit_dict["container_image"].endswith(":latest")
        assert tf.job_event_log_fpath == description["log"]
        jel = Path(tf.job_event_log_fpath)
        with jel.open("a") as f:  # noqa: ASYNC230 (a test writing the schedd's log)
            f.write(executing("123.0", "10:00:01") + executing("123.1", "10:00:01"))
            f.write(
                held("123.1", "10:00:02", "Job has gone over memory limit of 512 megabytes.", 34)
            )

        async def compound() -> dict[tuple[int, str], int] | None:
            found = {
                (c.job_state, c.hold_reason): c.count for c in (await taskforce()).compound_statuses
            }
            return found if len(found) == 2 else None

        statuses = await eventually(compound, "running and held workers")
        assert statuses[(taskforce_pb2.JOB_STATE_RUNNING, "")] == 1
        ((_, reason),) = [k for k in statuses if k[0] == taskforce_pb2.JOB_STATE_HELD]
        assert reason.startswith("Memory usage exceeds a memory limit")
        await stub.AbortWorkflow(
            workflow_service_pb2.AbortWorkflowRequest(workflow_id=created.workflow.workflow_id),
            metadata=admin,
        )
        await eventually(lambda: in_phase(Phase.TASKFORCE_PHASE_CONDOR_RM), "removal")
        ((_, job_spec, _reason),) = schedd.acts
        assert job_spec == "ClusterId == 123"
        with jel.open("a") as f:  # noqa: ASYNC230 (a test writing the schedd's log)
            f.write(aborted("123.0", "10:00:03") + aborted("123.1", "10:00:03"))
            f.write(cluster_removed(123, "10:00:04"))
        done = await eventually(lambda: in_phase(Phase.TASKFORCE_PHASE_CONDOR_COMPLETE), "done")
        assert {c.job_state for c in done.compound_statuses} == {taskforce_pb2.JOB_STATE_REMOVED}
    finally:
        await tms.stop()


async def test_a_pilot_that_only_chirps_shows_its_phase_and_error(
    wms: RunningWms, stub: workflow_service_pb2_grpc.WorkflowServiceStub, tmp_path: Path
) -> None:
    # Its pilots cannot reach the WMS: all it knows of them is what they chirp into the JEL.
    admin = bearer(wms.authority.mint("root", Role.ADMIN, 3600))
    tms = Tms(wms, tmp_path / "jel", FakeSchedd())
    try:
        created = await stub.CreateWorkflow(
            workflow_request(minimal_task(cluster_locations=["osg"], n_workers=2)),
            metadata=admin,
        )
        uuid = created.taskforces[0].taskforce_uuid

        async def taskforce() -> taskforce_pb2.Taskforce:
            return await stub.GetTaskforce(
                workflow_service_pb2.GetTaskforceRequest(taskforce_uuid=uuid), metadata=admin
            )

        async def submitted() -> taskforce_pb2.Taskforce | None:
            tf = await taskforce()
            return tf if tf.phase == Phase.TASKFORCE_PHASE_CONDOR_SUBMIT else None

        tf = await eventually(submitted, "submit")
        with Path(tf.job_event_log_fpath).open("a") as f:  # noqa: ASYNC230 (the schedd's log)
            f.write(executing("123.0", "10:00:01") + executing("123.1", "10:00:01"))
            f.write(generic("123.0", "10:00:02", 'HTChirpEWMSPilotStatus: "Tasking"'))
            f.write(generic("123.0", "10:00:02", "HTChirpEWMSPilotTasksSuccess: 3"))
            f.write(generic("123.1", "10:00:03", 'HTChirpEWMSPilotStatus: "FatalError"'))
            f.write(generic("123.1", "10:00:03", 'HTChirpEWMSPilotError: "no space\\nleft"'))

        async def chirped() -> taskforce_pb2.Taskforce | None:
            tf = await taskforce()
            return tf if len(tf.compound_statuses) == 2 and tf.top_task_errors else None

        tf = await eventually(chirped, "the chirped phases")
        assert {(c.job_state, c.pilot_phase, c.count) for c in tf.compound_statuses} == {
            (taskforce_pb2.JOB_STATE_RUNNING, taskforce_pb2.PILOT_PHASE_TASKING, 1),
            (taskforce_pb2.JOB_STATE_RUNNING, taskforce_pb2.PILOT_PHASE_FATAL_ERROR, 1),
        }
        assert dict(tf.top_task_errors) == {"no space": 1}
        assert tf.counters.tasks_succeeded == 3
    finally:
        await tms.stop()


async def test_a_tms_that_dies_before_confirming_does_not_submit_again(
    wms: RunningWms, stub: workflow_service_pb2_grpc.WorkflowServiceStub, tmp_path: Path
) -> None:
    admin = bearer(wms.authority.mint("root", Role.ADMIN, 3600))
    # The schedd accepts the cluster, then takes long to answer: the TMS dies meanwhile.
    schedd = FakeSchedd(answer_delay=1.0)
    first = Tms(wms, tmp_path / "jel", schedd)
    created = await stub.CreateWorkflow(
        workflow_request(minimal_task(cluster_locations=["osg"], n_workers=3)), metadata=admin
    )
    uuid = created.taskforces[0].taskforce_uuid
    await eventually(lambda: asyncio.sleep(0, bool(schedd.submits)), "the first submit")
    await first.crash()
    schedd.answer_delay = 0.0
    second = Tms(wms, tmp_path / "jel", schedd)
    try:

        async def submitted() -> taskforce_pb2.Taskforce | None:
            tf = await stub.GetTaskforce(
                workflow_service_pb2.GetTaskforceRequest(taskforce_uuid=uuid), metadata=admin
            )
            return tf if tf.phase == Phase.TASKFORCE_PHASE_CONDOR_SUBMIT else None

        tf = await eventually(submitted, "the re-sent start to be confirmed")
        assert len(schedd.submits) == 1
        assert second.client.submits == 0
        assert tf.cluster_id == 123 and tf.n_workers == 3
        # The restarted TMS follows the cluster's log from the top: its jobs show up.
        statuses = await eventually(
            lambda: _compound(stub, uuid, admin), "the first TMS's cluster's job states"
        )
        assert statuses == {taskforce_pb2.JOB_STATE_IDLE: 3}
    finally:
        await second.stop()


async def _compound(
    stub: workflow_service_pb2_grpc.WorkflowServiceStub, uuid: str, admin: object
) -> dict[int, int] | None:
    tf = await stub.GetTaskforce(
        workflow_service_pb2.GetTaskforceRequest(taskforce_uuid=uuid),
        metadata=admin,  # type: ignore[arg-type]
    )
    found = {c.job_state: c.count for c in tf.compound_statuses}
    return found or None
