"""The pilot's spawner process (services/pilot/spawner.py) with real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.pilot.spawner import Exit, Spawner, SpawnerLost, Withdrawn

WAIT = 10.0


def outputs(tmp_path: Path, name: str) -> tuple[int, int, Path]:
    """Descriptors for a task's stdout and stderr, and the stdout file."""
    out = tmp_path / f"{name}.out"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    return os.open(out, flags, 0o644), os.open(tmp_path / f"{name}.err", flags, 0o644), out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def eventually_gone(pid: int) -> None:
    deadline = time.monotonic() + WAIT
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        await asyncio.sleep(0.02)


@pytest.fixture
async def spawner() -> AsyncIterator[Spawner]:
    opened = Spawner.start(4)
    try:
        yield opened
    finally:
        await opened.close()


async def start(
    spawner: Spawner, tmp_path: Path, argv: list[str], env: dict[str, str], name: str = "t"
) -> tuple[int, asyncio.Future[Exit | SpawnerLost], Path]:
    out, err, path = outputs(tmp_path, name)
    ended: asyncio.Future[Exit | SpawnerLost] = asyncio.get_running_loop().create_future()
    pending = spawner.spawn(argv, env, str(tmp_path), out, err, ended.set_result)
    pid, _slot = await pending.started
    return pid, ended, path


async def test_a_task_runs_in_its_directory_with_exactly_its_environment(
    spawner: Spawner, tmp_path: Path
) -> None:
    env = {"PATH": os.environ["PATH"], "ONLY": "this"}
    script = "pwd; env | sort; [ -t 0 ] || cat; ps -o sid= -p $$; echo $$; exit 3"
    pid, ended, out = await start(spawner, tmp_path, ["sh", "-c", script], env)
    result = await asyncio.wait_for(ended, WAIT)
    assert isinstance(result, Exit)
    assert os.waitstatus_to_exitcode(result.wait_status) == 3
    lines = out.read_text().splitlines()
    assert lines[0] == str(tmp_path)
    variables = {line.split("=", 1)[0] for line in lines[1:-2]}
    assert variables <= {"PATH", "ONLY", "PWD", "SHLVL", "_"}  # what sh adds itself
    assert "ONLY=this" in lines
    assert lines[-2].strip() == lines[-1] == str(pid)  # leads its own session
    assert result.max_rss_kib > 0


async def test_the_environment_follows_changes_from_one_task_to_the_next(
    spawner: Spawner, tmp_path: Path
) -> None:
    base = {"PATH": os.environ["PATH"], "KEEP": "1", "DROP": "1"}
    _, first, _ = await start(spawner, tmp_path, ["true"], base, "a")
    await asyncio.wait_for(first, WAIT)
    changed = {"PATH": os.environ["PATH"], "KEEP": "2", "NEW": "3"}
    _, second, out = await start(spawner, tmp_path, ["env"], changed, "b")
    await asyncio.wait_for(second, WAIT)
    seen = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert seen == changed


async def test_a_command_that_cannot_start_fails_its_spawn(
    spawner: Spawner, tmp_path: Path
) -> None:
    out, err, _ = outputs(tmp_path, "missing")
    with pytest.raises(OSError) as raised:
        await spawner.spawn(
            ["/nonexistent/command"],
            {},
            str(tmp_path),
            out,
            err,
            lambda _r: None,
            executable="/nonexistent/command",
        ).started
    assert not isinstance(raised.value, SpawnerLost)
    # The helper keeps serving.
    _, ended, _ = await start(spawner, tmp_path, ["true"], {"PATH": os.environ["PATH"]})
    assert isinstance(await asyncio.wait_for(ended, WAIT), Exit)


async def test_signals_reach_the_whole_group_and_leftovers_are_killed_at_exit(
    spawner: Spawner, tmp_path: Path
) -> None:
    env = {"PATH": os.environ["PATH"]}
    # A task that leaves a grandchild behind when it exits.
    pid, ended, out = await start(
        spawner, tmp_path, ["sh", "-c", "sleep 60 & echo $!; exit 0"], env, "leaver"
    )
    await asyncio.wait_for(ended, WAIT)
    await eventually_gone(int(out.read_text().split()[0]))
    # A running task and its child, terminated through the group.
    pid, ended, out = await start(
        spawner, tmp_path, ["sh", "-c", "sleep 60 & echo $!; wait"], env, "runner"
    )
    deadline = time.monotonic() + WAIT
    while not out.read_text():
        assert time.monotonic() < deadline, "the task never started"
        await asyncio.sleep(0.02)
    grandchild = int(out.read_text().split()[0])
    spawner.signal(pid, signal.SIGTERM)
    result = await asyncio.wait_for(ended, WAIT)
    assert isinstance(result, Exit)
    assert os.waitstatus_to_exitcode(result.wait_status) == -signal.SIGTERM
    await eventually_gone(grandchild)


async def test_closing_the_pilot_side_kills_running_tasks(tmp_path: Path) -> None:
    spawner = Spawner.start(1)
    pid, ended, _ = await start(spawner, tmp_path, ["sleep", "60"], {"PATH": os.environ["PATH"]})
    await spawner.close()
    await eventually_gone(pid)
    assert isinstance(await asyncio.wait_for(ended, WAIT), SpawnerLost)


async def test_a_dead_helper_fails_waiters_and_later_spawns(tmp_path: Path) -> None:
    spawner = Spawner.start(1)
    try:
        pid, ended, _ = await start(
            spawner, tmp_path, ["sleep", "60"], {"PATH": os.environ["PATH"]}
        )
        os.kill(spawner.pid, signal.SIGKILL)
        assert isinstance(await asyncio.wait_for(ended, WAIT), SpawnerLost)
        out, err, _ = outputs(tmp_path, "after")
        with pytest.raises(SpawnerLost):
            await spawner.spawn(["true"], {}, str(tmp_path), out, err, lambda _r: None).started
    finally:
        await spawner.close()
        os.kill(pid, signal.SIGKILL)


def running_with(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes() and alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def test_a_spawn_withdrawn_as_it_starts_does_not_keep_running(
    spawner: Spawner, tmp_path: Path
) -> None:
    marker = f"withdrawn-{os.getpid()}-{time.monotonic_ns()}"
    out, err, _ = outputs(tmp_path, "abandoned")
    env = {"PATH": os.environ["PATH"]}
    pending = spawner.spawn(
        ["sh", "-c", "sleep 60; exit 0", marker], env, str(tmp_path), out, err, lambda _r: None
    )
    spawner.withdraw(pending)  # it starts at once (a slot is free): too late to drop
    # A later task's exit is reported after the withdrawn one's start, so its kill is sent.
    _, ended, _ = await start(spawner, tmp_path, ["true"], env, "after")
    await asyncio.wait_for(ended, WAIT)
    assert pending.started.cancelled()
    deadline = time.monotonic() + WAIT
    while running_with(marker):
        assert time.monotonic() < deadline, "the withdrawn task still runs"
        await asyncio.sleep(0.02)


async def test_tasks_beyond_the_slots_wait_and_start_as_slots_free(tmp_path: Path) -> None:
    spawner = Spawner.start(2)
    try:
        env = {"PATH": os.environ["PATH"]}
        script = "date +%s.%N; sleep 0.3; date +%s.%N"
        ended = []
        pendings = []
        for i in range(5):
            out, err, _ = outputs(tmp_path, f"q{i}")
            done: asyncio.Future[Exit | SpawnerLost] = asyncio.get_running_loop().create_future()
            ended.append(done)
            pendings.append(
                spawner.spawn(["sh", "-c", script], env, str(tmp_path), out, err, done.set_result)
            )
        # The last one is withdrawn while it waits: it never runs.
        spawner.withdraw(pendings[4])
        starts = [await asyncio.wait_for(p.started, WAIT) for p in pendings[:4]]
        assert sorted(slot for _, slot in starts[:2]) == [0, 1]
        for done in ended[:4]:
            assert isinstance(await asyncio.wait_for(done, WAIT), Exit)
        assert pendings[4].started.cancelled()
        assert (tmp_path / "q4.out").read_text() == ""
        spans = []
        for i in range(4):
            begin, end = map(float, (tmp_path / f"q{i}.out").read_text().split())
            spans.append((begin, end))
        # Never more than two at once.
        for begin, _ in spans:
            assert sum(1 for b, e in spans if b <= begin < e) <= 2
    finally:
        await spawner.close()


async def test_a_drain_drops_queued_tasks_and_lets_started_ones_finish(tmp_path: Path) -> None:
    # A drain: tasks the helper already started (the pilot has not read their start yet: the
    # drop is sent in the same step as the spawns) run to the end; tasks waiting for a slot
    # never start.
    spawner = Spawner.start(2)
    try:
        env = {"PATH": os.environ["PATH"]}
        ended = []
        pendings = []
        for i in range(4):
            out, err, _ = outputs(tmp_path, f"d{i}")
            done: asyncio.Future[Exit | SpawnerLost] = asyncio.get_running_loop().create_future()
            ended.append(done)
            pendings.append(
                spawner.spawn(
                    ["sh", "-c", f"sleep 0.3; echo ran{i}"],
                    env,
                    str(tmp_path),
                    out,
                    err,
                    done.set_result,
                )
            )
        spawner.drop_queued()
        for pending in pendings[:2]:
            await asyncio.wait_for(pending.started, WAIT)
        for pending in pendings[2:]:
            with pytest.raises(Withdrawn):
                await asyncio.wait_for(pending.started, WAIT)
        for i in range(2):
            result = await asyncio.wait_for(ended[i], WAIT)
            assert isinstance(result, Exit) and result.wait_status == 0
            assert (tmp_path / f"d{i}.out").read_text() == f"ran{i}\n"
        assert [(tmp_path / f"d{i}.out").read_text() for i in (2, 3)] == ["", ""]
        # The spawner still takes new tasks afterwards.
        _, after, _ = await start(spawner, tmp_path, ["true"], env, "after")
        assert isinstance(await asyncio.wait_for(after, WAIT), Exit)
    finally:
        await spawner.close()


async def test_an_argument_the_system_cannot_take_fails_only_that_spawn(
    spawner: Spawner, tmp_path: Path
) -> None:
    out, err, _ = outputs(tmp_path, "nul")
    pending = spawner.spawn(
        ["echo", "a\x00b"], {"PATH": os.environ["PATH"]}, str(tmp_path), out, err, lambda _r: None
    )
    with pytest.raises(OSError) as raised:
        await pending.started
    assert not isinstance(raised.value, SpawnerLost)
    _, ended, _ = await start(spawner, tmp_path, ["true"], {"PATH": os.environ["PATH"]})
    assert isinstance(await asyncio.wait_for(ended, WAIT), Exit)
