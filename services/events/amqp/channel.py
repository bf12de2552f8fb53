"""One AMQP channel (:class:`AmqpChannel`): the AMQP methods the clients use, publishing with
publisher confirms, ``basic.get`` and consumers whose deliveries cross to the event loop in
batches."""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from pika import spec

from services.events.amqp.codec import OutMessage, RawMessage
from services.events.amqp.errors import _NothingSent, broker_error
from services.events.client import QueueError, QueueNotFound

if TYPE_CHECKING:
    # Annotations only: the connection module builds channels and imports this one at run time.
    from services.events.amqp.connection import AmqpConnection, _Reply

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass
class _Batch:
    """A publish call's messages awaiting confirms."""

    reply: _Reply[None]
    remaining: int
    exchanges: frozenset[str]
    error: QueueError | None = None

    def confirmed_one(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            if self.error is None:
                self.reply.resolve(None)
            else:
                self.reply.fail(self.error)


@dataclass
class _Unconfirmed:
    batch: _Batch
    exchange: str
    routing_key: str
    message_id: str
    returned: bool = False


@dataclass
class _Get:
    reply: _Reply[tuple[list[RawMessage], int]]
    queue: str
    want: int
    got: list[RawMessage] = field(default_factory=list)
    remaining: int = 0


@dataclass
class _Consumer:
    on_message: Callable[[RawMessage], None]
    on_gone: Callable[[QueueError | None], None]
    # Deliveries handed over from the I/O thread in batches: one event-loop wakeup carries every
    # message that arrived meanwhile, instead of one cross-thread call per message.
    lock: threading.Lock = field(default_factory=threading.Lock)
    buffer: list[RawMessage] = field(default_factory=list)
    scheduled: bool = False

    def hand_over(self, conn: AmqpConnection, raw: RawMessage) -> None:
        """(I/O thread) queue a delivery for the event loop."""
        with self.lock:
            self.buffer.append(raw)
            if self.scheduled:
                return
            self.scheduled = True
        conn._post(self.drain)

    def drain(self) -> None:
        """(event loop) deliver everything handed over so far, in order."""
        with self.lock:
            batch, self.buffer = self.buffer, []
            self.scheduled = False
        for raw in batch:
            self.on_message(raw)


def _raw(method: Any, properties: Any, body: bytes) -> RawMessage:
    return RawMessage(
        delivery_tag=method.delivery_tag,
        exchange=method.exchange,
        routing_key=method.routing_key,
        redelivered=bool(method.redelivered),
        properties=properties,
        body=body,
    )


class AmqpChannel:
    """One AMQP channel. Async methods are for the event loop and cross into the I/O thread; an
    error that closes the channel (403, 404, ...) fails every pending call on it."""

    def __init__(self, conn: AmqpConnection, *, confirm: bool) -> None:
        self.connection = conn
        self.number = 0
        self._confirm = confirm
        self._ch: Any = None
        self._closed: QueueError | None = None
        self._closed_by_us = False
        self._pending: set[_Reply[Any]] = set()
        self._close_waiters: list[_Reply[None]] = []
        self._next_tag = 0
        self._unconfirmed: dict[int, _Unconfirmed] = {}
        self._gets: collections.deque[_Get] = collections.deque()
        self._consumers: dict[str, _Consumer] = {}

    @property
    def is_open(self) -> bool:
        """The channel (and its connection) can still be used."""
        return self._closed is None and self.connection.is_open

    async def declare_exchange(self, name: str, kind: str = "direct") -> None:
        """Declare a durable exchange."""

        def op(reply: _Reply[None]) -> None:
            self._io_rpc(
                reply,
                lambda cb: self._ch.exchange_declare(name, kind, durable=True, callback=cb),
                lambda _frame: None,
            )

        await self.connection.call(op)

    async def declare_queue(
        self, name: str, *, passive: bool = False, arguments: Mapping[str, Any] | None = None
    ) -> int:
        """Declare a durable queue (``passive``: only check it exists; QueueNotFound if not);
        returns its number of ready messages."""

        def op(reply: _Reply[int]) -> None:
            self._io_rpc(
                reply,
                lambda cb: self._ch.queue_declare(
                    name,
                    passive=passive,
                    durable=True,
                    arguments=dict(arguments) if arguments else None,
                    callback=cb,
                ),
                lambda frame: int(frame.method.message_count),
            )

        return await self.connection.call(op)

    async def counts(self, name: str) -> tuple[int, int]:
        """(ready messages, consumers) of an existing queue, from a passive declare (needs no
        permission); QueueNotFound if it does not exist."""

        def op(reply: _Reply[tuple[int, int]]) -> None:
            self._io_rpc(
                reply,
                lambda cb: self._ch.queue_declare(name, passive=True, callback=cb),
                lambda frame: (int(frame.method.message_count), int(frame.method.consumer_count)),
            )

        return await self.connection.call(op)

    async def bind_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        """Bind a queue to an exchange."""

        def op(reply: _Reply[None]) -> None:
            self._io_rpc(
                reply,
                lambda cb: self._ch.queue_bind(queue, exchange, routing_key, callback=cb),
                lambda _frame: None,
            )

        await self.connection.call(op)

    async def delete_queue(self, name: str) -> None:
        """Delete a queue and its messages (a missing queue is fine)."""

        def op(reply: _Reply[None]) -> None:
            self._io_rpc(
                reply, lambda cb: self._ch.queue_delete(name, callback=cb), lambda _f: None
            )

        await self.connection.call(op)

    async def delete_exchange(self, name: str) -> None:
        """Delete an exchange (a missing exchange is fine)."""

        def op(reply: _Reply[None]) -> None:
            self._io_rpc(
                reply, lambda cb: self._ch.exchange_delete(name, callback=cb), lambda _f: None
            )

        await self.connection.call(op)

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        """Publish persistent, mandatory messages and wait for every confirm (confirm channels
        only). A nack → QueueError; a returned (unroutable) message → QueueNotFound; the channel
        closed by the broker → its error (ACCESS_REFUSED → QueueAccessDenied)."""
        if not self._confirm:
            raise ValueError("publish needs a channel opened with confirm=True")
        await self.connection.call(lambda reply: self._io_publish(reply, messages))

    async def get(self, queue: str, max_messages: int) -> tuple[list[RawMessage], int]:
        """``basic.get`` up to ``max_messages`` messages (unacked, on this channel) until the queue
        is empty; returns them and how many ready messages RabbitMQ said were left."""
        if max_messages <= 0:
            return [], 0

        def op(reply: _Reply[tuple[list[RawMessage], int]]) -> None:
            if self._closed is not None:
                reply.fail(self._closed)
                return
            self._gets.append(_Get(reply, queue, max_messages))
            if len(self._gets) == 1:
                self._io_get_next()

        return await self.connection.call(op)

    async def consume(
        self,
        queue: str,
        prefetch: int,
        on_message: Callable[[RawMessage], None],
        on_gone: Callable[[QueueError | None], None],
    ) -> str:
        """Start a manual-ack consumer holding at most ``prefetch`` unacked deliveries; returns its
        consumer tag. ``on_message`` gets each delivery and ``on_gone`` the end (None: closed by
        us), both in the event loop. Not readable → QueueAccessDenied; missing → QueueNotFound."""
        if not 1 <= prefetch <= 65535:
            raise ValueError(f"prefetch must be between 1 and 65535, got {prefetch}")
        consumer = _Consumer(on_message, on_gone)

        def op(reply: _Reply[str]) -> None:
            if self._closed is not None:
                reply.fail(self._closed)
                return

            def deliver(_ch: Any, method: Any, properties: Any, body: bytes) -> None:
                consumer.hand_over(self.connection, _raw(method, properties, body))

            self._pending.add(reply)
            self._ch.basic_qos(prefetch_count=prefetch)
            tag: str = self._ch.basic_consume(
                queue,
                deliver,
                auto_ack=False,
                callback=lambda frame: self._io_done(reply, str(frame.method.consumer_tag)),
            )
            self._consumers[tag] = consumer

        return await self.connection.call(op)

    async def cancel(self, consumer_tag: str) -> None:
        """Cancel a consumer. Deliveries still arriving before RabbitMQ confirms are rejected
        (requeued, which a quorum queue counts as a delivery)."""

        def op(reply: _Reply[None]) -> None:
            if self._closed is not None or consumer_tag not in self._consumers:
                self._consumers.pop(consumer_tag, None)
                reply.resolve(None)
                return
            self._pending.add(reply)
            self._ch.basic_cancel(
                consumer_tag, callback=lambda _f: self._io_cancelled(reply, consumer_tag)
            )

        await self.connection.call(op)

    async def ack(self, delivery_tags: Iterable[int]) -> None:
        """Ack deliveries (one ``basic.ack`` per tag)."""
        tags = list(delivery_tags)
        if not tags:
            return

        def op(reply: _Reply[None]) -> None:
            if self._closed is not None:
                reply.fail(self._closed)
                return
            for tag in tags:
                self._ch.basic_ack(delivery_tag=tag, multiple=False)
            reply.resolve(None)

        await self.connection.call(op)

    async def nack(self, delivery_tags: Iterable[int], *, requeue: bool = True) -> None:
        """Nack deliveries (requeue by default)."""
        tags = list(delivery_tags)
        if not tags:
            return

        def op(reply: _Reply[None]) -> None:
            if self._closed is not None:
                reply.fail(self._closed)
                return
            for tag in tags:
                self._ch.basic_nack(delivery_tag=tag, multiple=False, requeue=requeue)
            reply.resolve(None)

        await self.connection.call(op)

    def ack_soon(self, delivery_tags: Sequence[int]) -> None:
        """Ack deliveries without waiting (the I/O thread sends them in order with whatever else
        is queued; a lost channel loses them, and RabbitMQ redelivers those events)."""
        tags = list(delivery_tags)

        def run() -> None:
            if self._closed is None:
                for tag in tags:
                    self._ch.basic_ack(delivery_tag=tag, multiple=False)

        if tags and not self.connection.submit(run):
            log.info("acks lost with the connection", n=len(tags))

    def requeue_soon(self, delivery_tag: int) -> None:
        """Nack (requeue) a delivery without waiting; nothing happens if the channel is gone (then
        RabbitMQ has requeued it already)."""

        def run() -> None:
            if self._closed is None and self._ch is not None and self._ch.is_open:
                self._ch.basic_nack(delivery_tag=delivery_tag, multiple=False, requeue=True)

        self.connection.submit(run)

    async def close(self) -> None:
        """Close the channel: RabbitMQ requeues its unacked deliveries. Idempotent; never raises
        for a channel that is already gone."""

        def op(reply: _Reply[None]) -> None:
            if self._closed is not None or self._ch is None:
                reply.resolve(None)
                return
            self._closed_by_us = True
            self._close_waiters.append(reply)
            if not self._ch.is_closing:
                self._ch.close()

        with contextlib.suppress(QueueError):  # the connection is gone, the channel with it
            await self.connection.call(op)

    # I/O thread

    def _io_open(self, reply: _Reply[None]) -> None:
        def opened(ch: Any) -> None:
            self.number = ch.channel_number
            ch.add_on_return_callback(self._io_on_return)
            ch.add_on_cancel_callback(self._io_on_broker_cancel)
            ch.add_callback(self._io_on_get_empty, [spec.Basic.GetEmpty], one_shot=False)
            if self._confirm:
                ch.confirm_delivery(
                    self._io_on_confirm, callback=lambda _f: self._io_done(reply, None)
                )
            else:
                self._io_done(reply, None)

        self._pending.add(reply)
        self._ch = self.connection._pika.channel(on_open_callback=opened)
        self._ch.add_on_close_callback(self._io_on_close)

    def _io_done(self, reply: _Reply[T], value: T) -> None:
        self._pending.discard(reply)
        reply.resolve(value)

    @property
    def pika_channel(self) -> Any:
        """The pika channel, only for code running on the connection's I/O thread."""
        return self._ch

    async def rpc(
        self,
        start: Callable[[Any, Callable[[Any], None]], None],
        result: Callable[[Any], T],
    ) -> T:
        """One AMQP method this class has no wrapper for: ``start(pika_channel, callback)`` runs
        on the I/O thread, and a channel closed by the broker fails the call with a QueueError."""

        def op(reply: _Reply[T]) -> None:
            self._io_rpc(reply, lambda callback: start(self._ch, callback), result)

        return await self.connection.call(op)

    def _io_rpc(
        self,
        reply: _Reply[T],
        start: Callable[[Callable[[Any], None]], None],
        result: Callable[[Any], T],
    ) -> None:
        if self._closed is not None:
            reply.fail(self._closed)
            return
        self._pending.add(reply)
        try:
            start(lambda frame: self._io_done(reply, result(frame)))
        except Exception:
            self._pending.discard(reply)
            raise

    def _io_on_close(self, _ch: Any, reason: BaseException) -> None:
        by_us = self._closed_by_us or self.connection._closing
        error = (
            QueueError("the channel was closed")
            if by_us
            else broker_error(reason, "RabbitMQ closed the channel")
        )
        self._closed = error
        for reply in list(self._pending):
            reply.fail(error)
        self._pending.clear()
        for waiter in self._close_waiters:
            waiter.resolve(None)
        self._close_waiters.clear()
        for entry in self._unconfirmed.values():
            entry.batch.reply.fail(self._publish_error(entry.batch, reason, error, by_us))
        self._unconfirmed.clear()
        for job in self._gets:
            job.reply.fail(error)
        self._gets.clear()
        consumers = list(self._consumers.values())
        self._consumers.clear()
        for consumer in consumers:
            self.connection._post(consumer.on_gone, None if by_us else error)

    @staticmethod
    def _publish_error(
        batch: _Batch, reason: BaseException, error: QueueError, by_us: bool
    ) -> QueueError:
        text = str(getattr(reason, "reply_text", "") or "")
        if not by_us and any(f"'{name}'" in text for name in batch.exchanges):
            return error  # this batch's own exchange was refused or missing
        return QueueError(
            f"publishing interrupted before RabbitMQ confirmed it ({error}); "
            "the events may or may not be stored"
        )

    def _io_publish(self, reply: _Reply[None], messages: Sequence[OutMessage]) -> None:
        if self._closed is not None or not self._ch.is_open:
            reply.fail(_NothingSent(str(self._closed or "the channel is closed")))
            return
        if not messages:
            reply.resolve(None)
            return
        exchanges = frozenset(m.exchange or "amq.default" for m in messages)
        batch = _Batch(reply, len(messages), exchanges)
        for message in messages:
            self._next_tag += 1
            self._unconfirmed[self._next_tag] = _Unconfirmed(
                batch, message.exchange, message.routing_key, str(message.properties.message_id)
            )
            self._ch.basic_publish(
                message.exchange,
                message.routing_key,
                message.body,
                message.properties,
                mandatory=True,
            )

    def _io_on_confirm(self, frame: Any) -> None:
        method = frame.method
        nacked = isinstance(method, spec.Basic.Nack)
        if method.multiple:
            tags = list(itertools.takewhile(lambda t: t <= method.delivery_tag, self._unconfirmed))
        else:
            tags = [method.delivery_tag]
        for tag in tags:
            entry = self._unconfirmed.pop(tag, None)
            if entry is None:
                continue
            if nacked and entry.batch.error is None:
                entry.batch.error = QueueError(
                    f"RabbitMQ did not store event {entry.message_id} in {entry.routing_key} "
                    "(publish nacked)"
                )
            entry.batch.confirmed_one()

    def _io_on_return(self, _ch: Any, method: Any, properties: Any, _body: bytes) -> None:
        message_id = str(properties.message_id)
        for entry in self._unconfirmed.values():
            if (
                not entry.returned
                and entry.exchange == method.exchange
                and entry.routing_key == method.routing_key
                and entry.message_id == message_id
            ):
                entry.returned = True
                if entry.batch.error is None:
                    entry.batch.error = QueueNotFound(
                        f"queue {method.routing_key!r} not found: exchange {method.exchange!r} "
                        f"has no such queue bound (RabbitMQ returned the event: "
                        f"{method.reply_text})"
                    )
                return

    def _io_get_next(self) -> None:
        if not self._gets or self._closed is not None:
            return
        job = self._gets[0]
        if len(job.got) >= job.want:
            self._io_get_finish()
            return
        self._ch.basic_get(job.queue, self._io_on_get_ok)

    def _io_on_get_ok(self, _ch: Any, method: Any, properties: Any, body: bytes) -> None:
        if not self._gets:
            return
        job = self._gets[0]
        job.got.append(_raw(method, properties, body))
        job.remaining = int(method.message_count)
        if job.remaining == 0 or len(job.got) >= job.want:
            self._io_get_finish()
        else:
            self._io_get_next()

    def _io_on_get_empty(self, _frame: Any) -> None:
        if self._gets:
            self._gets[0].remaining = 0
            self._io_get_finish()

    def _io_get_finish(self) -> None:
        job = self._gets.popleft()
        job.reply.resolve((job.got, job.remaining))
        if self._gets:
            # pika clears its own get-callback after ours runs (on Basic.GetEmpty): next tick.
            self.connection._pika.ioloop.call_later(0, self._io_get_next)

    def _io_cancelled(self, reply: _Reply[None], consumer_tag: str) -> None:
        self._consumers.pop(consumer_tag, None)
        self._io_done(reply, None)

    def _io_on_broker_cancel(self, frame: Any) -> None:
        consumer = self._consumers.pop(frame.method.consumer_tag, None)
        if consumer is not None:
            error = QueueNotFound("RabbitMQ cancelled the consumer: the queue was deleted")
            self.connection._post(consumer.on_gone, error)
