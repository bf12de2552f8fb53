"""One AMQP connection (:class:`AmqpConnection`) and the crossing between asyncio and its I/O side.

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

A connection that is lost stays closed: calls then raise
:class:`~services.events.client.QueueError` (connect again).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import pika
import structlog

from services.events.amqp.channel import AmqpChannel
from services.events.amqp.errors import _connect_error, broker_error
from services.events.amqp.transport import _AsyncioConnection, _SelectConnection
from services.events.client import QueueError

log = structlog.get_logger(__name__)

T = TypeVar("T")

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
