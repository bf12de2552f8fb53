"""The embedded broker: durable event queues in the WMS's own SQLite store.

Every event is a row of ``events`` (its serialized ``Event``, attempts so far, last error, and
``dead_ts`` once dead-lettered); acked events are deleted and counted in ``queue_counters``. The
live state of a queue -- ready events, deliveries out, subscribers -- is kept in memory and changed
only on the event loop; SQLite is written behind it by one writer task that batches whatever is
pending into one transaction (group commit), so throughput does not pay one fsync per event.

What is durable when: ``publish`` answers after its events are committed; ``Ack`` (unary) after its
deletes are committed; stream acks, nacks and dead-lettering are committed with the next batch (a
crash before then redelivers those events: at-least-once). Nobody waits on those, so they do not
start a transaction of their own: they wait up to ``LAZY_COMMIT_SECONDS`` for one that somebody
waits on (a publish, mostly), and ride in it; one commit per published batch rather than three per
event (publish, ack of the input, ack of the output). Attempts are written when an event comes
back (nack, lease expiry, subscriber gone) or is dead-lettered, so a WMS crash never counts against
an event.

Memory is bounded: at most ``MEMORY_READY`` ready events per queue are held in memory; the rest wait
in SQLite ("spilled") and are loaded in order as the queue drains. Invariant: every in-memory event
has ``seq <= cursor``, and every ready row with ``seq > cursor`` is spilled (counted in
``n_spilled``). All reads and writes go through the writer in submission order, and their effects
are applied in that order, which keeps the invariant without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import structlog
from google.protobuf import timestamp_pb2

from ewms.v1 import queue_pb2
from services.events.client import DEFAULT_MAX_ATTEMPTS, Subscription
from services.wms.metrics import EventCounters
from services.wms.queues.broker import UnknownAckId
from services.wms.store import Store, Tx

log = structlog.get_logger(__name__)

MEMORY_READY = 10_000
LOAD_BELOW = 2_000
MAX_ERROR_CHARS = 4096
# How long a change nobody waits on (a stream ack, nack or dead-lettering) may wait for a commit.
LAZY_COMMIT_SECONDS = 0.05


@dataclass(slots=True)
class _Ev:
    """An event of a queue, in memory."""

    seq: int
    event: queue_pb2.Event
    attempts: int = 0
    last_error: str = ""


@dataclass(slots=True)
class _Lease:
    """A delivery out to a consumer."""

    ack_id: str
    ev: _Ev
    sub: _Sub | None
    expires: float | None  # time.monotonic(); None: held while its subscription is open


def _error_text(error: str) -> str:
    return error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 1] + "…"


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


# --- writer operations: ``run`` executes in the store thread, ``apply`` on the loop, in order ---


@dataclass
class _Op:
    run: Callable[[sqlite3.Connection], Any]
    apply: Callable[[Any], None] | None = None
    future: asyncio.Future[Any] | None = None


class _Writer:
    """Runs submitted operations in batches, one transaction per batch, in submission order."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: list[_Op] = []
        self._task: asyncio.Task[None] | None = None
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def submit(
        self,
        run: Callable[[sqlite3.Connection], Any],
        apply: Callable[[Any], None] | None = None,
        *,
        wait: bool = True,
        lazy: bool = False,
    ) -> asyncio.Future[Any] | None:
        """Queue an operation; returns a future of its result when ``wait``. A ``lazy`` one (nobody
        waits for it) is committed with the next batch, at the latest ``LAZY_COMMIT_SECONDS`` on."""
        fut = asyncio.get_running_loop().create_future() if wait else None
        self._pending.append(_Op(run, apply, fut))
        self._idle.clear()
        if lazy and fut is None and apply is None:
            if self._task is None and self._lazy_timer is None:
                self._lazy_timer = asyncio.get_running_loop().call_later(
                    LAZY_COMMIT_SECONDS, self._start
                )
        else:
            self._start()
        return fut

    def _start(self) -> None:
        """Commit what is pending now (a batch being written already takes it next)."""
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if self._task is None and self._pending:
            self._task = asyncio.create_task(self._drain(), name="embedded-broker-writer")

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed."""
        self._start()
        await self._idle.wait()

    async def _drain(self) -> None:
        try:
            while self._pending:
                ops, self._pending = self._pending, []

                def batch(tx: Tx, ops: list[_Op] = ops) -> list[Any]:
                    return [op.run(tx.sql) for op in ops]

                try:
                    results = await self._store.run(batch)
                except Exception as exc:
                    log.error("embedded broker write failed", error=str(exc), n_ops=len(ops))
                    for op in ops:
                        if op.future is not None and not op.future.done():
                            op.future.set_exception(exc)
                    continue
                for op, result in zip(ops, results, strict=True):
                    if op.apply is not None:
                        op.apply(result)
                    if op.future is not None and not op.future.done():
                        op.future.set_result(result)
        finally:
            self._task = None
            if self._lazy_timer is not None:
                self._lazy_timer.cancel()
                self._lazy_timer = None
            self._idle.set()


# --- in-memory queues and subscriptions ---


class _Waiter:
    """A unary Receive waiting for its first events."""

    def __init__(self, max_events: int, lease_seconds: int) -> None:
        self.max_events = max_events
        self.lease_seconds = lease_seconds
        self.future: asyncio.Future[list[queue_pb2.Delivery]] = (
            asyncio.get_running_loop().create_future()
        )


class _Sub:
    """A subscription of the embedded broker (implements ``Subscription``)."""

    def __init__(self, broker: EmbeddedBroker, q: _Queue, prefetch: int, lease_seconds: int):
        self._broker = broker
        self._q = q
        self._prefetch = prefetch
        self.lease_seconds = lease_seconds
        self.outstanding: set[str] = set()
        self.outbox: deque[queue_pb2.Delivery] = deque()
        self.wake = asyncio.Event()
        self.closed = False
        self.paused = False

    @property
    def prefetch(self) -> int:
        """Maximum unacked deliveries out at once."""
        return self._prefetch

    @property
    def credit(self) -> int:
        """How many more deliveries it may get now."""
        return 0 if self.closed or self.paused else self._prefetch - len(self.outstanding)

    def push(self, delivery: queue_pb2.Delivery) -> None:
        self.outbox.append(delivery)
        self.wake.set()

    async def __aiter__(self) -> AsyncIterator[queue_pb2.Delivery]:
        while True:
            while self.outbox:
                yield self.outbox.popleft()
            if self.closed:
                return
            self.wake.clear()
            await self.wake.wait()

    def take_ready(self) -> list[queue_pb2.Delivery]:
        """Deliveries pushed and not yet taken (for senders that batch)."""
        out = list(self.outbox)
        self.outbox.clear()
        return out

    async def ack(self, *deliveries: queue_pb2.Delivery) -> None:
        """Ack deliveries (committed with the next batch)."""
        self._broker.ack_now(self._q, [d.ack_id for d in deliveries], wait=False)

    async def nack(
        self, delivery: queue_pb2.Delivery, error: str, *, dead_letter: bool = False
    ) -> None:
        """Nack a delivery; an ack id no longer out is ignored."""
        try:
            self._broker.nack_now(self._q, delivery.ack_id, error, dead_letter)
        except UnknownAckId:
            log.info(
                "nack of a delivery no longer out",
                queue_id=self._q.queue_id,
                ack_id=delivery.ack_id,
            )

    async def set_prefetch(self, prefetch: int) -> None:
        """Hold at most ``prefetch`` from now on; a higher one gets ready events at once."""
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self._prefetch = prefetch
        self._broker.credit_changed(self._q)

    async def pause(self) -> None:
        """Take no new deliveries; held ones can still be acked or nacked."""
        self.paused = True

    async def close(self) -> None:
        """End the subscription: its unacked deliveries go back to the queue now."""
        if self.closed:
            return
        self.closed = True
        self.wake.set()
        self._broker.release(self._q, self)

    async def __aenter__(self) -> _Sub:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


@dataclass
class _Queue:
    """The live state of one embedded queue."""

    queue_id: str
    max_attempts: int
    published: int
    acked: int
    dead: int
    n_spilled: int
    cursor: int = 0
    ready: deque[_Ev] = field(default_factory=deque)
    out: dict[str, _Lease] = field(default_factory=dict)
    subs: list[_Sub] = field(default_factory=list)
    waiters: list[_Waiter] = field(default_factory=list)
    loading: bool = False
    rr: int = 0  # round-robin start among subscribers
    deleted: bool = False


class EmbeddedBroker:
    """Queues in the WMS's SQLite store (implements ``services.wms.queues.broker.Broker``)."""

    def __init__(self, store: Store, events: EventCounters | None = None) -> None:
        self._store = store
        self._events = events or EventCounters.unregistered("embedded")
        self._writer = _Writer(store)
        self._queues: dict[str, _Queue] = {}
        self._opening: dict[str, asyncio.Future[_Queue]] = {}
        self._next_seq = 1
        self._ack_prefix = secrets.token_hex(3)
        self._ack_counter = itertools.count(1)
        self._leases: list[tuple[float, str, str]] = []  # heap of (expires, queue_id, ack_id)
        self._timer_wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, store: Store, events: EventCounters | None = None) -> EmbeddedBroker:
        """Open over ``store``; every event not acked or dead-lettered before is ready again.
        ``events`` counts what happens to events from now on."""
        broker = cls(store, events)

        def max_seq(tx: Tx) -> int:
            row = tx.sql.execute("SELECT max(seq) FROM events").fetchone()
            return int(row[0] or 0)

        broker._next_seq = await store.run(max_seq, write=False) + 1
        broker._timer = asyncio.create_task(broker._expire_leases(), name="embedded-leases")
        return broker

    # --- Broker protocol ---

    async def provision(
        self, workflow_id: str, queues: Sequence[queue_pb2.Queue]
    ) -> queue_pb2.QueueCredentials | None:
        """Nothing to create: a queue's rows appear with its first event. No credentials: clients
        use their WMS token."""
        return None

    async def revoke(self, workflow_id: str, *, read: bool) -> None:
        """No credentials to withdraw: EventService checks the WMS token on every call."""

    async def delete(self, workflow_id: str, queues: Sequence[queue_pb2.Queue]) -> None:
        """Delete the queues' events and counters; their subscriptions end."""
        ids = [q.queue_id for q in queues]

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM events WHERE queue_id = ?", [(i,) for i in ids])
            conn.executemany("DELETE FROM queue_counters WHERE queue_id = ?", [(i,) for i in ids])

        def apply(_: Any) -> None:
            for queue_id in ids:
                q = self._queues.pop(queue_id, None)
                if q is None:
                    continue
                q.deleted = True
                for sub in q.subs:
                    sub.closed = True
                    sub.wake.set()
                for waiter in q.waiters:
                    if not waiter.future.done():
                        waiter.future.set_result([])

        fut = self._writer.submit(run, apply)
        assert fut is not None
        await fut

    async def publish(
        self,
        queue: queue_pb2.Queue,
        events: Sequence[queue_pb2.Event],
        *,
        check: Callable[[Tx], Exception | None] | None = None,
    ) -> list[str]:
        """Commit the events, then make them ready. ``check``, if given, runs first in the same
        transaction: an exception it returns is raised instead and nothing is stored (it lets
        ``EventService`` check that the queue still takes events without a read of its own)."""
        q = await self._queue(queue)
        evs: list[_Ev] = []
        rows: list[tuple[int, str, str, bytes]] = []
        for event in events:
            seq = self._next_seq
            self._next_seq += 1
            evs.append(_Ev(seq, event))
            rows.append((seq, q.queue_id, event.event_id, event.SerializeToString()))
        n = len(rows)

        def run(conn: sqlite3.Connection) -> Exception | None:
            if check is not None and (refused := check(Tx(conn))) is not None:
                return refused
            conn.executemany(
                "INSERT INTO events (seq, queue_id, event_id, body) VALUES (?, ?, ?, ?)", rows
            )
            conn.execute(
                "INSERT INTO queue_counters (queue_id, published) VALUES (?, ?) "
                "ON CONFLICT (queue_id) DO UPDATE SET published = published + excluded.published",
                (q.queue_id, n),
            )
            return None

        def apply(refused: Exception | None) -> None:
            if refused is not None:
                return
            q.published += n
            self._events.published.inc(n)
            for ev in evs:
                if q.n_spilled == 0 and len(q.ready) < MEMORY_READY:
                    q.ready.append(ev)
                    q.cursor = ev.seq
                else:
                    q.n_spilled += 1
            self._pump(q)

        fut = self._writer.submit(run, apply)
        assert fut is not None
        if (refused := await fut) is not None:
            raise refused
        return [e.event_id for e in events]

    async def subscribe(
        self, queue: queue_pb2.Queue, prefetch: int, lease_seconds: int
    ) -> Subscription:
        """A subscription receiving deliveries as events become ready."""
        q = await self._queue(queue)
        sub = _Sub(self, q, prefetch, lease_seconds)
        q.subs.append(sub)
        self._pump(q)
        return sub

    async def receive(
        self, queue: queue_pb2.Queue, max_events: int, lease_seconds: int, wait_seconds: float
    ) -> list[queue_pb2.Delivery]:
        """Lease up to ``max_events``; wait up to ``wait_seconds`` for the first."""
        q = await self._queue(queue)
        taken = [
            self._deliver(q, None, lease_seconds) for _ in range(min(max_events, len(q.ready)))
        ]
        self._maybe_load(q)
        if taken or wait_seconds <= 0:
            return taken
        waiter = _Waiter(max_events, lease_seconds)
        q.waiters.append(waiter)
        self._pump(q)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), wait_seconds)
        except TimeoutError:
            if waiter in q.waiters:
                q.waiters.remove(waiter)
            # The pump may have filled it just as the timeout fired.
            return waiter.future.result() if waiter.future.done() else []

    async def ack(self, queue: queue_pb2.Queue, ack_ids: Sequence[str]) -> list[str]:
        """Ack and wait until the acks are committed."""
        q = await self._queue(queue)
        expired, fut = self.ack_now(q, ack_ids, wait=True)
        if fut is not None:
            await fut
        return expired

    async def nack(
        self, queue: queue_pb2.Queue, ack_id: str, error: str, dead_letter: bool
    ) -> bool:
        """Nack and wait until the change is committed."""
        q = await self._queue(queue)
        dead = self.nack_now(q, ack_id, error, dead_letter)
        await self._writer.flush()
        return dead

    async def stats(self, queue: queue_pb2.Queue) -> queue_pb2.QueueStats:
        """Exact counters from the live state."""
        q = await self._queue(queue)
        return queue_pb2.QueueStats(
            queue_id=q.queue_id,
            ready=len(q.ready) + q.n_spilled,
            in_flight=len(q.out),
            acked=q.acked,
            dead_lettered=q.dead,
            published=q.published,
        )

    async def dead_letters(
        self, queue: queue_pb2.Queue, after: int, limit: int
    ) -> tuple[list[queue_pb2.DeadLetter], int | None]:
        """Dead letters by sequence number, oldest first."""
        queue_id = queue.queue_id

        def run(conn: sqlite3.Connection) -> list[tuple[int, bytes, int, str, float]]:
            return conn.execute(
                "SELECT seq, body, attempts, last_error, dead_ts FROM events "
                "WHERE queue_id = ? AND dead_ts IS NOT NULL AND seq > ? ORDER BY seq LIMIT ?",
                (queue_id, after, limit + 1),
            ).fetchall()

        fut = self._writer.submit(run)
        assert fut is not None
        rows = await fut
        out: list[queue_pb2.DeadLetter] = []
        for seq, body, attempts, last_error, dead_ts in rows[:limit]:
            letter = queue_pb2.DeadLetter(last_error=last_error)
            letter.event.ParseFromString(body)
            letter.event.attempt = attempts
            letter.dead_lettered_ts.CopyFrom(_ts(dead_ts))
            out.append(letter)
            after = seq
        return out, (after if len(rows) > limit else None)

    async def redrive(self, queue: queue_pb2.Queue, event_ids: Sequence[str]) -> int:
        """Make dead letters ready again with no attempts counted."""
        q = await self._queue(queue)
        wanted = list(event_ids)

        def run(conn: sqlite3.Connection) -> list[tuple[int, bytes]]:
            sql = "SELECT seq, body FROM events WHERE queue_id = ? AND dead_ts IS NOT NULL"
            params: list[Any] = [q.queue_id]
            if wanted:
                sql += f" AND event_id IN ({', '.join('?' * len(wanted))})"
                params += wanted
            rows = conn.execute(sql + " ORDER BY seq", params).fetchall()
            conn.executemany(
                "UPDATE events SET dead_ts = NULL, attempts = 0, last_error = '' WHERE seq = ?",
                [(seq,) for seq, _ in rows],
            )
            return rows

        def apply(rows: list[tuple[int, bytes]]) -> None:
            q.dead -= len(rows)
            for seq, body in rows:
                if seq > q.cursor:
                    q.n_spilled += 1
                    continue
                event = queue_pb2.Event()
                event.ParseFromString(body)
                q.ready.append(_Ev(seq, event))
            self._pump(q)

        fut = self._writer.submit(run, apply)
        assert fut is not None
        return len(await fut)

    async def problem(self) -> str | None:
        """None while open: its events live in the WMS's own store, checked on its own."""
        return "closed" if self._closed else None

    async def close(self) -> None:
        """Commit what is pending; end subscriptions and the lease timer."""
        if self._closed:
            return
        self._closed = True
        for q in self._queues.values():
            for sub in list(q.subs):
                sub.closed = True
                sub.wake.set()
        await self._writer.flush()
        if self._timer is not None:
            self._timer.cancel()

    # --- used by subscriptions ---

    def ack_now(
        self, q: _Queue, ack_ids: Sequence[str], *, wait: bool
    ) -> tuple[list[str], asyncio.Future[Any] | None]:
        """Ack on the loop now; the deletes are committed with the next batch."""
        expired: list[str] = []
        seqs: list[tuple[int]] = []
        for ack_id in ack_ids:
            lease = q.out.pop(ack_id, None)
            if lease is None:
                expired.append(ack_id)
                continue
            if lease.sub is not None:
                lease.sub.outstanding.discard(ack_id)
            seqs.append((lease.ev.seq,))
        if not seqs:
            return expired, None
        q.acked += len(seqs)
        self._events.acked.inc(len(seqs))
        queue_id = q.queue_id
        n = len(seqs)

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM events WHERE seq = ?", seqs)
            conn.execute(
                "INSERT INTO queue_counters (queue_id, acked) VALUES (?, ?) "
                "ON CONFLICT (queue_id) DO UPDATE SET acked = acked + excluded.acked",
                (queue_id, n),
            )

        fut = self._writer.submit(run, wait=wait, lazy=not wait)
        self._pump(q)
        return expired, fut

    def nack_now(self, q: _Queue, ack_id: str, error: str, dead_letter: bool) -> bool:
        """Nack on the loop now; True if the event was dead-lettered."""
        lease = q.out.pop(ack_id, None)
        if lease is None:
            raise UnknownAckId(ack_id)
        if lease.sub is not None:
            lease.sub.outstanding.discard(ack_id)
        dead = self._return(q, lease.ev, _error_text(error), force_dead=dead_letter)
        self._pump(q)
        return dead

    def release(self, q: _Queue, sub: _Sub) -> None:
        """A subscription ended: everything it held goes back (counted as a failed attempt)."""
        if sub in q.subs:
            q.subs.remove(sub)
        for ack_id in list(sub.outstanding):
            lease = q.out.pop(ack_id, None)
            if lease is not None:
                self._return(
                    q,
                    lease.ev,
                    "the consumer went away (its stream ended) without ack or nack",
                    force_dead=False,
                )
        sub.outstanding.clear()
        sub.outbox.clear()
        self._pump(q)

    # --- internals ---

    async def _queue(self, queue: queue_pb2.Queue) -> _Queue:
        """The live state of a queue, loaded from SQLite on first use."""
        q = self._queues.get(queue.queue_id)
        if q is not None:
            return q
        pending = self._opening.get(queue.queue_id)
        if pending is not None:
            return await asyncio.shield(pending)
        queue_id = queue.queue_id
        max_attempts = queue.max_attempts or DEFAULT_MAX_ATTEMPTS

        def run(conn: sqlite3.Connection) -> tuple[int, int, int, int]:
            counters = conn.execute(
                "SELECT published, acked FROM queue_counters WHERE queue_id = ?", (queue_id,)
            ).fetchone() or (0, 0)
            n_ready = conn.execute(
                "SELECT count(*) FROM events WHERE queue_id = ? AND dead_ts IS NULL", (queue_id,)
            ).fetchone()[0]
            n_dead = conn.execute(
                "SELECT count(*) FROM events WHERE queue_id = ? AND dead_ts IS NOT NULL",
                (queue_id,),
            ).fetchone()[0]
            return counters[0], counters[1], n_ready, n_dead

        opening: asyncio.Future[_Queue] = asyncio.get_running_loop().create_future()
        self._opening[queue_id] = opening

        def apply(result: tuple[int, int, int, int]) -> None:
            published, acked, n_ready, n_dead = result
            q = _Queue(queue_id, max_attempts, published, acked, n_dead, n_spilled=n_ready)
            self._queues[queue_id] = q
            del self._opening[queue_id]
            opening.set_result(q)
            self._maybe_load(q)

        fut = self._writer.submit(run, apply)
        assert fut is not None
        try:
            await fut
        except BaseException as exc:
            self._opening.pop(queue_id, None)
            if not opening.done():
                opening.set_exception(exc)
                opening.exception()  # retrieved: nobody else may be waiting
            raise
        return await opening

    def _maybe_load(self, q: _Queue) -> None:
        """Bring spilled events into memory when the in-memory ready list runs low."""
        if q.loading or q.n_spilled == 0 or len(q.ready) >= LOAD_BELOW or q.deleted:
            return
        q.loading = True
        after = q.cursor
        limit = MEMORY_READY - len(q.ready)
        queue_id = q.queue_id

        def run(conn: sqlite3.Connection) -> list[tuple[int, bytes, int, str]]:
            return conn.execute(
                "SELECT seq, body, attempts, last_error FROM events "
                "WHERE queue_id = ? AND dead_ts IS NULL AND seq > ? ORDER BY seq LIMIT ?",
                (queue_id, after, limit),
            ).fetchall()

        def apply(rows: list[tuple[int, bytes, int, str]]) -> None:
            q.loading = False
            for seq, body, attempts, last_error in rows:
                if seq <= q.cursor:
                    continue
                event = queue_pb2.Event()
                event.ParseFromString(body)
                q.ready.append(_Ev(seq, event, attempts, last_error))
                q.cursor = seq
                q.n_spilled -= 1
            if not rows and q.n_spilled:
                log.error("spilled events not found", queue_id=q.queue_id, n=q.n_spilled)
                q.n_spilled = 0
            self._pump(q)

        self._writer.submit(run, apply, wait=False)

    def _deliver(self, q: _Queue, sub: _Sub | None, lease_seconds: int) -> queue_pb2.Delivery:
        """Lease the next ready event."""
        ev = q.ready.popleft()
        ev.attempts += 1
        self._events.delivered.inc()
        ack_id = f"{self._ack_prefix}{next(self._ack_counter):x}"
        expires = time.monotonic() + lease_seconds if lease_seconds > 0 else None
        q.out[ack_id] = _Lease(ack_id, ev, sub, expires)
        delivery = queue_pb2.Delivery(ack_id=ack_id)
        delivery.event.CopyFrom(ev.event)
        delivery.event.attempt = ev.attempts
        delivery.event.queue_id = q.queue_id
        if expires is not None:
            delivery.lease_expires.CopyFrom(_ts(time.time() + lease_seconds))
            heapq.heappush(self._leases, (expires, q.queue_id, ack_id))
            if self._leases[0][2] == ack_id:
                self._timer_wake.set()
        if sub is not None:
            sub.outstanding.add(ack_id)
        return delivery

    def credit_changed(self, q: _Queue) -> None:
        """A subscriber of ``q`` may take more now: hand it what is ready."""
        if not q.deleted:
            self._pump(q)

    def _pump(self, q: _Queue) -> None:
        """Hand ready events to waiting receivers and to subscribers with credit, round-robin."""
        while q.ready and q.waiters:
            waiter = q.waiters.pop(0)
            if waiter.future.done():
                continue
            n = min(waiter.max_events, len(q.ready))
            waiter.future.set_result(
                [self._deliver(q, None, waiter.lease_seconds) for _ in range(n)]
            )
        subs = q.subs
        while q.ready and subs:
            progressed = False
            n_subs = len(subs)
            for i in range(n_subs):
                sub = subs[(q.rr + i) % n_subs]
                if not q.ready:
                    break
                if sub.credit > 0:
                    sub.push(self._deliver(q, sub, sub.lease_seconds))
                    progressed = True
            q.rr = (q.rr + 1) % n_subs
            if not progressed:
                break
        self._maybe_load(q)

    def _return(self, q: _Queue, ev: _Ev, error: str, *, force_dead: bool) -> bool:
        """An event came back unacked: requeue it, or dead-letter it after its last attempt."""
        ev.last_error = error
        seq, attempts = ev.seq, ev.attempts
        if force_dead or ev.attempts >= q.max_attempts:
            q.dead += 1
            self._events.dead_lettered.inc()
            now = time.time()

            def dead(conn: sqlite3.Connection) -> None:
                conn.execute(
                    "UPDATE events SET dead_ts = ?, attempts = ?, last_error = ? WHERE seq = ?",
                    (now, attempts, error, seq),
                )

            self._writer.submit(dead, wait=False, lazy=True)
            return True
        q.ready.append(ev)

        def requeue(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE events SET attempts = ?, last_error = ? WHERE seq = ?",
                (attempts, error, seq),
            )

        self._writer.submit(requeue, wait=False, lazy=True)
        return False

    async def _expire_leases(self) -> None:
        """Take back deliveries whose lease ran out."""
        while True:
            delay = None
            now = time.monotonic()
            while self._leases and self._leases[0][0] <= now:
                _, queue_id, ack_id = heapq.heappop(self._leases)
                q = self._queues.get(queue_id)
                lease = q.out.get(ack_id) if q is not None else None
                if q is None or lease is None:
                    continue
                del q.out[ack_id]
                if lease.sub is not None:
                    lease.sub.outstanding.discard(ack_id)
                self._return(q, lease.ev, "lease expired without ack or nack", force_dead=False)
                self._pump(q)
            if self._leases:
                delay = self._leases[0][0] - now
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), delay)
