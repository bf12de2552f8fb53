"""Runs one launched command without blocking the event loop, and measures it.

The child is spawned in its own session (so its whole process group can be signalled) with stdout
and stderr going straight to files, and is reaped through a pidfd watched by the event loop with
``os.wait4``, which also yields its resource use (CPU user/system, max RSS). Spawning uses
``subprocess.Popen`` (fork+exec in one step, as asyncio's own subprocesses do), never a bare fork,
so it is safe after gRPC has started.

A timeout sends SIGTERM to the process group, then SIGKILL after a grace period; after any exit the
group is killed so no grandchild outlives its task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from services.pilot.failures import ContainerRunError, TaskTimeoutError, extract_error, stderr_tail
from services.pilot.runtimes import Launch


@dataclass(frozen=True)
class RunResult:
    """How a run ended and what it used."""

    exit_code: int  # the exit status, or -signal when killed by a signal
    wall_seconds: float
    cpu_user: float
    cpu_system: float
    max_rss_bytes: int


class Running:
    """One spawned child: await :meth:`wait`; :meth:`terminate` kills its whole group."""

    def __init__(self, proc: subprocess.Popen[bytes], started: float) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.started = started
        self._loop = loop = asyncio.get_running_loop()
        self._result: tuple[int, resource.struct_rusage | None] | None = None
        # One future per waiter, completed directly when the child is reaped (a cancelled waiter
        # cancels only its own).
        self._waiters: list[asyncio.Future[tuple[int, resource.struct_rusage | None]]] = []
        self._fd = os.pidfd_open(self.pid)
        # Readable once the child has exited, also if that happened already.
        loop.add_reader(self._fd, self._reap)

    def _reap(self) -> None:
        if self._result is not None:
            return
        try:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped it (should not happen); report an unknown exit.
            self._finish(255, None)
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        self._finish(code, usage)

    def _finish(self, code: int, usage: resource.struct_rusage | None) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self.proc.returncode = code
        self._result = (code, usage)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(self._result)
        self._waiters.clear()

    def signal_group(self, sig: int) -> None:
        """Signal the child's process group (it leads its own session)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def wait(self) -> tuple[int, resource.struct_rusage | None]:
        """The exit code and resource use, once the child has exited."""
        if self._result is not None:
            return self._result
        waiter: asyncio.Future[tuple[int, resource.struct_rusage | None]]
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        return await waiter

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


def _stdin() -> int:
    """/dev/null for every child's stdin, opened once."""
    global _devnull
    if _devnull < 0:
        _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull


def spawn(launch: Launch, stdout: Path | int, stderr: Path | int, alias: str) -> Running:
    """Start the command with its output going to the two files (paths, or open descriptors
    that this closes)."""
    started = time.monotonic()
    fds: list[int] = []
    try:
        for target in (stdout, stderr):
            if isinstance(target, int):
                fds.append(target)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                fds.append(os.open(target, flags, 0o644))
        proc = subprocess.Popen(
            launch.argv,
            stdin=_stdin(),
            stdout=fds[0],
            stderr=fds[1],
            cwd=launch.cwd,
            env=launch.env,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        raise ContainerRunError(f"{alias} could not start {launch.argv[0]!r}: {exc}") from None
    finally:
        for fd in fds:
            os.close(fd)
    return Running(proc, started)


async def run(
    launch: Launch,
    stdout: Path | int,
    stderr: Path | int,
    *,
    alias: str,
    time_limit: float | None,
    kill_grace: float,
    stderr_path: Path | None = None,
) -> RunResult:
    """Run to completion (or timeout) and measure. Raises :class:`ContainerRunError` (or
    :class:`TaskTimeoutError`) with the error text from stderr when the run did not exit 0.
    Cancelling this coroutine kills the process group first."""
    errors = stderr_path or (stderr if isinstance(stderr, Path) else None)
    running = spawn(launch, stdout, stderr, alias)
    timed_out = False
    try:
        try:
            code, usage = await asyncio.wait_for(running.wait(), time_limit)
        except TimeoutError:
            timed_out = True
            await running.terminate(kill_grace)
            code, usage = await running.wait()
        else:
            # Stragglers left in the group by a finished task.
            running.signal_group(signal.SIGKILL)
    except asyncio.CancelledError:
        await asyncio.shield(running.terminate(kill_grace))
        raise
    result = RunResult(
        exit_code=code,
        wall_seconds=time.monotonic() - running.started,
        cpu_user=usage.ru_utime if usage else 0.0,
        cpu_system=usage.ru_stime if usage else 0.0,
        max_rss_bytes=(usage.ru_maxrss * 1024) if usage else 0,
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
