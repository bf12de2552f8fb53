"""What the REST gateway costs against gRPC, both measured against one WMS in one run.

The WMS runs as a subprocess (``python -m services.cli wms serve --port 0 --http-port 0
--data-dir DIR``, cwd = repo root, ``EWMS_CLUSTER_LOCATIONS=local``, DIR a fresh temporary
directory); this script is the client process, reaching it over loopback. Its gRPC port and HTTP
URL come from the JSON log line ``{"event": "wms listening", "grpc_port": N, "http_url": ...}`` on
stderr, the admin token from ``DIR/admin.token`` (``authorization: Bearer <token>`` on both).

What is measured:

* **GetWorkflow latency**: N sequential calls each way on one workflow created before timing,
  each timed with ``time.perf_counter_ns`` (p50, p99 nearest rank, mean). gRPC: one ``grpc.aio``
  channel, the generated stub. REST: ``GET /v1/workflows/{workflow_id}`` on one
  ``aiohttp.ClientSession`` (keep-alive), the body read and parsed with ``json.loads``, as the
  stub decodes its protobuf. Checked: ``REST p50 - gRPC p50 <= 1 ms``.
* **GetWorkflow throughput**: C concurrent callers (default 8) for a fixed time each way, calls
  completed per second. gRPC: C tasks on the one channel; REST: C tasks on the one session, whose
  connector allows at least C connections.
* **Watch latency**: a gRPC ``WatchWorkflow`` stream and an SSE stream
  (``GET /v1/workflows/{workflow_id}/watch``, one ``data: <json>`` event per message) open on
  the same workflow at the same time. Each change is an ``AddWorkers`` call (over gRPC) on the
  workflow's task: it creates a taskforce, which both watches report. Latency = from just before
  the call is sent to the first message on each stream that carries the new taskforce (decoded),
  so both include the call itself (reported alone too); the pairwise difference, per change, is
  what SSE adds. After each change the next waits 25-35 ms (the dispatcher's own follow-up change
  of the new taskforce passes; nothing coalesces).

Latency calls alternate between the transports call by call (the order flipping every pair), so
that the noise of a small machine shared with other work falls on both alike; the median of the
per-pair differences is reported next to the difference of the p50s. Throughput runs in
``--rounds`` slices per transport in a rotated order, as ``wms_api.py`` does. The watch runs in as
many rounds, each on a fresh workflow with both streams opened afresh (in a rotated order).

Every phase has a time budget (a phase that runs out reports the samples it got), every call a
timeout, and the whole run a hard limit (``--max-run-seconds``). A failed check is a result, not an
error: the exit code is 0 unless something went wrong (the WMS did not start, a call failed or
timed out, a change never arrived, the run exceeded its limit), then 1, with the WMS's last output
on stderr; 130 / 143 on SIGINT / SIGTERM. The WMS is always stopped and its data directory removed.

Usage: ``python bench/gateway.py`` (``--help`` for the knobs, ``--json`` for machine output,
``--transports grpc`` for the gRPC half alone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from google.protobuf import json_format

# wms_api puts the repo root, and gen/ when ewms.v1 is not installed, on the path.
from wms_api import (
    BenchError,
    ServerProcess,
    Target,
    _child_env,
    _start_server,
    _wms_port,
    call_failed,
    machine_description,
    measure_throughput,
    open_channel,
    warm_up,
)
from wms_process import one_task_workflow

from ewms.v1 import workflow_service_pb2, workflow_service_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = ("grpc", "rest")
REST_P50_EXTRA_MS_TARGET = 1.0
WATCH_PAUSE_S = (0.025, 0.035)
CREATE_WORKFLOW_REQUEST = one_task_workflow("cp {{INFILE}} {{OUTFILE}}", n_workers=1)
SSE_LINE_LIMIT = 16 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# The WMS and the clients


@dataclass
class Wms:
    """The WMS subprocess and how to reach it."""

    server: ServerProcess
    grpc_port: int
    http_url: str
    token: str


async def start_wms(stack: contextlib.AsyncExitStack, call_timeout: float) -> Wms:
    """Start the WMS on free ports in a temporary data directory, both gone when ``stack`` ends."""
    data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ewms-bench-gw-")))
    argv = [sys.executable, "-m", "services.cli", "wms", "serve", "--port", "0"]
    argv += ["--http-port", "0", "--data-dir", str(data_dir)]
    env = _child_env({"EWMS_CLUSTER_LOCATIONS": "local"})
    server, grpc_port = await _start_server("WMS", argv, env, _wms_port, read_stdout=False)
    # Registered after the tempdir, so the server stops before its data dir is removed.
    stack.push_async_callback(server.stop)
    http_url = ""
    for line in server.lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == "wms listening":
                http_url = str(record.get("http_url") or "")
    if not http_url:
        raise BenchError(f"the WMS did not log its http_url; output:\n{server.output_tail()}")
    token_file = data_dir / "admin.token"
    deadline = time.monotonic() + call_timeout
    # The contract has the token in place once the server listens; the wait is only a margin.
    while not token_file.exists():
        if time.monotonic() > deadline or server.proc.returncode is not None:
            raise BenchError(f"{token_file} does not exist; output:\n{server.output_tail()}")
        await asyncio.sleep(0.05)
    token = token_file.read_text().strip()
    if not token:
        raise BenchError(f"{token_file} is empty")
    return Wms(server, grpc_port, http_url.rstrip("/"), token)


@dataclass
class Clients:
    """A gRPC stub on one channel and, if REST is measured, one aiohttp session."""

    wms: Wms
    stub: workflow_service_pb2_grpc.WorkflowServiceStub
    metadata: tuple[tuple[str, str], ...]
    session: aiohttp.ClientSession | None
    timeout: float

    async def create_workflow(self) -> workflow_service_pb2.CreateWorkflowResponse:
        request = json_format.ParseDict(
            CREATE_WORKFLOW_REQUEST, workflow_service_pb2.CreateWorkflowRequest()
        )
        try:
            created: workflow_service_pb2.CreateWorkflowResponse = await self.stub.CreateWorkflow(
                request, metadata=self.metadata, timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise call_failed("CreateWorkflow", self.wms.server, exc) from exc
        return created

    def rest_failed(self, what: str, detail: str) -> BenchError:
        return BenchError(f"{what}: {detail}\nWMS output (tail):\n{self.wms.server.output_tail()}")


async def open_clients(
    stack: contextlib.AsyncExitStack, wms: Wms, args: argparse.Namespace
) -> Clients:
    channel = await open_channel(stack, wms.grpc_port, args.call_timeout)
    session = None
    if "rest" in args.transports:
        # One session, keep-alive; enough connections for every concurrent caller (and one spare
        # for the SSE stream, which holds its own).
        connector = aiohttp.TCPConnector(limit=args.concurrency + 1)
        session = aiohttp.ClientSession(
            connector=connector,
            headers={"Authorization": f"Bearer {wms.token}"},
            timeout=aiohttp.ClientTimeout(total=args.call_timeout),
        )
        stack.push_async_callback(session.close)
    return Clients(
        wms,
        workflow_service_pb2_grpc.WorkflowServiceStub(channel),
        (("authorization", f"Bearer {wms.token}"),),
        session,
        args.call_timeout,
    )


# --------------------------------------------------------------------------------------------
# GetWorkflow, each way


def grpc_get_workflow(clients: Clients, workflow_id: str) -> Callable[[], Awaitable[object]]:
    request = workflow_service_pb2.GetWorkflowRequest(workflow_id=workflow_id)

    async def call() -> object:
        return await clients.stub.GetWorkflow(
            request, metadata=clients.metadata, timeout=clients.timeout
        )

    return call


def rest_get_workflow(clients: Clients, workflow_id: str) -> Callable[[], Awaitable[Any]]:
    assert clients.session is not None
    session = clients.session
    url = f"{clients.wms.http_url}/v1/workflows/{workflow_id}"

    async def call() -> Any:
        try:
            async with session.get(url) as resp:
                body = await resp.read()
                status = resp.status
        except TimeoutError:
            raise clients.rest_failed(
                f"GET {url}", f"no answer within {clients.timeout} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise clients.rest_failed(f"GET {url}", f"{type(exc).__name__}: {exc}") from exc
        if status != 200:
            raise clients.rest_failed(
                f"GET {url}", f"HTTP {status}: {body[:500].decode(errors='replace')}"
            )
        return json.loads(body)

    return call


async def get_workflow_targets(clients: Clients, args: argparse.Namespace) -> list[Target]:
    """One workflow to read and a target per transport, each checked with one call first."""
    workflow_id = (await clients.create_workflow()).workflow.workflow_id
    targets = []
    if "grpc" in args.transports:
        call = grpc_get_workflow(clients, workflow_id)
        try:
            fetched: Any = await call()
        except grpc.aio.AioRpcError as exc:
            raise call_failed("GetWorkflow (gRPC)", clients.wms.server, exc) from exc
        if fetched.workflow_id != workflow_id:
            raise BenchError(f"gRPC GetWorkflow({workflow_id}) returned {fetched.workflow_id!r}")
        targets.append(Target("gRPC", call, clients.wms.server, args.get_calls))
    if "rest" in args.transports:
        rest_call = rest_get_workflow(clients, workflow_id)
        body = await rest_call()
        if not isinstance(body, dict) or body.get("workflow_id") != workflow_id:
            raise BenchError(f"REST GET /v1/workflows/{workflow_id} returned {str(body)[:300]}")
        targets.append(Target("REST", rest_call, clients.wms.server, args.get_calls))
    return targets


async def measure_get_workflow(
    targets: list[Target], args: argparse.Namespace, cpu_used: dict[str, list[float]]
) -> None:
    """Warm-up, then latency call by call alternating between the transports (ABBA: the order
    flips every pair), then throughput in ``--rounds`` slices in a rotated order, adding the CPU
    seconds the WMS and this process used in each slice to ``cpu_used[name]`` (WMS, client).

    Alternating call by call, rather than in rounds of hundreds, keeps the comparison fair on a
    machine shared with bursty work: whatever slows one transport's call slows its neighbour's.
    Sample i of each transport belongs to the same pair, so per-pair differences can be taken.
    """
    for target in targets:
        await warm_up(target, args.warmup, args.latency_budget / 4)
    deadline_ns = time.perf_counter_ns() + int(args.latency_budget * 1e9)
    for i in range(args.get_calls):
        if time.perf_counter_ns() > deadline_ns:
            break
        for target in targets if i % 2 == 0 else targets[::-1]:
            start = time.perf_counter_ns()
            await target.call()
            target.samples_ns.append(time.perf_counter_ns() - start)
    for r in range(args.rounds):
        k = r % len(targets)
        for target in targets[k:] + targets[:k]:
            wms_before, client_before = cpu_seconds(target.server), time.process_time()
            await measure_throughput(target, args.concurrency, args.duration / args.rounds)
            cpu = cpu_used.setdefault(target.name, [0.0, 0.0])
            cpu[0] += cpu_seconds(target.server) - wms_before
            cpu[1] += time.process_time() - client_before


def cpu_seconds(server: ServerProcess) -> float:
    """CPU seconds (user + system) the server process has used so far, from /proc."""
    try:
        stat = Path(f"/proc/{server.proc.pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"cannot read the CPU time of {server.name}: {exc}") from exc
    # Fields after the command name (which may hold spaces): utime and stime are the 12th, 13th.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Watch: gRPC stream and SSE


@dataclass
class Stream:
    """One open watch: when each taskforce first appeared on it."""

    name: str
    arrivals: dict[str, asyncio.Future[int]] = field(default_factory=dict)
    # Created in the running loop, as every Stream is.
    snapshot: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    reader: asyncio.Task[None] | None = None
    close: Callable[[], None] | None = None

    def arrival(self, uuid: str) -> asyncio.Future[int]:
        if uuid not in self.arrivals:
            self.arrivals[uuid] = asyncio.get_running_loop().create_future()
        return self.arrivals[uuid]

    def received(self, snapshot: bool, uuids: Sequence[str], at_ns: int) -> None:
        if not self.snapshot.done():
            if not snapshot:
                raise BenchError(f"{self.name} watch: the first message is not a snapshot")
            self.snapshot.set_result(at_ns)
            return
        for uuid in uuids:
            fut = self.arrival(uuid)
            if not fut.done():
                fut.set_result(at_ns)

    async def wait(self, fut: asyncio.Future[int], what: str, within_s: float) -> int:
        """The future's time, unless the stream ends or ``within_s`` passes first."""
        assert self.reader is not None
        waited: set[asyncio.Future[Any]] = {fut, self.reader}
        done, _ = await asyncio.wait(waited, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        if self.reader in done:
            exc = self.reader.exception()
            raise BenchError(f"{self.name} watch ended before {what}: {exc!r}") from exc
        raise BenchError(f"{self.name} watch: {what} did not arrive within {within_s} s")


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, str]]:
    """Each Server-Sent Event as (event name, data: its ``data:`` lines joined); comments and
    other fields skipped. The name is ``message`` when the event has none, as in browsers."""
    pending = b""
    name = ""
    data: list[str] = []
    async for chunk in content.iter_any():
        pending += chunk
        if len(pending) > SSE_LINE_LIMIT:
            raise BenchError(f"SSE: a line longer than {SSE_LINE_LIMIT} bytes")
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode()
            if not line:
                if data:
                    yield name or "message", "\n".join(data)
                name, data = "", []
                continue
            field_name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field_name == "data":
                data.append(value)
            elif field_name == "event":
                name = value


async def open_grpc_watch(clients: Clients, workflow_id: str, seconds: float) -> Stream:
    stream = Stream("gRPC")
    call = clients.stub.WatchWorkflow(
        workflow_service_pb2.WatchWorkflowRequest(workflow_id=workflow_id),
        metadata=clients.metadata,
        timeout=seconds,
    )

    async def read() -> None:
        async for msg in call:
            stream.received(
                msg.snapshot, [tf.taskforce_uuid for tf in msg.taskforces], time.perf_counter_ns()
            )

    stream.reader = asyncio.create_task(read())
    stream.close = call.cancel
    return stream


async def open_sse_watch(clients: Clients, workflow_id: str, seconds: float) -> Stream:
    assert clients.session is not None
    stream = Stream("SSE")
    url = f"{clients.wms.http_url}/v1/workflows/{workflow_id}/watch"
    try:
        resp = await clients.session.get(
            url,
            headers={"Accept": "text/event-stream"},
            timeout=aiohttp.ClientTimeout(total=seconds, connect=clients.timeout),
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise clients.rest_failed(f"GET {url}", f"{type(exc).__name__}: {exc}") from exc
    content_type = resp.headers.get("Content-Type", "")
    if resp.status != 200 or not content_type.startswith("text/event-stream"):
        try:
            body = (await resp.read())[:500].decode(errors="replace")
        finally:
            resp.close()
        raise clients.rest_failed(f"GET {url}", f"HTTP {resp.status} ({content_type}): {body}")

    async def read() -> None:
        async for name, data in sse_events(resp.content):
            if name == "end":
                return
            if name != "message":
                raise BenchError(f"SSE watch: event {name!r}: {data[:500]}")
            msg = json.loads(data)
            # The gateway keeps proto field names.
            uuids = [tf["taskforce_uuid"] for tf in msg.get("taskforces", [])]
            stream.received(bool(msg.get("snapshot")), uuids, time.perf_counter_ns())

    stream.reader = asyncio.create_task(read())
    stream.close = resp.close
    return stream


@dataclass
class WatchSamples:
    """Per change: the AddWorkers call and the arrival on each stream, all from the send."""

    action_ns: list[int] = field(default_factory=list)
    arrival_ns: dict[str, list[int]] = field(default_factory=dict)


async def watch_round(
    clients: Clients,
    args: argparse.Namespace,
    samples: WatchSamples,
    changes: int,
    round_index: int,
    budget_s: float,
) -> None:
    """A fresh workflow, both streams open on it, then ``changes`` AddWorkers, each seen on both."""
    deadline = time.monotonic() + budget_s
    created = await clients.create_workflow()
    workflow_id = created.workflow.workflow_id
    add_request = workflow_service_pb2.AddWorkersRequest(
        task_id=created.task_directives[0].task_id, cluster_location="local", n_workers=1
    )
    # The streams outlive the round's worst case (its budget, then one more change); they are
    # closed at its end anyway.
    stream_seconds = budget_s + 3 * clients.timeout + 2 * args.watch_timeout
    openers: list[Callable[[Clients, str, float], Awaitable[Stream]]] = []
    if "grpc" in args.transports:
        openers.append(open_grpc_watch)
    if "rest" in args.transports:
        openers.append(open_sse_watch)
    k = round_index % len(openers)
    openers = openers[k:] + openers[:k]
    streams: list[Stream] = []
    try:
        for opener in openers:
            streams.append(await opener(clients, workflow_id, stream_seconds))
        for s in streams:
            await s.wait(s.snapshot, "the snapshot", clients.timeout)
        await _changes(clients, args, streams, add_request, samples, changes, deadline)
    finally:
        for s in streams:
            if s.close is not None:
                s.close()
            if s.reader is not None:
                s.reader.cancel()
                # The reader's own end (cancelled, or failed) is not this round's error.
                await asyncio.gather(s.reader, return_exceptions=True)


async def _changes(
    clients: Clients,
    args: argparse.Namespace,
    streams: list[Stream],
    add_request: workflow_service_pb2.AddWorkersRequest,
    samples: WatchSamples,
    changes: int,
    deadline: float,
) -> None:
    """Warm-up changes, then ``changes`` measured ones (or as many as ``deadline`` allows)."""
    warm = args.watch_warmup
    for i in range(warm + changes):
        if time.monotonic() > deadline:
            break
        start = time.perf_counter_ns()
        try:
            tf = await clients.stub.AddWorkers(
                add_request, metadata=clients.metadata, timeout=clients.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise call_failed("AddWorkers", clients.wms.server, exc) from exc
        returned = time.perf_counter_ns()
        arrived = [
            await s.wait(
                s.arrival(tf.taskforce_uuid),
                f"taskforce {tf.taskforce_uuid}",
                args.watch_timeout,
            )
            for s in streams
        ]
        if i >= warm:
            samples.action_ns.append(returned - start)
            for s, at in zip(streams, arrived, strict=True):
                samples.arrival_ns.setdefault(s.name, []).append(at - start)
        await asyncio.sleep(random.uniform(*WATCH_PAUSE_S))


async def measure_watch(clients: Clients, args: argparse.Namespace) -> WatchSamples:
    samples = WatchSamples()
    per_round = args.watch_budget / args.rounds
    for r in range(args.rounds):
        share = args.watch_changes // args.rounds + (
            1 if r < args.watch_changes % args.rounds else 0
        )
        await watch_round(clients, args, samples, share, r, per_round)
    return samples


# --------------------------------------------------------------------------------------------
# Report


def summarize_ns(samples: Sequence[int], unit: float) -> dict[str, float | int]:
    """n, p50, p99 (nearest rank), mean and max, in ``unit`` ns."""
    ordered = sorted(samples)
    n = len(ordered)
    if n == 0:
        raise BenchError("no sample within the time budget")

    def q(p: float) -> float:
        return ordered[max(0, math.ceil(p * n) - 1)] / unit

    return {
        "n": n,
        "p50": q(0.50),
        "p99": q(0.99),
        "mean": sum(ordered) / n / unit,
        "max": ordered[-1] / unit,
    }


def git_commit() -> dict[str, Any]:
    """HEAD's short hash, and whether services/ or bench/ differ from it (work in progress)."""

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": bool(git("status", "--porcelain", "--", "services", "bench")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "uncommitted": None}


def build_report(
    args: argparse.Namespace,
    targets: list[Target],
    cpu_used: dict[str, list[float]],
    watch: WatchSamples | None,
) -> dict[str, Any]:
    get = {t.name: t.summary() for t in targets}
    for t in targets:
        # CPU per call while C callers ran: what each side costs, less sensitive than wall time
        # to other work on the machine.
        wms_s, client_s = cpu_used.get(t.name, (0.0, 0.0))
        calls = max(1, t.throughput_calls)
        get[t.name]["wms_cpu_us_per_call"] = wms_s / calls * 1e6
        get[t.name]["client_cpu_us_per_call"] = client_s / calls * 1e6
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{machine_description()}, aiohttp {aiohttp.__version__}",
        **git_commit(),
        "command": shlex.join(["python", "bench/gateway.py", *sys.argv[1:]]),
        "settings": {
            "transports": args.transports,
            "warmup": args.warmup,
            "latency_calls": args.get_calls,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "throughput_seconds": args.duration,
            "call_timeout_s": args.call_timeout,
            "watch_warmup_per_round": args.watch_warmup,
        },
        "get_workflow": get,
        "checks": [],
    }
    if "gRPC" in get and "REST" in get:
        g, r = get["gRPC"], get["REST"]
        extra_ms = (r["p50_us"] - g["p50_us"]) / 1000
        t_grpc, t_rest = (next(t for t in targets if t.name == n) for n in ("gRPC", "REST"))
        pairs = sorted(b - a for a, b in zip(t_grpc.samples_ns, t_rest.samples_ns, strict=False))
        report["get_workflow_rest_minus_grpc"] = {
            "p50_of_pairs_us": pairs[max(0, math.ceil(0.5 * len(pairs)) - 1)] / 1000,
            "p50_us": r["p50_us"] - g["p50_us"],
            "p99_us": r["p99_us"] - g["p99_us"],
            "mean_us": r["mean_us"] - g["mean_us"],
            "wms_cpu_us_per_call": r["wms_cpu_us_per_call"] - g["wms_cpu_us_per_call"],
            "client_cpu_us_per_call": r["client_cpu_us_per_call"] - g["client_cpu_us_per_call"],
            "throughput_ratio": (
                r["throughput_per_s"] / g["throughput_per_s"] if g["throughput_per_s"] else 0.0
            ),
        }
        report["checks"].append(
            {
                "name": "GetWorkflow REST p50 - gRPC p50",
                "value": round(extra_ms, 3),
                "unit": "ms",
                "target": REST_P50_EXTRA_MS_TARGET,
                "pass": extra_ms <= REST_P50_EXTRA_MS_TARGET,
            }
        )
    if watch is not None:
        w: dict[str, Any] = {"add_workers_call": summarize_ns(watch.action_ns, 1e6)}
        for name, values in watch.arrival_ns.items():
            w[name] = summarize_ns(values, 1e6)
        if {"gRPC", "SSE"} <= watch.arrival_ns.keys():
            diffs = [
                s - g
                for s, g in zip(watch.arrival_ns["SSE"], watch.arrival_ns["gRPC"], strict=True)
            ]
            ordered = sorted(diffs)
            n = len(ordered)
            w["sse_minus_grpc"] = {
                "p50_of_pairs": ordered[max(0, math.ceil(0.5 * n) - 1)] / 1e6,
                "p50": w["SSE"]["p50"] - w["gRPC"]["p50"],
                "p99": w["SSE"]["p99"] - w["gRPC"]["p99"],
            }
        report["watch_ms"] = w
    return report


def render_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    dirty = " (+ uncommitted changes)" if report.get("uncommitted") else ""
    clients = f"({s['concurrency']} clients)"

    def load(when: str) -> str:
        return " ".join(f"{v:.2f}" for v in report["load_average"][when])

    out = [
        f"# {report['date']}  {report['machine']}",
        f"# commit {report['commit']}{dirty}; command: {report['command']}",
        f"# load average (1, 5, 15 min) before: {load('before')}, after: {load('after')}",
        "",
        f"GetWorkflow{'n':>11}{'p50 µs':>10}{'p99 µs':>10}{'mean µs':>10}{'calls/s':>10}"
        f"{'WMS CPU':>10}{'client CPU':>12}",
        f"{'':<52}{clients:>10}{'µs/call':>10}{'µs/call':>12}",
    ]
    for name, r in report["get_workflow"].items():
        out.append(
            f"{name:<16}{r['n']:>6}{r['p50_us']:>10.0f}{r['p99_us']:>10.0f}"
            f"{r['mean_us']:>10.0f}{r['throughput_per_s']:>10.0f}"
            f"{r['wms_cpu_us_per_call']:>10.0f}{r['client_cpu_us_per_call']:>12.0f}"
        )
    if d := report.get("get_workflow_rest_minus_grpc"):
        out.append(
            f"{'REST - gRPC':<16}{'':>6}{d['p50_us']:>+10.0f}{d['p99_us']:>+10.0f}"
            f"{d['mean_us']:>+10.0f}{d['throughput_ratio']:>9.2f}x"
            f"{d['wms_cpu_us_per_call']:>+10.0f}{d['client_cpu_us_per_call']:>+12.0f}"
        )
        out.append(f"(median of per-pair latency differences: {d['p50_of_pairs_us']:+.0f} µs)")
    if w := report.get("watch_ms"):
        out += [
            "",
            f"watch (send → seen){'n':>3}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'max ms':>10}",
        ]
        rows = [(f"{k} stream", w[k]) for k in ("gRPC", "SSE") if k in w]
        rows.append(("AddWorkers call", w["add_workers_call"]))
        for label, r in rows:
            out.append(
                f"{label:<16}{r['n']:>6}{r['p50']:>10.2f}{r['p99']:>10.2f}"
                f"{r['mean']:>10.2f}{r['max']:>10.2f}"
            )
        if d := w.get("sse_minus_grpc"):
            out.append(
                f"{'SSE - gRPC':<16}{'':>6}{d['p50']:>+10.2f}{d['p99']:>+10.2f}"
                f"   (median of per-change differences {d['p50_of_pairs']:+.2f} ms)"
            )
    out.append("")
    for c in report["checks"]:
        verdict = "PASS" if c["pass"] else "FAIL"
        out.append(
            f"{c['name']} = {c['value']:.3f} {c['unit']} (target <= {c['target']:g} {c['unit']}):"
            f" {verdict}"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Run


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the WMS, measure both transports, stop it; return the report."""
    load_before = os.getloadavg()
    async with contextlib.AsyncExitStack() as stack:
        wms = await start_wms(stack, args.call_timeout)
        clients = await open_clients(stack, wms, args)
        targets = await get_workflow_targets(clients, args)
        cpu_used: dict[str, list[float]] = {}
        try:
            await measure_get_workflow(targets, args, cpu_used)
        except grpc.aio.AioRpcError as exc:
            raise call_failed("GetWorkflow", wms.server, exc) from exc
        watch = await measure_watch(clients, args) if args.watch_changes else None
    report = build_report(args, targets, cpu_used, watch)
    # Other work on the machine shows in both transports' figures; say how much there was.
    report["load_average"] = {"before": load_before, "after": os.getloadavg()}
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="GetWorkflow latency and throughput, and watch latency: REST gateway vs gRPC.",
    )
    p.add_argument(
        "--transports",
        type=lambda s: [t for t in s.split(",") if t],
        default=list(TRANSPORTS),
        help="comma-separated subset of grpc,rest (default: both)",
    )
    p.add_argument(
        "--get-calls", type=int, default=1500, help="latency calls per transport (alternating)"
    )
    p.add_argument("--warmup", type=int, default=200, help="warm-up calls per transport")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent callers, throughput")
    p.add_argument(
        "--duration", type=float, default=5.0, help="throughput seconds per transport, all slices"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="throughput slices per transport (rotated), and watch rounds",
    )
    p.add_argument(
        "--latency-budget",
        type=float,
        default=25.0,
        help="max seconds of the alternating latency calls (a quarter of it per warm-up);"
        " fewer samples if hit",
    )
    p.add_argument(
        "--watch-changes", type=int, default=200, help="measured changes, all rounds (0: no watch)"
    )
    p.add_argument("--watch-warmup", type=int, default=3, help="unmeasured changes per round")
    p.add_argument(
        "--watch-budget", type=float, default=25.0, help="max seconds of the watch, all rounds"
    )
    p.add_argument(
        "--watch-timeout", type=float, default=5.0, help="max wait for a change on a stream, s"
    )
    p.add_argument("--call-timeout", type=float, default=5.0, help="timeout of each call, s")
    p.add_argument(
        "--max-run-seconds", type=float, default=120.0, help="hard limit of the whole run"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    unknown = set(args.transports) - set(TRANSPORTS)
    if unknown or not args.transports:
        p.error(f"--transports: expected a subset of grpc,rest, got {','.join(args.transports)}")
    for name in ("get_calls", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("watch_changes", "watch_warmup", "warmup"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    async def bounded() -> dict[str, Any]:
        # SIGTERM unwinds like Ctrl-C: the WMS is stopped and its data directory removed.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        async with asyncio.timeout(args.max_run_seconds):
            return await run(args)

    try:
        report = asyncio.run(bounded())
    except TimeoutError:
        print(f"error: the run exceeded --max-run-seconds={args.max_run_seconds}", file=sys.stderr)
        return 1
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as exc:
        print(f"error: call failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the WMS stopped", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("terminated; the WMS stopped", file=sys.stderr)
        return 143
    print(json.dumps(report, indent=2) if args.json else render_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
