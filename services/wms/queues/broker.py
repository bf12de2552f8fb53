"""What ``EventService`` needs from a queue backend. Two implement it: the embedded broker
(``services/wms/queues/embedded.py``, SQLite) and RabbitMQ (``services/wms/queues/rabbitmq.py``).

Access control, validation and the workflow's state are checked by ``EventService`` before a broker
is called; brokers deal with events only. ``queue`` arguments are the stored ``Queue`` messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ewms.v1 import queue_pb2
from services.events.client import Subscription


class UnknownAckId(LookupError):
    """An ack id that is not (or no longer) out: expired lease, already acked, or from before a
    restart."""


class Broker(Protocol):
    """A queue backend of the WMS."""

    async def provision(
        self, workflow_id: str, queues: Sequence[queue_pb2.Queue]
    ) -> queue_pb2.QueueCredentials | None:
        """Create the workflow's queues (idempotent); returns credentials for direct broker access,
        or None when the backend has none."""
        ...

    async def delete(self, workflow_id: str, queues: Sequence[queue_pb2.Queue]) -> None:
        """Delete the workflow's queues, their events and credentials (idempotent)."""
        ...

    async def revoke(self, workflow_id: str, *, read: bool) -> None:
        """Withdraw the ended workflow's broker credentials: their write permission (``read``
        False), or the credentials altogether (idempotent). Nothing for a backend without them."""
        ...

    async def publish(self, queue: queue_pb2.Queue, events: Sequence[queue_pb2.Event]) -> list[str]:
        """Store the events (ids and ``published_ts`` already set) durably; returns their ids."""
        ...

    async def subscribe(
        self, queue: queue_pb2.Queue, prefetch: int, lease_seconds: int
    ) -> Subscription:
        """A consumer holding at most ``prefetch`` unacked deliveries; ``lease_seconds`` 0 means its
        deliveries stay with it while it is open."""
        ...

    async def receive(
        self, queue: queue_pb2.Queue, max_events: int, lease_seconds: int, wait_seconds: float
    ) -> list[queue_pb2.Delivery]:
        """Lease up to ``max_events`` ready events, waiting up to ``wait_seconds`` for the first."""
        ...

    async def ack(self, queue: queue_pb2.Queue, ack_ids: Sequence[str]) -> list[str]:
        """Ack leased deliveries; returns the ack ids that were no longer out."""
        ...

    async def nack(
        self, queue: queue_pb2.Queue, ack_id: str, error: str, dead_letter: bool
    ) -> bool:
        """Nack a leased delivery; True if its event was dead-lettered. ``UnknownAckId`` if the ack
        id is not out."""
        ...

    async def stats(self, queue: queue_pb2.Queue) -> queue_pb2.QueueStats:
        """The queue's counters."""
        ...

    async def dead_letters(
        self, queue: queue_pb2.Queue, after: int, limit: int
    ) -> tuple[list[queue_pb2.DeadLetter], int | None]:
        """Up to ``limit`` dead letters past position ``after`` (0 = start), oldest first, and the
        position to continue from (None at the end)."""
        ...

    async def redrive(self, queue: queue_pb2.Queue, event_ids: Sequence[str]) -> int:
        """Move dead letters (all when ``event_ids`` is empty) back into the queue with a fresh
        attempt count; returns how many moved."""
        ...

    async def problem(self) -> str | None:
        """Why this backend cannot serve now (None when it can): for the readiness probe."""
        ...

    async def close(self) -> None:
        """Flush and release everything; open subscriptions end."""
        ...
