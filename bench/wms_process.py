"""A WMS subprocess for the benchmarks: ``python -m services.cli wms serve`` on a temporary data
directory and a free port, started and stopped around a measurement."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from ewms.v1 import workflow_service_pb2, workflow_service_pb2_grpc
from services.auth import Role, TokenAuthority, load_or_create_secret
from services.events.grpc_client import channel_options

REPO_ROOT = Path(__file__).resolve().parents[1]
RABBITMQ_URL = os.environ.get("EWMS_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
RABBITMQ_MANAGEMENT_URL = os.environ.get(
    "EWMS_RABBITMQ_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672"
)


class Wms:
    """A WMS subprocess on a temporary data directory, with its admin token."""

    def __init__(self, backend: str, prefix: str = "bench") -> None:
        self.backend = backend
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-wms-{backend}-"))
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.token = ""
        self.authority: TokenAuthority | None = None
        self.created: list[workflow_service_pb2.CreateWorkflowResponse] = []

    async def start(self) -> None:
        """Start it and wait until it listens."""
        env = dict(os.environ)
        env.update(
            EWMS_QUEUE_BACKEND=self.backend,
            EWMS_CLUSTER_LOCATIONS="local",
            EWMS_RABBITMQ_URL=RABBITMQ_URL,
            EWMS_RABBITMQ_MANAGEMENT_URL=RABBITMQ_MANAGEMENT_URL,
            PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "gen")]),
        )
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.cli",
            "wms",
            "serve",
            "--port",
            "0",
            "--http-port",
            "0",
            "--data-dir",
            str(self.data_dir),
            cwd=REPO_ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            raw = await asyncio.wait_for(self.proc.stderr.readline(), 30)
            if not raw:
                break
            line = raw.decode(errors="replace")
            lines.append(line)
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == "wms listening":
                    self.port = int(record["grpc_port"])
                    break
        if not self.port:
            raise RuntimeError(f"WMS ({self.backend}) did not start:\n{''.join(lines[-30:])}")
        self._drainer = asyncio.create_task(self._drain())
        self.token = (self.data_dir / "admin.token").read_text().strip()
        # Pilot tokens are minted with its signing secret, as `ewms token create` does.
        self.authority = TokenAuthority(load_or_create_secret(self.data_dir))

    async def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while await self.proc.stderr.readline():
            pass

    @property
    def address(self) -> str:
        """Where clients reach it."""
        return f"127.0.0.1:{self.port}"

    async def create_workflow(
        self, request: dict[str, Any]
    ) -> workflow_service_pb2.CreateWorkflowResponse:
        """Create a workflow from its request JSON (remembered for clean-up)."""
        async with grpc.aio.insecure_channel(self.address, options=channel_options()) as channel:
            stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
            parsed = json_format.ParseDict(request, workflow_service_pb2.CreateWorkflowRequest())
            resp: workflow_service_pb2.CreateWorkflowResponse = await stub.CreateWorkflow(
                parsed, metadata=(("authorization", f"Bearer {self.token}"),), timeout=30
            )
        self.created.append(resp)
        return resp

    def pilot_token(self, taskforce_uuid: str) -> str:
        """A pilot token scoped to the taskforce."""
        assert self.authority is not None
        return self.authority.mint("bench-pilot", Role.PILOT, 7200, scope=taskforce_uuid)

    async def stop(self) -> None:
        """Stop it and delete its data directory."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def one_task_workflow(task_args: str, task_image: str = "", **task: Any) -> dict[str, Any]:
    """A workflow request: one task at "local" reading public queue "in" and writing "out"."""
    return {
        "public_queue_aliases": ["in", "out"],
        "tasks": [
            {
                "cluster_locations": ["local"],
                "input_queue_aliases": ["in"],
                "output_queue_aliases": ["out"],
                "task_image": task_image,
                "task_args": task_args,
                "worker_config": {
                    "do_transfer_worker_stdouterr": False,
                    "max_worker_runtime": 3600,
                    "n_cores": 1,
                    "priority": 1,
                    "worker_disk": "1G",
                    "worker_memory": "1G",
                },
                **task,
            }
        ],
    }
