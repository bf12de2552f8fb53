"""Property-based contract test of the live REST gateway: schemathesis generates requests from the
served OpenAPI document (bounded examples, fixed seed) and checks that no response is a 5xx and
every response conforms to the document (status code, content type, body schema)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp

from services.auth import Role
from services.wms import RunningWms
from tests.conftest import seed_request
from tests.wms.http.conftest import auth

CHECKS = ",".join(
    [
        "not_a_server_error",
        "response_schema_conformance",
        "content_type_conformance",
        "status_code_conformance",
    ]
)


async def test_generated_requests_get_no_5xx_and_conforming_responses(
    wms: RunningWms, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    token = wms.authority.mint("alice", Role.USER, 3600)
    # Some real data, so list and get operations return objects as well as errors.
    async with http.post("/v1/workflows", json=seed_request(), headers=auth(token)) as resp:
        assert resp.status == 200, await resp.text()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from schemathesis.cli import schemathesis; schemathesis()",
        "run",
        f"{wms.http_url}/v1/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        CHECKS,
        "--max-examples",
        "15",
        "--seed",
        "1",
        "--generation-database",
        "none",
        # Server streams never end on their own; the SSE tests cover them.
        "--exclude-operation-id",
        "WorkflowService_WatchWorkflow",
        "--exclude-operation-id",
        "WorkflowService_WatchWorkflows",
        "--request-timeout",
        "10",
        "--no-color",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-6000:]
    assert "Tested: 18" in report, report[-3000:]
