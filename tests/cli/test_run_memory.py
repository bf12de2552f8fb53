"""``ewms run`` at scale: its memory does not grow with its input, ``--progress json`` reports
the run one line a second, and a dead letter still names its input line (nothing per event is
kept in memory; the line is in the event id).

How memory is bounded here, and why the method is honest: RLIMIT_AS would limit the *virtual*
size, which on this machine is dominated by thread stacks and arenas that Python, gRPC and SQLite
reserve and never touch, and the cgroup file system is not writable. So the limit is on what the
kernel itself counts as used: the peak resident set size of the ``ewms run`` process alone
(embedded WMS, local TMS and client; pilots are other processes). The kernel's high-water mark
(``VmHWM``) is updated lazily (at unmaps), so a short peak freed by ``madvise`` can escape it:
the peak taken is the largest of VmHWM and VmRSS read every 50 ms from /proc/<pid>/status and the
process's own ``getrusage`` maximum in its final ``--progress json`` line.
A small run gives the process's own baseline; the limit given to the big run is that baseline plus
MEMORY_ALLOWANCE, and the big run's input file is larger than that limit, so a run that held its
input (or the broker's copy of it) in memory would exceed it several times over.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import EXAMPLES, cli_env, ewms_cmd

RUN_TIMEOUT = 120
MiB = 1024 * 1024
PAYLOAD = 256 * 1024  # bytes of text per event: few events, a big file, a quick run
SMALL = 16  # events (4 MiB) of the baseline run; the big run's input is INPUT_OVER_LIMIT x limit
INPUT_OVER_LIMIT = 1.5
MEMORY_ALLOWANCE = 64 * MiB
CP = "cp {{INFILE}} {{OUTFILE}}"
# Upper-cases each line, but fails (exit 4) on a line saying "poison".
POISONABLE = (
    'sh -c \'if grep -q poison "$EWMS_TASK_INFILE"; then echo poisoned line >&2; exit 4; fi; '
    'tr a-z A-Z < "$EWMS_TASK_INFILE" > "$EWMS_TASK_OUTFILE"\''
)


@pytest.fixture(autouse=True)
def run_dirs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed run keeps its directory in $TMPDIR: here, the test's own."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def workflow(path: Path, task_args: str) -> Path:
    spec = json.loads((EXAMPLES / "text-transform" / "workflow.json").read_text())
    spec["tasks"][0]["task_args"] = task_args
    path.write_text(json.dumps(spec))
    return path


def vm_hwm(pid: int) -> int:
    """The process's peak RSS so far (VmHWM, or VmRSS if higher), in bytes (0 once it is gone)."""
    found = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                found = max(found, int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    return found


def run_measured(tmp: Path, task_args: str, events: Path, *extra: str) -> tuple[int, str, str, int]:
    """``ewms run`` over ``events`` with ``--progress json``; (exit code, stdout, stderr, peak
    RSS of the ewms run process in bytes)."""
    out = tmp / "out.txt"
    with (tmp / "stdout").open("w+") as stdout, (tmp / "stderr").open("w+") as stderr:
        proc = subprocess.Popen(
            ewms_cmd(
                "run",
                str(workflow(tmp / "workflow.json", task_args)),
                "--in",
                str(events),
                "--text",
                "--out",
                str(out),
                "--workers",
                "2",
                "--data-dir",
                str(tmp / "data"),
                "--progress",
                "json",
                *extra,
            ),
            stdout=stdout,
            stderr=stderr,
            env=cli_env(EWMS_QUEUE_BACKEND="embedded", EWMS_LOG_LEVEL="WARNING"),
        )
        peak = 0
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while proc.poll() is None:
                peak = max(peak, vm_hwm(proc.pid))
                assert time.monotonic() < deadline, "ewms run did not end in time"
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stdout.seek(0)
        stderr.seek(0)
        err = stderr.read()
        reports = progress_lines(err)
        if reports and reports[-1]["progress"] == "final":
            peak = max(peak, reports[-1]["peak_rss_bytes"])
        return proc.returncode, stdout.read(), err, peak


def big_lines(path: Path, n: int) -> Path:
    """N text lines of PAYLOAD bytes each, each different."""
    with path.open("w") as f:
        for i in range(n):
            head = f"{i:08d} "
            f.write(head + "x" * (PAYLOAD - len(head)) + "\n")
    return path


def progress_lines(stderr: str) -> list[dict[str, Any]]:
    """The JSON objects of stderr that are progress reports (log records have no such key)."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if "progress" in record:
                out.append(record)
    return out


def test_a_run_over_a_file_larger_than_its_memory_limit_stays_within_it(tmp_path: Path) -> None:
    small_dir, big_dir = tmp_path / "small", tmp_path / "big"
    small_dir.mkdir()
    big_dir.mkdir()
    small = big_lines(small_dir / "events.txt", SMALL)
    code, _, stderr, baseline = run_measured(small_dir, CP, small)
    assert code == 0, stderr
    assert baseline > 0
    limit = baseline + MEMORY_ALLOWANCE

    n = int(INPUT_OVER_LIMIT * limit / PAYLOAD) + 1
    big = big_lines(big_dir / "events.txt", n)
    assert big.stat().st_size > limit, "the input must be larger than the memory limit"
    code, _, stderr, peak = run_measured(big_dir, CP, big)
    assert code == 0, stderr
    assert f"{n} event(s) in: {n} done, 0 dead-lettered" in stderr
    written = (big_dir / "out.txt").read_bytes().splitlines()
    assert len(written) == n and {w[:8] for w in written} == {b"%08d" % i for i in range(n)}
    assert peak <= limit, (
        f"peak RSS {peak / MiB:.0f} MiB over the limit {limit / MiB:.0f} MiB "
        f"(baseline {baseline / MiB:.0f} MiB, input {big.stat().st_size / MiB:.0f} MiB)"
    )


def test_progress_json_lines_are_monotonic_and_the_final_one_matches_the_summary(
    tmp_path: Path,
) -> None:
    n, poison_at = 300, 17
    events = tmp_path / "events.txt"
    events.write_text(
        "".join("poison\n" if i == poison_at else f"line {i}\n" for i in range(1, n + 1))
    )
    code, stdout, stderr, _ = run_measured(tmp_path, POISONABLE, events)
    assert code == 1, stderr  # one dead letter
    assert stdout == ""
    reports = progress_lines(stderr)
    running, final = reports[:-1], reports[-1]
    assert running and all(r["progress"] == "running" for r in running), reports
    assert final["progress"] == "final"
    keys = {"elapsed", "published", "total", "done", "failed", "dead_lettered", "outputs"}
    assert keys | {"workers", "rate", "eta_seconds"} <= final.keys()
    for key in ("elapsed", "published", "done", "dead_lettered", "outputs"):
        values = [r[key] for r in reports]
        assert values == sorted(values), (key, values)
    assert all(r["total"] == n for r in reports)
    # About one a second (not one per event).
    assert len(reports) <= final["elapsed"] + 3
    assert final["published"] == n
    assert final["dead_lettered"] == 1
    assert final["done"] == n - 1
    assert final["outputs"] == n - 1
    assert final["eta_seconds"] == 0
    summary = f"{n} event(s) in: {n - 1} done, 1 dead-lettered, 0 not settled; {n - 1} output(s)"
    assert summary in stderr
    # The dead letter still names its input line: it is in the event id, not in a table.
    listed = re.search(r"dead-lettered events:\n(.+)", stderr)
    assert listed and listed.group(1).startswith(f"  {events}:{poison_at} EV-"), stderr
