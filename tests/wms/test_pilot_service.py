"""PilotService on a real WMS: a grpc.aio client plays the pilot (hello, status, task events) and
the WMS keeps each pilot's state, rolls it into its taskforce, and sends drain and stop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ewms.v1 import (
    pilot_service_pb2,
    taskforce_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import Role
from services.errors import field_violations
from services.wms import RunningWms, start_wms
from services.wms.control.pilots import (
    MAX_COUNTER,
    RECENT_TASK_EVENTS,
    ChangeKind,
    PilotChange,
    PilotState,
)
from tests.conftest import bearer, wms_settings
from tests.wms.helpers import PilotStream, eventually
from tests.wms.requests import minimal_task, workflow_request

ps = pilot_service_pb2
ws = workflow_service_pb2
Phase = taskforce_pb2.PilotPhase
Stub = workflow_service_pb2_grpc.WorkflowServiceStub
Metadata = tuple[tuple[str, str], ...]
Connect = Callable[..., PilotStream]


@pytest.fixture
async def connect(wms: RunningWms, channel: grpc.aio.Channel) -> AsyncIterator[Connect]:
    """Open a pilot stream: ``connect(taskforce_uuid)`` with a pilot token scoped to it, or with
    ``token=``. Every stream is cancelled after the test."""
    streams: list[PilotStream] = []

    def open_stream(taskforce_uuid: str = "", token: str = "") -> PilotStream:
        token = token or wms.authority.mint("pilot", Role.PILOT, 3600, scope=taskforce_uuid)
        stream = PilotStream(channel, token)
        streams.append(stream)
        return stream

    yield open_stream
    for stream in streams:
        stream.call.cancel()


@pytest.fixture
async def created(workflows: Stub, alice: Metadata) -> ws.CreateWorkflowResponse:
    """alice's workflow with two taskforces (at local and osg)."""
    request = workflow_request(minimal_task(cluster_locations=["local", "osg"]))
    return await workflows.CreateWorkflow(request, metadata=alice)  # type: ignore[no-any-return]


@pytest.fixture
def taskforce_uuid(created: ws.CreateWorkflowResponse) -> str:
    return created.taskforces[0].taskforce_uuid


async def pilot_state(wms: RunningWms, taskforce_uuid: str, worker_id: str) -> PilotState:
    return next(p for p in await wms.pilots.pilots(taskforce_uuid) if p.worker_id == worker_id)


async def stored_taskforce(
    workflows: Stub, alice: Metadata, taskforce_uuid: str
) -> taskforce_pb2.Taskforce:
    return await workflows.GetTaskforce(  # type: ignore[no-any-return]
        ws.GetTaskforceRequest(taskforce_uuid=taskforce_uuid), metadata=alice
    )


# --- Hello ----------------------------------------------------------------------------------------


async def test_hello_is_answered_with_welcome(connect: Connect, taskforce_uuid: str) -> None:
    answer = await connect(taskforce_uuid).hello(taskforce_uuid)

    assert answer == ps.PilotServiceConnectResponse(
        welcome=ps.PilotWelcome(taskforce_uuid=taskforce_uuid)
    )


async def test_first_message_other_than_hello_is_invalid_argument(
    connect: Connect, taskforce_uuid: str
) -> None:
    stream = connect(taskforce_uuid)

    await stream.send(status=ps.PilotStatus(phase=Phase.PILOT_PHASE_STARTED))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err)] == ["hello"]


@pytest.mark.parametrize("missing", ["taskforce_uuid", "worker_id"])
async def test_hello_without_a_required_field_names_it(
    connect: Connect, taskforce_uuid: str, missing: str
) -> None:
    stream = connect(taskforce_uuid)
    hello = ps.PilotHello(taskforce_uuid=taskforce_uuid, worker_id="1.0")
    hello.ClearField(missing)  # type: ignore[arg-type]

    await stream.send(hello=hello)

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err) == [(f"hello.{missing}", "required")]


async def test_second_hello_is_invalid_argument(connect: Connect, taskforce_uuid: str) -> None:
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)

    await stream.send(hello=ps.PilotHello(taskforce_uuid=taskforce_uuid, worker_id="1.0"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err)] == ["hello"]


async def test_hello_for_an_unknown_taskforce_is_not_found(connect: Connect) -> None:
    unknown = "TF-0000-0000-00000000"
    stream = connect(unknown)

    await stream.send(hello=ps.PilotHello(taskforce_uuid=unknown, worker_id="1.0"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_pilot_token_of_another_taskforce_is_permission_denied(
    connect: Connect, created: ws.CreateWorkflowResponse
) -> None:
    mine, other = (tf.taskforce_uuid for tf in created.taskforces)
    stream = connect(mine)

    await stream.send(hello=ps.PilotHello(taskforce_uuid=other, worker_id="1.0"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_admin_may_connect_for_any_taskforce(
    wms: RunningWms, connect: Connect, taskforce_uuid: str
) -> None:
    stream = connect(token=wms.authority.mint("root", Role.ADMIN, 3600))

    answer = await stream.hello(taskforce_uuid)

    assert answer.welcome.taskforce_uuid == taskforce_uuid


async def test_task_event_of_unspecified_kind_is_invalid_argument(
    connect: Connect, taskforce_uuid: str
) -> None:
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)

    await stream.send(task_event=ps.TaskLifecycleEvent(event_id="EV-1"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err)] == ["task_event.kind"]


async def test_invalid_events_in_a_batch_are_named_by_their_index(
    wms: RunningWms, connect: Connect, taskforce_uuid: str
) -> None:
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)
    events = [
        ps.TaskLifecycleEvent(event_id="EV-0", kind=ps.TASK_EVENT_KIND_STARTED),
        ps.TaskLifecycleEvent(event_id="EV-0", kind=ps.TASK_EVENT_KIND_FINISHED),
        ps.TaskLifecycleEvent(event_id="EV-1"),  # kind unspecified
        ps.TaskLifecycleEvent(event_id="EV-2", kind=ps.TASK_EVENT_KIND_FAILED),
        ps.TaskLifecycleEvent(event_id="EV-3", kind=ps.TaskEventKind.ValueType(7)),  # unknown
    ]

    await stream.send(task_events=ps.TaskLifecycleEvents(events=events))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err) == [
        ("task_events.events[2].kind", "must be STARTED, FINISHED or FAILED (got 0)"),
        ("task_events.events[4].kind", "must be STARTED, FINISHED or FAILED (got 7)"),
    ]
    assert wms.pilots.recent_task_events(taskforce_uuid) == []  # none of the batch is applied


async def test_an_empty_batch_of_task_events_is_invalid_argument(
    connect: Connect, taskforce_uuid: str
) -> None:
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)

    await stream.send(task_events=ps.TaskLifecycleEvents())

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err) == [("task_events.events", "must not be empty")]


async def test_a_huge_batch_of_invalid_events_is_invalid_argument_listing_the_first(
    connect: Connect, taskforce_uuid: str
) -> None:
    # Every violation listed would take megabytes of trailers: the pilot would see
    # RESOURCE_EXHAUSTED instead of what is wrong.
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)

    events = [ps.TaskLifecycleEvent(event_id=f"EV-{i}") for i in range(50_000)]
    await stream.send(task_events=ps.TaskLifecycleEvents(events=events))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith("invalid request: 50000 problems (the first ")
    listed = field_violations(err)
    assert 0 < len(listed) < 30
    kind_rule = "must be STARTED, FINISHED or FAILED (got 0)"
    assert listed[0] == ("task_events.events[0].kind", kind_rule)


async def test_a_hello_claiming_a_megabyte_long_taskforce_is_still_permission_denied(
    connect: Connect, taskforce_uuid: str
) -> None:
    stream = connect(taskforce_uuid)

    await stream.send(hello=ps.PilotHello(taskforce_uuid="TF-" + "x" * 1_000_000, worker_id="1.0"))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(err.details() or "") <= 512


@pytest.mark.parametrize("name", ["events_received", "tasks_succeeded", "tasks_failed"])
async def test_a_counter_no_pilot_reaches_is_invalid_argument(
    connect: Connect, taskforce_uuid: str, name: str
) -> None:
    # Two pilots at 2**63 - 1 made the taskforce's roll-up overflow: every later write-behind of
    # every pilot failed with it.
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)

    counters = taskforce_pb2.TaskCounters(**{name: 2**63 - 1})
    await stream.send(status=ps.PilotStatus(phase=Phase.PILOT_PHASE_TASKING, counters=counters))

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(err) == [
        (f"status.counters.{name}", f"must be 0 to {MAX_COUNTER} (got {2**63 - 1})")
    ]


async def test_counters_at_their_bound_roll_up_and_are_stored(
    workflows: Stub, alice: Metadata, connect: Connect, taskforce_uuid: str
) -> None:
    for worker in ("1.0", "1.1"):
        stream = connect(taskforce_uuid)
        await stream.hello(taskforce_uuid, worker_id=worker)
        await stream.status(Phase.PILOT_PHASE_TASKING, events_received=MAX_COUNTER)

    async def stored() -> bool:
        tf = await stored_taskforce(workflows, alice, taskforce_uuid)
        return tf.counters.events_received == 2 * MAX_COUNTER

    await eventually(stored, "the summed counters stored")


# --- Status and roll-up ---------------------------------------------------------------------------


async def test_status_is_kept_as_the_pilots_latest_state(
    wms: RunningWms, connect: Connect, taskforce_uuid: str
) -> None:
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid, worker_id="7.0", host="node-7")

    await stream.status(Phase.PILOT_PHASE_STARTED)
    await stream.status(Phase.PILOT_PHASE_TASKING, "boom", events_received=3, tasks_failed=1)

    async def latest() -> bool:
        return (await pilot_state(wms, taskforce_uuid, "7.0")).last_error == "boom"

    await eventually(latest, "the second status is applied")
    pilot = await pilot_state(wms, taskforce_uuid, "7.0")
    assert (pilot.host, pilot.pilot_version, pilot.connected) == ("node-7", "0.1.0", True)
    assert pilot.phase == Phase.PILOT_PHASE_TASKING
    assert (pilot.counters.events_received, pilot.counters.tasks_failed) == (3, 1)


async def test_taskforce_counters_are_the_sum_over_its_pilots(
    connect: Connect, workflows: Stub, alice: Metadata, taskforce_uuid: str
) -> None:
    one, two = connect(taskforce_uuid), connect(taskforce_uuid)
    await one.hello(taskforce_uuid, worker_id="1.0")
    await two.hello(taskforce_uuid, worker_id="1.1")

    await one.status(events_received=5, tasks_succeeded=4, tasks_failed=1, events_published=4)
    await two.status(events_received=2, tasks_succeeded=2, events_published=2)

    want = taskforce_pb2.TaskCounters(
        events_received=7, tasks_succeeded=6, tasks_failed=1, events_published=6
    )

    async def summed() -> bool:
        return (await stored_taskforce(workflows, alice, taskforce_uuid)).counters == want

    await eventually(summed, "GetTaskforce shows the summed counters")


async def test_top_task_errors_count_pilots_by_their_last_error(
    connect: Connect, workflows: Stub, alice: Metadata, taskforce_uuid: str
) -> None:
    one, two, three = (connect(taskforce_uuid) for _ in range(3))
    await one.hello(taskforce_uuid, worker_id="1.0")
    await two.hello(taskforce_uuid, worker_id="1.1")
    await three.hello(taskforce_uuid, worker_id="1.2")

    await one.status(last_error="disk full")
    await one.status(last_error="exit code 1")  # replaces its earlier error
    await two.status(last_error="exit code 1")
    await two.status(last_error="exit code 1")  # the same pilot again: still one
    await three.status(last_error="")  # no error: not counted

    async def counted() -> bool:
        tf = await stored_taskforce(workflows, alice, taskforce_uuid)
        return dict(tf.top_task_errors) == {"exit code 1": 2}

    await eventually(counted, "GetTaskforce shows the errors counted by pilots")


async def test_list_taskforces_shows_the_rolled_up_counters(
    connect: Connect, workflows: Stub, alice: Metadata, created: ws.CreateWorkflowResponse
) -> None:
    uuid = created.taskforces[1].taskforce_uuid
    stream = connect(uuid)
    await stream.hello(uuid)

    await stream.status(events_received=9, last_error="oops")

    async def listed() -> bool:
        resp = await workflows.ListTaskforces(
            ws.ListTaskforcesRequest(workflow_id=created.workflow.workflow_id), metadata=alice
        )
        by_uuid = {tf.taskforce_uuid: tf for tf in resp.taskforces}
        return by_uuid[uuid].counters.events_received == 9 and dict(
            by_uuid[uuid].top_task_errors
        ) == {"oops": 1}

    await eventually(listed, "ListTaskforces shows the roll-up")


async def test_a_flood_of_statuses_makes_few_store_transactions(
    wms: RunningWms, connect: Connect, workflows: Stub, alice: Metadata, taskforce_uuid: str
) -> None:
    n = 1000
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)
    before = wms.pilots.flushes

    for i in range(1, n + 1):
        await stream.status(events_received=i)

    async def all_stored() -> bool:
        tf = await stored_taskforce(workflows, alice, taskforce_uuid)
        return tf.counters.events_received == n

    await eventually(all_stored, "the last status is stored")
    assert wms.pilots.flushes - before <= n // 40


# --- Streams ending ------------------------------------------------------------------------------


async def test_reconnect_replaces_the_previous_stream(
    wms: RunningWms, connect: Connect, taskforce_uuid: str
) -> None:
    first, second = connect(taskforce_uuid), connect(taskforce_uuid)
    await first.hello(taskforce_uuid, worker_id="3.0")

    await second.hello(taskforce_uuid, worker_id="3.0")

    err = await first.failure()
    assert err.code() == grpc.StatusCode.ABORTED
    assert (await pilot_state(wms, taskforce_uuid, "3.0")).connected


async def test_replaced_streams_statuses_are_ignored(
    wms: RunningWms, connect: Connect, taskforce_uuid: str
) -> None:
    first, second = connect(taskforce_uuid), connect(taskforce_uuid)
    await first.hello(taskforce_uuid, worker_id="3.0")
    await second.hello(taskforce_uuid, worker_id="3.0")
    await first.failure()

    await second.status(events_received=2)

    async def applied() -> bool:
        return (await pilot_state(wms, taskforce_uuid, "3.0")).counters.events_received == 2

    await eventually(applied, "the newer stream's status is applied")


async def test_ended_stream_marks_its_pilot_disconnected_with_its_last_phase(
    wms: RunningWms, connect: Connect, taskforce_uuid: str
) -> None:
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)
    await stream.status(Phase.PILOT_PHASE_DONE)

    await stream.call.done_writing()

    assert await stream.ended_cleanly()

    async def disconnected() -> bool:
        return not (await pilot_state(wms, taskforce_uuid, "1.0")).connected

    await eventually(disconnected, "the pilot is disconnected")
    assert (await pilot_state(wms, taskforce_uuid, "1.0")).phase == Phase.PILOT_PHASE_DONE


async def test_cancelled_stream_marks_its_pilot_disconnected(
    wms: RunningWms, connect: Connect, taskforce_uuid: str
) -> None:
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)

    stream.call.cancel()

    async def disconnected() -> bool:
        return not (await pilot_state(wms, taskforce_uuid, "1.0")).connected

    await eventually(disconnected, "the pilot is disconnected")


# --- Restart and shutdown ------------------------------------------------------------------------


@asynccontextmanager
async def running(data_dir: Path) -> AsyncIterator[RunningWms]:
    wms = await start_wms(wms_settings(data_dir))
    try:
        yield wms
    finally:
        await wms.stop(grace=None)


async def test_pilot_state_and_roll_up_survive_a_wms_restart(data_dir: Path) -> None:
    async with running(data_dir) as first, grpc.aio.insecure_channel(first.address) as channel:
        alice = bearer(first.authority.mint("alice", Role.USER, 3600))
        created = await Stub(channel).CreateWorkflow(workflow_request(), metadata=alice)
        uuid = created.taskforces[0].taskforce_uuid
        stream = PilotStream(channel, first.authority.mint("p", Role.PILOT, 3600, scope=uuid))
        await stream.hello(uuid, worker_id="9.0", host="node-9")
        await stream.status(Phase.PILOT_PHASE_TASKING, "segfault", tasks_failed=4)

        async def applied() -> bool:
            return (await pilot_state(first, uuid, "9.0")).counters.tasks_failed == 4

        await eventually(applied, "the status is applied")
        # Stopped with the stream open and the status possibly not yet flushed.

    async with running(data_dir) as second, grpc.aio.insecure_channel(second.address) as channel:
        tf = await stored_taskforce(Stub(channel), alice, uuid)
        pilot = await pilot_state(second, uuid, "9.0")

    assert tf.counters.tasks_failed == 4
    assert dict(tf.top_task_errors) == {"segfault": 1}
    assert (pilot.host, pilot.phase, pilot.last_error) == (
        "node-9",
        Phase.PILOT_PHASE_TASKING,
        "segfault",
    )
    assert not pilot.connected


async def test_wms_shutdown_ends_pilot_streams_as_unavailable(data_dir: Path) -> None:
    wms = await start_wms(wms_settings(data_dir))
    async with grpc.aio.insecure_channel(wms.address) as channel:
        alice = bearer(wms.authority.mint("alice", Role.USER, 3600))
        created = await Stub(channel).CreateWorkflow(workflow_request(), metadata=alice)
        uuid = created.taskforces[0].taskforce_uuid
        stream = PilotStream(channel, wms.authority.mint("p", Role.PILOT, 3600, scope=uuid))
        await stream.hello(uuid)

        await wms.stop()

        err = await stream.failure()

    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (err.details() or "")


# --- Commands ------------------------------------------------------------------------------------


async def test_finish_workflow_drains_connected_pilots(
    connect: Connect, workflows: Stub, alice: Metadata, created: ws.CreateWorkflowResponse
) -> None:
    uuid = created.taskforces[0].taskforce_uuid
    stream = connect(uuid)
    await stream.hello(uuid)

    await workflows.FinishWorkflow(
        ws.FinishWorkflowRequest(workflow_id=created.workflow.workflow_id), metadata=alice
    )

    assert await stream.read() == ps.PilotServiceConnectResponse(
        drain=ps.PilotDrain(reason="workflow finished")
    )


async def test_pilot_connecting_after_finish_is_drained_after_its_welcome(
    connect: Connect, workflows: Stub, alice: Metadata, created: ws.CreateWorkflowResponse
) -> None:
    await workflows.FinishWorkflow(
        ws.FinishWorkflowRequest(workflow_id=created.workflow.workflow_id), metadata=alice
    )
    uuid = created.taskforces[1].taskforce_uuid
    stream = connect(uuid)

    welcome = await stream.hello(uuid)

    assert welcome.WhichOneof("kind") == "welcome"
    assert (await stream.read()).drain.reason == "workflow finished"


async def test_abort_workflow_stops_connected_pilots(
    connect: Connect, workflows: Stub, alice: Metadata, created: ws.CreateWorkflowResponse
) -> None:
    uuid = created.taskforces[0].taskforce_uuid
    stream = connect(uuid)
    await stream.hello(uuid)

    await workflows.AbortWorkflow(
        ws.AbortWorkflowRequest(workflow_id=created.workflow.workflow_id), metadata=alice
    )

    assert await stream.read() == ps.PilotServiceConnectResponse(
        stop=ps.PilotStop(reason="workflow aborted")
    )


async def test_pilot_connecting_after_abort_is_stopped_after_its_welcome(
    connect: Connect, workflows: Stub, alice: Metadata, created: ws.CreateWorkflowResponse
) -> None:
    await workflows.AbortWorkflow(
        ws.AbortWorkflowRequest(workflow_id=created.workflow.workflow_id), metadata=alice
    )
    uuid = created.taskforces[0].taskforce_uuid
    stream = connect(uuid)

    welcome = await stream.hello(uuid)

    assert welcome.WhichOneof("kind") == "welcome"
    assert (await stream.read()).stop.reason == "workflow aborted"


async def test_drain_reaches_every_connected_pilot_of_the_taskforce_only(
    wms: RunningWms, connect: Connect, created: ws.CreateWorkflowResponse
) -> None:
    uuid, other_uuid = (tf.taskforce_uuid for tf in created.taskforces)
    one, two, other = connect(uuid), connect(uuid), connect(other_uuid)
    await one.hello(uuid, worker_id="1.0")
    await two.hello(uuid, worker_id="1.1")
    await other.hello(other_uuid, worker_id="2.0")

    sent = wms.pilots.drain(uuid, "maintenance")

    assert sent == 2
    assert (await one.read()).drain.reason == "maintenance"
    assert (await two.read()).drain.reason == "maintenance"
    assert wms.pilots.command_of(other_uuid) is None


async def test_command_survives_a_wms_restart(data_dir: Path) -> None:
    async with running(data_dir) as first, grpc.aio.insecure_channel(first.address) as channel:
        alice = bearer(first.authority.mint("alice", Role.USER, 3600))
        created = await Stub(channel).CreateWorkflow(workflow_request(), metadata=alice)
        uuid = created.taskforces[0].taskforce_uuid
        first.pilots.stop(uuid, "cluster going down")

    async with running(data_dir) as second, grpc.aio.insecure_channel(second.address) as channel:
        stream = PilotStream(channel, second.authority.mint("p", Role.PILOT, 3600, scope=uuid))
        await stream.hello(uuid)
        command = await stream.read()
        stream.call.cancel()

    assert command.stop.reason == "cluster going down"


# --- Task events and listeners -------------------------------------------------------------------


async def test_recent_task_events_are_kept_per_taskforce_up_to_a_bound(
    wms: RunningWms, connect: Connect, taskforce_uuid: str
) -> None:
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)
    n = RECENT_TASK_EVENTS + 5

    for i in range(n):
        event = ps.TaskLifecycleEvent(event_id=f"EV-{i}", kind=ps.TASK_EVENT_KIND_STARTED)
        await stream.send(task_event=event)

    async def last_arrived() -> bool:
        events = wms.pilots.recent_task_events(taskforce_uuid)
        return bool(events) and events[-1].event.event_id == f"EV-{n - 1}"

    await eventually(last_arrived, "the last task event is kept")
    kept = wms.pilots.recent_task_events(taskforce_uuid)
    assert [r.event.event_id for r in kept] == [f"EV-{i}" for i in range(5, n)]
    assert {r.worker_id for r in kept} == {"1.0"}


def started_and_finished(n: int) -> list[ps.TaskLifecycleEvent]:
    """STARTED then FINISHED of tasks EV-0 .. EV-(n-1), as a pilot reports them."""
    return [
        ps.TaskLifecycleEvent(event_id=f"EV-{i}", kind=kind)
        for i in range(n)
        for kind in (ps.TASK_EVENT_KIND_STARTED, ps.TASK_EVENT_KIND_FINISHED)
    ]


def ids_and_kinds(events: list[ps.TaskLifecycleEvent]) -> list[tuple[str, int]]:
    return [(e.event_id, e.kind) for e in events]


async def test_a_batch_of_task_events_is_kept_and_heard_in_order(
    wms: RunningWms, connect: Connect, taskforce_uuid: str
) -> None:
    heard: list[PilotChange] = []
    stop_listening = wms.pilots.listen(heard.append)
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)
    sent = started_and_finished(5)

    await stream.send(task_events=ps.TaskLifecycleEvents(events=sent))

    async def all_heard() -> bool:
        return sum(c.kind is ChangeKind.TASK_EVENT for c in heard) >= len(sent)

    await eventually(all_heard, "every event of the batch is heard")
    stop_listening()
    changes = [c for c in heard if c.kind is ChangeKind.TASK_EVENT]
    assert ids_and_kinds([c.task_event for c in changes if c.task_event]) == ids_and_kinds(sent)
    assert {c.pilot.worker_id for c in changes} == {"1.0"}
    kept = wms.pilots.recent_task_events(taskforce_uuid)
    assert ids_and_kinds([r.event for r in kept]) == ids_and_kinds(sent)
    assert all(r.event.HasField("timestamp") for r in kept)  # stamped on arrival when missing


async def test_a_batch_of_task_events_leaves_counters_and_roll_up_to_the_status(
    wms: RunningWms, connect: Connect, workflows: Stub, alice: Metadata, taskforce_uuid: str
) -> None:
    stream = connect(taskforce_uuid)
    await stream.hello(taskforce_uuid)
    await stream.status(events_received=3, tasks_succeeded=2, tasks_failed=1, last_error="boom")
    want = taskforce_pb2.TaskCounters(events_received=3, tasks_succeeded=2, tasks_failed=1)

    async def status_stored() -> bool:
        return (await stored_taskforce(workflows, alice, taskforce_uuid)).counters == want

    await eventually(status_stored, "the status is rolled up")
    before = await pilot_state(wms, taskforce_uuid, "1.0")
    flushes = wms.pilots.flushes

    await stream.send(task_events=ps.TaskLifecycleEvents(events=started_and_finished(50)))

    async def batch_kept() -> bool:
        return len(wms.pilots.recent_task_events(taskforce_uuid)) == 100

    await eventually(batch_kept, "the batch is kept")
    after = await pilot_state(wms, taskforce_uuid, "1.0")
    assert (after.counters, after.last_error, after.phase) == (
        before.counters,
        before.last_error,
        before.phase,
    )
    assert after.connected and after.last_seen >= before.last_seen

    async def flushed() -> bool:
        return wms.pilots.flushes > flushes

    await eventually(flushed, "the pilot touched by the batch is written behind")
    tf = await stored_taskforce(workflows, alice, taskforce_uuid)
    assert tf.counters == want
    assert dict(tf.top_task_errors) == {"boom": 1}


async def test_listener_hears_every_pilot_change(
    wms: RunningWms, connect: Connect, created: ws.CreateWorkflowResponse, taskforce_uuid: str
) -> None:
    heard: list[PilotChange] = []
    stop_listening = wms.pilots.listen(heard.append)
    stream = connect(taskforce_uuid)

    await stream.hello(taskforce_uuid)
    await stream.status(Phase.PILOT_PHASE_TASKING)
    await stream.send(
        task_event=ps.TaskLifecycleEvent(event_id="EV-1", kind=ps.TASK_EVENT_KIND_FINISHED)
    )
    await stream.call.done_writing()
    assert await stream.ended_cleanly()

    async def all_heard() -> bool:
        return len(heard) >= 4

    await eventually(all_heard, "four changes are heard")
    stop_listening()
    assert [c.kind for c in heard] == [
        ChangeKind.CONNECTED,
        ChangeKind.STATUS,
        ChangeKind.TASK_EVENT,
        ChangeKind.DISCONNECTED,
    ]
    assert {c.workflow_id for c in heard} == {created.workflow.workflow_id}
    assert heard[1].pilot.phase == Phase.PILOT_PHASE_TASKING
    assert heard[2].task_event is not None and heard[2].task_event.event_id == "EV-1"


# --- Health --------------------------------------------------------------------------------------


async def test_health_reports_the_pilot_service_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    resp = await health.Check(health_pb2.HealthCheckRequest(service="ewms.v1.PilotService"))

    assert resp.status == health_pb2.HealthCheckResponse.SERVING
