"""Event queues over AMQP 0-9-1, straight to RabbitMQ: :class:`AmqpQueueClient` (the
:class:`~services.events.client.QueueClient` protocol) and the connection machinery under it, which
the WMS's RabbitMQ broker shares. Messages follow :mod:`services.events.wire`.

One job per file, from the ground up (each imports only files above it; the two back-references
are for annotations only):

- ``codec.py``: events ↔ AMQP messages, dead-letter and re-drive copies, header parsing.
- ``errors.py``: pika's errors and close reasons as QueueErrors (403, 404, refused logins).
- ``transport.py``: pika's connection classes, with one socket write per message.
- ``channel.py``: :class:`AmqpChannel`: AMQP methods, publisher confirms, ``basic.get``,
  consumers handing deliveries to the event loop in batches.
- ``connection.py``: :class:`AmqpConnection`: the I/O thread (or the event loop) and the
  crossing of calls and results between it and asyncio; its docstring has the threading notes.
- ``subscription.py``: :class:`AmqpSubscription`: deliveries, ack ids, acks, nacks, leases.
- ``client.py``: :class:`AmqpQueueClient`: publish, subscribe, one connection per client.
"""

from services.events.amqp.channel import AmqpChannel
from services.events.amqp.client import AmqpQueueClient
from services.events.amqp.codec import (
    BROKER_HEADERS,
    DEAD_LETTER_HEADERS,
    MAX_ERROR_BYTES,
    PERSISTENT,
    OutMessage,
    RawMessage,
    dead_letter_message,
    event_message,
    header_int,
    header_text,
    message_event,
    redriven_message,
    timestamp_ns,
    truncate_error,
)
from services.events.amqp.connection import (
    BLOCKED_CONNECTION_TIMEOUT,
    CLOSE_TIMEOUT,
    DEFAULT_CONNECT_ATTEMPTS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEARTBEAT,
    AmqpConnection,
)
from services.events.amqp.errors import broker_error
from services.events.amqp.subscription import AmqpSubscription

__all__ = [
    "BLOCKED_CONNECTION_TIMEOUT",
    "BROKER_HEADERS",
    "CLOSE_TIMEOUT",
    "DEAD_LETTER_HEADERS",
    "DEFAULT_CONNECT_ATTEMPTS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HEARTBEAT",
    "MAX_ERROR_BYTES",
    "PERSISTENT",
    "AmqpChannel",
    "AmqpConnection",
    "AmqpQueueClient",
    "AmqpSubscription",
    "OutMessage",
    "RawMessage",
    "broker_error",
    "dead_letter_message",
    "event_message",
    "header_int",
    "header_text",
    "message_event",
    "redriven_message",
    "timestamp_ns",
    "truncate_error",
]
