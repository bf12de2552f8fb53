"""The WMS's data directory and its files are private to their owner whatever the umask: the
database holds event payloads and broker credentials, the secret signs every token. What is found
looser is tightened at start; what cannot be (another user owns it) is a clear error."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from ewms.v1 import workflow_service_pb2, workflow_service_pb2_grpc
from services.auth import ADMIN_TOKEN_FILE, SECRET_FILE, Role
from services.cli import main as ewms
from services.errors import DataDirInUse
from services.local_stack import start_local_stack
from services.wms import RunningWms, start_wms
from services.wms.store import DB_FILE
from tests.conftest import ROOT, bearer, wms_settings
from tests.wms.requests import workflow_request

PRIVATE_FILES = (DB_FILE, SECRET_FILE, ADMIN_TOKEN_FILE)
SIDE_FILES = (f"{DB_FILE}-wal", f"{DB_FILE}-shm", f"{DB_FILE}-journal")
NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def loosen(data_dir: Path) -> None:
    """Make the data directory and its files readable by all, adding the side files a crash of
    SQLite would leave."""
    for name in SIDE_FILES:
        (data_dir / name).touch()
    for name in PRIVATE_FILES + SIDE_FILES:
        (data_dir / name).chmod(0o644)
    data_dir.chmod(0o755)


def loose_entries(data_dir: Path) -> list[str]:
    """What under ``data_dir`` its group or others may use, with its mode."""
    return [f"{p} {mode(p):04o}" for p in data_dir.rglob("*") if mode(p) & 0o077]


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask most users have (022), which alone would leave files readable by all."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


async def create_workflow(wms: RunningWms) -> str:
    alice = bearer(wms.authority.mint("alice", Role.USER, 3600))
    async with grpc.aio.insecure_channel(wms.address) as channel:
        stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        created = await stub.CreateWorkflow(workflow_request(), metadata=alice)
    return created.workflow.workflow_id


async def list_workflow_ids(wms: RunningWms) -> list[str]:
    admin = bearer(wms.authority.mint("root", Role.ADMIN, 3600))
    async with grpc.aio.insecure_channel(wms.address) as channel:
        stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
        listed = await stub.ListWorkflows(
            workflow_service_pb2.ListWorkflowsRequest(), metadata=admin
        )
    return [wf.workflow_id for wf in listed.workflows]


@pytest.fixture
async def running(data_dir: Path) -> AsyncIterator[RunningWms]:
    """A WMS on a fresh data directory, holding one workflow."""
    wms = await start_wms(wms_settings(data_dir))
    try:
        await create_workflow(wms)
        yield wms
    finally:
        await wms.stop(grace=None)


@pytest.fixture
async def loosened(data_dir: Path) -> str:
    """A data directory a first WMS left with one workflow, then made readable by all (0755 and
    0644), with side files a crash would leave (also 0644). Returns the workflow's id."""
    first = await start_wms(wms_settings(data_dir))
    try:
        workflow_id = await create_workflow(first)
    finally:
        await first.stop(grace=None)
    loosen(data_dir)
    return workflow_id


async def test_running_wms_keeps_its_data_dir_and_files_private(
    running: RunningWms, data_dir: Path
) -> None:
    assert mode(data_dir) == 0o700
    for name in PRIVATE_FILES:
        assert mode(data_dir / name) == 0o600, name
    for name in SIDE_FILES:
        if (data_dir / name).exists():
            assert mode(data_dir / name) == 0o600, name
    assert loose_entries(data_dir) == []


async def test_restarted_wms_tightens_a_loose_data_dir_and_files(
    loosened: str, data_dir: Path
) -> None:
    wms = await start_wms(wms_settings(data_dir))
    try:
        assert mode(data_dir) == 0o700
        for name in PRIVATE_FILES + SIDE_FILES:
            if (data_dir / name).exists():
                assert mode(data_dir / name) == 0o600, name
        assert await list_workflow_ids(wms) == [loosened]
    finally:
        await wms.stop(grace=None)


async def test_tightening_warns_naming_each_path_and_its_old_mode(
    loosened: str, data_dir: Path
) -> None:
    with capture_logs() as logs:
        wms = await start_wms(wms_settings(data_dir))
        await wms.stop(grace=None)

    warned = {
        (e["path"], e["old_mode"])
        for e in logs
        if e["log_level"] == "warning" and e["event"] == "permissions tightened"
    }
    assert (str(data_dir), "0755") in warned
    for name in PRIVATE_FILES + SIDE_FILES:
        assert (str(data_dir / name), "0644") in warned


def test_token_create_makes_a_private_data_dir_and_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "fresh"

    rc = ewms(
        ["token", "create", "--role", "user", "--subject", "alice", "--data-dir", str(data_dir)]
    )

    assert rc == 0 and capsys.readouterr().out.strip()
    assert mode(data_dir) == 0o700
    assert mode(data_dir / SECRET_FILE) == 0o600


async def test_local_stack_keeps_its_tms_state_dir_private(data_dir: Path) -> None:
    stack = await start_local_stack(data_dir, settings=wms_settings(data_dir), slots=1)
    try:
        assert mode(data_dir) == 0o700
        assert mode(data_dir / "tms-local") == 0o700
    finally:
        await stack.stop(grace=1.0)


@pytest.fixture
def root_owned_loose_dir() -> Iterator[Path]:
    """A 0755 directory owned by root, somewhere any user can reach."""
    path = Path(tempfile.mkdtemp(prefix="ewms-not-mine-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to be another user than the owner")
def test_data_dir_of_another_user_is_an_error_naming_it(root_owned_loose_dir: Path) -> None:
    """As a user (nobody) who does not own the data directory: ``ewms token create`` fails with
    exit code 2 and a message naming the directory and its owner."""
    # A fresh interpreter, not a fork: forking a test worker that has threads (gRPC's, xdist's)
    # can leave the child deadlocked on a lock some thread held. It starts as root (the
    # interpreter lives under /root), imports the CLI, then becomes nobody.
    args = ["--role", "user", "--subject", "a", "--data-dir", str(root_owned_loose_dir)]
    script = (
        "import os, sys\n"
        "from services.cli import main\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        f"sys.exit(main({['token', 'create', *args]!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    rc_text, stderr = str(done.returncode), done.stderr

    assert rc_text == "2", stderr
    assert f"cannot make {root_owned_loose_dir} private" in stderr
    assert "owned by uid 0, not by this user (uid 65534)" in stderr
    assert mode(root_owned_loose_dir) == 0o755


async def test_a_second_wms_on_the_same_data_dir_is_refused_naming_it(tmp_path: Path) -> None:
    """Two WMSs on one data directory would hand out the same queue sequence numbers and deliver
    events twice: the second is refused, in-process and from the CLI (exit 1, no traceback), until
    the first has stopped."""
    data_dir = tmp_path / "wms-data"
    first = await start_wms(wms_settings(data_dir))
    try:
        with pytest.raises(DataDirInUse) as refused:
            await start_wms(wms_settings(data_dir))
        assert f"another WMS (pid {os.getpid()}) is serving from the data directory {data_dir}" in (
            str(refused.value)
        )
        args = ["wms", "serve", "--port", "0", "--http-port", "0", "--data-dir", str(data_dir)]
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli",
            *args,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")])},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(cli.communicate(), 60)
        stderr = err.decode()
        assert cli.returncode == 1, stderr
        assert f"error: another WMS (pid {os.getpid()}) is serving from the data directory" in (
            stderr
        )
        assert "Traceback" not in stderr
        assert mode(data_dir / "wms.lock") == 0o600
    finally:
        await first.stop(grace=None)
    again = await start_wms(wms_settings(data_dir))
    await again.stop(grace=None)
