"""The embedded event path's batching (issue 16, item 1), through a real WMS: stream acks ride in
later commits but are committed within ``LAZY_COMMIT_SECONDS``; a deep-prefetch subscriber gets
deliveries together and sends its acks together; a subscription's pending acks are sent when it
closes; a shallow one acks at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from ewms.v1 import event_service_pb2, queue_pb2
from services.events import grpc_client
from services.events.client import QueueError
from services.wms.queues import embedded, event_service
from tests.events.conftest import QueueEnv, close_env, open_env


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[QueueEnv]:
    """A WMS on the embedded broker with alice's workflow."""
    opened = await open_env("embedded", tmp_path / "wms-data")
    try:
        yield opened
    finally:
        await close_env(opened)


def events(n: int) -> list[queue_pb2.Event]:
    return [queue_pb2.Event(payload=str(i).encode()) for i in range(n)]


async def stored_rows(env: QueueEnv, queue_id: str) -> int:
    """Event rows of the queue in SQLite (what a crash would leave)."""

    def count(tx: object) -> int:
        sql = tx.sql  # type: ignore[attr-defined]
        return int(
            sql.execute("SELECT count(*) FROM events WHERE queue_id = ?", (queue_id,)).fetchone()[0]
        )

    return await env.wms.store.run(count, write=False)  # type: ignore[arg-type]


async def in_flight(env: QueueEnv, queue_id: str) -> int:
    stats = await env.events.GetQueueStats(
        event_service_pb2.GetQueueStatsRequest(queue_id=queue_id), metadata=env.alice
    )
    return int(stats.in_flight)


async def until(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> float:
    """Wait until ``await check()`` is true; returns the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not true within {within} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_a_stream_ack_alone_is_committed_within_the_lazy_bound(env: QueueEnv) -> None:
    queue_id = env.queue("in").queue_id
    client = env.client()
    await client.publish(queue_id, events(1))
    assert await stored_rows(env, queue_id) == 1
    async with await client.subscribe(queue_id, 1) as sub:
        async for delivery in sub:
            await sub.ack(delivery)
            break

        async def deleted() -> bool:
            return await stored_rows(env, queue_id) == 0

        # Nothing else is written: the lazy commit's own timer commits it.
        took = await until(deleted, embedded.LAZY_COMMIT_SECONDS + 3.0)
        assert took < embedded.LAZY_COMMIT_SECONDS + 3.0


async def test_a_lazy_ack_rides_in_the_next_publish(
    env: QueueEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "LAZY_COMMIT_SECONDS", 60.0)
    queue_id = env.queue("in").queue_id
    client = env.client()
    await client.publish(queue_id, events(1))
    async with await client.subscribe(queue_id, 1) as sub:
        async for delivery in sub:
            await sub.ack(delivery)
            break

        async def acked() -> bool:
            return await in_flight(env, queue_id) == 0

        await until(acked)
        assert await stored_rows(env, queue_id) == 1  # acked, not yet committed
        await client.publish(queue_id, events(1))
        # The publish's commit took the ack along: one row, the new event's.
        assert await stored_rows(env, queue_id) == 1
        async for delivery in sub:
            assert delivery.event.payload == b"0"
            await sub.ack(delivery)
            break


async def test_a_deep_prefetch_subscriber_gets_deliveries_together(
    env: QueueEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_service, "DELIVERY_LINGER_SECONDS", 1.0)
    queue_id = env.queue("in").queue_id
    call = env.events.Subscribe(metadata=env.alice)
    await call.write(
        event_service_pb2.SubscribeRequest(
            open=event_service_pb2.SubscribeOpen(queue_id=queue_id, prefetch=256)
        )
    )
    assert (await call.read()).WhichOneof("kind") == "opened"
    client = env.client()
    for _ in range(5):  # five commits, one after the other
        await client.publish(queue_id, events(1))
    messages, got = 0, 0
    while got < 5:
        resp = await asyncio.wait_for(call.read(), 10)
        messages += 1
        got += 1 if resp.WhichOneof("kind") == "delivery" else len(resp.batch.deliveries)
    call.cancel()
    assert messages == 1, f"{got} deliveries in {messages} messages"


async def test_a_deep_prefetch_subscription_sends_acks_together_and_on_close(
    env: QueueEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grpc_client, "ACK_LINGER_SECONDS", 60.0)
    queue_id = env.queue("in").queue_id
    client = env.client()
    await client.publish(queue_id, events(9))
    sub = await client.subscribe(queue_id, 8)  # acks go in fours
    held: list[queue_pb2.Delivery] = []
    async for delivery in sub:
        held.append(delivery)
        if len(held) == 8:
            break
    for delivery in held[:3]:
        await sub.ack(delivery)
        await asyncio.sleep(0.05)
    assert await in_flight(env, queue_id) == 8  # three acks wait for a fourth
    await sub.ack(held[3])

    async def four_out() -> bool:
        return await in_flight(env, queue_id) == 4 + 1  # four freed credits, one event left

    await until(four_out)
    await sub.ack(held[4])
    await sub.close()  # sends the pending ack: that event is not handed back
    stats = await env.events.GetQueueStats(
        event_service_pb2.GetQueueStatsRequest(queue_id=queue_id), metadata=env.alice
    )
    assert (stats.acked, stats.in_flight, stats.ready) == (5, 0, 4)


async def test_a_shallow_subscription_acks_at_once(
    env: QueueEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grpc_client, "ACK_LINGER_SECONDS", 60.0)
    queue_id = env.queue("in").queue_id
    client = env.client()
    await client.publish(queue_id, events(2))
    async with await client.subscribe(queue_id, 2) as sub:
        async for delivery in sub:
            await sub.ack(delivery)
            break

        async def settled() -> bool:
            return await in_flight(env, queue_id) == 1  # the other one

        await until(settled)


async def test_a_prefetch_out_of_range_ends_the_stream_naming_the_field(env: QueueEnv) -> None:
    queue_id = env.queue("in").queue_id
    sub = await env.client().subscribe(queue_id, 2)
    await sub.set_prefetch(10_001)
    with pytest.raises(QueueError) as raised:
        async for _ in sub:
            pass
    assert "INVALID_ARGUMENT" in str(raised.value)
    assert "prefetch.prefetch" in str(raised.value) and "between 1 and 10000" in str(raised.value)
    await sub.close()
