"""The local scheduler backend (services/tms/local.py) with real worker processes: small Python
scripts stand in for the pilot."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from services.tms.local import (
    HOLD_EXECUTE_EXCEEDED,
    HOLD_FAILED_TO_CREATE_PROCESS,
    HOLD_OUT_OF_RESOURCES,
    LOG_NAME,
    MEMORY_HOLD_REASON,
    LocalScheduler,
    runtime_hold_reason,
)
from services.tms.scheduler import (
    COMPLETED,
    HELD,
    IDLE,
    REMOVED,
    RUNNING,
    ClusterLeft,
    JobChange,
    JobExit,
    JobState,
    SchedulerError,
    SchedulerEvent,
    SubmitSpec,
    WorkerResources,
)

# Generous: a noisy 2-core machine starts Python slowly.
WAIT = 60.0
MiB = 1 << 20

# Announces itself (its pid in <shared>/started-<worker id>), then exits with $TEST_EXIT once
# <shared>/go-<worker id> or <shared>/go exists (after 60 s at the latest).
WAIT_FOR_GO = """
import os, pathlib, sys, time
wid = os.environ["EWMS_PILOT_WORKER_ID"]
shared = pathlib.Path(os.environ["TEST_SHARED"])
(shared / f"started-{wid}.tmp").write_text(str(os.getpid()))
(shared / f"started-{wid}.tmp").rename(shared / f"started-{wid}")
deadline = time.monotonic() + 60
while not (shared / f"go-{wid}").exists() and not (shared / "go").exists():
    if time.monotonic() > deadline:
        sys.exit(99)
    time.sleep(0.02)
sys.exit(int(os.environ.get("TEST_EXIT", "0")))
"""

# Prints what it sees (environment, directory, files, CPUs) as JSON on stdout and exits.
REPORT = """
import json, os, pathlib
files = {p.name: p.read_text() for p in pathlib.Path(".").iterdir() if p.is_file()}
dirs = sorted(p.name for p in pathlib.Path(".").iterdir() if p.is_dir())
print(json.dumps({
    "cwd": os.getcwd(), "env": dict(os.environ), "files": files, "dirs": dirs,
    "cpus": sorted(os.sched_getaffinity(0)),
}))
"""

# Writes its pid to ./pid, then handles SIGTERM as $TEST_ON_TERM says ("trap": write ./got-term and
# exit 0; "ignore"), writes ./ready and sleeps 60 s.
ON_TERM = """
import os, pathlib, signal, sys, time
pathlib.Path("pid").write_text(str(os.getpid()))
mode = os.environ.get("TEST_ON_TERM", "default")
if mode == "trap":
    def stop(signum, frame):
        pathlib.Path("got-term").write_text("yes")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
elif mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
pathlib.Path("ready").write_text("yes")
time.sleep(60)
"""

# Writes its pid to ./pid, then holds about $TEST_MIB MiB of touched memory for 60 s.
HOG = """
import os, pathlib, time
pathlib.Path("pid").write_text(str(os.getpid()))
hog = b"x" * (int(os.environ["TEST_MIB"]) << 20)
time.sleep(60)
"""

# Starts a child in a session of its own (as the pilot starts its tasks) that holds 200 MiB for
# 120 s, writes the child's pid to ./child and waits for it.
HOG_IN_OWN_SESSION = """
import pathlib, subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c", "import time; hog = b'x' * (200 << 20); time.sleep(120)"],
    start_new_session=True,
)
pathlib.Path("child").write_text(str(child.pid))
child.wait()
"""


def script(source: str) -> list[str]:
    """A worker command running ``source``."""
    return [sys.executable, "-c", source]


def spec(
    uuid: str = "tf-1",
    n_workers: int = 1,
    env: dict[str, str] | None = None,
    input_files: tuple[str, ...] = (),
    **resources: Any,
) -> SubmitSpec:
    return SubmitSpec(
        taskforce_uuid=uuid,
        n_workers=n_workers,
        environment=env or {},
        resources=WorkerResources(**resources),
        input_files=input_files,
    )


class Recorder:
    """Consumes a scheduler's events into ``events``; :meth:`until` waits for a condition."""

    def __init__(self, scheduler: LocalScheduler) -> None:
        self.events: list[SchedulerEvent] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._consume(scheduler))

    async def _consume(self, scheduler: LocalScheduler) -> None:
        async for event in scheduler.events():
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    async def until(self, predicate: Callable[[], bool], what: str, within: float = WAIT) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), within)
            except TimeoutError:
                pytest.fail(f"no {what} within {within} s; events: {self.events}")

    def changes(self, cluster: int, proc: int) -> list[JobChange]:
        return [
            e
            for e in self.events
            if isinstance(e, JobChange) and (e.cluster_id, e.proc_id) == (cluster, proc)
        ]

    def states(self, cluster: int, proc: int) -> list[JobState]:
        return [e.state for e in self.changes(cluster, proc)]

    def state(self, cluster: int, proc: int) -> JobState | None:
        states = self.states(cluster, proc)
        return states[-1] if states else None

    def index(self, cluster: int, proc: int, state: JobState) -> int:
        """Where the worker's (first) change to ``state`` is in ``events``."""
        for i, e in enumerate(self.events):
            if isinstance(e, JobChange) and (e.cluster_id, e.proc_id, e.state) == (
                cluster,
                proc,
                state,
            ):
                return i
        raise AssertionError(f"{cluster}.{proc} never became {state}: {self.events}")

    def left(self, cluster: int) -> bool:
        return any(isinstance(e, ClusterLeft) and e.cluster_id == cluster for e in self.events)

    async def reaches(self, cluster: int, proc: int, state: JobState) -> None:
        await self.until(lambda: self.state(cluster, proc) == state, f"{cluster}.{proc} {state}")


async def wait_until(condition: Callable[[], bool], what: str, within: float = WAIT) -> None:
    """Wait for something outside the scheduler's events (a file, a process)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {within} s")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def records(state_dir: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The job log's records (of one kind)."""
    lines = (state_dir / LOG_NAME).read_text().splitlines()
    return [r for r in map(json.loads, lines) if event is None or r["event"] == event]


def worker_dir(state_dir: Path, cluster: int, proc: int, uuid: str = "tf-1") -> Path:
    return state_dir / f"ewms-taskforce-{uuid}" / f"cluster-{cluster}" / str(proc)


def report(state_dir: Path, cluster: int, proc: int, uuid: str = "tf-1") -> dict[str, Any]:
    """What a REPORT worker printed."""
    out = state_dir / f"ewms-taskforce-{uuid}" / f"cluster-{cluster}" / f"{proc}.out"
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """A directory the test and its WAIT_FOR_GO workers share."""
    path = tmp_path / "shared"
    path.mkdir()
    return path


@pytest.fixture
async def make(state_dir: Path) -> AsyncIterator[Callable[..., LocalScheduler]]:
    """Make LocalSchedulers on ``state_dir``; each is shut down (its workers killed) after the
    test."""
    made: list[LocalScheduler] = []

    def new(command: list[str], **options: Any) -> LocalScheduler:
        options.setdefault("kill_grace", 1.0)
        scheduler = LocalScheduler(state_dir, command=command, **options)
        made.append(scheduler)
        return scheduler

    yield new
    for scheduler in reversed(made):
        await scheduler.shutdown(grace=0.5)


# --- slots and states ----------------------------------------------------------------------------


async def test_workers_beyond_the_slots_stay_idle_until_one_exits(
    make: Callable[..., LocalScheduler], shared: Path
) -> None:
    scheduler = make(script(WAIT_FOR_GO), slots=2)
    rec = Recorder(scheduler)
    submitted = await scheduler.submit(spec(n_workers=3, env={"TEST_SHARED": str(shared)}))
    assert (submitted.cluster_id, submitted.n_workers) == (1, 3)

    await rec.until(lambda: rec.state(1, 0) == rec.state(1, 1) == RUNNING, "two running")
    assert rec.state(1, 2) == IDLE
    assert not (shared / "started-1.2").exists()

    (shared / "go-1.0").touch()
    await rec.reaches(1, 2, RUNNING)
    assert rec.index(1, 0, COMPLETED) < rec.index(1, 2, RUNNING)
    assert rec.state(1, 1) == RUNNING
    assert not rec.left(1)

    (shared / "go").touch()
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    for proc in range(3):
        assert rec.states(1, proc) == [IDLE, RUNNING, COMPLETED]
    assert isinstance(rec.events[-1], ClusterLeft)
    assert rec.events[-1].taskforce_uuid == "tf-1"


async def test_workers_start_in_submission_order_across_clusters(
    make: Callable[..., LocalScheduler], shared: Path
) -> None:
    scheduler = make(script(WAIT_FOR_GO), slots=1)
    rec = Recorder(scheduler)
    env = {"TEST_SHARED": str(shared)}
    await scheduler.submit(spec("tf-1", n_workers=2, env=env))
    await scheduler.submit(spec("tf-2", n_workers=1, env=env))
    (shared / "go").touch()
    await rec.until(lambda: rec.left(1) and rec.left(2), "both clusters leaving")
    started = [
        (e.cluster_id, e.proc_id)
        for e in rec.events
        if isinstance(e, JobChange) and e.state == RUNNING
    ]
    assert started == [(1, 0), (1, 1), (2, 0)]


async def test_a_worker_that_exits_nonzero_is_completed_with_its_exit_code_logged(
    make: Callable[..., LocalScheduler], shared: Path, state_dir: Path
) -> None:
    scheduler = make(script(WAIT_FOR_GO))
    rec = Recorder(scheduler)
    (shared / "go").touch()
    await scheduler.submit(spec(env={"TEST_SHARED": str(shared), "TEST_EXIT": "3"}))
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    assert rec.states(1, 0) == [IDLE, RUNNING, COMPLETED]
    [terminated] = records(state_dir, "terminated")
    assert (terminated["cluster"], terminated["proc"], terminated["exit_code"]) == (1, 0, 3)


# --- the workers' environment and directory ------------------------------------------------------


async def test_a_worker_sees_its_id_its_data_dir_and_the_spec_environment(
    make: Callable[..., LocalScheduler], state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EWMS_TMS_TEST_SECRET", "not for pilots")
    scheduler = make(script(REPORT))
    rec = Recorder(scheduler)
    await scheduler.submit(
        spec(n_workers=2, env={"EWMS_PILOT_TASK_ARGS": "echo hi", "EWMS_PILOT_WORKER_ID": "x"})
    )
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    for proc in range(2):
        seen = report(state_dir, 1, proc)
        directory = str(worker_dir(state_dir, 1, proc))
        assert seen["cwd"] == directory
        assert seen["env"]["EWMS_PILOT_WORKER_ID"] == f"1.{proc}"
        assert seen["env"]["EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST"] == directory
        assert seen["env"]["EWMS_PILOT_TASK_ARGS"] == "echo hi"
        assert seen["env"]["PATH"] == os.environ["PATH"]
        assert "EWMS_TMS_TEST_SECRET" not in seen["env"]


async def test_the_spec_may_set_the_data_dir(
    make: Callable[..., LocalScheduler], state_dir: Path, tmp_path: Path
) -> None:
    scheduler = make(script(REPORT))
    rec = Recorder(scheduler)
    data = str(tmp_path / "data")
    await scheduler.submit(spec(env={"EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST": data}))
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    assert report(state_dir, 1, 0)["env"]["EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST"] == data


async def test_input_files_are_copied_into_each_worker_directory(
    make: Callable[..., LocalScheduler], state_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "input.txt").write_text("some input")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "inner.txt").write_text("inner")
    scheduler = make(script(REPORT))
    rec = Recorder(scheduler)
    inputs = (str(tmp_path / "input.txt"), str(tmp_path / "bundle"))
    await scheduler.submit(spec(n_workers=2, input_files=inputs))
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    for proc in range(2):
        seen = report(state_dir, 1, proc)
        assert seen["files"] == {"input.txt": "some input"}
        assert seen["dirs"] == ["bundle"]
        assert (worker_dir(state_dir, 1, proc) / "bundle" / "inner.txt").read_text() == "inner"


async def test_a_missing_input_file_refuses_the_submit(
    make: Callable[..., LocalScheduler], state_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "there.txt").write_text("x")
    missing = tmp_path / "not-there.txt"
    scheduler = make(script(REPORT))
    rec = Recorder(scheduler)
    with pytest.raises(SchedulerError, match=re.escape(str(missing))):
        await scheduler.submit(spec(input_files=(str(tmp_path / "there.txt"), str(missing))))
    assert await scheduler.find("tf-1") is None
    assert not (state_dir / "ewms-taskforce-tf-1").exists()

    submitted = await scheduler.submit(spec())
    assert submitted.cluster_id == 1  # the refused submit took no cluster id
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")


# --- limits --------------------------------------------------------------------------------------


async def test_each_running_worker_gets_its_own_cores(
    make: Callable[..., LocalScheduler], state_dir: Path, shared: Path
) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    # Both workers report their CPUs while both run (neither exits before the other started).
    both = REPORT + WAIT_FOR_GO
    scheduler = make(script(both), slots=2)
    rec = Recorder(scheduler)
    await scheduler.submit(spec(n_workers=2, env={"TEST_SHARED": str(shared)}, n_cores=1))
    await wait_until(
        lambda: (shared / "started-1.0").exists() and (shared / "started-1.1").exists(),
        "both workers started",
    )
    (shared / "go").touch()
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    cpus = [report(state_dir, 1, proc)["cpus"] for proc in range(2)]
    assert len(cpus[0]) == len(cpus[1]) == 1
    assert cpus[0] != cpus[1]
    assert set(cpus[0] + cpus[1]) <= os.sched_getaffinity(0)


async def test_a_worker_over_its_memory_limit_is_held_and_killed(
    make: Callable[..., LocalScheduler], state_dir: Path
) -> None:
    scheduler = make(script(HOG), memory_check_interval=0.1)
    rec = Recorder(scheduler)
    await scheduler.submit(spec(env={"TEST_MIB": "200"}, memory_bytes=64 * MiB))
    await rec.reaches(1, 0, HELD)
    assert rec.changes(1, 0)[-1].hold_reason == MEMORY_HOLD_REASON
    [held] = records(state_dir, "held")
    assert held["code"] == HOLD_OUT_OF_RESOURCES
    assert held["rss_bytes"] > 64 * MiB

    pid = int((worker_dir(state_dir, 1, 0) / "pid").read_text())
    await wait_until(lambda: bool(records(state_dir, "exited")), "the held worker's exit")
    assert not alive(pid)
    assert rec.states(1, 0) == [IDLE, RUNNING, HELD]
    assert not rec.left(1)  # a held job stays in the queue until removed


async def test_memory_of_a_task_in_its_own_session_counts_and_it_is_killed(
    make: Callable[..., LocalScheduler], state_dir: Path
) -> None:
    scheduler = make(script(HOG_IN_OWN_SESSION), memory_check_interval=0.1)
    rec = Recorder(scheduler)
    await scheduler.submit(spec(memory_bytes=64 * MiB))
    await rec.reaches(1, 0, HELD)
    assert rec.changes(1, 0)[-1].hold_reason == MEMORY_HOLD_REASON
    child = int((worker_dir(state_dir, 1, 0) / "child").read_text())
    await wait_until(lambda: not alive(child), "the task's end", within=30)


async def test_a_worker_within_its_memory_limit_completes(
    make: Callable[..., LocalScheduler], shared: Path
) -> None:
    scheduler = make(script(WAIT_FOR_GO), memory_check_interval=0.05)
    rec = Recorder(scheduler)
    await scheduler.submit(spec(env={"TEST_SHARED": str(shared)}, memory_bytes=256 * MiB))
    await wait_until(lambda: (shared / "started-1.0").exists(), "the worker's start")
    await asyncio.sleep(0.5)  # not synchronisation: lets the sampler look at it several times
    (shared / "go").touch()
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    assert rec.states(1, 0) == [IDLE, RUNNING, COMPLETED]


async def test_a_worker_over_its_runtime_is_held_and_killed(
    make: Callable[..., LocalScheduler], state_dir: Path
) -> None:
    scheduler = make(script(ON_TERM))
    rec = Recorder(scheduler)
    await scheduler.submit(spec(env={"TEST_ON_TERM": "trap"}, max_runtime_seconds=1))
    await rec.reaches(1, 0, HELD)
    assert rec.changes(1, 0)[-1].hold_reason == runtime_hold_reason(1)
    assert runtime_hold_reason(1) == "The job exceeded allowed execute duration of 1 seconds"
    [held] = records(state_dir, "held")
    assert held["code"] == HOLD_EXECUTE_EXCEEDED

    directory = worker_dir(state_dir, 1, 0)
    pid = int((directory / "pid").read_text())
    await wait_until(lambda: bool(records(state_dir, "exited")), "the held worker's exit")
    assert not alive(pid)
    assert (directory / "got-term").exists()  # SIGTERM first: the pilot drains
    assert rec.state(1, 0) == HELD
    assert not rec.left(1)

    await scheduler.remove(1, "done with it")
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    assert rec.states(1, 0) == [IDLE, RUNNING, HELD, REMOVED]


async def test_a_worker_that_cannot_start_is_held(
    make: Callable[..., LocalScheduler], state_dir: Path, tmp_path: Path
) -> None:
    scheduler = make([str(tmp_path / "no-such-pilot")])
    rec = Recorder(scheduler)
    await scheduler.submit(spec())
    await rec.reaches(1, 0, HELD)
    assert "no-such-pilot" in rec.changes(1, 0)[-1].hold_reason
    [held] = records(state_dir, "held")
    assert held["code"] == HOLD_FAILED_TO_CREATE_PROCESS


# --- removal -------------------------------------------------------------------------------------


async def test_remove_sends_sigterm_first(
    make: Callable[..., LocalScheduler], state_dir: Path
) -> None:
    scheduler = make(script(ON_TERM), kill_grace=30.0)
    rec = Recorder(scheduler)
    await scheduler.submit(spec(env={"TEST_ON_TERM": "trap"}))
    directory = worker_dir(state_dir, 1, 0)
    await wait_until(lambda: (directory / "ready").exists(), "the worker's signal handler")

    await scheduler.remove(1, "the workflow is done")
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    assert rec.states(1, 0) == [IDLE, RUNNING, REMOVED]
    assert (directory / "got-term").read_text() == "yes"
    [aborted] = records(state_dir, "aborted")
    assert aborted["exit_code"] == 0  # it stopped by itself, well before the SIGKILL
    [removal] = records(state_dir, "remove")
    assert removal["reason"] == "the workflow is done"


async def test_remove_kills_a_worker_that_ignores_sigterm_after_the_grace(
    make: Callable[..., LocalScheduler], state_dir: Path
) -> None:
    scheduler = make(script(ON_TERM), kill_grace=0.5)
    rec = Recorder(scheduler)
    await scheduler.submit(spec(env={"TEST_ON_TERM": "ignore"}))
    directory = worker_dir(state_dir, 1, 0)
    await wait_until(lambda: (directory / "ready").exists(), "the worker ignoring SIGTERM")
    pid = int((directory / "pid").read_text())

    await scheduler.remove(1, "the workflow is done")
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    assert rec.states(1, 0) == [IDLE, RUNNING, REMOVED]
    [aborted] = records(state_dir, "aborted")
    assert aborted["exit_code"] == -signal.SIGKILL
    assert not alive(pid)


async def test_remove_drops_idle_workers_at_once(
    make: Callable[..., LocalScheduler], state_dir: Path, shared: Path
) -> None:
    scheduler = make(script(WAIT_FOR_GO), slots=1, kill_grace=0.5)
    rec = Recorder(scheduler)
    await scheduler.submit(spec(n_workers=2, env={"TEST_SHARED": str(shared)}))
    await rec.reaches(1, 0, RUNNING)

    await scheduler.remove(1, "cancelled")
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    assert rec.states(1, 1) == [IDLE, REMOVED]
    assert rec.states(1, 0) == [IDLE, RUNNING, REMOVED]
    assert rec.index(1, 1, REMOVED) < rec.index(1, 0, REMOVED)
    assert not (shared / "started-1.1").exists()


async def test_removing_a_cluster_that_left_is_no_error_and_an_unknown_one_is(
    make: Callable[..., LocalScheduler],
) -> None:
    scheduler = make(script("pass"))
    rec = Recorder(scheduler)
    await scheduler.submit(spec())
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    await scheduler.remove(1, "again")
    assert rec.states(1, 0) == [IDLE, RUNNING, COMPLETED]
    with pytest.raises(SchedulerError, match="cluster 7"):
        await scheduler.remove(7, "never was")


async def test_shutdown_removes_every_worker_and_waits_for_them(
    make: Callable[..., LocalScheduler], state_dir: Path
) -> None:
    scheduler = make(script(ON_TERM), slots=1, kill_grace=30.0)
    rec = Recorder(scheduler)
    await scheduler.submit(spec(n_workers=2, env={"TEST_ON_TERM": "ignore"}))
    directory = worker_dir(state_dir, 1, 0)
    await wait_until(lambda: (directory / "ready").exists(), "the worker ignoring SIGTERM")
    pid = int((directory / "pid").read_text())

    await scheduler.shutdown(grace=0.5)
    assert not alive(pid)
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    assert rec.states(1, 0) == [IDLE, RUNNING, REMOVED]
    assert rec.states(1, 1) == [IDLE, REMOVED]


# --- restarts ------------------------------------------------------------------------------------


async def test_a_new_scheduler_adopts_running_workers_and_starts_idle_ones(
    make: Callable[..., LocalScheduler], state_dir: Path, shared: Path
) -> None:
    env = {"TEST_SHARED": str(shared)}
    first = make(script(WAIT_FOR_GO), slots=1)
    first_rec = Recorder(first)
    await first.submit(spec(n_workers=2, env=env))
    await first_rec.reaches(1, 0, RUNNING)
    await wait_until(lambda: (shared / "started-1.0").exists(), "the worker's start")
    pid = int((shared / "started-1.0").read_text())
    await first.close()
    assert alive(pid)  # closing leaves the workers running

    second = make(script(WAIT_FOR_GO), slots=1)
    found = await second.find("tf-1")
    assert found is not None and (found.cluster_id, found.n_workers) == (1, 2)
    rec = Recorder(second)
    await second.adopt([found])
    await rec.until(lambda: len(rec.events) >= 2, "the current states")
    assert [(e.proc_id, e.state) for e in rec.events[:2] if isinstance(e, JobChange)] == [
        (0, RUNNING),
        (1, IDLE),
    ]
    assert not (shared / "started-1.1").exists()  # the slot is still the adopted worker's

    (shared / "go").touch()
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    assert rec.states(1, 0) == [RUNNING, COMPLETED]
    assert rec.states(1, 1) == [IDLE, RUNNING, COMPLETED]
    assert [r["proc"] for r in records(state_dir, "execute")] == [0, 1]  # nothing ran twice
    assert len(records(state_dir, "submit")) == 1
    terminated = {r["proc"]: r["exit_code"] for r in records(state_dir, "terminated")}
    assert terminated == {0: 0, 1: 0}  # still this process's child, so its status is known

    assert (await second.submit(spec("tf-2", env=env))).cluster_id == 2
    await rec.until(lambda: rec.left(2), "cluster 2 leaving")
    await second.close()

    third = make(script(WAIT_FOR_GO))
    third_rec = Recorder(third)
    await third.adopt([])
    await third_rec.until(lambda: third_rec.left(1) and third_rec.left(2), "the clusters' ends")
    assert third_rec.states(1, 0) == third_rec.states(1, 1) == [COMPLETED]
    assert (await third.submit(spec("tf-3", env=env))).cluster_id == 3


async def test_a_removal_under_way_is_finished_by_the_next_scheduler(
    make: Callable[..., LocalScheduler], state_dir: Path
) -> None:
    first = make(script(ON_TERM), kill_grace=1.0)
    await first.submit(spec(n_workers=1, env={"TEST_ON_TERM": "ignore"}))
    directory = worker_dir(state_dir, 1, 0)
    await wait_until(lambda: (directory / "ready").exists(), "the worker ignoring SIGTERM")
    pid = int((directory / "pid").read_text())
    await first.remove(1, "cancelled")
    await first.close()  # before the SIGKILL is due

    second = make(script(ON_TERM), kill_grace=1.0)
    rec = Recorder(second)
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    assert rec.states(1, 0) == [RUNNING, REMOVED]
    assert not alive(pid)


async def test_a_torn_last_record_is_dropped_and_a_corrupt_one_refused(
    make: Callable[..., LocalScheduler], state_dir: Path
) -> None:
    first = make(script("pass"))
    rec = Recorder(first)
    await first.submit(spec())
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    await first.close()
    log = state_dir / LOG_NAME
    with log.open("a") as f:
        f.write('{"event": "submit", "clus')  # a crash in the middle of a write

    second = make(script("pass"))
    assert (await second.find("tf-1")) is not None
    assert log.read_text().endswith("\n")
    assert (await second.submit(spec("tf-2"))).cluster_id == 2
    await second.close()

    with log.open("a") as f:
        f.write("not json\n")
    with pytest.raises(SchedulerError, match=f"{LOG_NAME}:\\d+: not a JSON record"):
        LocalScheduler(state_dir, command=script("pass"))


# --- how workers ended ---------------------------------------------------------------------------


async def test_a_worker_killed_by_a_signal_completes_with_the_signal_as_its_exit(
    make: Callable[..., LocalScheduler], shared: Path
) -> None:
    # As HTCondor's JOB_TERMINATED event: "Abnormal termination (signal 9)", not a plain end.
    scheduler = make(script(WAIT_FOR_GO), slots=2)
    rec = Recorder(scheduler)
    await scheduler.submit(spec(n_workers=2, env={"TEST_SHARED": str(shared), "TEST_EXIT": "3"}))
    await wait_until(lambda: (shared / "started-1.0").exists(), "worker 1.0's start")
    os.kill(int((shared / "started-1.0").read_text()), signal.SIGKILL)
    await rec.reaches(1, 0, COMPLETED)
    (shared / "go-1.1").touch()
    await rec.until(lambda: rec.left(1), "cluster 1 leaving")
    assert rec.changes(1, 0)[-1].job_exit == JobExit(signal=signal.SIGKILL)
    assert rec.changes(1, 1)[-1].job_exit == JobExit(exit_code=3)
    assert all(c.job_exit is None for c in rec.changes(1, 0)[:-1])  # only once it ended
    await scheduler.close()

    # A restarted TMS sends the same ends again (its full snapshot after a reconnect).
    replayed = make(script(WAIT_FOR_GO))
    again = Recorder(replayed)
    await replayed.adopt([])
    await again.until(lambda: again.left(1), "cluster 1's end")
    assert [c.job_exit for c in again.changes(1, 0) + again.changes(1, 1)] == [
        JobExit(signal=signal.SIGKILL),
        JobExit(exit_code=3),
    ]
