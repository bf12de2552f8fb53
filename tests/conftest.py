"""Shared fixtures: a real WMS on 127.0.0.1:0 with its own data directory, and tokens."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ewms.v1 import workflow_service_pb2_grpc
from services.auth import Role
from services.config import ClusterLocations, WmsSettings
from services.wms import RunningWms, start_wms

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
