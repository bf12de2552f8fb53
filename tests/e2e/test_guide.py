"""The README user's guide drives one workflow four ways; its ``ewms`` CLI, ``buf curl`` and
Python-client blocks are taken from the README as written and run here against a real embedded WMS
with a local TMS (the curl + jq script runs in ``test_rest_script.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.local_stack import LocalStack, start_local_stack
from tests.conftest import ROOT, wms_settings
from tests.e2e.conftest import cli_env

EXAMPLES = ROOT / "examples"
GUIDE_ADDRESS = "127.0.0.1:50051"
GUIDE_HTTP = "http://127.0.0.1:8080"


def readme_block(heading: str) -> str:
    """The first ```sh block after ``heading`` in the README."""
    text = (ROOT / "README.md").read_text()
    start = text.index(heading)
    match = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert match, f"no sh block after {heading!r}"
    return match.group(1)


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (CI installs it)")
        pytest.skip(f"{tool} is not installed")


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


async def test_cli_block_runs_the_workflow(stack: LocalStack, tmp_path: Path) -> None:
    need("jq")
    script = readme_block("**1. The `ewms` CLI**")
    env = cli_env(EWMS_WMS_ADDRESS=stack.address, EWMS_TOKEN=stack.token)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    code, out, err = await run("bash", "-euo", "pipefail", "-c", script, env=env)
    assert code == 0, err
    payloads = sorted(
        json.loads(line)["payload"] for line in out.splitlines() if line.startswith("{")
    )
    assert payloads == ["EVENT WORKFLOW", "HELLO"]
    assert "finished: 1 taskforce(s) stopped" in out + err


async def test_buf_curl_block_lists_services_and_creates_the_workflow(stack: LocalStack) -> None:
    need("buf")
    script = readme_block("**3. `buf curl` through reflection**").replace(
        GUIDE_ADDRESS, stack.address
    )
    env = cli_env(EWMS_TOKEN=stack.token)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    code, out, err = await run("bash", "-euo", "pipefail", "-c", script, env=env)
    assert code == 0, err
    services, _, created_json = out.partition("{")
    assert "ewms.v1.WorkflowService" in services.split()
    created = json.loads("{" + created_json)
    assert created["workflow"]["workflowId"].startswith("WF-")
    assert sorted(q["alias"] for q in created["queues"]) == ["lines", "shouted"]


async def test_curl_block_runs_the_workflow_over_rest(stack: LocalStack) -> None:
    need("curl")
    need("jq")
    script = readme_block("**2. `curl` + `jq` on the REST gateway**").replace(
        GUIDE_HTTP, stack.wms.http_url
    )
    env = cli_env(EWMS_TOKEN=stack.token)
    code, out, err = await run("bash", "-euo", "pipefail", "-c", script, env=env)
    assert code == 0, out + err
    assert "event: message" in out  # the watch stream
    assert '"workflow_id"' in out  # the finish response
