"""A private RabbitMQ node for tests that stop and start their broker: its own node name, ports
(AMQP, management, distribution), data, logs and Erlang cookie (a private ``HOME``), so that the
machine's shared broker is never touched. Started from the installed ``rabbitmq-server`` script
itself (not the ``/usr/sbin`` wrapper, which would switch to the ``rabbitmq`` user), as the user
running the tests; stopped with SIGTERM (RabbitMQ's clean shutdown), or killed and deleted at the
end."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SERVER_SCRIPTS = (
    Path("/usr/lib/rabbitmq/bin/rabbitmq-server"),
    Path("/usr/local/lib/rabbitmq/bin/rabbitmq-server"),
)
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def server_script() -> Path | None:
    """The ``rabbitmq-server`` start script, if RabbitMQ is installed."""
    for path in SERVER_SCRIPTS:
        if path.exists():
            return path
    found = shutil.which("rabbitmq-server")
    return Path(found) if found and "/sbin/" not in found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRabbit:
    """One private node in ``root``; :meth:`start` and :meth:`stop` may be repeated (the data
    directory is kept between them, as a restarted broker keeps its durable queues)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = f"ewms-test-{os.getpid()}-{free_port()}@localhost"
        self.port = free_port()
        self.management_port = free_port()
        self.dist_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # Seconds each start took until the AMQP port and the management API answered.
        self.start_seconds: list[float] = []
        root.mkdir(parents=True, exist_ok=True)
        (root / "home").mkdir(exist_ok=True)
        (root / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            f"management.tcp.ip = 127.0.0.1\n"
            f"management.tcp.port = {self.management_port}\n"
        )
        # An empty environment file: the machine's (its node name, its ports) must not apply.
        (root / "rabbitmq-env.conf").write_text("")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def management_url(self) -> str:
        return f"http://guest:guest@127.0.0.1:{self.management_port}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.root / "home"),  # its Erlang cookie
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONF_ENV_FILE=str(self.root / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.root / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.root / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.root / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.root / "log"),
            RABBITMQ_PID_FILE=str(self.root / "rabbit.pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    def start(self) -> float:
        """Start the node and wait until AMQP and the management API answer; the seconds it
        took."""
        script = server_script()
        assert script is not None, "RabbitMQ is not installed"
        t0 = time.monotonic()
        log = (self.root / "server.out").open("ab")
        self.proc = subprocess.Popen(
            [str(script)],
            env=self._env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = t0 + START_TIMEOUT
        while not (self._amqp_open() and self._management_answers()):
            if self.proc.poll() is not None:
                raise AssertionError(f"the private RabbitMQ exited:\n{self.server_log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the private RabbitMQ did not start:\n{self.server_log()}")
            time.sleep(0.2)
        took = time.monotonic() - t0
        self.start_seconds.append(took)
        return took

    def stop(self, *, hard: bool = False) -> None:
        """Stop the node (SIGTERM: a clean shutdown; ``hard``: SIGKILL) and wait for it to
        exit."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # What the node started in its session (e.g. its port helpers) goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def delete(self) -> None:
        """Stop the node at once (its data goes too) and delete its directory."""
        self.stop(hard=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def server_log(self) -> str:
        path = self.root / "server.out"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def _amqp_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def _management_answers(self) -> bool:
        request = urllib.request.Request(f"http://127.0.0.1:{self.management_port}/api/overview")
        creds = base64.b64encode(b"guest:guest").decode()
        request.add_header("Authorization", f"Basic {creds}")
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False


@contextlib.contextmanager
def private_rabbit(root: Path) -> Iterator[PrivateRabbit]:
    """A started private node, stopped and deleted afterwards."""
    node = PrivateRabbit(root)
    try:
        node.start()
        yield node
    finally:
        node.delete()
