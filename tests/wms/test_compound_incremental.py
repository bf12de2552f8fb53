"""A taskforce's compound statuses and roll-up are kept current one worker at a time (defect: every
pilot status recounted all of its taskforce's workers, and 2,000 pilots saturated the WMS).

Two properties, on a real in-process WMS (its Dispatcher and PilotRegistry, fed the way the TMS and
pilot streams feed them):

* after any sequence of job-state snapshots (full or not, with chirps), pilot connects, statuses,
  task events and disconnects, what the WMS shows equals a from-scratch count of what was said,
  computed here independently of the WMS's code;
* one pilot status, and building the taskforce a watcher sends, cost the same at 1,000 workers as
  at 10: counted in Python and C function calls (``sys.setprofile``), not in time.
"""

from __future__ import annotations

import heapq
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ewms.v1 import pilot_service_pb2, task_manager_service_pb2, taskforce_pb2
from services.wms.control.pilots import TOP_TASK_ERRORS, PilotSession
from services.wms.control.tms import TmsSession
from tests.wms.helpers import Env
from tests.wms.requests import minimal_task

tms = task_manager_service_pb2
ps = pilot_service_pb2
JobState = taskforce_pb2.JobState
PilotPhase = taskforce_pb2.PilotPhase

N_WORKERS = 6
# Job states that keep the job alive: an ended job makes a disconnected pilot LOST, a rule of its
# own (tested with it), which would only blur this property.
JOB_STATES = [
    JobState.JOB_STATE_IDLE,
    JobState.JOB_STATE_RUNNING,
    JobState.JOB_STATE_SUSPENDED,
    JobState.JOB_STATE_TRANSFERRING_OUTPUT,
]
PHASES = [p for p in PilotPhase.values() if p and p != PilotPhase.PILOT_PHASE_LOST]
ERRORS = ["", "", "disk full", "oom"]
COUNTERS = ("events_received", "tasks_succeeded", "tasks_failed", "events_published")

workers = st.integers(0, N_WORKERS - 1)
# What a pilot reports: phase, counters, last error.
reports = st.tuples(
    st.sampled_from(PHASES),
    st.tuples(*[st.integers(0, 50)] * len(COUNTERS)),
    st.sampled_from(ERRORS),
)
job_entries = st.tuples(
    st.sampled_from(JOB_STATES), st.sampled_from(["", "held: why"]), st.none() | reports
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("snapshot"), st.dictionaries(workers, job_entries), st.booleans()),
        st.tuples(st.just("connect"), workers),
        st.tuples(st.just("status"), workers, reports),
        st.tuples(st.just("events"), workers),
        st.tuples(st.just("disconnect"), workers),
    ),
    max_size=40,
)


Report = tuple[int, tuple[int, ...], str]


@dataclass
class Model:
    """What the TMS and the pilots said, and the compound statuses and roll-up it makes,
    counted from scratch."""

    jobs: dict[str, tuple[int, str]] = field(default_factory=dict)
    chirped: dict[str, Report] = field(default_factory=dict)
    pilots: dict[str, Report] = field(default_factory=dict)

    def joined(self) -> dict[str, Report]:
        return {**self.chirped, **self.pilots}

    def compound(self) -> list[tuple[int, str, int, int]]:
        joined = self.joined()
        counts: Counter[tuple[int, str, int]] = Counter()
        for worker in set(self.jobs) | set(joined):
            state, reason = self.jobs.get(worker, (0, ""))
            counts[(state, reason, joined[worker][0] if worker in joined else 0)] += 1
        return [(*key, n) for key, n in sorted(counts.items())]

    def counters(self) -> list[int]:
        return [sum(r[1][i] for r in self.joined().values()) for i in range(len(COUNTERS))]

    def top_errors(self) -> dict[str, int]:
        errors = Counter(r[2] for r in self.joined().values() if r[2])
        return dict(heapq.nsmallest(TOP_TASK_ERRORS, errors.items(), key=lambda e: (-e[1], e[0])))


def status_of(report: Report) -> ps.PilotStatus:
    phase, counters, error = report
    return ps.PilotStatus(
        phase=phase,  # type: ignore[arg-type]
        counters=taskforce_pb2.TaskCounters(**dict(zip(COUNTERS, counters, strict=True))),
        last_error=error,
    )


def worker_id(i: int) -> str:
    return f"1.{i}"


def shown(tf: taskforce_pb2.Taskforce) -> tuple[Any, ...]:
    """What a watcher would be sent of ``tf``'s statuses and roll-up."""
    c = tf.counters
    return (
        [(s.job_state, s.hold_reason, s.pilot_phase, s.count) for s in tf.compound_statuses],
        [c.events_received, c.tasks_succeeded, c.tasks_failed, c.events_published],
        dict(tf.top_task_errors),
    )


async def apply(
    env: Env,
    uuid: str,
    op: tuple[Any, ...],
    model: Model,
    sessions: dict[str, PilotSession],
) -> None:
    """Feed one operation to the WMS, as its TMS or pilot streams would, and to the model."""
    registry, dispatcher = env.wms.pilots, env.wms.dispatcher
    kind = op[0]
    if kind == "snapshot":
        _, entries, full = op
        status = tms.TaskforceJobStatus(taskforce_uuid=uuid, full=full)
        if full:
            model.jobs.clear()
            model.chirped.clear()
        for i, (state, reason, chirp) in sorted(entries.items()):
            w = status.workers.add(worker_id=worker_id(i), job_state=state, hold_reason=reason)
            model.jobs[worker_id(i)] = (state, reason)
            if chirp is None:
                model.chirped.pop(worker_id(i), None)
            else:
                pilot = status_of(chirp)
                w.chirps.phase = pilot.phase
                w.chirps.counters.CopyFrom(pilot.counters)
                w.chirps.last_error = pilot.last_error
                model.chirped[worker_id(i)] = chirp
        await dispatcher.snapshot(
            TmsSession("local", "test"), tms.JobStatusSnapshot(taskforces=[status])
        )
        return
    worker = worker_id(op[1])
    if kind == "connect" or worker not in sessions:
        hello = ps.PilotHello(taskforce_uuid=uuid, worker_id=worker)
        sessions[worker] = await registry.connect(hello)
        model.pilots.setdefault(worker, (0, (0,) * len(COUNTERS), ""))
    session = sessions[worker]
    if kind == "status":
        registry.report_status(session, status_of(op[2]))
        model.pilots[worker] = op[2]
    elif kind == "events":
        event = ps.TaskLifecycleEvent(event_id="e", kind=ps.TASK_EVENT_KIND_STARTED)
        registry.report_task_events(session, [event])
    elif kind == "disconnect":
        registry.disconnect(session)
        del sessions[worker]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
async def test_incremental_counts_equal_a_count_from_scratch(
    env: Env, ops: list[tuple[Any, ...]]
) -> None:
    [tf] = await env.created_and_launched(minimal_task(n_workers=N_WORKERS))
    model = Model()
    sessions: dict[str, PilotSession] = {}
    for op in ops:
        await apply(env, tf.taskforce_uuid, op, model, sessions)
        expected = (model.compound(), model.counters(), model.top_errors())
        live = env.wms.dispatcher.live(taskforce_pb2.Taskforce(taskforce_uuid=tf.taskforce_uuid))
        assert shown(live) == expected, f"after {op}"
    for session in sessions.values():
        env.wms.pilots.disconnect(session)


def calls(fn: Callable[[], object]) -> int:
    """Python and C function calls made by ``fn()`` (the fewest of three runs)."""
    counts = []
    for _ in range(3):
        n = 0

        def count(frame: FrameType, event: str, arg: object) -> None:
            nonlocal n
            if event in ("call", "c_call"):
                n += 1

        sys.setprofile(count)
        try:
            fn()
        finally:
            sys.setprofile(None)
        counts.append(n)
    return min(counts)


async def change_cost(env: Env, n: int) -> tuple[int, int]:
    """Calls made by one pilot status, and by building the taskforce a watcher is sent, in a
    taskforce of ``n`` workers, each with a job and a connected pilot."""
    [tf] = await env.created_and_launched(minimal_task(n_workers=n))
    uuid = tf.taskforce_uuid
    snapshot = tms.TaskforceJobStatus(taskforce_uuid=uuid, full=True)
    for i in range(n):
        snapshot.workers.add(worker_id=worker_id(i), job_state=JobState.JOB_STATE_RUNNING)
    await env.wms.dispatcher.snapshot(
        TmsSession("local", "test"), tms.JobStatusSnapshot(taskforces=[snapshot])
    )
    registry = env.wms.pilots
    sessions = [
        await registry.connect(ps.PilotHello(taskforce_uuid=uuid, worker_id=worker_id(i)))
        for i in range(n)
    ]
    for i, session in enumerate(sessions):
        registry.report_status(session, status_of((PHASES[i % 3], (i, i, 0, i), ERRORS[i % 4])))
    status = status_of((PilotPhase.PILOT_PHASE_DRAINING, (1, 2, 3, 4), "oom"))
    per_status = calls(lambda: registry.report_status(sessions[0], status))
    blank = taskforce_pb2.Taskforce(taskforce_uuid=uuid)
    per_watch_message = calls(lambda: env.wms.dispatcher.live(blank))
    for session in sessions:
        registry.disconnect(session)
    return per_status, per_watch_message


async def test_a_change_costs_the_same_in_a_big_taskforce(env: Env) -> None:
    small_status, small_watch = await change_cost(env, 10)
    big_status, big_watch = await change_cost(env, 1000)

    # A pass over the workers would add thousands of calls; a few more are bookkeeping noise
    # (e.g. whether a write-behind task had to be started).
    assert big_status <= small_status + 20, (small_status, big_status)
    assert big_watch <= small_watch + 20, (small_watch, big_watch)
