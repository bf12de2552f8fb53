"""WorkflowService.WatchWorkflow on a real WMS: a snapshot of the workflow, then its changes as they
happen (phases confirmed by a TMS, pilots' statuses, deactivation, new taskforces, queue counters),
until the workflow is deactivated and every taskforce is terminal."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from ewms.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    queue_pb2,
    task_manager_service_pb2,
    taskforce_pb2,
    workflow_pb2,
    workflow_service_pb2,
)
from services.auth import Role
from tests.conftest import bearer
from tests.wms.helpers import TIMEOUT, Env, Metadata, compound, launched, snapshot, task

tms = task_manager_service_pb2
ws = workflow_service_pb2
Phase = taskforce_pb2.TaskforcePhase
Job = taskforce_pb2.JobState
Pilot = taskforce_pb2.PilotPhase


class Watch:
    """A WatchWorkflow stream, and the view of the workflow its messages add up to."""

    def __init__(self, env: Env, workflow_id: str, md: Metadata | None = None) -> None:
        self.call = env.workflows.WatchWorkflow(
            ws.WatchWorkflowRequest(workflow_id=workflow_id),
            metadata=md if md is not None else env.alice,
        )
        env.streams.append(self)  # cancelled after the test
        self.messages: list[ws.WatchWorkflowResponse] = []
        self.workflow = workflow_pb2.Workflow()
        self.taskforces: dict[str, taskforce_pb2.Taskforce] = {}
        self.stats: dict[str, queue_pb2.QueueStats] = {}

    async def read(self) -> ws.WatchWorkflowResponse:
        """The next message (the stream must not end), applied to the view."""
        msg = await asyncio.wait_for(self.call.read(), TIMEOUT)
        assert msg is not grpc.aio.EOF, "the WMS ended the watch"
        self.messages.append(msg)
        if msg.HasField("workflow"):
            self.workflow = msg.workflow
        for tf in msg.taskforces:
            if not msg.snapshot:
                # A taskforce is sent again only if it changed.
                assert tf != self.taskforces.get(tf.taskforce_uuid), f"sent unchanged: {tf}"
            self.taskforces[tf.taskforce_uuid] = tf
        for stats in msg.queue_stats:
            self.stats[stats.queue_id] = stats
        return msg  # type: ignore[no-any-return]

    async def until(self, check: Callable[[Watch], bool], what: str) -> None:
        """Read messages until the view satisfies ``check``."""

        async def read_until() -> None:
            while not check(self):
                await self.read()

        try:
            await asyncio.wait_for(read_until(), TIMEOUT)
        except TimeoutError:
            pytest.fail(f"not watched within {TIMEOUT} s: {what}")

    def phase(self, uuid: str) -> int:
        return self.taskforces[uuid].phase

    async def end(self) -> grpc.StatusCode:
        """How the stream ends, once the messages before its end are read."""
        while await asyncio.wait_for(self.call.read(), TIMEOUT) is not grpc.aio.EOF:
            pass
        return await self.call.code()  # type: ignore[no-any-return]


async def publish(env: Env, queue_id: str, n: int) -> None:
    events = event_service_pb2_grpc.EventServiceStub(env.channel)
    await events.Publish(
        event_service_pb2.PublishRequest(
            queue_id=queue_id, events=[queue_pb2.Event(payload=b"{}") for _ in range(n)]
        ),
        metadata=env.alice,
    )


async def abort(env: Env, workflow_id: str) -> None:
    await env.workflows.AbortWorkflow(
        ws.AbortWorkflowRequest(workflow_id=workflow_id), metadata=env.alice
    )


# --- The snapshot ---------------------------------------------------------------------------------


async def test_watch_begins_with_a_snapshot_of_the_workflow_taskforces_and_queue_counters(
    env: Env,
) -> None:
    resp = await env.create(task("local"), task("osg", input_queue_aliases=["out"]))
    taskforces = await launched(env.workflows, env.alice, resp.workflow.workflow_id)
    by_alias = {q.alias: q.queue_id for q in resp.queues}
    await publish(env, by_alias["in"], 2)
    watch = Watch(env, resp.workflow.workflow_id)

    first = await watch.read()

    assert first.snapshot
    assert first.workflow == resp.workflow
    assert list(first.taskforces) == taskforces
    stats = {s.queue_id: s for s in first.queue_stats}
    assert set(stats) == set(by_alias.values())
    assert (stats[by_alias["in"]].published, stats[by_alias["in"]].ready) == (2, 2)
    assert stats[by_alias["out"]].published == 0


async def test_watching_another_users_workflow_is_not_found(env: Env) -> None:
    resp = await env.create()
    bob = bearer(env.wms.authority.mint("bob", Role.USER, 3600))

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Watch(env, resp.workflow.workflow_id, bob).read()

    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watching_an_unknown_workflow_is_not_found(env: Env) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Watch(env, "WF-0-00000000").read()

    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_admin_may_watch_any_workflow(env: Env) -> None:
    resp = await env.create()
    admin = bearer(env.wms.authority.mint("root", Role.ADMIN, 3600))

    first = await Watch(env, resp.workflow.workflow_id, admin).read()

    assert first.snapshot
    assert first.workflow.workflow_id == resp.workflow.workflow_id


# --- Changes --------------------------------------------------------------------------------------


async def test_a_phase_confirmed_by_the_tms_is_watched_and_only_changed_taskforces_are_sent(
    env: Env,
) -> None:
    resp = await env.create(task("local"), task("osg", input_queue_aliases=["out"]))
    local, osg = await launched(env.workflows, env.alice, resp.workflow.workflow_id)
    watch = Watch(env, resp.workflow.workflow_id)
    await watch.read()
    stream = env.tms()
    await stream.hello()

    await stream.submitted(await stream.start(), 5)

    await watch.until(
        lambda w: w.phase(local.taskforce_uuid) == Phase.TASKFORCE_PHASE_CONDOR_SUBMIT,
        "the local taskforce submitted",
    )
    later = watch.messages[1:]
    assert not any(m.snapshot for m in later)
    assert all(tf.taskforce_uuid == local.taskforce_uuid for m in later for tf in m.taskforces)
    watched = watch.taskforces[local.taskforce_uuid]
    assert watched.cluster_id == 5
    assert watched == await env.taskforce(local.taskforce_uuid)
    assert watch.taskforces[osg.taskforce_uuid] == osg


async def test_pilot_statuses_and_job_states_are_watched_as_compound_statuses_and_counters(
    env: Env,
) -> None:
    [tf] = await env.created_and_launched(task(n_workers=1))
    uuid = tf.taskforce_uuid
    watch = Watch(env, tf.workflow_id)
    await watch.read()
    stream = env.tms()
    await stream.hello()
    start = await stream.start()
    await stream.submitted(start, 1)
    pilot = env.pilot(start.pilot_token)
    await pilot.hello(uuid, worker_id="1.0")

    await pilot.status(Pilot.PILOT_PHASE_TASKING, events_received=3, tasks_succeeded=2)
    await watch.until(
        lambda w: (
            w.taskforces[uuid].counters
            == taskforce_pb2.TaskCounters(events_received=3, tasks_succeeded=2)
            and list(w.taskforces[uuid].compound_statuses)
            == compound((Job.JOB_STATE_UNSPECIFIED, "", Pilot.PILOT_PHASE_TASKING, 1))
        ),
        "the pilot's status",
    )

    await stream.send(snapshot=snapshot(uuid, ("1.0", Job.JOB_STATE_RUNNING, "")))
    await watch.until(
        lambda w: (
            list(w.taskforces[uuid].compound_statuses)
            == compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_TASKING, 1))
        ),
        "the worker's job state joined with its pilot's phase",
    )

    await pilot.status(Pilot.PILOT_PHASE_DRAINING, events_received=4, tasks_succeeded=4)
    await watch.until(
        lambda w: (
            w.taskforces[uuid].counters
            == taskforce_pb2.TaskCounters(events_received=4, tasks_succeeded=4)
            and list(w.taskforces[uuid].compound_statuses)
            == compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_DRAINING, 1))
        ),
        "the pilot draining",
    )


async def test_a_taskforce_that_did_not_change_is_not_sent_again(env: Env) -> None:
    a, b = await env.created_and_launched(task(), task(input_queue_aliases=["out"]))
    watch = Watch(env, a.workflow_id)
    await watch.read()
    stream = env.tms()
    await stream.hello()
    for cluster_id in (1, 2):
        await stream.submitted(await stream.start(), cluster_id)
    running = compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_UNSPECIFIED, 1))

    await stream.send(snapshot=snapshot(a.taskforce_uuid, ("1.0", Job.JOB_STATE_RUNNING, "")))
    await watch.until(
        lambda w: list(w.taskforces[a.taskforce_uuid].compound_statuses) == running, "a running"
    )
    n = len(watch.messages)

    # The same job state again (a change of nothing), then b's, applied after it.
    await stream.send(snapshot=snapshot(a.taskforce_uuid, ("1.0", Job.JOB_STATE_RUNNING, "")))
    await stream.send(snapshot=snapshot(b.taskforce_uuid, ("2.0", Job.JOB_STATE_RUNNING, "")))
    await watch.until(
        lambda w: list(w.taskforces[b.taskforce_uuid].compound_statuses) == running, "b running"
    )

    # (Watch.read fails on a taskforce sent unchanged.)
    assert all(
        tf.taskforce_uuid == b.taskforce_uuid for m in watch.messages[n:] for tf in m.taskforces
    )


async def test_an_added_taskforce_is_watched(env: Env) -> None:
    resp = await env.create()
    await launched(env.workflows, env.alice, resp.workflow.workflow_id)
    watch = Watch(env, resp.workflow.workflow_id)
    await watch.read()

    added = await env.workflows.AddWorkers(
        ws.AddWorkersRequest(
            task_id=resp.task_directives[0].task_id, cluster_location="osg", n_workers=2
        ),
        metadata=env.alice,
    )

    await watch.until(lambda w: added.taskforce_uuid in w.taskforces, "the added taskforce watched")
    await watch.until(
        lambda w: w.phase(added.taskforce_uuid) == Phase.TASKFORCE_PHASE_PENDING_STARTER,
        "the added taskforce released",
    )
    assert watch.taskforces[added.taskforce_uuid].n_workers == 2


async def test_queue_counters_ride_along_with_other_changes(env: Env) -> None:
    resp = await env.create()
    await launched(env.workflows, env.alice, resp.workflow.workflow_id)
    in_queue = next(q.queue_id for q in resp.queues if q.alias == "in")
    watch = Watch(env, resp.workflow.workflow_id)
    await watch.read()
    assert watch.stats[in_queue].published == 0

    await publish(env, in_queue, 3)
    await env.workflows.AddWorkers(  # a change to watch
        ws.AddWorkersRequest(
            task_id=resp.task_directives[0].task_id, cluster_location="local", n_workers=1
        ),
        metadata=env.alice,
    )

    await watch.until(lambda w: w.stats[in_queue].published == 3, "the published events counted")
    assert watch.stats[in_queue].ready == 3


# --- Deactivation and the end of the watch --------------------------------------------------------


async def test_deactivation_is_watched_and_the_watch_ends_once_every_taskforce_is_terminal(
    env: Env,
) -> None:
    resp = await env.create(task("local"), task("osg", input_queue_aliases=["out"]))
    taskforces = await launched(env.workflows, env.alice, resp.workflow.workflow_id)
    watch = Watch(env, resp.workflow.workflow_id)
    await watch.read()

    await abort(env, resp.workflow.workflow_id)

    await watch.until(
        lambda w: (
            w.workflow.deactivated == workflow_pb2.DEACTIVATION_ABORTED
            and all(
                w.phase(tf.taskforce_uuid) == Phase.TASKFORCE_PHASE_CANCELLED for tf in taskforces
            )
        ),
        "the workflow aborted and its taskforces cancelled",
    )
    assert watch.workflow.HasField("deactivated_ts")
    assert await watch.end() == grpc.StatusCode.OK


async def test_watch_stays_open_until_a_deactivated_workflows_submitted_taskforce_completes(
    env: Env,
) -> None:
    [tf] = await env.created_and_launched(task())
    uuid = tf.taskforce_uuid
    stream = env.tms()
    await stream.hello()
    await stream.submitted(await stream.start(), 9)
    await env.phase(uuid, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)
    watch = Watch(env, tf.workflow_id)
    await watch.read()

    await env.workflows.FinishWorkflow(
        ws.FinishWorkflowRequest(workflow_id=tf.workflow_id), metadata=env.alice
    )
    await watch.until(
        lambda w: (
            w.workflow.deactivated == workflow_pb2.DEACTIVATION_FINISHED
            and w.phase(uuid) == Phase.TASKFORCE_PHASE_PENDING_STOPPER
        ),
        "the workflow finished and its taskforce pending-stopper",
    )
    await stream.stop()
    await stream.send(removed=tms.TaskforceRemoved(taskforce_uuid=uuid))
    await watch.until(
        lambda w: w.phase(uuid) == Phase.TASKFORCE_PHASE_CONDOR_RM, "the cluster removed"
    )
    await stream.send(completed=tms.TaskforceCompleted(taskforce_uuid=uuid))
    await watch.until(
        lambda w: w.phase(uuid) == Phase.TASKFORCE_PHASE_CONDOR_COMPLETE, "the taskforce complete"
    )

    assert await watch.end() == grpc.StatusCode.OK


async def test_watching_a_workflow_that_is_over_sends_the_snapshot_and_ends(env: Env) -> None:
    resp = await env.create()
    await abort(env, resp.workflow.workflow_id)
    watch = Watch(env, resp.workflow.workflow_id)

    first = await watch.read()

    assert first.snapshot
    assert first.workflow.deactivated == workflow_pb2.DEACTIVATION_ABORTED
    assert [tf.phase for tf in first.taskforces] == [Phase.TASKFORCE_PHASE_CANCELLED]
    assert await watch.end() == grpc.StatusCode.OK
