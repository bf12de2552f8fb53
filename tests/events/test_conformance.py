"""The event-queue conformance suite: every test runs against the embedded broker and RabbitMQ,
through a real WMS (and, for RabbitMQ, a real broker)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from ewms.v1 import event_service_pb2, queue_pb2, workflow_service_pb2
from services.errors import field_violations
from services.events.amqp import AmqpQueueClient
from services.events.client import EventTooLarge, QueueAccessDenied, QueueNotFound, Subscription
from services.wms.queues.rabbitmq_admin import RabbitAdmin
from tests.conftest import RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL
from tests.events.conftest import (
    MAX_ATTEMPTS,
    MAX_EVENT_BYTES,
    QueueEnv,
    amqp_url,
    close_env,
    open_env,
    subscriber_env,
)

STATS_TIMEOUT = 30.0  # RabbitMQ's management counters refresh every ~5 s


def make_events(n: int, size: int = 1024, start: int = 0) -> list[queue_pb2.Event]:
    """``n`` events with distinct payloads of ``size`` bytes and an index header."""
    events = []
    for i in range(start, start + n):
        head = f"event-{i}:".encode()
        events.append(
            queue_pb2.Event(
                payload=head + b"x" * max(0, size - len(head)),
                content_type="text/plain",
                headers={"index": str(i)},
            )
        )
    return events


async def take(sub: Subscription, n: int, within: float = 30.0) -> list[queue_pb2.Delivery]:
    """The next ``n`` deliveries of a subscription."""
    got: list[queue_pb2.Delivery] = []

    async def run() -> None:
        async for delivery in sub:
            got.append(delivery)
            if len(got) == n:
                return

    await asyncio.wait_for(run(), within)
    return got


async def stats_until(env: QueueEnv, queue_id: str, **expected: int) -> queue_pb2.QueueStats:
    """The queue's stats once they show ``expected`` (polled: RabbitMQ's lag)."""
    deadline = time.monotonic() + STATS_TIMEOUT
    while True:
        stats: queue_pb2.QueueStats = await env.events.GetQueueStats(
            event_service_pb2.GetQueueStatsRequest(queue_id=queue_id), metadata=env.alice
        )
        actual = {name: getattr(stats, name) for name in expected}
        if actual == expected:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"stats of {queue_id}: expected {expected}, got {actual}")
        await asyncio.sleep(0.5)


async def receive(
    env: QueueEnv, queue_id: str, max_events: int, *, lease: int = 60, wait: int = 5
) -> list[queue_pb2.Delivery]:
    resp = await env.events.Receive(
        event_service_pb2.ReceiveRequest(
            queue_id=queue_id, max_events=max_events, lease_seconds=lease, wait_seconds=wait
        ),
        metadata=env.alice,
    )
    return list(resp.deliveries)


async def receive_all(env: QueueEnv, queue_id: str, n: int) -> list[queue_pb2.Delivery]:
    """Receive until ``n`` deliveries arrived (or fail after a while)."""
    got: list[queue_pb2.Delivery] = []
    deadline = time.monotonic() + 30
    while len(got) < n and time.monotonic() < deadline:
        got += await receive(env, queue_id, min(100, n - len(got)), wait=2)
    return got


# --- delivery ---------------------------------------------------------------------------------


async def test_every_event_is_delivered_once_across_two_subscribers(client_env: QueueEnv) -> None:
    env = client_env
    client = await env.queue_client()
    queue_id = env.queue("in").queue_id
    events = make_events(400)
    event_ids = await client.publish(queue_id, events)
    assert len(set(event_ids)) == 400

    received: list[queue_pb2.Delivery] = []
    done = asyncio.Event()

    async def consume(prefetch: int) -> None:
        async with await client.subscribe(queue_id, prefetch) as sub:
            async for delivery in sub:
                received.append(delivery)
                await sub.ack(delivery)
                if len(received) >= 400:
                    done.set()

    consumers = [asyncio.create_task(consume(p)) for p in (7, 50)]
    await asyncio.wait_for(done.wait(), 60)
    await asyncio.sleep(0.5)  # anything extra (a duplicate) would show up now
    # The subscriptions stay open until the counters show the acks: RabbitMQ drops what a
    # channel counted since the management plugin last collected (every 5 s) when it closes.
    await stats_until(env, queue_id, published=400, acked=400, ready=0, in_flight=0)
    for task in consumers:
        task.cancel()
    await asyncio.gather(*consumers, return_exceptions=True)
    ids = [d.event.event_id for d in received]
    assert sorted(ids) == sorted(event_ids)
    assert all(d.event.attempt == 1 for d in received)
    by_id = {d.event.event_id: d.event for d in received}
    for event_id, sent in zip(event_ids, events, strict=True):
        got = by_id[event_id]
        assert (got.payload, got.content_type, dict(got.headers)) == (
            sent.payload,
            sent.content_type,
            dict(sent.headers),
        )
        assert got.queue_id == queue_id
        assert got.published_ts.seconds > 0


async def test_publisher_chosen_event_ids_and_provenance_are_kept(env: QueueEnv) -> None:
    client = env.client()
    queue_id = env.queue("out").queue_id
    event = queue_pb2.Event(
        event_id="my-id-1",
        payload=b"{}",
        content_type="application/json",
        provenance=queue_pb2.EventProvenance(
            taskforce_uuid="TF-x", worker_id="w1", input_event_id="EV-in"
        ),
    )
    assert await client.publish(queue_id, [event]) == ["my-id-1"]
    [delivery] = await receive(env, queue_id, 1)
    assert delivery.event.event_id == "my-id-1"
    assert delivery.event.provenance == event.provenance


async def test_prefetch_bounds_unacked_deliveries(client_env: QueueEnv) -> None:
    env = client_env
    client = await env.queue_client()
    queue_id = env.queue("in").queue_id
    await client.publish(queue_id, make_events(10))
    sub = await client.subscribe(queue_id, 3)
    held = await take(sub, 3)
    # Whatever the subscriber was not given is still there for another consumer: exactly 7.
    others = await receive_all(env, queue_id, 7)
    assert len(others) == 7
    assert await receive(env, queue_id, 10, wait=1) == []
    # Acking one frees one credit: the subscriber gets exactly one more once one is ready.
    await client.publish(queue_id, make_events(2, start=10))
    await sub.ack(held[0])
    [more] = await take(sub, 1)
    assert more.event.headers["index"] in ("10", "11")
    leftover = await receive_all(env, queue_id, 1)
    assert len(leftover) == 1
    await sub.close()


async def test_a_raised_prefetch_delivers_more_at_once(client_env: QueueEnv) -> None:
    env = client_env
    client = await env.queue_client()
    queue_id = env.queue("in").queue_id
    await client.publish(queue_id, make_events(10))
    sub = await client.subscribe(queue_id, 2)
    held = await take(sub, 2)
    # Raised to 5 with nothing acked: three more come at once.
    await sub.set_prefetch(5)
    held += await take(sub, 3)
    assert sub.prefetch == 5
    assert len({d.event.headers["index"] for d in held}) == 5
    others = await receive(env, queue_id, 10, wait=2)
    if env.backend == "embedded":
        assert len(others) == 5  # exactly the new limit
    else:
        # RabbitMQ cannot change a live consumer's limit: a new consumer with the new one
        # replaced it, so while the old deliveries are held the subscriber may hold both limits.
        assert 3 <= len(others) <= 5
    await sub.close()


async def test_a_lowered_prefetch_takes_nothing_back_and_holds_back_new_ones(
    client_env: QueueEnv,
) -> None:
    env = client_env
    client = await env.queue_client()
    queue_id = env.queue("in").queue_id
    await client.publish(queue_id, make_events(10))
    sub = await client.subscribe(queue_id, 4)
    held = await take(sub, 4)
    await sub.set_prefetch(1)
    assert sub.prefetch == 1
    # Nothing held is taken back; once all of it is acked, exactly one more comes (on RabbitMQ
    # the new consumer may send it before the acks: the same count either way).
    await sub.ack(*held)
    [more] = await take(sub, 1)
    assert more.event.headers["index"] not in {d.event.headers["index"] for d in held}
    others = await receive_all(env, queue_id, 5)
    assert len(others) == 5
    assert await receive(env, queue_id, 10, wait=1) == []
    await sub.close()


async def test_a_paused_subscription_gets_nothing_new_and_its_nacks_go_elsewhere(
    client_env: QueueEnv,
) -> None:
    env = client_env
    client = await env.queue_client()
    queue_id = env.queue("in").queue_id
    await client.publish(queue_id, make_events(6))
    sub = await client.subscribe(queue_id, 2)
    held = await take(sub, 2)
    await sub.pause()
    # Settling what it holds works, and frees no credit for it: the nacked event and the other
    # four stay in the queue for other consumers.
    await sub.ack(held[0])
    await sub.nack(held[1], "draining")
    others = await receive_all(env, queue_id, 5)
    assert len(others) == 5
    assert held[1].event.event_id in {d.event.event_id for d in others}
    assert await receive(env, queue_id, 10, wait=1) == []
    await sub.close()


async def test_subscriber_killed_with_sigkill_gets_its_events_redelivered(
    client_env: QueueEnv, tmp_path: Path
) -> None:
    env = client_env
    client = await env.queue_client()
    queue_id = env.queue("in").queue_id
    event_ids = await client.publish(queue_id, make_events(5))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.events.hold_subscriber",
        env.kind,
        amqp_url(env.queue("in")) if env.kind.startswith("amqp") else env.wms.address,
        env.alice_token,
        queue_id,
        "5",
        stdout=asyncio.subprocess.PIPE,
        env=subscriber_env(),
    )
    assert proc.stdout is not None
    seen = []
    try:
        for _ in range(5):
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            seen.append(json.loads(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert sorted(s["event_id"] for s in seen) == sorted(event_ids)
    assert {s["attempt"] for s in seen} == {1}

    started = time.monotonic()
    async with await client.subscribe(queue_id, 10) as sub:
        again = await take(sub, 5, within=30)
        await sub.ack(*again)
    assert sorted(d.event.event_id for d in again) == sorted(event_ids)
    assert {d.event.attempt for d in again} == {2}
    # "Promptly": far below RabbitMQ's default consumer timeout (30 min).
    assert time.monotonic() - started < 30


async def test_closing_a_subscription_requeues_its_unacked_deliveries(client_env: QueueEnv) -> None:
    env = client_env
    client = await env.queue_client()
    queue_id = env.queue("in").queue_id
    await client.publish(queue_id, make_events(3))
    sub = await client.subscribe(queue_id, 3)
    first = await take(sub, 3)
    await sub.ack(first[0])
    await sub.close()
    again = await receive_all(env, queue_id, 2)
    assert sorted(d.event.event_id for d in again) == sorted(d.event.event_id for d in first[1:])
    assert {d.event.attempt for d in again} == {2}


# --- failures, dead letters, re-drive ---------------------------------------------------------


async def test_nack_requeues_then_dead_letters_at_max_attempts_with_the_error(
    client_env: QueueEnv,
) -> None:
    env = client_env
    client = await env.queue_client()
    queue_id = env.queue("in").queue_id
    assert env.queue("in").max_attempts == MAX_ATTEMPTS
    [event_id] = await client.publish(queue_id, make_events(1))
    attempts = []
    async with await client.subscribe(queue_id, 1) as sub:
        for n in range(1, MAX_ATTEMPTS + 1):
            [delivery] = await take(sub, 1)
            attempts.append(delivery.event.attempt)
            await sub.nack(delivery, f"Traceback ...\nValueError: boom {n}")
        await stats_until(env, queue_id, dead_lettered=1, ready=0, in_flight=0)
    assert attempts == list(range(1, MAX_ATTEMPTS + 1))
    letters = await env.events.ListDeadLetters(
        event_service_pb2.ListDeadLettersRequest(queue_id=queue_id), metadata=env.alice
    )
    [letter] = letters.dead_letters
    assert letter.event.event_id == event_id
    assert letter.last_error == f"Traceback ...\nValueError: boom {MAX_ATTEMPTS}"
    assert letter.event.attempt == MAX_ATTEMPTS
    assert letter.dead_lettered_ts.seconds > 0


async def test_nack_with_dead_letter_parks_the_event_at_once(env: QueueEnv) -> None:
    queue_id = env.queue("in").queue_id
    await env.client().publish(queue_id, make_events(2))
    first, second = await receive_all(env, queue_id, 2)
    dead = await env.events.Nack(
        event_service_pb2.NackRequest(
            queue_id=queue_id, ack_id=first.ack_id, error="bad input", dead_letter=True
        ),
        metadata=env.alice,
    )
    assert dead.dead_lettered
    requeued = await env.events.Nack(
        event_service_pb2.NackRequest(queue_id=queue_id, ack_id=second.ack_id, error="flaky"),
        metadata=env.alice,
    )
    assert not requeued.dead_lettered
    [again] = await receive_all(env, queue_id, 1)
    assert again.event.event_id == second.event.event_id
    assert again.event.attempt == 2
    letters = await env.events.ListDeadLetters(
        event_service_pb2.ListDeadLettersRequest(queue_id=queue_id), metadata=env.alice
    )
    assert [(x.event.event_id, x.last_error, x.event.attempt) for x in letters.dead_letters] == [
        (first.event.event_id, "bad input", 1)
    ]


async def test_dead_letters_page_and_redrive_all_or_some(env: QueueEnv) -> None:
    queue_id = env.queue("in").queue_id
    event_ids = await env.client().publish(queue_id, make_events(5))
    for delivery in await receive_all(env, queue_id, 5):
        await env.events.Nack(
            event_service_pb2.NackRequest(
                queue_id=queue_id, ack_id=delivery.ack_id, error="e", dead_letter=True
            ),
            metadata=env.alice,
        )
    await stats_until(env, queue_id, dead_lettered=5, ready=0)
    listed: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await env.events.ListDeadLetters(
            event_service_pb2.ListDeadLettersRequest(
                queue_id=queue_id, page_size=2, page_token=token
            ),
            metadata=env.alice,
        )
        pages += 1
        listed += [x.event.event_id for x in page.dead_letters]
        token = page.next_page_token
        if not token:
            break
    assert sorted(listed) == sorted(event_ids)
    assert pages == 3

    one = await env.events.RedriveDeadLetters(
        event_service_pb2.RedriveDeadLettersRequest(queue_id=queue_id, event_ids=[event_ids[2]]),
        metadata=env.alice,
    )
    assert one.n_redriven == 1
    [back] = await receive_all(env, queue_id, 1)
    assert (back.event.event_id, back.event.attempt) == (event_ids[2], 1)
    await env.events.Ack(
        event_service_pb2.AckRequest(queue_id=queue_id, ack_ids=[back.ack_id]), metadata=env.alice
    )
    rest = await env.events.RedriveDeadLetters(
        event_service_pb2.RedriveDeadLettersRequest(queue_id=queue_id), metadata=env.alice
    )
    assert rest.n_redriven == 4
    again = await receive_all(env, queue_id, 4)
    assert sorted(d.event.event_id for d in again) == sorted(set(event_ids) - {event_ids[2]})
    await stats_until(env, queue_id, dead_lettered=0, ready=0, in_flight=4)


async def test_receive_lease_expiry_redelivers_and_late_ack_is_reported(env: QueueEnv) -> None:
    queue_id = env.queue("in").queue_id
    await env.client().publish(queue_id, make_events(1))
    [first] = await receive(env, queue_id, 1, lease=1)
    assert first.lease_expires.seconds > 0
    [second] = await receive(env, queue_id, 1, lease=60, wait=10)
    assert second.event.event_id == first.event.event_id
    assert second.event.attempt == 2
    late = await env.events.Ack(
        event_service_pb2.AckRequest(queue_id=queue_id, ack_ids=[first.ack_id, second.ack_id]),
        metadata=env.alice,
    )
    assert list(late.expired_ack_ids) == [first.ack_id]
    await stats_until(env, queue_id, acked=1, ready=0, in_flight=0)


async def test_nack_of_an_ack_id_not_out_is_failed_precondition(env: QueueEnv) -> None:
    queue_id = env.queue("in").queue_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.events.Nack(
            event_service_pb2.NackRequest(queue_id=queue_id, ack_id="nope", error="x"),
            metadata=env.alice,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# --- limits and rules ---------------------------------------------------------------------------


async def test_event_over_the_size_limit_is_rejected_with_the_field(env: QueueEnv) -> None:
    queue_id = env.queue("in").queue_id
    fits = queue_pb2.Event(payload=b"a" * MAX_EVENT_BYTES)
    too_big = queue_pb2.Event(payload=b"a" * (MAX_EVENT_BYTES + 1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.events.Publish(
            event_service_pb2.PublishRequest(queue_id=queue_id, events=[fits, too_big]),
            metadata=env.alice,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, description)] = field_violations(err.value)
    assert field == "events[1].payload"
    assert str(MAX_EVENT_BYTES) in description
    with pytest.raises(EventTooLarge):
        await env.client().publish(queue_id, [too_big])
    # Nothing of the rejected batch was stored; the event at the limit goes through alone.
    await stats_until(env, queue_id, published=0, ready=0)
    await env.client().publish(queue_id, [fits])
    [delivery] = await receive(env, queue_id, 1)
    assert len(delivery.event.payload) == MAX_EVENT_BYTES


async def test_reserved_headers_and_empty_batches_are_rejected(env: QueueEnv) -> None:
    queue_id = env.queue("in").queue_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.events.Publish(
            event_service_pb2.PublishRequest(
                queue_id=queue_id,
                events=[queue_pb2.Event(payload=b"x", headers={"x-delivery-count": "9"})],
            ),
            metadata=env.alice,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["events[0].headers['x-delivery-count']"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.events.Publish(
            event_service_pb2.PublishRequest(queue_id=queue_id), metadata=env.alice
        )
    assert [f for f, _ in field_violations(err.value)] == ["events"]


async def test_deactivated_workflow_takes_no_events_but_can_be_drained(env: QueueEnv) -> None:
    queue_id = env.queue("out").queue_id
    await env.client().publish(queue_id, make_events(1))
    await env.workflows.FinishWorkflow(
        workflow_service_pb2.FinishWorkflowRequest(workflow_id=env.workflow.workflow.workflow_id),
        metadata=env.alice,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.events.Publish(
            event_service_pb2.PublishRequest(queue_id=queue_id, events=make_events(1)),
            metadata=env.alice,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "deactivated" in (err.value.details() or "")
    [delivery] = await receive(env, queue_id, 1)
    assert delivery.event.headers["index"] == "0"


async def test_unknown_queue_is_not_found(env: QueueEnv) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.events.GetQueueStats(
            event_service_pb2.GetQueueStatsRequest(queue_id="Q-nope-00000000-00000000"),
            metadata=env.alice,
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(QueueNotFound):
        await env.client().publish("Q-nope-00000000-00000000", make_events(1))


# Other users' and other taskforces' access: tests/reliability/test_security.py.


# --- durability and retention ------------------------------------------------------------------


async def test_wms_restart_loses_no_embedded_event(tmp_path: Path) -> None:
    data_dir = tmp_path / "wms-data"
    env = await open_env("embedded", data_dir)
    queue_id = env.queue("in").queue_id
    try:
        client = env.client()
        event_ids = await client.publish(queue_id, make_events(1000))
        sub = await client.subscribe(queue_id, 150)
        got = await take(sub, 150)
        await sub.ack(*got[:100])
        await sub.nack(got[100], "broken", dead_letter=True)
        await asyncio.sleep(0.2)  # let the stream's acks reach the WMS
        # The acks and the nack freed 101 credits: 150 deliveries are out again.
        await stats_until(env, queue_id, acked=100, dead_lettered=1, in_flight=150)
    finally:
        # The 150 out were never acked: a restart must hand them out again.
        await close_env(env)
    acked = {d.event.event_id for d in got[:100]}
    dead = got[100].event.event_id

    env = await open_env("embedded", data_dir)
    env.workflow = workflow_service_pb2.CreateWorkflowResponse(
        queues=[queue_pb2.Queue(queue_id=queue_id, alias="in")]
    )
    try:
        stats = await stats_until(env, queue_id, ready=899, acked=100, dead_lettered=1)
        assert stats.published == 1000
        remaining = await receive_all(env, queue_id, 899)
        ids = [d.event.event_id for d in remaining]
        assert len(ids) == len(set(ids)) == 899
        assert set(ids) == set(event_ids) - acked - {dead}
        # The 150 held when the subscriber went away count one attempt; the rest were never out.
        assert Counter(d.event.attempt for d in remaining) == {1: 749, 2: 150}
    finally:
        await close_env(env)


async def test_queues_are_deleted_a_retention_period_after_the_workflow_ended(
    backend: str, tmp_path: Path
) -> None:
    env = await open_env(backend, tmp_path / "wms-data", queue_retention_seconds=1)
    try:
        queue_id = env.queue("in").queue_id
        await env.client().publish(queue_id, make_events(3))
        workflow_id = env.workflow.workflow.workflow_id
        await env.workflows.AbortWorkflow(
            workflow_service_pb2.AbortWorkflowRequest(workflow_id=workflow_id), metadata=env.alice
        )
        deadline = time.monotonic() + 30
        while True:
            listed = await env.workflows.ListQueues(
                workflow_service_pb2.ListQueuesRequest(workflow_id=workflow_id), metadata=env.alice
            )
            if all(q.HasField("deleted_ts") for q in listed.queues):
                break
            assert time.monotonic() < deadline, "queues not deleted after the retention period"
            await asyncio.sleep(0.2)
        assert not any(q.HasField("credentials") for q in listed.queues)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.events.GetQueueStats(
                event_service_pb2.GetQueueStatsRequest(queue_id=queue_id), metadata=env.alice
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        if backend == "rabbitmq":
            admin = RabbitAdmin.for_amqp_url(RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL)
            assert await admin.user(f"ewms-{workflow_id}") is None
            assert await admin.queue(queue_id) is None
            assert await admin.queue(f"{queue_id}.dead") is None
        if backend == "embedded":
            rows = await env.wms.store.run(
                lambda tx: tx.sql.execute(
                    "SELECT count(*) FROM events WHERE queue_id = ?", (queue_id,)
                ).fetchone()[0],
                write=False,
            )
            assert rows == 0
    finally:
        await close_env(env, delete_queues=False)


async def test_workflow_broker_credentials_reach_only_that_workflows_queues(env: QueueEnv) -> None:
    bobs = await env.create_workflow(env.bob_token)
    if env.backend == "embedded":
        # No broker credentials exist: the WMS token (checked above) is the only key.
        assert not any(q.HasField("credentials") for q in [*env.workflow.queues, *bobs.queues])
        return
    alice_queue, bob_queue = env.queue("in"), next(q for q in bobs.queues if q.alias == "in")
    assert alice_queue.credentials.username != bob_queue.credentials.username
    client = await AmqpQueueClient.connect(amqp_url(alice_queue), max_attempts=MAX_ATTEMPTS)
    try:
        [event_id] = await client.publish(alice_queue.queue_id, make_events(1))
        async with await client.subscribe(alice_queue.queue_id, 1) as sub:
            [delivery] = await take(sub, 1)
            assert delivery.event.event_id == event_id
            await sub.ack(delivery)
        with pytest.raises(QueueAccessDenied, match="ACCESS_REFUSED"):
            await client.publish(bob_queue.queue_id, make_events(1))
        with pytest.raises(QueueAccessDenied):
            sub = await client.subscribe(bob_queue.queue_id, 1)
            await take(sub, 1, within=5)
    finally:
        await client.close()
    # close_env deletes every workflow's RabbitMQ queues and users, bob's too.
