"""A consumer of one queue (:class:`AmqpSubscription`): deliveries as events with ack ids, acks
batched per event-loop turn, nacks that dead-letter at the last attempt, and leases.

A subscription whose channel or connection is lost ends with a
:class:`~services.events.client.QueueError`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import structlog

from ewms.v1 import queue_pb2
from services.events.amqp.channel import AmqpChannel
from services.events.amqp.codec import RawMessage, dead_letter_message, header_int, message_event
from services.events.client import QueueError

if TYPE_CHECKING:
    # Annotations only: the client module builds subscriptions and imports this one at run time.
    from services.events.amqp.client import AmqpQueueClient

log = structlog.get_logger(__name__)


@dataclass
class _Held:
    """A delivery out with a subscriber."""

    raw: RawMessage
    attempt: int
    timer: asyncio.TimerHandle | None


@dataclass(frozen=True)
class _End:
    error: QueueError | None


class AmqpSubscription:
    """A consumer of one queue on its own channel (implements
    :class:`~services.events.client.Subscription`).

    Ack ids are ``<subscription>.<channel>:<delivery tag>``. Acks and nacks of deliveries no longer
    out (already acked, lease expired, subscription ended) are ignored, as RabbitMQ has requeued or
    settled them. With ``lease_seconds`` > 0 a delivery unacked that long is requeued."""

    def __init__(
        self,
        client: AmqpQueueClient,
        channel: AmqpChannel,
        queue_id: str,
        prefetch: int,
        max_attempts: int,
        lease_seconds: float,
        serial: int,
    ) -> None:
        self.queue_id = queue_id
        self._client = client
        self._channel = channel
        self._prefetch = prefetch
        self._max_attempts = max_attempts
        self._lease = lease_seconds
        self._serial = serial
        self._prefix = ""
        self._consumer_tag = ""
        self._held: dict[int, _Held] = {}
        self._inbox: asyncio.Queue[queue_pb2.Delivery | _End] = asyncio.Queue()
        self._acks: list[int] = []
        self._ack_flush_scheduled = False
        self._closed = False
        self._error: QueueError | None = None

    @property
    def prefetch(self) -> int:
        """Maximum unacked deliveries held at once."""
        return self._prefetch

    @property
    def held(self) -> int:
        """Deliveries out with this subscriber now (received, neither acked nor nacked)."""
        return len(self._held)

    async def _start(self) -> None:
        self._prefix = f"{self._serial}.{self._channel.number}:"
        self._consumer_tag = await self._channel.consume(
            self.queue_id, self._prefetch, self._on_message, self._on_gone
        )

    def __aiter__(self) -> AsyncIterator[queue_pb2.Delivery]:
        """Deliveries as they arrive; ends when closed; raises QueueError if the consumer is
        lost."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[queue_pb2.Delivery]:
        while True:
            item = await self._inbox.get()
            if isinstance(item, _End):
                self._inbox.put_nowait(item)  # for other iterators
                if item.error is not None:
                    raise item.error
                return
            yield item

    def take_ready(self) -> list[queue_pb2.Delivery]:
        """Deliveries already arrived and not yet iterated (for senders that batch)."""
        out: list[queue_pb2.Delivery] = []
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, _End):
                self._inbox.put_nowait(item)
                break
            out.append(item)
        return out

    async def ack(self, *deliveries: queue_pb2.Delivery) -> None:
        """The events are done and leave the queue. Acks of one event-loop turn go to the I/O
        thread together, without waiting for it."""
        self._acks.extend(h.raw.delivery_tag for h in self._take(deliveries))
        if self._acks and not self._ack_flush_scheduled:
            self._ack_flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_flush_scheduled = False
        tags, self._acks = self._acks, []
        self._channel.ack_soon(tags)

    async def nack(
        self, delivery: queue_pb2.Delivery, error: str, *, dead_letter: bool = False
    ) -> None:
        """Requeue the event, or -- when asked, or at the queue's ``max_attempts`` -- copy it with
        ``error`` into the dead-letter queue (confirmed) and then ack it."""
        taken = self._take([delivery])
        if not taken:
            return
        self._flush_acks()  # in order: acks made before this nack go first
        held = taken[0]
        tag = held.raw.delivery_tag
        if dead_letter or held.attempt >= self._max_attempts:
            message = dead_letter_message(held.raw, self.queue_id, error, held.attempt)
            try:
                await self._client.publish_messages([message])
            except BaseException:
                if not self._closed:
                    self._held[tag] = _Held(held.raw, held.attempt, None)
                raise
            await self._settle(self._channel.ack([tag]))
        else:
            await self._settle(self._channel.nack([tag], requeue=True))

    async def set_prefetch(self, prefetch: int) -> None:
        """Hold at most ``prefetch`` from now on. RabbitMQ applies ``basic.qos`` only to consumers
        started after it, so a new consumer with the new limit starts on this channel and then
        the old one is cancelled: what the old one delivered stays held here and is acked as
        before (until then the subscriber may hold up to both limits). Paused: kept for later."""
        if not 1 <= prefetch <= 65535:
            raise ValueError(f"prefetch must be between 1 and 65535, got {prefetch}")
        if self._closed or prefetch == self._prefetch:
            return
        self._prefetch = prefetch
        if not self._consumer_tag:
            return
        old = self._consumer_tag
        self._consumer_tag = await self._channel.consume(
            self.queue_id, prefetch, self._on_message, self._on_gone
        )
        with contextlib.suppress(QueueError):
            await self._channel.cancel(old)

    async def pause(self) -> None:
        """Cancel the consumer (no new deliveries) but keep the channel, so what is held can still
        be acked or nacked."""
        if self._closed or not self._consumer_tag:
            return
        self._flush_acks()
        tag, self._consumer_tag = self._consumer_tag, ""
        with contextlib.suppress(QueueError):
            await self._channel.cancel(tag)

    async def close(self) -> None:
        """Stop consuming: cancel, then close the channel; RabbitMQ requeues the unacked
        deliveries at once. Idempotent."""
        if self._closed:
            return
        self._flush_acks()
        self._end(None)
        # Shielded: a caller cancelled meanwhile (a gRPC stream ending) must not leave the channel
        # open with its deliveries.
        await asyncio.shield(self._shut_down())

    async def _shut_down(self) -> None:
        if self._consumer_tag:
            with contextlib.suppress(QueueError):
                await self._channel.cancel(self._consumer_tag)
        await self._channel.close()

    async def __aenter__(self) -> AmqpSubscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _end(self, error: QueueError | None) -> None:
        """Mark closed (without network I/O) and end iteration."""
        if self._closed:
            return
        self._closed = True
        self._error = error
        for held in self._held.values():
            if held.timer is not None:
                held.timer.cancel()
        self._held.clear()
        self._client._subscriptions.discard(self)
        self._inbox.put_nowait(_End(error))

    async def _settle(self, call: Awaitable[None]) -> None:
        try:
            await call
        except QueueError as exc:
            log.info("ack/nack lost with the channel", queue_id=self.queue_id, error=str(exc))

    def _take(self, deliveries: Iterable[queue_pb2.Delivery]) -> list[_Held]:
        out: list[_Held] = []
        for delivery in deliveries:
            ack_id = delivery.ack_id
            if not ack_id.startswith(self._prefix):
                continue
            tag = header_int(ack_id[len(self._prefix) :])
            held = self._held.pop(tag, None) if tag is not None else None
            if held is None:
                log.debug("ack/nack of a delivery no longer out", ack_id=ack_id)
                continue
            if held.timer is not None:
                held.timer.cancel()
            out.append(held)
        return out

    def _on_message(self, raw: RawMessage) -> None:
        if self._closed:
            return  # closing the channel requeues it
        event = message_event(raw, self.queue_id)
        delivery = queue_pb2.Delivery(ack_id=f"{self._prefix}{raw.delivery_tag}", event=event)
        timer = None
        if self._lease > 0:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self._lease, self._expire, raw.delivery_tag)
            delivery.lease_expires.FromNanoseconds(time.time_ns() + int(self._lease * 1e9))
        self._held[raw.delivery_tag] = _Held(raw, event.attempt, timer)
        self._inbox.put_nowait(delivery)

    def _on_gone(self, error: QueueError | None) -> None:
        if not self._closed:
            self._end(error or QueueError(f"the subscription to {self.queue_id} ended"))

    def _expire(self, delivery_tag: int) -> None:
        held = self._held.pop(delivery_tag, None)
        if held is not None:
            log.info(
                "lease expired; requeueing",
                queue_id=self.queue_id,
                event_id=held.raw.message_id,
                lease_seconds=self._lease,
            )
            self._channel.requeue_soon(delivery_tag)
