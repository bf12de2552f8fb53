"""Event-queue throughput: each backend against a raw pika baseline on the same RabbitMQ.

For N events (default 20,000) of S bytes (default 1 KiB), in one run:

* ``publish``: events/s publishing in batches of B (default 500) into an empty queue, nobody
  consuming; the clock stops when the last batch is confirmed durable.
* ``e2e-1`` / ``e2e-2``: events/s from the first publish to the last ack, with 1 or 2 consumers
  subscribed before publishing starts (prefetch 100, one ack per event).

Targets (each its own fresh queue):

* ``embedded``: the WMS (``python -m services.cli wms serve``, a subprocess, SQLite in a temporary
  data directory) with the embedded broker, through ``GrpcQueueClient`` (EventService).
* ``rabbitmq-amqp``: a queue created by the WMS on the RabbitMQ backend (quorum queue, delivery
  limit, dead-letter exchange), used the way pilots use it: ``AmqpQueueClient`` with the workflow's
  own credentials.
* ``rabbitmq-grpc``: the same backend through the WMS's EventService proxy (``GrpcQueueClient``).
* ``pika``: raw pika on a quorum queue with the same arguments: publisher confirms in windows of 100
  (SelectConnection), consumers on BlockingConnection with basic_qos(100) and one basic_ack per
  message; one thread per client.

All clients run in this process (asyncio for ours, threads for pika); the WMS is its own process.
Checked: ``embedded e2e >= 5,000 events/s`` and ``rabbitmq-amqp e2e / pika e2e >= 0.7`` (for 1 and
2 consumers). A FAIL is a result (exit 0); exit 1 means the run itself failed.

Usage: ``python bench/queues.py [--events N] [--size S] [--targets embedded,pika,...] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "gen")]

import grpc  # noqa: E402
import pika  # noqa: E402
from wms_process import RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL, Wms, one_task_workflow  # noqa: E402

from ewms.v1 import queue_pb2  # noqa: E402
from services.events.grpc_client import GrpcQueueClient, channel_options  # noqa: E402

WORKFLOW = one_task_workflow("true", "bench")
PREFETCH = 100
CONFIRM_WINDOW = 100
PHASE_TIMEOUT = 300.0
EMBEDDED_TARGET = 5000.0
RABBIT_RATIO_TARGET = 0.7


def make_events(n: int, size: int) -> list[queue_pb2.Event]:
    pad = b"x" * size
    return [
        queue_pb2.Event(payload=(b"%d:" % i + pad)[:size], content_type="text/plain")
        for i in range(n)
    ]


# --- our clients ----------------------------------------------------------------------------------


async def publish_all(
    client: Any, queue_id: str, events: list[queue_pb2.Event], batch: int
) -> None:
    for i in range(0, len(events), batch):
        await client.publish(queue_id, events[i : i + batch])


async def run_ours(
    make_client: Callable[[], Awaitable[Any]],
    queue_id: str,
    events: list[queue_pb2.Event],
    batch: int,
    consumers: int,
) -> float:
    """Events/s: publish only (consumers == 0) or publish → consume → ack end to end."""
    n = len(events)
    publisher = await make_client()
    clients = [await make_client() for _ in range(consumers)]
    done = asyncio.Event()
    count = 0

    async def consume(client: Any) -> None:
        nonlocal count
        sub = await client.subscribe(queue_id, PREFETCH)
        ready.set()
        try:
            async for delivery in sub:
                await sub.ack(delivery)
                count += 1
                if count >= n:
                    done.set()
                    return
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sub.close(), 10)

    tasks = []
    for client in clients:
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(consume(client)))
        await asyncio.wait_for(ready.wait(), 30)
    start = time.perf_counter()
    await asyncio.wait_for(publish_all(publisher, queue_id, events, batch), PHASE_TIMEOUT)
    if consumers:
        await asyncio.wait_for(done.wait(), PHASE_TIMEOUT)
    elapsed = time.perf_counter() - start
    for task in tasks:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, 10)
    for client in [publisher, *clients]:
        await client.close()
    return n / elapsed


# --- raw pika baseline ---------------------------------------------------------------------------


QUORUM_ARGS = {"x-queue-type": "quorum", "x-delivery-limit": 2}


def pika_declare() -> str:
    name = f"bench-pika-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    conn.channel().queue_declare(name, durable=True, arguments=QUORUM_ARGS)
    conn.close()
    return name


def pika_delete(name: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    conn.channel().queue_delete(name)
    conn.close()


def pika_publish(name: str, bodies: list[bytes], done: threading.Event, error: list[str]) -> None:
    """Publish with confirms in windows of CONFIRM_WINDOW (SelectConnection)."""
    state = {"next": 0, "outstanding": 0, "published": 0}
    props = pika.BasicProperties(delivery_mode=2, content_type="text/plain")

    def publish_window(channel: Any) -> None:
        end = min(state["next"] + CONFIRM_WINDOW, len(bodies))
        for i in range(state["next"], end):
            channel.basic_publish("", name, bodies[i], props)
        state["outstanding"] = end - state["next"]
        state["next"] = end

    def on_confirm(frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            error.append("publish nacked")
        # A multiple ack confirms everything up to its delivery tag.
        tag = method.delivery_tag
        acked = tag - state["published"]
        state["published"] = tag
        state["outstanding"] -= acked
        if state["outstanding"] <= 0:
            if state["next"] >= len(bodies):
                done.set()
                conn.close()
            else:
                publish_window(channel_ref[0])

    channel_ref: list[Any] = []

    def on_channel(channel: Any) -> None:
        channel_ref.append(channel)
        channel.confirm_delivery(on_confirm, callback=lambda _: publish_window(channel))

    conn = pika.SelectConnection(
        pika.URLParameters(RABBITMQ_URL),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_open_error_callback=lambda c, e: (error.append(str(e)), c.ioloop.stop()),
        on_close_callback=lambda c, reason: c.ioloop.stop(),
    )
    conn.ioloop.start()


def pika_consume(
    name: str, n: int, counter: list[int], lock: threading.Lock, done: threading.Event
) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=PREFETCH)

    def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
        ch.basic_ack(method.delivery_tag)
        with lock:
            counter[0] += 1
            if counter[0] >= n:
                done.set()

    channel.basic_consume(name, on_message)
    while not done.is_set():
        conn.process_data_events(time_limit=0.1)
    conn.close()


def run_pika(events: list[queue_pb2.Event], consumers: int) -> float:
    name = pika_declare()
    try:
        bodies = [e.payload for e in events]
        counter, lock, consumed = [0], threading.Lock(), threading.Event()
        threads = [
            threading.Thread(target=pika_consume, args=(name, len(bodies), counter, lock, consumed))
            for _ in range(consumers)
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)  # consumers registered
        published, error = threading.Event(), []
        start = time.perf_counter()
        pika_publish(name, bodies, published, error)
        if error:
            raise RuntimeError(f"pika publish failed: {error}")
        if consumers and not consumed.wait(PHASE_TIMEOUT):
            raise RuntimeError("pika consumers timed out")
        elapsed = time.perf_counter() - start
        consumed.set()
        for t in threads:
            t.join(30)
        return len(bodies) / elapsed
    finally:
        pika_delete(name)


async def delete_rabbitmq_queues(queues: list[queue_pb2.Queue]) -> None:
    """Delete the RabbitMQ queues, exchanges and users of the workflows the run created (their
    "out" queues too: every queue of the workflow shares its id prefix)."""
    if not queues:
        return
    from services.wms.queues.rabbitmq import RabbitBroker

    broker = await RabbitBroker.connect(RABBITMQ_URL, RABBITMQ_MANAGEMENT_URL)
    try:
        for q in queues:
            # The "out" queue's id is not known here: take the workflow's queues by id prefix.
            prefix = q.queue_id.rsplit("-", 1)[0] + "-"
            names = await broker.admin.request("GET", "/api/queues/%2F?columns=name")
            group = [
                queue_pb2.Queue(queue_id=n["name"], workflow_id=q.workflow_id)
                for n in names
                if n["name"].startswith(prefix) and not n["name"].endswith(".dead")
            ]
            await broker.delete(q.workflow_id, group or [q])
    finally:
        await broker.close()


# --- main ----------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    events = make_events(args.events, args.size)
    targets = args.targets.split(",")
    results: dict[str, dict[str, float]] = {}
    wms: dict[str, Wms] = {}
    created: list[queue_pb2.Queue] = []
    try:
        for target in targets:
            row: dict[str, float] = {}
            for phase, consumers in (("publish", 0), ("e2e-1", 1), ("e2e-2", 2)):
                if target == "pika":
                    row[phase] = await asyncio.to_thread(run_pika, events, consumers)
                    continue
                backend = "embedded" if target == "embedded" else "rabbitmq"
                if backend not in wms:
                    wms[backend] = Wms(backend, prefix="bench-queues")
                    await wms[backend].start()
                server = wms[backend]
                channel = grpc.aio.insecure_channel(server.address, options=channel_options())
                resp = await server.create_workflow(WORKFLOW)
                queue = next(q for q in resp.queues if q.alias == "in")
                if backend == "rabbitmq":
                    created.append(queue)

                if target == "rabbitmq-amqp":
                    from services.events.amqp import AmqpQueueClient

                    async def make_client(q: queue_pb2.Queue = queue) -> Any:
                        url = q.address.replace(
                            "://", f"://{q.credentials.username}:{q.credentials.password}@", 1
                        )
                        return await AmqpQueueClient.connect(url, max_attempts=q.max_attempts)

                else:

                    async def make_client(s: Wms = server) -> Any:
                        return GrpcQueueClient.connect(s.address, s.token)

                row[phase] = await run_ours(
                    make_client, queue.queue_id, events, args.batch, consumers
                )
                await channel.close()
            results[target] = row
            summary = ", ".join(f"{k} {v:,.0f}/s" for k, v in row.items())
            print(f"{target}: {summary}", file=sys.stderr)
    finally:
        for server in wms.values():
            await server.stop()
        await delete_rabbitmq_queues(created)
    checks = []
    if "embedded" in results:
        for phase in ("e2e-1", "e2e-2"):
            value = results["embedded"][phase]
            name = f"embedded {phase} >= {EMBEDDED_TARGET:,.0f}/s"
            checks.append((name, value >= EMBEDDED_TARGET, value))
    if "pika" in results and "rabbitmq-amqp" in results:
        for phase in ("e2e-1", "e2e-2"):
            ratio = results["rabbitmq-amqp"][phase] / results["pika"][phase]
            name = f"rabbitmq-amqp/pika {phase} >= {RABBIT_RATIO_TARGET}"
            checks.append((name, ratio >= RABBIT_RATIO_TARGET, ratio))
    return {
        "events": args.events,
        "size": args.size,
        "batch": args.batch,
        "machine": f"{platform.node()} {os.cpu_count()} cpus, Python {platform.python_version()}",
        "results": results,
        "checks": [{"check": c, "pass": ok, "value": v} for c, ok, v in checks],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument(
        "--targets", default="embedded,rabbitmq-amqp,rabbitmq-grpc,pika", help="comma-separated"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        report = asyncio.run(main_async(args))
    except Exception as exc:
        print(f"benchmark failed: {exc!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.events} events of {args.size} B, batches of {args.batch}; {report['machine']}")
    print(f"{'target':<16}{'publish':>12}{'e2e-1':>12}{'e2e-2':>12}   (events/s)")
    for target, row in report["results"].items():
        cells = "".join(
            f"{row.get(p, float('nan')):>12,.0f}" for p in ("publish", "e2e-1", "e2e-2")
        )
        print(f"{target:<16}{cells}")
    for check in report["checks"]:
        print(f"{'PASS' if check['pass'] else 'FAIL'}  {check['check']}: {check['value']:,.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
