"""The exact completion verdict of ``ewms run`` on RabbitMQ (services/cli/settlement.py), against
the real broker: its fence never calls outputs collected while a delivery is held or on its way
back, and a downstream queue whose producer was LOST is not balanced on counts that may fall
short."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from ewms.v1 import queue_pb2, taskforce_pb2
from services import ids
from services.cli.settlement import PassiveCounts, Settlement, Stage
from services.events.amqp import AmqpQueueClient, AmqpSubscription
from services.wms.queues.rabbitmq import RabbitBroker
from tests.conftest import RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL, require_rabbitmq


class Queues:
    """A provisioned workflow's queues on the shared broker, and an admin client."""

    def __init__(self, broker: RabbitBroker, workflow_id: str, queues: list[queue_pb2.Queue]):
        self.broker = broker
        self.workflow_id = workflow_id
        self.queues = queues
        self.ids = [q.queue_id for q in queues]

    @property
    def client(self) -> AmqpQueueClient:
        return self.broker.client

    async def publish(self, queue_id: str, n: int) -> None:
        await self.client.publish(queue_id, [queue_pb2.Event(payload=b"x") for _ in range(n)])

    async def take(
        self, queue_id: str, n: int, prefetch: int
    ) -> tuple[AmqpSubscription, list[Any]]:
        sub = await self.client.subscribe(queue_id, prefetch)
        got = []
        async for delivery in sub:
            got.append(delivery)
            if len(got) == n:
                break
        return sub, got


@pytest.fixture
async def queues() -> AsyncIterator[Queues]:
    require_rabbitmq()
    broker = await RabbitBroker.connect(RABBITMQ_URL, RABBITMQ_MANAGEMENT_URL)
    workflow_id = ids.workflow_id()
    made = [queue_pb2.Queue(queue_id=ids.queue_id(workflow_id)) for _ in range(3)]
    await broker.provision(workflow_id, made)
    try:
        yield Queues(broker, workflow_id, made)
    finally:
        await broker.delete(workflow_id, made)
        await broker.close()


def taskforce(task_id: str, succeeded: int = 0, published: int = 0, **phases: int) -> Any:
    tf = taskforce_pb2.Taskforce(task_id=task_id, taskforce_uuid=ids.taskforce_uuid(task_id))
    tf.counters.tasks_succeeded = succeeded
    tf.counters.events_published = published
    for name, n in phases.items():
        tf.compound_statuses.add(
            job_state=taskforce_pb2.JOB_STATE_RUNNING,
            pilot_phase=taskforce_pb2.PilotPhase.Value(f"PILOT_PHASE_{name}"),
            count=n,
        )
    return tf


async def test_the_fence_never_calls_outputs_collected_while_one_is_held(queues: Queues) -> None:
    [out] = queues.ids[:1]
    settlement = Settlement([], [out], PassiveCounts(queues.client))
    for _ in range(10):
        await queues.publish(out, 5)
        sub, got = await queues.take(out, 5, prefetch=5)
        await sub.ack(*got[:3])  # two still held when the fence closes the subscription
        reopened = Reopened()
        verdict = await settlement.check(0, [], sub.close, reopened)
        assert not verdict.settled and reopened.times == 1
        # What was held went back to the queue; collected and acked, the fence passes.
        sub, got = await queues.take(out, 2, prefetch=5)
        await sub.ack(*got)
        assert (await settlement.check(0, [], sub.close, lambda: None)).settled
    assert settlement.fences == 20


async def test_a_lost_producer_leaves_the_downstream_queue_to_the_drained_rule(
    queues: Queues,
) -> None:
    first, second, out = queues.ids
    stages = [
        Stage(first, frozenset({"a"}), True, {}),
        Stage(second, frozenset({"b"}), True, {"a": 1}),
    ]
    settlement = Settlement(stages, [out], PassiveCounts(queues.client))
    # Both inputs succeeded in "a". One output reached `second` from a pilot of "a" that died
    # before its status counted it (LOST), and a pilot of "b" holds it: nothing is ready, and
    # the counts balance (0 published, 0 succeeded), yet it is not settled.
    await queues.publish(second, 1)
    held, got = await queues.take(second, 1, prefetch=1)
    try:
        a = taskforce("a", succeeded=2, published=0, TASKING=1, LOST=1)
        b = taskforce("b", succeeded=0, TASKING=1)
        verdict = await settlement.check(2, [a, b], _no_fence, lambda: None)
        assert not verdict.settled
        assert verdict.settled_inputs == 2
        # Once "b" succeeded with it and every count is in (no LOST pilot), the counts decide.
        await held.ack(*got)
        a = taskforce("a", succeeded=2, published=1, TASKING=1)
        b = taskforce("b", succeeded=1, TASKING=1)
        assert (await settlement.check(2, [a, b], _no_fence, lambda: None)).settled
    finally:
        await held.close()


class Reopened:
    """Counts the fence's reopens."""

    def __init__(self) -> None:
        self.times = 0

    def __call__(self) -> None:
        self.times += 1


async def _no_fence() -> None:
    return None
