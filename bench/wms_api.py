"""Latency and throughput of the WMS gRPC API against a bare gRPC echo baseline.

What is measured, all from this process as the client, over loopback (127.0.0.1):

* ``echo``: a bare ``grpc.aio`` server (no interceptors, no protobuf: a generic handler with
  identity bytes serializers for ``/bench.Echo/Echo``) started as a subprocess of this script
  (``--echo-server`` mode). The payload is a serialized ``GetWorkflowRequest``, so it has exactly
  the size of the GetWorkflow request. It is the floor: what any gRPC call costs on this machine
  with this Python client.
* ``GetWorkflow``: on one workflow created before timing.
* ``CreateWorkflow``: one task, two queues (``in`` → ``out``), cluster location ``local``.

The WMS is started as ``python -m services.cli wms serve --port 0 --data-dir DIR`` (cwd = repo
root, ``EWMS_CLUSTER_LOCATIONS=local``, DIR a fresh temporary directory). Its port comes from the
JSON log line ``{"event": "wms listening", "grpc_port": N}`` on stderr and the admin token from
``DIR/admin.token``, sent as ``authorization: Bearer <token>``.

Method, per target:

1. warm-up: ``--warmup`` sequential calls;
2. latency: N sequential calls on one ``grpc.aio`` channel, each timed with
   ``time.perf_counter_ns`` (p50, p99, mean);
3. throughput: C concurrent callers on the same channel for a fixed duration; calls completed
   divided by the wall time, in calls/s.

Latency and throughput are split into ``--rounds`` rounds; each round runs every target, in a
rotated order, so that the noise of a small shared machine falls on all targets alike and the
ratios stay meaningful. Every phase has a time budget (a phase that runs out reports the samples
it got), every call has a ``timeout=`` and the whole run has a hard limit (``--max-run-seconds``).

The figures checked: ``GetWorkflow p50 / echo p50 <= 2.0`` and ``CreateWorkflow p50 <= 10 ms``.
A failed check is a result, not an error: the exit code is 0 unless something went wrong (a
server did not start, a call failed, the run exceeded its limit), then it is 1. Servers are
always terminated and the data directory removed.

Usage: ``python bench/wms_api.py`` (``--help`` for the knobs, ``--json`` for machine output,
``--targets echo`` to run the baseline alone).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

SCRIPT = Path(__file__).resolve()
REPO_ROOT = SCRIPT.parents[1]
GEN_DIR = REPO_ROOT / "gen"

# Until the package is pip-installed, the generated code is importable from gen/ only.
try:
    from ewms.v1 import workflow_service_pb2, workflow_service_pb2_grpc
except ImportError:
    sys.path.insert(0, str(GEN_DIR))
    from ewms.v1 import workflow_service_pb2, workflow_service_pb2_grpc
sys.path.insert(0, str(REPO_ROOT))
from wms_process import one_task_workflow  # noqa: E402

ECHO_METHOD = "/bench.Echo/Echo"
SERVER_START_DEADLINE_S = 30.0
SERVER_STOP_GRACE_S = 10.0
STDERR_LINES_KEPT = 200
GET_P50_RATIO_TARGET = 2.0
CREATE_P50_MS_TARGET = 10.0
# Shape of "WF-<hex epoch seconds>-<8 hex>", used for the echo payload when no WMS runs.
PLACEHOLDER_WORKFLOW_ID = "WF-00000000-00000000"

CREATE_WORKFLOW_REQUEST = one_task_workflow("cp {{INFILE}} {{OUTFILE}}", n_workers=1)

Call = Callable[[], Awaitable[object]]


class BenchError(Exception):
    """A failure that makes the run's figures meaningless (exit code 1)."""


# --------------------------------------------------------------------------------------------
# Echo server mode


async def serve_echo() -> None:
    """Serve ``/bench.Echo/Echo`` on 127.0.0.1:0, print the port on stdout, stop on SIGTERM."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    # No serializers: requests and responses stay raw bytes.
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(port, flush=True)
    await stop.wait()
    await server.stop(1.0)


# --------------------------------------------------------------------------------------------
# Server subprocesses


@dataclass
class ServerProcess:
    """A server subprocess, the tail of its output and the task that drains it."""

    name: str
    proc: asyncio.subprocess.Process
    lines: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_LINES_KEPT)
    )
    drain_task: asyncio.Task[None] | None = None

    def output_tail(self, n: int = 40) -> str:
        return "\n".join(list(self.lines)[-n:]) or "(no output)"

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; always reaps the process."""
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), SERVER_STOP_GRACE_S)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.drain_task is not None:
            self.drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.drain_task


async def _drain_lines(
    server: ServerProcess, stream: asyncio.StreamReader, on_line: Callable[[str], None]
) -> None:
    """Read a stream to EOF, line by line, so the child never blocks on a full pipe.

    Reads chunks rather than ``readline()``, which fails on lines longer than the stream limit.
    """
    pending = b""
    while chunk := await stream.read(65536):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace").rstrip()
            server.lines.append(line)
            on_line(line)
    if pending:
        line = pending.decode(errors="replace").rstrip()
        server.lines.append(line)
        on_line(line)


async def _start_server(
    name: str,
    argv: Sequence[str],
    env: dict[str, str],
    port_from_line: Callable[[str], int | None],
    read_stdout: bool,
) -> tuple[ServerProcess, int]:
    """Start ``argv`` and wait until ``port_from_line`` finds the port in its output."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=REPO_ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE if read_stdout else asyncio.subprocess.DEVNULL,
        # With stdout read, stderr joins it so that a failure to start shows its traceback.
        stderr=asyncio.subprocess.STDOUT if read_stdout else asyncio.subprocess.PIPE,
    )
    server = ServerProcess(name, proc)
    port_found: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_line(line: str) -> None:
        if not port_found.done() and (port := port_from_line(line)) is not None:
            port_found.set_result(port)

    async def drain() -> None:
        stream = proc.stdout if read_stdout else proc.stderr
        assert stream is not None
        await _drain_lines(server, stream, on_line)
        if not port_found.done():
            code = await proc.wait()
            port_found.set_exception(
                BenchError(
                    f"{name} exited with code {code} before reporting its port; output:\n"
                    f"{server.output_tail()}"
                )
            )

    server.drain_task = asyncio.create_task(drain())
    try:
        port = await asyncio.wait_for(port_found, SERVER_START_DEADLINE_S)
    except TimeoutError:
        await server.stop()
        raise BenchError(
            f"{name} did not report its port within {SERVER_START_DEADLINE_S:.0f} s; output:\n"
            f"{server.output_tail()}"
        ) from None
    except BaseException:
        await server.stop()
        raise
    return server, port


def _echo_port(line: str) -> int | None:
    return int(line) if line.strip().isdigit() else None


def _wms_port(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("event") != "wms listening":
        return None
    port = record.get("grpc_port")
    return port if isinstance(port, int) and not isinstance(port, bool) else None


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if str(GEN_DIR) in sys.path:
        # This process imports ewms.v1 from gen/; so must the children.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GEN_DIR), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


async def start_echo_server() -> tuple[ServerProcess, int]:
    """Start this script in ``--echo-server`` mode; its port is the first line of its stdout."""
    argv = [sys.executable, str(SCRIPT), "--echo-server"]
    return await _start_server("echo server", argv, _child_env(), _echo_port, read_stdout=True)


async def start_wms(data_dir: Path) -> tuple[ServerProcess, int, str]:
    """Start the WMS; return it, its gRPC port and the admin token."""
    argv = [sys.executable, "-m", "services.cli", "wms", "serve", "--port", "0", "--http-port", "0"]
    argv += ["--data-dir", str(data_dir)]
    env = _child_env({"EWMS_CLUSTER_LOCATIONS": "local"})
    deadline = time.monotonic() + SERVER_START_DEADLINE_S
    server, port = await _start_server("WMS", argv, env, _wms_port, read_stdout=False)
    token_file = data_dir / "admin.token"
    # The contract has the token in place once the server listens; the wait is only a margin.
    while not token_file.exists():
        if time.monotonic() > deadline or server.proc.returncode is not None:
            await server.stop()
            raise BenchError(
                f"WMS is listening but {token_file} does not exist; output:\n{server.output_tail()}"
            )
        await asyncio.sleep(0.05)
    token = token_file.read_text().strip()
    if not token:
        await server.stop()
        raise BenchError(f"{token_file} is empty")
    return server, port, token


def call_failed(what: str, server: ServerProcess, exc: grpc.aio.AioRpcError) -> BenchError:
    """A failed call as an error that shows the server's last output."""
    return BenchError(
        f"{what} failed: {exc.code().name}: {exc.details()}\n"
        f"{server.name} output (tail):\n{server.output_tail()}"
    )


async def open_channel(
    stack: contextlib.AsyncExitStack, port: int, wait_s: float
) -> grpc.aio.Channel:
    """A connected channel to 127.0.0.1:``port``, closed when ``stack`` unwinds."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stack.push_async_callback(channel.close, None)
    try:
        await asyncio.wait_for(channel.channel_ready(), wait_s)
    except TimeoutError:
        raise BenchError(f"no gRPC connection to 127.0.0.1:{port} within {wait_s} s") from None
    return channel


# --------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Target:
    """One thing to measure and what was measured of it."""

    name: str
    call: Call
    server: ServerProcess
    latency_calls: int
    samples_ns: list[int] = field(default_factory=list)
    throughput_calls: int = 0
    throughput_ns: int = 0

    def summary(self) -> dict[str, float | int]:
        ordered = sorted(self.samples_ns)
        n = len(ordered)
        if n == 0:
            raise BenchError(f"{self.name}: no latency sample within the time budget")

        def quantile_us(q: float) -> float:
            # Nearest rank: the smallest sample with at least q of the samples at or below it.
            return ordered[max(0, math.ceil(q * n) - 1)] / 1000

        return {
            "n": n,
            "p50_us": quantile_us(0.50),
            "p99_us": quantile_us(0.99),
            "mean_us": sum(ordered) / n / 1000,
            "throughput_per_s": (
                self.throughput_calls / (self.throughput_ns / 1e9) if self.throughput_ns else 0.0
            ),
            "throughput_calls": self.throughput_calls,
        }


async def warm_up(target: Target, calls: int, budget_s: float) -> None:
    deadline = time.perf_counter() + budget_s
    for _ in range(calls):
        if time.perf_counter() > deadline:
            break
        await target.call()


async def measure_latency(target: Target, calls: int, budget_s: float) -> None:
    deadline_ns = time.perf_counter_ns() + int(budget_s * 1e9)
    for _ in range(calls):
        start = time.perf_counter_ns()
        if start > deadline_ns:
            break
        await target.call()
        target.samples_ns.append(time.perf_counter_ns() - start)


async def measure_throughput(target: Target, concurrency: int, seconds: float) -> None:
    start = time.perf_counter_ns()
    end = start + int(seconds * 1e9)
    completed = 0

    async def caller() -> None:
        nonlocal completed
        while time.perf_counter_ns() < end:
            await target.call()
            completed += 1

    # A TaskGroup, not gather: one failed caller cancels the others.
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(caller())
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    target.throughput_calls += completed
    target.throughput_ns += time.perf_counter_ns() - start


async def measure(targets: list[Target], args: argparse.Namespace) -> None:
    """Warm every target up, then interleave latency and throughput rounds across targets."""
    phase_budget = args.latency_budget / args.rounds
    for target in targets:
        await _phase(target, "warm-up", warm_up(target, args.warmup, phase_budget))
    for r in range(args.rounds):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]
        for target in order:
            share = target.latency_calls // args.rounds
            share += 1 if r < target.latency_calls % args.rounds else 0
            await _phase(target, "latency", measure_latency(target, share, phase_budget))
        for target in order:
            seconds = args.duration / args.rounds
            await _phase(
                target, "throughput", measure_throughput(target, args.concurrency, seconds)
            )


async def _phase(target: Target, phase: str, work: Awaitable[None]) -> None:
    try:
        await work
    except grpc.aio.AioRpcError as exc:
        raise call_failed(f"{target.name} ({phase})", target.server, exc) from exc


# --------------------------------------------------------------------------------------------
# Report


def checks(results: dict[str, dict[str, float | int]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if "echo" in results and "GetWorkflow" in results:
        ratio = results["GetWorkflow"]["p50_us"] / results["echo"]["p50_us"]
        found.append(
            {
                "name": "GetWorkflow p50 / echo p50",
                "value": round(ratio, 3),
                "unit": "",
                "target": GET_P50_RATIO_TARGET,
                "pass": ratio <= GET_P50_RATIO_TARGET,
            }
        )
    if "CreateWorkflow" in results:
        ms = results["CreateWorkflow"]["p50_us"] / 1000
        found.append(
            {
                "name": "CreateWorkflow p50",
                "value": round(ms, 3),
                "unit": "ms",
                "target": CREATE_P50_MS_TARGET,
                "pass": ms <= CREATE_P50_MS_TARGET,
            }
        )
    return found


def render_table(report: dict[str, Any]) -> str:
    out = [
        f"# {report['date']}  {report['machine']}",
        f"# command: {report['command']}",
        f"# concurrency {report['settings']['concurrency']}, "
        f"echo/GetWorkflow payload {report['settings']['payload_bytes']} bytes",
        "",
        f"{'target':<16}{'n':>6}{'p50 µs':>11}{'p99 µs':>11}{'mean µs':>11}{'calls/s':>11}",
    ]
    for name, r in report["results"].items():
        out.append(
            f"{name:<16}{r['n']:>6}{r['p50_us']:>11.1f}{r['p99_us']:>11.1f}"
            f"{r['mean_us']:>11.1f}{r['throughput_per_s']:>11.0f}"
        )
    out.append("")
    for c in report["checks"]:
        unit = f" {c['unit']}" if c["unit"] else ""
        verdict = "PASS" if c["pass"] else "FAIL"
        out.append(
            f"{c['name']} = {c['value']:.2f}{unit} (target <= {c['target']:g}{unit}): {verdict}"
        )
    return "\n".join(out)


def machine_description() -> str:
    return (
        f"{os.cpu_count()} cpus, {platform.platform(terse=True)}, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}"
    )


# --------------------------------------------------------------------------------------------
# Run


async def wms_targets(
    stack: contextlib.AsyncExitStack, args: argparse.Namespace
) -> tuple[list[Target], bytes]:
    """Start the WMS, create the workflow to read; return its targets and a GetWorkflow request."""
    timeout = args.call_timeout
    data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ewms-bench-")))
    wms, port, token = await start_wms(data_dir)
    # Registered after the tempdir, so the server stops before its data dir is removed.
    stack.push_async_callback(wms.stop)
    channel = await open_channel(stack, port, timeout)
    stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)
    create_request = json_format.ParseDict(
        CREATE_WORKFLOW_REQUEST, workflow_service_pb2.CreateWorkflowRequest()
    )
    try:
        created = await stub.CreateWorkflow(create_request, metadata=metadata, timeout=timeout)
        workflow_id = created.workflow.workflow_id
        get_request = workflow_service_pb2.GetWorkflowRequest(workflow_id=workflow_id)
        fetched = await stub.GetWorkflow(get_request, metadata=metadata, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise call_failed("setup (CreateWorkflow, then GetWorkflow)", wms, exc) from exc
    if not workflow_id or fetched.workflow_id != workflow_id:
        raise BenchError(f"GetWorkflow({workflow_id!r}) returned {fetched.workflow_id!r}")

    async def get_workflow() -> object:
        return await stub.GetWorkflow(get_request, metadata=metadata, timeout=timeout)

    async def create_workflow() -> object:
        return await stub.CreateWorkflow(create_request, metadata=metadata, timeout=timeout)

    targets = []
    if "get" in args.targets:
        targets.append(Target("GetWorkflow", get_workflow, wms, args.get_calls))
    if "create" in args.targets:
        targets.append(Target("CreateWorkflow", create_workflow, wms, args.create_calls))
    return targets, get_request.SerializeToString()


async def echo_target(
    stack: contextlib.AsyncExitStack, args: argparse.Namespace, payload: bytes
) -> Target:
    """Start the echo server; return its target, which sends ``payload`` and checks the reply."""
    server, port = await start_echo_server()
    stack.push_async_callback(server.stop)
    channel = await open_channel(stack, port, args.call_timeout)
    # No serializers: raw bytes both ways.
    echo_rpc = channel.unary_unary(ECHO_METHOD, None, None)

    async def echo() -> object:
        reply = await echo_rpc(payload, timeout=args.call_timeout)
        if reply != payload:
            raise BenchError("the echo server returned a different payload")
        return reply

    return Target("echo", echo, server, args.echo_calls)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the servers the targets need, measure, stop them; return the report."""
    targets: list[Target] = []
    payload = workflow_service_pb2.GetWorkflowRequest(
        workflow_id=PLACEHOLDER_WORKFLOW_ID
    ).SerializeToString()
    async with contextlib.AsyncExitStack() as stack:
        if {"get", "create"} & set(args.targets):
            targets, payload = await wms_targets(stack, args)
        if "echo" in args.targets:
            targets.insert(0, await echo_target(stack, args, payload))
        await measure(targets, args)

    results = {t.name: t.summary() for t in targets}
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "command": shlex.join(["python", "bench/wms_api.py", *sys.argv[1:]]),
        "settings": {
            "warmup": args.warmup,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "throughput_seconds": args.duration,
            "call_timeout_s": args.call_timeout,
            "payload_bytes": len(payload),
        },
        "results": results,
        "checks": checks(results),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="p50/p99 latency and throughput of the WMS gRPC API vs a bare gRPC echo.",
    )
    p.add_argument("--echo-server", action="store_true", help="run as the echo server (internal)")
    p.add_argument(
        "--targets",
        type=lambda s: [t for t in s.split(",") if t],
        default=["echo", "get", "create"],
        help="comma-separated subset of echo,get,create (default: all)",
    )
    p.add_argument("--echo-calls", type=int, default=2000, help="latency calls, echo")
    p.add_argument("--get-calls", type=int, default=2000, help="latency calls, GetWorkflow")
    p.add_argument("--create-calls", type=int, default=1000, help="latency calls, CreateWorkflow")
    p.add_argument("--warmup", type=int, default=200, help="warm-up calls per target")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent callers, throughput")
    p.add_argument(
        "--duration", type=float, default=3.0, help="throughput seconds per target, all rounds"
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument(
        "--latency-budget",
        type=float,
        default=12.0,
        help="max seconds of latency calls per target (also of warm-up); fewer samples if hit",
    )
    p.add_argument("--call-timeout", type=float, default=5.0, help="timeout of each call, s")
    p.add_argument(
        "--max-run-seconds", type=float, default=110.0, help="hard limit of the whole run"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    unknown = set(args.targets) - {"echo", "get", "create"}
    if unknown or not args.targets:
        p.error(f"--targets: expected a subset of echo,get,create, got {','.join(args.targets)}")
    for name in ("echo_calls", "get_calls", "create_calls", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.echo_server:
        asyncio.run(serve_echo())
        return 0

    async def bounded() -> dict[str, Any]:
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
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    print(json.dumps(report, indent=2) if args.json else render_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
