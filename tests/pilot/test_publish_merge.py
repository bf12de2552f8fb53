"""The pilot's publishes to one queue are merged while a call is out (``QueueLink.publish``), and
each caller still gets its own outcome. Through a real WMS on the embedded broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ewms.v1 import queue_pb2
from services.events.client import EventTooLarge
from services.pilot.config import QueueSide
from services.pilot.queue_link import Outage, QueueLink
from tests.events.conftest import MAX_EVENT_BYTES, QueueEnv, close_env, open_env


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[QueueEnv]:
    opened = await open_env("embedded", tmp_path / "wms-data")
    try:
        yield opened
    finally:
        await close_env(opened)


def link_to(env: QueueEnv, queue_id: str) -> QueueLink:
    side = QueueSide((queue_id,), "embedded", env.wms.address, env.alice_token)
    return QueueLink(side, MAX_EVENT_BYTES, "test-out", Outage("the WMS", 60))


async def received(env: QueueEnv, queue_id: str, n: int) -> list[queue_pb2.Event]:
    out: list[queue_pb2.Event] = []
    async with await env.client().subscribe(queue_id, n) as sub:
        async for delivery in sub:
            out.append(delivery.event)
            await sub.ack(delivery)
            if len(out) == n:
                break
    return out


async def test_publishes_waiting_together_go_in_one_call(env: QueueEnv) -> None:
    queue_id = env.queue("out").queue_id
    link = link_to(env, queue_id)
    try:
        await asyncio.gather(
            *(link.publish(queue_id, [queue_pb2.Event(payload=b"%d" % i)]) for i in range(3))
        )
    finally:
        await link.close()
    events = await received(env, queue_id, 3)
    assert sorted(e.payload for e in events) == [b"0", b"1", b"2"]
    # The WMS stamps one publish time on every event of a call.
    assert len({e.published_ts.ToNanoseconds() for e in events}) == 1


async def test_an_event_too_large_fails_only_its_own_publish(env: QueueEnv) -> None:
    queue_id = env.queue("out").queue_id
    link = link_to(env, queue_id)
    big = queue_pb2.Event(payload=b"x" * (MAX_EVENT_BYTES + 1))
    try:
        outcomes = await asyncio.gather(
            link.publish(queue_id, [queue_pb2.Event(payload=b"a")]),
            link.publish(queue_id, [big]),
            link.publish(queue_id, [queue_pb2.Event(payload=b"c")]),
            return_exceptions=True,
        )
    finally:
        await link.close()
    assert outcomes[0] is None and outcomes[2] is None, outcomes
    assert isinstance(outcomes[1], EventTooLarge), outcomes
    events = await received(env, queue_id, 2)
    assert sorted(e.payload for e in events) == [b"a", b"c"]
