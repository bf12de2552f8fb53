"""Spawning and reaping tasks in a small helper process that also keeps the task slots full.

Spawning from the pilot itself (``subprocess.Popen``, ``vfork``) suspends its event loop until the
child has called ``exec``, and on a busy machine the child first waits for a CPU: measured under
load, about a millisecond per task, more than all the loop's own work for that task. A thread
cannot take that wait (it needs the GIL around the call, and the event loop holds it). And with the
loop deciding when a slot is free, the next task starts only after the exit has crossed the loop.
So a separate process owns the slots (``EWMS_PILOT_MAX_CONCURRENT_TASKS``):

- the pilot queues a task with ``("spawn", id, argv, changed, removed, cwd, executable)``, its
  stdout and stderr descriptors attached (``SCM_RIGHTS``), over a ``SOCK_SEQPACKET`` socket pair,
  as soon as the event is staged in; the environment travels as the variables that differ from the
  previous request's;
- the helper starts queued tasks in order while it has a free slot, with ``posix_spawn`` (in a new
  session, stdin ``/dev/null``), and answers ``("started", id, pid, slot)`` or ``("failed", id,
  errno, text)``; on SIGCHLD it reaps with ``os.wait4``, kills what the task left in its process
  group, starts the next queued task at once, then reports ``("exited", pid, wait status, user CPU,
  system CPU, max RSS KiB)``;
- ``("withdraw", id)`` drops a task that has not started (``("withdrawn", id)``); one that started
  meanwhile is killed when its start is reported;
- ``("drop_queued",)`` drops every task that has not started (``("withdrawn", id)`` each) and leaves
  the started ones alone, even those whose start the pilot has not read yet (a drain);
- ``("signal", pid, signal)`` signals a task's process group, only while the helper has not reaped
  it (so a reused pid is never signalled).

The helper ignores SIGINT and SIGTERM (its tasks do not inherit that: handlers reset on exec): the
pilot decides. When the pilot goes away -- even with SIGKILL -- the socket reaches end of file and
the helper kills every task's process group, reaps them, and exits.

This file is the helper's program too (``python -I -S spawner.py FD SLOTS``): it imports only the
standard library, so the helper starts in milliseconds and stays small.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import os
import pickle
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 1 << 20  # one request (the environment makes it a few KiB)


@dataclass(frozen=True)
class Exit:
    """How a spawned task ended."""

    wait_status: int
    user: float
    system: float
    max_rss_kib: int


class SpawnerLost(OSError):
    """The helper process is gone: no task can be started or watched any more."""


class Withdrawn(Exception):
    """The task was dropped from the helper's queue before it started
    (:meth:`Spawner.drop_queued`)."""


ExitCallback = Callable[["Exit | SpawnerLost"], None]


@dataclass
class Pending:
    """A task handed to the helper: ``started`` gives ``(pid, slot)`` once it runs."""

    request_id: int
    started: asyncio.Future[tuple[int, int]]


class Spawner:
    """The pilot's side: start with :meth:`start`, then :meth:`spawn` tasks. Used from one event
    loop."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.Future[tuple[int, int]], ExitCallback]] = {}
        self._on_exit: dict[int, ExitCallback] = {}
        self._lost: SpawnerLost | None = None
        # The environment the helper holds (each spawn sends only what differs).
        self._sent_env: dict[str, str] = {}
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    def start(cls, slots: int) -> Spawner:
        """Start the helper process (from the event loop that will use it); it runs at most
        ``slots`` tasks at once."""
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    os.path.abspath(__file__),
                    str(theirs.fileno()),
                    str(slots),
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        return cls(proc, ours)

    @property
    def pid(self) -> int:
        """The helper's pid."""
        return self._proc.pid

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        stdout_fd: int,
        stderr_fd: int,
        on_exit: ExitCallback,
        executable: str | None = None,
    ) -> Pending:
        """Queue a task: the helper starts it as soon as one of its slots is free. ``started``
        gives its pid (the leader of its own session and process group) and slot, or the OSError
        the spawn raised, or SpawnerLost. ``on_exit`` is called once, from the event loop, with its
        :class:`Exit` (or SpawnerLost). ``stdout_fd`` and ``stderr_fd`` are handed over and closed
        here. Withdraw a task that is no longer wanted with :meth:`withdraw`."""
        started: asyncio.Future[tuple[int, int]] = self._loop.create_future()
        request_id = next(self._ids)
        pending = Pending(request_id, started)
        try:
            if self._lost is not None:
                started.set_exception(self._lost)
                return pending
            sent = self._sent_env
            changed = {k: v for k, v in env.items() if sent.get(k) != v}
            removed = [k for k in sent if k not in env]
            message = pickle.dumps(("spawn", request_id, argv, changed, removed, cwd, executable))
            try:
                socket.send_fds(self._sock, [message], [stdout_fd, stderr_fd])
            except OSError as exc:
                started.set_exception(self._lose(f"cannot reach it: {exc}"))
                return pending
            self._waiting[request_id] = (started, on_exit)
            sent.update(changed)
            for k in removed:
                del sent[k]
            return pending
        finally:
            os.close(stdout_fd)
            os.close(stderr_fd)

    def withdraw(self, pending: Pending) -> None:
        """The task is no longer wanted: dropped if it has not started yet, else killed as soon as
        its start is reported."""
        if not pending.started.done():
            pending.started.cancel()
        if pending.request_id in self._waiting:
            self._send(("withdraw", pending.request_id))

    def drop_queued(self) -> None:
        """Tasks still waiting for a slot will not start: their ``started`` raises
        :class:`Withdrawn`. Tasks the helper has started run on, including those whose start is
        still on its way here (the helper answers in order, so none is lost between the two)."""
        self._send(("drop_queued",))

    def signal(self, pid: int, signum: int) -> None:
        """Signal the task's process group, if it has not been reaped yet."""
        self._send(("signal", pid, signum))

    async def close(self) -> float:
        """End the helper: it kills what still runs, reaps it and exits. Returns the CPU seconds
        the helper used, with the tasks it reaped."""
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._lose("closed")

        def reap() -> float:
            _, status, usage = os.wait4(self._proc.pid, 0)
            self._proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime

        if self._proc.returncode is not None:
            return 0.0
        return await asyncio.to_thread(reap)

    # -- replies -------------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._lost is None:
            with contextlib.suppress(OSError):
                self._sock.send(pickle.dumps(message))

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                data = b""
                reason = f"its socket failed: {exc}"
            else:
                reason = "it exited"
            if not data:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(self._sock.fileno())
                self._lose(reason)
                return
            self._dispatch(pickle.loads(data))

    def _dispatch(self, reply: tuple[Any, ...]) -> None:
        kind = reply[0]
        if kind == "exited":
            _, pid, status, user, system, max_rss = reply
            on_exit = self._on_exit.pop(pid, None)
            if on_exit is not None:
                on_exit(Exit(status, user, system, max_rss))
        elif kind == "started":
            _, request_id, pid, slot = reply
            started, on_exit = self._waiting.pop(request_id)
            if started.cancelled():
                self.signal(pid, signal.SIGKILL)  # withdrawn too late: nobody waits for it
            else:
                self._on_exit[pid] = on_exit
                started.set_result((pid, slot))
        elif kind == "failed":
            _, request_id, errno_, text = reply
            started, _ = self._waiting.pop(request_id)
            if not started.done():
                started.set_exception(OSError(errno_, text))
        elif kind == "withdrawn":
            waiting = self._waiting.pop(reply[1], None)
            if waiting is not None and not waiting[0].done():
                waiting[0].set_exception(Withdrawn())

    def _lose(self, reason: str) -> SpawnerLost:
        if self._lost is None:
            self._lost = SpawnerLost(f"the pilot's spawner process is gone ({reason})")
            for started, _ in self._waiting.values():
                if not started.done():
                    started.set_exception(self._lost)
            self._waiting.clear()
            callbacks, self._on_exit = list(self._on_exit.values()), {}
            for on_exit in callbacks:
                on_exit(self._lost)
        return self._lost


# --- the helper process -------------------------------------------------------------------------


@dataclass
class _Queued:
    request_id: int
    argv: list[str]
    env: dict[str, str]
    cwd: str
    executable: str | None
    fds: list[int]


def _serve(sock: socket.socket, slots: int) -> None:
    """The helper's loop: requests from the socket; exits signalled by SIGCHLD (through a wake-up
    pipe), then reaped with ``wait4`` -- no descriptor per child. Queued tasks start as slots
    free, right after the reaping, without a round trip to the pilot."""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, "request")
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    selector.register(wake_read, selectors.EVENT_READ, "child")
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    running: dict[int, int] = {}  # pid -> slot
    free = list(range(slots - 1, -1, -1))
    queue: collections.deque[_Queued] = collections.deque()
    env: dict[str, str] = {}  # the environment as of the last request

    def reply(*message: Any) -> None:
        with contextlib.suppress(OSError):
            sock.send(pickle.dumps(message))

    def start_queued() -> None:
        while free and queue:
            task = queue.popleft()
            try:
                pid = _spawn(task, devnull)
            except OSError as exc:
                reply("failed", task.request_id, exc.errno, exc.strerror or str(exc))
                continue
            except ValueError as exc:  # e.g. a NUL byte in an argument or variable
                reply("failed", task.request_id, errno.EINVAL, str(exc))
                continue
            finally:
                for fd in task.fds:
                    os.close(fd)
            slot = free.pop()
            running[pid] = slot
            reply("started", task.request_id, pid, slot)

    def reap_exited() -> None:
        exits = []
        while running:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            free.append(running.pop(pid))
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)  # what the task left behind in its group
            exits.append(("exited", pid, status, usage.ru_utime, usage.ru_stime, usage.ru_maxrss))
        start_queued()  # first: the next task waits for nothing but this
        for message in exits:
            reply(*message)

    while True:
        for key, _events in selector.select():
            if key.data == "child":
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_read, 512):
                        pass
                reap_exited()
                continue
            try:
                # Close-on-exec: only the descriptors given to posix_spawn reach the task.
                data, fds, _flags, _address = socket.recv_fds(
                    sock, MAX_MESSAGE, 2, socket.MSG_CMSG_CLOEXEC
                )
            except OSError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                for task in queue:
                    for fd in task.fds:
                        os.close(fd)
                for pid in running:
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
                for pid in list(running):
                    os.wait4(pid, 0)
                return
            request = pickle.loads(data)
            kind = request[0]
            if kind == "signal":
                _, pid, signum = request
                if pid in running:
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signum)
            elif kind == "drop_queued":
                while queue:
                    task = queue.popleft()
                    for fd in task.fds:
                        os.close(fd)
                    reply("withdrawn", task.request_id)
            elif kind == "withdraw":
                for task in queue:
                    if task.request_id == request[1]:
                        queue.remove(task)
                        for fd in task.fds:
                            os.close(fd)
                        reply("withdrawn", task.request_id)
                        break
            else:
                _, request_id, argv, changed, removed, cwd, executable = request
                for name in removed:
                    env.pop(name, None)
                env.update(changed)
                queue.append(_Queued(request_id, argv, dict(env), cwd, executable, fds))
                start_queued()


def _spawn(task: _Queued, devnull: int) -> int:
    """Start one task: posix_spawn (vfork and exec in C, no Python in between) in a new session,
    in the task's directory (this process's own: it has no use for one), with the signals Python
    ignores back to their defaults. An OSError's text says why, naming the command."""
    os.chdir(task.cwd)
    executable = task.executable or _find(task.argv[0], task.env.get("PATH", os.defpath))
    try:
        return os.posix_spawn(
            executable,
            task.argv,
            task.env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0),
                (os.POSIX_SPAWN_DUP2, task.fds[0], 1),
                (os.POSIX_SPAWN_DUP2, task.fds[1], 2),
            ],
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
        )
    except OSError as exc:
        raise OSError(exc.errno, f"{_shown(task.argv[0])}: {exc.strerror or exc}") from None


def _find(name: str, path: str) -> str:
    """The file to execute for the command ``name``: itself if it contains a '/' (relative to the
    task's directory), else the first executable ``name`` in ``path``. OSError says why there is
    none."""
    shown = _shown(name)
    if "/" not in name:
        found = shutil.which(name, path=path)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, f"{shown} not found in PATH ({_short(path)})")
        return found
    try:
        mode = os.stat(name).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{shown} does not exist") from None
    except OSError as exc:
        raise OSError(exc.errno, f"{shown}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, f"{shown} is a directory")
    if not os.access(name, os.X_OK):
        raise PermissionError(errno.EACCES, f"{shown} is not executable")
    return name


def _shown(name: str) -> str:
    """A command as error texts show it: quoted only if it has spaces or unprintable characters."""
    return name if name.isprintable() and " " not in name and name else repr(name)


def _short(path: str, limit: int = 120) -> str:
    """A PATH for an error text: its first directories, within about ``limit`` characters."""
    if not path:
        return "empty"
    dirs = path.split(os.pathsep)
    shown: list[str] = []
    for i, directory in enumerate(dirs):
        if shown and len(os.pathsep.join([*shown, directory])) > limit:
            return os.pathsep.join(shown) + f" and {len(dirs) - i} more"
        shown.append(directory)
    return path


def main() -> None:
    """``python -I -S spawner.py FD SLOTS``: serve the pilot on socket FD until it goes away."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: None)
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.set_inheritable(False)
    _serve(sock, int(sys.argv[2]))


if __name__ == "__main__":
    main()
