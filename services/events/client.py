"""The one client interface to event queues, whichever backend holds them.

Two implementations:

- :class:`services.events.grpc_client.GrpcQueueClient` talks to the WMS's ``EventService``; it works
  for every queue (the WMS proxies RabbitMQ-backed ones).
- :class:`services.events.amqp.AmqpQueueClient` talks AMQP 0-9-1 straight to RabbitMQ with a
  workflow's credentials (pilots and heavy users).

Both hand out :class:`ewms.v1.queue_pb2.Delivery` messages: ``delivery.event.attempt`` is the
delivery's attempt number (1 on first delivery) and ``delivery.ack_id`` names it in ``ack`` and
``nack``. Semantics (the conformance suite in ``tests/events`` holds both to them):

- ``publish`` returns only once every event is durably stored (or raises; then none or some were
  stored, and re-publishing may duplicate -- at-least-once).
- a subscription never holds more unacked deliveries than its prefetch; closing it, or the process
  dying, hands its unacked deliveries back to the queue at once.
- ``nack`` requeues; at the queue's ``max_attempts`` (or with ``dead_letter=True``) the event
  goes to the queue's dead-letter queue with the error text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Protocol

from ewms.v1 import queue_pb2

# Deliveries an event gets before it is dead-lettered, when a task does not say.
DEFAULT_MAX_ATTEMPTS = 3
# Largest payload of one event, unless EWMS_MAX_EVENT_BYTES says otherwise.
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024
# Header names with this prefix are reserved: the broker's ("x-delivery-count", "x-death") and ours.
RESERVED_HEADER_PREFIX = "x-"


class QueueError(Exception):
    """A queue operation failed; the message says which and why."""


class EventTooLarge(QueueError):
    """An event's payload is over the size limit."""


class QueueAccessDenied(QueueError):
    """The credentials may not use this queue (RabbitMQ ACCESS_REFUSED, gRPC PERMISSION_DENIED)."""


class QueueNotFound(QueueError):
    """No such queue."""


class QueueUnavailable(QueueError):
    """The WMS or broker could not be reached, or the connection broke mid-call (gRPC UNAVAILABLE
    or DEADLINE_EXCEEDED): an outage, not a fault of the request, so the same call may succeed
    once it is back."""


class QueueClosed(QueueError):
    """The queue's workflow was finished or aborted: it takes no new events (gRPC
    FAILED_PRECONDITION); what it holds can still be consumed."""


class Subscription(Protocol):
    """An open consumer of one queue. Iterate for deliveries; ack or nack each one."""

    @property
    def prefetch(self) -> int:
        """Maximum unacked deliveries held at once."""
        ...

    def __aiter__(self) -> AsyncIterator[queue_pb2.Delivery]:
        """Deliveries as they arrive; ends when the subscription is closed."""
        ...

    async def ack(self, *deliveries: queue_pb2.Delivery) -> None:
        """The events are done and leave the queue."""
        ...

    async def nack(
        self, delivery: queue_pb2.Delivery, error: str, *, dead_letter: bool = False
    ) -> None:
        """The event failed with ``error``: requeue it, or dead-letter it (at once when asked, or
        because this was its last allowed attempt)."""
        ...

    async def set_prefetch(self, prefetch: int) -> None:
        """Hold at most ``prefetch`` unacked deliveries from now on (1 or more). Lowering it takes
        nothing back: new deliveries wait until fewer are held. While the change takes effect
        the subscriber may briefly hold up to the old and the new limits together (RabbitMQ:
        a new consumer with the new limit replaces the old one on the same channel)."""
        ...

    async def pause(self) -> None:
        """Take no new deliveries (draining); those held can still be acked or nacked, and a nack
        now returns the event to other consumers rather than to this one."""
        ...

    async def close(self) -> None:
        """Stop consuming; unacked deliveries go back to the queue now. Idempotent."""
        ...

    async def __aenter__(self) -> Subscription: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class QueueClient(Protocol):
    """Publish to and consume from event queues."""

    async def publish(self, queue_id: str, events: Sequence[queue_pb2.Event]) -> list[str]:
        """Store the events durably; returns their event ids in order (assigned when unset)."""
        ...

    async def subscribe(self, queue_id: str, prefetch: int) -> Subscription:
        """Open a consumer of the queue holding at most ``prefetch`` unacked deliveries."""
        ...

    async def close(self) -> None:
        """Close connections; open subscriptions end and hand back their deliveries."""
        ...
