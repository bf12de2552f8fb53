"""Runs one launched command through the pilot's spawner and measures it, without blocking the
event loop.

The :class:`~services.pilot.spawner.Spawner`'s helper process starts the command when one of its
slots is free, in its own session (so its whole process group can be signalled), with stdout and
stderr going straight to files, and reaps it with ``os.wait4``, which also yields its resource use
(CPU user/system, max RSS). Nothing here forks.

A timeout sends SIGTERM to the process group, then SIGKILL after a grace period; after any exit the
group is killed so no grandchild outlives its task.

The command's executable is looked up in its own ``PATH`` once and remembered, instead of by
``exec`` in every child (tried in each ``PATH`` directory in turn).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.pilot.failures import (
    ContainerRunError,
    TaskTimeoutError,
    extract_error,
    stderr_excerpt,
    stderr_tail,
)
from services.pilot.runtimes import Launch
from services.pilot.spawner import Exit, Spawner, SpawnerLost


@dataclass(frozen=True)
class RunResult:
    """How a run ended and what it used."""

    exit_code: int  # the exit status, or -signal when killed by a signal
    wall_seconds: float
    cpu_user: float
    cpu_system: float
    max_rss_bytes: int


@dataclass(frozen=True)
class _Ended:
    exit_code: int
    cpu_user: float = 0.0
    cpu_system: float = 0.0
    max_rss_bytes: int = 0


class Running:
    """One spawned child: await :meth:`wait`; :meth:`terminate` kills its whole group."""

    def __init__(
        self, pid: int, slot: int, started: float, signal_group: Callable[[int], None]
    ) -> None:
        self.pid = pid
        self.slot = slot  # which of the spawner's slots it runs in
        self.started = started
        self._signal_group = signal_group
        self._loop = asyncio.get_running_loop()
        self._ended: _Ended | BaseException | None = None
        # One future per waiter, completed directly when the child is reaped (a cancelled waiter
        # cancels only its own).
        self._waiters: list[asyncio.Future[_Ended]] = []

    def finish(self, ended: _Ended | BaseException) -> None:
        """The child was reaped (or can no longer be watched)."""
        if self._ended is not None:
            return
        self._ended = ended
        for waiter in self._waiters:
            if waiter.done():
                continue
            if isinstance(ended, BaseException):
                waiter.set_exception(ended)
            else:
                waiter.set_result(ended)
        self._waiters.clear()

    def signal_group(self, sig: int) -> None:
        """Signal the child's process group (it leads its own session)."""
        self._signal_group(sig)

    async def wait(self) -> _Ended:
        """How it ended, once it has been reaped."""
        ended = self._ended
        if ended is None:
            waiter: asyncio.Future[_Ended] = self._loop.create_future()
            self._waiters.append(waiter)
            return await waiter
        if isinstance(ended, BaseException):
            raise ended
        return ended

    async def terminate(self, grace: float) -> None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds if the child still runs."""
        self.signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), grace)
        except TimeoutError:
            self.signal_group(signal.SIGKILL)
            await self.wait()
        self.signal_group(signal.SIGKILL)


_executables: dict[tuple[str, str | None], str] = {}


def _executable(launch: Launch) -> str | None:
    """The absolute path ``exec`` would find for the command in its own PATH (None: let ``exec``
    search, e.g. when it finds nothing here)."""
    name = launch.argv[0]
    if "/" in name:
        return None
    key = (name, launch.env.get("PATH"))
    found = _executables.get(key)
    if found is None:
        found = shutil.which(name, path=key[1] or os.defpath)
        if found is None:
            return None
        _executables[key] = found
    return found


def _output_fds(stdout: Path | int, stderr: Path | int) -> tuple[int, int]:
    """Descriptors for the child's stdout and stderr (paths are opened; descriptors given are
    taken over)."""
    given = [target for target in (stdout, stderr) if isinstance(target, int)]
    fds: list[int] = []
    try:
        for target in (stdout, stderr):
            if isinstance(target, int):
                fds.append(target)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                fds.append(os.open(target, flags, 0o644))
    except OSError:
        for fd in {*given, *fds}:
            os.close(fd)
        raise
    return fds[0], fds[1]


async def _start(
    spawner: Spawner,
    launch: Launch,
    stdout: int,
    stderr: int,
    alias: str,
    executable: str | None,
) -> Running:
    """Hand the task to the spawner and wait until it runs (it may wait for a free slot)."""
    running: Running | None = None
    early: list[Exit | SpawnerLost] = []

    def on_exit(result: Exit | SpawnerLost) -> None:
        if running is None:
            early.append(result)
        elif isinstance(result, SpawnerLost):
            running.finish(result)
        else:
            code = os.waitstatus_to_exitcode(result.wait_status)
            running.finish(_Ended(code, result.user, result.system, result.max_rss_kib * 1024))

    pending = spawner.spawn(
        launch.argv, launch.env, str(launch.cwd), stdout, stderr, on_exit, executable=executable
    )
    try:
        pid, slot = await pending.started
    except asyncio.CancelledError:
        spawner.withdraw(pending)
        raise
    except SpawnerLost:
        raise
    except OSError as exc:
        # The spawner's reason names the command (e.g. "/bin/x does not exist").
        reason = exc.strerror or str(exc)
        raise ContainerRunError(f"{alias} could not start: {reason}") from None
    running = Running(pid, slot, time.monotonic(), lambda sig: spawner.signal(pid, sig))
    for result in early:
        on_exit(result)
    return running


async def run(
    launch: Launch,
    stdout: Path | int,
    stderr: Path | int,
    *,
    alias: str,
    time_limit: float | None,
    kill_grace: float,
    spawner: Spawner,
    stderr_path: Path | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunResult:
    """Run to completion (or timeout) and measure; ``on_start(slot)`` is called when the
    spawner has started it (it waits for one of the spawner's slots). Raises
    :class:`ContainerRunError` (or :class:`TaskTimeoutError`) when the run did not exit 0 (the
    first line of its text says how it ended, with the most useful line of stderr; the last lines
    of stderr follow), and :class:`~services.pilot.spawner.SpawnerLost` when the spawner's helper
    is gone. Cancelling this coroutine withdraws the task or kills its process group."""
    errors = stderr_path or (stderr if isinstance(stderr, Path) else None)
    out_fd, err_fd = _output_fds(stdout, stderr)
    running = await _start(spawner, launch, out_fd, err_fd, alias, _executable(launch))
    if on_start is not None:
        on_start(running.slot)
    timed_out = False
    try:
        try:
            ended = await asyncio.wait_for(running.wait(), time_limit)
        except TimeoutError:
            timed_out = True
            await running.terminate(kill_grace)
            ended = await running.wait()
    except asyncio.CancelledError:
        await asyncio.shield(running.terminate(kill_grace))
        raise
    code = ended.exit_code
    result = RunResult(
        exit_code=code,
        wall_seconds=time.monotonic() - running.started,
        cpu_user=ended.cpu_user,
        cpu_system=ended.cpu_system,
        max_rss_bytes=ended.max_rss_bytes,
    )
    if not timed_out and code == 0:
        return result
    # The first line says what happened (the pilot reports it alone, so that errors group); the
    # end of stderr follows for whoever reads the event's error.
    tail = stderr_tail(errors) if errors else ""
    detail = extract_error(tail)
    if timed_out:
        first = f"{alias} timed out after {time_limit:g}s and was killed" + (
            f" (last stderr: {detail})" if detail else ""
        )
        raise TaskTimeoutError(first + stderr_excerpt(tail), result)
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    first = f"{alias} failed ({how}): {detail or '(no stderr)'}"
    raise ContainerRunError(first + stderr_excerpt(tail), result)
