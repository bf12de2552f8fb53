"""Server reflection: generic gRPC tools discover the WMS's services without a token."""

from __future__ import annotations

import asyncio

import pytest

from services.wms import RunningWms
from tests.conftest import buf_path

BUF_TIMEOUT_SECONDS = 30


async def buf_curl(*args: str) -> tuple[int, str, str]:
    """Run ``buf curl`` without blocking the event loop the WMS serves on."""
    buf = buf_path()
    if buf is None:
        pytest.fail(
            "the buf CLI is not installed; it comes with the test extra: pip install -e '.[test]'"
        )
    proc = await asyncio.create_subprocess_exec(
        buf,
        "curl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BUF_TIMEOUT_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"buf curl {' '.join(args)} did not finish in {BUF_TIMEOUT_SECONDS}s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_buf_curl_lists_the_wms_services(wms: RunningWms) -> None:
    code, out, err = await buf_curl(
        "--protocol", "grpc", "--http2-prior-knowledge", "--list-services", f"http://{wms.address}"
    )

    assert code == 0, err
    services = set(out.split())
    assert {"ewms.v1.WorkflowService", "grpc.health.v1.Health"} <= services


async def test_buf_curl_lists_the_workflow_service_methods(wms: RunningWms) -> None:
    code, out, err = await buf_curl(
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--list-methods",
        f"http://{wms.address}",
    )

    assert code == 0, err
    methods = set(out.split())
    assert {
        "ewms.v1.WorkflowService/CreateWorkflow",
        "ewms.v1.WorkflowService/ListWorkflows",
        "ewms.v1.WorkflowService/AddWorkers",
    } <= methods


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_services_are_listed_over_reflection_v1_and_v1alpha(
    wms: RunningWms, protocol: str
) -> None:
    code, out, err = await buf_curl(
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect-protocol",
        protocol,
        "--list-services",
        f"http://{wms.address}",
    )

    assert code == 0, err
    assert {
        "ewms.v1.WorkflowService",
        "ewms.v1.EventService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(out.split())


async def test_every_listed_service_is_described_over_reflection_v1(wms: RunningWms) -> None:
    # --list-methods fetches each listed service's file, the v1 reflection service's own included.
    code, out, err = await buf_curl(
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect-protocol",
        "grpc-v1",
        "--list-methods",
        f"http://{wms.address}",
    )

    assert code == 0, err
    assert {
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "ewms.v1.EventService/Publish",
        "ewms.v1.WorkflowService/GetWorkflow",
    } <= set(out.split())
