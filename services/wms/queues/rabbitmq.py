"""The RabbitMQ queue backend of the WMS (the ``Broker`` protocol of ``queues/broker.py``).

Topology per workflow (names from :mod:`services.events.wire`): one durable direct exchange
``E-<workflow part>``; per queue a durable quorum queue ``<queue id>`` bound with its own name, with
``x-delivery-limit`` = max_attempts - 1 and RabbitMQ dead-lettering (``at-least-once``, hence
``x-overflow=reject-publish``) through the exchange into ``<queue id>.dead``, a durable classic
queue bound with its own name (classic keeps requeued messages in their original order, which
listing dead letters relies on). The workflow's user may publish through its exchange and consume
its queues (``services/wms/queues/rabbitmq_admin.py``).

The WMS's own traffic goes through one :class:`~services.events.amqp.AmqpQueueClient` with the admin
credentials (reconnected on the next call if the connection was lost): gRPC subscriptions are its
subscriptions; unary ``receive`` leases live on one WMS-held channel per queue until acked, nacked
or expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import structlog

from ewms.v1 import queue_pb2
from services.config import WmsSettings
from services.events import wire
from services.events.amqp import (
    DEFAULT_HEARTBEAT,
    AmqpChannel,
    AmqpQueueClient,
    AmqpSubscription,
    RawMessage,
    dead_letter_message,
    header_int,
    header_text,
    message_event,
    redriven_message,
    timestamp_ns,
)
from services.events.client import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_EVENT_BYTES, QueueError
from services.wms.metrics import EventCounters
from services.wms.queues.broker import UnknownAckId
from services.wms.queues.rabbitmq_admin import RabbitAdmin

log = structlog.get_logger(__name__)

# Lease of a unary receive when none is given.
DEFAULT_RECEIVE_LEASE = 60
# Dead letters moved per round trip when re-driving.
REDRIVE_BATCH = 256
# A receive waiting for its first event polls RabbitMQ after this many seconds, doubling up to
# POLL_MAX (events published through this WMS wake it at once).
POLL_FIRST = 0.05
POLL_MAX = 1.0


def max_attempts_of(queue: queue_pb2.Queue) -> int:
    """Deliveries an event of ``queue`` gets (the stored value; 0 means the default, 3)."""
    return queue.max_attempts if queue.max_attempts > 0 else DEFAULT_MAX_ATTEMPTS


def queue_arguments(queue: queue_pb2.Queue) -> dict[str, Any]:
    """The x-arguments of a queue's quorum queue."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": max_attempts_of(queue) - 1,
        "x-dead-letter-exchange": wire.workflow_exchange(queue.queue_id),
        "x-dead-letter-routing-key": wire.dead_letter_queue(queue.queue_id),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def delivery_limit_error(attempts: int) -> str:
    """``last_error`` of an event RabbitMQ dead-lettered at the delivery limit (no error text)."""
    return f"delivery limit reached: {attempts} deliveries without ack or nack (consumer went away)"


def dead_letter_of(raw: RawMessage, queue: queue_pb2.Queue) -> queue_pb2.DeadLetter:
    """A message of the queue's dead-letter queue as a DeadLetter.

    Dead-lettered by a nack (ours or a client's): the error, attempt and time are in the
    ``x-ewms-*`` headers. Dead-lettered by RabbitMQ: the ``x-death`` header gives the reason and
    time; it has no delivery count, and ``x-delivery-count`` is not carried over, so the attempts
    are the queue's max_attempts (its delivery limit + 1, the only way to reach that reason)."""
    headers = raw.headers
    event = message_event(raw, queue.queue_id)
    letter = queue_pb2.DeadLetter()
    attempts = header_int(headers.get(wire.H_ATTEMPTS))
    error = headers.get(wire.H_LAST_ERROR)
    dead_ns = header_int(headers.get(wire.H_DEAD_LETTERED_NS))
    if error is not None:
        letter.last_error = header_text(error)
    else:
        deaths = headers.get("x-death")
        death: dict[str, Any] = deaths[0] if isinstance(deaths, list) and deaths else {}
        reason = header_text(death.get("reason", headers.get("x-first-death-reason", "unknown")))
        if attempts is None:
            attempts = max_attempts_of(queue)
        if reason == "delivery_limit":
            letter.last_error = delivery_limit_error(attempts)
        else:
            letter.last_error = f"dead-lettered by RabbitMQ ({reason})"
        if dead_ns is None:
            dead_ns = timestamp_ns(death.get("time"))
    event.attempt = attempts if attempts is not None else event.attempt
    letter.event.CopyFrom(event)
    if dead_ns is not None:
        letter.dead_lettered_ts.FromNanoseconds(dead_ns)
    return letter


class CountedSubscription:
    """An ``AmqpSubscription`` of the WMS whose deliveries, acks and dead-letters are counted
    (implements ``Subscription``)."""

    def __init__(self, sub: AmqpSubscription, events: EventCounters, max_attempts: int) -> None:
        self._sub = sub
        self._events = events
        self._max_attempts = max_attempts
        # Attempt of each delivery handed out and not yet settled, oldest first: a nack at the
        # last attempt dead-letters. Held deliveries never exceed prefetch and leases all have
        # one length, so entries past that many are the oldest, expired ones. (A nack racing its
        # lease's expiry may still be counted.)
        self._attempts: OrderedDict[str, int] = OrderedDict()

    @property
    def prefetch(self) -> int:
        """Maximum unacked deliveries held at once."""
        return self._sub.prefetch

    async def __aiter__(self) -> AsyncIterator[queue_pb2.Delivery]:
        async for delivery in self._sub:
            self._handed_out(delivery)
            yield delivery

    def take_ready(self) -> list[queue_pb2.Delivery]:
        """Deliveries already arrived and not yet iterated (for senders that batch)."""
        ready = self._sub.take_ready()
        for delivery in ready:
            self._handed_out(delivery)
        return ready

    async def ack(self, *deliveries: queue_pb2.Delivery) -> None:
        """Ack; deliveries no longer out are ignored (and not counted)."""
        held = self._sub.held
        await self._sub.ack(*deliveries)
        self._events.acked.inc(max(held - self._sub.held, 0))
        for delivery in deliveries:
            self._attempts.pop(delivery.ack_id, None)

    async def nack(
        self, delivery: queue_pb2.Delivery, error: str, *, dead_letter: bool = False
    ) -> None:
        """Nack: requeue, or dead-letter when asked or at the last attempt."""
        attempt = self._attempts.pop(delivery.ack_id, None)
        await self._sub.nack(delivery, error, dead_letter=dead_letter)
        if attempt is not None and (dead_letter or attempt >= self._max_attempts):
            self._events.dead_lettered.inc()

    async def set_prefetch(self, prefetch: int) -> None:
        """Hold at most ``prefetch`` from now on (see ``AmqpSubscription.set_prefetch``)."""
        await self._sub.set_prefetch(prefetch)

    async def pause(self) -> None:
        """Take no new deliveries; held ones can still be acked or nacked."""
        await self._sub.pause()

    async def close(self) -> None:
        """Stop consuming; unacked deliveries go back to the queue. Idempotent."""
        self._attempts.clear()
        await self._sub.close()

    async def __aenter__(self) -> CountedSubscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _handed_out(self, delivery: queue_pb2.Delivery) -> None:
        self._events.delivered.inc()
        self._attempts[delivery.ack_id] = delivery.event.attempt
        while len(self._attempts) > self._sub.prefetch:
            self._attempts.popitem(last=False)


@dataclass
class _Lease:
    """A delivery handed out by ``receive``, held unacked on a WMS channel."""

    queue_id: str
    channel: AmqpChannel
    raw: RawMessage
    attempt: int
    expires: float  # event-loop time
    timer: asyncio.TimerHandle


@dataclass
class _Desk:
    """Per queue: the channel holding its receive leases, and its waiting receives."""

    channel: AmqpChannel | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Resolved when events may have become ready (published, re-driven, requeued here).
    arrival: asyncio.Future[None] | None = None
    waiting: int = 0


class RabbitBroker:
    """Workflow queues in RabbitMQ (implements ``Broker``). Open with :meth:`open` or
    :meth:`connect`."""

    def __init__(
        self,
        client: AmqpQueueClient,
        admin: RabbitAdmin,
        *,
        amqp_url: str,
        max_event_bytes: int,
        heartbeat: int,
        events: EventCounters | None = None,
    ) -> None:
        self.admin = admin
        self._events = events or EventCounters.unregistered("rabbitmq")
        # Subscriptions are wrapped for counting only when someone reads the counts (a WMS); a
        # bare broker hands out the AMQP client's own.
        self._count_subscriptions = events is not None
        self._client = client
        self._url = amqp_url
        self._max_event_bytes = max_event_bytes
        self._heartbeat = heartbeat
        self._reconnect_lock = asyncio.Lock()
        self._desks: dict[str, _Desk] = {}
        self._leases: dict[str, _Lease] = {}
        self._dlq_locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    @classmethod
    async def open(cls, settings: WmsSettings, events: EventCounters | None = None) -> RabbitBroker:
        """Connect with the WMS's settings (admin AMQP URL, management URL, event size limit);
        ``events`` counts the events passing through this WMS."""
        return await cls.connect(
            settings.rabbitmq_url,
            settings.rabbitmq_management_url,
            max_event_bytes=settings.max_event_bytes,
            events=events,
        )

    @classmethod
    async def connect(
        cls,
        amqp_url: str,
        management_url: str,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        heartbeat: int = DEFAULT_HEARTBEAT,
        events: EventCounters | None = None,
    ) -> RabbitBroker:
        """Connect to RabbitMQ with admin credentials: AMQP (``amqp://user:pass@host:5672/%2F``)
        and the management API (``http://user:pass@host:15672``); both must answer."""
        admin = RabbitAdmin.for_amqp_url(management_url, amqp_url)
        await admin.request("GET", "/api/overview")
        client = await AmqpQueueClient.connect(
            amqp_url,
            max_event_bytes=max_event_bytes,
            heartbeat=heartbeat,
            connection_name="ewms-wms",
        )
        return cls(
            client,
            admin,
            amqp_url=amqp_url,
            max_event_bytes=max_event_bytes,
            heartbeat=heartbeat,
            events=events,
        )

    @property
    def client(self) -> AmqpQueueClient:
        """The admin AMQP client of the data path."""
        return self._client

    def waiting_receives(self, queue_id: str) -> int:
        """How many ``receive`` calls on the queue are waiting for a first event now."""
        desk = self._desks.get(queue_id)
        return desk.waiting if desk is not None else 0

    # --- topology and credentials ---

    async def provision(
        self, workflow_id: str, queues: Sequence[queue_pb2.Queue]
    ) -> queue_pb2.QueueCredentials:
        """Declare the workflow's exchange, queues and dead-letter queues, and create (or reset the
        password of) its user. Idempotent."""
        exchange = wire.workflow_exchange_of(workflow_id)
        for queue in queues:
            if wire.workflow_exchange(queue.queue_id) != exchange:
                raise ValueError(f"queue {queue.queue_id} is not a queue of {workflow_id}")
        client = await self._live()
        channel = await client.connection.channel()
        try:
            await channel.declare_exchange(exchange, "direct")
            for queue in queues:
                dead = wire.dead_letter_queue(queue.queue_id)
                await channel.declare_queue(dead)
                await channel.bind_queue(dead, exchange, dead)
                await channel.declare_queue(queue.queue_id, arguments=queue_arguments(queue))
                await channel.bind_queue(queue.queue_id, exchange, queue.queue_id)
        finally:
            await channel.close()
        credentials = await self.admin.provision_workflow_user(workflow_id)
        log.info("provisioned RabbitMQ queues", workflow_id=workflow_id, n_queues=len(queues))
        return credentials

    async def revoke(self, workflow_id: str, *, read: bool) -> None:
        """Take the workflow user's write permission, or (``read``) delete the user, which closes
        its connections. Idempotent."""
        if read:
            await self.admin.delete_user(wire.workflow_username(workflow_id))
        else:
            await self.admin.revoke_workflow_write(workflow_id)
        revoked = "the user" if read else "write permission"
        log.info("revoked RabbitMQ credentials", workflow_id=workflow_id, revoked=revoked)

    async def delete(self, workflow_id: str, queues: Sequence[queue_pb2.Queue]) -> None:
        """Delete the user (closing its connections), the queues with their events, the dead-letter
        queues and the exchange. Idempotent."""
        await self.admin.delete_user(wire.workflow_username(workflow_id))
        for queue in queues:
            await self._drop_leases(queue.queue_id)
        client = await self._live()
        channel = await client.connection.channel()
        try:
            for queue in queues:
                await channel.delete_queue(queue.queue_id)
                await channel.delete_queue(wire.dead_letter_queue(queue.queue_id))
            await channel.delete_exchange(wire.workflow_exchange_of(workflow_id))
        finally:
            await channel.close()
        log.info("deleted RabbitMQ queues", workflow_id=workflow_id, n_queues=len(queues))

    # --- events ---

    async def publish(self, queue: queue_pb2.Queue, events: Sequence[queue_pb2.Event]) -> list[str]:
        """Publish with publisher confirms (same wire format as every client)."""
        client = await self._live()
        event_ids = await client.publish(queue.queue_id, events)
        self._events.published.inc(len(event_ids))
        self._wake(queue.queue_id)
        return event_ids

    async def subscribe(
        self, queue: queue_pb2.Queue, prefetch: int, lease_seconds: int
    ) -> AmqpSubscription | CountedSubscription:
        """A consumer on its own channel of the WMS's connection."""
        client = await self._live()
        sub = await client.subscribe(
            queue.queue_id,
            prefetch,
            max_attempts=max_attempts_of(queue),
            lease_seconds=lease_seconds,
        )
        if not self._count_subscriptions:
            return sub
        return CountedSubscription(sub, self._events, max_attempts_of(queue))

    async def receive(
        self, queue: queue_pb2.Queue, max_events: int, lease_seconds: int, wait_seconds: float
    ) -> list[queue_pb2.Delivery]:
        """Lease up to ``max_events`` events with ``basic.get``. If none is ready, wait up to
        ``wait_seconds``: woken at once by events published (re-driven, requeued) through this
        broker, and polling with backoff (50 ms doubling to 1 s) for events published straight to
        RabbitMQ. Not a consumer: RabbitMQ 3.10 returns messages in flight to a consumer being
        cancelled and counts that as a delivery, so a timed-out wait would raise events' attempt
        counts (and at max_attempts 1 dead-letter them unprocessed). The deliveries stay unacked
        on the queue's lease channel; an unsettled lease is requeued when it expires (its next
        delivery counts as a new attempt)."""
        lease = lease_seconds if lease_seconds > 0 else DEFAULT_RECEIVE_LEASE
        channel = await self._lease_channel(queue.queue_id)
        fetch = asyncio.ensure_future(
            self._fetch(channel, queue.queue_id, max(max_events, 1), wait_seconds)
        )
        try:
            raws = await asyncio.shield(fetch)
        except asyncio.CancelledError:
            # The caller went away: hand back whatever the fetch still gets.
            fetch.add_done_callback(lambda done: self._requeue_fetched(channel, done))
            raise
        self._events.delivered.inc(len(raws))
        return [self._lease(queue.queue_id, channel, raw, lease) for raw in raws]

    async def ack(self, queue: queue_pb2.Queue, ack_ids: Sequence[str]) -> list[str]:
        """Ack leased deliveries; returns the ack ids that were no longer out (expired, already
        settled, unknown, or their channel was lost -- then RabbitMQ requeued them)."""
        gone: list[str] = []
        groups: dict[AmqpChannel, list[tuple[str, int]]] = {}
        for ack_id in ack_ids:
            lease = self._take_lease(queue.queue_id, ack_id)
            if lease is None:
                gone.append(ack_id)
            else:
                groups.setdefault(lease.channel, []).append((ack_id, lease.raw.delivery_tag))
        for channel, entries in groups.items():
            try:
                await channel.ack(tag for _, tag in entries)
            except QueueError:
                gone.extend(ack_id for ack_id, _ in entries)
            else:
                self._events.acked.inc(len(entries))
        return gone

    async def nack(
        self, queue: queue_pb2.Queue, ack_id: str, error: str, dead_letter: bool
    ) -> bool:
        """Requeue a leased delivery, or -- when asked or at the queue's max_attempts -- copy it
        with ``error`` into the dead-letter queue (confirmed) and ack it; True if dead-lettered.
        UnknownAckId if the lease is not out."""
        lease = self._take_lease(queue.queue_id, ack_id)
        if lease is None:
            raise UnknownAckId(ack_id)
        tag = lease.raw.delivery_tag
        if not (dead_letter or lease.attempt >= max_attempts_of(queue)):
            with contextlib.suppress(QueueError):  # channel gone: RabbitMQ requeued it already
                await lease.channel.nack([tag], requeue=True)
            self._wake(queue.queue_id)
            return False
        message = dead_letter_message(lease.raw, queue.queue_id, error, lease.attempt)
        try:
            client = await self._live()
            await client.publish_messages([message])
        except BaseException:
            self._restore_lease(ack_id, lease)
            raise
        try:
            await lease.channel.ack([tag])
        except QueueError as exc:
            log.warning(
                "dead-lettered event also requeued: its channel closed before the ack",
                queue_id=queue.queue_id,
                event_id=lease.raw.message_id,
                error=str(exc),
            )
        self._events.dead_lettered.inc()
        return True

    # --- inspection ---

    async def stats(self, queue: queue_pb2.Queue) -> queue_pb2.QueueStats:
        """The queue's counters: ``ready`` and ``dead_lettered`` exact; ``in_flight``,
        ``published`` and ``acked`` estimates (RabbitMQ's own statistics, seconds old and possibly
        short). Nothing should wait on the estimates: ``ewms run`` decides completion from exact
        facts only (services/cli/settlement.py).

        - ``ready`` and ``dead_lettered``: exact, from passive declares of the queue and its
          dead-letter queue (ready messages).
        - ``in_flight``, ``published``, ``acked``: estimates from the management API, which
          RabbitMQ refreshes about every 5 s (so they lag), and which count since the queue was
          created or its leader last restarted. ``published`` and ``acked`` are summed from
          channels' counters,
          and a closing channel drops what it counted since the last refresh (measured on
          3.10.8: a consumer that acked 344 events within a second and closed left them out for
          good), so they can stay short. ``in_flight`` = the queue's ``messages_unacknowledged``;
          ``published`` = its ``message_stats.publish`` (re-driven events included).
        - ``acked`` = events finished successfully = the queue's ``message_stats.ack`` minus the
          dead-letter queue's ``message_stats.publish``, clamped at 0. Measured on RabbitMQ 3.10.8:
          dead-lettering by nack (copy into the dead-letter queue, then ack) counts one ``ack`` on
          the queue and one ``publish`` on the dead-letter queue; dead-lettering by RabbitMQ's
          delivery limit counts neither (no ``ack`` on the queue, no ``publish`` on the
          dead-letter queue). So the difference removes exactly the nack-dead-lettered events. It
          is off when something else publishes into the dead-letter queue directly (workflow
          users may, through their exchange), and momentarily when the two queues' samples are
          taken between a dead-letter copy and its ack.
        """
        client = await self._live()
        dead_name = wire.dead_letter_queue(queue.queue_id)
        channel = await client.connection.channel()
        try:
            ready = await channel.declare_queue(queue.queue_id, passive=True)
            dead = await channel.declare_queue(dead_name, passive=True)
        finally:
            await channel.close()
        details = await self.admin.queue(queue.queue_id) or {}
        dead_details = await self.admin.queue(dead_name) or {}
        counters = details.get("message_stats") or {}
        dead_counters = dead_details.get("message_stats") or {}
        acked = int(counters.get("ack", 0)) - int(dead_counters.get("publish", 0))
        return queue_pb2.QueueStats(
            queue_id=queue.queue_id,
            ready=ready,
            in_flight=int(details.get("messages_unacknowledged", 0) or 0),
            acked=max(acked, 0),
            dead_lettered=dead,
            published=int(counters.get("publish", 0)),
        )

    async def dead_letters(
        self, queue: queue_pb2.Queue, after: int, limit: int
    ) -> tuple[list[queue_pb2.DeadLetter], int | None]:
        """Dead letters ``after``..``after+limit``, oldest first, and the next position (None at
        the end). Reads ``after+limit`` messages with ``basic.get`` on a temporary channel without
        acking, then closes it: RabbitMQ puts them back in their original order (classic queue).
        Costs O(after) per page."""
        if limit <= 0:
            return [], after
        dead_name = wire.dead_letter_queue(queue.queue_id)
        async with self._dlq_lock(queue.queue_id):
            client = await self._live()
            channel = await client.connection.channel()
            try:
                raws, remaining = await channel.get(dead_name, after + limit)
            finally:
                await channel.close()
        page = raws[after : after + limit]
        letters = [dead_letter_of(raw, queue) for raw in page]
        more = remaining > 0 and len(raws) == after + limit
        return letters, (after + len(page) if more else None)

    async def redrive(self, queue: queue_pb2.Queue, event_ids: Sequence[str]) -> int:
        """Move dead letters (all, or those whose event id is in ``event_ids``) back into the
        queue as fresh copies (attempts start at 1 again; confirmed before the dead letter is
        acked); the others stay in order. Bounded by the dead-letter count at the start."""
        wanted = set(event_ids)
        dead_name = wire.dead_letter_queue(queue.queue_id)
        moved = 0
        async with self._dlq_lock(queue.queue_id):
            client = await self._live()
            channel = await client.connection.channel()
            try:
                total = await channel.declare_queue(dead_name, passive=True)
                taken = 0
                while taken < total:
                    batch, remaining = await channel.get(
                        dead_name, min(REDRIVE_BATCH, total - taken)
                    )
                    if not batch:
                        break
                    taken += len(batch)
                    chosen = [raw for raw in batch if not wanted or raw.message_id in wanted]
                    if chosen:
                        await client.publish_messages(
                            [redriven_message(raw, queue.queue_id) for raw in chosen]
                        )
                        await channel.ack(raw.delivery_tag for raw in chosen)
                        moved += len(chosen)
                    if remaining == 0:
                        break
            finally:
                await channel.close()  # the dead letters not chosen go back, in order
        if moved:
            self._wake(queue.queue_id)
        log.info("re-drove dead letters", queue_id=queue.queue_id, n=moved)
        return moved

    async def problem(self) -> str | None:
        """None when the AMQP connection is (or could be re-)opened and the management API
        answers; else why not."""
        try:
            await asyncio.wait_for(self._live(), 10.0)
            await asyncio.wait_for(self.admin.request("GET", "/api/overview"), 10.0)
        except Exception as exc:
            return str(exc) or repr(exc)
        return None

    async def close(self) -> None:
        """Close the connection and its I/O thread; subscriptions end, leases go back."""
        self._closed = True
        for lease in self._leases.values():
            lease.timer.cancel()
        self._leases.clear()
        self._desks.clear()
        await self._client.close()

    # --- internals ---

    async def _live(self) -> AmqpQueueClient:
        """The admin client, reconnected if its connection was lost (one bounded attempt per
        call)."""
        if self._closed:
            raise QueueError("the RabbitMQ broker is closed")
        if self._client.is_open:
            return self._client
        async with self._reconnect_lock:
            if not self._client.is_open:
                log.warning(
                    "reconnecting to RabbitMQ",
                    reason=str(self._client.connection.error or "connection closed"),
                )
                await self._client.close()
                for lease in self._leases.values():
                    lease.timer.cancel()
                self._leases.clear()  # their channel died with the connection
                self._desks.clear()
                self._client = await AmqpQueueClient.connect(
                    self._url,
                    max_event_bytes=self._max_event_bytes,
                    heartbeat=self._heartbeat,
                    connection_name="ewms-wms",
                )
            return self._client

    def _dlq_lock(self, queue_id: str) -> asyncio.Lock:
        return self._dlq_locks.setdefault(queue_id, asyncio.Lock())

    async def _lease_channel(self, queue_id: str) -> AmqpChannel:
        desk = self._desks.setdefault(queue_id, _Desk())
        if desk.channel is not None and desk.channel.is_open:
            return desk.channel
        async with desk.lock:
            if desk.channel is None or not desk.channel.is_open:
                client = await self._live()
                desk.channel = await client.connection.channel()
            return desk.channel

    async def _drop_leases(self, queue_id: str) -> None:
        for ack_id in [a for a, lease in self._leases.items() if lease.queue_id == queue_id]:
            self._leases.pop(ack_id).timer.cancel()
        desk = self._desks.pop(queue_id, None)
        if desk is not None and desk.channel is not None:
            await desk.channel.close()
        self._dlq_locks.pop(queue_id, None)

    async def _fetch(
        self, channel: AmqpChannel, queue_id: str, max_events: int, wait_seconds: float
    ) -> list[RawMessage]:
        """``basic.get`` up to ``max_events``; while nothing is ready and time is left, wait for a
        wake-up (an event published, re-driven or requeued through this broker) or, for events
        published straight to RabbitMQ, the next poll (50 ms, doubling to at most 1 s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait_seconds, 0.0)
        pause = POLL_FIRST
        desk = self._desks.setdefault(queue_id, _Desk())
        while True:
            # Taken before the get, so a publish between the get and the wait is not missed.
            if desk.arrival is None or desk.arrival.done():
                desk.arrival = loop.create_future()
            arrival = desk.arrival
            raws, _ = await channel.get(queue_id, max_events)
            left = deadline - loop.time()
            if raws or left <= 0:
                return raws
            desk.waiting += 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(arrival), min(pause, left))
            finally:
                desk.waiting -= 1
            pause = min(pause * 2, POLL_MAX)

    def _wake(self, queue_id: str) -> None:
        """Events may be ready in ``queue_id``: wake its waiting receives."""
        desk = self._desks.get(queue_id)
        if desk is not None and desk.arrival is not None and not desk.arrival.done():
            desk.arrival.set_result(None)

    def _lease(
        self, queue_id: str, channel: AmqpChannel, raw: RawMessage, lease_seconds: int
    ) -> queue_pb2.Delivery:
        loop = asyncio.get_running_loop()
        ack_id = uuid.uuid4().hex
        event = message_event(raw, queue_id)
        expires = loop.time() + lease_seconds
        timer = loop.call_at(expires, self._expire, ack_id)
        self._leases[ack_id] = _Lease(queue_id, channel, raw, event.attempt, expires, timer)
        delivery = queue_pb2.Delivery(ack_id=ack_id, event=event)
        delivery.lease_expires.FromNanoseconds(time.time_ns() + lease_seconds * 1_000_000_000)
        return delivery

    def _take_lease(self, queue_id: str, ack_id: str) -> _Lease | None:
        """Remove and return the lease if it is out for this queue on a live channel."""
        lease = self._leases.get(ack_id)
        if lease is None or lease.queue_id != queue_id:
            return None
        del self._leases[ack_id]
        lease.timer.cancel()
        return lease if lease.channel.is_open else None

    def _restore_lease(self, ack_id: str, lease: _Lease) -> None:
        if self._closed or not lease.channel.is_open:
            return
        loop = asyncio.get_running_loop()
        lease.timer = loop.call_at(max(lease.expires, loop.time()), self._expire, ack_id)
        self._leases[ack_id] = lease

    def _expire(self, ack_id: str) -> None:
        lease = self._leases.pop(ack_id, None)
        if lease is not None:
            log.info(
                "receive lease expired; requeueing",
                queue_id=lease.queue_id,
                event_id=lease.raw.message_id,
            )
            lease.channel.requeue_soon(lease.raw.delivery_tag)
            self._wake(lease.queue_id)

    @staticmethod
    def _requeue_fetched(channel: AmqpChannel, done: asyncio.Future[list[RawMessage]]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        for raw in done.result():
            channel.requeue_soon(raw.delivery_tag)
