"""AmqpQueueClient keeps its connection while the process is busy: its pika connection runs in its
own I/O thread, so heartbeats flow while the event loop is blocked and the CPUs are loaded.

(The same scenario with a pika ``BlockingConnection`` driven from the event loop loses the
connection: RabbitMQ misses two heartbeats during the blocked seconds and closes it, the ack fails
and the message is redelivered.)"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from collections.abc import Awaitable, Callable

import pytest

from ewms.v1 import queue_pb2
from services import ids
from services.events import wire
from services.events.amqp import AmqpConnection, AmqpQueueClient
from services.wms.queues.rabbitmq_admin import RabbitAdmin
from tests.conftest import RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL, require_rabbitmq

HEARTBEAT = 1
HOLD_SECONDS = 5.5
BLOCK_SECONDS = 3.0


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll ``check`` until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.2)


async def test_connection_survives_a_blocked_loop_and_busy_cpus() -> None:
    require_rabbitmq()
    admin = RabbitAdmin.for_amqp_url(RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL)
    setup = await AmqpConnection.open(RABBITMQ_URL, name="ewms-heartbeat-setup")
    queue_id = ids.queue_id(ids.workflow_id())
    exchange = wire.workflow_exchange(queue_id)
    name = f"ewms-heartbeat-{secrets.token_hex(4)}"
    client: AmqpQueueClient | None = None
    try:
        channel = await setup.channel()
        await channel.declare_exchange(exchange)
        await channel.declare_queue(queue_id, arguments={"x-queue-type": "quorum"})
        await channel.bind_queue(queue_id, exchange, queue_id)
        [event_id] = await AmqpQueueClient(setup).publish(
            queue_id, [queue_pb2.Event(payload=b"hold me")]
        )

        client = await AmqpQueueClient.connect(
            RABBITMQ_URL, heartbeat=HEARTBEAT, connection_name=name
        )
        sub = await client.subscribe(queue_id, 1)
        delivery = await asyncio.wait_for(anext(aiter(sub)), 10)
        assert delivery.event.event_id == event_id
        held_since = time.monotonic()
        busy = [
            await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
            for _ in range(2)
        ]
        try:
            time.sleep(BLOCK_SECONDS)  # noqa: ASYNC251 -- blocks the event loop on purpose
            await asyncio.sleep(HOLD_SECONDS - (time.monotonic() - held_since))
        finally:
            for process in busy:
                process.kill()
                await process.wait()
        assert time.monotonic() - held_since >= 5
        assert client.connection.is_open, client.connection.error

        await sub.ack(delivery)
        await sub.close()
        assert client.connection.is_open, client.connection.error
        # The ack reached RabbitMQ: closing did not hand the message back.
        assert await channel.counts(queue_id) == (0, 0)
        other = await AmqpQueueClient(setup).subscribe(queue_id, 1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(aiter(other)), 2)
        await other.close()

        async def listed() -> bool:
            connections = await admin.connections()
            mine = [
                c
                for c in connections
                if (c.get("client_properties") or {}).get("connection_name") == name
            ]
            return len(mine) == 1 and mine[0]["timeout"] == HEARTBEAT

        await eventually(listed, 15, "the management API lists the connection, heartbeat 1 s")
        assert client.connection.is_open, client.connection.error
    finally:
        if client is not None:
            await client.close()
            thread = client.connection.thread
            assert thread is not None and not thread.is_alive()
        cleanup = await setup.channel()
        await cleanup.delete_queue(queue_id)
        await cleanup.delete_exchange(exchange)
        await setup.close()
