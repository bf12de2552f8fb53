"""Spawning and reaping tasks in a small helper process, so the pilot's event loop never waits for
one.

``subprocess.Popen`` forks with ``vfork``: the calling thread is suspended until the child has
called ``exec``, and on a busy machine the child first waits for a CPU. In the pilot that thread is
the event loop, which also receives events, publishes outputs and acks; measured under load it spent
about a millisecond per task suspended there, more than all its own work. A thread cannot take that
wait (it needs the GIL around the call, and the event loop holds it), so a separate process does:

- the pilot sends ``("spawn", id, argv, changed, removed, cwd, executable)`` with the task's stdout
  and stderr descriptors attached (``SCM_RIGHTS``) over a ``SOCK_SEQPACKET`` socket pair, and goes
  on; the task's environment is the helper's own, cleared at start and then changed as told (so
  each spawn carries only the variables that differ from the last one);
- the helper spawns with ``posix_spawn`` (in a new session, stdin ``/dev/null``), answers
  ``("started", id, pid)`` or ``("failed", id, errno, text)``; on SIGCHLD it reaps with
  ``os.wait4``, kills what the task left in its process group, and reports ``("exited", pid, wait
  status, user CPU, system CPU, max RSS KiB)``;
- ``("signal", pid, signal)`` signals a task's process group, only while the helper has not reaped
  it (so a reused pid is never signalled).

The helper ignores SIGINT and SIGTERM (its tasks do not inherit that: handlers reset on exec): the
pilot decides. When the pilot goes away -- even with SIGKILL -- the socket reaches end of file and
the helper kills every task's process group, reaps them, and exits.

This file is the helper's program too (``python -I -S spawner.py FD``): it imports only the
standard library, so the helper starts in milliseconds and stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import selectors
import signal
import socket
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


ExitCallback = Callable[["Exit | SpawnerLost"], None]


class Spawner:
    """The pilot's side: start with :meth:`start`, then :meth:`spawn` tasks. Used from one event
    loop."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._starting: dict[int, tuple[asyncio.Future[int], ExitCallback]] = {}
        self._on_exit: dict[int, ExitCallback] = {}
        self._lost: SpawnerLost | None = None
        # The environment the helper holds (each spawn sends only what differs).
        self._sent_env: dict[str, str] = {}
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    def start(cls) -> Spawner:
        """Start the helper process (from the event loop that will use it)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), str(theirs.fileno())],
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
    ) -> asyncio.Future[int]:
        """Ask for a task to be started; the future gives its pid (the leader of its own session
        and process group), or the OSError ``Popen`` raised, or SpawnerLost. ``on_exit`` is called
        once, from the event loop, with its :class:`Exit` (or SpawnerLost). ``stdout_fd`` and
        ``stderr_fd`` are handed over and closed here. Cancelling the future kills the task as
        soon as it has started."""
        started: asyncio.Future[int] = self._loop.create_future()
        try:
            if self._lost is not None:
                started.set_exception(self._lost)
                return started
            request_id = next(self._ids)
            sent = self._sent_env
            changed = {k: v for k, v in env.items() if sent.get(k) != v}
            removed = (
                [k for k in sent if k not in env] if len(sent) + len(changed) > len(env) else []
            )
            message = pickle.dumps(("spawn", request_id, argv, changed, removed, cwd, executable))
            try:
                socket.send_fds(self._sock, [message], [stdout_fd, stderr_fd])
            except OSError as exc:
                started.set_exception(self._lose(f"cannot reach it: {exc}"))
                return started
            self._starting[request_id] = (started, on_exit)
            sent.update(changed)
            for k in removed:
                del sent[k]
            return started
        finally:
            os.close(stdout_fd)
            os.close(stderr_fd)

    def signal(self, pid: int, signum: int) -> None:
        """Signal the task's process group, if it has not been reaped yet."""
        if self._lost is None:
            with contextlib.suppress(OSError):
                self._sock.send(pickle.dumps(("signal", pid, signum)))

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
            _, request_id, pid = reply
            started, on_exit = self._starting.pop(request_id)
            if started.cancelled():
                self.signal(pid, signal.SIGKILL)  # nobody waits for it
            else:
                self._on_exit[pid] = on_exit
                started.set_result(pid)
        elif kind == "failed":
            _, request_id, errno_, text = reply
            started, _ = self._starting.pop(request_id)
            if not started.done():
                started.set_exception(OSError(errno_, text))

    def _lose(self, reason: str) -> SpawnerLost:
        if self._lost is None:
            self._lost = SpawnerLost(f"the pilot's spawner process is gone ({reason})")
            for started, _ in self._starting.values():
                if not started.done():
                    started.set_exception(self._lost)
            self._starting.clear()
            callbacks, self._on_exit = list(self._on_exit.values()), {}
            for on_exit in callbacks:
                on_exit(self._lost)
        return self._lost


# --- the helper process -------------------------------------------------------------------------


def _serve(sock: socket.socket) -> None:
    """The helper's loop: requests from the socket; exits signalled by SIGCHLD (through a wake-up
    pipe), then reaped with ``wait4`` -- no descriptor per child."""
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, "request")
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    selector.register(wake_read, selectors.EVENT_READ, "child")
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    running: set[int] = set()

    def reply(*message: Any) -> None:
        sock.send(pickle.dumps(message))

    def reaped(pid: int, status: int, usage: Any) -> None:
        running.discard(pid)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # what the task left behind in its group
        with contextlib.suppress(OSError):
            reply("exited", pid, status, usage.ru_utime, usage.ru_stime, usage.ru_maxrss)

    def reap_exited() -> None:
        while running:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            reaped(pid, status, usage)

    while True:
        for key, _events in selector.select():
            if key.data == "child":
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_read, 512):
                        pass
                reap_exited()
                continue
            try:
                # Close-on-exec: only the descriptors given below reach the task.
                data, fds, _flags, _address = socket.recv_fds(
                    sock, MAX_MESSAGE, 2, socket.MSG_CMSG_CLOEXEC
                )
            except OSError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                for pid in list(running):
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
                for pid in list(running):
                    _, status, usage = os.wait4(pid, 0)
                    reaped(pid, status, usage)
                return
            request = pickle.loads(data)
            if request[0] == "signal":
                _, pid, signum = request
                if pid in running:
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signum)
                continue
            _, request_id, argv, changed, removed, cwd, executable = request
            # The task's environment is this process's own (set once, then only what changes):
            # posix_spawn then takes it as it is.
            for name in removed:
                del os.environ[name]
            os.environ.update(changed)
            try:
                # The child starts in the task's directory: this process's own, as it has no use
                # for one. posix_spawn (vfork and exec in C, no Python in between) in a new
                # session, with the signals Python ignores back to their defaults.
                os.chdir(cwd)
                actions = [
                    (os.POSIX_SPAWN_DUP2, devnull, 0),
                    (os.POSIX_SPAWN_DUP2, fds[0], 1),
                    (os.POSIX_SPAWN_DUP2, fds[1], 2),
                ]
                options: dict[str, Any] = {
                    "file_actions": actions,
                    "setsid": True,
                    "setsigdef": (signal.SIGPIPE, signal.SIGXFSZ),
                }
                if executable:
                    pid = os.posix_spawn(executable, argv, os.environ, **options)
                else:
                    pid = os.posix_spawnp(argv[0], argv, os.environ, **options)
            except OSError as exc:
                reply("failed", request_id, exc.errno, exc.strerror or str(exc))
                continue
            finally:
                for fd in fds:
                    os.close(fd)
            running.add(pid)
            reply("started", request_id, pid)


def main() -> None:
    """``python -I -S spawner.py FD``: serve the pilot on socket FD until it goes away."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: None)
    os.environ.clear()  # tasks get exactly what the pilot sends (never its own settings)
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.set_inheritable(False)
    _serve(sock)


if __name__ == "__main__":
    main()
