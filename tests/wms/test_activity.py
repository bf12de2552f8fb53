"""The task activity window (services/wms/control/activity.py) and WatchWorkflow's
include_task_activity: on a real WMS, pilots stream task lifecycle events and a watcher gets the
recent task runs, throughput and task errors, first as a snapshot, then as coalesced changes at
most every ACTIVITY_MIN_GAP seconds; over REST as Server-Sent Events. Unit-level: the window stays
within its bounds, and its memory within the bytes the module states."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import grpc
import pytest

from ewms.v1 import pilot_service_pb2, taskforce_pb2, workflow_service_pb2
from services.auth import Role
from services.config import (
    DEFAULT_ACTIVITY_MAX_TASK_RUNS,
    DEFAULT_ACTIVITY_MAX_WORKFLOWS,
    ConfigError,
    WmsSettings,
)
from services.wms.control import activity as activity_module
from services.wms.control import watch as watch_module
from services.wms.control.activity import (
    BUCKET_SECONDS,
    MAX_BUCKETS,
    MAX_ERROR_BYTES,
    MAX_LATENESS_SECONDS,
    MAX_SUMMARY_CHARS,
    MAX_TASK_ERRORS,
    RUN_BYTES,
    WINDOW_BYTES,
    TaskActivity,
)
from services.wms.limits import ID_CHARS
from tests.conftest import bearer
from tests.wms.helpers import TIMEOUT, Env, PilotStream, StartEnv, eventually
from tests.wms.http.test_gateway_sse import next_event

ps = pilot_service_pb2
ws = workflow_service_pb2
Outcome = ws.TaskRunOutcome
RUNNING = Outcome.TASK_RUN_OUTCOME_RUNNING
SUCCEEDED = Outcome.TASK_RUN_OUTCOME_SUCCEEDED
FAILED = Outcome.TASK_RUN_OUTCOME_FAILED
ACTIVITY_FIELDS = ("task_runs", "throughput", "task_errors")
ERROR = "ContainerRunError: task exited with code 3\nstderr (last 2 lines):\n  loading\n  boom"


# --- lifecycle events ---


def _event(event_id: str, kind: int, at: float, **fields: Any) -> ps.TaskLifecycleEvent:
    event = ps.TaskLifecycleEvent(event_id=event_id, kind=kind, **fields)  # type: ignore[arg-type]
    event.timestamp.FromMicroseconds(round(at * 1e6))
    return event


def started(event_id: str, at: float) -> ps.TaskLifecycleEvent:
    return _event(event_id, ps.TASK_EVENT_KIND_STARTED, at)


def finished(event_id: str, at: float, wall: float = 1.5) -> ps.TaskLifecycleEvent:
    metrics = ps.TaskMetrics(wall_seconds=wall, cpu_seconds=1.25, max_rss_bytes=2**20)
    return _event(event_id, ps.TASK_EVENT_KIND_FINISHED, at, metrics=metrics)


def failed(
    event_id: str, at: float, error: str = ERROR, exit_code: int = 3
) -> ps.TaskLifecycleEvent:
    metrics = ps.TaskMetrics(wall_seconds=0.5, exit_code=exit_code)
    return _event(event_id, ps.TASK_EVENT_KIND_FAILED, at, metrics=metrics, error=error)


def seconds(ts: Any) -> float:
    return float(ts.ToMicroseconds()) / 1e6


# --- a workflow with pilots, and a watch of its activity ---


class Pilots:
    """alice's workflow and pilots of its taskforce, driven by the test."""

    def __init__(self, env: Env, workflow_id: str, taskforce_uuid: str) -> None:
        self.env = env
        self.workflow_id = workflow_id
        self.taskforce_uuid = taskforce_uuid
        self.streams: dict[str, PilotStream] = {}

    @classmethod
    async def of_new_workflow(cls, env: Env) -> Pilots:
        resp = await env.create()
        return cls(env, resp.workflow.workflow_id, resp.taskforces[0].taskforce_uuid)

    async def send(self, worker_id: str, *events: ps.TaskLifecycleEvent) -> None:
        """Send ``events`` in one batch from the worker's pilot (connected on first use)."""
        stream = self.streams.get(worker_id)
        if stream is None:
            token = self.env.wms.authority.mint(
                "pilot", Role.PILOT, 3600, scope=self.taskforce_uuid
            )
            stream = self.streams[worker_id] = self.env.pilot(token)
            await stream.hello(self.taskforce_uuid, worker_id=worker_id)
        await stream.send(task_events=ps.TaskLifecycleEvents(events=events))

    async def recorded(self, n_runs: int) -> None:
        """Wait until the WMS's window holds ``n_runs`` runs of the workflow."""
        activity = self.env.wms.hub.activity
        assert activity is not None

        async def holds() -> bool:
            return activity.counts(self.workflow_id)[0] == n_runs

        await eventually(holds, f"{n_runs} task runs in the window")


Key = tuple[str, str, str]


def key(run: ws.TaskRun) -> Key:
    return (run.taskforce_uuid, run.worker_id, run.event_id)


class ActivityWatch:
    """A WatchWorkflow stream with include_task_activity, and the view its messages add up to."""

    def __init__(self, env: Env, workflow_id: str, md: Any = None, *, activity: bool = True):
        self.call = env.workflows.WatchWorkflow(
            ws.WatchWorkflowRequest(workflow_id=workflow_id, include_task_activity=activity),
            metadata=md if md is not None else env.alice,
        )
        env.streams.append(self)
        self.messages: list[ws.WatchWorkflowResponse] = []
        self.runs: dict[Key, ws.TaskRun] = {}
        self.buckets: dict[float, ws.ThroughputBucket] = {}
        self.errors: dict[str, ws.TaskErrorExample] = {}
        self.taskforces: dict[str, taskforce_pb2.Taskforce] = {}

    async def read(self) -> ws.WatchWorkflowResponse:
        msg = await asyncio.wait_for(self.call.read(), TIMEOUT)
        assert msg is not grpc.aio.EOF, "the WMS ended the watch"
        self.messages.append(msg)
        for run in msg.task_runs:
            self.runs[key(run)] = run
        for bucket in msg.throughput:
            self.buckets[seconds(bucket.start)] = bucket
        for error in msg.task_errors:
            self.errors[error.summary] = error
        for tf in msg.taskforces:
            self.taskforces[tf.taskforce_uuid] = tf
        return msg  # type: ignore[no-any-return]

    async def until(self, check: Callable[[ActivityWatch], bool], what: str) -> None:
        async def read_until() -> None:
            while not check(self):
                await self.read()

        try:
            await asyncio.wait_for(read_until(), TIMEOUT)
        except TimeoutError:
            pytest.fail(f"not watched within {TIMEOUT} s: {what}")

    async def rest(self) -> grpc.StatusCode:
        """Read to the end of the stream; how it ended."""
        while (msg := await asyncio.wait_for(self.call.read(), TIMEOUT)) is not grpc.aio.EOF:
            self.messages.append(msg)
            for run in msg.task_runs:
                self.runs[key(run)] = run
        return await self.call.code()  # type: ignore[no-any-return]


# --- The snapshot ---------------------------------------------------------------------------------


async def test_snapshot_carries_the_window_oldest_first_with_throughput_errors_and_bounds(
    env: Env,
) -> None:
    pilots = await Pilots.of_new_workflow(env)
    tf = pilots.taskforce_uuid
    t = time.time() - 60
    await pilots.send("1.0", started("EV-a", t), started("EV-b", t + 1), finished("EV-a", t + 2))
    # An end whose start the WMS never saw.
    await pilots.send("2.0", failed("EV-c", t + 3))
    await pilots.recorded(3)

    first = await ActivityWatch(env, pilots.workflow_id).read()

    assert first.snapshot
    assert [(key(r), r.outcome) for r in first.task_runs] == [
        ((tf, "1.0", "EV-a"), SUCCEEDED),
        ((tf, "1.0", "EV-b"), RUNNING),
        ((tf, "2.0", "EV-c"), FAILED),
    ]
    a, b, c = first.task_runs
    assert (seconds(a.started), seconds(a.ended)) == pytest.approx((t, t + 2))
    assert a.metrics == ps.TaskMetrics(wall_seconds=1.5, cpu_seconds=1.25, max_rss_bytes=2**20)
    assert b.HasField("started") and not b.HasField("ended") and not b.HasField("metrics")
    assert not c.HasField("started") and seconds(c.ended) == pytest.approx(t + 3)
    assert c.error_summary == "ContainerRunError: task exited with code 3"
    expected = Counter[tuple[float, str]]()
    expected[(float(int((t + 2) // BUCKET_SECONDS) * BUCKET_SECONDS), "ok")] += 1
    expected[(float(int((t + 3) // BUCKET_SECONDS) * BUCKET_SECONDS), "failed")] += 1
    got = Counter[tuple[float, str]]()
    for bucket in first.throughput:
        assert bucket.seconds == BUCKET_SECONDS
        got[(seconds(bucket.start), "ok")] += bucket.succeeded
        got[(seconds(bucket.start), "failed")] += bucket.failed
    assert +got == expected
    assert [e.summary for e in first.task_errors] == [c.error_summary]
    assert first.activity_window == ws.TaskActivityWindow(
        max_task_runs=5000,
        bucket_seconds=BUCKET_SECONDS,
        max_buckets=MAX_BUCKETS,
        max_task_errors=MAX_TASK_ERRORS,
    )


async def test_a_watch_without_the_flag_carries_no_activity(env: Env) -> None:
    pilots = await Pilots.of_new_workflow(env)
    await pilots.send("1.0", started("EV-a", time.time()))
    await pilots.recorded(1)
    watch = ActivityWatch(env, pilots.workflow_id, activity=False)
    first = await watch.read()

    await pilots.send("1.0", finished("EV-a", time.time()), started("EV-b", time.time()))
    await pilots.recorded(2)
    # A state change to watch: the pilot's status moves its taskforce's compound statuses.
    await pilots.streams["1.0"].status(taskforce_pb2.PILOT_PHASE_TASKING, events_received=2)
    await watch.until(
        lambda w: any(
            s.pilot_phase == taskforce_pb2.PILOT_PHASE_TASKING
            for tf in w.taskforces.values()
            for s in tf.compound_statuses
        ),
        "the pilot's status",
    )

    assert first.snapshot and not first.HasField("activity_window")
    for msg in watch.messages:
        assert not any(getattr(msg, f) for f in ACTIVITY_FIELDS), msg


async def test_watching_another_users_workflow_with_activity_is_not_found(env: Env) -> None:
    pilots = await Pilots.of_new_workflow(env)
    await pilots.send("1.0", started("EV-a", time.time()))
    bob = bearer(env.wms.authority.mint("bob", Role.USER, 3600))

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ActivityWatch(env, pilots.workflow_id, bob).read()

    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- Changes --------------------------------------------------------------------------------------


async def test_a_run_is_sent_when_it_starts_and_again_when_it_ends(env: Env) -> None:
    pilots = await Pilots.of_new_workflow(env)
    watch = ActivityWatch(env, pilots.workflow_id)
    await watch.read()
    run = (pilots.taskforce_uuid, "1.0", "EV-a")

    await pilots.send("1.0", started("EV-a", time.time()))
    await watch.until(lambda w: run in w.runs, "the run started")
    assert watch.runs[run].outcome == RUNNING

    await pilots.send("1.0", finished("EV-a", time.time()))
    await watch.until(lambda w: w.runs[run].outcome == SUCCEEDED, "the run ended")
    assert watch.runs[run].metrics.wall_seconds == 1.5
    assert sum(b.succeeded for b in watch.buckets.values()) == 1


async def test_a_run_that_starts_and_ends_between_two_messages_is_sent_once_ended(
    env: Env,
) -> None:
    pilots = await Pilots.of_new_workflow(env)
    watch = ActivityWatch(env, pilots.workflow_id)
    await watch.read()
    now = time.time()

    await pilots.send("1.0", started("EV-a", now), failed("EV-a", now + 0.5))

    await watch.until(lambda w: bool(w.runs), "the run")
    [msg] = [m for m in watch.messages if m.task_runs]
    [run] = msg.task_runs
    assert (run.event_id, run.outcome) == ("EV-a", FAILED)
    assert seconds(run.started) == pytest.approx(now)
    # Its bucket and its error come with it.
    assert sum(b.failed for b in msg.throughput) == 1
    assert [e.summary for e in msg.task_errors] == [run.error_summary]


async def test_activity_is_sent_at_most_every_activity_min_gap(env: Env) -> None:
    pilots = await Pilots.of_new_workflow(env)
    watch = ActivityWatch(env, pilots.workflow_id)
    await watch.read()
    n = 40

    began = time.monotonic()
    for i in range(n):
        await pilots.send("1.0", started(f"EV-{i}", time.time()), finished(f"EV-{i}", time.time()))
        await asyncio.sleep(0.01)
    await watch.until(lambda w: len(w.runs) == n, "every run")
    elapsed = time.monotonic() - began

    with_activity = [m for m in watch.messages[1:] if m.task_runs]
    assert len(with_activity) <= elapsed / watch_module.ACTIVITY_MIN_GAP + 1
    # Coalesced: each run once, ended (its start never went out on its own).
    assert all(r.outcome == SUCCEEDED for m in with_activity for r in m.task_runs)
    assert sum(len(m.task_runs) for m in with_activity) == n


async def test_task_errors_carry_the_count_and_the_latest_failing_run_with_exit_code_and_stderr(
    env: Env,
) -> None:
    pilots = await Pilots.of_new_workflow(env)
    watch = ActivityWatch(env, pilots.workflow_id)
    await watch.read()
    now = time.time()
    summary = "ContainerRunError: task exited with code 3"

    await pilots.send("1.0", failed("EV-a", now, exit_code=3))
    await pilots.send("2.0", failed("EV-b", now + 1, ERROR.replace("boom", "bang"), exit_code=4))
    await pilots.send("2.0", failed("EV-c", now + 2, "OutputTooLargeError: out.json\nmore"))

    await watch.until(lambda w: w.errors.get(summary, ws.TaskErrorExample()).count == 2, "2 same")
    await watch.until(lambda w: len(w.errors) == 2, "both errors")
    error = watch.errors[summary]
    assert (error.latest.worker_id, error.latest.event_id) == ("2.0", "EV-b")
    assert error.latest.metrics.exit_code == 4
    assert error.error == ERROR.replace("boom", "bang")
    assert error.error.endswith("  bang")  # the stderr tail
    assert watch.errors["OutputTooLargeError: out.json"].count == 1
    # The snapshot of a new watch ranks them most frequent first.
    first = await ActivityWatch(env, pilots.workflow_id).read()
    assert [(e.summary, e.count) for e in first.task_errors] == [
        (summary, 2),
        ("OutputTooLargeError: out.json", 1),
    ]


async def test_the_last_activity_is_sent_before_the_watch_ends(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # So long that only the end of the watch can send the run.
    monkeypatch.setattr(watch_module, "ACTIVITY_MIN_GAP", 60.0)
    pilots = await Pilots.of_new_workflow(env)
    watch = ActivityWatch(env, pilots.workflow_id)
    await watch.read()
    await pilots.send("1.0", started("EV-a", time.time()), finished("EV-a", time.time()))
    await pilots.recorded(1)

    await env.deactivate("abort", pilots.workflow_id)

    assert await watch.rest() == grpc.StatusCode.OK
    assert [r.outcome for r in watch.runs.values()] == [SUCCEEDED]


async def test_rest_watch_with_include_task_activity_carries_task_runs(env: Env) -> None:
    pilots = await Pilots.of_new_workflow(env)
    await pilots.send("1.0", started("EV-a", time.time()))
    await pilots.recorded(1)
    token = env.wms.authority.mint("alice", Role.USER, 3600)
    path = f"/v1/workflows/{pilots.workflow_id}/watch?include_task_activity=true"

    async with aiohttp.ClientSession(base_url=env.wms.http_url) as http:
        resp = await http.get(path, headers={"Authorization": f"Bearer {token}"})
        try:
            assert resp.status == 200, await resp.text()
            first = await next_event(resp)
            assert first is not None and first.data["snapshot"] is True
            [run] = first.data["task_runs"]
            assert (run["event_id"], run["outcome"]) == ("EV-a", "TASK_RUN_OUTCOME_RUNNING")
            assert first.data["activity_window"]["max_buckets"] == MAX_BUCKETS

            await pilots.send("1.0", finished("EV-a", time.time()))
            change = await next_event(resp)
            assert change is not None and change.name == "message"
            [run] = change.data["task_runs"]
            assert run["outcome"] == "TASK_RUN_OUTCOME_SUCCEEDED"
        finally:
            resp.close()


# --- Settings -------------------------------------------------------------------------------------


async def test_the_window_is_bounded_by_the_wms_settings(start_env: StartEnv) -> None:
    small = await start_env(activity_max_task_runs=2, activity_max_workflows=1)
    pilots = await Pilots.of_new_workflow(small)
    await pilots.send("1.0", *(finished(f"EV-{i}", time.time()) for i in range(5)))
    await pilots.recorded(2)

    first = await ActivityWatch(small, pilots.workflow_id).read()

    assert first.activity_window.max_task_runs == 2
    assert [r.event_id for r in first.task_runs] == ["EV-3", "EV-4"]
    assert small.wms.hub.activity is not None
    assert small.wms.hub.activity.max_workflows == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [("EWMS_ACTIVITY_MAX_TASK_RUNS", "0"), ("EWMS_ACTIVITY_MAX_WORKFLOWS", "many")],
)
def test_a_bad_activity_setting_is_refused_naming_it(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        WmsSettings.from_env({name: value})


def test_activity_settings_are_read_from_the_environment() -> None:
    settings = WmsSettings.from_env(
        {"EWMS_ACTIVITY_MAX_TASK_RUNS": "100", "EWMS_ACTIVITY_MAX_WORKFLOWS": "3"}
    )

    assert (settings.activity_max_task_runs, settings.activity_max_workflows) == (100, 3)


# --- Unit level: what the window keeps ------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(act: TaskActivity, worker: str, *events: ps.TaskLifecycleEvent, wf: str = "WF") -> None:
    for event in events:
        act.record(wf, "TF-1", worker, event)


def test_when_full_the_oldest_ended_runs_are_dropped_first_then_the_oldest_running() -> None:
    act = TaskActivity(max_task_runs=3)
    now = time.time()
    record(act, "w", started("a", now), started("b", now), finished("a", now), started("c", now))
    record(act, "w", started("d", now))  # a (ended) goes
    window = act.window("WF")
    assert window is not None
    assert sorted(k[2] for k in [*window.running, *window.ended]) == ["b", "c", "d"]

    record(act, "w", started("e", now))  # none ended: b (the oldest running) goes

    assert sorted(k[2] for k in [*window.running, *window.ended]) == ["c", "d", "e"]


def test_the_least_recently_active_workflow_is_dropped() -> None:
    act = TaskActivity(max_workflows=2)
    now = time.time()
    record(act, "w", started("a", now), wf="WF-1")
    record(act, "w", started("a", now), wf="WF-2")
    record(act, "w", finished("a", now), wf="WF-1")  # WF-1 active again

    record(act, "w", started("a", now), wf="WF-3")

    assert act.workflows() == ["WF-1", "WF-3"]


def test_an_end_stamped_in_the_future_or_long_ago_counts_as_now() -> None:
    now = 1_700_000_000.0
    act = TaskActivity(clock=Clock(now))
    record(
        act,
        "w",
        finished("a", now + 3600),
        finished("b", now - MAX_LATENESS_SECONDS - 1),
        finished("c", now - 30),
    )
    window = act.window("WF")
    assert window is not None

    assert [window.ended[("TF-1", "w", e)].ended for e in "abc"] == [now, now, now - 30]
    assert window.buckets == {
        int(now // BUCKET_SECONDS): [2, 0],
        int((now - 30) // BUCKET_SECONDS): [1, 0],
    }


def test_buckets_older_than_the_history_are_dropped() -> None:
    clock = Clock(1_700_000_000.0)
    act = TaskActivity(clock=clock)
    for i in range(MAX_BUCKETS + 50):
        clock.now += BUCKET_SECONDS
        record(act, "w", finished(f"EV-{i}", clock.now))
    window = act.window("WF")
    assert window is not None

    assert len(window.buckets) == MAX_BUCKETS
    assert min(window.buckets) == act.oldest_bucket()


def test_long_ids_summaries_and_errors_are_cut() -> None:
    act = TaskActivity()
    error = "x" * 5000 + "\n" + "é" * 5000 + "the end"
    record(act, "w", failed("E" * 1000, time.time(), error))
    window = act.window("WF")
    assert window is not None

    [run] = window.ended.values()
    assert len(run.event_id) == ID_CHARS
    assert len(run.error_summary) == MAX_SUMMARY_CHARS and run.error_summary.endswith("…")
    [example] = window.errors.values()
    assert len(example.error.encode()) <= MAX_ERROR_BYTES
    assert example.error.startswith("xxx") and example.error.endswith("éthe end")


def test_a_message_keeps_the_newest_runs_that_fit_its_byte_limit() -> None:
    act = TaskActivity(max_message_bytes=4000)
    sub = act.subscribe("WF", lambda: None)
    now = time.time()
    for i in range(100):
        record(act, "w", finished(f"EV-{i:03}", now + i))

    snapshot, changes = ws.WatchWorkflowResponse(), ws.WatchWorkflowResponse()
    sub.snapshot_into(snapshot)
    record(act, "w", *(finished(f"EV-{i:03}", now + i) for i in range(100, 200)))
    sub.changes_into(changes)

    for msg, last in ((snapshot, "EV-099"), (changes, "EV-199")):
        assert msg.ByteSize() <= 4000
        assert 10 < len(msg.task_runs) < 100
        assert msg.task_runs[-1].event_id == last  # the newest kept, oldest first


def test_a_subscriber_gets_each_changed_run_once_and_never_more_than_the_window() -> None:
    act = TaskActivity(max_task_runs=100)
    woken = []
    sub = act.subscribe("WF", lambda: woken.append(1))
    now = time.time()
    for i in range(1000):
        record(act, f"w{i % 7}", started(f"EV-{i}", now), finished(f"EV-{i}", now))

    assert len(sub.runs) == 100
    assert len(woken) == 2000
    msg = ws.WatchWorkflowResponse()
    assert sub.changes_into(msg)
    assert len(msg.task_runs) == 100 and {r.outcome for r in msg.task_runs} == {SUCCEEDED}
    assert not sub.pending() and not sub.changes_into(ws.WatchWorkflowResponse())
    sub.close()
    record(act, "w", started("EV-late", now))
    assert len(woken) == 2000


# --- Unit level: memory ---------------------------------------------------------------------------


@pytest.fixture
def traced() -> Iterator[Callable[[], int]]:
    """Bytes allocated (and still held) since the fixture began, as tracemalloc counts them."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    yield lambda: tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()


def _fill(
    act: TaskActivity,
    clock: Clock,
    workflow_id: str,
    n: int,
    worker: Callable[[int], str],
    event_id: Callable[[int], str],
    error: Callable[[int], str],
) -> None:
    """``n`` runs (a start and a failure each) spread over one hour of ``clock``."""
    begin = clock.now
    start = ps.TaskLifecycleEvent(kind=ps.TASK_EVENT_KIND_STARTED)
    end = ps.TaskLifecycleEvent(kind=ps.TASK_EVENT_KIND_FAILED)
    for i in range(n):
        clock.now = begin + i * 3600.0 / n
        start.event_id = end.event_id = event_id(i)
        start.timestamp.FromMicroseconds(round(clock.now * 1e6))
        end.timestamp.CopyFrom(start.timestamp)
        end.error = error(i)
        end.metrics.CopyFrom(
            ps.TaskMetrics(
                wall_seconds=1.5 + i,
                cpu_seconds=0.5 + i,
                max_rss_bytes=2**62 + i,
                exit_code=2**30 + i,
                bytes_in=2**62 + i,
                bytes_out=2**62 + i,
            )
        )
        w = worker(i)
        act.record(workflow_id, "TF-" + "f" * 36, w, start)
        act.record(workflow_id, "TF-" + "f" * 36, w, end)


def bound(act: TaskActivity) -> int:
    """The stated bound of one workflow's window."""
    return RUN_BYTES * act.max_task_runs + WINDOW_BYTES


def test_a_window_filled_far_past_its_limits_stays_within_its_counts_and_bytes(
    traced: Callable[[], int],
) -> None:
    clock = Clock(1_700_000_000.0)
    act = TaskActivity(clock=clock)

    _fill(
        act,
        clock,
        "WF-1",
        50_000,
        worker=lambda i: f"{1000 + i % 200}.0",
        event_id=lambda i: f"EV-{i:032x}",
        error=lambda i: f"ContainerRunError: error number {i % 100}\n" + "stderr line\n" * 200,
    )

    assert act.counts("WF-1") == (act.max_task_runs, MAX_BUCKETS, MAX_TASK_ERRORS)
    assert traced() <= bound(act)


# Every id and error as long as allowed, of characters that take 4 bytes each in a str.
WIDE = "\U0001f600"


def _widest(prefix: str, i: int, chars: int) -> str:
    return f"{prefix}{i}".ljust(chars, WIDE)


def test_the_stated_bytes_hold_at_the_limits(traced: Callable[[], int]) -> None:
    clock = Clock(1_700_000_000.0)
    act = TaskActivity(clock=clock)

    _fill(
        act,
        clock,
        "WF-1",
        act.max_task_runs,
        worker=lambda i: _widest("w", i, 128),
        event_id=lambda i: _widest("EV-", i, ID_CHARS),
        error=lambda i: _widest("E", i, MAX_SUMMARY_CHARS) + "\n" + WIDE * MAX_ERROR_BYTES,
    )

    assert act.counts("WF-1") == (act.max_task_runs, MAX_BUCKETS, MAX_TASK_ERRORS)
    used = traced()
    assert used <= bound(act)
    # The bound is close to what the limits take: it would catch a window twice as big.
    assert used > bound(act) * 0.6


def test_the_total_stays_within_max_workflows_windows(traced: Callable[[], int]) -> None:
    clock = Clock(1_700_000_000.0)
    act = TaskActivity(max_task_runs=200, max_workflows=4, clock=clock)

    for wf in range(10):
        _fill(
            act,
            clock,
            f"WF-{wf}",
            500,
            worker=lambda i: _widest("w", i, 128),
            event_id=lambda i: _widest("EV-", i, ID_CHARS),
            error=lambda i: _widest("E", i, MAX_SUMMARY_CHARS) + "\n" + WIDE * 2000,
        )

    assert act.workflows() == ["WF-6", "WF-7", "WF-8", "WF-9"]
    assert all(act.counts(wf)[0] == 200 for wf in act.workflows())
    assert traced() <= act.max_workflows * bound(act)


def test_the_module_states_the_bound_it_tests() -> None:
    doc = activity_module.__doc__ or ""
    per_workflow = RUN_BYTES * 5000 + WINDOW_BYTES

    assert f"{RUN_BYTES:,} B" in doc
    assert f"{per_workflow / 1e6:.1f} MB per workflow" in doc
    workflows = DEFAULT_ACTIVITY_MAX_WORKFLOWS
    assert f"{DEFAULT_ACTIVITY_MAX_TASK_RUNS:,} runs, {workflows}" in " ".join(doc.split())
    assert f"{per_workflow * workflows / 1e6:.0f} MB in all" in doc
