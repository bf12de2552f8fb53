"""The scale part of bench/e2e.py (``--parts scale``): ``ewms run`` over many small events.

One ``python -m services.cli run WORKFLOW --in EVENTS --out OUT --workers 2 --data-dir DIR
--no-progress`` subprocess per size (default 10,000, 100,000 and 1,000,000 events), embedded
backend, each event a JSON object of about 64 bytes (``{"i": 17, "pad": "xx…"}``), one task
``cp {{INFILE}} {{OUTFILE}}`` (``n_workers`` 2, one task per pilot). Measured:

* wall time (spawn to exit) and rate = N / wall;
* peak RSS of the ``ewms run`` process (embedded WMS, local TMS and client in one process): the
  largest ``VmHWM`` read from ``/proc/<pid>/status`` every 0.2 s while it runs (the kernel's
  high-water mark, so a peak between two reads is still seen at the next read);
* peak RSS of its pilots: the same for every descendant process whose command line is
  ``-m services.pilot`` (found through ``/proc/<pid>/task/*/children``), the largest of them.

Checked: exit 0 and N output lines. The events file is written once per size and removed after.
Targets (issue 16): peak RSS of ``ewms run`` at the largest size <= 1.5 x at the smallest; rate at
the largest size within 10% of the rate at the smallest (both shown with PASS/FAIL when both
sizes ran). ``python bench/e2e_scale.py --tree /tmp/old-tree`` measures another checkout (e.g. a
``git worktree`` of an older commit) with the same harness.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

SCALE_SIZES = (10_000, 100_000, 1_000_000)
SCALE_EVENT_BYTES = 64
SCALE_WORKERS = 2
SCALE_TASK = "cp {{INFILE}} {{OUTFILE}}"
RSS_POLL_SECONDS = 0.2
RSS_TARGET_RATIO = 1.5
RATE_TARGET_SHARE = 0.10


@dataclass
class ScaleRun:
    """One ``ewms run`` of the scale part."""

    events: int
    input_bytes: int = 0
    wall_seconds: float = 0.0
    rate_per_s: float = 0.0
    run_peak_rss_mb: float = 0.0
    pilot_peak_rss_mb: float = 0.0
    pilots_seen: int = 0


def workflow_request() -> dict[str, Any]:
    """One ``cp`` task at local, 2 workers, public queues in → out."""
    return {
        "public_queue_aliases": ["in", "out"],
        "tasks": [
            {
                "cluster_locations": ["local"],
                "input_queue_aliases": ["in"],
                "output_queue_aliases": ["out"],
                "task_args": SCALE_TASK,
                "n_workers": SCALE_WORKERS,
                "worker_config": {
                    "do_transfer_worker_stdouterr": False,
                    "max_worker_runtime": 24 * 3600,
                    "n_cores": 1,
                    "priority": 1,
                    "worker_disk": "1G",
                    "worker_memory": "1G",
                },
            }
        ],
    }


def write_events(path: Path, n: int) -> int:
    """N JSON lines of about SCALE_EVENT_BYTES; returns the file's size."""
    with path.open("w") as f:
        for i in range(n):
            head = len(f'{{"i":{i},"pad":""}}') + 1
            f.write(f'{{"i":{i},"pad":"{"x" * max(0, SCALE_EVENT_BYTES - head)}"}}\n')
    return path.stat().st_size


def vm_hwm_kib(pid: int) -> int:
    """The process's peak RSS so far (VmHWM, KiB); 0 if it is gone."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (through /proc/<pid>/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                with contextlib.suppress(OSError, ValueError):
                    for child in (task / "children").read_text().split():
                        found.append(int(child))
                        todo.append(int(child))
    return found


def is_pilot(pid: int) -> bool:
    with contextlib.suppress(OSError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return b"services.pilot" in argv
    return False


async def run_scale_one(n: int, tmp: Path, tree: Path, limit_s: float) -> ScaleRun:
    """One ``ewms run`` over N small events, with peak RSS sampled while it runs."""
    root = Path(tempfile.mkdtemp(prefix=f"scale-{n}-", dir=tmp))
    result = ScaleRun(n)
    workflow, events, out = root / "workflow.json", root / "events.jsonl", root / "out.jsonl"
    data_dir, log_path = root / "data", root / "ewms-run.log"
    workflow.write_text(json.dumps(workflow_request()))
    result.input_bytes = await asyncio.to_thread(write_events, events, n)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EWMS_", "_EWMS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "gen")])
    env["EWMS_QUEUE_BACKEND"] = "embedded"
    argv = [
        sys.executable,
        "-m",
        "services.cli",
        "run",
        str(workflow),
        "--in",
        str(events),
        "--out",
        str(out),
        "--workers",
        str(SCALE_WORKERS),
        "--data-dir",
        str(data_dir),
        "--no-progress",
    ]
    proc: asyncio.subprocess.Process | None = None
    pilot_peaks: dict[int, int] = {}
    run_peak = 0
    try:
        with log_path.open("wb") as log:
            started = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=tree,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = started + limit_s
        while proc.returncode is None:
            run_peak = max(run_peak, vm_hwm_kib(proc.pid))
            for child in descendants(proc.pid):
                if child in pilot_peaks or is_pilot(child):
                    pilot_peaks[child] = max(pilot_peaks.get(child, 0), vm_hwm_kib(child))
            if time.perf_counter() > deadline:
                raise RuntimeError(f"ewms run over {n:,} events did not end within {limit_s:.0f} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), RSS_POLL_SECONDS)
        result.wall_seconds = time.perf_counter() - started
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(
                f"ewms run over {n:,} events exited {proc.returncode}:\n" + "\n".join(tail)
            )
        with out.open("rb") as f:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        if lines != n:
            raise RuntimeError(f"ewms run over {n:,} events wrote {lines:,} output lines")
        result.rate_per_s = n / result.wall_seconds
        result.run_peak_rss_mb = run_peak / 1024
        result.pilot_peak_rss_mb = max(pilot_peaks.values(), default=0) / 1024
        result.pilots_seen = len(pilot_peaks)
        return result
    finally:
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await asyncio.to_thread(shutil.rmtree, root, True)


async def run_scale(sizes: list[int], tmp: Path, tree: Path = REPO_ROOT) -> dict[str, Any]:
    """Every size in order; the rows and the two targets (when two sizes ran)."""
    rows: list[ScaleRun] = []
    for n in sizes:
        r = await run_scale_one(n, tmp, tree, limit_s=300 + n * 0.02)
        rows.append(r)
        print(
            f"scale {n:,} events: wall {r.wall_seconds:.1f} s = {r.rate_per_s:,.0f}/s; peak RSS "
            f"ewms run {r.run_peak_rss_mb:.0f} MB, pilots {r.pilot_peak_rss_mb:.0f} MB "
            f"({r.pilots_seen} seen)",
            file=sys.stderr,
        )
    targets = []
    if len(rows) >= 2:
        small, big = rows[0], rows[-1]
        targets = [
            {
                "name": f"ewms run peak RSS at {big.events:,} <= {RSS_TARGET_RATIO} x at "
                f"{small.events:,} ({big.run_peak_rss_mb:.0f} vs {small.run_peak_rss_mb:.0f} MB)",
                "pass": big.run_peak_rss_mb <= RSS_TARGET_RATIO * small.run_peak_rss_mb,
            },
            {
                "name": f"rate at {big.events:,} within {RATE_TARGET_SHARE:.0%} of the rate at "
                f"{small.events:,} ({big.rate_per_s:,.0f} vs {small.rate_per_s:,.0f}/s)",
                "pass": big.rate_per_s >= (1 - RATE_TARGET_SHARE) * small.rate_per_s,
            },
        ]
    return {
        "event_bytes": SCALE_EVENT_BYTES,
        "task": SCALE_TASK,
        "workers": SCALE_WORKERS,
        "rows": [asdict(r) for r in rows],
        "targets": targets,
    }


def render_scale(report: dict[str, Any]) -> list[str]:
    out = [
        "",
        f"scale: `ewms run` (embedded) over JSON events of ~{report['event_bytes']} B, task "
        f"`{report['task']}`, --workers {report['workers']}",
        f"{'events':>10}{'input MB':>10}{'wall s':>9}{'rate/s':>9}{'run peak RSS MB':>17}"
        f"{'pilot peak RSS MB':>19}",
    ]
    for r in report["rows"]:
        out.append(
            f"{r['events']:>10,}{r['input_bytes'] / 1e6:>10.1f}{r['wall_seconds']:>9.1f}"
            f"{r['rate_per_s']:>9,.0f}{r['run_peak_rss_mb']:>17.0f}{r['pilot_peak_rss_mb']:>19.0f}"
        )
    for t in report["targets"]:
        out.append(f"{'PASS' if t['pass'] else 'FAIL'}  {t['name']}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default=",".join(str(n) for n in SCALE_SIZES),
        help="comma-separated event counts, smallest first (default %(default)s)",
    )
    parser.add_argument("--tree", type=Path, default=REPO_ROOT, help="the checkout to measure")
    parser.add_argument("--workdir", default=None, help="where temporary files go")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir))
    try:
        report = asyncio.run(run_scale(sizes, tmp, args.tree.resolve()))
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else "\n".join(render_scale(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
