"""The README guide's curl + jq script (examples/rest/events.sh) runs as written against a real
WMS's REST gateway: it creates a workflow, publishes JSON and text events without base64, receives
them decoded, acks them and finds them acked in the queue's counters."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import grpc
import pytest

from ewms.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import Role
from services.wms import RunningWms
from tests.conftest import ROOT, bearer

SCRIPT = ROOT / "examples" / "rest" / "events.sh"


def need(tool: str) -> None:
    """Skip without ``tool`` -- or fail when CI is set, since .ci/run installs it."""
    if shutil.which(tool) is not None:
        return
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{tool} is required (CI is set; .ci/run installs it) but not on PATH")
    pytest.skip(f"the REST script needs {tool}, which is not installed")


async def test_curl_script_publishes_receives_and_acks_events(
    wms: RunningWms, channel: grpc.aio.Channel
) -> None:
    need("curl")
    need("jq")
    token = wms.authority.mint("alice", Role.USER, 3600)
    env = {**os.environ, "EWMS_HTTP": wms.http_url, "EWMS_TOKEN": token}
    # The WMS runs on this test's loop, so the script runs as an asyncio subprocess.
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(SCRIPT),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out_bytes, err_bytes = await asyncio.wait_for(proc.communicate(), 120)
    out, err = out_bytes.decode(), err_bytes.decode()
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"

    lines = out.splitlines()
    assert lines[0].startswith("workflow WF-") and ", queue Q-" in lines[0]
    assert len(json.loads(lines[1])["published"]) == 4
    received = [json.loads(line) for line in lines[2:6]]
    assert sorted(received, key=json.dumps) == sorted(
        [
            {"content_type": "application/json", "json": {"sensor": "a", "raw": 1}},
            {"content_type": "application/json", "json": {"sensor": "b", "raw": 2.5}},
            {
                "content_type": "application/json",
                "json": {"sensor": "c", "raw": None, "tags": ["x", "y"]},
            },
            {"content_type": "text/plain; charset=utf-8", "text": "hello from curl"},
        ],
        key=json.dumps,
    )
    assert lines[6] == "acked 4 of 4 published; none ready or in flight"
    assert lines[7].startswith("finished WF-")

    # Seen through gRPC, the same workflow: finished, its queue holding nothing.
    workflow_id = lines[0].split()[1].rstrip(",")
    queue_id = lines[0].rsplit(" ", 1)[1]
    md = bearer(token)
    events = event_service_pb2_grpc.EventServiceStub(channel)
    stats = await events.GetQueueStats(
        event_service_pb2.GetQueueStatsRequest(queue_id=queue_id), metadata=md
    )
    assert (stats.published, stats.acked, stats.ready, stats.in_flight) == (4, 4, 0, 0)
    workflow = await workflow_service_pb2_grpc.WorkflowServiceStub(channel).GetWorkflow(
        workflow_service_pb2.GetWorkflowRequest(workflow_id=workflow_id), metadata=md
    )
    assert workflow.deactivated == workflow_pb2.DEACTIVATION_FINISHED
