"""How an :class:`ewms.v1.queue_pb2.Event` travels as an AMQP message in a RabbitMQ queue.

Every RabbitMQ client of EWMS queues (the WMS's proxy, pilots, ``AmqpQueueClient``) uses these
names, so an event published one way can be consumed another.

- body: the payload bytes, untouched;
- ``message_id``: the event id; ``content_type``: the content type; ``delivery_mode`` 2;
- ``timestamp``: publish time in whole seconds, and header ``x-ewms-published-ns`` in nanoseconds;
- headers: the event's own headers, plus ``x-ewms-taskforce``, ``x-ewms-worker`` and
  ``x-ewms-input-event`` for provenance;
- on dead letters: ``x-ewms-last-error``, ``x-ewms-attempts`` and ``x-ewms-dead-lettered-ns``.

The attempt number of a delivery is RabbitMQ's ``x-delivery-count`` header (quorum queues; absent on
the first delivery) plus one.
"""

from __future__ import annotations

# Topology per EWMS queue <id>: a durable quorum queue named <id> with x-delivery-limit, bound to
# its workflow's exchange with routing key <id>; its dead letters go through the same exchange with
# routing key <id>.dead into the durable queue <id>.dead.
DEAD_LETTER_SUFFIX = ".dead"

H_PUBLISHED_NS = "x-ewms-published-ns"
H_TASKFORCE = "x-ewms-taskforce"
H_WORKER = "x-ewms-worker"
H_INPUT_EVENT = "x-ewms-input-event"
H_LAST_ERROR = "x-ewms-last-error"
H_ATTEMPTS = "x-ewms-attempts"
H_DEAD_LETTERED_NS = "x-ewms-dead-lettered-ns"
H_DELIVERY_COUNT = "x-delivery-count"


def dead_letter_queue(queue_id: str) -> str:
    """Name of the queue holding ``queue_id``'s dead letters."""
    return queue_id + DEAD_LETTER_SUFFIX


def workflow_part(queue_id: str) -> str:
    """``<epoch hex>-<8 hex>`` of the workflow owning ``Q-<epoch hex>-<8 hex>-<8 hex>``."""
    body = queue_id.removeprefix("Q-").removesuffix(DEAD_LETTER_SUFFIX)
    return body.rsplit("-", 1)[0]


def workflow_exchange(queue_id: str) -> str:
    """The workflow's direct exchange, ``E-<workflow part>``: every publish into the workflow's
    queues (routing key = queue id) and every dead letter (routing key = dead-letter queue name)
    goes through it. Workflow users may not publish through the default exchange: RabbitMQ checks
    write permission on the exchange only, so the default exchange would reach every queue."""
    return f"E-{workflow_part(queue_id)}"


def workflow_exchange_of(workflow_id: str) -> str:
    """The exchange of workflow ``WF-<part>``: :func:`workflow_exchange` of any of its queues."""
    return f"E-{workflow_id.removeprefix('WF-')}"


def workflow_username(workflow_id: str) -> str:
    """The RabbitMQ user of a workflow's credentials."""
    return f"ewms-{workflow_id}"
