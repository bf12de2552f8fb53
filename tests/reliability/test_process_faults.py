"""Process faults with real WMS, TMS and pilot processes (the e2e harness): a pilot killed with
SIGKILL mid-task, a poison event, a worker evicted with SIGTERM. Each counts the events in and out,
duplicates and lost ones, and how long recovery took, and records them with ``outcome``.

Tasks of the process runtime write marks (``start``/``end``, the time, the worker, the event) to a
file of the test's, so the test knows which events were in flight when it struck and what became
of them; a bwrap task cannot write outside its sandbox, so there the outputs alone are counted."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ewms.v1 import taskforce_pb2
from tests.e2e.conftest import Cluster, pid_alive, wait_for
from tests.e2e.test_run import numbered_events, slow_workflow, text_lines
from tests.e2e.test_run_failures import POISONABLE, lines_file, workflow

Phase = taskforce_pb2.TaskforcePhase
Pilot = taskforce_pb2.PilotPhase
Job = taskforce_pb2.JobState
RUN_TIMEOUT = 120
WAIT = 60  # seconds any awaited change may take on a loaded machine
PREFETCH = 2  # events a pilot holds at most: what a kill can leave in flight


@dataclass(frozen=True)
class Mark:
    """One line a marking task wrote: it started or ended event ``i`` on worker ``proc``."""

    kind: str
    at: float
    proc: int
    i: int


def marking_task(marks: Path, sleep: float) -> str:
    """A task that marks its start and end in ``marks``, sleeps, and copies its input."""

    def mark(kind: str) -> str:
        return (
            f'echo "{kind} $(date +%s.%N) $EWMS_TASK_INFILE $(cat "$EWMS_TASK_INFILE")" >> {marks}'
        )

    copy = 'cp "$EWMS_TASK_INFILE" "$EWMS_TASK_OUTFILE"'
    return f"sh -c '{mark('start')}; sleep {sleep}; {copy}; {mark('end')}'"


def read_marks(marks: Path) -> list[Mark]:
    out = []
    for line in marks.read_text().splitlines() if marks.exists() else []:
        kind, at, infile, content = line.split(" ", 3)
        proc = re.search(r"/cluster-\d+/(\d+)/", infile)
        assert proc, f"no worker in the task's infile path {infile}"
        out.append(Mark(kind, float(at), int(proc.group(1)), json.loads(content)["i"]))
    return out


def in_flight(marks: Iterable[Mark], proc: int) -> set[int]:
    """Events worker ``proc`` started and has not ended."""
    runs: Counter[int] = Counter()
    for m in marks:
        if m.proc == proc:
            runs[m.i] += 1 if m.kind == "start" else -1
    return {i for i, n in runs.items() if n > 0}


def pilot_workflow(path: Path, *, sleep: float, n_workers: int, marks: Path | None) -> Path:
    """slow_workflow's task, marking when ``marks`` is given, its pilots holding PREFETCH events."""
    body = json.loads(slow_workflow(path, sleep=sleep, n_workers=n_workers).read_text())
    task = body["tasks"][0]
    if marks is not None:
        task["task_args"] = marking_task(marks, sleep)
    task["pilot_config"] = {"environment": {"EWMS_PILOT_PREFETCH": PREFETCH}}
    path.write_text(json.dumps(body))
    return path


def tally(lines: list[Any], expected: set[Any]) -> tuple[int, int, int]:
    """(distinct outputs, duplicates, lost) of ``lines`` against the ``expected`` outputs."""
    counts = Counter(lines)
    return len(counts), sum(n - 1 for n in counts.values()), len(expected - counts.keys())


def start_tms(c: Cluster, runtime: str = "process") -> None:
    """The local TMS with two slots; the pilots' runtime is the site's choice (a user may not set
    it)."""
    c.start_tms(slots=2, EWMS_TMS_PILOT_ENV=f"EWMS_PILOT_RUNTIME={runtime}")


def worker_pid(c: Cluster, proc: int, run: Any) -> int:
    """The pid of worker ``proc`` of cluster 1 (from the local schedd's job log)."""

    def pids() -> list[int]:
        if run.poll() is not None:
            raise AssertionError(f"the run ended first:\n{run.communicate()[1]}")
        return [r["pid"] for r in c.job_log() if r["event"] == "execute" and r["proc"] == proc]

    return int(wait_for(pids, WAIT, f"worker {proc} to start")[0])


def compound(c: Cluster) -> list[taskforce_pb2.CompoundStatus]:
    return [s for tf in c.taskforces() for s in tf.compound_statuses]


def count(c: Cluster, job_state: int, phase: int) -> int:
    return sum(s.count for s in compound(c) if s.job_state == job_state and s.pilot_phase == phase)


def killed_and_lost(c: Cluster) -> list[taskforce_pb2.CompoundStatus]:
    """The compound statuses of workers COMPLETED by SIGKILL whose pilots are LOST."""
    return [
        s
        for s in compound(c)
        if s.job_state == Job.JOB_STATE_COMPLETED
        and s.job_exit.signal == signal.SIGKILL
        and s.pilot_phase == Pilot.PILOT_PHASE_LOST
    ]


def finished(c: Cluster) -> list[taskforce_pb2.CompoundStatus]:
    """The compound statuses once the taskforce is complete (every job has left)."""
    done = wait_for(
        lambda: [t for t in c.taskforces() if t.phase == Phase.TASKFORCE_PHASE_CONDOR_COMPLETE],
        WAIT,
        "the taskforce to complete",
    )
    return list(done[0].compound_statuses)


def no_worker_lost(statuses: list[taskforce_pb2.CompoundStatus]) -> None:
    """Every pilot said DONE and every job's process exited by itself with 0."""
    assert statuses, "no workers"
    for s in statuses:
        assert s.pilot_phase == Pilot.PILOT_PHASE_DONE, s
        assert s.HasField("job_exit") and s.job_exit == taskforce_pb2.JobExit(exit_code=0), s


def finish_run(run: Any) -> str:
    try:
        _, err = run.communicate(timeout=RUN_TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    return str(err)


# --- 1. kill -9 of a pilot mid-task ---------------------------------------------------------------


def kill_a_pilot_mid_task(
    tmp_path: Path, c: Cluster, outcome: Callable[..., Any], runtime: str
) -> None:
    """Two slots, three workers: worker 0 is killed with SIGKILL while a task of its runs, and the
    third worker starts in its slot. Every event's output arrives; only events in flight at the
    kill may come twice; the TMS reports the job ended by signal 9; the WMS marks its pilot LOST.
    Recovery: from the kill until the replacement pilot is tasking."""
    n = 60
    c.start_wms()
    start_tms(c, runtime)
    marks = tmp_path / "marks" if runtime == "process" else None
    wf = pilot_workflow(tmp_path / "wf.json", sleep=0.2, n_workers=3, marks=marks)
    out = tmp_path / "out.jsonl"
    run = c.run(str(wf), "--in", str(numbered_events(tmp_path / "in.jsonl", n)), "--out", str(out))
    try:
        pid = worker_pid(c, 0, run)
        wait_for(lambda: out.exists() and len(text_lines(out)) >= 10, WAIT, "the first outputs")
        if marks is not None:
            wait_for(lambda: in_flight(read_marks(marks), 0), WAIT, "a task of worker 0 running")
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        seen_at_kill = {m.i for m in read_marks(marks)} if marks is not None else set()
        wait_for(
            lambda: (
                killed_and_lost(c)
                and count(c, Job.JOB_STATE_RUNNING, Pilot.PILOT_PHASE_TASKING) == 2
            ),
            WAIT,
            "the killed pilot LOST and its replacement tasking",
        )
        recovery = time.monotonic() - killed_at
    except BaseException:
        run.kill()
        raise
    finish_run(run)

    got = [json.loads(line)["i"] for line in text_lines(out)]
    events_out, duplicates, lost = tally(got, set(range(n)))
    assert lost == 0, "every event's output arrives"
    assert duplicates <= PREFETCH, "only the killed pilot's events (at most its prefetch) twice"
    twice = {i for i, k in Counter(got).items() if k > 1}
    assert twice <= seen_at_kill or marks is None, "only events started before the kill, twice"
    killed = [r for r in c.job_log() if r["event"] == "terminated" and r["proc"] == 0]
    assert [r["exit_code"] for r in killed] == [-signal.SIGKILL]
    [row] = killed_and_lost(c)
    assert row.count == 1
    [tf] = c.taskforces()
    outcome(
        f"kill -9 of a pilot mid-task ({runtime})",
        c.backend,
        events_in=n,
        events_out=events_out,
        duplicates=duplicates,
        lost=lost,
        recovery_s=recovery,
        detail="recovery: kill until the replacement pilot is tasking; COMPLETED (SIGKILL) x LOST",
        # The lost pilot's counters end with the lifecycle events it sent after its last status.
        extra={"counters": str(tf.counters).replace("\n", " "), "outputs": len(got)},
    )


def test_kill_9_of_a_pilot_mid_task_loses_nothing_and_shows_the_pilot_lost(
    tmp_path: Path, cluster: Callable[..., Cluster], backend: str, outcome: Callable[..., Any]
) -> None:
    kill_a_pilot_mid_task(tmp_path, cluster(backend), outcome, "process")


def test_kill_9_of_a_bwrap_pilot_mid_task_loses_nothing_and_shows_the_pilot_lost(
    tmp_path: Path, cluster: Callable[..., Cluster], outcome: Callable[..., Any]
) -> None:
    kill_a_pilot_mid_task(tmp_path, cluster("embedded"), outcome, "bwrap")


# --- 4. a poison event ----------------------------------------------------------------------------


def test_a_poison_event_is_dead_lettered_with_its_error_and_costs_no_worker(
    tmp_path: Path, cluster: Callable[..., Cluster], backend: str, outcome: Callable[..., Any]
) -> None:
    n, poison = 60, 5
    c = cluster(backend)
    c.start_wms()
    start_tms(c)
    out = tmp_path / "out.txt"
    started = time.monotonic()
    run = c.run(
        str(workflow(tmp_path, POISONABLE)),
        "--in",
        str(lines_file(tmp_path, n, poison_at=poison)),
        "--text",
        "--out",
        str(out),
    )
    _, err = run.communicate(timeout=RUN_TIMEOUT)
    took = time.monotonic() - started

    assert run.returncode == 1, err  # a dead letter fails the run
    assert f"{n} event(s) in: {n - 1} done, 1 dead-lettered, 0 not settled" in err
    assert "attempt 3): task failed (exit code 4): poisoned line" in err
    expected = {f"LINE {i}" for i in range(1, n + 1) if i != poison}
    events_out, duplicates, lost = tally(text_lines(out), expected)
    assert (lost, duplicates, events_out) == (0, 0, n - 1)
    no_worker_lost(finished(c))
    outcome(
        "poison event (max_attempts 3)",
        c.backend,
        events_in=n,
        events_out=events_out,
        duplicates=duplicates,
        lost=lost,
        detail=f"1 dead-lettered after 3 attempts with its error; every pilot DONE; {took:.1f} s",
    )


# --- 5. eviction: SIGTERM to a worker -------------------------------------------------------------


def test_an_evicted_worker_drains_its_task_within_its_grace_and_loses_nothing(
    tmp_path: Path, cluster: Callable[..., Cluster], backend: str, outcome: Callable[..., Any]
) -> None:
    n = 30
    c = cluster(backend)
    c.start_wms()
    start_tms(c)
    marks = tmp_path / "marks"
    wf = pilot_workflow(tmp_path / "wf.json", sleep=0.3, n_workers=2, marks=marks)
    out = tmp_path / "out.jsonl"
    run = c.run(str(wf), "--in", str(numbered_events(tmp_path / "in.jsonl", n)), "--out", str(out))
    try:
        pid = worker_pid(c, 0, run)
        running = wait_for(lambda: in_flight(read_marks(marks), 0), WAIT, "a task of worker 0")
        os.kill(pid, signal.SIGTERM)
        evicted_at = time.monotonic()
        # EWMS_PILOT_DRAIN_GRACE (10 s) bounds the drain; the wait is generous for a busy machine.
        wait_for(lambda: not pid_alive(pid), WAIT, "the evicted worker to exit")
        drained = time.monotonic() - evicted_at
    except BaseException:
        run.kill()
        raise
    finish_run(run)

    marked = read_marks(marks)
    for i in running:  # finished by the evicted pilot itself, not taken back and run again
        runs = [(m.kind, m.proc) for m in marked if m.i == i]
        assert runs == [("start", 0), ("end", 0)], (i, runs)
    got = [json.loads(line)["i"] for line in text_lines(out)]
    events_out, duplicates, lost = tally(got, set(range(n)))
    assert (lost, duplicates) == (0, 0)
    assert [
        r["exit_code"] for r in c.job_log() if r["event"] == "terminated" and r["proc"] == 0
    ] == [0], "the worker exited by itself, before any SIGKILL"
    no_worker_lost(finished(c))
    outcome(
        "SIGTERM eviction of a worker mid-task",
        c.backend,
        events_in=n,
        events_out=events_out,
        duplicates=duplicates,
        lost=lost,
        recovery_s=drained,
        detail=f"in-flight task {sorted(running)} completed; drain (SIGTERM to exit 0) is recovery",
    )


@pytest.fixture(autouse=True)
def run_dirs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed run keeps its directory in $TMPDIR: here, the test's own."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
