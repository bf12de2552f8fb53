"""The README user's guide drives one workflow four ways; the Python-client and ``buf curl``
blocks are run here against a real embedded WMS with a local TMS (the curl + jq block runs in
``test_rest_script.py``)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.local_stack import LocalStack, start_local_stack
from tests.conftest import ROOT, wms_settings
from tests.e2e.conftest import cli_env

EXAMPLES = ROOT / "examples"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[LocalStack]:
    data_dir = tmp_path / "data"
    running = await start_local_stack(data_dir, settings=wms_settings(data_dir), slots=2)
    try:
        yield running
    finally:
        await running.stop()


async def run(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_python_client_runs_the_text_transform_workflow(stack: LocalStack) -> None:
    env = cli_env(EWMS_WMS_ADDRESS=stack.address, EWMS_TOKEN=stack.token)
    code, out, err = await run(sys.executable, str(EXAMPLES / "python" / "client.py"), env=env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("workflow WF-")
    assert json.loads(lines[1]) == ["EVENT WORKFLOW", "HELLO", "MANAGEMENT"]
    assert lines[2].startswith("finished WF-")


async def test_buf_curl_creates_the_workflow_through_reflection(stack: LocalStack) -> None:
    buf = shutil.which("buf")
    if buf is None:
        pytest.skip("buf is not installed (pip install buf-bin)")
    code, out, err = await run(
        buf,
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "-H",
        f"authorization: Bearer {stack.token}",
        "-d",
        f"@{EXAMPLES / 'text-transform' / 'workflow.json'}",
        f"http://{stack.address}/ewms.v1.WorkflowService/CreateWorkflow",
        env=cli_env(),
    )
    assert code == 0, err
    created = json.loads(out)
    assert created["workflow"]["workflowId"].startswith("WF-")
    assert sorted(q["alias"] for q in created["queues"]) == ["lines", "shouted"]
