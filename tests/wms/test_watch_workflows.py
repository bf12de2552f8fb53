"""WorkflowService.WatchWorkflows on a real WMS: the caller's workflows (admins: everyone's), newest
first, each with its progress; a snapshot, then what appeared, changed or left, at most one message
per second; broker counters read only for workflows that changed. Also its REST form (Server-Sent
Events) and its place in the OpenAPI document."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import pytest

from ewms.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    queue_pb2,
    taskforce_pb2,
    workflow_pb2,
    workflow_service_pb2,
)
from services.auth import Role
from services.errors import field_violations
from services.wms.control import overview
from services.wms.control import tms as tms_control
from services.wms.store import Tx
from tests.conftest import RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL, bearer, require_rabbitmq
from tests.wms.helpers import TIMEOUT, Env, Metadata, StartEnv, eventually, launched, task
from tests.wms.http.test_gateway_sse import next_event
from tests.wms.requests import workflow_request

ws = workflow_service_pb2
es = event_service_pb2
State = ws.WorkflowState
Pilot = taskforce_pb2.PilotPhase
Phase = taskforce_pb2.TaskforcePhase
# A window in which a message, if one were coming, would have come.
QUIET = 2.5 * overview.INTERVAL


class Overview:
    """A WatchWorkflows stream read in the background, and the view its messages add up to."""

    def __init__(self, env: Env, md: Metadata, **request: Any) -> None:
        self.call = env.workflows.WatchWorkflows(ws.WatchWorkflowsRequest(**request), metadata=md)
        env.streams.append(self)  # cancelled after the test
        self.messages: list[ws.WatchWorkflowsResponse] = []
        self.arrived: list[float] = []  # monotonic arrival time of each message
        # The workflows shown, by id, in the order they were first sent.
        self.view: dict[str, ws.WorkflowSummary] = {}
        self.error: BaseException | None = None
        self._news = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.call:
                self.arrived.append(time.monotonic())
                self.messages.append(msg)
                if msg.snapshot:
                    self.view.clear()
                else:
                    assert self.messages[0].snapshot, "the first message is not the snapshot"
                for removed in msg.removed_workflow_ids:
                    del self.view[removed]
                for summary in msg.workflows:
                    if not msg.snapshot:
                        # A workflow is sent again only if its summary changed.
                        assert summary != self.view.get(summary.workflow.workflow_id), summary
                    self.view[summary.workflow.workflow_id] = summary
                self._news.set()
        except BaseException as exc:
            self.error = exc
            self._news.set()

    async def until(self, check: Callable[[Overview], bool], what: str) -> None:
        """Wait until the view satisfies ``check``."""
        deadline = time.monotonic() + TIMEOUT
        while not check(self):
            if self.error is not None:
                raise AssertionError(f"the watch ended: {self.error!r}") from self.error
            self._news.clear()
            try:
                await asyncio.wait_for(self._news.wait(), deadline - time.monotonic())
            except TimeoutError:
                pytest.fail(f"not watched within {TIMEOUT} s: {what}; view: {self.view}")

    async def snapshot(self) -> ws.WatchWorkflowsResponse:
        await self.until(lambda o: bool(o.messages), "the snapshot")
        first = self.messages[0]
        assert first.snapshot
        return first

    def ids(self) -> list[str]:
        return list(self.view)

    def progress(self, workflow_id: str) -> ws.WorkflowProgress:
        return self.view[workflow_id].progress

    async def quiet(self, what: str) -> None:
        """Assert that no message arrives within QUIET seconds."""
        n = len(self.messages)
        await asyncio.sleep(QUIET)
        assert self.messages[n:] == [], f"sent though {what}"


def admin_of(env: Env) -> Metadata:
    return bearer(env.wms.authority.mint("root", Role.ADMIN, 3600))


def bob_of(env: Env) -> Metadata:
    return bearer(env.wms.authority.mint("bob", Role.USER, 3600))


async def create_as(env: Env, md: Metadata, *tasks: dict[str, Any]) -> str:
    resp = await env.workflows.CreateWorkflow(workflow_request(*tasks), metadata=md)
    return str(resp.workflow.workflow_id)


async def create(env: Env, n: int) -> list[str]:
    """n workflows of alice, oldest first."""
    return [(await env.create()).workflow.workflow_id for _ in range(n)]


async def publish(env: Env, queue_id: str, n: int, md: Metadata | None = None) -> None:
    await event_service_pb2_grpc.EventServiceStub(env.channel).Publish(
        es.PublishRequest(
            queue_id=queue_id, events=[queue_pb2.Event(payload=b"{}") for _ in range(n)]
        ),
        metadata=md or env.alice,
    )


def queue_of(resp: ws.CreateWorkflowResponse, alias: str) -> queue_pb2.Queue:
    return next(q for q in resp.queues if q.alias == alias)


# --- Who sees what --------------------------------------------------------------------------------


async def test_the_snapshot_lists_only_the_callers_workflows_newest_first(env: Env) -> None:
    alices = await create(env, 2)
    bob = bob_of(env)
    bobs = [await create_as(env, bob, task())]

    alice_sees = await Overview(env, env.alice).snapshot()
    bob_sees = await Overview(env, bob).snapshot()

    assert [s.workflow.workflow_id for s in alice_sees.workflows] == alices[::-1]
    assert [s.workflow.workflow_id for s in bob_sees.workflows] == bobs
    assert list(alice_sees.removed_workflow_ids) == []


async def test_an_admin_sees_everyones_workflows_or_one_owners(env: Env) -> None:
    [alices] = await create(env, 1)
    bobs = await create_as(env, bob_of(env), task())
    admin = admin_of(env)

    everyone = await Overview(env, admin).snapshot()
    only_bob = await Overview(env, admin, owner="bob").snapshot()

    assert [s.workflow.workflow_id for s in everyone.workflows] == [bobs, alices]
    assert [s.workflow.workflow_id for s in only_bob.workflows] == [bobs]


async def test_a_user_asking_for_another_owner_is_permission_denied(env: Env) -> None:
    await create(env, 1)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Overview(env, env.alice, owner="bob").call.read()
    own = await Overview(env, env.alice, owner="alice").snapshot()

    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(own.workflows) == 1


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": 1001}, "page_size"),
        ({"page_size": -1}, "page_size"),
        ({"state": 99}, "state"),
        ({"owner": "x" * 257}, "owner"),
    ],
)
async def test_a_bad_request_is_invalid_argument_naming_the_field(
    env: Env, request_fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await Overview(env, admin_of(env), **request_fields).call.read()

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == [field]


# --- Filters and the page -------------------------------------------------------------------------


async def test_a_state_filter_shows_only_workflows_in_that_state(env: Env) -> None:
    aborted, active = await create(env, 2)
    await env.deactivate("abort", aborted)

    active_view = await Overview(env, env.alice, state=State.WORKFLOW_STATE_ACTIVE).snapshot()
    aborted_view = await Overview(env, env.alice, state=State.WORKFLOW_STATE_ABORTED).snapshot()
    finished_view = await Overview(env, env.alice, state=State.WORKFLOW_STATE_FINISHED).snapshot()

    assert [s.workflow.workflow_id for s in active_view.workflows] == [active]
    assert [s.workflow.workflow_id for s in aborted_view.workflows] == [aborted]
    assert list(finished_view.workflows) == []


async def test_a_new_workflow_appears_live(env: Env) -> None:
    [old] = await create(env, 1)
    watch = Overview(env, env.alice)
    await watch.snapshot()

    [new] = await create(env, 1)

    await watch.until(lambda o: new in o.view, "the new workflow")
    assert watch.ids() == [old, new]  # (the view appends what is sent later)
    [msg] = watch.messages[1:]
    assert not msg.snapshot
    assert [s.workflow.workflow_id for s in msg.workflows] == [new]
    progress = watch.progress(new)
    assert progress == ws.WorkflowProgress(taskforces_active=1)


async def test_creating_a_workflow_tells_the_watchers_itself(env: Env) -> None:
    # Without launch control, whose changes to the new taskforces would also be heard.
    await env.wms.dispatcher.close()
    watch = Overview(env, env.alice)
    await watch.snapshot()

    [new] = await create(env, 1)

    await watch.until(lambda o: new in o.view, "the new workflow")


async def test_an_aborted_workflow_leaves_an_active_filter_and_changes_state_in_a_plain_watch(
    env: Env,
) -> None:
    [wid] = await create(env, 1)
    await launched(env.workflows, env.alice, wid)
    active = Overview(env, env.alice, state=State.WORKFLOW_STATE_ACTIVE)
    plain = Overview(env, env.alice)
    assert [s.workflow.workflow_id for s in (await active.snapshot()).workflows] == [wid]
    await plain.snapshot()

    await env.deactivate("abort", wid)

    await active.until(lambda o: wid not in o.view, "the aborted workflow removed")
    assert [list(m.removed_workflow_ids) for m in active.messages[1:]] == [[wid]]
    await plain.until(
        lambda o: o.view[wid].workflow.deactivated == workflow_pb2.DEACTIVATION_ABORTED,
        "the workflow aborted",
    )
    # Its never-started taskforce was cancelled with it.
    assert plain.progress(wid).taskforces_active == 0


async def test_newer_workflows_push_older_ones_out_of_the_page(env: Env) -> None:
    oldest, middle = await create(env, 2)
    watch = Overview(env, env.alice, page_size=2)
    await watch.snapshot()
    assert watch.ids() == [middle, oldest]

    [newest] = await create(env, 1)

    await watch.until(lambda o: newest in o.view, "the newest workflow")
    assert set(watch.ids()) == {newest, middle}
    [msg] = watch.messages[1:]
    assert list(msg.removed_workflow_ids) == [oldest]


# --- Progress -------------------------------------------------------------------------------------


async def test_progress_follows_publishes_deliveries_and_pilot_reports(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compound statuses reach the store long after this test: the summary uses the live ones.
    monkeypatch.setattr(tms_control, "FLUSH_INTERVAL", 3600.0)
    created = await env.create(task(max_attempts=3))
    wid = created.workflow.workflow_id
    [tf] = await launched(env.workflows, env.alice, wid)
    stream = env.tms()
    await stream.hello()
    start = await stream.start()
    await stream.submitted(start, 7)
    watch = Overview(env, env.alice)
    await watch.snapshot()
    inq, outq = queue_of(created, "in").queue_id, queue_of(created, "out").queue_id

    # Only the tasks' input queues count: events in "out" are not the workflow's inputs.
    await publish(env, outq, 2)
    await publish(env, inq, 4)
    await watch.until(lambda o: o.progress(wid).ready == 4, "4 events ready")
    assert watch.progress(wid) == ws.WorkflowProgress(published=4, ready=4, taskforces_active=1)

    # A worker takes three: one succeeds, one is dead-lettered, one is still running; its pilot
    # reports one task done and one failed.
    events = event_service_pb2_grpc.EventServiceStub(env.channel)
    got = await events.Receive(es.ReceiveRequest(queue_id=inq, max_events=3), metadata=env.alice)
    done, dead, _running = got.deliveries
    await events.Ack(es.AckRequest(queue_id=inq, ack_ids=[done.ack_id]), metadata=env.alice)
    await events.Nack(
        es.NackRequest(queue_id=inq, ack_id=dead.ack_id, error="boom", dead_letter=True),
        metadata=env.alice,
    )
    pilot = env.pilot(start.pilot_token)
    await pilot.hello(tf.taskforce_uuid, worker_id="7.0")
    await pilot.status(
        Pilot.PILOT_PHASE_TASKING, events_received=3, tasks_succeeded=1, tasks_failed=1
    )

    expected = ws.WorkflowProgress(
        published=4,
        done=1,
        failed=1,
        dead_lettered=1,
        in_flight=1,
        ready=1,
        workers_tasking=1,
        taskforces_active=1,
    )
    await watch.until(lambda o: o.progress(wid) == expected, f"progress {expected}")


async def test_many_changes_within_a_second_are_sent_once_in_their_latest_state(env: Env) -> None:
    [tf] = await env.created_and_launched(task())
    stream = env.tms()
    await stream.hello()
    start = await stream.start()
    await stream.submitted(start, 3)
    pilot = env.pilot(start.pilot_token)
    await pilot.hello(tf.taskforce_uuid, worker_id="3.0")
    await pilot.status(Pilot.PILOT_PHASE_TASKING)
    watch = Overview(env, env.alice)
    await watch.snapshot()
    await watch.until(lambda o: o.progress(tf.workflow_id).workers_tasking == 1, "tasking")
    n = len(watch.messages)

    began = time.monotonic()
    for failed in range(1, 31):
        await pilot.status(Pilot.PILOT_PHASE_TASKING, tasks_failed=failed)
    took = time.monotonic() - began

    await watch.until(lambda o: o.progress(tf.workflow_id).failed == 30, "30 failures")
    later = watch.messages[n:]
    # One message per second at most: 30 changes sent in ``took`` seconds make at most
    # ceil(took) + 1 messages, the last of which carries the latest count.
    assert len(later) <= math.ceil(took / overview.INTERVAL) + 1, [
        m.workflows[0].progress.failed for m in later
    ]
    assert later[-1].workflows[0].progress.failed == 30
    gaps = [b - a for a, b in zip(watch.arrived, watch.arrived[1:], strict=False)]
    assert min(gaps) > overview.INTERVAL - 0.1


async def test_a_change_that_leaves_the_summary_as_it_was_sends_nothing(env: Env) -> None:
    created = await env.create(task())
    wid = created.workflow.workflow_id
    [tf] = await launched(env.workflows, env.alice, wid)
    watch = Overview(env, env.alice)
    await watch.snapshot()
    stream = env.tms()
    await stream.hello()

    # The TMS confirms the taskforce's submission: a change, but not of the workflow's summary.
    await stream.submitted(await stream.start(), 9)
    await env.phase(tf.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT)
    await watch.quiet("the summary did not change")

    # (The watch is alive: a change of the summary is sent.)
    await publish(env, queue_of(created, "in").queue_id, 1)
    await watch.until(lambda o: o.progress(wid).published == 1, "the publish")


async def test_queue_counters_are_read_only_for_the_workflow_that_changed_and_once_for_all_watchers(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = [await env.create() for _ in range(3)]
    queues = [queue_of(c, "in") for c in created]
    broker = env.wms.queues.broker(queues[0])
    reads: list[str] = []
    real_stats = broker.stats

    async def counted(queue: queue_pb2.Queue) -> queue_pb2.QueueStats:
        reads.append(queue.queue_id)
        return await real_stats(queue)

    monkeypatch.setattr(broker, "stats", counted)
    first = Overview(env, env.alice)
    await first.snapshot()
    second = Overview(env, env.alice)
    await second.snapshot()

    # The second snapshot needs counters read after it began: read again if the first's read is a
    # second old, else it shows the first's read and refreshes it once a second has passed.
    async def read_twice() -> bool:
        return all(reads.count(q.queue_id) >= 2 for q in queues)

    await eventually(read_twice, "every input queue read for both snapshots")
    assert {q: reads.count(q) for q in set(reads)} == {q.queue_id: 2 for q in queues}
    reads.clear()

    await publish(env, queues[1].queue_id, 1)

    changed = created[1].workflow.workflow_id
    for watch in (first, second):
        await watch.until(lambda o: o.progress(changed).published == 1, "the publish")
    assert reads == [queues[1].queue_id]


async def test_a_client_that_leaves_stops_the_servers_watch(env: Env) -> None:
    listeners = env.wms.hub._any_change  # the hub's listeners: one per WatchWorkflows stream
    watch = Overview(env, env.alice)
    await watch.snapshot()
    assert len(listeners) == 1

    watch.call.cancel()

    async def left() -> bool:
        return not listeners

    await eventually(left, "the watch's listener removed")


# --- Bounds ---------------------------------------------------------------------------------------


async def test_a_watchers_notes_of_changes_stay_within_twice_its_page_size() -> None:
    watcher = overview._Watcher(overview.Selection(None, 0, page_size=3))
    watcher.sent = {wid: b"" for wid in ("a", "b", "c")}

    # Not shown, while no message is being made: only "something outside changed".
    for i in range(1000):
        watcher.changed(f"other-{i}")
    assert (watcher.dirty, watcher.outside) == ({}, True)

    # While a message is being made, every change is noted, up to twice the page size; then the
    # watcher gives up noting and re-reads everything it shows.
    watcher.busy = True
    for i in range(1000):
        watcher.changed(f"new-{i}")
    watcher.changed("a")
    assert len(watcher.dirty) == 6
    assert watcher.everything_since is not None


async def test_queue_reads_are_kept_only_for_two_intervals(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(overview, "INTERVAL", 0.05)
    queues = [queue_of(await env.create(), "in") for _ in range(3)]
    reads = overview._QueueReads(env.wms.queues)
    for q in queues:
        await reads.read(q.workflow_id, [q], since=time.monotonic())
    assert len(reads) == 3

    await asyncio.sleep(3 * overview.INTERVAL)
    counters, _ = await reads.read(queues[0].workflow_id, [queues[0]], since=time.monotonic())

    assert len(reads) == 1
    assert counters[queues[0].queue_id].published == 0


# --- RabbitMQ -------------------------------------------------------------------------------------


@pytest.fixture
async def rabbit_env(start_env: StartEnv) -> AsyncIterator[Env]:
    require_rabbitmq()
    env = await start_env(
        queue_backend="rabbitmq",
        rabbitmq_url=RABBITMQ_URL,
        rabbitmq_management_url=RABBITMQ_MANAGEMENT_URL,
    )
    yield env

    def workflow_ids(tx: Tx) -> list[str]:
        return [row[0] for row in tx.sql.execute("SELECT workflow_id FROM workflows")]

    for workflow_id in await env.wms.store.run(workflow_ids, write=False):
        await env.wms.queues.delete_now(workflow_id)  # the test's RabbitMQ queues and user


async def test_progress_on_rabbitmq_counts_ready_events(rabbit_env: Env) -> None:
    env = rabbit_env
    created = await env.create()
    wid = created.workflow.workflow_id
    watch = Overview(env, env.alice)
    await watch.snapshot()

    await publish(env, queue_of(created, "in").queue_id, 3)

    # ready is exact on RabbitMQ (published lags by its management API's sampling).
    await watch.until(lambda o: o.progress(wid).ready == 3, "3 events ready")


# --- REST -----------------------------------------------------------------------------------------


async def test_rest_serves_the_watch_as_server_sent_events(env: Env) -> None:
    aborted, active = await create(env, 2)
    await env.deactivate("abort", aborted)
    token = env.wms.authority.mint("alice", Role.USER, 3600)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(base_url=env.wms.http_url) as http:
        path = "/v1/workflows:watch?state=WORKFLOW_STATE_ACTIVE&page_size=10"
        async with http.get(path, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.content_type == "text/event-stream"
            first = await next_event(resp)
            assert first is not None and first.name == "message"
            assert first.data["snapshot"] is True
            [summary] = first.data["workflows"]
            assert summary["workflow"]["workflow_id"] == active
            assert summary["progress"]["taskforces_active"] == 1

            await env.deactivate("finish", active)

            change = await next_event(resp)
            assert change is not None and change.name == "message"
            assert change.data["removed_workflow_ids"] == [active]

        async with http.get("/v1/workflows:watch?page_size=5000", headers=headers) as bad:
            assert bad.status == 400
            body = await bad.json()
            [violation] = body["details"][0]["field_violations"]
            assert violation["field"] == "page_size"


async def test_the_openapi_document_lists_the_route_as_a_server_sent_event_stream(
    env: Env,
) -> None:
    async with (
        aiohttp.ClientSession(base_url=env.wms.http_url) as http,
        http.get("/v1/openapi.json") as resp,
    ):
        document = await resp.json()

    operation = document["paths"]["/v1/workflows:watch"]["get"]
    stream = operation["responses"]["200"]["content"]["text/event-stream"]
    assert stream["x-sse-data"] == {"$ref": "#/components/schemas/ewms.v1.WatchWorkflowsResponse"}
    assert {p["name"] for p in operation["parameters"]} >= {"state", "owner", "page_size"}
