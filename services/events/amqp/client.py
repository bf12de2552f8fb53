"""Publish and consume events over AMQP (:class:`AmqpQueueClient`, the
:class:`~services.events.client.QueueClient` protocol): one connection, one confirm-mode channel for
publishing, one channel per subscription."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

from ewms.v1 import queue_pb2
from services import ids
from services.events.amqp.channel import AmqpChannel
from services.events.amqp.codec import OutMessage, event_message
from services.events.amqp.connection import (
    DEFAULT_CONNECT_ATTEMPTS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEARTBEAT,
    AmqpConnection,
)
from services.events.amqp.errors import _NothingSent
from services.events.amqp.subscription import AmqpSubscription
from services.events.client import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_EVENT_BYTES, EventTooLarge


class AmqpQueueClient:
    """Publish to and consume from RabbitMQ-backed event queues over AMQP (implements
    :class:`~services.events.client.QueueClient`).

    Open with :meth:`connect`. One connection (and its I/O thread, unless ``io_thread=False``) per
    client; one confirm-mode channel for publishing; one channel per subscription."""

    def __init__(
        self,
        connection: AmqpConnection,
        *,
        max_attempts: Mapping[str, int] | int = DEFAULT_MAX_ATTEMPTS,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.connection = connection
        self._max_attempts = max_attempts
        self._max_event_bytes = max_event_bytes
        self._publisher: AmqpChannel | None = None
        self._publisher_lock = asyncio.Lock()
        self._subscriptions: set[AmqpSubscription] = set()
        self._serials = itertools.count(1)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        max_attempts: Mapping[str, int] | int = DEFAULT_MAX_ATTEMPTS,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        heartbeat: int = DEFAULT_HEARTBEAT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
        connection_name: str | None = None,
        io_thread: bool = True,
    ) -> AmqpQueueClient:
        """Connect to ``url`` (``amqp://user:pass@host:5672/%2F``, e.g. a workflow's credentials).

        ``max_attempts`` is the queues' ``max_attempts`` (one number, or by queue id, default 3):
        a nack of a delivery at that attempt dead-letters the event. It must match the queue's
        (RabbitMQ's x-delivery-limit is one less), else RabbitMQ dead-letters without the error
        text. Raises QueueAccessDenied for refused credentials, QueueError if unreachable.
        ``io_thread=False`` runs the connection on this event loop (see the notes in
        :mod:`services.events.amqp.connection`)."""
        connection = await AmqpConnection.open(
            url,
            heartbeat=heartbeat,
            connect_timeout=connect_timeout,
            connect_attempts=connect_attempts,
            name=connection_name,
            io_thread=io_thread,
        )
        return cls(connection, max_attempts=max_attempts, max_event_bytes=max_event_bytes)

    @property
    def is_open(self) -> bool:
        """The connection is up."""
        return self.connection.is_open

    def max_attempts_of(self, queue_id: str) -> int:
        """The ``max_attempts`` this client applies to ``queue_id``."""
        if isinstance(self._max_attempts, int):
            return max(self._max_attempts, 1)
        return max(self._max_attempts.get(queue_id, DEFAULT_MAX_ATTEMPTS), 1)

    async def publish(self, queue_id: str, events: Sequence[queue_pb2.Event]) -> list[str]:
        """Publish the events durably (publisher confirms) and return their ids in order; events
        without an id get an ``EV-`` id and without ``published_ts`` the current time (the given
        events are not modified). EventTooLarge (nothing sent) for a payload over the limit;
        QueueNotFound for a missing queue; QueueAccessDenied without write permission."""
        for i, event in enumerate(events):
            if len(event.payload) > self._max_event_bytes:
                raise EventTooLarge(
                    f"events[{i}] ({event.event_id or 'no id yet'}): payload is "
                    f"{len(event.payload)} bytes, over the limit of {self._max_event_bytes} bytes"
                )
        now = time.time_ns()
        event_ids: list[str] = []
        messages: list[OutMessage] = []
        for event in events:
            event_id = event.event_id or ids.event_id()
            published = (
                event.published_ts.ToNanoseconds() if event.HasField("published_ts") else now
            )
            event_ids.append(event_id)
            messages.append(event_message(queue_id, event, event_id, published))
        await self.publish_messages(messages)
        return event_ids

    async def publish_messages(self, messages: Sequence[OutMessage]) -> None:
        """Publish prepared messages on the confirm channel and wait for all confirms (reopens the
        channel after an error closed it)."""
        for attempt in (1, 2):
            channel = await self._publishing_channel()
            try:
                await channel.publish(messages)
                return
            except _NothingSent:
                if attempt == 2:
                    raise

    async def subscribe(
        self,
        queue_id: str,
        prefetch: int,
        *,
        max_attempts: int | None = None,
        lease_seconds: float = 0,
    ) -> AmqpSubscription:
        """Consume ``queue_id`` on a new channel with at most ``prefetch`` unacked deliveries.
        ``max_attempts`` overrides the client's for this queue; ``lease_seconds`` > 0 requeues a
        delivery unacked that long. QueueAccessDenied if the credentials may not read the queue;
        QueueNotFound if it does not exist."""
        if not 1 <= prefetch <= 65535:
            raise ValueError(f"prefetch must be between 1 and 65535, got {prefetch}")
        attempts = max(max_attempts, 1) if max_attempts is not None else None
        channel = await self.connection.channel()
        sub = AmqpSubscription(
            self,
            channel,
            queue_id,
            prefetch,
            attempts or self.max_attempts_of(queue_id),
            lease_seconds,
            next(self._serials),
        )
        self._subscriptions.add(sub)
        try:
            await sub._start()
        except BaseException:
            sub._end(None)
            await channel.close()
            raise
        return sub

    async def close(self) -> None:
        """End open subscriptions and close the connection (RabbitMQ requeues their unacked
        deliveries). Idempotent."""
        for sub in list(self._subscriptions):
            sub._end(None)
        await self.connection.close()

    async def __aenter__(self) -> AmqpQueueClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _publishing_channel(self) -> AmqpChannel:
        channel = self._publisher
        if channel is not None and channel.is_open:
            return channel
        async with self._publisher_lock:
            if self._publisher is None or not self._publisher.is_open:
                self._publisher = await self.connection.channel(confirm=True)
            return self._publisher
