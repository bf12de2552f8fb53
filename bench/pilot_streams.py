"""Thousands of pilot streams against one WMS: is every pilot welcomed and kept, and does a
WatchWorkflow client still see changes at once?

The WMS runs as a subprocess (``python -P -m services.cli wms serve --port 0 --http-port 0
--data-dir DIR``, ``EWMS_CLUSTER_LOCATIONS=local``, DIR a fresh temporary directory; ``-P`` and
``PYTHONPATH`` so that ``--wms-root`` can run another checkout's WMS). This process sets up and
observes; the pilots live in ``--clients`` other processes (this script in ``--client`` mode), so
that neither the load nor its measurement is bounded by one Python event loop.

Set-up, as a real deployment does it: a workflow of two tasks at ``local``, one of N workers (the
load) and one of 1 worker (the probe); this process then plays the location's TMS on a real
``TaskManagerService.Connect`` stream (a TMS token minted with the data directory's secret, as
``ewms token create`` does): it receives the two ``StartTaskforce`` commands, confirms each
(``submitted``, cluster ids 1 and 2) and reports every worker ``JOB_STATE_RUNNING`` in one full
snapshot. The pilot tokens are the ones the commands carry.

Load: each simulated pilot opens its own channel (``grpc.use_local_subchannel_pool``: its own TCP
connection, as pilots on different hosts have) and a ``PilotService.Connect`` stream, stream i at
``t0 + i / --connect-rate``; sends its hello (worker ``1.<i>``) and waits up to
``--welcome-timeout`` for the welcome (then it gives up and cancels: "not welcomed"); sends the
phases STARTED, AWAITING_FIRST_EVENT, TASKING; then, on a fixed schedule with a random offset per
pilot, one status every ``--status-interval`` seconds (counters growing) and one batch of
``--events-per-batch`` task lifecycle events every ``--events-interval`` seconds, until the
steady window ends. The steady window starts 5 s after the last stream was opened and lasts
``--duration`` s. Then every pilot sends a final status within 1 s: a phase from TASKING,
DRAINING, DONE, FATAL_ERROR, AWAITING_FIRST_EVENT by its index, its final counters, and for
FATAL_ERROR a last error (one of three texts). A stream that ends before the run closes it is
"dropped".

Measured per N:

* streams welcomed, not welcomed, dropped; connect time (stream opened to welcome read) p50, max;
* WMS CPU (``/proc/<pid>/stat``, all threads) over the steady window per status message and per
  message (statuses and task-event batches), and as a share of one core; WMS RSS: the largest
  ``VmRSS`` sampled every second, and ``VmHWM`` at the end;
* watch latency: an admin ``WatchWorkflow`` stream and a probe pilot (its own taskforce) in this
  process; during the steady window the probe sends a status with
  ``counters.events_received`` = a sequence number, and the latency is from just before the write
  to the arrival of the first watch message whose probe taskforce shows that number; the next
  change goes 150-250 ms after one is seen; a change unseen after 10 s is "missed";
* consistency: once the final statuses are sent, the load taskforce as stored (``GetTaskforce``)
  and as last sent by the watch must show exactly the compound statuses (job state x pilot phase
  counts), counters (sums) and top task errors the pilots sent (up to ``--settle-timeout``);
* the clients: their CPU, event-loop lag (a 50 ms sleep's overshoot) and how late the scheduled
  sends went out (slip), so that a client bottleneck shows.

Targets (the issue's, at N = 2,000): every stream welcomed, none dropped, WMS RSS <= 1 GiB,
watch p99 <= 100 ms; each N's verdicts are printed. A FAIL is a result (exit 0); the exit code is
1 only when the run itself failed (the WMS did not start, set-up failed, a client crashed, the
time limit), with the reason on stderr. Every process started is stopped and the data directory
removed.

Usage: ``python bench/pilot_streams.py --n 250,1000,2000,4000 --duration 60`` (``--json`` for
machine output, ``--help`` for the knobs).
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
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

# wms_api puts the repo root, and gen/ when ewms.v1 is not installed, on the path.
import grpc  # noqa: E402
from google.protobuf import json_format  # noqa: E402
from wms_api import (  # noqa: E402
    BenchError,
    ServerProcess,
    _start_server,
    _wms_port,
    machine_description,
)
from wms_process import one_task_workflow  # noqa: E402

from ewms.v1 import (  # noqa: E402
    pilot_service_pb2,
    pilot_service_pb2_grpc,
    task_manager_service_pb2,
    task_manager_service_pb2_grpc,
    taskforce_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import Role, TokenAuthority, load_or_create_secret  # noqa: E402
from services.events.grpc_client import channel_options  # noqa: E402

REPO_ROOT = BENCH_DIR.parent
SCRIPT = Path(__file__).resolve()
PS = pilot_service_pb2
TMS = task_manager_service_pb2
WS = workflow_service_pb2
Phase = taskforce_pb2.PilotPhase
RUNNING = taskforce_pb2.JOB_STATE_RUNNING
LOAD_CLUSTER, PROBE_CLUSTER = 1, 2
FINAL_PHASES = (
    Phase.PILOT_PHASE_TASKING,
    Phase.PILOT_PHASE_DRAINING,
    Phase.PILOT_PHASE_DONE,
    Phase.PILOT_PHASE_FATAL_ERROR,
    Phase.PILOT_PHASE_AWAITING_FIRST_EVENT,
)
START_PHASES = (
    Phase.PILOT_PHASE_STARTED,
    Phase.PILOT_PHASE_AWAITING_FIRST_EVENT,
    Phase.PILOT_PHASE_TASKING,
)
# Streams per client process when --clients is not given.
STREAMS_PER_CLIENT = 500
# The steady window starts this long after the last stream was opened.
RAMP_MARGIN_S = 5.0
FINAL_SPREAD_S = 1.0
PROBE_GAP_S = (0.15, 0.25)
PROBE_TIMEOUT_S = 10.0
LAG_TICK_S = 0.05
SAMPLE_EVERY_S = 1.0
CALL_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 60.0
TOKEN_TTL_S = 24 * 3600
RESULT_LINE_LIMIT = 64 * 1024 * 1024
WATCH_P99_TARGET_MS = 100.0
RSS_TARGET_MIB = 1024.0
TICKS = os.sysconf("SC_CLK_TCK")
# One TCP connection per pilot, as pilots on different hosts have.
PILOT_CHANNEL_OPTIONS = [*channel_options(), ("grpc.use_local_subchannel_pool", 1)]


@dataclass
class LoadConfig:
    """One run's knobs (see ``--help``)."""

    n: int
    duration: float = 300.0
    connect_rate: float = 200.0
    status_interval: float = 5.0
    events_interval: float = 12.0
    events_per_batch: int = 4
    clients: int = 0
    welcome_timeout: float = 30.0
    settle_timeout: float = 60.0
    wms_root: str = str(REPO_ROOT)
    wms_profile: str = ""

    def n_clients(self) -> int:
        return self.clients or max(1, math.ceil(self.n / STREAMS_PER_CLIENT))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": quantile(values, 0.5),
        "p99": quantile(values, 0.99),
        "max": max(values, default=0.0),
    }


# --------------------------------------------------------------------------------------------
# What a pilot sends (the clients build it; the checker derives the expected result from it)


def counters_at(cycle: int) -> taskforce_pb2.TaskCounters:
    """A pilot's counters after ``cycle`` status periods (monotone in ``cycle``)."""
    return taskforce_pb2.TaskCounters(
        events_received=2 * cycle,
        tasks_succeeded=2 * cycle - cycle // 10,
        tasks_failed=cycle // 10,
        events_published=2 * cycle,
    )


def final_status(index: int, cycle: int) -> PS.PilotStatus:
    """Pilot ``index``'s last status: its final phase, counters and error."""
    phase = FINAL_PHASES[index % len(FINAL_PHASES)]
    error = f"bench failure {index % 3}" if phase == Phase.PILOT_PHASE_FATAL_ERROR else ""
    status = PS.PilotStatus(phase=phase, counters=counters_at(cycle), last_error=error)
    status.timestamp.GetCurrentTime()
    return status


def status_message(phase: int, cycle: int) -> PS.PilotServiceConnectRequest:
    status = PS.PilotStatus(phase=phase, counters=counters_at(cycle))
    status.timestamp.GetCurrentTime()
    return PS.PilotServiceConnectRequest(status=status)


def events_message(worker_id: str, first: int, n: int) -> PS.PilotServiceConnectRequest:
    """A batch of ``n`` lifecycle events: tasks started and finished in turn."""
    batch = PS.TaskLifecycleEvents()
    for k in range(first, first + n):
        event = batch.events.add(event_id=f"{worker_id}-{k // 2}")
        if k % 2:
            event.kind = PS.TASK_EVENT_KIND_FINISHED
            event.metrics.wall_seconds = 1.5
            event.metrics.cpu_seconds = 1.2
        else:
            event.kind = PS.TASK_EVENT_KIND_STARTED
        event.timestamp.GetCurrentTime()
    return PS.PilotServiceConnectRequest(task_events=batch)


# --------------------------------------------------------------------------------------------
# Client mode: a share of the pilots in one process


@dataclass
class PilotRecord:
    """One simulated pilot's outcome, as its client reports it."""

    index: int
    worker_id: str
    outcome: str = "not started"  # ok | no welcome: ... | dropped: ...
    connect_ms: float | None = None
    final: dict[str, Any] | None = None


@dataclass
class ClientCounts:
    status_in_window: int = 0
    batches_in_window: int = 0
    messages: int = 0
    slips_ms: list[float] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)


class Client:
    """The pilots of one client process, on the timeline its config gives."""

    def __init__(self, cfg: dict[str, Any], t0: float) -> None:
        self.cfg = cfg
        self.t0 = t0
        self.steady_start = t0 + cfg["steady_start"]
        self.steady_end = t0 + cfg["steady_end"]
        self.metadata = bearer(cfg["token"])
        self.closing = asyncio.Event()
        self.counts = ClientCounts()
        self.records = [PilotRecord(i, w) for i, w in cfg["workers"]]
        self.cpu_window = 0.0

    def in_window(self, t: float) -> bool:
        return self.steady_start <= t < self.steady_end

    async def write(self, call: Any, msg: PS.PilotServiceConnectRequest, at: float) -> None:
        await call.write(msg)
        self.counts.messages += 1
        if self.in_window(at):
            if msg.HasField("status"):
                self.counts.status_in_window += 1
            else:
                self.counts.batches_in_window += 1

    async def pilot(self, rec: PilotRecord, final_sent: asyncio.Queue[None]) -> None:
        """One pilot's stream, from opening to the close the run asks for."""
        cfg = self.cfg
        await asyncio.sleep(max(0.0, self.t0 + rec.index / cfg["connect_rate"] - time.time()))
        channel = grpc.aio.insecure_channel(cfg["address"], options=PILOT_CHANNEL_OPTIONS)
        call = pilot_service_pb2_grpc.PilotServiceStub(channel).Connect(metadata=self.metadata)
        try:
            await self._run(rec, call, final_sent)
        finally:
            call.cancel()
            await channel.close()

    async def _run(self, rec: PilotRecord, call: Any, final_sent: asyncio.Queue[None]) -> None:
        cfg = self.cfg
        hello = PS.PilotHello(
            taskforce_uuid=cfg["taskforce_uuid"],
            worker_id=rec.worker_id,
            host=socket.gethostname(),
            pilot_version="bench",
        )
        opened = time.perf_counter()
        try:
            await call.write(PS.PilotServiceConnectRequest(hello=hello))
            first = await asyncio.wait_for(call.read(), cfg["welcome_timeout"])
        except TimeoutError:
            rec.outcome = f"no welcome: none within {cfg['welcome_timeout']:g} s"
            final_sent.put_nowait(None)
            return
        except grpc.aio.AioRpcError as exc:
            rec.outcome = f"no welcome: {exc.code().name}: {exc.details()}"
            final_sent.put_nowait(None)
            return
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "welcome":
            rec.outcome = f"no welcome: got {first!r}"
            final_sent.put_nowait(None)
            return
        rec.connect_ms = (time.perf_counter() - opened) * 1000
        rec.outcome = "ok"
        reader = asyncio.create_task(self._read(call))
        try:
            await self._talk(rec, call, reader)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            rec.outcome = f"dropped: write failed: {exc}"
        finally:
            final_sent.put_nowait(None)
        if rec.outcome == "ok":
            await self.closing.wait()
            if reader.done():
                rec.outcome = f"dropped: {reader.result()}"
                return
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await call.done_writing()
                    end = await reader
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                rec.outcome = f"close failed: {exc!r}"
                return
            if end != "OK":
                rec.outcome = f"close failed: {end}"
        else:
            reader.cancel()

    async def _talk(self, rec: PilotRecord, call: Any, reader: asyncio.Task[str]) -> None:
        """Start-up phases, the periodic statuses and batches, then the final status."""
        cfg = self.cfg
        now = time.time()
        for phase in START_PHASES:
            await self.write(call, status_message(phase, 0), now)
        interval, ev_interval = cfg["status_interval"], cfg["events_interval"]
        next_status = now + random.uniform(0, interval)
        next_events = now + random.uniform(0, ev_interval)
        cycle = 0
        first_event = 0
        while (due := min(next_status, next_events)) < self.steady_end:
            await asyncio.sleep(max(0.0, due - time.time()))
            if reader.done():
                rec.outcome = f"dropped: {reader.result()}"
                return
            if self.in_window(due):
                self.counts.slips_ms.append((time.time() - due) * 1000)
            if next_status <= next_events:
                cycle += 1
                await self.write(call, status_message(Phase.PILOT_PHASE_TASKING, cycle), due)
                next_status += interval
            else:
                n = cfg["events_per_batch"]
                await self.write(call, events_message(rec.worker_id, first_event, n), due)
                first_event += n
                next_events += ev_interval
        final_at = self.steady_end + random.uniform(0, FINAL_SPREAD_S)
        await asyncio.sleep(max(0.0, final_at - time.time()))
        if reader.done():
            rec.outcome = f"dropped: {reader.result()}"
            return
        status = final_status(rec.index, cycle + 1)
        await self.write(call, PS.PilotServiceConnectRequest(status=status), time.time())
        rec.final = json_format.MessageToDict(status, preserving_proto_field_name=True)

    async def _read(self, call: Any) -> str:
        """Read the stream to its end; how it ended ("OK" when the WMS closed it cleanly)."""
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    code = await call.code()
                    return str(code.name)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"

    async def lag_monitor(self) -> None:
        """How late the event loop wakes up from a short sleep, during the steady window."""
        while True:
            started = time.perf_counter()
            await asyncio.sleep(LAG_TICK_S)
            if self.in_window(time.time()):
                self.counts.lags_ms.append((time.perf_counter() - started - LAG_TICK_S) * 1000)

    async def cpu_meter(self) -> None:
        """This process's CPU seconds over the steady window."""
        await asyncio.sleep(max(0.0, self.steady_start - time.time()))
        before = sum(os.times()[:2])
        await asyncio.sleep(max(0.0, self.steady_end - time.time()))
        self.cpu_window = sum(os.times()[:2]) - before


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def client_main() -> None:
    """``--client``: config JSON on the first stdin line, then ``go <t0>``, then ``close``;
    progress and the result as JSON lines on stdout."""
    loop = asyncio.get_running_loop()
    cfg = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    emit({"event": "ready"})
    go = (await loop.run_in_executor(None, sys.stdin.readline)).split()
    client = Client(cfg, float(go[1]))
    final_sent: asyncio.Queue[None] = asyncio.Queue()
    pilots = [asyncio.create_task(client.pilot(rec, final_sent)) for rec in client.records]
    helpers = [asyncio.create_task(client.lag_monitor()), asyncio.create_task(client.cpu_meter())]
    for _ in pilots:
        await final_sent.get()
    emit({"event": "final_sent", "finals": [r.final for r in client.records]})
    await loop.run_in_executor(None, sys.stdin.readline)  # "close"
    client.closing.set()
    await asyncio.gather(*pilots)
    helpers[0].cancel()
    await helpers[1]
    c = client.counts
    emit(
        {
            "event": "result",
            "pilots": [asdict(r) for r in client.records],
            "status_in_window": c.status_in_window,
            "batches_in_window": c.batches_in_window,
            "messages": c.messages,
            "slip_ms": summary(c.slips_ms),
            "lag_ms": summary(c.lags_ms),
            "cpu_window_s": client.cpu_window,
            "cpu_total_s": sum(os.times()[:2]),
        }
    )


# --------------------------------------------------------------------------------------------
# The observing side: WMS, TMS, watch, probe


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


async def start_wms(
    data_dir: Path, wms_root: str, profile: str = ""
) -> tuple[ServerProcess, int, str]:
    """The WMS of ``wms_root`` on a free port (under cProfile, writing ``profile``, if given); its
    process, port and admin token."""
    argv = [sys.executable, "-P"]
    if profile:
        argv += ["-m", "cProfile", "-o", profile]
    argv += ["-m", "services.cli", "wms", "serve", "--port", "0"]
    argv += ["--http-port", "0", "--data-dir", str(data_dir)]
    env = dict(os.environ)
    env.update(
        EWMS_CLUSTER_LOCATIONS="local",
        EWMS_QUEUE_BACKEND="embedded",
        PYTHONPATH=os.pathsep.join([wms_root, os.path.join(wms_root, "gen")]),
    )
    server, port = await _start_server("WMS", argv, env, _wms_port, read_stdout=False)
    token_file = data_dir / "admin.token"
    if not token_file.exists():
        await server.stop()
        raise BenchError(f"the WMS listens but {token_file} does not exist")
    return server, port, token_file.read_text().strip()


def workflow_request(n: int) -> WS.CreateWorkflowRequest:
    """Two tasks at local: the load (``n`` workers) and the probe (1 worker)."""
    body = one_task_workflow("cp {{INFILE}} {{OUTFILE}}", n_workers=n)
    probe = dict(body["tasks"][0], n_workers=1)
    body["tasks"].append(probe)
    return json_format.ParseDict(body, WS.CreateWorkflowRequest())


class FakeTms:
    """The location's TMS on a real TaskManagerService stream: confirms the starts it is sent and
    reports every worker running."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.call = task_manager_service_pb2_grpc.TaskManagerServiceStub(channel).Connect(
            metadata=bearer(token)
        )
        self.reader: asyncio.Task[None] | None = None

    async def start(self, taskforces: dict[str, int]) -> dict[str, str]:
        """Confirm the starts of ``taskforces`` (uuid -> cluster id); their pilot tokens."""
        hello = TMS.TmsHello(cluster_location="local", scheduler="local", tms_id="bench")
        await self.call.write(TMS.TaskManagerServiceConnectRequest(hello=hello))
        tokens: dict[str, str] = {}
        snapshot = TMS.JobStatusSnapshot()
        while len(tokens) < len(taskforces):
            msg = await asyncio.wait_for(self.call.read(), CALL_TIMEOUT_S)
            if msg is grpc.aio.EOF:
                raise BenchError("the WMS ended the TMS stream during set-up")
            if msg.WhichOneof("kind") != "start":
                continue
            tf = msg.start.taskforce
            cluster = taskforces[tf.taskforce_uuid]
            tokens[tf.taskforce_uuid] = msg.start.pilot_token
            submitted = TMS.TaskforceSubmitted(
                taskforce_uuid=tf.taskforce_uuid, cluster_id=cluster, n_workers=tf.n_workers
            )
            await self.call.write(TMS.TaskManagerServiceConnectRequest(submitted=submitted))
            status = snapshot.taskforces.add(taskforce_uuid=tf.taskforce_uuid, full=True)
            for proc in range(tf.n_workers):
                worker = status.workers.add(worker_id=f"{cluster}.{proc}", job_state=RUNNING)
                worker.timestamp.GetCurrentTime()
        await self.call.write(TMS.TaskManagerServiceConnectRequest(snapshot=snapshot))
        self.reader = asyncio.create_task(self._drain())
        return tokens

    async def _drain(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            while await self.call.read() is not grpc.aio.EOF:
                pass

    def close(self) -> None:
        self.call.cancel()
        if self.reader is not None:
            self.reader.cancel()


class Watch:
    """An admin WatchWorkflow stream: the latest of every taskforce, and when the probe's
    counter reached each value."""

    def __init__(self, channel: grpc.aio.Channel, token: str, workflow_id: str, probe: str):
        self.probe = probe
        self.latest: dict[str, taskforce_pb2.Taskforce] = {}
        self.probe_seen = 0
        self.progress = asyncio.Event()
        self.messages = 0
        stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        self.call = stub.WatchWorkflow(
            WS.WatchWorkflowRequest(workflow_id=workflow_id), metadata=bearer(token)
        )
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.call:
            self.messages += 1
            for tf in msg.taskforces:
                self.latest[tf.taskforce_uuid] = tf
                if tf.taskforce_uuid == self.probe:
                    self.probe_seen = max(self.probe_seen, tf.counters.events_received)
            self.progress.set()

    async def wait_probe(self, seq: int, within: float) -> bool:
        deadline = time.perf_counter() + within
        while self.probe_seen < seq:
            if self.task.done():
                self.task.result()
                raise BenchError("the watch stream ended")
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return False
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), remaining)
        return True

    def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


async def probe_latencies(
    channel: grpc.aio.Channel, token: str, uuid: str, watch: Watch, start: float, end: float
) -> tuple[list[float], int]:
    """The probe pilot's changes during [start, end) (epoch s): latencies (ms) and misses."""
    call = pilot_service_pb2_grpc.PilotServiceStub(channel).Connect(metadata=bearer(token))
    hello = PS.PilotHello(taskforce_uuid=uuid, worker_id=f"{PROBE_CLUSTER}.0", pilot_version="b")
    await call.write(PS.PilotServiceConnectRequest(hello=hello))
    first = await asyncio.wait_for(call.read(), CALL_TIMEOUT_S)
    if first is grpc.aio.EOF or first.WhichOneof("kind") != "welcome":
        raise BenchError(f"the probe pilot was not welcomed: {first!r}")
    latencies: list[float] = []
    missed = 0
    seq = 0
    try:
        await asyncio.sleep(max(0.0, start - time.time()))
        while time.time() < end:
            seq += 1
            status = PS.PilotStatus(
                phase=Phase.PILOT_PHASE_TASKING,
                counters=taskforce_pb2.TaskCounters(events_received=seq),
            )
            sent = time.perf_counter()
            await call.write(PS.PilotServiceConnectRequest(status=status))
            if await watch.wait_probe(seq, PROBE_TIMEOUT_S):
                latencies.append((time.perf_counter() - sent) * 1000)
            else:
                missed += 1
            await asyncio.sleep(random.uniform(*PROBE_GAP_S))
    finally:
        call.cancel()
    return latencies, missed


@dataclass
class ClientProc:
    """A client process and the JSON lines it printed."""

    proc: asyncio.subprocess.Process
    lines: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                self.lines.put_nowait(json.loads(raw))
        self.lines.put_nowait({"event": "exit"})

    async def expect(self, event: str, within: float) -> dict[str, Any]:
        try:
            record = await asyncio.wait_for(self.lines.get(), within)
        except TimeoutError:
            raise BenchError(f"a client did not say {event!r} within {within:.0f} s") from None
        if record.get("event") != event:
            code = await self.proc.wait() if record.get("event") == "exit" else None
            raise BenchError(f"a client said {record.get('event')!r} (exit {code}), not {event!r}")
        return record

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        if self.reader is not None:
            self.reader.cancel()


async def start_clients(cfg: LoadConfig, shared: dict[str, Any]) -> list[ClientProc]:
    """The client processes, each with every k-th pilot (so their opening times interleave)."""
    k = cfg.n_clients()
    clients: list[ClientProc] = []
    for c in range(k):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--client",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # A result line lists every pilot of the client.
            limit=RESULT_LINE_LIMIT,
        )
        client = ClientProc(proc)
        client.reader = asyncio.create_task(client._read())
        clients.append(client)
        workers = [[i, f"{LOAD_CLUSTER}.{i}"] for i in range(c, cfg.n, k)]
        await client.send(json.dumps(dict(shared, workers=workers)))
    for client in clients:
        await client.expect("ready", CALL_TIMEOUT_S)
    return clients


class Sampler:
    """The WMS's CPU and resident memory, once a second."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_rss_mib = 0.0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.max_rss_mib = max(self.max_rss_mib, proc_mib(self.pid, "VmRSS"))
            await asyncio.sleep(SAMPLE_EVERY_S)

    def cpu_at(self, when: float) -> asyncio.Task[float]:
        """The WMS's CPU seconds at epoch time ``when``."""

        async def read() -> float:
            await asyncio.sleep(max(0.0, when - time.time()))
            return proc_cpu_s(self.pid)

        return asyncio.create_task(read())


def expected_final(finals: list[dict[str, Any] | None], n: int) -> dict[str, Any]:
    """The load taskforce as the pilots' final statuses make it: compound statuses (every worker
    running; a pilot never welcomed counts as UNSPECIFIED), counter sums, top task errors."""
    phases: Counter[int] = Counter()
    totals: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for final in finals:
        if final is None:
            continue
        phases[Phase.Value(final["phase"])] += 1
        for name, value in final.get("counters", {}).items():
            totals[name] += int(value)
        if final.get("last_error"):
            errors[final["last_error"]] += 1
    phases[Phase.PILOT_PHASE_UNSPECIFIED] += n - sum(phases.values())
    compound = [
        taskforce_pb2.CompoundStatus(job_state=RUNNING, pilot_phase=phase, count=count)
        for phase, count in sorted(phases.items())
        if count
    ]
    return {
        "compound": compound,
        "counters": taskforce_pb2.TaskCounters(**totals),
        "errors": dict(errors),
    }


def differences(tf: taskforce_pb2.Taskforce, expected: dict[str, Any]) -> list[str]:
    out = []
    if list(tf.compound_statuses) != expected["compound"]:
        got = [(c.pilot_phase, c.job_state, c.count) for c in tf.compound_statuses]
        out.append(f"compound statuses {got}")
    if tf.counters != expected["counters"]:
        out.append(f"counters {json_format.MessageToDict(tf.counters)}")
    if dict(tf.top_task_errors) != expected["errors"]:
        out.append(f"top task errors {dict(tf.top_task_errors)}")
    return out


async def settle(
    stub: workflow_service_pb2_grpc.WorkflowServiceStub,
    token: str,
    uuid: str,
    watch: Watch,
    expected: dict[str, Any],
    within: float,
) -> tuple[bool, float, str]:
    """Wait until the stored taskforce and the watch's last message show ``expected``."""
    started = time.monotonic()
    problems: list[str] = []
    while time.monotonic() - started < within:
        stored = await stub.GetTaskforce(
            WS.GetTaskforceRequest(taskforce_uuid=uuid), metadata=bearer(token), timeout=30
        )
        problems = [f"stored: {d}" for d in differences(stored, expected)]
        watched = watch.latest.get(uuid)
        if watched is None:
            problems.append("watch: never sent the taskforce")
        else:
            problems += [f"watch: {d}" for d in differences(watched, expected)]
        if not problems:
            return True, time.monotonic() - started, ""
        await asyncio.sleep(0.2)
    return False, time.monotonic() - started, "; ".join(problems)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """One run at ``cfg.n`` streams; its report (see the module docstring)."""
    load_before = os.getloadavg()
    async with contextlib.AsyncExitStack() as stack:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ewms-streams-")))
        server, port, admin = await start_wms(data_dir, cfg.wms_root, cfg.wms_profile)
        stack.push_async_callback(server.stop)
        address = f"127.0.0.1:{port}"
        authority = TokenAuthority(load_or_create_secret(data_dir))
        channel = grpc.aio.insecure_channel(address, options=channel_options())
        stack.push_async_callback(channel.close, None)
        stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        created = await stub.CreateWorkflow(
            workflow_request(cfg.n), metadata=bearer(admin), timeout=CALL_TIMEOUT_S
        )
        load_uuid, probe_uuid = (tf.taskforce_uuid for tf in created.taskforces)
        tms = FakeTms(channel, authority.mint("bench-tms", Role.TMS, TOKEN_TTL_S, scope="local"))
        stack.callback(tms.close)
        tokens = await tms.start({load_uuid: LOAD_CLUSTER, probe_uuid: PROBE_CLUSTER})
        watch = Watch(channel, admin, created.workflow.workflow_id, probe_uuid)
        stack.callback(watch.close)

        ramp = cfg.n / cfg.connect_rate
        steady_start, steady_end = ramp + RAMP_MARGIN_S, ramp + RAMP_MARGIN_S + cfg.duration
        shared = {
            "address": address,
            "token": tokens[load_uuid],
            "taskforce_uuid": load_uuid,
            "connect_rate": cfg.connect_rate,
            "welcome_timeout": cfg.welcome_timeout,
            "status_interval": cfg.status_interval,
            "events_interval": cfg.events_interval,
            "events_per_batch": cfg.events_per_batch,
            "steady_start": steady_start,
            "steady_end": steady_end,
        }
        clients = await start_clients(cfg, shared)
        for client in clients:
            stack.push_async_callback(client.stop)
        t0 = time.time() + 0.5
        for client in clients:
            await client.send(f"go {t0}")
        say(
            f"N={cfg.n}: {len(clients)} client processes opening {cfg.n} streams over "
            f"{ramp:.1f} s; steady window {cfg.duration:g} s"
        )
        sampler = Sampler(server.proc.pid)
        stack.callback(sampler.task.cancel)
        cpu_start, cpu_end = sampler.cpu_at(t0 + steady_start), sampler.cpu_at(t0 + steady_end)
        main_cpu_start = sum(os.times()[:2])
        probe = asyncio.create_task(
            probe_latencies(
                channel, tokens[probe_uuid], probe_uuid, watch, t0 + steady_start, t0 + steady_end
            )
        )
        stack.callback(probe.cancel)
        wait_final = steady_end + FINAL_SPREAD_S + cfg.welcome_timeout + 60
        finals = []
        for client in clients:
            record = await client.expect("final_sent", wait_final - (time.time() - t0))
            finals += record["finals"]
        latencies, missed = await probe
        wms_cpu = (await cpu_end) - (await cpu_start)
        main_cpu = sum(os.times()[:2]) - main_cpu_start
        say(f"N={cfg.n}: final statuses sent; checking the taskforce")
        # Checked while every stream is still open: what the pilots sent, nothing else.
        expected = expected_final(finals, cfg.n)
        consistent, settle_s, problem = await settle(
            stub, admin, load_uuid, watch, expected, cfg.settle_timeout
        )
        say(f"N={cfg.n}: consistent: {consistent} after {settle_s:.1f} s {problem}; closing")
        for client in clients:
            await client.send("close")
        results = await asyncio.gather(*(c.expect("result", CLOSE_TIMEOUT_S + 30) for c in clients))
        pilots = [p for r in results for p in r["pilots"]]
        hwm = proc_mib(server.proc.pid, "VmHWM")
        max_rss = max(sampler.max_rss_mib, proc_mib(server.proc.pid, "VmRSS"))
    return build_report(
        cfg,
        results,
        pilots,
        {
            "wms_cpu_window_s": wms_cpu,
            "main_cpu_window_s": main_cpu,
            "latencies": latencies,
            "missed": missed,
            "watch_messages": watch.messages,
            "consistent": consistent,
            "settle_s": settle_s,
            "problem": problem,
            "max_rss_mib": max_rss,
            "hwm_mib": hwm,
            "load_before": load_before,
        },
    )


def build_report(
    cfg: LoadConfig, results: list[dict[str, Any]], pilots: list[dict[str, Any]], m: dict[str, Any]
) -> dict[str, Any]:
    outcomes = Counter(p["outcome"] for p in pilots)
    connects = [p["connect_ms"] for p in pilots if p["connect_ms"] is not None]
    statuses = sum(r["status_in_window"] for r in results)
    batches = sum(r["batches_in_window"] for r in results)
    cpu = m["wms_cpu_window_s"]
    welcomed = len(connects)
    dropped = sum(n for o, n in outcomes.items() if o.startswith(("dropped", "close failed")))
    report: dict[str, Any] = {
        "n": cfg.n,
        "config": asdict(cfg),
        "clients": len(results),
        "welcomed": welcomed,
        "not_welcomed": cfg.n - welcomed,
        "dropped": dropped,
        "outcomes": dict(outcomes.most_common(10)),
        "connect_ms": summary(connects),
        "status_messages": statuses,
        "batch_messages": batches,
        "messages_per_s": (statuses + batches) / cfg.duration,
        "wms_cpu_pct": 100 * cpu / cfg.duration,
        "wms_cpu_ms_per_status": 1000 * cpu / statuses if statuses else None,
        "wms_cpu_ms_per_message": 1000 * cpu / (statuses + batches) if statuses else None,
        "wms_max_rss_mib": m["max_rss_mib"],
        "wms_hwm_mib": m["hwm_mib"],
        "watch_ms": summary(m["latencies"]),
        "watch_missed": m["missed"],
        "watch_messages": m["watch_messages"],
        "consistent": m["consistent"],
        "settle_s": m["settle_s"],
        "inconsistency": m["problem"],
        "client_cpu_pct": 100 * sum(r["cpu_window_s"] for r in results) / cfg.duration,
        "main_cpu_pct": 100 * m["main_cpu_window_s"] / cfg.duration,
        "client_lag_ms": {
            "p99": max(r["lag_ms"]["p99"] for r in results),
            "max": max(r["lag_ms"]["max"] for r in results),
        },
        "client_slip_ms": {
            "p99": max(r["slip_ms"]["p99"] for r in results),
            "max": max(r["slip_ms"]["max"] for r in results),
        },
        "load_average": {"before": m["load_before"], "after": os.getloadavg()},
    }
    p99 = report["watch_ms"]["p99"]
    report["checks"] = {
        "every stream welcomed": welcomed == cfg.n,
        "none dropped": dropped == 0,
        f"WMS RSS <= {RSS_TARGET_MIB:g} MiB": m["max_rss_mib"] <= RSS_TARGET_MIB,
        f"watch p99 <= {WATCH_P99_TARGET_MS:g} ms": bool(m["latencies"])
        and p99 <= WATCH_P99_TARGET_MS
        and not m["missed"],
        "final state consistent": m["consistent"],
    }
    return report


def render(reports: list[dict[str, Any]], header: dict[str, Any]) -> str:
    out = [
        f"# {header['date']}  {header['machine']}",
        f"# commit {header['commit']}; command: {header['command']}",
        "",
        "|     N | welcomed | dropped | connect p50 / max ms | msgs/s | WMS CPU | "
        "CPU ms/status | RSS MiB | watch p50 / p99 / max ms | missed | consistent | "
        "clients CPU | client lag p99 ms | load avg |",
    ]
    for r in reports:
        c, w = r["connect_ms"], r["watch_ms"]
        per = r["wms_cpu_ms_per_status"]
        out.append(
            f"| {r['n']:>5} | {r['welcomed']:>8} | {r['dropped']:>7} | "
            f"{c['p50']:>8.0f} / {c['max']:>7.0f} | {r['messages_per_s']:>6.0f} | "
            f"{r['wms_cpu_pct']:>6.0f}% | {per if per is None else round(per, 3)!s:>13} | "
            f"{r['wms_max_rss_mib']:>7.0f} | {w['p50']:>6.1f} / {w['p99']:>6.1f} / "
            f"{w['max']:>6.1f} | {r['watch_missed']:>6} | {r['consistent']!s:>10} | "
            f"{r['client_cpu_pct']:>10.0f}% | {r['client_lag_ms']['p99']:>17.1f} | "
            f"{r['load_average']['before'][0]:.1f}→{r['load_average']['after'][0]:.1f} |"
        )
    for r in reports:
        failed = [name for name, ok in r["checks"].items() if not ok]
        verdict = "PASS" if not failed else "FAIL (" + ", ".join(failed) + ")"
        out.append(f"N={r['n']}: {verdict}")
        if r["inconsistency"]:
            out.append(f"  inconsistent: {r['inconsistency']}")
        if set(r["outcomes"]) - {"ok"}:
            out.append(f"  outcomes: {r['outcomes']}")
    return "\n".join(out)


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="N concurrent pilot streams against one WMS.")
    p.add_argument(
        "--n",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[2000],
        help="streams, or a comma-separated list of N for a curve (default 2000)",
    )
    p.add_argument("--duration", type=float, default=300.0, help="steady window per N, s")
    p.add_argument("--connect-rate", type=float, default=200.0, help="streams opened per s")
    p.add_argument("--status-interval", type=float, default=5.0, help="s between statuses")
    p.add_argument("--events-interval", type=float, default=12.0, help="s between event batches")
    p.add_argument("--events-per-batch", type=int, default=4, help="lifecycle events per batch")
    p.add_argument(
        "--clients",
        type=int,
        default=0,
        help=f"client processes (default: one per {STREAMS_PER_CLIENT} streams)",
    )
    p.add_argument("--welcome-timeout", type=float, default=30.0, help="s to wait for a welcome")
    p.add_argument("--settle-timeout", type=float, default=60.0, help="s for the final state")
    p.add_argument(
        "--wms-root", default=str(REPO_ROOT), help="checkout whose WMS to run (default: this one)"
    )
    p.add_argument(
        "--wms-profile",
        default="",
        help="run the WMS under cProfile (its event loop's thread) and write the stats here",
    )
    p.add_argument("--max-run-seconds", type=float, default=0.0, help="hard limit (0: derived)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.client and (not args.n or min(args.n) < 1):
        p.error("--n: expected positive integers")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client:
        asyncio.run(client_main())
        return 0
    configs = [
        LoadConfig(
            n=n,
            duration=args.duration,
            connect_rate=args.connect_rate,
            status_interval=args.status_interval,
            events_interval=args.events_interval,
            events_per_batch=args.events_per_batch,
            clients=args.clients,
            welcome_timeout=args.welcome_timeout,
            settle_timeout=args.settle_timeout,
            wms_root=args.wms_root,
            wms_profile=args.wms_profile,
        )
        for n in args.n
    ]
    limit = args.max_run_seconds or sum(
        c.n / c.connect_rate + c.duration + c.welcome_timeout + c.settle_timeout + 300
        for c in configs
    )

    async def bounded() -> list[dict[str, Any]]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        async with asyncio.timeout(limit):
            return [await run_load(c) for c in configs]

    header = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "commit": commit(),
        "command": "python bench/pilot_streams.py " + " ".join(sys.argv[1:]),
    }
    try:
        reports = asyncio.run(bounded())
    except TimeoutError:
        print(f"error: the run exceeded {limit:.0f} s", file=sys.stderr)
        return 1
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as exc:
        print(f"error: call failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything stopped", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({**header, "runs": reports}, indent=2))
    else:
        print(render(reports, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
