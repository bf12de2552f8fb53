"""Pilot throughput: tasks/s of a real pilot against the spawn ceiling of the same machine.

For N events (default 2,000) of 1 KiB, the task ``cp {{INFILE}} {{OUTFILE}}``, per runtime
(``process``, ``bwrap``), per concurrency (``EWMS_PILOT_MAX_CONCURRENT_TASKS`` = 1, 2, 4) and per
queue backend (``embedded``, ``rabbitmq``):

* ``pilot``: a fresh workflow on a WMS subprocess (``python -m services.cli wms serve``, SQLite in a
  temporary data directory); the N events are published into its input queue first; then one pilot
  (``python -m services.pilot``, ``subprocess.Popen``) configured as a TMS configures it (WMS
  address, pilot token scoped to the taskforce, status reporting on, the queue's broker and
  credentials) runs until the input queue has been empty for 1 s
  (``EWMS_PILOT_TIMEOUT_QUEUE_INCOMING``). Rate = ``succeeded / tasking_seconds`` of its final log
  line ("pilot finished": first event received to last task done). Checked: exit code 0, N
  succeeded, none failed, N events ready in the output queue, none left in the input queue.
* ``ceiling``: the same number of the same commands spawned back to back by a bare asyncio loop in
  this process (``asyncio.create_subprocess_exec``, ``concurrency`` workers in parallel, no queue),
  each copying a 1 KiB file to a new file. The argv and environment come from the pilot's own
  runtime (``make_runtime(...).launch(TaskSpec(...))``), so for bwrap it is exactly the sandbox
  command line the pilot spawns (same flags, two writable binds).

Measurements are interleaved on this noisy machine: per runtime and concurrency, ``ceiling, pilot
(backend 1), ceiling, pilot (backend 2), ceiling``; each pilot run is compared with the mean of the
two ceiling runs around it. ``--rounds N`` repeats the whole sequence; the table then shows medians.
Each pilot run also records the CPU seconds of the pilot with its tasks, of the WMS and of RabbitMQ,
and how many cores anything else kept busy meanwhile.

Peak RSS of the pilot: its ``VmHWM`` (the kernel's high-water mark of its resident set), read from
``/proc/<pid>/status`` every 0.1 s through a directory fd of ``/proc/<pid>`` (so a reused pid is
never read); the last value before it exits is its peak. ``ru_maxrss`` of ``os.wait4`` is kept in
the JSON for comparison but is not the pilot's own: Linux folds in the RSS high-water mark of the
address space the child had before ``exec`` (this process's, which spawned it) and of every child
it reaped.

Target: pilot rate >= 75% of the ceiling at every concurrency on RabbitMQ, for each runtime (the
embedded broker's ratios are reported too). A FAIL is a result (exit 0); exit 1 means the run itself
failed.

Usage: ``python bench/pilot.py [--events N] [--backends embedded,rabbitmq] [--runtimes
process,bwrap] [--concurrency 1,2,4] [--rounds R] [--workdir DIR] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "gen")]


from wms_process import RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL, Wms, one_task_workflow  # noqa: E402

from ewms.v1 import queue_pb2, workflow_service_pb2  # noqa: E402
from services.events.grpc_client import GrpcQueueClient  # noqa: E402
from services.logs import configure_logging  # noqa: E402
from services.pilot.runtimes import Mount, RuntimeOptions, TaskSpec, make_runtime  # noqa: E402

TASK_ARGS = "cp {{INFILE}} {{OUTFILE}}"
WORKFLOW = one_task_workflow(TASK_ARGS)
EVENT_SIZE = 1024
PUBLISH_BATCH = 500
IDLE_TIMEOUT = "1"  # EWMS_PILOT_TIMEOUT_QUEUE_INCOMING: exit 1 s after the queue is empty
PILOT_TIMEOUT = 900.0  # one pilot run, start to exit
CEILING_TIMEOUT = 600.0
RSS_POLL_SECONDS = 0.1
CLK_TCK = os.sysconf("SC_CLK_TCK")
RATIO_TARGET = 0.75
TARGET_BACKEND = "rabbitmq"


def host_env() -> dict[str, str]:
    """What the pilot's runtime passes its tasks from the host (run.py drops its own settings)."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("EWMS_PILOT_", "_EWMS_PILOT_"))
    }


async def delete_rabbitmq_workflows(
    workflows: list[workflow_service_pb2.CreateWorkflowResponse],
) -> None:
    """Delete the RabbitMQ users, queues (with their dead-letter queues) and exchanges of the
    workflows the run created."""
    if not workflows:
        return
    from services.wms.queues.rabbitmq import RabbitBroker

    broker = await RabbitBroker.connect(RABBITMQ_URL, RABBITMQ_MANAGEMENT_URL)
    try:
        for wf in workflows:
            await broker.delete(wf.workflow.workflow_id, list(wf.queues))
    finally:
        await broker.close()


# --- the ceiling: bare spawns -------------------------------------------------------------------


def make_launches(runtime: str, n: int, root: Path) -> list[Any]:
    """N launches of ``cp <1 KiB file> <new file>`` as the pilot's runtime builds them: the task's
    own variables, cwd = its task-io directory, and (bwrap) the task-io and data-hub binds."""
    task_io, hub = root / "task-io", root / "data-hub"
    task_io.mkdir(parents=True)
    hub.mkdir()
    infile = task_io / "infile-bench.in"
    infile.write_bytes(b"x" * EVENT_SIZE)
    rt = make_runtime(runtime, RuntimeOptions(host_env=host_env()))
    launches = []
    for i in range(n):
        outfile = task_io / f"outfile-{i}.out"
        spec = TaskSpec(
            alias="task",
            image="",
            argv=["cp", str(infile), str(outfile)],
            env={
                "EWMS_TASK_INFILE": str(infile),
                "EWMS_TASK_OUTFILE": str(outfile),
                "EWMS_TASK_OUTDIR": str(task_io / "outdir"),
                "EWMS_TASK_DATA_HUB_DIR": str(hub),
            },
            workdir=task_io,
            mounts=(Mount(task_io, str(task_io), True), Mount(hub, str(hub), True)),
            workdir_target=str(task_io),
        )
        launches.append(rt.launch(spec))
    return launches


async def run_ceiling(runtime: str, concurrency: int, n: int, tmp: Path) -> float:
    """Spawns/s: ``concurrency`` workers spawning the N launches back to back, each waiting for
    its child before the next."""
    root = Path(tempfile.mkdtemp(prefix="ceiling-", dir=tmp))
    try:
        launches = await asyncio.to_thread(make_launches, runtime, n, root)
        if runtime == "bwrap":
            # The sandbox must work here at all (the pilot probes it the same way).
            await make_runtime("bwrap", RuntimeOptions(host_env=host_env())).prepare("")
        it: Iterator[Any] = iter(launches)
        failures: list[str] = []

        async def worker() -> None:
            for launch in it:
                proc = await asyncio.create_subprocess_exec(
                    *launch.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                    cwd=launch.cwd,
                    env=launch.env,
                )
                code = await proc.wait()
                if code != 0:
                    failures.append(f"{launch.argv[0]} exited {code}")

        start = time.perf_counter()
        own, children = self_cpu_seconds(), children_cpu_seconds()
        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(concurrency))), CEILING_TIMEOUT
        )
        elapsed = time.perf_counter() - start
        print(
            f"  ceiling ({runtime} x{concurrency}): {n / elapsed:,.0f}/s; CPU ms per spawn: loop "
            f"{(self_cpu_seconds() - own) * 1000 / n:.2f}, commands "
            f"{(children_cpu_seconds() - children) * 1000 / n:.2f}",
            file=sys.stderr,
        )
        if failures:
            raise RuntimeError(f"ceiling ({runtime}): {len(failures)} spawns failed: {failures[0]}")
        copies = sum(1 for p in (root / "task-io").iterdir() if p.name.startswith("outfile-"))
        if copies != n:
            raise RuntimeError(f"ceiling ({runtime}): {copies} output files, expected {n}")
        return n / elapsed
    finally:
        await asyncio.to_thread(shutil.rmtree, root, True)


# --- the pilot ------------------------------------------------------------------------------------


@dataclass
class PilotRun:
    """One pilot process's measurement."""

    rate: float = 0.0
    tasking_seconds: float = 0.0
    wall_seconds: float = 0.0  # process start to exit (start-up, idle timeout and shutdown too)
    succeeded: int = 0
    failed: int = 0
    published: int = 0
    exit_code: int | None = None
    vmhwm_bytes: int = 0
    ru_maxrss_bytes: int = 0
    pilot_cpu_seconds: float = 0.0  # the pilot and its tasks (rusage of the reaped pilot)
    wms_cpu_seconds: float = 0.0  # the WMS of this backend
    rabbitmq_cpu_seconds: float = 0.0
    other_cores: float = 0.0  # busy CPUs not used by any of the above nor this process
    finished: dict[str, Any] = field(default_factory=dict)


def pilot_environment(
    wms: Wms,
    workflow: workflow_service_pb2.CreateWorkflowResponse,
    runtime: str,
    concurrency: int,
    data_parent: Path,
) -> dict[str, str]:
    """The pilot's environment as the TMS sets it (see tests/pilot/conftest.py)."""
    taskforce_uuid = workflow.taskforces[0].taskforce_uuid
    token = wms.pilot_token(taskforce_uuid)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EWMS_")}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "gen")]),
            "EWMS_PILOT_WMS_ADDRESS": wms.address,
            "EWMS_PILOT_TOKEN": token,
            "EWMS_PILOT_TASKFORCE_UUID": taskforce_uuid,
            "EWMS_PILOT_WORKER_ID": f"bench-{runtime}-{concurrency}",
            "EWMS_PILOT_TASK_ARGS": TASK_ARGS,
            "EWMS_PILOT_RUNTIME": runtime,
            "EWMS_PILOT_MAX_CONCURRENT_TASKS": str(concurrency),
            "EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST": str(data_parent),
            "EWMS_PILOT_TIMEOUT_QUEUE_WAIT_FOR_FIRST_MESSAGE": "60",
            "EWMS_PILOT_TIMEOUT_QUEUE_INCOMING": IDLE_TIMEOUT,
            "EWMS_PILOT_CL_LOG": "INFO",
        }
    )
    for side, alias in (("INCOMING", "in"), ("OUTGOING", "out")):
        q = next(q for q in workflow.queues if q.alias == alias)
        prefix = f"EWMS_PILOT_QUEUE_{side}"
        env[prefix] = q.queue_id
        env[f"{prefix}_MAX_ATTEMPTS"] = str(q.max_attempts)
        if wms.backend == "rabbitmq":
            env[f"{prefix}_BROKER_TYPE"] = "rabbitmq"
            user = q.credentials.username
            env[f"{prefix}_BROKER_ADDRESS"] = q.address.replace("://", f"://{user}@", 1)
            env[f"{prefix}_AUTH_TOKEN"] = q.credentials.password
        else:
            env[f"{prefix}_BROKER_TYPE"] = "embedded"
            env[f"{prefix}_BROKER_ADDRESS"] = wms.address
            env[f"{prefix}_AUTH_TOKEN"] = token
    return env


def read_vmhwm(proc_dir: int) -> int | None:
    """VmHWM in bytes through a directory fd of /proc/<pid>; None once the process is gone (or
    has exited and released its memory)."""
    try:
        fd = os.open("status", os.O_RDONLY, dir_fd=proc_dir)
    except OSError:
        return None
    try:
        text = os.read(fd, 16384).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (/proc/stat: user, nice, system, irq,
    softirq)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / CLK_TCK


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of one running process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rabbitmq_pid() -> int | None:
    """The RabbitMQ server (beam.smp) on this machine, if any."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
    return None


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def children_cpu_seconds() -> float:
    """CPU seconds of this process's reaped children."""
    t = os.times()
    return t.children_user + t.children_system


def spawn_pilot(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.pilot"],
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


def finished_record(log_path: Path) -> dict[str, Any]:
    """The pilot's final "pilot finished" log line."""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == "pilot finished":
                return record
    return {}


def log_tail(log_path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    return ""


async def run_pilot(
    wms: Wms, others: list[int], runtime: str, concurrency: int, n: int, tmp: Path
) -> PilotRun:
    """Publish N events, run one pilot until the queue is drained, check and measure it."""
    workflow = await wms.create_workflow(WORKFLOW)
    queue = {q.alias: q for q in workflow.queues}
    client = GrpcQueueClient.connect(wms.address, wms.token)
    try:
        pad = b"x" * EVENT_SIZE
        events = [
            queue_pb2.Event(payload=(b"%d:" % i + pad)[:EVENT_SIZE], content_type="text/plain")
            for i in range(n)
        ]
        for i in range(0, n, PUBLISH_BATCH):
            await client.publish(queue["in"].queue_id, events[i : i + PUBLISH_BATCH])

        data_parent = Path(tempfile.mkdtemp(prefix="pilot-", dir=tmp))
        log_path = data_parent / "pilot.log"
        env = pilot_environment(wms, workflow, runtime, concurrency, data_parent)
        run = PilotRun()
        assert wms.proc is not None
        beam = rabbitmq_pid()
        watched = [wms.proc.pid, *([beam] if beam else []), *others]
        cpu_before = [process_cpu_seconds(pid) for pid in watched]
        busy_before, self_before = busy_cpu_seconds(), self_cpu_seconds()
        started = time.perf_counter()
        proc = await asyncio.to_thread(spawn_pilot, env, log_path)
        loop = asyncio.get_running_loop()
        reaped: asyncio.Future[tuple[int, Any]] = loop.create_future()

        def reap() -> None:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            loop.call_soon_threadsafe(reaped.set_result, (proc.returncode, usage))

        proc_dir = os.open(f"/proc/{proc.pid}", os.O_RDONLY | os.O_DIRECTORY)
        threading.Thread(target=reap, name="reap-pilot", daemon=True).start()
        try:
            deadline = time.monotonic() + PILOT_TIMEOUT
            while not reaped.done():
                hwm = read_vmhwm(proc_dir)
                if hwm is not None:
                    run.vmhwm_bytes = max(run.vmhwm_bytes, hwm)
                if time.monotonic() > deadline:
                    proc.kill()
                    await reaped
                    raise RuntimeError(
                        f"pilot ({wms.backend}, {runtime}, {concurrency}) did not finish within "
                        f"{PILOT_TIMEOUT:.0f} s:\n{log_tail(log_path)}"
                    )
                await asyncio.wait({reaped}, timeout=RSS_POLL_SECONDS)
        finally:
            os.close(proc_dir)
            if not reaped.done():
                proc.kill()
                await reaped
        run.wall_seconds = time.perf_counter() - started
        busy = busy_cpu_seconds() - busy_before
        used = [process_cpu_seconds(pid) - b for pid, b in zip(watched, cpu_before, strict=True)]
        run.exit_code, usage = reaped.result()
        run.ru_maxrss_bytes = usage.ru_maxrss * 1024
        run.pilot_cpu_seconds = usage.ru_utime + usage.ru_stime
        run.wms_cpu_seconds = used[0]
        run.rabbitmq_cpu_seconds = used[1] if beam else 0.0
        ours = run.pilot_cpu_seconds + sum(used) + self_cpu_seconds() - self_before
        run.other_cores = max(0.0, busy - ours) / run.wall_seconds
        record = await asyncio.to_thread(finished_record, log_path)
        what = f"pilot ({wms.backend}, {runtime}, concurrency {concurrency})"
        if run.exit_code != 0 or not record:
            raise RuntimeError(f"{what} exited {run.exit_code}:\n{log_tail(log_path)}")
        run.finished = {k: v for k, v in record.items() if k not in ("timestamp", "level")}
        run.succeeded = int(record["succeeded"])
        run.failed = int(record["failed"])
        run.published = int(record["published"])
        run.tasking_seconds = float(record["tasking_seconds"])
        if run.succeeded != n or run.failed or run.published != n:
            raise RuntimeError(f"{what}: expected {n} succeeded and published, got {record}")
        out_stats = await client.stats(queue["out"].queue_id)
        in_stats = await client.stats(queue["in"].queue_id)
        if out_stats.ready != n or in_stats.ready or in_stats.dead_lettered:
            raise RuntimeError(
                f"{what}: output queue has {out_stats.ready} ready (expected {n}); input queue "
                f"{in_stats.ready} ready, {in_stats.dead_lettered} dead-lettered (expected 0)"
            )
        run.rate = run.succeeded / run.tasking_seconds
        await asyncio.to_thread(shutil.rmtree, data_parent, True)
        return run
    finally:
        await client.close()


# --- main ----------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    backends = [b for b in args.backends.split(",") if b]
    runtimes = [r for r in args.runtimes.split(",") if r]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    for b in backends:
        if b not in ("embedded", "rabbitmq"):
            raise ValueError(f"unknown backend {b!r}")
    for r in runtimes:
        if r not in ("process", "bwrap"):
            raise ValueError(f"unknown runtime {r!r}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-pilot-", dir=args.workdir))
    servers: dict[str, Wms] = {}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for runtime in runtimes:  # fail fast: the runtime must accept the work directory
            await asyncio.to_thread(make_launches, runtime, 1, tmp / f"preflight-{runtime}")
        for backend in backends:
            servers[backend] = Wms(backend, prefix="bench-pilot")
            await servers[backend].start()
        samples: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        for round_no in range(1, args.rounds + 1):
            for runtime in runtimes:
                for concurrency in levels:
                    label = f"[round {round_no}] {runtime} x{concurrency}"
                    before = await run_ceiling(runtime, concurrency, args.events, tmp)
                    print(f"{label}: ceiling {before:,.0f}/s", file=sys.stderr)
                    for backend in backends:
                        others = [s.proc.pid for b, s in servers.items() if b != backend and s.proc]
                        run = await run_pilot(
                            servers[backend], others, runtime, concurrency, args.events, tmp
                        )
                        after = await run_ceiling(runtime, concurrency, args.events, tmp)
                        ceiling = (before + after) / 2
                        sample = {
                            "ceiling_per_s": ceiling,
                            "ceiling_runs_per_s": [before, after],
                            "pilot_per_s": run.rate,
                            "ratio": run.rate / ceiling,
                            **{k: v for k, v in run.__dict__.items() if k != "rate"},
                        }
                        samples.setdefault((backend, runtime, concurrency), []).append(sample)
                        per_task = 1000 / args.events  # CPU seconds -> ms per task
                        own = float(run.finished.get("cpu_seconds", 0.0))
                        spawner = float(run.finished.get("spawner_cpu_seconds", 0.0))
                        tasks = float(run.finished.get("task_cpu_seconds", 0.0))
                        print(
                            f"{label}: {backend} pilot {run.rate:,.0f}/s "
                            f"({run.tasking_seconds:.2f} s tasking, {run.wall_seconds:.2f} s "
                            f"wall; CPU ms per task: pilot {own * per_task:.2f}, its spawner "
                            f"{spawner * per_task:.2f}, its tasks {tasks * per_task:.2f}, WMS "
                            f"{run.wms_cpu_seconds * per_task:.2f}, RabbitMQ "
                            f"{run.rabbitmq_cpu_seconds * per_task:.2f}; others "
                            f"{run.other_cores:.2f} cores; VmHWM "
                            f"{run.vmhwm_bytes / 2**20:.1f} MiB); ceiling {after:,.0f}/s; ratio "
                            f"{sample['ratio']:.2f}",
                            file=sys.stderr,
                        )
                        before = after
        for (backend, runtime, concurrency), runs in samples.items():
            ratio = statistics.median(r["ratio"] for r in runs)
            rows.append(
                {
                    "backend": backend,
                    "runtime": runtime,
                    "concurrency": concurrency,
                    "ceiling_per_s": statistics.median(r["ceiling_per_s"] for r in runs),
                    "pilot_per_s": statistics.median(r["pilot_per_s"] for r in runs),
                    "ratio": ratio,
                    "pass": ratio >= RATIO_TARGET,
                    "target": backend == TARGET_BACKEND,
                    "peak_rss_bytes": max(r["vmhwm_bytes"] for r in runs),
                    "rounds": runs,
                }
            )
    finally:
        for server in servers.values():
            await server.stop()
        if "rabbitmq" in servers:
            await delete_rabbitmq_workflows(servers["rabbitmq"].created)
        shutil.rmtree(tmp, ignore_errors=True)
    targets = [r for r in rows if r["target"]]
    return {
        "events": args.events,
        "event_size": EVENT_SIZE,
        "task": TASK_ARGS,
        "workdir": str(tmp.parent),
        "machine": f"{platform.node()} {os.cpu_count()} cpus, Python {platform.python_version()}",
        "rounds": args.rounds,
        "run_seconds": time.perf_counter() - started,
        "ratio_target": RATIO_TARGET,
        "target_pass": bool(targets) and all(r["pass"] for r in targets),
        "rows": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--backends", default="embedded,rabbitmq", help="comma-separated")
    parser.add_argument("--runtimes", default="process,bwrap", help="comma-separated")
    parser.add_argument("--concurrency", default="1,2,4", help="comma-separated")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the whole interleaved sequence; the table shows medians over rounds",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="where the pilots' task directories and the ceiling's files go (default: the "
        "system's temporary directory; the WMS data directories stay there too)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_logging("WARNING")  # this process's own logs (RabbitMQ clean-up): stderr, warnings
    try:
        report = asyncio.run(main_async(args))
    except Exception as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{args.events} events of {EVENT_SIZE} B, task `{TASK_ARGS}`; {report['machine']}; "
        f"{args.rounds} round(s), {report['run_seconds']:.0f} s"
    )
    header = (
        f"{'backend':<10}{'runtime':<9}{'conc':>5}{'ceiling/s':>11}{'pilot/s':>10}"
        f"{'ratio':>7}  {'vs 0.75':<8}{'peak RSS':>10}"
    )
    print(header)
    for r in report["rows"]:
        verdict = ("PASS" if r["pass"] else "FAIL") + ("" if r["target"] else "*")
        print(
            f"{r['backend']:<10}{r['runtime']:<9}{r['concurrency']:>5}"
            f"{r['ceiling_per_s']:>11,.0f}{r['pilot_per_s']:>10,.0f}{r['ratio']:>7.2f}  "
            f"{verdict:<8}{r['peak_rss_bytes'] / 2**20:>6.1f} MiB"
        )
    if any(not r["target"] for r in report["rows"]):
        print(f"* reported only: the target is on {TARGET_BACKEND}")
    if any(r["target"] for r in report["rows"]):
        overall = "PASS" if report["target_pass"] else "FAIL"
        print(f"{overall}  {TARGET_BACKEND} pilot/ceiling >= {RATIO_TARGET} at every concurrency")
    return 0


if __name__ == "__main__":
    sys.exit(main())
