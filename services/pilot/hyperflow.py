"""Monitoring events on a RabbitMQ topic exchange, as hyperflow-amqp-executor publishes them
(``shared/design/HYPERFLOW.md``, "Monitoring events"), so its metric collector and dashboards work
with our pilots.

Each message is a JSON object with ``timestamp`` (UTC seconds, float), ``type``, ``executor`` (the
executor id) and the event's fields. Routing keys: ``executor.ready``, and for a task's events
``job.<job>.<phase>``: ``job.EV-1.started``, ``job.EV-1.stage_in.finished``,
``job.EV-1.execution.started``, ``job.EV-1.finished``. Phases use underscores (``stage_in``), as the
executor's code does; its README's hyphens match nothing.

:class:`EventsExchange` publishes. ``emit`` only appends to a bounded buffer and wakes the AMQP I/O
thread (:mod:`services.events.amqp`), which publishes with publisher confirms; a task never waits
for the broker, and a lost broker only costs events: the buffer keeps at most ``max_buffered``
unsent or unconfirmed messages and drops (and counts) the rest, a message is sent at most
``MAX_SEND_ATTEMPTS`` times, and the connection is reopened in the background with jittered
exponential backoff.

:class:`EventsSubscription` consumes through a server-named, exclusive, auto-delete queue bound to
the exchange: ``ewms pilot metrics`` (the metric collector) and tests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import pika
import structlog
from pika import spec

from services.events.amqp import (
    DEFAULT_CONNECT_ATTEMPTS,
    AmqpChannel,
    AmqpConnection,
    RawMessage,
    broker_error,
)
from services.events.client import QueueAccessDenied, QueueError, QueueNotFound

log = structlog.get_logger(__name__)

T = TypeVar("T")

# The exchange hyperflow-amqp-executor publishes to.
DEFAULT_EXCHANGE = "hyperflow.events"
# Unsent plus unconfirmed messages kept at most; more are dropped (and counted).
MAX_BUFFERED = 10_000
# A message whose channel closed before RabbitMQ confirmed it (or that RabbitMQ nacked) is sent
# again, up to this many sends in all, then dropped.
MAX_SEND_ATTEMPTS = 3
# Backoff between reconnection attempts: the first delay, doubled after each failure up to the cap;
# each wait is drawn uniformly from [delay / 2, delay].
RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 30.0
# Seconds one connection attempt may take.
RECONNECT_TIMEOUT = 10.0
# Seconds ``open`` waits for RabbitMQ to confirm executor.ready.
READY_CONFIRM_TIMEOUT = 10.0
# AMQP limits a routing key to 255 bytes.
MAX_ROUTING_KEY_BYTES = 255
# Unacked deliveries an EventsSubscription holds (it acks on arrival).
SUBSCRIPTION_PREFETCH = 1000


def routing_key(type: str, job: str | None = None) -> str:
    """The routing key of an event: ``job.<job>.<type after "job.">`` for a task's events (``job``
    given, ``type`` starting with ``job.``), else ``type`` itself."""
    if job is not None and type.startswith("job."):
        return f"job.{job}.{type.removeprefix('job.')}"
    return type


def event_body(
    type: str, executor: str, job: str | None, fields: dict[str, Any], timestamp: float
) -> bytes:
    """The JSON body of an event. ``timestamp``, ``type``, ``executor`` (and ``job``) come first and
    win over fields of the same name. Values JSON cannot encode are written as their ``str``."""
    body: dict[str, Any] = {"timestamp": timestamp, "type": type, "executor": executor}
    if job is not None:
        body["job"] = job
    for name, value in fields.items():
        body.setdefault(name, value)
    return json.dumps(body, default=str, ensure_ascii=False).encode("utf-8")


async def declare_exchange(connection: AmqpConnection, exchange: str) -> None:
    """Make sure the durable topic exchange ``exchange`` exists: declare it, or -- when the
    credentials may not configure it -- accept it if it already exists (passive declare). Raises
    QueueNotFound when it is missing and may not be created, QueueAccessDenied or QueueError with
    what RabbitMQ said otherwise."""
    channel = await connection.channel()
    denied: QueueAccessDenied | None = None
    try:
        await channel.declare_exchange(exchange, "topic")
        return
    except QueueAccessDenied as exc:
        denied = exc  # may not configure: an existing exchange will do (checked below)
    except QueueError as exc:
        raise type(exc)(
            f"cannot declare exchange {exchange!r} (durable, topic) at {connection.where}: {exc}"
        ) from None
    finally:
        await channel.close()
    try:
        await check_exchange(connection, exchange)
    except QueueNotFound:
        raise QueueNotFound(
            f"exchange {exchange!r} does not exist at {connection.where} and these credentials "
            f"may not create it ({denied}); create it (a durable topic exchange) or use "
            "credentials with configure permission"
        ) from None


async def check_exchange(connection: AmqpConnection, exchange: str) -> None:
    """Passive declare: QueueNotFound unless ``exchange`` exists (needs no permission)."""
    channel = await connection.channel()
    try:
        await channel.rpc(
            lambda ch, cb: ch.exchange_declare(exchange, passive=True, callback=cb),
            lambda _frame: None,
        )
    except QueueNotFound:
        raise QueueNotFound(f"exchange {exchange!r} does not exist at {connection.where}") from None
    finally:
        await channel.close()


@dataclass
class _Message:
    routing_key: str
    body: bytes
    properties: Any
    sends: int = 0


class _Publisher:
    """One confirm-mode channel publishing the buffered messages of an :class:`EventsExchange`,
    until it closes. ``_io_*`` methods run in its connection's I/O thread."""

    def __init__(self, owner: EventsExchange, channel: AmqpChannel) -> None:
        self.owner = owner
        self.channel = channel
        self.connection = channel.connection
        self.unconfirmed: dict[int, _Message] = {}
        self.next_tag = 0
        self.lost = False
        self.drain_scheduled = False  # guarded by owner._lock

    @classmethod
    async def open(cls, owner: EventsExchange, connection: AmqpConnection) -> _Publisher:
        channel = await connection.channel()
        publisher = cls(owner, channel)

        def select(ch: Any, callback: Callable[[Any], None]) -> None:
            ch.add_on_close_callback(publisher._io_on_close)
            ch.confirm_delivery(publisher._io_on_confirm, callback=callback)

        try:
            await channel.rpc(select, lambda _frame: None)
        except BaseException:
            await channel.close()
            raise
        return publisher

    def schedule_drain(self, force: bool = False) -> None:
        """Have the I/O thread publish what is buffered (once, however often asked meanwhile)."""
        with self.owner._lock:
            if self.drain_scheduled and not force:
                return
            self.drain_scheduled = True
        if not self.connection.submit(self._io_drain):
            with self.owner._lock:
                self.drain_scheduled = False

    def _io_drain(self) -> None:
        owner = self.owner
        with owner._lock:
            self.drain_scheduled = False
            if self.lost or owner._publisher is not self:
                return
            batch = list(owner._unsent)
            owner._unsent.clear()
        ch = self.channel.pika_channel
        for i, message in enumerate(batch):
            if not ch.is_open:
                owner._io_requeue(batch[i:], "the channel closed before publishing")
                return
            self.next_tag += 1
            message.sends += 1
            self.unconfirmed[self.next_tag] = message
            try:
                ch.basic_publish(
                    owner.exchange, message.routing_key, message.body, message.properties
                )
            except Exception:
                # Not sent, so not numbered by RabbitMQ either.
                del self.unconfirmed[self.next_tag]
                self.next_tag -= 1
                message.sends -= 1
                if not ch.is_open:
                    owner._io_requeue(batch[i:], "the channel closed before publishing")
                    return
                log.exception("cannot publish a monitoring event", key=message.routing_key)
                owner._io_settled([], dropped=[message])

    def _io_on_confirm(self, frame: Any) -> None:
        method = frame.method
        if method.multiple:
            tags = list(itertools.takewhile(lambda t: t <= method.delivery_tag, self.unconfirmed))
        else:
            tags = [method.delivery_tag]
        done = [m for m in (self.unconfirmed.pop(t, None) for t in tags) if m is not None]
        if isinstance(method, spec.Basic.Nack):
            self.owner._io_requeue(done, "RabbitMQ nacked them")
            self.schedule_drain()
        else:
            self.owner._io_settled(done)

    def _io_on_close(self, _ch: Any, reason: BaseException) -> None:
        self.lost = True
        unconfirmed = list(self.unconfirmed.values())
        self.unconfirmed.clear()
        # Sent but unconfirmed: they may or may not have arrived; sending again may duplicate.
        self.owner._io_requeue(unconfirmed, "the channel closed before RabbitMQ confirmed them")
        self.owner._post(self.owner._on_lost, self, reason)


class EventsExchange:
    """Publishes monitoring events to a topic exchange. Open with :meth:`open` (bound to the running
    event loop); ``emit`` may be called from any thread."""

    def __init__(
        self,
        url: str,
        exchange: str,
        executor_id: str,
        *,
        max_buffered: int,
        connection_name: str,
    ) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self.exchange = exchange
        self.executor_id = executor_id
        self._url = url
        self._name = connection_name
        self._max_buffered = max_buffered
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        # Guarded by _lock: messages not yet handed to a channel, their count plus the
        # unconfirmed ones, drops, and who waits for the buffer to empty.
        self._unsent: collections.deque[_Message] = collections.deque()
        self._buffered = 0
        self._dropped = 0
        self._burst = 0  # drops since the buffer was last not full
        self._accepting = True
        self._flush_waiters: list[asyncio.Future[None]] = []
        # Event loop only.
        self._connection: AmqpConnection | None = None
        self._publisher: _Publisher | None = None
        self._lost = asyncio.Event()
        self._reconnector: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        exchange: str,
        *,
        executor_id: str,
        hostname: str,
        max_buffered: int = MAX_BUFFERED,
        connection_name: str | None = None,
    ) -> EventsExchange:
        """Connect to ``url`` (``amqp://user:pass@host:5672/%2F``), make sure the durable topic
        exchange exists (see :func:`declare_exchange`) and publish ``executor.ready`` with
        ``hostname``, confirmed. Raises QueueError (QueueAccessDenied, QueueNotFound) saying what
        failed when the broker is unreachable or refuses."""
        self = cls(
            url,
            exchange,
            executor_id,
            max_buffered=max_buffered,
            connection_name=connection_name or f"ewms-pilot-events-{executor_id}"[:64],
        )
        try:
            await self._connect()
            self.emit("executor.ready", hostname=hostname.strip())
            try:
                await asyncio.wait_for(self._flushed(), READY_CONFIRM_TIMEOUT)
            except TimeoutError:
                raise QueueError(
                    f"RabbitMQ at {self._where} did not confirm executor.ready on exchange "
                    f"{exchange!r} within {READY_CONFIRM_TIMEOUT:.0f} s"
                ) from None
        except BaseException:
            self._accepting = False
            if self._connection is not None:
                await self._connection.close()
            raise
        self._reconnector = asyncio.create_task(self._reconnect_when_lost())
        return self

    @property
    def dropped(self) -> int:
        """Events dropped so far: buffer full, send attempts used up, or left at close."""
        with self._lock:
            return self._dropped

    @property
    def buffered(self) -> int:
        """Events emitted and not yet confirmed by RabbitMQ."""
        with self._lock:
            return self._buffered

    @property
    def is_connected(self) -> bool:
        """A channel to publish on is open now."""
        publisher = self._publisher
        return publisher is not None and not publisher.lost and publisher.connection.is_open

    def emit(self, type: str, job: str | None = None, **fields: Any) -> None:
        """Publish one event (see the module docstring) without waiting. Never blocks the event
        loop and never raises: monitoring must not break tasks."""
        try:
            self._emit(type, job, fields)
        except Exception:
            log.exception("monitoring event lost", type=type, job=job)
            with self._lock:
                self._dropped += 1

    def _emit(self, type: str, job: str | None, fields: dict[str, Any]) -> None:
        now = time.time()
        key = routing_key(type, job)
        if not type or len(key.encode("utf-8")) > MAX_ROUTING_KEY_BYTES:
            log.warning("monitoring event dropped: bad type or job", type=type, job=job)
            with self._lock:
                self._dropped += 1
            return
        properties = pika.BasicProperties(
            content_type="application/json", type=type, timestamp=int(now)
        )
        message = _Message(key, event_body(type, self.executor_id, job, fields, now), properties)
        with self._lock:
            if not self._accepting:
                self._dropped += 1
                return
            full = self._buffered >= self._max_buffered
            if full:
                self._dropped += 1
                self._burst += 1
                first_drop, ended_burst = self._burst == 1, 0
            else:
                first_drop, ended_burst, self._burst = False, self._burst, 0
                self._unsent.append(message)
                self._buffered += 1
        if first_drop:
            log.warning(
                "monitoring events buffer full: dropping events until RabbitMQ catches up",
                exchange=self.exchange,
                max_buffered=self._max_buffered,
            )
        if ended_burst:
            log.warning("monitoring events dropped while the buffer was full", n=ended_burst)
        if full:
            return
        publisher = self._publisher
        if publisher is not None:
            publisher.schedule_drain()

    # A timeout parameter, not asyncio.timeout(): past it close() still closes, it does not raise.
    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Stop accepting events, wait up to ``timeout`` seconds for RabbitMQ to confirm those
        buffered (reconnecting meanwhile if need be), then close. Events still unconfirmed count
        as dropped. Idempotent."""
        with self._lock:
            if not self._accepting:
                return
            self._accepting = False
        deadline = self._loop.time() + timeout
        while (remaining := deadline - self._loop.time()) > 0:
            try:
                await asyncio.wait_for(self._flushed(), remaining)
                break
            except TimeoutError:
                break
            except QueueError:
                continue  # the channel was lost while flushing; the reconnector takes over
        if self._reconnector is not None:
            self._reconnector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnector
        self._publisher = None
        if self._connection is not None:
            await self._connection.close()
        with self._lock:
            left, self._buffered = self._buffered, 0
            self._unsent.clear()
            self._dropped += left
        if left:
            log.warning(
                "monitoring events not confirmed by RabbitMQ at close: dropped",
                n=left,
                exchange=self.exchange,
            )

    async def __aenter__(self) -> EventsExchange:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # event loop

    @property
    def _where(self) -> str:
        # Never the URL: it holds the password.
        return self._connection.where if self._connection is not None else "the broker"

    async def _connect(self) -> None:
        """(Re)open the connection if it is gone, declare the exchange, open a publishing channel
        and publish what is buffered."""
        connection = self._connection
        if connection is None or not connection.is_open:
            if connection is not None:
                await connection.close()  # joins its finished I/O thread
            # Reconnecting: one attempt each time, the backoff is ours.
            attempts = DEFAULT_CONNECT_ATTEMPTS if connection is None else 1
            connection = await AmqpConnection.open(
                self._url,
                name=self._name,
                connect_timeout=RECONNECT_TIMEOUT,
                connect_attempts=attempts,
            )
            self._connection = connection
        await declare_exchange(connection, self.exchange)
        publisher = await _Publisher.open(self, connection)
        self._publisher = publisher
        publisher.schedule_drain(force=True)

    async def _reconnect_when_lost(self) -> None:
        delay = RECONNECT_FIRST_DELAY
        while True:
            await self._lost.wait()
            self._lost.clear()
            while True:
                await asyncio.sleep(random.uniform(delay / 2, delay))
                try:
                    await self._connect()
                except Exception as exc:  # QueueError, or a surprise: keep trying either way
                    delay = min(delay * 2, RECONNECT_MAX_DELAY)
                    log.warning(
                        "monitoring events: reconnecting failed",
                        exchange=self.exchange,
                        error=str(exc),
                        retry_in=f"{delay / 2:.1f}-{delay:.1f} s",
                    )
                    continue
                log.info("monitoring events: reconnected", exchange=self.exchange)
                delay = RECONNECT_FIRST_DELAY
                break

    async def _flushed(self) -> None:
        """Return once nothing is buffered; QueueError if the channel is lost meanwhile."""
        with self._lock:
            if self._buffered == 0:
                return
            waiter = self._loop.create_future()
            self._flush_waiters.append(waiter)
        await waiter

    def _on_lost(self, publisher: _Publisher, reason: BaseException) -> None:
        if publisher is not self._publisher:
            return  # an old channel, or closed by close()
        self._publisher = None
        error = broker_error(
            reason, f"RabbitMQ closed the channel publishing to exchange {self.exchange!r}"
        )
        with self._lock:
            waiters, self._flush_waiters = self._flush_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
        if self._reconnector is not None:  # else open() fails with the error
            log.warning("monitoring events: connection lost; reconnecting", error=str(error))
        self._lost.set()

    def _wake_flush_waiters(self) -> None:
        with self._lock:
            if self._buffered:
                return
            waiters, self._flush_waiters = self._flush_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` in the event loop (from the I/O thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(fn, *args)

    # I/O thread

    def _io_settled(self, done: Sequence[_Message], dropped: Sequence[_Message] = ()) -> None:
        """``done`` were confirmed and ``dropped`` given up: they leave the buffer."""
        with self._lock:
            self._buffered -= len(done) + len(dropped)
            self._dropped += len(dropped)
            wake = self._buffered == 0 and bool(self._flush_waiters)
        if wake:
            self._post(self._wake_flush_waiters)

    def _io_requeue(self, messages: Sequence[_Message], why: str) -> None:
        """Put ``messages`` back in front of the buffer, in order, but drop those sent
        MAX_SEND_ATTEMPTS times already."""
        keep = [m for m in messages if m.sends < MAX_SEND_ATTEMPTS]
        given_up = [m for m in messages if m.sends >= MAX_SEND_ATTEMPTS]
        with self._lock:
            self._unsent.extendleft(reversed(keep))
        if given_up:
            log.warning(
                "monitoring events dropped after their last send attempt",
                n=len(given_up),
                attempts=MAX_SEND_ATTEMPTS,
                why=why,
            )
            self._io_settled([], dropped=given_up)


@dataclass(frozen=True)
class ReceivedEvent:
    """An event as consumed from the exchange."""

    routing_key: str
    body: bytes

    def fields(self) -> dict[str, Any] | None:
        """The JSON object in the body, or None if the body is not one."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


class _End:
    def __init__(self, error: QueueError | None) -> None:
        self.error = error


class EventsSubscription:
    """Events of one exchange matching binding keys (``job.*.finished``, ``#``), through a
    server-named exclusive auto-delete queue; acked on arrival. Iterate for :class:`ReceivedEvent`
    items; iteration ends at :meth:`close` and raises QueueError if the connection is lost."""

    def __init__(self, connection: AmqpConnection, channel: AmqpChannel, queue: str) -> None:
        self.connection = connection
        self.queue = queue
        self._channel = channel
        self._inbox: asyncio.Queue[ReceivedEvent | _End] = asyncio.Queue()
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        exchange: str,
        binding_keys: Sequence[str],
        *,
        connection_name: str | None = None,
    ) -> EventsSubscription:
        """Connect, check ``exchange`` exists (QueueNotFound if not: it is not created), and bind a
        new queue to it with each of ``binding_keys``."""
        connection = await AmqpConnection.open(url, name=connection_name)
        try:
            await check_exchange(connection, exchange)
            channel = await connection.channel()
            queue = await channel.rpc(
                lambda ch, cb: ch.queue_declare("", exclusive=True, auto_delete=True, callback=cb),
                lambda frame: str(frame.method.queue),
            )
            for key in binding_keys:
                await channel.bind_queue(queue, exchange, key)
            subscription = cls(connection, channel, queue)
            await channel.consume(
                queue, SUBSCRIPTION_PREFETCH, subscription._on_message, subscription._on_gone
            )
        except BaseException:
            await connection.close()
            raise
        return subscription

    def __aiter__(self) -> AsyncIterator[ReceivedEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ReceivedEvent]:
        while True:
            item = await self._inbox.get()
            if isinstance(item, _End):
                self._inbox.put_nowait(item)
                if item.error is not None:
                    raise item.error
                return
            yield item

    async def close(self) -> None:
        """Stop consuming and close the connection (the queue goes with it). Idempotent."""
        if not self._closed:
            self._closed = True
            self._inbox.put_nowait(_End(None))
        await self.connection.close()

    async def __aenter__(self) -> EventsSubscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _on_message(self, raw: RawMessage) -> None:
        self._channel.ack_soon([raw.delivery_tag])
        if not self._closed:
            self._inbox.put_nowait(ReceivedEvent(raw.routing_key, raw.body))

    def _on_gone(self, error: QueueError | None) -> None:
        if not self._closed:
            self._closed = True
            self._inbox.put_nowait(
                _End(error or QueueError(f"the subscription to {self.queue} ended"))
            )
