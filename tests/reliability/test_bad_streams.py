"""Scenario 6, the streams: garbage on both bidirectional streams of a real WMS process.

Hypothesis writes sequences of messages no correct TMS or pilot sends (wrong first message, a second
hello, unknown and foreign taskforces, another location, jobs of another cluster, more workers than
the taskforce has, absurd counts, megabytes of text, events of no kind, …) on fresh streams, one
after another, while a healthy TMS (of another location) and a healthy pilot keep streaming on the
same WMS. Every garbage stream must end with a clear status (INVALID_ARGUMENT naming fields,
PERMISSION_DENIED, NOT_FOUND, UNAUTHENTICATED, or OK when the sequence happened to be valid),
never INTERNAL, UNKNOWN or RESOURCE_EXHAUSTED, and within the usual timeout (no stall). Afterwards
the healthy streams are still open and applied, their taskforce is exactly as they made it, the
garbage TMS's own taskforce holds no more workers than it has, and the WMS process is alive with no
unhandled error in its log.

The snapshot rule is tms.py's ``Dispatcher._check_snapshot``; the job event log's bad text is
tests/tms/test_job_event_log.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ewms.v1 import (
    pilot_service_pb2,
    pilot_service_pb2_grpc,
    task_manager_service_pb2,
    task_manager_service_pb2_grpc,
    taskforce_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import Role, TokenAuthority, load_or_create_secret
from services.wms.control.pilots import MAX_COUNTER
from tests.conftest import bearer
from tests.e2e.conftest import Cluster
from tests.reliability.conftest import Outcome
from tests.wms.helpers import compound, snapshot
from tests.wms.requests import minimal_task, workflow_request

T = TypeVar("T")
tms = task_manager_service_pb2
ps = pilot_service_pb2
Phase = taskforce_pb2.TaskforcePhase
Job = taskforce_pb2.JobState
Pilot = taskforce_pb2.PilotPhase
Code = grpc.StatusCode

TIMEOUT = 10.0  # seconds any stream may take to end, or a change to show
EXAMPLES = 200
CLEAR = {Code.OK, Code.INVALID_ARGUMENT, Code.PERMISSION_DENIED, Code.NOT_FOUND}
# What grpc.aio makes of a write that loses the race with the WMS ending the stream: the client's
# own status, the WMS's is lost. (A WMS-made INTERNAL says "internal error: …" and is logged as
# "unhandled error in rpc", which wms_is_healthy looks for.)
WRITE_LOST = (Code.INTERNAL, "Internal error from Core")
UNKNOWN_TF = "TF-0-0-0-0"
BIG = "x" * 200_000
HEALTHY_CLUSTER = 7  # the osg taskforce's, confirmed by the healthy TMS
GARBAGE_CLUSTER = 9  # the first local taskforce's, confirmed at setup
HEALTH_LOG_LINES = ("unhandled error in rpc", "tms stream failed", "flush failed", "Traceback")


@dataclass
class Stack:
    """A WMS process serving "local" and "osg", its taskforces, and the healthy streams: the osg
    TMS (taskforce ``healthy``, cluster 7, 2 workers) and the pilot of its worker 7.0. The
    garbage TMS streams are local's, where ``confirmed`` (cluster 9, 2 workers) and
    ``unconfirmed`` (its start never answered) wait; garbage pilots hold ``unconfirmed``'s
    token."""

    cluster: Cluster
    loop: asyncio.AbstractEventLoop
    channel: grpc.aio.Channel
    authority: TokenAuthority
    healthy: str = ""
    confirmed: str = ""
    unconfirmed: str = ""
    tms_call: Any = None
    pilot_call: Any = None
    beats: int = 0  # statuses the healthy pilot sent
    beater: asyncio.Task[None] | None = None
    held: int = 0  # how many times the healthy TMS's worker 7.1 was held
    codes: Counter[str] = field(default_factory=Counter)
    messages: int = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 3 * TIMEOUT))

    def token(self, role: Role, scope: str) -> str:
        return self.authority.mint(f"garbage-{role.value}", role, 3600, scope=scope)

    @property
    def workflows(self) -> workflow_service_pb2_grpc.WorkflowServiceStub:
        return workflow_service_pb2_grpc.WorkflowServiceStub(self.channel)

    @property
    def admin(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.cluster.token())

    async def taskforce(self, uuid: str) -> taskforce_pb2.Taskforce:
        return await self.workflows.GetTaskforce(  # type: ignore[no-any-return]
            workflow_service_pb2.GetTaskforceRequest(taskforce_uuid=uuid), metadata=self.admin
        )

    async def until(self, check: Callable[[taskforce_pb2.Taskforce], bool], uuid: str) -> None:
        """Wait (at most TIMEOUT seconds) until the stored taskforce passes ``check``."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                if check(await self.taskforce(uuid)):
                    return
                await asyncio.sleep(0.05)


async def created(stack: Stack, location: str) -> str:
    """A new workflow's only taskforce (2 workers at ``location``)."""
    task = minimal_task(cluster_locations=[location], n_workers=2)
    resp = await stack.workflows.CreateWorkflow(workflow_request(task), metadata=stack.admin)
    return str(resp.taskforces[0].taskforce_uuid)


async def started(call: Any, wanted: set[str]) -> list[tms.StartTaskforce]:
    """The start commands for ``wanted`` that come down a TMS stream (others are skipped)."""
    starts: list[tms.StartTaskforce] = []
    async with asyncio.timeout(TIMEOUT):
        while len(starts) < len(wanted):
            msg = await call.read()
            if msg.WhichOneof("kind") == "start" and msg.start.taskforce.taskforce_uuid in wanted:
                starts.append(msg.start)
    return starts


async def set_up(stack: Stack) -> None:
    stack.healthy = await created(stack, "osg")
    stack.confirmed = await created(stack, "local")
    stack.unconfirmed = await created(stack, "local")
    tms_stub = task_manager_service_pb2_grpc.TaskManagerServiceStub(stack.channel)
    hello = tms.TmsHello(cluster_location="local", scheduler="local", tms_id="setup")
    local = tms_stub.Connect(metadata=bearer(stack.token(Role.TMS, "local")))
    await local.write(tms.TaskManagerServiceConnectRequest(hello=hello))
    await started(local, {stack.confirmed, stack.unconfirmed})
    confirm = tms.TaskforceSubmitted(
        taskforce_uuid=stack.confirmed, cluster_id=GARBAGE_CLUSTER, n_workers=2
    )
    await local.write(tms.TaskManagerServiceConnectRequest(submitted=confirm))
    await stack.until(lambda tf: tf.cluster_id == GARBAGE_CLUSTER, stack.confirmed)
    local.cancel()

    stack.tms_call = tms_stub.Connect(metadata=bearer(stack.token(Role.TMS, "osg")))
    hello = tms.TmsHello(cluster_location="osg", scheduler="htcondor", tms_id="healthy")
    await stack.tms_call.write(tms.TaskManagerServiceConnectRequest(hello=hello))
    [start] = await started(stack.tms_call, {stack.healthy})
    confirm = tms.TaskforceSubmitted(
        taskforce_uuid=stack.healthy, cluster_id=HEALTHY_CLUSTER, n_workers=2
    )
    await stack.tms_call.write(tms.TaskManagerServiceConnectRequest(submitted=confirm))
    await stack.until(lambda tf: tf.phase == Phase.TASKFORCE_PHASE_CONDOR_SUBMIT, stack.healthy)

    pilot_stub = pilot_service_pb2_grpc.PilotServiceStub(stack.channel)
    stack.pilot_call = pilot_stub.Connect(metadata=bearer(start.pilot_token))
    pilot_hello = ps.PilotHello(taskforce_uuid=stack.healthy, worker_id=f"{HEALTHY_CLUSTER}.0")
    await stack.pilot_call.write(ps.PilotServiceConnectRequest(hello=pilot_hello))
    stack.beater = asyncio.create_task(beat(stack))
    await healthy_streams_work(stack)


async def beat(stack: Stack) -> None:
    """The healthy pilot's statuses, alongside the garbage: every 20 ms one more event."""
    while True:
        stack.beats += 1
        counters = taskforce_pb2.TaskCounters(events_received=stack.beats)
        status = ps.PilotStatus(phase=Pilot.PILOT_PHASE_TASKING, counters=counters)
        await stack.pilot_call.write(ps.PilotServiceConnectRequest(status=status))
        await asyncio.sleep(0.02)


async def healthy_streams_work(stack: Stack) -> None:
    """Both healthy streams are open and applied: the pilot's last status shows, and so does a
    new snapshot of the healthy TMS, exactly."""
    assert not stack.tms_call.done() and not stack.pilot_call.done()
    stack.held += 1
    reason = f"held {stack.held} times"
    workers = [
        (f"{HEALTHY_CLUSTER}.0", Job.JOB_STATE_RUNNING, ""),
        (f"{HEALTHY_CLUSTER}.1", Job.JOB_STATE_HELD, reason),
    ]
    await stack.tms_call.write(
        tms.TaskManagerServiceConnectRequest(snapshot=snapshot(stack.healthy, *workers, full=True))
    )
    want = compound(
        (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_TASKING, 1),
        (Job.JOB_STATE_HELD, reason, Pilot.PILOT_PHASE_UNSPECIFIED, 1),
    )
    sent = stack.beats
    await stack.until(
        lambda tf: list(tf.compound_statuses) == want and tf.counters.events_received >= sent,
        stack.healthy,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = Path(tmp_path_factory.mktemp("bad-streams"))
    cluster = Cluster(root / "cluster", "embedded", EWMS_CLUSTER_LOCATIONS="local,osg")
    cluster.root.mkdir()
    cluster.start_wms()
    # The module's own loop, also made current: grpc's core looks the loop up itself, and an
    # earlier test in the same process may have left none current.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    channel = loop.run_until_complete(_channel(cluster.address))
    stack = Stack(cluster, loop, channel, TokenAuthority(load_or_create_secret(cluster.data_dir)))
    try:
        stack.run(set_up(stack))
        yield stack
    finally:
        if stack.beater is not None:
            stack.beater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(stack.beater)
        for call in (stack.tms_call, stack.pilot_call):
            if call is not None:
                call.cancel()
        loop.run_until_complete(channel.close())
        asyncio.set_event_loop(None)
        loop.close()
        cluster.close()


async def _channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


async def one_stream(
    connect: Callable[..., Any], token: str, requests: list[Any]
) -> tuple[grpc.StatusCode, str]:
    """Open a stream with ``token``, write ``requests``, half-close and read to the end; the
    status and what it says (an INVALID_ARGUMENT must name fields, any other error say
    something). Writing stops when the WMS has ended the stream (grpc.aio then fails the write,
    locally)."""
    call = connect(metadata=bearer(token))
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        for request in requests:
            await call.write(request)
        await call.done_writing()
    with contextlib.suppress(grpc.aio.AioRpcError):
        async with asyncio.timeout(TIMEOUT):
            while await call.read() is not grpc.aio.EOF:
                pass
    code, details = await call.code(), await call.details()
    if code == Code.INVALID_ARGUMENT:
        violations = violations_of(await call.trailing_metadata())
        assert violations and all(f and d for f, d in violations), details
    assert code == Code.OK or details, code
    return code, details


def violations_of(trailers: Any) -> list[tuple[str, str]]:
    """The BadRequest field violations in a call's trailers."""
    found: list[tuple[str, str]] = []
    for key, value in trailers or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    found += [(v.field, v.description) for v in bad.field_violations]
    return found


def check_clear(stack: Stack, kind: str, outcome: tuple[grpc.StatusCode, str], sent: int) -> None:
    code, details = outcome
    if (code, details) == WRITE_LOST:
        stack.codes[f"{kind} (write after the end)"] += 1
    else:
        assert code in CLEAR, f"{kind} stream ended {code.name}: {details}"
        stack.codes[f"{kind} {code.name}"] += 1
    stack.messages += sent


# --- what garbage is made of ----------------------------------------------------------------------


# Garbage is mostly sense: each field is usually valid, so that whole messages often are, and the
# rules that only valid messages reach (a snapshot's bounds, the counters' sums) are tried too.
TEXT = "<any short text>"
BAD_TEXT = ["", "\x00\n", "é" * 300, BIG, TEXT]


def usually(*good: T, bad: list[T]) -> st.SearchStrategy[T]:
    """One of ``good`` four times in five, else one of ``bad``."""
    return st.sampled_from([*good] * max(1, 4 * len(bad) // len(good)) + bad)


def short_text(*good: str) -> st.SearchStrategy[str]:
    return usually(*good, bad=BAD_TEXT).flatmap(
        lambda v: st.text(max_size=6) if v == TEXT else st.just(v)
    )


def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp | None]:
    seconds = usually(1_795_000_000, bad=[0, -62_135_596_801, 253_402_300_800, 2**40])
    nanos = usually(0, 500, bad=[-1, 10**9])
    return st.none() | st.builds(timestamp_pb2.Timestamp, seconds=seconds, nanos=nanos)


def counters() -> st.SearchStrategy[taskforce_pb2.TaskCounters]:
    """Every counter alike: two pilots at 2**63 - 1 overflowed their taskforce's sum."""
    value = usually(0, 3, MAX_COUNTER, bad=[-1, MAX_COUNTER + 1, 2**63 - 1])
    return value.map(
        lambda v: taskforce_pb2.TaskCounters(
            events_received=v, tasks_succeeded=v, tasks_failed=v, events_published=v
        )
    )


def workers() -> st.SearchStrategy[list[tms.WorkerJobState]]:
    ids = short_text(*(f"{c}.{p}" for c in (GARBAGE_CLUSTER, 8) for p in (0, 1, 2)), "09.0", "9")
    worker = st.builds(
        tms.WorkerJobState,
        worker_id=ids,
        job_state=usually(1, 2, 3, 4, 5, 6, bad=[0, 99, -1]),
        hold_reason=short_text("", "held"),
        chirps=st.none()
        | st.builds(
            tms.PilotChirps,
            phase=usually(0, 4, bad=[42, -3]),
            last_error=short_text("", "boom"),
            counters=counters(),
            last_updated=timestamps(),
        ),
    )
    many = [
        tms.WorkerJobState(worker_id=f"{GARBAGE_CLUSTER}.{i}", job_state=Job.JOB_STATE_RUNNING)
        for i in range(20_000)
    ]
    return st.lists(worker, max_size=4) | st.just(many)


def tms_requests(stack: Stack) -> st.SearchStrategy[list[tms.TaskManagerServiceConnectRequest]]:
    uuid = short_text(stack.confirmed, stack.unconfirmed, stack.healthy, UNKNOWN_TF)
    r = tms.TaskManagerServiceConnectRequest
    hello = st.builds(
        tms.TmsHello,
        cluster_location=short_text("local", "osg", "mars"),
        scheduler=short_text("local", "htcondor"),
        tms_id=short_text("g"),
        version=short_text("1"),
    )
    failed = st.builds(tms.TaskforceCommandFailed, taskforce_uuid=uuid, error=short_text("e"))
    entry = st.builds(
        tms.TaskforceJobStatus, taskforce_uuid=uuid, workers=workers(), full=st.booleans()
    )
    one = st.one_of(
        st.builds(r, hello=hello),
        st.builds(
            r,
            submitted=st.builds(
                tms.TaskforceSubmitted,
                taskforce_uuid=uuid,
                cluster_id=usually(GARBAGE_CLUSTER, 10, bad=[0, -1, 2**31 - 1]),
                n_workers=usually(1, 2, bad=[0, -5, 2**31 - 1]),
                submit_dict=st.dictionaries(short_text("k"), short_text("v"), max_size=2),
                job_event_log_fpath=short_text("/x.jel"),
            ),
        ),
        st.builds(r, submit_failed=failed),
        st.builds(r, remove_failed=failed),
        st.builds(r, removed=st.builds(tms.TaskforceRemoved, taskforce_uuid=uuid)),
        st.builds(
            r,
            completed=st.builds(
                tms.TaskforceCompleted, taskforce_uuid=uuid, complete_ts=timestamps()
            ),
        ),
        st.builds(
            r,
            snapshot=st.builds(
                tms.JobStatusSnapshot, taskforces=st.lists(entry, min_size=1, max_size=3)
            ),
        ),
        st.just(r()),  # no kind
    )
    valid_hello = r(hello=tms.TmsHello(cluster_location="local", scheduler="local"))
    return st.tuples(usually(True, bad=[False]), st.lists(one, max_size=5)).map(
        lambda said: [valid_hello, *said[1]] if said[0] else said[1]
    )


def pilot_requests(stack: Stack) -> st.SearchStrategy[list[ps.PilotServiceConnectRequest]]:
    r = ps.PilotServiceConnectRequest
    hello = st.builds(
        ps.PilotHello,
        taskforce_uuid=short_text(stack.unconfirmed, stack.healthy, UNKNOWN_TF),
        worker_id=short_text("1.0", "1.1", "c-1", "w" * 128, "w" * 129),
        host=short_text("node"),
        pilot_version=short_text("1"),
    )
    event = st.builds(
        ps.TaskLifecycleEvent,
        event_id=short_text("EV-1"),
        kind=usually(1, 2, 3, bad=[0, 9, -1]),
        error=short_text("failed"),
        metrics=st.builds(
            ps.TaskMetrics,
            wall_seconds=st.floats(),
            max_rss_bytes=usually(0, 1024, bad=[-1, 2**63 - 1]),
            exit_code=usually(0, 1, bad=[-9, 2**31 - 1]),
        ),
        timestamp=timestamps(),
    )
    bulk = [ps.TaskLifecycleEvent(event_id=f"EV-{i}") for i in range(20_000)]
    one = st.one_of(
        st.builds(r, hello=hello),
        st.builds(
            r,
            status=st.builds(
                ps.PilotStatus,
                phase=usually(1, 4, 7, bad=[0, 42, -1]),
                counters=counters(),
                last_error=short_text("err"),
                timestamp=timestamps(),
            ),
        ),
        st.builds(r, task_event=event),
        st.builds(
            r,
            task_events=st.builds(
                ps.TaskLifecycleEvents, events=st.lists(event, max_size=4) | st.just(bulk)
            ),
        ),
        st.just(r()),  # no kind
    )
    valid_hello = st.builds(
        ps.PilotHello,
        taskforce_uuid=st.just(stack.unconfirmed),
        worker_id=usually("1.0", "1.1", bad=["1.2"]),
    ).map(lambda hello: [r(hello=hello)])
    return st.tuples(st.one_of(valid_hello, st.just([])), st.lists(one, max_size=5)).map(
        lambda said: [*said[0], *said[1]]
    )


def tms_cases(stack: Stack) -> list[tuple[str, list[tms.TaskManagerServiceConnectRequest]]]:
    """The garbage the scenario names, tried first: (token, requests) of one stream each."""
    r = tms.TaskManagerServiceConnectRequest
    local, pilot = stack.token(Role.TMS, "local"), stack.token(Role.PILOT, stack.unconfirmed)
    hello = r(hello=tms.TmsHello(cluster_location="local", scheduler="local"))

    def running(uuid: str, *jobs: str, **fields: Any) -> tms.TaskManagerServiceConnectRequest:
        workers = [tms.WorkerJobState(worker_id=j, job_state=Job.JOB_STATE_RUNNING) for j in jobs]
        for w in workers:
            for name, value in fields.items():
                getattr(w, name).CopyFrom(value)
        status = tms.TaskforceJobStatus(taskforce_uuid=uuid, workers=workers, full=True)
        return r(snapshot=tms.JobStatusSnapshot(taskforces=[status]))

    many = [f"{GARBAGE_CLUSTER}.{i}" for i in range(50_000)]
    absurd = taskforce_pb2.TaskCounters(events_received=-1, tasks_succeeded=2**63 - 1)
    return [
        (local, [running(stack.confirmed, "9.0")]),  # the first message is no hello
        (local, [hello, hello]),
        (local, [r(hello=tms.TmsHello(cluster_location="osg", scheduler="local"))]),
        (pilot, [hello]),
        (local, [hello, r(completed=tms.TaskforceCompleted(taskforce_uuid=UNKNOWN_TF))]),
        (local, [hello, running(stack.healthy, f"{HEALTHY_CLUSTER}.0")]),  # osg's
        (local, [hello, running(stack.confirmed, *many)]),  # defect 8
        (local, [hello, running(stack.confirmed, "8.0")]),  # another cluster
        (local, [hello, running(stack.unconfirmed, *(f"12.{i}" for i in range(5)))]),
        (local, [hello, running(stack.confirmed, "9.0", chirps=tms.PilotChirps(counters=absurd))]),
        (local, [hello, r()]),
    ]


def pilot_cases(stack: Stack) -> list[tuple[str, list[ps.PilotServiceConnectRequest]]]:
    """The garbage the scenario names, tried first: (token, requests) of one stream each."""
    r = ps.PilotServiceConnectRequest
    mine, unknown = stack.token(Role.PILOT, stack.unconfirmed), stack.token(Role.PILOT, UNKNOWN_TF)

    def hello(uuid: str = stack.unconfirmed, worker: str = "1.0") -> ps.PilotServiceConnectRequest:
        return r(hello=ps.PilotHello(taskforce_uuid=uuid, worker_id=worker))

    def status(value: int) -> ps.PilotServiceConnectRequest:
        counters = taskforce_pb2.TaskCounters(events_received=value)
        return r(status=ps.PilotStatus(phase=Pilot.PILOT_PHASE_TASKING, counters=counters))

    no_kind = [ps.TaskLifecycleEvent(event_id=f"EV-{i}") for i in range(50_000)]
    return [
        (mine, [status(1)]),  # status before hello
        (mine, [hello(), hello()]),
        (unknown, [hello(UNKNOWN_TF)]),
        (mine, [hello(stack.healthy)]),  # another taskforce
        (mine, [hello(worker="1.1"), status(3)]),
        (mine, [hello(), status(2**63 - 1)]),  # with 1.1's 3, beyond an int64
        (mine, [hello(), status(-1)]),
        (mine, [hello(), r(task_event=ps.TaskLifecycleEvent(event_id="EV-1"))]),
        (mine, [hello(), r(task_events=ps.TaskLifecycleEvents(events=no_kind))]),
        (mine, [hello(), r()]),
    ]


GARBAGE = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


# --- the checks after the garbage -----------------------------------------------------------------


async def within_bounds(stack: Stack) -> None:
    """The garbage TMS's taskforces know no more job states than they have workers (their live
    compound statuses: what snapshots made of them, before any write-behind)."""
    for uuid in (stack.confirmed, stack.unconfirmed):
        tf = await stack.taskforce(uuid)
        with_jobs = sum(c.count for c in tf.compound_statuses if c.job_state)
        assert with_jobs <= tf.n_workers, (tf.n_workers, tf.compound_statuses)


def wms_is_healthy(stack: Stack) -> None:
    """The healthy streams still work and their taskforce is exactly theirs; the WMS is alive,
    its log clean."""
    stack.run(healthy_streams_work(stack))
    assert stack.cluster.wms is not None and stack.cluster.wms.popen.poll() is None
    log = stack.cluster.root.joinpath("wms.log").read_text(errors="replace")
    assert not [line for line in HEALTH_LOG_LINES if line in log], log[-4000:]


def detail(stack: Stack, kind: str) -> str:
    codes = ", ".join(
        f"{k.partition(' ')[2]} {n}" for k, n in sorted(stack.codes.items()) if k.startswith(kind)
    )
    return f"{codes}; healthy TMS and pilot streams unaffected"


# --- the scenarios --------------------------------------------------------------------------------


def test_garbage_on_tms_streams_gets_clear_errors_and_harms_nothing(
    stack: Stack, outcome: Callable[..., Outcome]
) -> None:
    stub = task_manager_service_pb2_grpc.TaskManagerServiceStub(stack.channel)
    tokens = st.sampled_from(
        [stack.token(Role.TMS, "local")] * 3 + [stack.token(Role.PILOT, stack.unconfirmed)]
    )
    before = stack.messages

    def garbage(token: str, requests: list[tms.TaskManagerServiceConnectRequest]) -> None:
        ended = stack.run(one_stream(stub.Connect, token, requests))
        check_clear(stack, "TMS", ended, len(requests))
        stack.run(within_bounds(stack))

    for token, requests in tms_cases(stack):
        garbage = example(token=token, requests=requests)(garbage)
    GARBAGE(given(token=tokens, requests=tms_requests(stack))(garbage))()
    wms_is_healthy(stack)
    outcome(
        f"garbage on TmsService streams ({EXAMPLES} sequences)",
        events_in=stack.messages - before,
        detail=detail(stack, "TMS"),
    )


def test_garbage_on_pilot_streams_gets_clear_errors_and_harms_nothing(
    stack: Stack, outcome: Callable[..., Outcome]
) -> None:
    stub = pilot_service_pb2_grpc.PilotServiceStub(stack.channel)
    tokens = st.sampled_from(
        [stack.token(Role.PILOT, stack.unconfirmed)] * 3 + [stack.token(Role.TMS, "local")]
    )
    before = stack.messages

    def garbage(token: str, requests: list[ps.PilotServiceConnectRequest]) -> None:
        ended = stack.run(one_stream(stub.Connect, token, requests))
        check_clear(stack, "pilot", ended, len(requests))

    for token, requests in pilot_cases(stack):
        garbage = example(token=token, requests=requests)(garbage)
    GARBAGE(given(token=tokens, requests=pilot_requests(stack))(garbage))()
    wms_is_healthy(stack)
    outcome(
        f"garbage on PilotService streams ({EXAMPLES} sequences)",
        events_in=stack.messages - before,
        detail=detail(stack, "pilot"),
    )
