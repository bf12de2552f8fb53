"""The workflow lifecycle on a real WMS: create, read, list, add workers, abort and finish."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from ewms.v1 import (
    queue_pb2,
    taskforce_pb2,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.errors import field_violations
from services.wms import RunningWms
from services.wms.store import TASKFORCES, Tx
from tests.wms.helpers import assert_all_moved_on, assert_moved_on, launched
from tests.wms.requests import minimal_task, seed, worker_config, workflow_request

Phase = taskforce_pb2.TaskforcePhase
Stub = workflow_service_pb2_grpc.WorkflowServiceStub
Metadata = tuple[tuple[str, str], ...]
SEED_SIZE_BYTES = 512 * 1024 * 1024  # "512M"


async def create(
    workflows: Stub, md: Metadata, request: workflow_service_pb2.CreateWorkflowRequest | None = None
) -> workflow_service_pb2.CreateWorkflowResponse:
    return await workflows.CreateWorkflow(  # type: ignore[no-any-return]
        request if request is not None else workflow_request(), metadata=md
    )


async def set_phase(wms: RunningWms, taskforce_uuid: str, phase: Any) -> None:
    """Move a taskforce to a phase behind the API, as its TMS would (no TMS is connected). Call it
    once launch control has released the taskforce (``launched``), or launch control may still
    move it."""

    def update(tx: Tx) -> None:
        tf = tx.get(TASKFORCES, taskforce_uuid)
        assert tf is not None
        tf.phase = phase
        tx.update(TASKFORCES, tf)

    await wms.store.run(update)


def two_task_request() -> workflow_service_pb2.CreateWorkflowRequest:
    """Task "a" at local and sub-2 (= osg), task "b" at osg; three taskforces in all."""
    return workflow_request(
        minimal_task(cluster_locations=["local", "sub-2"], output_queue_aliases=["mid"]),
        minimal_task(cluster_locations=["osg"], input_queue_aliases=["mid"]),
    )


# --- CreateWorkflow -------------------------------------------------------------------------------


async def test_seed_request_is_accepted_unchanged(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())

    assert resp.workflow.workflow_id.startswith("WF-")
    assert list(resp.workflow.public_queue_aliases) == ["input-queue", "output-queue"]


async def test_created_workflow_is_owned_by_the_caller(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())

    assert resp.workflow.owner == "alice"


async def test_workflow_priority_defaults_to_50(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())

    assert resp.workflow.priority == 50
    assert [tf.priority for tf in resp.taskforces] == [50]


async def test_new_workflow_is_active(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())

    assert resp.workflow.deactivated == workflow_pb2.DEACTIVATION_UNSPECIFIED
    assert not resp.workflow.HasField("deactivated_ts")
    assert resp.workflow.HasField("timestamp")


async def test_create_makes_one_task_directive_per_task(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())

    [td] = resp.task_directives
    assert td.task_id.startswith("TK-" + resp.workflow.workflow_id.removeprefix("WF-"))
    assert td.workflow_id == resp.workflow.workflow_id
    assert td.task_image == seed().tasks[0].task_image
    assert td.task_args == "cp {{INFILE}} {{OUTFILE}}"


async def test_location_alias_is_stored_as_its_canonical_name(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, seed())  # the seed runs at "sub-2", an alias of "osg"

    assert list(resp.task_directives[0].cluster_locations) == ["osg"]
    assert [tf.cluster_location for tf in resp.taskforces] == ["osg"]


async def test_create_makes_one_taskforce_per_task_and_location(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, two_task_request())

    a, b = resp.task_directives
    assert [(tf.task_id, tf.cluster_location) for tf in resp.taskforces] == [
        (a.task_id, "local"),
        (a.task_id, "osg"),
        (b.task_id, "osg"),
    ]
    assert {tf.workflow_id for tf in resp.taskforces} == {resp.workflow.workflow_id}
    assert len({tf.taskforce_uuid for tf in resp.taskforces}) == 3


async def test_new_taskforce_waits_for_queue_activation(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())

    [tf] = resp.taskforces
    assert tf.phase == Phase.TASKFORCE_PHASE_PRE_MQ_ACTIVATION
    [change] = tf.phase_change_log
    assert change.target_phase == Phase.TASKFORCE_PHASE_PRE_MQ_ACTIVATION
    assert change.was_successful
    assert change.source_entity == "User"
    assert change.timestamp == resp.workflow.timestamp


async def test_create_makes_one_queue_per_alias_referenced_by_the_directive(
    wms: RunningWms, workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, seed())

    by_alias = {q.alias: q for q in resp.queues}
    assert sorted(by_alias) == ["input-queue", "output-queue"]
    [td] = resp.task_directives
    assert list(td.input_queues) == [by_alias["input-queue"].queue_id]
    assert list(td.output_queues) == [by_alias["output-queue"].queue_id]
    for q in resp.queues:
        assert q.workflow_id == resp.workflow.workflow_id
        assert q.public
        assert q.backend == queue_pb2.QUEUE_BACKEND_EMBEDDED
        assert q.address == wms.address


async def test_queue_shared_by_two_tasks_is_created_once(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, two_task_request())

    assert sorted(q.alias for q in resp.queues) == ["in", "mid", "out"]
    a, b = resp.task_directives
    assert list(a.output_queues) == list(b.input_queues)


async def test_sizes_are_stored_in_bytes(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())

    wc = resp.taskforces[0].worker_config
    assert wc.worker_disk.number_value == SEED_SIZE_BYTES
    assert wc.worker_memory.number_value == SEED_SIZE_BYTES


async def test_requested_n_workers_is_kept(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())

    assert resp.taskforces[0].n_workers == 1000


async def test_omitted_n_workers_and_max_attempts_get_their_defaults(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, workflow_request(minimal_task()))

    assert resp.taskforces[0].n_workers == 1
    assert {q.alias: q.max_attempts for q in resp.queues} == {"in": 3, "out": 3}


async def test_max_attempts_applies_to_the_tasks_input_queues(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, workflow_request(minimal_task(max_attempts=7)))

    assert {q.alias: q.max_attempts for q in resp.queues} == {"in": 7, "out": 3}


async def test_omitted_pilot_config_gets_its_defaults(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())

    pc = resp.taskforces[0].pilot_config
    assert pc.tag == "latest"
    assert pc.image_source == "auto"


# --- Workflow priority (the original's max(p, 100) bug is not copied) -----------------------------


@pytest.mark.parametrize("priority", [100, 10, 0])
async def test_explicit_workflow_priority_is_kept(
    workflows: Stub, alice: Metadata, priority: int
) -> None:
    resp = await create(workflows, alice, workflow_request(priority=priority))

    assert resp.workflow.priority == priority
    assert [tf.priority for tf in resp.taskforces] == [priority]


@pytest.mark.parametrize("priority", [101, -1])
async def test_workflow_priority_outside_0_to_100_is_rejected(
    workflows: Stub, alice: Metadata, priority: int
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(workflows, alice, workflow_request(priority=priority))

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["priority"]


# --- Reads ----------------------------------------------------------------------------------------


async def test_get_workflow_returns_the_created_workflow(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())

    got = await workflows.GetWorkflow(
        workflow_service_pb2.GetWorkflowRequest(workflow_id=resp.workflow.workflow_id),
        metadata=alice,
    )

    assert got == resp.workflow


async def test_get_task_directive_returns_the_created_directive(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, seed())
    [td] = resp.task_directives

    got = await workflows.GetTaskDirective(
        workflow_service_pb2.GetTaskDirectiveRequest(task_id=td.task_id), metadata=alice
    )

    assert got == td


async def test_get_taskforce_returns_the_created_taskforce(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, seed())
    [tf] = resp.taskforces

    got = await workflows.GetTaskforce(
        workflow_service_pb2.GetTaskforceRequest(taskforce_uuid=tf.taskforce_uuid), metadata=alice
    )

    assert_moved_on(got, tf)  # launch control may have released it meanwhile


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("GetWorkflow", workflow_service_pb2.GetWorkflowRequest(workflow_id="WF-0-00000000")),
        ("GetTaskDirective", workflow_service_pb2.GetTaskDirectiveRequest(task_id="TK-0-0-0")),
        ("GetTaskforce", workflow_service_pb2.GetTaskforceRequest(taskforce_uuid="TF-0-0-0-0")),
        ("ListQueues", workflow_service_pb2.ListQueuesRequest(workflow_id="WF-0-00000000")),
        ("AbortWorkflow", workflow_service_pb2.AbortWorkflowRequest(workflow_id="WF-0-00000000")),
        ("FinishWorkflow", workflow_service_pb2.FinishWorkflowRequest(workflow_id="WF-0-00000000")),
    ],
)
async def test_unknown_id_is_not_found(
    workflows: Stub, alice: Metadata, method: str, request_: Any
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(workflows, method)(request_, metadata=alice)

    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_get_without_an_id_is_invalid_argument(workflows: Stub, alice: Metadata) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await workflows.GetWorkflow(workflow_service_pb2.GetWorkflowRequest(), metadata=alice)

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["workflow_id"]


async def test_list_task_directives_filters_by_workflow(workflows: Stub, alice: Metadata) -> None:
    first = await create(workflows, alice, two_task_request())
    await create(workflows, alice, seed())

    listed = await workflows.ListTaskDirectives(
        workflow_service_pb2.ListTaskDirectivesRequest(workflow_id=first.workflow.workflow_id),
        metadata=alice,
    )

    assert list(listed.task_directives) == list(first.task_directives)


async def test_list_taskforces_filters_by_workflow(workflows: Stub, alice: Metadata) -> None:
    first = await create(workflows, alice, two_task_request())
    await create(workflows, alice, seed())

    listed = await workflows.ListTaskforces(
        workflow_service_pb2.ListTaskforcesRequest(workflow_id=first.workflow.workflow_id),
        metadata=alice,
    )

    assert_all_moved_on(list(listed.taskforces), list(first.taskforces))


async def test_list_taskforces_filters_by_task(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, two_task_request())
    task_a = resp.task_directives[0].task_id

    listed = await workflows.ListTaskforces(
        workflow_service_pb2.ListTaskforcesRequest(task_id=task_a), metadata=alice
    )

    assert [tf.taskforce_uuid for tf in listed.taskforces] == [
        tf.taskforce_uuid for tf in resp.taskforces if tf.task_id == task_a
    ]
    assert len(listed.taskforces) == 2


@pytest.mark.parametrize(("location", "expected"), [("local", 1), ("osg", 2), ("sub-2", 2)])
async def test_list_taskforces_filters_by_location_name_or_alias(
    workflows: Stub, alice: Metadata, location: str, expected: int
) -> None:
    await create(workflows, alice, two_task_request())

    listed = await workflows.ListTaskforces(
        workflow_service_pb2.ListTaskforcesRequest(cluster_location=location), metadata=alice
    )

    canonical = "local" if location == "local" else "osg"
    assert [tf.cluster_location for tf in listed.taskforces] == [canonical] * expected


async def test_list_taskforces_at_unknown_location_is_invalid_argument(
    workflows: Stub, alice: Metadata
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await workflows.ListTaskforces(
            workflow_service_pb2.ListTaskforcesRequest(cluster_location="mars"), metadata=alice
        )

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = field_violations(err.value)
    assert field == "cluster_location"
    assert "mars" in description


async def test_list_taskforces_filters_by_phase(workflows: Stub, alice: Metadata) -> None:
    aborted = await create(workflows, alice, two_task_request())
    active = await create(workflows, alice, seed())
    await workflows.AbortWorkflow(
        workflow_service_pb2.AbortWorkflowRequest(workflow_id=aborted.workflow.workflow_id),
        metadata=alice,
    )
    await launched(workflows, alice, active.workflow.workflow_id)

    cancelled = await workflows.ListTaskforces(
        workflow_service_pb2.ListTaskforcesRequest(phase=Phase.TASKFORCE_PHASE_CANCELLED),
        metadata=alice,
    )
    waiting = await workflows.ListTaskforces(
        workflow_service_pb2.ListTaskforcesRequest(phase=Phase.TASKFORCE_PHASE_PENDING_STARTER),
        metadata=alice,
    )

    assert [tf.taskforce_uuid for tf in cancelled.taskforces] == [
        tf.taskforce_uuid for tf in aborted.taskforces
    ]
    assert [tf.taskforce_uuid for tf in waiting.taskforces] == [
        tf.taskforce_uuid for tf in active.taskforces
    ]


async def test_list_queues_returns_the_workflows_queues(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())
    await create(workflows, alice, two_task_request())

    listed = await workflows.ListQueues(
        workflow_service_pb2.ListQueuesRequest(workflow_id=resp.workflow.workflow_id),
        metadata=alice,
    )

    assert list(listed.queues) == list(resp.queues)


# --- AddWorkers -----------------------------------------------------------------------------------


async def add_workers(
    workflows: Stub, md: Metadata, task_id: str, location: str = "local", n_workers: int = 5
) -> taskforce_pb2.Taskforce:
    return await workflows.AddWorkers(  # type: ignore[no-any-return]
        workflow_service_pb2.AddWorkersRequest(
            task_id=task_id, cluster_location=location, n_workers=n_workers
        ),
        metadata=md,
    )


async def test_add_workers_creates_a_taskforce_for_the_task(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, seed())
    [td] = resp.task_directives
    await launched(workflows, alice, resp.workflow.workflow_id)

    tf = await add_workers(workflows, alice, td.task_id, "local", n_workers=5)

    assert tf.taskforce_uuid not in {t.taskforce_uuid for t in resp.taskforces}
    assert (tf.task_id, tf.workflow_id) == (td.task_id, resp.workflow.workflow_id)
    assert (tf.cluster_location, tf.n_workers) == ("local", 5)
    # The workflow's queues are active (its first taskforce was released), so it skips activation.
    assert tf.phase == Phase.TASKFORCE_PHASE_PRE_LAUNCH
    assert [(c.target_phase, c.was_successful) for c in tf.phase_change_log] == [
        (Phase.TASKFORCE_PHASE_PRE_MQ_ACTIVATION, True),
        (Phase.TASKFORCE_PHASE_PRE_LAUNCH, True),
    ]
    listed = await launched(workflows, alice, resp.workflow.workflow_id)
    assert_all_moved_on([t for t in listed if t.task_id == td.task_id], [*resp.taskforces, tf])


async def test_added_taskforce_at_a_location_alias_gets_the_canonical_name(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, workflow_request())

    tf = await add_workers(workflows, alice, resp.task_directives[0].task_id, "sub-2")

    assert tf.cluster_location == "osg"


async def test_added_taskforce_priority_is_the_workflow_priority_plus_100(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, workflow_request(priority=10))

    tf = await add_workers(workflows, alice, resp.task_directives[0].task_id)

    assert tf.priority == 110


async def test_added_taskforce_copies_the_tasks_pilot_and_worker_config(
    workflows: Stub, alice: Metadata
) -> None:
    task = minimal_task(
        pilot_config={
            "tag": "1.2.3",
            "image_source": "cvmfs",
            "environment": {"EWMS_PILOT_TASK_TIMEOUT": 30},
            "input_files": ["/data/calib.json"],
        },
        worker_config=worker_config(
            n_cores=4, worker_memory="8GiB", condor_requirements="HAS_CVMFS"
        ),
    )
    resp = await create(workflows, alice, workflow_request(task))
    [template] = resp.taskforces

    tf = await add_workers(workflows, alice, template.task_id, "osg")

    assert tf.pilot_config == template.pilot_config
    assert tf.worker_config == template.worker_config
    assert tf.worker_config.condor_requirements == "HAS_CVMFS"
    assert tf.pilot_config.environment["EWMS_PILOT_TASK_TIMEOUT"].number_value == 30


async def test_added_taskforce_skips_queue_activation_once_the_queues_are_active(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, seed())
    await launched(workflows, alice, resp.workflow.workflow_id)

    tf = await add_workers(workflows, alice, resp.task_directives[0].task_id)

    assert tf.phase == Phase.TASKFORCE_PHASE_PRE_LAUNCH
    assert [c.target_phase for c in tf.phase_change_log] == [
        Phase.TASKFORCE_PHASE_PRE_MQ_ACTIVATION,
        Phase.TASKFORCE_PHASE_PRE_LAUNCH,
    ]


async def test_add_workers_at_an_unknown_location_is_invalid_argument(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, seed())

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await add_workers(workflows, alice, resp.task_directives[0].task_id, "mars")

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = field_violations(err.value)
    assert field == "cluster_location"
    assert "'mars'" in description
    assert "local" in description
    assert "osg" in description


async def test_add_zero_workers_is_invalid_argument(workflows: Stub, alice: Metadata) -> None:
    resp = await create(workflows, alice, seed())

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await add_workers(workflows, alice, resp.task_directives[0].task_id, n_workers=0)

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["n_workers"]


async def test_add_workers_to_an_unknown_task_is_not_found(
    workflows: Stub, alice: Metadata
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await add_workers(workflows, alice, "TK-0-00000000-00000000")

    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_add_workers_on_a_deactivated_workflow_is_failed_precondition(
    workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, seed())
    await workflows.FinishWorkflow(
        workflow_service_pb2.FinishWorkflowRequest(workflow_id=resp.workflow.workflow_id),
        metadata=alice,
    )

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await add_workers(workflows, alice, resp.task_directives[0].task_id)

    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = await workflows.ListTaskforces(
        workflow_service_pb2.ListTaskforcesRequest(workflow_id=resp.workflow.workflow_id),
        metadata=alice,
    )
    assert len(listed.taskforces) == 1


# --- AbortWorkflow and FinishWorkflow -------------------------------------------------------------


async def abort(workflows: Stub, md: Metadata, workflow_id: str) -> Any:
    return await workflows.AbortWorkflow(
        workflow_service_pb2.AbortWorkflowRequest(workflow_id=workflow_id), metadata=md
    )


async def finish(workflows: Stub, md: Metadata, workflow_id: str) -> Any:
    return await workflows.FinishWorkflow(
        workflow_service_pb2.FinishWorkflowRequest(workflow_id=workflow_id), metadata=md
    )


DEACTIVATIONS = {
    "abort": (abort, workflow_pb2.DEACTIVATION_ABORTED),
    "finish": (finish, workflow_pb2.DEACTIVATION_FINISHED),
}


@pytest.mark.parametrize("action", sorted(DEACTIVATIONS))
async def test_deactivation_marks_the_workflow_and_stamps_its_time(
    workflows: Stub, alice: Metadata, action: str
) -> None:
    deactivate, expected = DEACTIVATIONS[action]
    resp = await create(workflows, alice, seed())

    done = await deactivate(workflows, alice, resp.workflow.workflow_id)

    assert done.workflow_id == resp.workflow.workflow_id
    assert done.workflow.deactivated == expected
    assert done.workflow.deactivated_ts.ToNanoseconds() >= resp.workflow.timestamp.ToNanoseconds()
    got = await workflows.GetWorkflow(
        workflow_service_pb2.GetWorkflowRequest(workflow_id=resp.workflow.workflow_id),
        metadata=alice,
    )
    assert got == done.workflow


@pytest.mark.parametrize("action", sorted(DEACTIVATIONS))
async def test_deactivation_cancels_never_submitted_taskforces(
    workflows: Stub, alice: Metadata, action: str
) -> None:
    deactivate, _ = DEACTIVATIONS[action]
    resp = await create(workflows, alice, two_task_request())

    done = await deactivate(workflows, alice, resp.workflow.workflow_id)

    assert done.n_taskforces == 3
    listed = await workflows.ListTaskforces(
        workflow_service_pb2.ListTaskforcesRequest(workflow_id=resp.workflow.workflow_id),
        metadata=alice,
    )
    for tf in listed.taskforces:
        assert tf.phase == Phase.TASKFORCE_PHASE_CANCELLED
        last = tf.phase_change_log[-1]
        assert (last.target_phase, last.was_successful, last.source_entity) == (
            Phase.TASKFORCE_PHASE_CANCELLED,
            True,
            "User",
        )


@pytest.mark.parametrize("first", sorted(DEACTIVATIONS))
@pytest.mark.parametrize("second", sorted(DEACTIVATIONS))
async def test_second_deactivation_is_failed_precondition(
    workflows: Stub, alice: Metadata, first: str, second: str
) -> None:
    resp = await create(workflows, alice, seed())
    done = await DEACTIVATIONS[first][0](workflows, alice, resp.workflow.workflow_id)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await DEACTIVATIONS[second][0](workflows, alice, resp.workflow.workflow_id)

    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already deactivated" in (err.value.details() or "")
    got = await workflows.GetWorkflow(
        workflow_service_pb2.GetWorkflowRequest(workflow_id=resp.workflow.workflow_id),
        metadata=alice,
    )
    assert got == done.workflow  # the first deactivation stands


async def test_finish_sends_a_submitted_taskforce_to_pending_stopper(
    wms: RunningWms, workflows: Stub, alice: Metadata
) -> None:
    resp = await create(workflows, alice, seed())
    [tf] = await launched(workflows, alice, resp.workflow.workflow_id)
    await set_phase(wms, tf.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)

    done = await finish(workflows, alice, resp.workflow.workflow_id)

    assert done.n_taskforces == 1
    got = await workflows.GetTaskforce(
        workflow_service_pb2.GetTaskforceRequest(taskforce_uuid=tf.taskforce_uuid), metadata=alice
    )
    assert got.phase == Phase.TASKFORCE_PHASE_PENDING_STOPPER
    last = got.phase_change_log[-1]
    assert (last.target_phase, last.was_successful) == (Phase.TASKFORCE_PHASE_PENDING_STOPPER, True)


@pytest.mark.parametrize(
    "ending",
    [
        Phase.TASKFORCE_PHASE_PENDING_STOPPER,
        Phase.TASKFORCE_PHASE_CONDOR_RM,
        Phase.TASKFORCE_PHASE_CONDOR_COMPLETE,
    ],
)
async def test_finish_leaves_an_ending_taskforce_in_its_phase_and_logs_the_failed_attempt(
    wms: RunningWms, workflows: Stub, alice: Metadata, ending: Any
) -> None:
    resp = await create(workflows, alice, two_task_request())
    ended, *others = await launched(workflows, alice, resp.workflow.workflow_id)
    await set_phase(wms, ended.taskforce_uuid, ending)

    done = await finish(workflows, alice, resp.workflow.workflow_id)

    assert done.n_taskforces == len(others)
    got = await workflows.GetTaskforce(
        workflow_service_pb2.GetTaskforceRequest(taskforce_uuid=ended.taskforce_uuid),
        metadata=alice,
    )
    assert got.phase == ending
    assert list(got.phase_change_log[:-1]) == list(ended.phase_change_log)  # one entry added
    last = got.phase_change_log[-1]
    assert (last.target_phase, last.was_successful) == (
        Phase.TASKFORCE_PHASE_PENDING_STOPPER,
        False,
    )
    assert Phase.Name(ending) in last.context
