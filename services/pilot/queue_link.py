"""The pilot's connections to its queues, kept alive.

:class:`QueueLink` is one side's client (EventService over gRPC for the embedded broker, AMQP for
RabbitMQ) that reconnects after the broker or WMS went away; publishing retries a bounded number of
times. :class:`Intake` subscribes to every input queue and merges their deliveries; a subscription
that breaks is re-opened with backoff (its unacked deliveries went back to the queue), and after
too many failed attempts in a row the intake fails -- nothing retries forever.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from ewms.v1 import queue_pb2
from services.events.amqp import AmqpQueueClient
from services.events.client import (
    EventTooLarge,
    QueueAccessDenied,
    QueueClient,
    QueueClosed,
    QueueError,
    QueueNotFound,
    Subscription,
)
from services.events.grpc_client import GrpcQueueClient
from services.pilot.config import QueueSide

log = structlog.get_logger(__name__)

PUBLISH_ATTEMPTS = 5
RECONNECT_ATTEMPTS = 10
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
PERMANENT_ERRORS = (EventTooLarge, QueueAccessDenied, QueueNotFound, QueueClosed)


def backoff(attempt: int) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th retry (0-based)."""
    return random.uniform(BACKOFF_FIRST / 2, min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt))


class QueueLink:
    """One side's queue client, re-created when its connection is gone."""

    def __init__(self, side: QueueSide, max_event_bytes: int, name: str) -> None:
        self.side = side
        self._max_event_bytes = max_event_bytes
        self._name = name
        self._client: QueueClient | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> QueueClient:
        """The connected client (connecting if needed)."""
        client = self._client
        if client is not None and (not isinstance(client, AmqpQueueClient) or client.is_open):
            return client  # the common case, without the lock
        async with self._lock:
            client = self._client
            if isinstance(client, AmqpQueueClient) and not client.is_open:
                await client.close()
                client = self._client = None
            if client is None:
                client = self._client = await self._connect()
            return client

    async def _connect(self) -> QueueClient:
        side = self.side
        if side.broker_type == "rabbitmq":
            return await AmqpQueueClient.connect(
                side.address,
                max_attempts={q: side.max_attempts for q in side.queues},
                max_event_bytes=self._max_event_bytes,
                connection_name=self._name,
                # On the pilot's own loop: it never blocks, and a per-call hand-over to an I/O
                # thread costs more CPU than the rest of an event's handling.
                io_thread=False,
            )
        return GrpcQueueClient.connect(
            side.address, side.token, max_event_bytes=self._max_event_bytes
        )

    async def publish(self, queue_id: str, events: Sequence[queue_pb2.Event]) -> None:
        """Publish durably, retrying connection failures a bounded number of times."""
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                client = await self.client()
                await client.publish(queue_id, events)
                return
            except PERMANENT_ERRORS:
                raise
            except QueueError as exc:
                if attempt == PUBLISH_ATTEMPTS - 1:
                    raise
                log.warning("publish failed; retrying", queue=queue_id, error=str(exc))
                await asyncio.sleep(backoff(attempt))

    async def close(self) -> None:
        """Close the client."""
        if self._client is not None:
            await self._client.close()
            self._client = None


@dataclass
class Received:
    """A delivery and the subscription to ack or nack it on."""

    delivery: queue_pb2.Delivery
    subscription: Subscription
    queue_id: str


class IntakeFailed(Exception):
    """An input queue could not be (re)subscribed; the message says why."""


class Intake:
    """Deliveries of every input queue, merged, at most ``prefetch`` held per queue."""

    def __init__(self, link: QueueLink, prefetch: int) -> None:
        self._link = link
        self._prefetch = prefetch
        self.ready: asyncio.Queue[Received] = asyncio.Queue()
        self._subscriptions: dict[str, Subscription] = {}
        self._readers: list[asyncio.Task[None]] = []
        self.failed: asyncio.Future[IntakeFailed] = asyncio.get_running_loop().create_future()
        self._closed = False
        self._paused = False
        # Called after each delivery is put into ``ready`` (the pilot's wake-up).
        self.on_ready: Callable[[], None] | None = None

    async def open(self) -> None:
        """Subscribe to every input queue (errors here are raised as they are)."""
        for queue_id in self._link.side.queues:
            self._subscriptions[queue_id] = await self._subscribe(queue_id)
        for queue_id in self._link.side.queues:
            self._readers.append(
                asyncio.create_task(self._read(queue_id), name=f"intake-{queue_id}")
            )

    async def _subscribe(self, queue_id: str) -> Subscription:
        client = await self._link.client()
        return await client.subscribe(queue_id, self._prefetch)

    async def _read(self, queue_id: str) -> None:
        failures = 0
        while not self._closed:
            subscription = self._subscriptions.get(queue_id)
            try:
                if subscription is None:
                    subscription = self._subscriptions[queue_id] = await self._subscribe(queue_id)
                    log.info("input queue re-subscribed", queue=queue_id)
                async for delivery in subscription:
                    failures = 0
                    self.ready.put_nowait(Received(delivery, subscription, queue_id))
                    if self.on_ready is not None:
                        self.on_ready()
                if self._closed:
                    return
                error: Exception = QueueError("the subscription ended")
            except PERMANENT_ERRORS as exc:
                self._fail(queue_id, exc)
                return
            except QueueError as exc:
                if self._closed:
                    return
                error = exc
            self._subscriptions.pop(queue_id, None)
            if subscription is not None:
                await subscription.close()
            if failures >= RECONNECT_ATTEMPTS:
                self._fail(queue_id, error)
                return
            log.warning("input queue lost; re-subscribing", queue=queue_id, error=str(error))
            await asyncio.sleep(backoff(failures))
            failures += 1

    def _fail(self, queue_id: str, error: Exception) -> None:
        if not self.failed.done():
            self.failed.set_result(IntakeFailed(f"input queue {queue_id}: {error}"))

    async def pause(self) -> None:
        """Take no new deliveries from any input queue (held ones can still be settled, and a
        nack then hands the event to other consumers). Idempotent."""
        if self._paused:
            return
        self._paused = True
        for subscription in list(self._subscriptions.values()):
            try:
                await subscription.pause()
            except QueueError as exc:
                log.warning("pausing an input subscription failed", error=str(exc))

    def take_ready(self) -> list[Received]:
        """Deliveries received but not taken (to nack when draining)."""
        out = []
        while not self.ready.empty():
            out.append(self.ready.get_nowait())
        return out

    async def close(self) -> None:
        """Stop consuming; unacked deliveries go back to their queues."""
        self._closed = True
        for subscription in list(self._subscriptions.values()):
            try:
                await subscription.close()
            except QueueError as exc:
                log.warning("closing an input subscription failed", error=str(exc))
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
