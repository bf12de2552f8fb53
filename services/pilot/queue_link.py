"""The pilot's connections to its queues, kept alive.

:class:`QueueLink` is one side's client (EventService over gRPC for the embedded broker, AMQP for
RabbitMQ) that reconnects after the broker or WMS went away. :class:`Intake` subscribes to every
input queue and merges their deliveries; a subscription that breaks is re-opened (its unacked
deliveries went back to the queue).

Two kinds of failure are told apart. An *outage* -- the WMS or broker unreachable, or a
connection lost -- is waited out: publishing and re-subscribing retry at most
``OUTAGE_BACKOFF_MAX`` apart (so work resumes within seconds of the return), on one clock per
WMS or broker (:class:`Outage`), until the outage has lasted ``EWMS_PILOT_OUTAGE_TOLERANCE``; then
:class:`QueueUnreachable` ends the pilot. It is never a task failure. Any other error is retried a
few times (``PUBLISH_ATTEMPTS``, ``RECONNECT_ATTEMPTS``) and then fails: nothing retries forever.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

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
    QueueUnavailable,
    Subscription,
)
from services.events.grpc_client import GrpcQueueClient
from services.pilot.config import PilotSettings, QueueSide

log = structlog.get_logger(__name__)

PUBLISH_ATTEMPTS = 5
RECONNECT_ATTEMPTS = 10
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
OUTAGE_BACKOFF_MAX = 2.0
PERMANENT_ERRORS = (EventTooLarge, QueueAccessDenied, QueueNotFound, QueueClosed)
# Events of waiting publishes merged into one call at most (the client splits calls further).
MAX_MERGED_EVENTS = 1000


def backoff(attempt: int, cap: float = BACKOFF_MAX) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th retry (0-based), at most ``cap``.
    The exponent is bounded: an outage can last thousands of attempts."""
    return random.uniform(BACKOFF_FIRST / 2, min(cap, BACKOFF_FIRST * 2 ** min(attempt, 16)))


class QueueUnreachable(Exception):
    """The WMS or broker stayed unreachable longer than ``EWMS_PILOT_OUTAGE_TOLERANCE``: the pilot
    gives up and exits 1. Not a task failure, and not a queue error a retry could fix."""


class Outage:
    """How long one WMS or broker has been unreachable. Shared by every call to it, so that one
    outage is one clock however many publishes and subscriptions wait it out."""

    def __init__(self, where: str, tolerance: float) -> None:
        self.where = where
        self.tolerance = tolerance
        self.since: float | None = None

    def retry_in(self, attempt: int, error: QueueError) -> float:
        """Count a call that failed for the outage; returns how long to wait before the next
        attempt (the ``attempt``-th in a row), or raises QueueUnreachable once the outage has lasted
        the tolerance."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
            log.warning(
                "unreachable; waiting for it",
                where=self.where,
                tolerance_s=self.tolerance,
                error=str(error),
            )
        down = now - self.since
        if down >= self.tolerance:
            raise QueueUnreachable(
                f"{self.where} was unreachable for {down:.0f} s, longer than "
                f"EWMS_PILOT_OUTAGE_TOLERANCE ({self.tolerance:g} s); last error: {error}"
            )
        return min(backoff(attempt, OUTAGE_BACKOFF_MAX), self.tolerance - down)

    def over(self) -> None:
        """A call succeeded: the outage, if any, is over."""
        if self.since is not None:
            log.info(
                "reachable again", where=self.where, down_s=round(time.monotonic() - self.since, 1)
            )
            self.since = None


def broker_name(side: QueueSide) -> str:
    """Who serves a side's queues, for messages (an AMQP URL's password left out)."""
    if side.broker_type == "rabbitmq":
        parts = urlsplit(side.address)
        return f"RabbitMQ at {parts.hostname}:{parts.port or 5672}"
    return f"the WMS at {side.address}"


def flush_at(prefetch: int, concurrency: int) -> int:
    """Tasks whose outputs are published at once, without waiting for the linger to end.

    A held output keeps its input unacked, which keeps a new delivery out: the batch goes when
    holding more would leave fewer deliveries staged than there are slots, so that every slot
    has its next event while the batch is published and acked (default prefetch 3c + 1: c + 1)."""
    return max(1, prefetch - 2 * concurrency)


def queue_links(settings: PilotSettings) -> tuple[QueueLink, QueueLink]:
    """The input and output links (one link when both sides are the same), with one outage clock
    per WMS or broker."""
    outages: dict[str, Outage] = {}

    def link(side: QueueSide, name: str) -> QueueLink:
        where = broker_name(side)
        outage = outages.setdefault(where, Outage(where, settings.outage_tolerance))
        return QueueLink(
            side,
            settings.max_event_bytes,
            name,
            outage,
            linger=settings.publish_linger,
            flush_at=flush_at(settings.prefetch, settings.max_concurrent_tasks),
        )

    inputs = link(settings.incoming, "pilot-in")
    if settings.outgoing == settings.incoming:
        return inputs, inputs
    return inputs, link(settings.outgoing, "pilot-out")


class QueueLink:
    """One side's queue client, re-created when its connection is gone."""

    def __init__(
        self,
        side: QueueSide,
        max_event_bytes: int,
        name: str,
        outage: Outage,
        *,
        linger: float = 0.0,
        flush_at: int = 1,
    ) -> None:
        self.side = side
        self.outage = outage
        self._max_event_bytes = max_event_bytes
        self._name = name
        self._linger = linger
        self._flush_at = max(1, flush_at)
        self._client: QueueClient | None = None
        self._lock = asyncio.Lock()
        # Publishes waiting to go out to their queue (the linger, or the call out to return), by
        # queue id, each with the loop time it started waiting.
        self._waiting: dict[str, list[_Waiting]] = {}
        # Resolved when a queue's batch is full, to cut its linger short.
        self._full: dict[str, asyncio.Future[None]] = {}
        self._sending: set[str] = set()
        self._senders: set[asyncio.Task[None]] = set()

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
            side.address,
            side.token,
            max_event_bytes=self._max_event_bytes,
            # Lingering publishes already gather acks: those of one batch go in one message.
            ack_linger=0.0 if self._linger > 0 else None,
        )

    def is_outage(self, error: QueueError) -> bool:
        """Whether ``error`` came from the WMS or broker being out of reach (rather than refusing
        the call): gRPC UNAVAILABLE or a deadline, or an AMQP connection lost or not made."""
        if isinstance(error, QueueUnavailable):
            return True
        client = self._client
        return self.side.broker_type == "rabbitmq" and (
            client is None or (isinstance(client, AmqpQueueClient) and not client.is_open)
        )

    async def publish(self, queue_id: str, events: Sequence[queue_pb2.Event]) -> None:
        """Publish durably; returns once the WMS or broker has the events (or raises).

        Publishes to one queue go one call at a time: those made while a call is out wait for it
        and then go together in the next (group commit), and a publish with none out waits up to
        the linger for others to join it, or until ``flush_at`` callers are waiting. Short tasks'
        outputs thus go a batch per call (and their acks a batch per message) instead of one
        each. Each caller gets its own outcome: when a merged call is refused for good (an event
        too large, the workflow ended), its parts are published one by one so that only the
        culprit's caller fails."""
        loop = asyncio.get_running_loop()
        waiting = self._waiting.setdefault(queue_id, [])
        done: asyncio.Future[None] = loop.create_future()
        waiting.append(_Waiting(events, done, loop.time()))
        full = self._full.get(queue_id)
        if full is not None and not full.done() and self._batch_full(waiting):
            full.set_result(None)
        if queue_id not in self._sending:
            self._sending.add(queue_id)
            task = asyncio.create_task(self._send(queue_id), name=f"{self._name}-publish")
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)
        await asyncio.shield(done)

    async def _send(self, queue_id: str) -> None:
        """Publish what callers are waiting for, batch after batch, until none is left."""
        try:
            while True:
                await self._gather(queue_id)
                batch = self._take(queue_id)
                if not batch:
                    break
                events = [event for part, _ in batch for event in part]
                try:
                    await self._publish(queue_id, events)
                except PERMANENT_ERRORS as exc:
                    if len(batch) == 1:
                        _settle(batch, exc)
                        continue
                    for part, done in batch:
                        try:
                            await self._publish(queue_id, part)
                        except BaseException as alone:
                            _settle([(part, done)], alone)
                        else:
                            _settle([(part, done)], None)
                except BaseException as exc:
                    _settle(batch, exc)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    _settle(batch, None)
        finally:
            self._sending.discard(queue_id)
            leftover = [(w.events, w.done) for w in self._waiting.pop(queue_id, [])]
            _settle(leftover, QueueError("the pilot stopped publishing"))

    def set_flush_at(self, flush_at: int) -> None:
        """Publish at once when this many callers are waiting (the intake's prefetch changed)."""
        self._flush_at = max(1, flush_at)

    def _batch_full(self, waiting: list[_Waiting]) -> bool:
        return (
            len(waiting) >= self._flush_at
            or sum(len(w.events) for w in waiting) >= MAX_MERGED_EVENTS
        )

    async def _gather(self, queue_id: str) -> None:
        """Wait until the oldest waiting publish has lingered its time, or the batch is full."""
        waiting = self._waiting.get(queue_id)
        if not waiting or self._linger <= 0 or self._batch_full(waiting):
            return
        loop = asyncio.get_running_loop()
        delay = waiting[0].since + self._linger - loop.time()
        if delay <= 0:
            return
        full = self._full[queue_id] = loop.create_future()
        timer = loop.call_later(delay, _resolve, full)
        try:
            await full
        finally:
            timer.cancel()
            self._full.pop(queue_id, None)

    def _take(self, queue_id: str) -> list[tuple[Sequence[queue_pb2.Event], asyncio.Future[None]]]:
        """The callers waiting on the queue, up to MAX_MERGED_EVENTS events (at least one)."""
        waiting = self._waiting.get(queue_id)
        if not waiting:
            return []
        batch: list[tuple[Sequence[queue_pb2.Event], asyncio.Future[None]]] = []
        n = 0
        while waiting and (not batch or n + len(waiting[0].events) <= MAX_MERGED_EVENTS):
            part = waiting.pop(0)
            batch.append((part.events, part.done))
            n += len(part.events)
        return batch

    async def _publish(self, queue_id: str, events: Sequence[queue_pb2.Event]) -> None:
        """Publish durably. Through an outage this retries until it has lasted the tolerance
        (then QueueUnreachable); other errors are retried PUBLISH_ATTEMPTS times."""
        failures = 0
        waited = 0
        while True:
            try:
                client = await self.client()
                await client.publish(queue_id, events)
            except PERMANENT_ERRORS:
                raise
            except QueueError as exc:
                if self.is_outage(exc):
                    delay = self.outage.retry_in(waited, exc)
                    waited += 1
                else:
                    failures += 1
                    if failures >= PUBLISH_ATTEMPTS:
                        raise
                    delay = backoff(failures - 1)
                # One warning per publish; an outage's retries (2 s apart) only at debug level.
                report = log.warning if failures + waited == 1 else log.debug
                report("publish failed; retrying", queue=queue_id, error=str(exc))
                await asyncio.sleep(delay)
            else:
                self.outage.over()
                return

    async def close(self) -> None:
        """Close the client; publishes still waiting fail."""
        for sender in list(self._senders):
            sender.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None


@dataclass
class _Waiting:
    """A publish waiting to go out: its events, its caller's outcome, when it started waiting."""

    events: Sequence[queue_pb2.Event]
    done: asyncio.Future[None]
    since: float


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _settle(
    batch: list[tuple[Sequence[queue_pb2.Event], asyncio.Future[None]]],
    error: BaseException | None,
) -> None:
    """Give each waiting caller the outcome of its events' publish."""
    for _, done in batch:
        if done.done():
            continue
        if error is None:
            done.set_result(None)
        elif isinstance(error, asyncio.CancelledError):
            done.cancel()
        else:
            done.set_exception(error)
            done.exception()  # retrieved: a caller that was cancelled no longer awaits it


@dataclass
class Received:
    """A delivery and the subscription to ack or nack it on."""

    delivery: queue_pb2.Delivery
    subscription: Subscription
    queue_id: str


class IntakeFailed(Exception):
    """An input queue could not be (re)subscribed, or its reader failed; the message says why and
    ``cause`` is the error that ended it."""

    def __init__(self, message: str, cause: Exception) -> None:
        super().__init__(message)
        self.cause = cause


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
        # Input queues whose subscription is lost and not yet re-opened.
        self._lost: set[str] = set()
        # When every input queue was last subscribed again (monotonic): the pilot's idle clock
        # starts no earlier, since a queue it cannot read is not an empty queue.
        self.connected_at = time.monotonic()
        # Called when the pilot should look again: a delivery was put into ``ready``, or an input
        # subscription was lost or restored.
        self.on_change: Callable[[], None] | None = None

    @property
    def connected(self) -> bool:
        """Every input queue is subscribed."""
        return not self._lost

    async def open(self) -> None:
        """Subscribe to every input queue, waiting out an outage (QueueUnreachable after the
        tolerance); other errors are raised as they are."""
        for queue_id in self._link.side.queues:
            self._subscriptions[queue_id] = await self._first_subscribe(queue_id)
        for queue_id in self._link.side.queues:
            self._readers.append(
                asyncio.create_task(self._read(queue_id), name=f"intake-{queue_id}")
            )

    async def _first_subscribe(self, queue_id: str) -> Subscription:
        waited = 0
        while True:
            try:
                subscription = await self._subscribe(queue_id)
            except PERMANENT_ERRORS:
                raise
            except QueueError as exc:
                if not self._link.is_outage(exc):
                    raise
                delay = self._link.outage.retry_in(waited, exc)
                waited += 1
                await asyncio.sleep(delay)
            else:
                self._link.outage.over()
                return subscription

    async def _subscribe(self, queue_id: str) -> Subscription:
        client = await self._link.client()
        return await client.subscribe(queue_id, self._prefetch)

    async def _read(self, queue_id: str) -> None:
        """Read one input queue until closed; whatever ends it otherwise ends the intake, so the
        pilot never sits idle on a queue nobody reads."""
        try:
            await self._keep_reading(queue_id)
        except Exception as exc:
            log.exception("input queue reader failed", queue=queue_id)
            self._fail(queue_id, exc, f"its reader failed: {exc!r}")

    async def _keep_reading(self, queue_id: str) -> None:
        failures = 0  # errors in a row that are not an outage
        waited = 0  # attempts in a row through an outage
        while not self._closed:
            subscription = self._subscriptions.get(queue_id)
            try:
                if subscription is None:
                    subscription = await self._subscribe(queue_id)
                    self._subscriptions[queue_id] = subscription
                    if self._paused:
                        await subscription.pause()
                    waited = 0
                    self._link.outage.over()
                    self._restored(queue_id)
                async for delivery in subscription:
                    failures = 0
                    self.ready.put_nowait(Received(delivery, subscription, queue_id))
                    self._changed()
                if self._closed:
                    return
                error: QueueError = QueueError("the subscription ended")
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
            if queue_id not in self._lost:
                log.warning("input queue lost; re-subscribing", queue=queue_id, error=str(error))
                self._lost.add(queue_id)
                self._changed()
            else:
                log.debug("re-subscribing failed; retrying", queue=queue_id, error=str(error))
            if self._link.is_outage(error):
                try:
                    delay = self._link.outage.retry_in(waited, error)
                except QueueUnreachable as exc:
                    self._fail(queue_id, exc)
                    return
                waited += 1
            else:
                if failures >= RECONNECT_ATTEMPTS:
                    self._fail(queue_id, error)
                    return
                delay = backoff(failures)
                failures += 1
            await asyncio.sleep(delay)

    def _restored(self, queue_id: str) -> None:
        log.info("input queue re-subscribed", queue=queue_id)
        self._lost.discard(queue_id)
        if not self._lost:
            self.connected_at = time.monotonic()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _fail(self, queue_id: str, error: Exception, why: str = "") -> None:
        if not self.failed.done():
            self.failed.set_result(IntakeFailed(f"input queue {queue_id}: {why or error}", error))

    async def set_prefetch(self, prefetch: int) -> None:
        """Hold at most ``prefetch`` deliveries per input queue from now on (re-subscriptions
        too). A subscription that cannot change keeps its old limit, with a warning."""
        self._prefetch = prefetch
        for queue_id, subscription in list(self._subscriptions.items()):
            try:
                await subscription.set_prefetch(prefetch)
            except QueueError as exc:
                log.warning("changing the prefetch failed", queue=queue_id, error=str(exc))

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
