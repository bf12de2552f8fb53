"""Monitoring events on a topic exchange, as hyperflow-amqp-executor publishes them
(``services.pilot.hyperflow``), and ``ewms pilot metrics``, its metric collector, against a real
RabbitMQ. Each test uses its own exchange, deleted afterwards."""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from services.events.amqp import AmqpConnection
from services.events.client import QueueAccessDenied, QueueError, QueueNotFound
from services.pilot.hyperflow import (
    EventsExchange,
    EventsSubscription,
    ReceivedEvent,
    routing_key,
)
from services.wms.queues.rabbitmq_admin import RabbitAdmin
from tests.conftest import RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL, ROOT, require_rabbitmq

WAIT = 15.0  # seconds to wait for something that should happen at once
EXECUTOR = "0b7c3f5e-9d7a-4c1e-8a53-6f2b9c1d4e70"

Subscribe = Callable[..., Awaitable[EventsSubscription]]
Publisher = Callable[..., Awaitable[EventsExchange]]


def job_sequence(emit: Callable[..., None], job: str, *, slot: int = 2) -> None:
    """The events of one task, emitted as the pilot emits them."""
    emit("job.started", job, thread=slot, event_id=job, queue="Q-1", attempt=1)
    emit("job.stage_in.started", job)
    emit("job.stage_in.finished", job, bytes=120, time=0.01)
    emit("job.execution.started", job)
    emit("job.execution.finished", job, executable="/bin/true", exit_status=0, time=0.5)
    emit("job.stage_out.started", job)
    emit("job.stage_out.finished", job, bytes=64, time=0.02)
    emit(
        "job.finished",
        job,
        executable="/bin/true",
        exit_status=0,
        thread=slot,
        metrics=metrics_of(job, slot),
        error=None,
    )


def metrics_of(job: str, slot: int = 2, **overrides: Any) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "executor": EXECUTOR,
        "thread": slot,
        "timestamps": {"job.started": 1.0, "stage_in.started": 1.1},
        "stage_in": 0.01,
        "execution": 0.5,
        "stage_out": 0.02,
        "input_size": 120,
        "output_size": 64,
        "cpu_user": 0.25,
        "cpu_system": 0.125,
        "max_rss_bytes": 4096,
    }
    metrics.update(overrides)
    return {k: v for k, v in metrics.items() if v is not None}


async def receive(subscription: EventsSubscription, n: int) -> list[ReceivedEvent]:
    """The next ``n`` events; fails if they do not all arrive within WAIT."""
    got: list[ReceivedEvent] = []

    async def take() -> None:
        async for event in subscription:
            got.append(event)
            if len(got) == n:
                return

    try:
        await asyncio.wait_for(take(), WAIT)
    except TimeoutError:
        pytest.fail(f"{len(got)} of {n} events within {WAIT} s: {[e.routing_key for e in got]}")
    return got


async def receive_until(subscription: EventsSubscription, key: str) -> list[ReceivedEvent]:
    """Events up to and including the first one routed with ``key``."""
    got: list[ReceivedEvent] = []

    async def take() -> None:
        async for event in subscription:
            got.append(event)
            if event.routing_key == key:
                return

    try:
        await asyncio.wait_for(take(), WAIT)
    except TimeoutError:
        pytest.fail(f"no {key} within {WAIT} s; got {[e.routing_key for e in got]}")
    return got


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds; fail after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT} s: {what}")
        await asyncio.sleep(0.05)


def fields(event: ReceivedEvent) -> dict[str, Any]:
    body = event.fields()
    assert body is not None, event.body
    return body


def url_with(username: str, password: str) -> str:
    """The test broker's AMQP URL with other credentials."""
    parts = urllib.parse.urlsplit(RABBITMQ_URL)
    netloc = f"{username}:{password}@{parts.hostname}:{parts.port or 5672}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class CuttableLink:
    """A TCP relay to the test broker whose connections the test cuts, as a network failure
    would; while ``refusing``, new connections are closed at once (the broker is unreachable)."""

    def __init__(self) -> None:
        target = urllib.parse.urlsplit(RABBITMQ_URL)
        self._target = (target.hostname or "127.0.0.1", target.port or 5672)
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.refusing = False
        self.refused = 0
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """RABBITMQ_URL through the link."""
        parts = urllib.parse.urlsplit(RABBITMQ_URL)
        netloc = f"{parts.username}:{parts.password}@127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def cut(self) -> None:
        """Drop every relayed connection (both sides see a reset)."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        if self.refusing:
            self.refused += 1
            client_out.transport.abort()
            return
        try:
            broker_in, broker_out = await asyncio.open_connection(*self._target)
        except OSError:
            client_out.transport.abort()
            return
        self._writers.update((client_out, broker_out))
        await asyncio.gather(self._pump(client_in, broker_out), self._pump(broker_in, client_out))

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()


@pytest.fixture
async def exchange() -> AsyncIterator[str]:
    """A new durable topic exchange, deleted after the test."""
    require_rabbitmq()
    name = f"ewms-test-events-{secrets.token_hex(4)}"
    connection = await AmqpConnection.open(RABBITMQ_URL, name="ewms-test-events-setup")
    try:
        channel = await connection.channel()
        await channel.declare_exchange(name, "topic")
        yield name
        await channel.delete_exchange(name)
    finally:
        await connection.close()


@pytest.fixture
async def subscribe(exchange: str) -> AsyncIterator[Subscribe]:
    """``await subscribe("job.#", ...)``: subscriptions to the test exchange, closed after."""
    opened: list[EventsSubscription] = []

    async def open_(*keys: str) -> EventsSubscription:
        subscription = await EventsSubscription.open(RABBITMQ_URL, exchange, keys)
        opened.append(subscription)
        return subscription

    try:
        yield open_
    finally:
        for subscription in opened:
            await subscription.close()


@pytest.fixture
async def publisher(exchange: str) -> AsyncIterator[Publisher]:
    """``await publisher(url=..., **kwargs)``: EventsExchanges on the test exchange (through
    RABBITMQ_URL unless told), closed after."""
    opened: list[EventsExchange] = []

    async def open_(**kwargs: Any) -> EventsExchange:
        kwargs.setdefault("hostname", "worker-1.example.org")
        url = kwargs.pop("url", RABBITMQ_URL)
        events = await EventsExchange.open(url, exchange, executor_id=EXECUTOR, **kwargs)
        opened.append(events)
        return events

    try:
        yield open_
    finally:
        for events in opened:
            await events.close()


@pytest.fixture
async def link() -> AsyncIterator[CuttableLink]:
    """A cuttable TCP link to the test broker."""
    require_rabbitmq()
    relay = CuttableLink()
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


@pytest.fixture
def admin() -> RabbitAdmin:
    require_rabbitmq()
    return RabbitAdmin.for_amqp_url(RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL)


@pytest.fixture
async def user_without_configure(admin: RabbitAdmin) -> AsyncIterator[str]:
    """The AMQP URL of a new user that may write and read everything but configure nothing."""
    username = f"ewms-test-noconf-{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    await admin.put_user(username, password)
    try:
        await admin.set_permissions(username, configure="^$", write=".*", read=".*")
        yield url_with(username, password)
    finally:
        await admin.delete_user(username)


# --- routing keys and message bodies ---


def test_routing_key_names_the_job_and_keeps_the_executors_underscores() -> None:
    assert routing_key("executor.ready") == "executor.ready"
    assert routing_key("job.started", "EV-abc") == "job.EV-abc.started"
    assert routing_key("job.stage_in.finished", "EV-abc") == "job.EV-abc.stage_in.finished"
    assert routing_key("job.finished", "EV-abc") == "job.EV-abc.finished"


async def test_open_publishes_executor_ready_with_hostname_and_executor(
    subscribe: Subscribe, publisher: Publisher
) -> None:
    subscription = await subscribe("#")
    before = time.time()
    await publisher(hostname="worker-1.example.org\n")

    [ready] = await receive(subscription, 1)
    assert ready.routing_key == "executor.ready"
    body = fields(ready)
    assert body["type"] == "executor.ready"
    assert body["executor"] == EXECUTOR
    assert body["hostname"] == "worker-1.example.org"  # no trailing newline, unlike the original
    assert isinstance(body["timestamp"], float)
    assert before - 1 <= body["timestamp"] <= time.time() + 1


async def test_a_jobs_events_arrive_under_their_routing_keys_with_their_fields(
    subscribe: Subscribe, publisher: Publisher
) -> None:
    events = await publisher()
    subscription = await subscribe("job.#")
    job_sequence(events.emit, "EV-abc", slot=3)

    got = await receive(subscription, 8)
    assert [e.routing_key for e in got] == [
        "job.EV-abc.started",
        "job.EV-abc.stage_in.started",
        "job.EV-abc.stage_in.finished",
        "job.EV-abc.execution.started",
        "job.EV-abc.execution.finished",
        "job.EV-abc.stage_out.started",
        "job.EV-abc.stage_out.finished",
        "job.EV-abc.finished",
    ]
    bodies = [fields(e) for e in got]
    for event, body in zip(got, bodies, strict=True):
        assert body["type"] == "job." + event.routing_key.removeprefix("job.EV-abc.")
        assert body["executor"] == EXECUTOR
        assert body["job"] == "EV-abc"
        assert isinstance(body["timestamp"], float)
    started, _, stage_in, _, execution, _, stage_out, finished = bodies
    assert (started["thread"], started["event_id"], started["queue"], started["attempt"]) == (
        3,
        "EV-abc",
        "Q-1",
        1,
    )
    assert (stage_in["bytes"], stage_in["time"]) == (120, 0.01)
    assert execution["exit_status"] == 0 and type(execution["exit_status"]) is int
    assert (execution["executable"], execution["time"]) == ("/bin/true", 0.5)
    assert (stage_out["bytes"], stage_out["time"]) == (64, 0.02)
    assert finished["exit_status"] == 0 and type(finished["exit_status"]) is int
    assert finished["thread"] == 3
    assert finished["error"] is None
    assert finished["metrics"] == metrics_of("EV-abc", 3)


async def test_a_stage_in_binding_receives_only_stage_in_events(
    subscribe: Subscribe, publisher: Publisher
) -> None:
    events = await publisher()
    subscription = await subscribe("job.*.stage_in.*")
    job_sequence(events.emit, "EV-1")
    job_sequence(events.emit, "EV-2")
    # Published last on the same channel: once it is in, every earlier match is in too.
    events.emit("job.stage_in.started", "EV-last")

    got = await receive_until(subscription, "job.EV-last.stage_in.started")
    assert [e.routing_key for e in got] == [
        "job.EV-1.stage_in.started",
        "job.EV-1.stage_in.finished",
        "job.EV-2.stage_in.started",
        "job.EV-2.stage_in.finished",
        "job.EV-last.stage_in.started",
    ]


async def test_close_flushes_every_event_emitted_before_it(
    subscribe: Subscribe, publisher: Publisher
) -> None:
    subscription = await subscribe("job.#")
    events = await publisher()
    n = 3000
    for i in range(n):
        events.emit("job.started", f"EV-{i}", thread=i % 4)
    await events.close(timeout=WAIT)

    assert events.dropped == 0
    assert events.buffered == 0
    got = await receive(subscription, n)
    assert [fields(e)["job"] for e in got] == [f"EV-{i}" for i in range(n)]


# --- failures ---


async def test_emit_during_an_outage_does_not_raise_and_delivers_after_reconnecting(
    subscribe: Subscribe, publisher: Publisher, link: CuttableLink
) -> None:
    events = await publisher(url=link.url)
    subscription = await subscribe("job.#")
    link.refusing = True
    link.cut()
    await eventually(lambda: not events.is_connected, "the publisher notices the lost connection")

    for i in range(5):
        events.emit("job.started", f"EV-{i}", thread=0)
    await eventually(lambda: link.refused >= 2, "the publisher tries again, and again")
    link.refusing = False

    got = await receive(subscription, 5)
    assert [fields(e)["job"] for e in got] == [f"EV-{i}" for i in range(5)]
    assert events.is_connected
    assert events.dropped == 0


async def test_emit_beyond_the_buffer_drops_and_counts_without_raising(
    subscribe: Subscribe, publisher: Publisher, link: CuttableLink
) -> None:
    events = await publisher(url=link.url, max_buffered=3)
    subscription = await subscribe("job.#")
    link.refusing = True
    link.cut()
    await eventually(lambda: not events.is_connected, "the publisher notices the lost connection")

    for i in range(5):
        events.emit("job.started", f"EV-{i}", thread=0)
    assert events.dropped == 2

    link.refusing = False
    await eventually(
        lambda: events.buffered == 0, "the kept events are confirmed after reconnecting"
    )
    events.emit("job.started", "EV-last", thread=0)
    got = await receive_until(subscription, "job.EV-last.started")
    assert [fields(e)["job"] for e in got] == ["EV-0", "EV-1", "EV-2", "EV-last"]
    assert events.dropped == 2


async def test_emit_after_close_does_not_raise_and_counts_a_drop(publisher: Publisher) -> None:
    events = await publisher()
    await events.close()

    events.emit("job.started", "EV-late", thread=0)
    assert events.dropped == 1


async def test_open_on_a_missing_exchange_without_configure_permission_is_a_clear_error(
    user_without_configure: str,
) -> None:
    missing = f"ewms-test-missing-{secrets.token_hex(4)}"
    with pytest.raises(QueueNotFound) as raised:
        await EventsExchange.open(
            user_without_configure, missing, executor_id=EXECUTOR, hostname="h"
        )
    message = str(raised.value)
    assert f"exchange {missing!r} does not exist" in message
    assert "may not create it" in message
    assert "ACCESS_REFUSED" in message


async def test_open_without_configure_permission_uses_an_existing_exchange(
    user_without_configure: str, exchange: str, subscribe: Subscribe
) -> None:
    subscription = await subscribe("#")
    events = await EventsExchange.open(
        user_without_configure, exchange, executor_id=EXECUTOR, hostname="h"
    )
    try:
        [ready] = await receive(subscription, 1)
        assert ready.routing_key == "executor.ready"
    finally:
        await events.close()


async def test_open_without_write_permission_is_a_clear_error(
    admin: RabbitAdmin, exchange: str
) -> None:
    username = f"ewms-test-nowrite-{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    await admin.put_user(username, password)
    try:
        await admin.set_permissions(username, configure=".*", write="^$", read=".*")
        with pytest.raises(QueueAccessDenied) as raised:
            await EventsExchange.open(
                url_with(username, password), exchange, executor_id=EXECUTOR, hostname="h"
            )
    finally:
        await admin.delete_user(username)
    message = str(raised.value)
    assert f"publishing to exchange {exchange!r}" in message
    assert "ACCESS_REFUSED" in message


async def test_open_with_an_unreachable_broker_is_a_clear_error() -> None:
    with pytest.raises(QueueError, match=r"cannot connect to RabbitMQ at 127\.0\.0\.1:1 "):
        await EventsExchange.open(
            "amqp://guest:guest@127.0.0.1:1/", "hyperflow.events", executor_id="x", hostname="h"
        )


# --- ewms pilot metrics ---


async def start_metrics(exchange: str, *args: str) -> asyncio.subprocess.Process:
    """``ewms pilot metrics`` as a process, once it is listening."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "pilot",
        "metrics",
        "--url",
        RABBITMQ_URL,
        "--exchange",
        exchange,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stderr is not None
    try:
        line = await asyncio.wait_for(process.stderr.readline(), WAIT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"ewms pilot metrics did not say it was listening within {WAIT} s")
    assert line.startswith(b"listening on exchange"), line
    return process


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """Wait for the process to end by itself: (exit code, stdout, rest of stderr)."""
    try:
        out, err = await asyncio.wait_for(process.communicate(), WAIT)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        pytest.fail(f"ewms pilot metrics still running after {WAIT} s; stdout: {out!r}")
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_metrics_prints_a_header_then_one_tsv_line_per_finished_job_with_na(
    exchange: str, publisher: Publisher
) -> None:
    process = await start_metrics(exchange, "--count", "2", "--header")
    events = await publisher()
    job_sequence(events.emit, "EV-1", slot=1)
    events.emit(
        "job.finished",
        "EV-2",
        executable="/bin/false",
        exit_status=1,
        thread=0,
        metrics=metrics_of("EV-2", 0, cpu_user=None),
        error="exit code 1",
    )

    code, out, err = await finish(process)
    assert code == 0, err
    header, first, second = out.splitlines()
    assert header.split("\t") == [
        "time",
        "executor",
        "thread",
        "job",
        "executable",
        "execution",
        "input_size",
        "output_size",
        "exit_status",
        "cpu_user",
        "cpu_system",
        "max_rss_bytes",
    ]
    when, *rest = first.split("\t")
    assert when.endswith("Z") and "T" in when
    assert rest == [
        EXECUTOR,
        "1",
        "EV-1",
        "/bin/true",
        "0.5",
        "120",
        "64",
        "0",
        "0.25",
        "0.125",
        "4096",
    ]
    assert second.split("\t")[1:] == [
        EXECUTOR,
        "0",
        "EV-2",
        "/bin/false",
        "0.5",
        "120",
        "64",
        "1",
        "NA",
        "0.125",
        "4096",
    ]


async def test_metrics_writes_finished_events_without_metrics_to_stderr(
    exchange: str, publisher: Publisher
) -> None:
    process = await start_metrics(exchange, "--count", "1")
    events = await publisher()
    events.emit("job.finished", "EV-bare", executable="/bin/true", exit_status=0, thread=0)
    events.emit("job.finished", "EV-full", exit_status=0, thread=0, metrics=metrics_of("EV-full"))

    code, out, err = await finish(process)
    assert code == 0, err
    assert [line.split("\t")[3] for line in out.splitlines()] == ["EV-full"]
    assert "job.EV-bare.finished: " in err
    assert '"job": "EV-bare"' in err


async def test_metrics_on_a_missing_exchange_exits_3_and_names_it() -> None:
    require_rabbitmq()
    missing = f"ewms-test-missing-{secrets.token_hex(4)}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "pilot",
        "metrics",
        "--url",
        RABBITMQ_URL,
        "--exchange",
        missing,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    code, out, err = await finish(process)
    assert code == 3
    assert out == ""
    assert f"error: exchange {missing!r} does not exist" in err
