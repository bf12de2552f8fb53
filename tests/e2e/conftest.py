"""End-to-end helpers: the ``ewms`` CLI and its services as real subprocesses (WMS, local TMS,
pilots), inspected through the WMS's gRPC API with the admin token of its data directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from ewms.v1 import taskforce_pb2, workflow_service_pb2, workflow_service_pb2_grpc
from tests.conftest import RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL, ROOT, require_rabbitmq

EXAMPLES = ROOT / "examples"
T = TypeVar("T")


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
        EWMS_RABBITMQ_URL=RABBITMQ_URL,
        EWMS_RABBITMQ_MANAGEMENT_URL=RABBITMQ_MANAGEMENT_URL,
        EWMS_LOG_LEVEL="INFO",
    )
    env.pop("EWMS_TOKEN", None)
    env.pop("EWMS_WMS_ADDRESS", None)
    env.update(extra)
    return env


def ewms_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", *args]


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``check`` (a test's observation of real processes) until it returns a value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class Proc:
    """A service subprocess with its output in a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        self._fh = log.open("ab")
        self.popen = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._fh.close()
        return self.popen.returncode


class Cluster:
    """A WMS and a local TMS as subprocesses on one data directory."""

    def __init__(self, root: Path, backend: str = "embedded", **wms_env: str) -> None:
        self.root = root
        self.data_dir = root / "wms"
        self.state_dir = root / "tms"
        self.backend = backend
        self.wms_env = wms_env
        self.wms: Proc | None = None
        self.tms: Proc | None = None
        self.address = ""

    def start_wms(self, port: int = 0) -> None:
        """Start the WMS (again, after a stop: on the same data directory; pass ``port`` to come
        back on the address the TMS and pilots know)."""
        # ``wms_env`` may name other locations (the TMS serves "local").
        defaults = {"EWMS_QUEUE_BACKEND": self.backend, "EWMS_CLUSTER_LOCATIONS": "local"}
        env = cli_env(**{**defaults, **self.wms_env})
        log = self.root / "wms.log"
        start = log.stat().st_size if log.exists() else 0
        self.wms = Proc(
            ewms_cmd(
                "wms",
                "serve",
                "--port",
                str(port),
                "--http-port",
                "0",
                "--data-dir",
                str(self.data_dir),
            ),
            log,
            env,
        )

        def port() -> int | None:
            for line in log.read_bytes()[start:].decode(errors="replace").splitlines():
                if '"wms listening"' in line:
                    return int(json.loads(line)["grpc_port"])
            if self.wms is not None and self.wms.popen.poll() is not None:
                raise AssertionError(f"the WMS exited:\n{log.read_text()}")
            return None

        self.address = f"127.0.0.1:{wait_for(port, 30, 'the WMS to listen')}"

    @property
    def wms_port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def start_tms(self, slots: int = 2, **env: str) -> Proc:
        """Start a local TMS; ``env`` adds to its environment (e.g. ``EWMS_TMS_PILOT_ENV``)."""
        self.tms = Proc(
            ewms_cmd(
                "tms",
                "serve",
                "--location",
                "local",
                "--scheduler",
                "local",
                "--state-dir",
                str(self.state_dir),
                "--slots",
                str(slots),
                "--wms",
                self.address,
                "--data-dir",
                str(self.data_dir),
            ),
            self.root / "tms.log",
            cli_env(**env),
        )
        wait_for(lambda: '"tms connected"' in self.tms_text(), 30, "the TMS to connect")
        return self.tms

    def tms_text(self) -> str:
        return (self.root / "tms.log").read_text(errors="replace") if self.tms else ""

    def token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def stub(self) -> tuple[workflow_service_pb2_grpc.WorkflowServiceStub, grpc.Channel]:
        channel = grpc.insecure_channel(self.address)
        return workflow_service_pb2_grpc.WorkflowServiceStub(channel), channel

    def taskforces(self) -> list[taskforce_pb2.Taskforce]:
        stub, channel = self.stub()
        with channel:
            resp = stub.ListTaskforces(
                workflow_service_pb2.ListTaskforcesRequest(page_size=1000),
                metadata=(("authorization", f"Bearer {self.token()}"),),
                timeout=10,
            )
        return list(resp.taskforces)

    def job_log(self) -> list[dict[str, Any]]:
        path = self.state_dir / "local-schedd.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def run(self, *args: str, **popen: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ewms_cmd("run", *args, "--wms", self.address, "--data-dir", str(self.data_dir)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            **popen,
        )

    def close(self) -> None:
        for proc in (self.tms, self.wms):
            if proc is not None:
                proc.stop()


@pytest.fixture(params=["embedded", "rabbitmq"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "rabbitmq":
        require_rabbitmq()
    return str(request.param)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(backend: str = "embedded", **wms_env: str) -> Cluster:
        c = Cluster(tmp_path / f"cluster-{len(made)}", backend, **wms_env)
        c.root.mkdir(parents=True)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
