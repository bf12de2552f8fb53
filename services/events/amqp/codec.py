"""The AMQP message format of events (see :mod:`services.events.wire`): events to messages to
publish, delivered messages back to events, and the copies made for dead-lettering and
re-driving."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any

import pika

from ewms.v1 import queue_pb2
from services.events import wire
from services.events.client import RESERVED_HEADER_PREFIX

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
