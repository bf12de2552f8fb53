"""The pilot's StatusReporter against the WMS's real PilotService and registry: lifecycle events go
up in batches, complete and in order, without waiting for a batch to fill.

The reporter talks to a second gRPC server on 127.0.0.1:0 serving the test WMS's PilotService (same
registry, same auth) with one more interceptor, which records every request the WMS receives, so
the tests can count messages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from ewms.v1 import (
    pilot_service_pb2,
    pilot_service_pb2_grpc,
    taskforce_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import Role
from services.pilot.status import MAX_EVENTS_PER_MESSAGE, StatusReporter
from services.wms import RunningWms
from services.wms.auth_interceptor import AuthInterceptor
from services.wms.control.pilots import ChangeKind, PilotChange, PilotService
from tests.conftest import bearer
from tests.wms.requests import workflow_request

ps = pilot_service_pb2
TIMEOUT = 10.0
CONNECT = "/ewms.v1.PilotService/Connect"


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Wait until ``check`` holds; fail after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {TIMEOUT} s: {what}")
        await asyncio.sleep(0.02)


@dataclass
class ReceivedRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Records the kind of every PilotService.Connect request the server receives, and how many
    lifecycle events it carries."""

    received: list[tuple[str, int]] = field(default_factory=list)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method != CONNECT:
            return handler
        behaviour = handler.stream_stream
        received = self.received

        async def recorded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for req in requests:
                kind = req.WhichOneof("kind")
                n = len(req.task_events.events) if kind == "task_events" else 1
                received.append((kind, n))
                yield req

        async def connect(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for resp in behaviour(recorded(requests), context):
                yield resp

        return grpc.stream_stream_rpc_method_handler(
            connect,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def event_messages(self) -> list[tuple[str, int]]:
        """The messages that carried lifecycle events: (kind, number of events)."""
        return [(k, n) for k, n in self.received if k in ("task_event", "task_events")]


@dataclass
class Pilot:
    """A StatusReporter of a pilot of the test workflow's taskforce, and what the WMS received."""

    reporter: StatusReporter
    wms: ReceivedRequests
    taskforce_uuid: str
    heard: list[PilotChange]

    def task_events_heard(self) -> list[tuple[str, int]]:
        """The lifecycle events the registry's listeners got, in order: (event_id, kind)."""
        return [
            (c.task_event.event_id, c.task_event.kind)
            for c in self.heard
            if c.kind is ChangeKind.TASK_EVENT and c.task_event is not None
        ]


@pytest.fixture
async def pilot(wms: RunningWms, channel: grpc.aio.Channel) -> AsyncIterator[Pilot]:
    """A reporter (not started) for worker "1.0" of a new workflow's taskforce, reporting to the
    test WMS's PilotService through a recording server."""
    alice = bearer(wms.authority.mint("alice", Role.USER, 3600))
    created = await workflow_service_pb2_grpc.WorkflowServiceStub(channel).CreateWorkflow(
        workflow_request(), metadata=alice
    )
    uuid = created.taskforces[0].taskforce_uuid
    recorder = ReceivedRequests()
    server = grpc.aio.server(interceptors=[AuthInterceptor(wms.authority), recorder])
    pilot_service_pb2_grpc.add_PilotServiceServicer_to_server(PilotService(wms.pilots), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    heard: list[PilotChange] = []
    stop_listening = wms.pilots.listen(heard.append)
    reporter = StatusReporter(
        f"127.0.0.1:{port}",
        wms.authority.mint("pilot", Role.PILOT, 3600, scope=uuid),
        ps.PilotHello(taskforce_uuid=uuid, worker_id="1.0", host="node-1", pilot_version="0.1.0"),
        on_drain=lambda reason: None,
        on_stop=lambda reason: None,
    )
    try:
        yield Pilot(reporter, recorder, uuid, heard)
    finally:
        await reporter.close(within=TIMEOUT)
        stop_listening()
        await server.stop(None)


def lifecycle(n: int) -> list[ps.TaskLifecycleEvent]:
    """STARTED then FINISHED of tasks EV-0 .. EV-(n/2 - 1): ``n`` events as a pilot reports them."""
    return [
        ps.TaskLifecycleEvent(event_id=f"EV-{i // 2}", kind=kind)
        for i, kind in enumerate(
            [ps.TASK_EVENT_KIND_STARTED, ps.TASK_EVENT_KIND_FINISHED] * (n // 2)
        )
    ]


def ids_and_kinds(events: list[ps.TaskLifecycleEvent]) -> list[tuple[str, int]]:
    return [(e.event_id, e.kind) for e in events]


async def test_events_queued_while_the_stream_is_busy_arrive_complete_and_in_order_in_one_message(
    pilot: Pilot,
) -> None:
    events = lifecycle(300)
    for event in events:  # before the stream exists: all wait for the first write
        pilot.reporter.task_event(event)

    pilot.reporter.start()

    await eventually(lambda: len(pilot.task_events_heard()) >= 300, "all 300 events are heard")
    assert pilot.task_events_heard() == ids_and_kinds(events)
    assert pilot.wms.event_messages() == [("task_events", 300)]


async def test_a_message_carries_at_most_max_events_per_message_oldest_first(
    pilot: Pilot,
) -> None:
    n = 2 * MAX_EVENTS_PER_MESSAGE + 200
    events = lifecycle(n)
    for event in events:
        pilot.reporter.task_event(event)

    pilot.reporter.start()

    await eventually(lambda: len(pilot.task_events_heard()) >= n, f"all {n} events are heard")
    assert pilot.task_events_heard() == ids_and_kinds(events)
    assert pilot.wms.event_messages() == [
        ("task_events", MAX_EVENTS_PER_MESSAGE),
        ("task_events", MAX_EVENTS_PER_MESSAGE),
        ("task_events", 200),
    ]


async def test_a_lone_event_goes_out_at_once_in_its_own_message(pilot: Pilot) -> None:
    pilot.reporter.start()
    await eventually(lambda: ("status", 1) in pilot.wms.received, "the pilot's first status")
    first, second = lifecycle(2)

    pilot.reporter.task_event(first)
    await eventually(lambda: len(pilot.task_events_heard()) == 1, "the first event is heard")
    pilot.reporter.task_event(second)
    await eventually(lambda: len(pilot.task_events_heard()) == 2, "the second event is heard")

    assert pilot.task_events_heard() == ids_and_kinds([first, second])
    assert pilot.wms.event_messages() == [("task_events", 1), ("task_events", 1)]


async def test_phase_changes_go_before_task_events_and_the_status_after_them(
    pilot: Pilot,
) -> None:
    pilot.reporter.set_phase(taskforce_pb2.PILOT_PHASE_TASKING)
    for event in lifecycle(4):
        pilot.reporter.task_event(event)

    pilot.reporter.start()

    await eventually(lambda: len(pilot.wms.received) >= 5, "hello, two phases, events, status")
    assert pilot.wms.received[:5] == [
        ("hello", 1),
        ("status", 1),  # PILOT_PHASE_STARTED
        ("status", 1),  # PILOT_PHASE_TASKING
        ("task_events", 4),
        ("status", 1),  # the coalesced status
    ]
    phases = [c.pilot.phase for c in pilot.heard if c.kind is ChangeKind.STATUS]
    assert phases[:2] == [taskforce_pb2.PILOT_PHASE_STARTED, taskforce_pb2.PILOT_PHASE_TASKING]
