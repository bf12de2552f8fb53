"""Shared fixtures: a real WMS on 127.0.0.1:0 with its own data directory, and tokens."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ewms.v1 import workflow_service_pb2_grpc
from services.auth import Role
from services.config import ClusterLocations, WmsSettings
from services.wms import RunningWms, start_wms

_OWN_REPORT = pytest.StashKey[str]()
ROOT = Path(__file__).resolve().parent.parent
# The seed's location "sub-2" is configured as an alias of "osg", as the original did.
LOCATIONS = "local,osg,sub-2=osg"


def seed_request() -> dict[str, Any]:
    """The original EWMS README's example workflow request (seed 002), unchanged."""
    return json.loads((ROOT / "examples" / "seed-workflow.json").read_text())


def wms_settings(data_dir: Path) -> WmsSettings:
    """Settings of a test WMS: loopback, any free port, LOCATIONS."""
    return WmsSettings(
        data_dir=data_dir,
        grpc_host="127.0.0.1",
        grpc_port=0,
        cluster_locations=ClusterLocations.parse(LOCATIONS),
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh WMS data directory."""
    return tmp_path / "wms-data"


@pytest.fixture
async def wms(data_dir: Path) -> AsyncIterator[RunningWms]:
    """A running WMS; stopped after the test."""
    running = await start_wms(wms_settings(data_dir))
    try:
        yield running
    finally:
        await running.stop(grace=None)


@pytest.fixture
async def channel(wms: RunningWms) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the test WMS."""
    async with grpc.aio.insecure_channel(wms.address) as ch:
        yield ch


@pytest.fixture
def workflows(channel: grpc.aio.Channel) -> workflow_service_pb2_grpc.WorkflowServiceStub:
    """A WorkflowService stub on the test WMS (pass metadata=auth(...) per call)."""
    return workflow_service_pb2_grpc.WorkflowServiceStub(channel)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def token_for(wms: RunningWms) -> Any:
    """Mint a token on the test WMS: ``token_for("alice")`` (role user), or with ``role=``."""

    def mint(subject: str, role: Role = Role.USER, ttl: int = 3600) -> str:
        return wms.authority.mint(subject, role, ttl)

    return mint


@pytest.fixture
def alice(token_for: Any) -> tuple[tuple[str, str], ...]:
    """Metadata of the user alice."""
    return bearer(token_for("alice"))


@pytest.fixture
def bob(token_for: Any) -> tuple[tuple[str, str], ...]:
    """Metadata of the user bob."""
    return bearer(token_for("bob"))


@pytest.fixture
def admin(token_for: Any) -> tuple[tuple[str, str], ...]:
    """Metadata of an admin."""
    return bearer(token_for("root", Role.ADMIN))


def buf_path() -> str | None:
    """The buf CLI, if installed (it comes with the test extra): on PATH, or next to this
    interpreter (a virtual environment that is not activated)."""
    beside = Path(sys.executable).parent / "buf"
    return shutil.which("buf") or (str(beside) if beside.exists() else None)


RABBITMQ_URL = os.environ.get("EWMS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
RABBITMQ_MANAGEMENT_URL = os.environ.get(
    "EWMS_TEST_RABBITMQ_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672"
)


def rabbitmq_problem() -> str | None:
    """Why the test RabbitMQ cannot be used (None if it can): the AMQP port must accept connections
    and the management API must answer."""
    amqp = urllib.parse.urlsplit(RABBITMQ_URL)
    try:
        socket.create_connection((amqp.hostname or "127.0.0.1", amqp.port or 5672), 2).close()
    except OSError as exc:
        return f"no RabbitMQ broker at {amqp.hostname}:{amqp.port or 5672} ({exc})"
    mgmt = urllib.parse.urlsplit(RABBITMQ_MANAGEMENT_URL)
    request = urllib.request.Request(f"{mgmt.scheme}://{mgmt.hostname}:{mgmt.port}/api/overview")
    creds = base64.b64encode(f"{mgmt.username}:{mgmt.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {creds}")
    try:
        with urllib.request.urlopen(request, timeout=5):
            pass
    except OSError as exc:
        return (
            f"RabbitMQ management API not reachable at {mgmt.hostname}:{mgmt.port} ({exc}); "
            "run 'rabbitmq-plugins enable rabbitmq_management'"
        )
    return None


def require_rabbitmq() -> None:
    """Skip the calling test when no usable RabbitMQ is reachable -- or fail it when the
    environment requires one (CI is set, as .ci/run does)."""
    problem = rabbitmq_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"RabbitMQ required (CI is set) but unusable: {problem}")
    pytest.skip(f"needs RabbitMQ: {problem}")


RELIABILITY_HEADER = ["scenario", "backend", "in", "out", "dup", "lost", "recovery s", "detail"]


def pytest_configure(config: pytest.Config) -> None:
    """Give the run a file for the reliability suite's outcomes (see tests/reliability), set before
    pytest-xdist starts its workers so they inherit it."""
    if hasattr(config, "workerinput") or os.environ.get("EWMS_RELIABILITY_REPORT"):
        return
    fd, path = tempfile.mkstemp(prefix="ewms-reliability-", suffix=".jsonl")
    os.close(fd)
    os.environ["EWMS_RELIABILITY_REPORT"] = path
    config.stash[_OWN_REPORT] = path


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Print the reliability outcomes recorded in this run as a markdown table."""
    if hasattr(config, "workerinput"):
        return
    path = os.environ.get("EWMS_RELIABILITY_REPORT", "")
    rows = []
    if path and os.path.exists(path):
        with open(path) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    own = config.stash.get(_OWN_REPORT, None)
    if own:
        os.unlink(own)
    if not rows:
        return

    def show(v: object) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    terminalreporter.section("reliability outcomes")
    terminalreporter.write_line("| " + " | ".join(RELIABILITY_HEADER) + " |")
    for r in sorted(rows, key=lambda r: (r["scenario"], r["backend"])):
        cells = [r["scenario"], r["backend"]]
        cells += [
            show(r[k]) for k in ("events_in", "events_out", "duplicates", "lost", "recovery_s")
        ]
        cells.append(r.get("detail", ""))
        terminalreporter.write_line("| " + " | ".join(cells) + " |")
