"""Runs one launched command without blocking the event loop, and measures it.

The child is spawned in its own session (so its whole process group can be signalled) with stdout
and stderr going straight to files, and is reaped with ``os.wait4``, which also yields its resource
use (CPU user/system, max RSS). Spawning uses ``subprocess.Popen`` (fork+exec in one step, as
asyncio's own subprocesses do), never a bare fork, so it is safe after gRPC has started. Two ways:

- with a :class:`~services.pilot.spawner.Spawner` (the pilot's tasks), its helper process spawns
  and reaps, so the event loop is never suspended in ``vfork``;
- without (the init task, and tools), here, reaped through a pidfd watched by the event loop.

A timeout sends SIGTERM to the process group, then SIGKILL after a grace period; after any exit the
group is killed so no grandchild outlives its task.

The command's executable is looked up in its own ``PATH`` once and remembered, instead of by
``exec`` in every child (tried in each ``PATH`` directory in turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.pilot.failures import ContainerRunError, TaskTimeoutError, extract_error, stderr_tail
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

    def __init__(self, pid: int, started: float, signal_group: Callable[[int], None]) -> None:
        self.pid = pid
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

    @property
    def done(self) -> bool:
        """The child has been reaped."""
        return self._ended is not None

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


_devnull = -1
_executables: dict[tuple[str, str | None], str] = {}


def _stdin() -> int:
    """/dev/null for every child's stdin, opened once."""
    global _devnull
    if _devnull < 0:
        _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull


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


def _spawn_here(launch: Launch, stdout: int, stderr: int, alias: str) -> Running:
    """Spawn from this process and reap through a pidfd on the event loop."""
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            launch.argv,
            executable=_executable(launch),
            stdin=_stdin(),
            stdout=stdout,
            stderr=stderr,
            cwd=launch.cwd,
            env=launch.env,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise ContainerRunError(f"{alias} could not start {launch.argv[0]!r}: {exc}") from None
    finally:
        os.close(stdout)
        os.close(stderr)
    pid = proc.pid

    def signal_group(sig: int) -> None:
        if not running.done:  # a reaped pid may be reused
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)

    running = Running(pid, started, signal_group)
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)

    def reap() -> None:
        try:
            got, status, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            got, status, usage = pid, 255 << 8, None  # reaped elsewhere: unknown exit
        if got == 0:
            return
        loop.remove_reader(pidfd)
        os.close(pidfd)
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # what the task left behind in its group
        running.finish(
            _Ended(code, usage.ru_utime, usage.ru_stime, usage.ru_maxrss * 1024)
            if usage
            else _Ended(code)
        )

    # Readable once the child has exited, also if that happened already.
    loop.add_reader(pidfd, reap)
    return running


async def _spawn_with(
    spawner: Spawner, launch: Launch, stdout: int, stderr: int, alias: str
) -> Running:
    """Spawn through the helper process; it reaps and reports the exit."""
    started = time.monotonic()
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
        launch.argv,
        launch.env,
        str(launch.cwd),
        stdout,
        stderr,
        on_exit,
        executable=_executable(launch),
    )
    try:
        pid = await pending
    except SpawnerLost:
        raise
    except OSError as exc:
        raise ContainerRunError(f"{alias} could not start {launch.argv[0]!r}: {exc}") from None
    running = Running(pid, started, lambda sig: spawner.signal(pid, sig))
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
    stderr_path: Path | None = None,
    spawner: Spawner | None = None,
) -> RunResult:
    """Run to completion (or timeout) and measure. Raises :class:`ContainerRunError` (or
    :class:`TaskTimeoutError`) with the error text from stderr when the run did not exit 0, and
    :class:`~services.pilot.spawner.SpawnerLost` when the spawner's helper is gone. Cancelling
    this coroutine kills the process group first."""
    errors = stderr_path or (stderr if isinstance(stderr, Path) else None)
    out_fd, err_fd = _output_fds(stdout, stderr)
    if spawner is None:
        running = _spawn_here(launch, out_fd, err_fd, alias)
    else:
        running = await _spawn_with(spawner, launch, out_fd, err_fd, alias)
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
    if timed_out:
        detail = extract_error(stderr_tail(errors)) if errors else ""
        raise TaskTimeoutError(
            f"{alias} timed out after {time_limit:g}s and was killed"
            + (f" (last stderr: {detail})" if detail else ""),
            result,
        )
    if code != 0:
        detail = (extract_error(stderr_tail(errors)) if errors else "") or "(no stderr)"
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise ContainerRunError(f"{alias} failed ({how}): {detail}", result)
    return result
