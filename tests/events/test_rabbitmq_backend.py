"""The RabbitMQ backend against a real broker: ``RabbitBroker`` (topology, credentials, leases,
stats, dead letters, re-drive) and ``AmqpQueueClient`` with workflow credentials (wire format,
permissions, nack/dead-letter rules, prefetch)."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pika
import pytest

from ewms.v1 import queue_pb2
from services import ids
from services.events import wire
from services.events.amqp import AmqpQueueClient, AmqpSubscription, OutMessage
from services.events.client import EventTooLarge, QueueAccessDenied, QueueError, QueueNotFound
from services.wms.queues.broker import UnknownAckId
from services.wms.queues.rabbitmq import RabbitBroker, delivery_limit_error
from services.wms.queues.rabbitmq_admin import workflow_permissions
from tests.conftest import RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL, require_rabbitmq

WAIT = 10.0  # seconds to wait for something that should happen at once
STATS_WAIT = 20.0  # management API counters refresh every ~5 s


@dataclass
class Workflow:
    """A provisioned test workflow."""

    workflow_id: str
    queues: list[queue_pb2.Queue]
    credentials: queue_pb2.QueueCredentials

    @property
    def queue(self) -> queue_pb2.Queue:
        """Its first queue."""
        return self.queues[0]

    @property
    def url(self) -> str:
        """AMQP URL with the workflow's credentials."""
        return user_url(self.credentials)


def user_url(credentials: queue_pb2.QueueCredentials) -> str:
    """The test broker's AMQP URL with other credentials."""
    parts = urllib.parse.urlsplit(RABBITMQ_URL)
    userinfo = (
        f"{urllib.parse.quote(credentials.username, safe='')}:"
        f"{urllib.parse.quote(credentials.password, safe='')}"
    )
    netloc = f"{userinfo}@{parts.hostname}:{parts.port or 5672}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


Provision = Callable[..., Awaitable[Workflow]]


@pytest.fixture
async def broker() -> AsyncIterator[RabbitBroker]:
    """A RabbitBroker with the admin credentials."""
    require_rabbitmq()
    opened = await RabbitBroker.connect(
        RABBITMQ_URL, RABBITMQ_MANAGEMENT_URL, max_event_bytes=64 * 1024
    )
    try:
        yield opened
    finally:
        await opened.close()
    thread = opened.client.connection.thread
    assert thread is not None and not thread.is_alive()


@pytest.fixture
async def provision(broker: RabbitBroker) -> AsyncIterator[Provision]:
    """``await provision(n_queues=1, max_attempts=2)``: a new workflow, deleted after the test."""
    made: list[Workflow] = []

    async def make(n_queues: int = 1, max_attempts: int = 2) -> Workflow:
        workflow_id = ids.workflow_id()
        queues = [
            queue_pb2.Queue(
                queue_id=ids.queue_id(workflow_id),
                workflow_id=workflow_id,
                alias=f"q{i}",
                backend=queue_pb2.QUEUE_BACKEND_RABBITMQ,
                max_attempts=max_attempts,
            )
            for i in range(n_queues)
        ]
        credentials = await broker.provision(workflow_id, queues)
        workflow = Workflow(workflow_id, queues, credentials)
        made.append(workflow)
        return workflow

    try:
        yield make
    finally:
        for workflow in made:
            await broker.delete(workflow.workflow_id, workflow.queues)


@pytest.fixture(params=[True, False], ids=["io-thread", "io-loop"])
async def clients(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Awaitable[AmqpQueueClient]]]:
    """``await clients(url, **kwargs)``: AmqpQueueClients, closed after the test; every test runs
    with the connection on its own I/O thread and on the event loop."""
    opened: list[AmqpQueueClient] = []
    io_thread = bool(request.param)

    async def connect(url: str, **kwargs: object) -> AmqpQueueClient:
        client = await AmqpQueueClient.connect(
            url,
            io_thread=io_thread,
            **kwargs,  # type: ignore[arg-type]
        )
        assert (client.connection.thread is not None) == io_thread
        opened.append(client)
        return client

    try:
        yield connect
    finally:
        for client in opened:
            await client.close()
            assert not client.is_open
            thread = client.connection.thread
            assert thread is None or not thread.is_alive()


def event(payload: bytes, **fields: object) -> queue_pb2.Event:
    """An event to publish."""
    return queue_pb2.Event(payload=payload, **fields)  # type: ignore[arg-type]


async def next_delivery(it: AsyncIterator[queue_pb2.Delivery]) -> queue_pb2.Delivery:
    """The next delivery, failing the test if none comes in time."""
    return await asyncio.wait_for(anext(it), WAIT)


async def counts(broker: RabbitBroker, queue_name: str) -> tuple[int, int]:
    """(ready, consumers) of a queue, exact."""
    channel = await broker.client.connection.channel()
    try:
        return await channel.counts(queue_name)
    finally:
        await channel.close()


async def ready(broker: RabbitBroker, queue_name: str) -> int:
    """Ready messages of a queue, exact."""
    return (await counts(broker, queue_name))[0]


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll ``check`` until it holds (RabbitMQ acts asynchronously); fail after ``within`` s."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.1)


async def receive_one(
    broker: RabbitBroker, queue: queue_pb2.Queue, lease: int = 60
) -> queue_pb2.Delivery:
    """Lease exactly one delivery, waiting for it."""
    got = await broker.receive(queue, 1, lease, WAIT)
    assert len(got) == 1
    return got[0]


# --- topology and credentials ---


async def test_provision_creates_user_permissions_and_queues(
    broker: RabbitBroker, provision: Provision
) -> None:
    wf = await provision(n_queues=2, max_attempts=4)
    username = wire.workflow_username(wf.workflow_id)
    assert wf.credentials.username == username
    assert len(wf.credentials.password) >= 24
    assert not wf.credentials.HasField("expires")

    user = await broker.admin.user(username)
    assert user is not None and user["tags"] in ("", [])
    part = wf.workflow_id.removeprefix("WF-")
    permissions = await broker.admin.permissions(username)
    assert permissions is not None
    assert (permissions["configure"], permissions["write"], permissions["read"]) == (
        "^$",
        f"^E-{part}$",
        f"^Q-{part}-[0-9a-f]{{8}}(\\.dead)?$",
    )
    exchange = wire.workflow_exchange_of(wf.workflow_id)
    details = await broker.admin.exchange(exchange)
    assert details is not None and details["type"] == "direct" and details["durable"]
    bindings = await broker.admin.request("GET", f"/api/exchanges/%2F/{exchange}/bindings/source")
    bound = {(b["destination"], b["routing_key"]) for b in bindings}
    for queue in wf.queues:
        dead = wire.dead_letter_queue(queue.queue_id)
        assert (queue.queue_id, queue.queue_id) in bound
        assert (dead, dead) in bound
        info = await broker.admin.queue(queue.queue_id)
        assert info is not None and info["durable"]
        assert info["arguments"] == {
            "x-queue-type": "quorum",
            "x-delivery-limit": 3,
            "x-dead-letter-exchange": exchange,
            "x-dead-letter-routing-key": dead,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
        dead_info = await broker.admin.queue(dead)
        assert dead_info is not None and dead_info["durable"] and dead_info["type"] == "classic"


async def test_provision_is_idempotent_and_keeps_events(
    broker: RabbitBroker, provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    wf = await provision()
    await broker.publish(wf.queue, [event(b"kept")])
    again = await broker.provision(wf.workflow_id, wf.queues)
    assert again.username == wf.credentials.username
    assert await counts(broker, wf.queue.queue_id) == (1, 0)
    client = await clients(user_url(again))
    async with await client.subscribe(wf.queue.queue_id, 1) as sub:
        delivery = await next_delivery(aiter(sub))
        assert delivery.event.payload == b"kept"
        await sub.ack(delivery)


async def test_delete_removes_queues_exchange_and_user(
    broker: RabbitBroker, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    workflow_id = ids.workflow_id()
    queue = queue_pb2.Queue(queue_id=ids.queue_id(workflow_id), max_attempts=2)
    credentials = await broker.provision(workflow_id, [queue])
    client = await clients(user_url(credentials))
    await client.publish(queue.queue_id, [event(b"x")])

    await broker.delete(workflow_id, [queue])
    assert await broker.admin.user(credentials.username) is None
    assert await broker.admin.queue(queue.queue_id) is None
    assert await broker.admin.queue(wire.dead_letter_queue(queue.queue_id)) is None
    assert await broker.admin.exchange(wire.workflow_exchange_of(workflow_id)) is None
    # RabbitMQ closes a deleted user's connections.

    async def closed() -> bool:
        return not client.is_open

    await eventually(closed, WAIT, "the deleted user's connection is closed")
    with pytest.raises(QueueError):
        await client.publish(queue.queue_id, [event(b"y")])
    await broker.delete(workflow_id, [queue])  # idempotent
    with pytest.raises(QueueAccessDenied):
        await AmqpQueueClient.connect(user_url(credentials), connect_attempts=1)


def test_permissions_reject_a_non_workflow_id() -> None:
    with pytest.raises(ValueError):
        workflow_permissions("WF-.*")


# --- the wire format, with a workflow's credentials ---


async def test_round_trip_with_workflow_credentials(
    provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    wf = await provision()
    client = await clients(wf.url)
    full = event(
        b'{"n": 1}',
        event_id="EV-mine",
        content_type="application/json",
        headers={"color": "blue", "Empty": ""},
        provenance=queue_pb2.EventProvenance(
            taskforce_uuid="TF-1", worker_id="w-7", input_event_id="EV-input"
        ),
    )
    full.published_ts.FromNanoseconds(1_700_000_000_123_456_789)
    bare = event(b"\x00\xffbinary")
    before = time.time_ns()
    event_ids = await client.publish(wf.queue.queue_id, [full, bare])
    after = time.time_ns()
    assert event_ids[0] == "EV-mine"
    assert event_ids[1].startswith("EV-") and len(event_ids[1]) == 35
    assert bare.event_id == "" and not bare.HasField("published_ts")  # caller's events untouched

    async with await client.subscribe(wf.queue.queue_id, 2) as sub:
        it = aiter(sub)
        first, second = await next_delivery(it), await next_delivery(it)
        assert first.ack_id != second.ack_id
        got = first.event
        assert got.event_id == "EV-mine"
        assert got.queue_id == wf.queue.queue_id
        assert got.payload == b'{"n": 1}'
        assert got.content_type == "application/json"
        assert dict(got.headers) == {"color": "blue", "Empty": ""}
        assert got.attempt == 1
        assert got.published_ts.ToNanoseconds() == 1_700_000_000_123_456_789
        assert got.provenance == full.provenance
        other = second.event
        assert other.event_id == event_ids[1]
        assert other.payload == b"\x00\xffbinary"
        assert other.content_type == "" and dict(other.headers) == {}
        assert not other.HasField("provenance")
        assert before <= other.published_ts.ToNanoseconds() <= after
        await sub.ack(first, second)


async def test_messages_follow_the_wire_format(broker: RabbitBroker, provision: Provision) -> None:
    """What a raw AMQP consumer sees: properties and headers as wire.py documents."""
    wf = await provision()
    sent = event(
        b"p",
        event_id="EV-wire",
        content_type="text/plain",
        headers={"k": "v"},
        provenance=queue_pb2.EventProvenance(taskforce_uuid="TF-9"),
    )
    sent.published_ts.FromNanoseconds(1_700_000_001_500_000_000)
    await broker.publish(wf.queue, [sent])
    channel = await broker.client.connection.channel()
    try:
        (raw,), _ = await channel.get(wf.queue.queue_id, 1)
    finally:
        await channel.close()
    props = raw.properties
    assert raw.exchange == wire.workflow_exchange(wf.queue.queue_id)
    assert raw.routing_key == wf.queue.queue_id
    assert (props.message_id, props.content_type, props.delivery_mode) == (
        "EV-wire",
        "text/plain",
        2,
    )
    assert props.timestamp == 1_700_000_001
    headers = dict(props.headers)
    headers.pop(wire.H_DELIVERY_COUNT, None)  # quorum queues add it on basic.get
    assert headers == {
        "k": "v",
        wire.H_PUBLISHED_NS: 1_700_000_001_500_000_000,
        wire.H_TASKFORCE: "TF-9",
    }


async def test_event_too_large_sends_nothing(
    broker: RabbitBroker, provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    wf = await provision()
    client = await clients(wf.url, max_event_bytes=1000)
    with pytest.raises(EventTooLarge, match=r"events\[1\].*1001 bytes.*1000"):
        await client.publish(wf.queue.queue_id, [event(b"ok"), event(b"x" * 1001)])
    assert await counts(broker, wf.queue.queue_id) == (0, 0)


async def test_missing_queues_and_exchanges(
    provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    wf = await provision()
    client = await clients(RABBITMQ_URL)
    missing = ids.queue_id(wf.workflow_id)  # the workflow's exchange, no such queue bound
    with pytest.raises(QueueNotFound, match=r"unroutable|returned"):
        await client.publish(missing, [event(b"x")])
    with pytest.raises(QueueNotFound, match="no exchange"):
        await client.publish(ids.queue_id(ids.workflow_id()), [event(b"x")])
    with pytest.raises(QueueNotFound):
        await client.subscribe(missing, 1)
    # The client is still usable after errors closed its channels.
    assert await client.publish(wf.queue.queue_id, [event(b"fine")])


@pytest.mark.parametrize("io_thread", [True, False], ids=["io-thread", "io-loop"])
async def test_unreachable_broker_fails_fast(io_thread: bool) -> None:
    require_rabbitmq()
    started = time.monotonic()
    with pytest.raises(QueueError, match="cannot connect"):
        await AmqpQueueClient.connect(
            "amqp://guest:guest@127.0.0.1:1/%2F",
            connect_attempts=2,
            connect_timeout=2,
            io_thread=io_thread,
        )
    assert time.monotonic() - started < 15
    with pytest.raises(QueueAccessDenied, match="refused"):
        await AmqpQueueClient.connect(
            user_url(queue_pb2.QueueCredentials(username="ewms-nobody", password="wrong")),
            connect_attempts=1,
            io_thread=io_thread,
        )


async def test_workflow_credentials_are_refused_on_another_workflows_queues(
    broker: RabbitBroker, provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    a, b = await provision(), await provision()
    await broker.publish(b.queue, [event(b"b's")])
    client = await clients(a.url)
    target = b.queue.queue_id

    with pytest.raises(QueueAccessDenied, match=r"ACCESS_REFUSED.*exchange"):
        await client.publish(target, [event(b"intruder")])
    with pytest.raises(QueueAccessDenied, match=r"ACCESS_REFUSED.*queue"):
        await client.subscribe(target, 1)
    with pytest.raises(QueueAccessDenied, match=r"ACCESS_REFUSED.*queue"):
        await client.subscribe(wire.dead_letter_queue(target), 1)
    channel = await client.connection.channel()
    with pytest.raises(QueueAccessDenied, match="ACCESS_REFUSED"):
        await channel.get(target, 1)
    # Not through the default exchange either, nor by declaring or deleting anything.
    channel = await client.connection.channel(confirm=True)
    with pytest.raises(QueueAccessDenied, match=r"amq\.default"):
        await channel.publish([OutMessage("", target, b"x", pika.BasicProperties())])
    channel = await client.connection.channel()
    with pytest.raises(QueueAccessDenied):
        await channel.delete_queue(a.queue.queue_id)
    channel = await client.connection.channel()
    with pytest.raises(QueueAccessDenied):
        await channel.declare_queue(ids.queue_id(a.workflow_id))
    # Routing at b's queue through a's own exchange finds no such queue.
    with pytest.raises(QueueNotFound):
        await client.publish_messages(
            [
                OutMessage(
                    wire.workflow_exchange(a.queue.queue_id),
                    target,
                    b"x",
                    pika.BasicProperties(message_id="EV-x"),
                )
            ]
        )

    assert await counts(broker, target) == (1, 0)  # b's event untouched, nothing added
    # a's own queue still works on the same connection.
    assert len(await client.publish(a.queue.queue_id, [event(b"mine")])) == 1
    async with await client.subscribe(a.queue.queue_id, 1) as sub:
        delivery = await next_delivery(aiter(sub))
        assert delivery.event.payload == b"mine"
        await sub.ack(delivery)


# --- nack, dead letters, redelivery ---


async def test_nack_requeues_with_attempt_2(
    provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    wf = await provision(max_attempts=3)
    client = await clients(wf.url, max_attempts=3)
    [event_id] = await client.publish(wf.queue.queue_id, [event(b"retry me")])
    async with await client.subscribe(wf.queue.queue_id, 1) as sub:
        it = aiter(sub)
        first = await next_delivery(it)
        assert (first.event.event_id, first.event.attempt) == (event_id, 1)
        await sub.nack(first, "transient")
        second = await next_delivery(it)
        assert (second.event.event_id, second.event.attempt) == (event_id, 2)
        assert second.ack_id != first.ack_id
        await sub.ack(second)


async def test_dead_letter_at_max_attempts_carries_the_error(
    broker: RabbitBroker, provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    wf = await provision(max_attempts=2)
    client = await clients(wf.url, max_attempts={wf.queue.queue_id: 2})
    [event_id] = await client.publish(wf.queue.queue_id, [event(b"doomed", headers={"h": "1"})])
    async with await client.subscribe(wf.queue.queue_id, 1) as sub:
        it = aiter(sub)
        await sub.nack(await next_delivery(it), "first failure")
        last = await next_delivery(it)
        assert last.event.attempt == 2
        started = time.time_ns()
        await sub.nack(last, "second failure: " + "é" * 5000)
    assert await ready(broker, wf.queue.queue_id) == 0
    letters, more = await broker.dead_letters(wf.queue, 0, 10)
    assert more is None and len(letters) == 1
    letter = letters[0]
    assert letter.event.event_id == event_id and letter.event.payload == b"doomed"
    assert dict(letter.event.headers) == {"h": "1"}
    assert letter.event.attempt == 2
    assert letter.last_error.startswith("second failure: é")
    assert len(letter.last_error.encode()) <= 4096
    assert started <= letter.dead_lettered_ts.ToNanoseconds() <= time.time_ns()


async def test_dead_letter_true_dead_letters_at_once(
    broker: RabbitBroker, provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    wf = await provision(max_attempts=5)
    client = await clients(wf.url, max_attempts=5)
    await client.publish(wf.queue.queue_id, [event(b"poison")])
    async with await client.subscribe(wf.queue.queue_id, 1) as sub:
        delivery = await next_delivery(aiter(sub))
        await sub.nack(delivery, "cannot parse", dead_letter=True)
    letters, _ = await broker.dead_letters(wf.queue, 0, 10)
    assert [(x.event.payload, x.event.attempt, x.last_error) for x in letters] == [
        (b"poison", 1, "cannot parse")
    ]
    assert await ready(broker, wf.queue.queue_id) == 0


async def test_closing_without_ack_redelivers_with_attempt_2(
    provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    wf = await provision(max_attempts=3)
    client = await clients(wf.url)
    [event_id] = await client.publish(wf.queue.queue_id, [event(b"abandoned")])
    sub = await client.subscribe(wf.queue.queue_id, 1)
    assert (await next_delivery(aiter(sub))).event.attempt == 1
    await sub.close()
    async with await client.subscribe(wf.queue.queue_id, 1) as again:
        delivery = await next_delivery(aiter(again))
        assert (delivery.event.event_id, delivery.event.attempt) == (event_id, 2)
        await again.ack(delivery)


async def test_delivery_limit_dead_letters_after_repeated_consumer_deaths(
    broker: RabbitBroker, provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    wf = await provision(max_attempts=2)
    [event_id] = await broker.publish(wf.queue, [event(b"crashy", event_id="EV-crashy")])
    for attempt in (1, 2):
        # A consumer that dies without acking: its whole connection goes away.
        client = await AmqpQueueClient.connect(wf.url)
        try:
            sub = await client.subscribe(wf.queue.queue_id, 1)
            delivery = await next_delivery(aiter(sub))
            assert delivery.event.attempt == attempt
        finally:
            await client.close()
    dead = wire.dead_letter_queue(wf.queue.queue_id)

    async def dead_lettered() -> bool:
        return await ready(broker, dead) == 1

    await eventually(dead_lettered, WAIT, "RabbitMQ dead-letters at the delivery limit")
    assert await ready(broker, wf.queue.queue_id) == 0
    letters, _ = await broker.dead_letters(wf.queue, 0, 10)
    assert len(letters) == 1
    letter = letters[0]
    assert letter.event.event_id == event_id and letter.event.attempt == 2
    assert letter.last_error == delivery_limit_error(2)
    assert "delivery limit reached: 2 deliveries" in letter.last_error
    assert letter.HasField("dead_lettered_ts")


async def test_redrive_by_event_id_and_all(
    broker: RabbitBroker, provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    wf = await provision(max_attempts=2)
    client = await clients(wf.url, max_attempts=2)
    event_ids = await client.publish(
        wf.queue.queue_id, [event(f"e{i}".encode(), headers={"i": str(i)}) for i in range(4)]
    )
    async with await client.subscribe(wf.queue.queue_id, 4) as sub:
        it = aiter(sub)
        for _ in range(4):
            await sub.nack(await next_delivery(it), "bad", dead_letter=True)
    letters, _ = await broker.dead_letters(wf.queue, 0, 10)
    assert [x.event.event_id for x in letters] == event_ids

    assert await broker.redrive(wf.queue, [event_ids[2], "EV-unknown"]) == 1
    letters, _ = await broker.dead_letters(wf.queue, 0, 10)
    assert [x.event.event_id for x in letters] == [event_ids[0], event_ids[1], event_ids[3]]
    async with await client.subscribe(wf.queue.queue_id, 1) as sub:
        delivery = await next_delivery(aiter(sub))
        assert delivery.event.event_id == event_ids[2]
        assert delivery.event.attempt == 1  # fresh count
        assert dict(delivery.event.headers) == {"i": "2"}
        await sub.ack(delivery)

    assert await broker.redrive(wf.queue, []) == 3
    assert await broker.dead_letters(wf.queue, 0, 10) == ([], None)
    seen = []
    async with await client.subscribe(wf.queue.queue_id, 3) as sub:
        it = aiter(sub)
        for _ in range(3):
            delivery = await next_delivery(it)
            seen.append((delivery.event.event_id, delivery.event.attempt))
            await sub.ack(delivery)
    assert sorted(seen) == sorted((event_ids[i], 1) for i in (0, 1, 3))
    assert await broker.redrive(wf.queue, []) == 0

    # On the wire: a re-driven copy carries none of the dead-letter headers.
    [last_id] = await client.publish(wf.queue.queue_id, [event(b"e4", headers={"i": "4"})])
    async with await client.subscribe(wf.queue.queue_id, 1) as sub:
        await sub.nack(await next_delivery(aiter(sub)), "again", dead_letter=True)
    assert await broker.redrive(wf.queue, []) == 1
    channel = await broker.client.connection.channel()
    try:
        (raw,), _ = await channel.get(wf.queue.queue_id, 1)
        assert raw.message_id == last_id
        assert set(raw.headers) == {"i", wire.H_PUBLISHED_NS, wire.H_DELIVERY_COUNT}
        await channel.ack([raw.delivery_tag])
    finally:
        await channel.close()


async def test_dead_letters_pages_without_losing_them(
    broker: RabbitBroker, provision: Provision
) -> None:
    wf = await provision(max_attempts=1)
    event_ids = await broker.publish(wf.queue, [event(f"d{i}".encode()) for i in range(5)])
    for _ in range(5):
        delivery = await receive_one(broker, wf.queue)
        assert await broker.nack(wf.queue, delivery.ack_id, "max 1", False) is True
    pages = []
    after: int | None = 0
    while after is not None:
        letters, after = await broker.dead_letters(wf.queue, after, 2)
        pages.append([x.event.event_id for x in letters])
    assert pages == [event_ids[0:2], event_ids[2:4], event_ids[4:5]]
    assert (await counts(broker, wire.dead_letter_queue(wf.queue.queue_id)))[0] == 5
    assert await broker.dead_letters(wf.queue, 7, 2) == ([], None)


# --- RabbitBroker's unary leases and subscriptions ---


async def test_receive_ack_nack_and_unknown_ack_ids(
    broker: RabbitBroker, provision: Provision
) -> None:
    wf = await provision(max_attempts=3)
    queue = wf.queue
    event_ids = await broker.publish(queue, [event(f"r{i}".encode()) for i in range(3)])
    first = await broker.receive(queue, 2, 60, 0)
    assert [d.event.event_id for d in first] == event_ids[:2]
    assert all(d.event.attempt == 1 and d.HasField("lease_expires") for d in first)
    assert len({d.ack_id for d in first}) == 2
    rest = await broker.receive(queue, 5, 60, 0)
    assert [d.event.event_id for d in rest] == event_ids[2:]
    assert await broker.receive(queue, 5, 60, 0) == []

    assert await broker.ack(queue, [first[0].ack_id]) == []
    assert await broker.ack(queue, [first[0].ack_id, "nope"]) == [first[0].ack_id, "nope"]
    assert await broker.nack(queue, first[1].ack_id, "later", False) is False
    with pytest.raises(UnknownAckId):
        await broker.nack(queue, first[1].ack_id, "again", False)
    with pytest.raises(UnknownAckId):
        await broker.nack(queue, "unknown", "x", False)
    again = await receive_one(broker, queue)
    assert (again.event.event_id, again.event.attempt) == (event_ids[1], 2)
    assert await broker.nack(queue, again.ack_id, "fatal", True) is True
    # An ack id only works on its own queue.
    other = await provision()
    assert await broker.ack(other.queue, [rest[0].ack_id]) == [rest[0].ack_id]
    assert await broker.ack(queue, [rest[0].ack_id]) == []
    assert await ready(broker, queue.queue_id) == 0
    letters, _ = await broker.dead_letters(queue, 0, 10)
    assert [(x.event.event_id, x.last_error, x.event.attempt) for x in letters] == [
        (event_ids[1], "fatal", 2)
    ]


async def test_receive_dead_letters_at_max_attempts(
    broker: RabbitBroker, provision: Provision
) -> None:
    wf = await provision(max_attempts=2)
    await broker.publish(wf.queue, [event(b"x")])
    assert await broker.nack(
        wf.queue, (await receive_one(broker, wf.queue)).ack_id, "1", False
    ) is (False)
    last = await receive_one(broker, wf.queue)
    assert last.event.attempt == 2
    assert await broker.nack(wf.queue, last.ack_id, "2", False) is True
    letters, _ = await broker.dead_letters(wf.queue, 0, 10)
    assert [(x.last_error, x.event.attempt) for x in letters] == [("2", 2)]


async def test_receive_lease_expiry_requeues(broker: RabbitBroker, provision: Provision) -> None:
    wf = await provision(max_attempts=3)
    [event_id] = await broker.publish(wf.queue, [event(b"slow")])
    leased = await broker.receive(wf.queue, 1, 1, 0)
    assert len(leased) == 1
    expires = leased[0].lease_expires.ToNanoseconds()
    assert time.time_ns() < expires <= time.time_ns() + 1_100_000_000
    # Waits (without polling) until the expired lease puts the event back.
    again = await receive_one(broker, wf.queue)
    assert (again.event.event_id, again.event.attempt) == (event_id, 2)
    assert await broker.ack(wf.queue, [leased[0].ack_id]) == [leased[0].ack_id]
    with pytest.raises(UnknownAckId):
        await broker.nack(wf.queue, leased[0].ack_id, "late", False)
    assert await broker.ack(wf.queue, [again.ack_id]) == []
    assert await ready(broker, wf.queue.queue_id) == 0


async def test_receive_waits_for_the_first_event(
    broker: RabbitBroker, provision: Provision, clients: Callable[..., Awaitable[AmqpQueueClient]]
) -> None:
    wf = await provision(max_attempts=1)
    queue = wf.queue
    assert await broker.receive(queue, 3, 60, 0.3) == []
    assert broker.waiting_receives(queue.queue_id) == 0

    async def receive_waiting() -> bool:
        return broker.waiting_receives(queue.queue_id) == 1

    # Woken by a publish through the broker.
    waiting = asyncio.create_task(broker.receive(queue, 3, 60, WAIT))
    await eventually(receive_waiting, WAIT, "receive waits")
    event_ids = await broker.publish(queue, [event(b"a"), event(b"b")])
    got = await asyncio.wait_for(waiting, WAIT)
    assert [(d.event.event_id, d.event.attempt) for d in got] == [(e, 1) for e in event_ids]

    # Finds an event published straight to RabbitMQ (polling).
    waiting = asyncio.create_task(broker.receive(queue, 3, 60, WAIT))
    await eventually(receive_waiting, WAIT, "receive waits")
    client = await clients(wf.url)
    [direct] = await client.publish(queue.queue_id, [event(b"c")])
    [delivery] = await asyncio.wait_for(waiting, WAIT)
    assert (delivery.event.event_id, delivery.event.attempt) == (direct, 1)
    got.append(delivery)
    assert broker.waiting_receives(queue.queue_id) == 0

    # Waiting left no trace: every event was delivered once, none was dead-lettered (max 1).
    assert await broker.ack(queue, [d.ack_id for d in got]) == []
    assert await ready(broker, queue.queue_id) == 0
    assert await ready(broker, wire.dead_letter_queue(queue.queue_id)) == 0


async def test_subscription_lease_requeues_and_ignores_late_acks(
    broker: RabbitBroker, provision: Provision
) -> None:
    wf = await provision(max_attempts=3)
    [event_id] = await broker.publish(wf.queue, [event(b"stuck")])
    sub = await broker.subscribe(wf.queue, 1, 1)
    try:
        it = aiter(sub)
        first = await next_delivery(it)
        assert first.HasField("lease_expires")
        second = await next_delivery(it)  # redelivered after the lease, to the same subscriber
        assert (second.event.event_id, second.event.attempt) == (event_id, 2)
        await sub.ack(first)  # ignored: no longer out
        await sub.nack(first, "late", dead_letter=True)  # ignored too
        await sub.ack(second)
    finally:
        await sub.close()
    assert await ready(broker, wf.queue.queue_id) == 0
    assert await broker.dead_letters(wf.queue, 0, 10) == ([], None)


async def test_prefetch_bounds_unacked_deliveries(
    broker: RabbitBroker, provision: Provision
) -> None:
    wf = await provision()
    await broker.publish(wf.queue, [event(f"p{i}".encode()) for i in range(10)])
    sub = await broker.subscribe(wf.queue, 3, 0)
    assert isinstance(sub, AmqpSubscription)
    try:
        it = aiter(sub)
        got = [await next_delivery(it) for _ in range(3)]
        # Three are out; RabbitMQ holds back the rest.
        assert await counts(broker, wf.queue.queue_id) == (7, 1)
        assert sub.held == 3
        await sub.ack(got[0])
        fourth = await next_delivery(it)
        assert fourth.event.payload == b"p3"
        assert await counts(broker, wf.queue.queue_id) == (6, 1)
    finally:
        await sub.close()

    async def all_back() -> bool:
        return await ready(broker, wf.queue.queue_id) == 9

    await eventually(all_back, WAIT, "closing hands the unacked deliveries back")


# --- stats ---


async def test_stats(broker: RabbitBroker, provision: Provision) -> None:
    wf = await provision(max_attempts=1)
    queue = wf.queue
    await broker.publish(queue, [event(f"s{i}".encode()) for i in range(5)])
    done, failed = await broker.receive(queue, 2, 60, 0)
    assert await broker.ack(queue, [done.ack_id]) == []
    assert await broker.nack(queue, failed.ack_id, "nack", False) is True  # copy + ack
    # One more dies by RabbitMQ's delivery limit: its consumer goes away.
    sub = await broker.subscribe(queue, 1, 0)
    await next_delivery(aiter(sub))
    await sub.close()
    held = await broker.receive(queue, 1, 60, 0)  # one in flight, one ready
    assert len(held) == 1
    dead = wire.dead_letter_queue(queue.queue_id)

    async def both_dead() -> bool:
        return await ready(broker, dead) == 2

    await eventually(both_dead, WAIT, "the delivery limit dead-letters")
    expected = queue_pb2.QueueStats(
        queue_id=queue.queue_id, ready=1, in_flight=1, acked=1, dead_lettered=2, published=5
    )
    last = queue_pb2.QueueStats()

    async def settled() -> bool:
        nonlocal last
        last = await broker.stats(queue)
        return last == expected

    await eventually(settled, STATS_WAIT, f"stats {expected} (last: {last})")
    # Re-driven events count as published again; acked ones are not double counted.
    assert await broker.redrive(queue, []) == 2
    assert await broker.ack(queue, [held[0].ack_id]) == []
    for delivery in await broker.receive(queue, 5, 60, 0):
        assert await broker.ack(queue, [delivery.ack_id]) == []
    expected = queue_pb2.QueueStats(
        queue_id=queue.queue_id, ready=0, in_flight=0, acked=5, dead_lettered=0, published=7
    )
    await eventually(settled, STATS_WAIT, f"stats {expected} (last: {last})")
