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


def lingering_link(env: QueueEnv, queue_id: str, linger: float, flush_at: int) -> QueueLink:
    side = QueueSide((queue_id,), "embedded", env.wms.address, env.alice_token)
    return QueueLink(
        side, MAX_EVENT_BYTES, "test-out", Outage("the WMS", 60), linger=linger, flush_at=flush_at
    )


async def publish_spread(link: QueueLink, queue_id: str, n: int, gap: float) -> None:
    """``n`` publishes, one every ``gap`` seconds (as tasks ending one after another)."""

    async def one(i: int) -> None:
        await asyncio.sleep(i * gap)
        await link.publish(queue_id, [queue_pb2.Event(payload=b"%d" % i)])

    await asyncio.gather(*(one(i) for i in range(n)))


async def test_publishes_within_the_linger_go_in_one_call(env: QueueEnv) -> None:
    queue_id = env.queue("out").queue_id
    # Outputs 50 ms apart: with a 2 s linger all four travel together; with none, one by one.
    lingering = lingering_link(env, queue_id, linger=2.0, flush_at=100)
    eager = lingering_link(env, queue_id, linger=0.0, flush_at=100)
    try:
        await publish_spread(lingering, queue_id, 4, 0.05)
        await publish_spread(eager, queue_id, 4, 0.05)
    finally:
        await lingering.close()
        await eager.close()
    events = await received(env, queue_id, 8)
    stamps = sorted(e.published_ts.ToNanoseconds() for e in events)
    assert len(set(stamps[:4])) == 1, "the lingering publishes went in more than one call"
    assert len(set(stamps[4:])) == 4, "publishes without a linger were merged"


async def test_a_full_batch_goes_before_the_linger_ends(env: QueueEnv) -> None:
    queue_id = env.queue("out").queue_id
    # A 30 s linger, but three waiting publishes fill the batch: they go at once.
    link = lingering_link(env, queue_id, linger=30.0, flush_at=3)
    try:
        await asyncio.wait_for(publish_spread(link, queue_id, 3, 0.02), 10)
        link.set_flush_at(1)
        # Now every publish is a batch of its own: no linger at all.
        await asyncio.wait_for(publish_spread(link, queue_id, 2, 0.0), 10)
    finally:
        await link.close()
    events = await received(env, queue_id, 5)
    assert len(events) == 5
