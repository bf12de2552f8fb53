"""TaskManagerService on a real WMS: a grpc.aio client plays the TMS (hello, confirmations,
job-state snapshots) and the WMS's dispatcher launches taskforces, sends start and stop commands,
advances phases on confirmations, retries failures, and joins job states with pilot phases."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from ewms.v1 import task_manager_service_pb2, taskforce_pb2, workflow_service_pb2
from services.auth import Principal, Role
from services.errors import field_violations
from services.wms.control import tms as tms_module
from services.wms.control.tms import failures
from tests.wms.helpers import (
    RETRIES,
    RETRY_DELAY,
    Env,
    StartEnv,
    TmsStream,
    compound,
    eventually,
    launched,
    snapshot,
    submitted_taskforce,
    task,
)
from tests.wms.requests import minimal_task

tms = task_manager_service_pb2
ws = workflow_service_pb2
Phase = taskforce_pb2.TaskforcePhase
Job = taskforce_pb2.JobState
Pilot = taskforce_pb2.PilotPhase


def ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def changes(tf: taskforce_pb2.Taskforce) -> list[tuple[int, bool, str]]:
    """The phase change log as (target phase, success, source)."""
    return [(c.target_phase, c.was_successful, c.source_entity) for c in tf.phase_change_log]


# --- Hello ----------------------------------------------------------------------------------------


async def test_hello_is_answered_with_a_welcome(env: Env) -> None:
    welcome = await env.tms().hello("local")

    assert welcome == tms.TmsWelcome(cluster_location="local")


async def test_hello_naming_an_alias_is_welcomed_with_the_canonical_name(env: Env) -> None:
    welcome = await env.tms("osg").hello("sub-2", scheduler="htcondor")

    assert welcome.cluster_location == "osg"


async def test_token_scoped_to_an_alias_may_connect_for_its_location(env: Env) -> None:
    welcome = await env.tms("sub-2").hello("osg", scheduler="htcondor")

    assert welcome.cluster_location == "osg"


async def test_first_message_other_than_hello_is_invalid_argument(env: Env) -> None:
    stream = env.tms()

    await stream.send(removed=tms.TaskforceRemoved(taskforce_uuid="TF-0-0-0-0"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err)] == ["hello"]


async def test_hello_at_an_unknown_location_is_invalid_argument(env: Env) -> None:
    stream = env.tms(token=env.wms.authority.mint("tms", Role.TMS, 3600, scope="mars"))

    await stream.send(hello=tms.TmsHello(cluster_location="mars", scheduler="local"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = field_violations(err)
    assert field == "hello.cluster_location"
    assert "'mars'" in description
    assert "local" in description


async def test_hello_without_a_location_is_invalid_argument(env: Env) -> None:
    stream = env.tms()

    await stream.send(hello=tms.TmsHello(scheduler="local"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err) == [("hello.cluster_location", "required")]


@pytest.mark.parametrize("scheduler", ["", "slurm", "HTCondor"])
async def test_hello_with_an_unknown_scheduler_is_invalid_argument(
    env: Env, scheduler: str
) -> None:
    stream = env.tms()

    await stream.send(hello=tms.TmsHello(cluster_location="local", scheduler=scheduler))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = field_violations(err)
    assert field == "hello.scheduler"
    assert "htcondor" in description


async def test_second_hello_is_invalid_argument(env: Env) -> None:
    stream = env.tms()
    await stream.hello()

    await stream.send(hello=tms.TmsHello(cluster_location="local", scheduler="local"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err)] == ["hello"]


async def test_tms_token_of_another_location_is_permission_denied(env: Env) -> None:
    stream = env.tms("osg")

    await stream.send(hello=tms.TmsHello(cluster_location="local", scheduler="local"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'osg'" in (err.details() or "")


@pytest.mark.parametrize("role", [Role.USER, Role.PILOT])
async def test_other_roles_may_not_connect_as_a_tms(env: Env, role: Role) -> None:
    # Refused as the stream opens, before any message is read (a write could fail).
    stream = env.tms(token=env.wms.authority.mint("someone", role, 3600, scope="local"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_second_tms_for_a_location_replaces_the_first(env: Env) -> None:
    first = env.tms()
    await first.hello(tms_id="first")

    await env.tms().hello(tms_id="second")

    err = await first.failure()
    assert err.code() == grpc.StatusCode.ABORTED


async def test_wms_shutdown_ends_tms_streams_as_unavailable(env: Env) -> None:
    stream = env.tms()
    await stream.hello()

    await env.stop_wms()

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.UNAVAILABLE


# --- Launch control and start commands ------------------------------------------------------------


async def test_new_taskforces_are_activated_then_released_by_launch_control(env: Env) -> None:
    [tf] = await env.created_and_launched()

    assert changes(tf) == [
        (Phase.TASKFORCE_PHASE_PRE_MQ_ACTIVATION, True, "User"),
        (Phase.TASKFORCE_PHASE_PRE_LAUNCH, True, "Workflow MQ Activator"),
        (Phase.TASKFORCE_PHASE_PENDING_STARTER, True, "Launch Control"),
    ]


async def test_welcome_is_followed_by_the_locations_starts_in_priority_order(env: Env) -> None:
    [low] = await env.created_and_launched(task(), priority=10)
    [high] = await env.created_and_launched(task(), priority=90)
    [elsewhere] = await env.created_and_launched(task("osg"), priority=100)
    [mid] = await env.created_and_launched(task(), priority=50)
    stream = env.tms()

    welcome = await stream.hello()
    starts = [await stream.start() for _ in range(3)]
    # Whatever is due later comes after: the osg taskforce was never among the local starts.
    [later] = await env.created_and_launched(task(), priority=0)
    next_start = await stream.start()

    assert list(welcome.clusters) == []
    assert [s.taskforce.taskforce_uuid for s in starts] == [
        high.taskforce_uuid,
        mid.taskforce_uuid,
        low.taskforce_uuid,
    ]
    assert next_start.taskforce.taskforce_uuid == later.taskforce_uuid
    assert elsewhere.taskforce_uuid not in {s.taskforce.taskforce_uuid for s in starts}


async def test_a_taskforce_released_while_its_tms_is_connected_is_started_at_once(
    env: Env,
) -> None:
    stream = env.tms("osg")
    await stream.hello("osg", scheduler="htcondor")

    resp = await env.create(task("osg"))

    start = await stream.start()
    assert start.taskforce.taskforce_uuid == resp.taskforces[0].taskforce_uuid


async def test_start_carries_the_taskforce_its_task_queues_pilot_token_and_wms_address(
    env: Env,
) -> None:
    resp = await env.create(
        minimal_task(cluster_locations=["local"], output_queue_aliases=["mid"]),
        minimal_task(cluster_locations=["osg"], input_queue_aliases=["mid"]),
    )
    [first, _] = await launched(env.workflows, env.alice, resp.workflow.workflow_id)
    stream = env.tms()
    await stream.hello()

    start = await stream.start()

    uuid = first.taskforce_uuid
    assert start.taskforce == first
    assert start.task_directive == resp.task_directives[0]
    listed = await env.workflows.ListQueues(
        ws.ListQueuesRequest(workflow_id=resp.workflow.workflow_id), metadata=env.alice
    )
    by_alias = {q.alias: q for q in listed.queues}
    assert list(start.queues) == [by_alias["in"], by_alias["mid"]]
    assert env.wms.authority.verify(start.pilot_token) == Principal(
        subject=f"pilot-{uuid}", role=Role.PILOT, scope=uuid
    )
    assert start.wms_address == env.wms.address
    # The pilots of the taskforce get in with it.
    answer = await env.pilot(start.pilot_token).hello(uuid, worker_id="1.0")
    assert answer.welcome.taskforce_uuid == uuid


# --- Confirmations --------------------------------------------------------------------------------


async def test_submitted_moves_the_taskforce_to_condor_submit_and_records_the_cluster(
    env: Env,
) -> None:
    [tf] = await env.created_and_launched(task(n_workers=3))
    stream = env.tms()
    await stream.hello()
    start = await stream.start()

    await stream.submitted(
        start,
        41,
        n_workers=2,
        submit_dict={"executable": "/bin/pilot", "request_cpus": "1"},
        job_event_log_fpath="/scratch/tf.log",
    )

    got = await env.phase(tf.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)
    assert got.cluster_id == 41
    assert got.n_workers == 2
    assert dict(got.submit_dict) == {"executable": "/bin/pilot", "request_cpus": "1"}
    assert got.job_event_log_fpath == "/scratch/tf.log"
    assert changes(got)[:-1] == changes(tf)
    last = got.phase_change_log[-1]
    assert (last.target_phase, last.was_successful, last.source_entity) == (
        Phase.TASKFORCE_PHASE_CONDOR_SUBMIT,
        True,
        "TMS",
    )
    assert "cluster 41" in last.context


async def test_a_duplicate_submitted_changes_nothing(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    tf, start = await submitted_taskforce(env, stream, 41)
    [other] = await env.created_and_launched(task())
    other_start = await stream.start()

    await stream.submitted(start, 41)
    # The stream's messages are applied in order: once this one is, so was the duplicate.
    await stream.submitted(other_start, 42)
    await env.phase(other.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)

    assert await env.taskforce(tf.taskforce_uuid) == tf


async def test_a_failure_reported_after_the_submit_was_confirmed_does_not_count(
    env: Env,
) -> None:
    stream = env.tms()
    await stream.hello()
    tf, _ = await submitted_taskforce(env, stream, 41)
    [other] = await env.created_and_launched(task())
    other_start = await stream.start()

    await stream.send(
        submit_failed=tms.TaskforceCommandFailed(
            taskforce_uuid=tf.taskforce_uuid, error="a stale answer"
        )
    )
    await stream.submitted(other_start, 42)
    await env.phase(other.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)

    after = await env.taskforce(tf.taskforce_uuid)
    assert after.phase == Phase.TASKFORCE_PHASE_CONDOR_SUBMIT
    last = after.phase_change_log[-1]
    assert not last.was_successful
    assert last.context == "ignored: a stale answer (while TASKFORCE_PHASE_CONDOR_SUBMIT)"
    assert failures(after, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT) == 0


async def test_invalid_submitted_is_invalid_argument(env: Env) -> None:
    stream = env.tms()
    await stream.hello()

    await stream.send(submitted=tms.TaskforceSubmitted(taskforce_uuid="TF-x", cluster_id=0))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err)] == ["submitted.cluster_id"]


async def test_submit_failure_is_logged_and_retried_after_the_delay_until_given_up(
    env: Env,
) -> None:
    [tf] = await env.created_and_launched(task(), priority=100)
    uuid = tf.taskforce_uuid
    stream = env.tms()
    await stream.hello()
    assert (await stream.start()).taskforce.taskforce_uuid == uuid

    for attempt in range(1, RETRIES + 2):
        await stream.send(
            submit_failed=tms.TaskforceCommandFailed(taskforce_uuid=uuid, error=f"boom {attempt}")
        )

        async def logged(n: int = attempt) -> bool:
            got = await env.taskforce(uuid)
            return sum(not c.was_successful for c in got.phase_change_log) == n

        await eventually(logged, f"failure {attempt} logged")
        got = await env.taskforce(uuid)
        failed = got.phase_change_log[-1]
        assert got.phase == Phase.TASKFORCE_PHASE_PENDING_STARTER
        assert (failed.target_phase, failed.was_successful, failed.source_entity) == (
            Phase.TASKFORCE_PHASE_CONDOR_SUBMIT,
            False,
            "TMS",
        )
        assert failed.context.startswith(f"ERROR: boom {attempt}")
        if attempt <= RETRIES:
            assert "giving up" not in failed.context
            resent = await stream.start()
            assert resent.taskforce.taskforce_uuid == uuid
            assert time.time() >= failed.timestamp.ToNanoseconds() / 1e9 + RETRY_DELAY
    assert "giving up" in failed.context

    # Once another retry would be due, something else becomes due: its start is the next message
    # (a re-send of the given-up taskforce, of higher priority, would come before it).
    due = failed.timestamp.ToNanoseconds() / 1e9 + RETRY_DELAY
    await asyncio.sleep(max(0.0, due - time.time()))
    [later] = await env.created_and_launched(task(), priority=0)
    next_start = await stream.start()
    assert next_start.taskforce.taskforce_uuid == later.taskforce_uuid


async def test_a_pending_retry_does_not_hold_back_other_commands(start_env: StartEnv) -> None:
    env = await start_env(tms_retry_delay=3600)
    [failing] = await env.created_and_launched(task())
    stream = env.tms()
    await stream.hello()
    await stream.start()
    await stream.send(
        submit_failed=tms.TaskforceCommandFailed(taskforce_uuid=failing.taskforce_uuid, error="x")
    )

    async def logged() -> bool:
        got = await env.taskforce(failing.taskforce_uuid)
        return not got.phase_change_log[-1].was_successful

    await eventually(logged, "the failure logged")
    [other] = await env.created_and_launched(task())

    start = await stream.start()
    assert start.taskforce.taskforce_uuid == other.taskforce_uuid


async def test_confirmed_starts_are_never_sent_again_on_the_same_stream(env: Env) -> None:
    n = 20
    resp = await env.create(*[task() for _ in range(n)])
    await launched(env.workflows, env.alice, resp.workflow.workflow_id)
    stream = env.tms()
    await stream.hello()
    starts = [await stream.start() for _ in range(n)]

    # Confirmed back to back, while the passes their confirmations trigger run.
    for i, start in enumerate(starts):
        await stream.submitted(start, 100 + i)
    for start in starts:
        await env.phase(start.taskforce.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)
    [later] = await env.created_and_launched(task())

    next_start = await stream.start()
    assert next_start.taskforce.taskforce_uuid == later.taskforce_uuid
    assert len({s.taskforce.taskforce_uuid for s in starts}) == n


async def test_an_unconfirmed_start_is_sent_again_on_the_next_stream(env: Env) -> None:
    [confirmed] = await env.created_and_launched(task())
    [unconfirmed] = await env.created_and_launched(task())
    first = env.tms()
    await first.hello()
    confirmed_start = await first.start()
    assert (await first.start()).taskforce.taskforce_uuid == unconfirmed.taskforce_uuid
    await first.submitted(confirmed_start, 7, job_event_log_fpath="/scratch/7.log")
    await env.phase(confirmed.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)

    await first.call.done_writing()
    assert await first.call.read() is grpc.aio.EOF
    assert await first.call.code() == grpc.StatusCode.OK
    second = env.tms()
    welcome = await second.hello()
    again = await second.start()
    [later] = await env.created_and_launched(task())
    next_start = await second.start()

    assert list(welcome.clusters) == [
        tms.TaskforceCluster(
            taskforce_uuid=confirmed.taskforce_uuid,
            cluster_id=7,
            n_workers=1,
            job_event_log_fpath="/scratch/7.log",
        )
    ]
    assert again.taskforce.taskforce_uuid == unconfirmed.taskforce_uuid
    # The confirmed taskforce was not started again.
    assert next_start.taskforce.taskforce_uuid == later.taskforce_uuid


async def test_welcome_after_a_wms_restart_lists_the_locations_submitted_clusters(
    start_env: StartEnv, tmp_path: Path
) -> None:
    env = await start_env(tmp_path / "kept")
    local = env.tms()
    await local.hello()
    osg = env.tms("osg")
    await osg.hello("osg", scheduler="htcondor")
    mine, _ = await submitted_taskforce(env, local, 5)
    await submitted_taskforce(env, osg, 6, location="osg")
    await env.close()

    env = await start_env(tmp_path / "kept")
    welcome = await env.tms().hello()

    assert [(c.taskforce_uuid, c.cluster_id) for c in welcome.clusters] == [
        (mine.taskforce_uuid, 5)
    ]


# --- Stop commands --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "reason"), [("abort", "workflow ABORTED"), ("finish", "workflow FINISHED")]
)
async def test_deactivated_submitted_taskforce_is_stopped_removed_and_completed(
    env: Env, action: str, reason: str
) -> None:
    stream = env.tms()
    await stream.hello()
    tf, _ = await submitted_taskforce(env, stream, 12)

    await env.deactivate(action, tf.workflow_id)
    stop = await stream.stop()
    await stream.send(removed=tms.TaskforceRemoved(taskforce_uuid=tf.taskforce_uuid))
    removed = await env.phase(tf.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_RM)
    await stream.send(
        completed=tms.TaskforceCompleted(taskforce_uuid=tf.taskforce_uuid, complete_ts=ts(1000))
    )
    done = await env.phase(tf.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_COMPLETE)

    assert stop == tms.StopTaskforce(taskforce_uuid=tf.taskforce_uuid, cluster_id=12, reason=reason)
    assert changes(removed)[-2:] == [
        (Phase.TASKFORCE_PHASE_PENDING_STOPPER, True, "User"),
        (Phase.TASKFORCE_PHASE_CONDOR_RM, True, "TMS"),
    ]
    assert changes(done)[-1] == (Phase.TASKFORCE_PHASE_CONDOR_COMPLETE, True, "TMS")
    assert done.phase_change_log[-1].source_event_time == ts(1000)


async def test_a_cluster_leaving_the_queue_by_itself_completes_the_taskforce(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    tf, _ = await submitted_taskforce(env, stream, 12)

    await stream.send(completed=tms.TaskforceCompleted(taskforce_uuid=tf.taskforce_uuid))

    done = await env.phase(tf.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_COMPLETE)
    assert changes(done)[-2:] == [
        (Phase.TASKFORCE_PHASE_CONDOR_SUBMIT, True, "TMS"),
        (Phase.TASKFORCE_PHASE_CONDOR_COMPLETE, True, "TMS"),
    ]


def about(kind: str, uuid: str) -> dict[str, object]:
    """A TMS message of ``kind`` about taskforce ``uuid`` (a snapshot: of its worker 8.0)."""
    if kind == "snapshot":
        return {kind: snapshot(uuid, ("8.0", Job.JOB_STATE_COMPLETED, ""), full=True)}
    if kind == "submitted":
        return {kind: tms.TaskforceSubmitted(taskforce_uuid=uuid, cluster_id=8, n_workers=1)}
    return {kind: {"taskforce_uuid": uuid}}


TASKFORCE_FIELDS = {
    "submitted": "submitted.taskforce_uuid",
    "submit_failed": "submit_failed.taskforce_uuid",
    "removed": "removed.taskforce_uuid",
    "remove_failed": "remove_failed.taskforce_uuid",
    "completed": "completed.taskforce_uuid",
    "snapshot": "snapshot.taskforces[0].taskforce_uuid",
}


@pytest.mark.parametrize("kind", TASKFORCE_FIELDS)
async def test_a_message_about_another_locations_taskforce_is_invalid_argument(
    env: Env, kind: str
) -> None:
    # A TMS only ever hears of its own location's taskforces: one that names another is broken
    # (or talks to the wrong WMS) and is told so, not ignored.
    local = env.tms()
    await local.hello()
    osg = env.tms("osg")
    await osg.hello("osg", scheduler="htcondor")
    theirs, _ = await submitted_taskforce(env, osg, 8, location="osg")
    await env.deactivate("abort", theirs.workflow_id)
    theirs = await env.taskforce(theirs.taskforce_uuid)
    assert theirs.phase == Phase.TASKFORCE_PHASE_PENDING_STOPPER

    await local.send(**about(kind, theirs.taskforce_uuid))

    err = await local.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = field_violations(err)
    assert field == TASKFORCE_FIELDS[kind]
    assert description == "a taskforce of 'osg', not of this TMS's 'local'"
    assert await env.taskforce(theirs.taskforce_uuid) == theirs
    # Its own TMS's stream goes on.
    assert (await osg.stop()).taskforce_uuid == theirs.taskforce_uuid
    await osg.send(removed=tms.TaskforceRemoved(taskforce_uuid=theirs.taskforce_uuid))
    await env.phase(theirs.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_RM)


@pytest.mark.parametrize("kind", TASKFORCE_FIELDS)
async def test_a_message_about_an_unknown_taskforce_is_invalid_argument(
    env: Env, kind: str
) -> None:
    stream = env.tms()
    await stream.hello()

    await stream.send(**about(kind, "TF-0-0-0-0"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err) == [(TASKFORCE_FIELDS[kind], "no taskforce 'TF-0-0-0-0'")]


async def test_remove_failure_is_logged_and_the_stop_sent_again_after_the_delay(
    env: Env,
) -> None:
    stream = env.tms()
    await stream.hello()
    tf, _ = await submitted_taskforce(env, stream, 12)
    await env.deactivate("abort", tf.workflow_id)
    await stream.stop()

    await stream.send(
        remove_failed=tms.TaskforceCommandFailed(taskforce_uuid=tf.taskforce_uuid, error="nope")
    )
    again = await stream.stop()

    got = await env.taskforce(tf.taskforce_uuid)
    assert got.phase == Phase.TASKFORCE_PHASE_PENDING_STOPPER
    failed = got.phase_change_log[-1]
    assert (failed.target_phase, failed.was_successful, failed.source_entity) == (
        Phase.TASKFORCE_PHASE_CONDOR_RM,
        False,
        "TMS",
    )
    assert failed.context == "ERROR: nope"
    assert again.cluster_id == 12
    assert time.time() >= failed.timestamp.ToNanoseconds() / 1e9 + RETRY_DELAY


async def test_taskforce_cancelled_before_its_start_was_confirmed_is_stopped(env: Env) -> None:
    [tf] = await env.created_and_launched(task())
    stream = env.tms()
    await stream.hello()
    start = await stream.start()
    await env.deactivate("abort", tf.workflow_id)
    await env.phase(tf.taskforce_uuid, Phase.TASKFORCE_PHASE_CANCELLED)

    await stream.submitted(start, 33)
    stop = await stream.stop()

    got = await env.phase(tf.taskforce_uuid, Phase.TASKFORCE_PHASE_PENDING_STOPPER)
    assert got.cluster_id == 33
    assert changes(got)[-3:] == [
        (Phase.TASKFORCE_PHASE_CANCELLED, True, "User"),
        (Phase.TASKFORCE_PHASE_CONDOR_SUBMIT, False, "TMS"),
        (Phase.TASKFORCE_PHASE_PENDING_STOPPER, True, "TMS"),
    ]
    assert (stop.taskforce_uuid, stop.cluster_id) == (tf.taskforce_uuid, 33)
    await stream.send(removed=tms.TaskforceRemoved(taskforce_uuid=tf.taskforce_uuid))
    await env.phase(tf.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_RM)


# --- Capacity -------------------------------------------------------------------------------------


async def pre_launch(env: Env, resp: ws.CreateWorkflowResponse) -> taskforce_pb2.Taskforce:
    """The workflow's only taskforce once activated; launch control decided on it in the same
    pass, so if it is still in pre-launch it was held back."""
    return await env.phase(resp.taskforces[0].taskforce_uuid, Phase.TASKFORCE_PHASE_PRE_LAUNCH)


async def test_taskforces_beyond_a_locations_capacity_wait_until_workers_complete(
    start_env: StartEnv,
) -> None:
    env = await start_env(location_max_workers={"local": 2})
    [a] = await env.created_and_launched(task(n_workers=1), priority=50)
    [b] = await env.created_and_launched(task(n_workers=1), priority=10)
    low = await pre_launch(env, await env.create(task(n_workers=1), priority=10))
    high = await pre_launch(env, await env.create(task(n_workers=1), priority=90))
    [elsewhere] = await env.created_and_launched(task("osg", n_workers=5))
    stream = env.tms()
    await stream.hello()
    start_a, start_b = await stream.start(), await stream.start()
    assert {start_a.taskforce.taskforce_uuid, start_b.taskforce.taskforce_uuid} == {
        a.taskforce_uuid,
        b.taskforce_uuid,
    }
    await stream.submitted(start_a, 1)
    await stream.submitted(start_b, 2)
    await env.phase(b.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)
    assert (await env.taskforce(high.taskforce_uuid)).phase == Phase.TASKFORCE_PHASE_PRE_LAUNCH

    await stream.send(completed=tms.TaskforceCompleted(taskforce_uuid=a.taskforce_uuid))
    freed = await stream.start()

    assert freed.taskforce.taskforce_uuid == high.taskforce_uuid  # priority first
    released = await env.taskforce(high.taskforce_uuid)
    last = released.phase_change_log[-1]
    assert (last.target_phase, last.source_entity) == (
        Phase.TASKFORCE_PHASE_PENDING_STARTER,
        "Launch Control",
    )
    assert "2 of 2 workers at local" in last.context
    assert (await env.taskforce(low.taskforce_uuid)).phase == Phase.TASKFORCE_PHASE_PRE_LAUNCH
    assert elsewhere.phase == Phase.TASKFORCE_PHASE_PENDING_STARTER  # another location's capacity


async def test_a_smaller_lower_priority_taskforce_does_not_overtake_a_waiting_one(
    start_env: StartEnv,
) -> None:
    env = await start_env(location_max_workers={"local": 2})
    [a] = await env.created_and_launched(task(n_workers=1))
    big = await pre_launch(env, await env.create(task(n_workers=2), priority=90))
    # It would fit (1 + 1 of 2 workers), but the bigger, higher-priority taskforce goes first.
    small = await pre_launch(env, await env.create(task(n_workers=1), priority=10))
    stream = env.tms()
    await stream.hello()
    await stream.submitted(await stream.start(), 1)

    await stream.send(completed=tms.TaskforceCompleted(taskforce_uuid=a.taskforce_uuid))

    assert (await stream.start()).taskforce.taskforce_uuid == big.taskforce_uuid
    assert (await env.taskforce(small.taskforce_uuid)).phase == Phase.TASKFORCE_PHASE_PRE_LAUNCH


async def test_a_taskforce_given_up_on_frees_its_locations_capacity(start_env: StartEnv) -> None:
    env = await start_env(location_max_workers={"local": 1})
    [a] = await env.created_and_launched(task())
    waiting = await pre_launch(env, await env.create(task()))
    stream = env.tms()
    await stream.hello()

    for _ in range(RETRIES + 1):
        # While a is retried, the waiting taskforce is not released (its start would come first).
        start = await stream.start()
        assert start.taskforce.taskforce_uuid == a.taskforce_uuid
        await stream.send(
            submit_failed=tms.TaskforceCommandFailed(taskforce_uuid=a.taskforce_uuid, error="no")
        )

    start = await stream.start()
    assert start.taskforce.taskforce_uuid == waiting.taskforce_uuid


# --- Job-state snapshots and compound statuses ----------------------------------------------------


async def compound_statuses_become(
    env: Env, uuid: str, expected: list[taskforce_pb2.CompoundStatus]
) -> None:
    async def stored() -> bool:
        return list((await env.taskforce(uuid)).compound_statuses) == expected

    await eventually(stored, f"compound statuses of {uuid}: {expected}")


async def test_job_states_are_joined_with_pilot_phases_into_compound_statuses(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    tf, start = await submitted_taskforce(env, stream, 7, n_workers=3)
    pilot = env.pilot(start.pilot_token)
    await pilot.hello(tf.taskforce_uuid, worker_id="7.0")

    await stream.send(
        snapshot=snapshot(
            tf.taskforce_uuid,
            ("7.0", Job.JOB_STATE_RUNNING, ""),
            ("7.1", Job.JOB_STATE_HELD, "Memory usage exceeds a memory limit"),
            ("7.2", Job.JOB_STATE_IDLE, ""),
            full=True,
        )
    )
    await pilot.status(Pilot.PILOT_PHASE_TASKING, tasks_succeeded=1)

    await compound_statuses_become(
        env,
        tf.taskforce_uuid,
        compound(
            (Job.JOB_STATE_IDLE, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1),
            (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_TASKING, 1),
            (
                Job.JOB_STATE_HELD,
                "Memory usage exceeds a memory limit",
                Pilot.PILOT_PHASE_UNSPECIFIED,
                1,
            ),
        ),
    )


async def test_a_pilot_whose_job_state_is_unknown_is_counted_as_unspecified(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    tf, start = await submitted_taskforce(env, stream, 7, n_workers=2)
    await stream.send(snapshot=snapshot(tf.taskforce_uuid, ("7.0", Job.JOB_STATE_RUNNING, "")))
    pilot = env.pilot(start.pilot_token)
    await pilot.hello(tf.taskforce_uuid, worker_id="7.1")

    await pilot.status(Pilot.PILOT_PHASE_AWAITING_FIRST_EVENT)

    await compound_statuses_become(
        env,
        tf.taskforce_uuid,
        compound(
            (Job.JOB_STATE_UNSPECIFIED, "", Pilot.PILOT_PHASE_AWAITING_FIRST_EVENT, 1),
            (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1),
        ),
    )


def chirping(
    uuid: str,
    *workers: tuple[str, int, tms.PilotChirps | None],
    full: bool = False,
) -> tms.JobStatusSnapshot:
    """A snapshot of one taskforce's workers, each (worker id, job state, what its pilot
    chirped)."""
    return tms.JobStatusSnapshot(
        taskforces=[
            tms.TaskforceJobStatus(
                taskforce_uuid=uuid,
                full=full,
                workers=[
                    tms.WorkerJobState(worker_id=w, job_state=s, chirps=c)  # type: ignore[arg-type]
                    for w, s, c in workers
                ],
            )
        ]
    )


async def test_a_worker_whose_pilot_has_no_stream_shows_what_its_pilot_chirped(
    env: Env,
) -> None:
    stream = env.tms("osg")
    await stream.hello("osg", scheduler="htcondor")
    tf, _ = await submitted_taskforce(env, stream, 7, n_workers=3, location="osg")
    uuid = tf.taskforce_uuid

    await stream.send(
        snapshot=chirping(
            uuid,
            (
                "7.0",
                Job.JOB_STATE_RUNNING,
                tms.PilotChirps(
                    phase=Pilot.PILOT_PHASE_TASKING,
                    counters=taskforce_pb2.TaskCounters(events_received=5, tasks_succeeded=4),
                ),
            ),
            (
                "7.1",
                Job.JOB_STATE_RUNNING,
                tms.PilotChirps(phase=Pilot.PILOT_PHASE_FATAL_ERROR, last_error="disk full"),
            ),
            ("7.2", Job.JOB_STATE_IDLE, None),
            full=True,
        )
    )

    await compound_statuses_become(
        env,
        uuid,
        compound(
            (Job.JOB_STATE_IDLE, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1),
            (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_TASKING, 1),
            (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_FATAL_ERROR, 1),
        ),
    )
    got = await env.taskforce(uuid)
    assert dict(got.top_task_errors) == {"disk full": 1}
    assert got.counters == taskforce_pb2.TaskCounters(events_received=5, tasks_succeeded=4)

    # A later partial snapshot replaces what a worker chirped.
    await stream.send(
        snapshot=chirping(
            uuid,
            ("7.1", Job.JOB_STATE_COMPLETED, tms.PilotChirps(phase=Pilot.PILOT_PHASE_DONE)),
        )
    )
    await compound_statuses_become(
        env,
        uuid,
        compound(
            (Job.JOB_STATE_IDLE, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1),
            (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_TASKING, 1),
            (Job.JOB_STATE_COMPLETED, "", Pilot.PILOT_PHASE_DONE, 1),
        ),
    )
    assert not (await env.taskforce(uuid)).top_task_errors


async def test_a_pilots_own_stream_wins_over_its_chirps_even_after_it_ended(env: Env) -> None:
    stream = env.tms("osg")
    await stream.hello("osg", scheduler="htcondor")
    tf, start = await submitted_taskforce(env, stream, 7, n_workers=2, location="osg")
    uuid = tf.taskforce_uuid
    pilot = env.pilot(start.pilot_token)
    await pilot.hello(uuid, worker_id="7.0")
    await pilot.status(Pilot.PILOT_PHASE_DRAINING, tasks_succeeded=9)

    tasking = tms.PilotChirps(
        phase=Pilot.PILOT_PHASE_TASKING,
        last_error="stale chirp",
        counters=taskforce_pb2.TaskCounters(tasks_succeeded=1),
    )
    await stream.send(
        snapshot=chirping(
            uuid,
            ("7.0", Job.JOB_STATE_RUNNING, tasking),
            ("7.1", Job.JOB_STATE_RUNNING, tasking),
            full=True,
        )
    )

    both = compound(
        (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_TASKING, 1),
        (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_DRAINING, 1),
    )
    await compound_statuses_become(env, uuid, both)
    got = await env.taskforce(uuid)
    assert dict(got.top_task_errors) == {"stale chirp": 1}  # 7.1's only
    assert got.counters.tasks_succeeded == 9 + 1

    # The pilot's stream ends; what it last said still wins over a newer chirp.
    pilot.call.cancel()
    await stream.send(
        snapshot=chirping(
            uuid,
            ("7.0", Job.JOB_STATE_RUNNING, tms.PilotChirps(phase=Pilot.PILOT_PHASE_DONE)),
        )
    )
    await stream.send(snapshot=snapshot(uuid, ("7.1", Job.JOB_STATE_RUNNING, "")))
    await compound_statuses_become(
        env,
        uuid,
        compound(
            (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1),
            (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_DRAINING, 1),
        ),
    )


async def test_partial_snapshots_update_and_a_full_snapshot_replaces_worker_states(
    env: Env,
) -> None:
    stream = env.tms()
    await stream.hello()
    tf, _ = await submitted_taskforce(env, stream, 7, n_workers=3)
    uuid = tf.taskforce_uuid
    unknown = Pilot.PILOT_PHASE_UNSPECIFIED
    await stream.send(
        snapshot=snapshot(
            uuid,
            ("7.0", Job.JOB_STATE_IDLE, ""),
            ("7.1", Job.JOB_STATE_IDLE, ""),
            ("7.2", Job.JOB_STATE_IDLE, ""),
            full=True,
        )
    )
    await compound_statuses_become(env, uuid, compound((Job.JOB_STATE_IDLE, "", unknown, 3)))

    await stream.send(snapshot=snapshot(uuid, ("7.1", Job.JOB_STATE_RUNNING, "")))
    await compound_statuses_become(
        env,
        uuid,
        compound((Job.JOB_STATE_IDLE, "", unknown, 2), (Job.JOB_STATE_RUNNING, "", unknown, 1)),
    )

    await stream.send(snapshot=snapshot(uuid, ("7.2", Job.JOB_STATE_RUNNING, ""), full=True))
    await compound_statuses_become(env, uuid, compound((Job.JOB_STATE_RUNNING, "", unknown, 1)))


async def test_taskforce_whose_jobs_all_left_the_queue_is_complete(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    tf, _ = await submitted_taskforce(env, stream, 7, n_workers=2)
    await stream.send(
        snapshot=snapshot(
            tf.taskforce_uuid,
            ("7.0", Job.JOB_STATE_COMPLETED, ""),
            ("7.1", Job.JOB_STATE_RUNNING, ""),
            full=True,
        )
    )
    await compound_statuses_become(
        env,
        tf.taskforce_uuid,
        compound(
            (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1),
            (Job.JOB_STATE_COMPLETED, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1),
        ),
    )
    assert (await env.taskforce(tf.taskforce_uuid)).phase == Phase.TASKFORCE_PHASE_CONDOR_SUBMIT

    await stream.send(snapshot=snapshot(tf.taskforce_uuid, ("7.1", Job.JOB_STATE_REMOVED, "")))

    done = await env.phase(tf.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_COMPLETE)
    assert changes(done)[-1] == (Phase.TASKFORCE_PHASE_CONDOR_COMPLETE, True, "TMS")
    assert list(done.compound_statuses) == compound(
        (Job.JOB_STATE_COMPLETED, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1),
        (Job.JOB_STATE_REMOVED, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1),
    )


async def test_a_complete_taskforces_job_states_leave_memory_and_late_ones_are_ignored(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tms_module, "FORGET_AFTER", 0.0)
    stream = env.tms()
    await stream.hello()
    tf, _ = await submitted_taskforce(env, stream, 7, n_workers=1)
    await stream.send(
        snapshot=snapshot(tf.taskforce_uuid, ("7.0", Job.JOB_STATE_COMPLETED, ""), full=True)
    )
    done = await env.phase(tf.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_COMPLETE)
    dispatcher = env.wms.dispatcher

    async def forgotten() -> bool:
        return tf.taskforce_uuid not in dispatcher._job_states

    await eventually(forgotten, "the job states to be dropped")
    # A late snapshot (e.g. after a TMS restart) changes nothing any more.
    await stream.send(
        snapshot=snapshot(tf.taskforce_uuid, ("7.0", Job.JOB_STATE_HELD, "late"), full=True)
    )
    other, _ = await submitted_taskforce(env, stream, 8)
    await stream.send(
        snapshot=snapshot(other.taskforce_uuid, ("8.0", Job.JOB_STATE_RUNNING, ""), full=True)
    )
    await compound_statuses_become(
        env,
        other.taskforce_uuid,
        compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1)),
    )
    assert tf.taskforce_uuid not in dispatcher._job_states
    assert (await env.taskforce(tf.taskforce_uuid)).compound_statuses == done.compound_statuses


@pytest.mark.parametrize(
    ("worker", "field"),
    [
        (tms.WorkerJobState(worker_id="1.0"), "job_state"),
        (tms.WorkerJobState(worker_id="1.0", job_state=99), "job_state"),  # type: ignore[arg-type]
        (tms.WorkerJobState(job_state=Job.JOB_STATE_IDLE), "worker_id"),
        (tms.WorkerJobState(worker_id="7", job_state=Job.JOB_STATE_IDLE), "worker_id"),
        (tms.WorkerJobState(worker_id="7.0.0", job_state=Job.JOB_STATE_IDLE), "worker_id"),
        (tms.WorkerJobState(worker_id="07.0", job_state=Job.JOB_STATE_IDLE), "worker_id"),
        (tms.WorkerJobState(worker_id="-7.0", job_state=Job.JOB_STATE_IDLE), "worker_id"),
        (tms.WorkerJobState(worker_id="\uff17.0", job_state=Job.JOB_STATE_IDLE), "worker_id"),
        (
            tms.WorkerJobState(
                worker_id="1.0",
                job_state=Job.JOB_STATE_RUNNING,
                chirps=tms.PilotChirps(phase=42),  # type: ignore[arg-type]
            ),
            "chirps.phase",
        ),
        (
            tms.WorkerJobState(
                worker_id="1.0",
                job_state=Job.JOB_STATE_RUNNING,
                chirps=tms.PilotChirps(last_error="x" * 4097),
            ),
            "chirps.last_error",
        ),
        (
            tms.WorkerJobState(
                worker_id="1.0",
                job_state=Job.JOB_STATE_RUNNING,
                chirps=tms.PilotChirps(counters=taskforce_pb2.TaskCounters(tasks_failed=-1)),
            ),
            "chirps.counters.tasks_failed",
        ),
        (
            tms.WorkerJobState(
                worker_id="1.0",
                job_state=Job.JOB_STATE_RUNNING,
                chirps=tms.PilotChirps(
                    counters=taskforce_pb2.TaskCounters(events_received=10**12 + 1)
                ),
            ),
            "chirps.counters.events_received",
        ),
    ],
)
async def test_invalid_snapshot_field_is_invalid_argument_naming_it(
    env: Env, worker: tms.WorkerJobState, field: str
) -> None:
    stream = env.tms()
    await stream.hello()

    await stream.send(
        snapshot=tms.JobStatusSnapshot(
            taskforces=[tms.TaskforceJobStatus(taskforce_uuid="TF-x", workers=[worker])]
        )
    )

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err)] == [f"snapshot.taskforces[0].workers[0].{field}"]


# --- Snapshots are checked against the taskforce ------------------------------------------------


def running(uuid: str, *workers: str, full: bool = False) -> tms.JobStatusSnapshot:
    return snapshot(uuid, *((w, Job.JOB_STATE_RUNNING, "") for w in workers), full=full)


async def refused(stream: TmsStream) -> list[tuple[str, str]]:
    """The field violations the WMS ends ``stream`` with (INVALID_ARGUMENT)."""
    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    return field_violations(err)


async def test_a_snapshot_of_more_workers_than_the_taskforce_has_is_refused(env: Env) -> None:
    # Defect 8: 50,000 RUNNING workers were accepted for a 1-worker taskforce never submitted.
    [tf] = await env.created_and_launched(task(n_workers=1))
    stream = env.tms()
    await stream.hello()
    await stream.start()  # not confirmed

    await stream.send(
        snapshot=running(tf.taskforce_uuid, *(f"3.{i}" for i in range(50_000)), full=True)
    )

    assert await refused(stream) == [
        ("snapshot.taskforces[0].workers", "the taskforce has 1 workers; this would make 50000")
    ]
    assert not (await env.taskforce(tf.taskforce_uuid)).compound_statuses


async def test_workers_add_up_over_partial_snapshots_to_at_most_n_workers(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    tf, _ = await submitted_taskforce(env, stream, 7, n_workers=2)
    uuid = tf.taskforce_uuid
    await stream.send(snapshot=running(uuid, "7.0"))
    await stream.send(snapshot=running(uuid, "7.1"))
    await stream.send(snapshot=running(uuid, "7.0"))  # again: still two workers
    await stream.send(snapshot=running(uuid, "7.9", full=True))  # replaces them: one
    await stream.send(snapshot=running(uuid, "7.1"))
    two = compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_UNSPECIFIED, 2))
    await compound_statuses_become(env, uuid, two)

    await stream.send(snapshot=running(uuid, "7.2"))

    assert await refused(stream) == [
        ("snapshot.taskforces[0].workers", "the taskforce has 2 workers; this would make 3")
    ]
    await compound_statuses_become(env, uuid, two)


async def test_a_snapshot_naming_jobs_of_another_cluster_is_refused(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    tf, _ = await submitted_taskforce(env, stream, 7, n_workers=2)

    await stream.send(snapshot=running(tf.taskforce_uuid, "7.0", "8.0"))

    assert await refused(stream) == [
        (
            "snapshot.taskforces[0].workers[1].worker_id",
            "must be a job of the taskforce's cluster 7 (got '8.0')",
        )
    ]
    assert not (await env.taskforce(tf.taskforce_uuid)).compound_statuses


async def test_a_snapshot_of_a_taskforce_no_start_was_sent_for_is_refused(
    start_env: StartEnv,
) -> None:
    env = await start_env(location_max_workers={"local": 1})
    await env.created_and_launched(task(n_workers=1))
    waiting = await pre_launch(env, await env.create(task(n_workers=1)))
    stream = env.tms()
    await stream.hello()

    await stream.send(snapshot=running(waiting.taskforce_uuid, "3.0"))

    assert await refused(stream) == [
        ("snapshot.taskforces[0].taskforce_uuid", "no start command was sent for it")
    ]
    assert await env.taskforce(waiting.taskforce_uuid) == waiting


async def test_a_snapshot_before_the_submit_is_confirmed_is_applied_within_bounds(
    env: Env,
) -> None:
    # After a reconnect a TMS re-sends its full snapshot before it answers the start sent again.
    [tf] = await env.created_and_launched(task(n_workers=2))
    uuid = tf.taskforce_uuid
    stream = env.tms()
    await stream.hello()
    start = await stream.start()
    await stream.send(snapshot=running(uuid, "5.0", full=True))
    await compound_statuses_become(
        env, uuid, compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1))
    )
    await stream.submitted(start, 5)
    await env.phase(uuid, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)

    # Jobs of another cluster than the ones already known are refused.
    other = env.tms()
    await other.hello()
    [tf2] = await env.created_and_launched(task(n_workers=3))
    await other.start()
    await other.send(snapshot=running(tf2.taskforce_uuid, "6.0"))
    await other.send(snapshot=running(tf2.taskforce_uuid, "6.1", "4.0"))

    assert await refused(other) == [
        (
            "snapshot.taskforces[0].workers[1].worker_id",
            "must be a job of the taskforce's cluster 6 (got '4.0')",
        )
    ]


async def test_a_refused_snapshot_changes_nothing_of_its_other_entries(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    tf, _ = await submitted_taskforce(env, stream, 7, n_workers=1)
    other, _ = await submitted_taskforce(env, stream, 8, n_workers=1)
    uuid = tf.taskforce_uuid
    await stream.send(snapshot=running(uuid, "7.0", full=True))
    before = compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1))
    await compound_statuses_become(env, uuid, before)

    both = tms.JobStatusSnapshot(
        taskforces=[
            *snapshot(uuid, ("7.0", Job.JOB_STATE_HELD, "held"), full=True).taskforces,
            *running("TF-0-0-0-0", "1.0").taskforces,
        ]
    )
    await stream.send(snapshot=both)

    assert await refused(stream) == [
        ("snapshot.taskforces[1].taskforce_uuid", "no taskforce 'TF-0-0-0-0'")
    ]
    # Written together with anything applied before it: once it shows, the first entry would.
    again = env.tms()
    await again.hello()
    await again.send(snapshot=running(other.taskforce_uuid, "8.0", full=True))
    await compound_statuses_become(env, other.taskforce_uuid, before)
    assert list((await env.taskforce(uuid)).compound_statuses) == before
