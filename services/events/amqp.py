"""Event queues over AMQP 0-9-1, straight to RabbitMQ: :class:`AmqpQueueClient` (the
:class:`~services.events.client.QueueClient` protocol) and the connection machinery under it, which
the WMS's RabbitMQ broker shares.

Threading: by default each :class:`AmqpConnection` is one pika ``SelectConnection`` whose I/O
loop runs in its own daemon thread, so nothing else in the process can hold up its heartbeats or
socket: a blocked or busy asyncio loop only delays the hand-over of results. Every call from asyncio
crosses into the I/O thread with ``ioloop.add_callback_threadsafe``; results and deliveries come
back with ``loop.call_soon_threadsafe``. With ``io_thread=False`` the connection is instead a pika
``AsyncioConnection`` on the caller's event loop: no thread and no cross-thread hand-over per call,
for processes whose event loop never blocks for long (the pilot: each hand-over costs a wakeup and
two GIL switches, which at hundreds of events per second is most of its CPU). Methods named
``_io_*`` run only on the I/O side (the thread, or the event loop); everything else runs in the
event loop the connection was opened in.

Messages follow :mod:`services.events.wire`. A connection that is lost stays closed: calls then
raise :class:`~services.events.client.QueueError` and open subscriptions end with it (connect
again).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import itertools
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

import pika
import pika.exceptions
import structlog
from pika import spec
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.select_connection import SelectConnection
from pika.adapters.utils.io_services_utils import (
    _AsyncPlaintextTransport as _PlaintextTransport,
)

from ewms.v1 import queue_pb2
from services import ids
from services.events import wire
from services.events.client import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_EVENT_BYTES,
    RESERVED_HEADER_PREFIX,
    EventTooLarge,
    QueueAccessDenied,
    QueueError,
    QueueNotFound,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Deliveries an event gets before it is dead-lettered, unless told per queue (the queue's
# Heartbeat timeout proposed to RabbitMQ, seconds.
DEFAULT_HEARTBEAT = 30
# Seconds one connection attempt (TCP, AMQP handshake) may take.
DEFAULT_CONNECT_TIMEOUT = 10.0
# Attempts to connect, one second apart.
DEFAULT_CONNECT_ATTEMPTS = 2
# A connection blocked by a RabbitMQ resource alarm for this long is closed (pending calls fail).
BLOCKED_CONNECTION_TIMEOUT = 120.0
# Seconds to wait for the I/O thread to close the connection and stop.
CLOSE_TIMEOUT = 10.0
# Error texts kept on dead letters are cut to this many UTF-8 bytes.
MAX_ERROR_BYTES = 4096
# Headers RabbitMQ adds on redelivery and dead-lettering; never copied into re-published messages.
BROKER_HEADERS = frozenset(
    {
        wire.H_DELIVERY_COUNT,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
DEAD_LETTER_HEADERS = frozenset({wire.H_LAST_ERROR, wire.H_ATTEMPTS, wire.H_DEAD_LETTERED_NS})
PERSISTENT = 2


# --- messages and the wire format ---


@dataclass(frozen=True)
class OutMessage:
    """A message to publish (``properties`` is a pika ``BasicProperties``)."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Any


@dataclass(frozen=True)
class RawMessage:
    """A message as RabbitMQ handed it over (consumed or got) on one channel."""

    delivery_tag: int
    exchange: str
    routing_key: str
    redelivered: bool
    properties: Any
    body: bytes

    @property
    def headers(self) -> dict[str, Any]:
        """The message's headers (a copy; empty when it has none)."""
        return dict(self.properties.headers or {})

    @property
    def message_id(self) -> str:
        """The AMQP message id: the event id."""
        return str(self.properties.message_id or "")


def header_text(value: Any) -> str:
    """A header value as text (pika gives undecodable long strings as bytes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else str(value)


def header_int(value: Any) -> int | None:
    """A header value as an integer, or None if it is not one."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def truncate_error(error: str, limit: int = MAX_ERROR_BYTES) -> str:
    """``error`` cut to at most ``limit`` UTF-8 bytes (on a character boundary)."""
    data = error.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return error
    return data[:limit].decode("utf-8", errors="ignore")


def timestamp_ns(value: Any) -> int | None:
    """Nanoseconds since the epoch of an AMQP timestamp (pika: a naive UTC datetime) or number."""
    if isinstance(value, datetime.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
        return int(aware.timestamp()) * 1_000_000_000
    number = header_int(value)
    return None if number is None else number * 1_000_000_000


def event_message(
    queue_id: str, event: queue_pb2.Event, event_id: str, published_ns: int
) -> OutMessage:
    """The AMQP message carrying ``event`` into ``queue_id`` (see :mod:`services.events.wire`)."""
    headers: dict[str, Any] = dict(event.headers)
    headers[wire.H_PUBLISHED_NS] = published_ns
    provenance = event.provenance
    for name, value in (
        (wire.H_TASKFORCE, provenance.taskforce_uuid),
        (wire.H_WORKER, provenance.worker_id),
        (wire.H_INPUT_EVENT, provenance.input_event_id),
    ):
        if value:
            headers[name] = value
    properties = pika.BasicProperties(
        message_id=event_id,
        content_type=event.content_type or None,
        delivery_mode=PERSISTENT,
        timestamp=published_ns // 1_000_000_000,
        headers=headers,
    )
    return OutMessage(wire.workflow_exchange(queue_id), queue_id, event.payload, properties)


def message_event(raw: RawMessage, queue_id: str) -> queue_pb2.Event:
    """The event in a message delivered from ``queue_id`` (or its dead-letter queue), with its
    attempt number: ``x-delivery-count`` + 1 (1 when absent). Reserved ``x-`` headers are not
    copied into ``event.headers``."""
    headers = raw.headers
    event = queue_pb2.Event(
        event_id=raw.message_id,
        queue_id=queue_id,
        payload=raw.body,
        content_type=header_text(raw.properties.content_type or ""),
    )
    for name, value in headers.items():
        if not name.lower().startswith(RESERVED_HEADER_PREFIX):
            event.headers[name] = header_text(value)
    count = header_int(headers.get(wire.H_DELIVERY_COUNT))
    event.attempt = (count or 0) + 1
    published = header_int(headers.get(wire.H_PUBLISHED_NS))
    if published is None:
        published = timestamp_ns(raw.properties.timestamp)
    if published is not None:
        event.published_ts.FromNanoseconds(published)
    for name, attr in (
        (wire.H_TASKFORCE, "taskforce_uuid"),
        (wire.H_WORKER, "worker_id"),
        (wire.H_INPUT_EVENT, "input_event_id"),
    ):
        if name in headers:
            setattr(event.provenance, attr, header_text(headers[name]))
    return event


def _republished_properties(raw: RawMessage, headers: dict[str, Any]) -> Any:
    return pika.BasicProperties(
        message_id=raw.properties.message_id,
        content_type=raw.properties.content_type,
        delivery_mode=PERSISTENT,
        timestamp=raw.properties.timestamp,
        headers=headers,
    )


def dead_letter_message(raw: RawMessage, queue_id: str, error: str, attempt: int) -> OutMessage:
    """A copy of a message from ``queue_id`` for its dead-letter queue, with the error text, the
    attempt it failed at and the time."""
    headers = {k: v for k, v in raw.headers.items() if k not in BROKER_HEADERS}
    headers[wire.H_LAST_ERROR] = truncate_error(error)
    headers[wire.H_ATTEMPTS] = attempt
    headers[wire.H_DEAD_LETTERED_NS] = time.time_ns()
    return OutMessage(
        wire.workflow_exchange(queue_id),
        wire.dead_letter_queue(queue_id),
        raw.body,
        _republished_properties(raw, headers),
    )


def redriven_message(raw: RawMessage, queue_id: str) -> OutMessage:
    """A fresh copy of a dead letter for ``queue_id`` itself: without the dead-letter and broker
    headers, so its attempts count from 1 again."""
    headers = {
        k: v
        for k, v in raw.headers.items()
        if k not in BROKER_HEADERS and k not in DEAD_LETTER_HEADERS
    }
    return OutMessage(
        wire.workflow_exchange(queue_id), queue_id, raw.body, _republished_properties(raw, headers)
    )


# --- errors ---


class _NothingSent(QueueError):
    """The publishing channel was already closed: none of the batch went out (safe to retry)."""


def broker_error(reason: BaseException, context: str = "") -> QueueError:
    """A pika exception (or close reason) as a QueueError: 403 → QueueAccessDenied, 404 →
    QueueNotFound."""
    if isinstance(reason, QueueError):
        return reason
    prefix = f"{context}: " if context else ""
    code = getattr(reason, "reply_code", None)
    text = getattr(reason, "reply_text", None)
    if isinstance(code, int):
        if code == 403:
            return QueueAccessDenied(f"{prefix}{text}")
        if code == 404:
            return QueueNotFound(f"{prefix}{text}")
        return QueueError(f"{prefix}RabbitMQ {code}: {text}")
    return QueueError(f"{prefix}{reason!r}")


def _connect_error(exc: BaseException, where: str, user: str) -> QueueError:
    """Why connecting failed, from pika's open error (possibly a workflow failure of attempts)."""
    last: BaseException = exc
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, list | tuple) and inner:
        last = inner[-1]
    auth = (
        pika.exceptions.ProbableAuthenticationError,
        pika.exceptions.AuthenticationError,
        pika.exceptions.ProbableAccessDeniedError,
    )
    if isinstance(last, auth) or getattr(last, "reply_code", None) in (403, 530):
        return QueueAccessDenied(f"RabbitMQ at {where} refused user {user!r}: {last}")
    return QueueError(f"cannot connect to RabbitMQ at {where}: {last!r}")


# --- the I/O thread ---


class _OneWritePerMessage:
    """pika hands the transport each frame of a message (method, header, body) separately, and
    the transport sends each with its own ``send()``; this joins them, so a published message costs
    one system call instead of three (on a loopback connection each one also runs the broker's
    side of TCP)."""

    def _output_marshaled_frames(self, marshaled_frames: Sequence[bytes]) -> None:
        if len(marshaled_frames) == 1:
            super()._output_marshaled_frames(marshaled_frames)  # type: ignore[misc]
            return
        data = b"".join(marshaled_frames)
        self.bytes_sent += len(data)  # type: ignore[attr-defined]
        self.frames_sent += len(marshaled_frames)  # type: ignore[attr-defined]
        self._adapter_emit_data(data)  # type: ignore[attr-defined]


class _SelectConnection(_OneWritePerMessage, SelectConnection):  # type: ignore[misc]
    """pika's SelectConnection (run by an I/O thread), one write per message."""


class _AsyncioConnection(_OneWritePerMessage, AsyncioConnection):  # type: ignore[misc]
    """pika's AsyncioConnection (on the event loop), one write per message, sent at once.

    pika's transport never sends in ``write()``: it buffers, asks the loop to watch the socket
    for writability, sends on the next turn and stops watching -- two ``epoll_ctl`` calls and a
    loop turn per message. When nothing is buffered this sends straight away (as asyncio's own
    transports do) and hands the transport only what the socket did not take."""

    def _adapter_emit_data(self, data: bytes) -> None:
        transport = self._transport
        if (
            isinstance(transport, _PlaintextTransport)
            and transport._state == transport._STATE_ACTIVE
            and not transport.get_write_buffer_size()
        ):
            try:
                sent = transport._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the transport's own write path meets the error and reports it
            if sent == len(data):
                return
            data = data[sent:]
        super()._adapter_emit_data(data)


class _Reply(Generic[T]):
    """Carries one result from the I/O thread to an asyncio future (at most once)."""

    __slots__ = ("_conn", "_future", "done")

    def __init__(self, conn: AmqpConnection, future: asyncio.Future[T]) -> None:
        self._conn = conn
        self._future = future
        self.done = False

    def resolve(self, value: T) -> None:
        """Complete with ``value`` (I/O thread)."""
        if not self.done:
            self.done = True
            self._conn._forget(self)
            self._conn._post(_settle, self._future, value, None)

    def fail(self, exc: BaseException) -> None:
        """Complete with an error (I/O thread)."""
        if not self.done:
            self.done = True
            self._conn._forget(self)
            self._conn._post(_settle, self._future, None, exc)


def _settle(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    """Set a future's outcome unless its waiter gave up (event loop)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


class AmqpConnection:
    """One AMQP connection: a pika ``SelectConnection`` run by a dedicated daemon I/O thread, or
    (``io_thread=False``) a pika ``AsyncioConnection`` on the event loop itself.

    Open with :meth:`open`; bound to the running event loop. ``close`` stops the thread."""

    def __init__(self, parameters: Any, name: str, where: str, *, io_thread: bool = True) -> None:
        self.name = name
        self.where = where
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._replies: set[_Reply[Any]] = set()
        self._finished = False
        self._closing = False
        self._error: QueueError | None = None
        self._user = str(getattr(parameters.credentials, "username", ""))
        self._opened: asyncio.Future[None] = self._loop.create_future()
        self._stopped: asyncio.Future[None] = self._loop.create_future()
        callbacks: dict[str, Any] = {
            "on_open_callback": self._io_on_open,
            "on_open_error_callback": self._io_on_open_error,
            "on_close_callback": self._io_on_close,
        }
        self._thread: threading.Thread | None = None
        if io_thread:
            self._pika: Any = _SelectConnection(parameters, **callbacks)
            self._thread = threading.Thread(
                target=self._io_run, name=f"amqp-io-{name}", daemon=True
            )
        else:
            # Connects at once, on this loop.
            self._pika = _AsyncioConnection(parameters, custom_ioloop=self._loop, **callbacks)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        heartbeat: int = DEFAULT_HEARTBEAT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
        name: str | None = None,
        io_thread: bool = True,
    ) -> AmqpConnection:
        """Connect to ``url`` (``amqp://user:pass@host:5672/%2F``). Raises QueueAccessDenied for
        refused credentials and QueueError when the broker cannot be reached in
        ``connect_attempts`` attempts of at most ``connect_timeout`` seconds each.
        ``io_thread=False``: run the connection on this event loop (see the module's notes)."""
        if connect_attempts < 1 or connect_timeout <= 0:
            raise ValueError("connect_attempts must be >= 1 and connect_timeout > 0")
        try:
            params = pika.URLParameters(url)
        except Exception as exc:
            raise QueueError(f"bad AMQP URL: {exc}") from None
        name = name or f"ewms-{secrets.token_hex(4)}"
        params.heartbeat = heartbeat
        params.connection_attempts = connect_attempts
        params.retry_delay = 1.0
        params.socket_timeout = connect_timeout
        params.stack_timeout = connect_timeout
        params.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT
        params.client_properties = {"connection_name": name, "product": "ewms"}
        where = f"{params.host}:{params.port} (vhost {params.virtual_host!r})"
        conn = cls(params, name, where, io_thread=io_thread)
        if conn._thread is not None:
            conn._thread.start()
        budget = connect_attempts * (connect_timeout + 1.0) + 5.0
        try:
            await asyncio.wait_for(asyncio.shield(conn._opened), budget)
        except TimeoutError:
            conn._opened.cancel()  # its late outcome is of no interest
            await conn.close()
            raise QueueError(
                f"cannot connect to RabbitMQ at {where}: no answer in {budget:.0f} s"
            ) from None
        except BaseException:
            conn._opened.cancel()
            await conn.close()
            raise
        return conn

    @property
    def is_open(self) -> bool:
        """The connection is up (and its I/O thread running)."""
        return not self._finished and bool(self._pika.is_open)

    @property
    def error(self) -> QueueError | None:
        """Why the connection closed, when it was not closed by :meth:`close`."""
        return self._error

    @property
    def thread(self) -> threading.Thread | None:
        """The I/O thread (None when the connection runs on the event loop)."""
        return self._thread

    async def channel(self, *, confirm: bool = False) -> AmqpChannel:
        """Open a channel; ``confirm`` puts it in publisher-confirm mode (for publishing)."""
        channel = AmqpChannel(self, confirm=confirm)
        try:
            await self.call(channel._io_open)
        except asyncio.CancelledError:
            await channel.close()
            raise
        return channel

    async def close(self) -> None:
        """Close the connection (channels close with it; RabbitMQ requeues their unacked
        deliveries) and stop the I/O thread. Idempotent."""
        self._closing = True
        self._to_io(self._io_close)
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning(
                "AMQP connection did not close in time; stopping its I/O loop", name=self.name
            )
            self._to_io(self._io_stop)
            try:
                await asyncio.wait_for(asyncio.shield(self._stopped), 2.0)
            except TimeoutError:
                log.error("AMQP I/O thread did not stop; leaving the daemon thread", name=self.name)
                return
        if self._thread is not None:
            # The thread's last act was to post _stopped: it ends at once.
            self._thread.join(timeout=1.0)

    def _to_io(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O side soon, unless the connection has finished."""
        with self._lock:
            if self._finished:
                return
            if self._thread is not None:
                self._pika.ioloop.add_callback_threadsafe(fn)
                return
        self._loop.call_soon(fn)

    async def call(self, op: Callable[[_Reply[T]], None]) -> T:
        """Run ``op(reply)`` in the I/O thread and wait for it to resolve or fail the reply."""
        future: asyncio.Future[T] = self._loop.create_future()
        reply = _Reply(self, future)

        def run() -> None:
            try:
                op(reply)
            except Exception as exc:
                reply.fail(broker_error(exc))

        with self._lock:
            if self._finished:
                raise self._closed_error()
            self._replies.add(reply)
            if self._thread is not None:
                self._pika.ioloop.add_callback_threadsafe(run)
        if self._thread is None:
            run()  # on the event loop: at once, in call order
        return await future

    def submit(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` in the I/O thread without waiting (False if the connection is gone)."""

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("AMQP background call failed", name=self.name)

        with self._lock:
            if self._finished:
                return False
            if self._thread is not None:
                self._pika.ioloop.add_callback_threadsafe(run)
                return True
        run()
        return True

    def _closed_error(self) -> QueueError:
        return self._error or QueueError(f"the AMQP connection to {self.where} is closed")

    def _forget(self, reply: _Reply[Any]) -> None:
        with self._lock:
            self._replies.discard(reply)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` in the event loop (from the I/O side)."""
        # RuntimeError: the event loop is closed, nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            if self._thread is not None:
                self._loop.call_soon_threadsafe(fn, *args)
            else:
                self._loop.call_soon(fn, *args)

    # I/O side

    def _io_run(self) -> None:
        try:
            self._pika.ioloop.start()
        except Exception:
            log.exception("AMQP I/O loop crashed", name=self.name)
        finally:
            try:
                self._pika.ioloop.close()
            except Exception:
                log.debug("closing the AMQP I/O loop failed", exc_info=True)
            self._io_finished()

    def _io_stop(self) -> None:
        """The connection is over: stop the I/O thread, or (on the event loop) finish now."""
        if self._thread is not None:
            self._pika.ioloop.stop()  # _io_run finishes
        else:
            self._io_finished()

    def _io_finished(self) -> None:
        """Fail what is still waiting and settle the connection's futures (once)."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            leftovers = list(self._replies)
            self._replies.clear()
        error = self._closed_error()
        for reply in leftovers:
            reply.fail(error)
        self._post(_settle, self._opened, None, error)
        self._post(_settle, self._stopped, None, None)

    def _io_on_open(self, _connection: Any) -> None:
        self._post(_settle, self._opened, None, None)

    def _io_on_open_error(self, _connection: Any, exc: BaseException) -> None:
        self._error = _connect_error(exc, self.where, self._user)
        self._post(_settle, self._opened, None, self._error)
        self._io_stop()

    def _io_on_close(self, _connection: Any, reason: BaseException) -> None:
        if not self._closing:
            self._error = broker_error(reason, f"AMQP connection to {self.where} lost")
            log.warning("AMQP connection lost", name=self.name, reason=str(reason))
        self._io_stop()

    def _io_close(self) -> None:
        if self._pika.is_closing:
            return  # _io_on_close stops the loop
        if self._pika.is_closed:
            self._io_stop()
            return
        try:
            self._pika.close()
        except Exception:
            self._io_stop()


# --- channels ---


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


# --- the client ---


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
        ``io_thread=False`` runs the connection on this event loop (see the module's notes)."""
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
