"""Fixtures of the pilot tests: a real WMS with one queue backend, a workflow of alice's whose task
reads queue "in" and writes "out" and "out2", and real pilot processes
(``python -m services.pilot``) configured by their environment as a TMS would configure them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ewms.v1 import queue_pb2, workflow_service_pb2
from services.auth import Role
from services.events.client import QueueClient
from services.events.grpc_client import GrpcQueueClient
from tests.conftest import bearer, require_rabbitmq
from tests.events.conftest import QueueEnv, close_env, open_env
from tests.wms.requests import minimal_task, parse, workflow_json

REPO = Path(__file__).resolve().parents[2]
MAX_ATTEMPTS = 2


async def wait_for(
    condition: Callable[[], Awaitable[bool]], within: float = 30.0, what: str = "condition"
) -> None:
    """Poll ``condition`` until it holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class PilotProcess:
    """A running pilot process."""

    proc: asyncio.subprocess.Process
    log_path: Path

    async def wait(self, within: float = 60.0) -> int:
        """Its exit code (fails the test if it does not exit in time)."""
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"pilot did not exit within {within}s:\n{self.log()}") from None

    def log(self) -> str:
        """What it wrote to stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        """Send a signal to the pilot itself (not its tasks)."""
        self.proc.send_signal(sig)

    async def wait_log(self, text: str, within: float = 30.0) -> None:
        """Wait until its log contains ``text``."""

        async def seen() -> bool:
            if self.proc.returncode is not None and text not in self.log():
                raise AssertionError(f"pilot exited before logging {text!r}:\n{self.log()}")
            return text in self.log()

        await wait_for(seen, within, f"pilot log {text!r}")


@dataclass
class PilotEnv:
    """A WMS, alice's workflow, and helpers to run pilots on its task."""

    q: QueueEnv
    tmp: Path
    processes: list[PilotProcess] = field(default_factory=list)
    counter: int = 0

    @property
    def backend(self) -> str:
        """ "embedded" or "rabbitmq"."""
        return self.q.backend

    @property
    def workflow(self) -> workflow_service_pb2.CreateWorkflowResponse:
        """alice's workflow."""
        return self.q.workflow

    @property
    def taskforce_uuid(self) -> str:
        """The workflow's only taskforce."""
        return self.workflow.taskforces[0].taskforce_uuid

    def queue(self, alias: str) -> queue_pb2.Queue:
        """The queue with this alias."""
        return self.q.queue(alias)

    def client(self) -> GrpcQueueClient:
        """alice's queue client (through EventService)."""
        return self.q.client()

    async def publish(self, payloads: list[bytes], content_type: str = "text/plain") -> list[str]:
        """Publish events into "in"; returns their ids."""
        events = [queue_pb2.Event(payload=p, content_type=content_type) for p in payloads]
        return await self.client().publish(self.queue("in").queue_id, events)

    async def outputs(self, alias: str, count: int, within: float = 30.0) -> list[queue_pb2.Event]:
        """Consume and ack exactly ``count`` events from a queue, then check nothing more is
        ready."""
        client: QueueClient = self.client()
        got: list[queue_pb2.Event] = []
        sub = await client.subscribe(self.queue(alias).queue_id, prefetch=max(count, 1))
        try:

            async def collect() -> None:
                async for delivery in sub:
                    got.append(delivery.event)
                    await sub.ack(delivery)
                    if len(got) >= count:
                        return

            if count:
                await asyncio.wait_for(collect(), within)
        finally:
            await sub.close()
        return got

    async def stats(self, alias: str) -> queue_pb2.QueueStats:
        """The queue's counters."""
        return await self.client().stats(self.queue(alias).queue_id)

    async def settled(self, alias: str) -> queue_pb2.QueueStats:
        """The queue's counters once nothing is in flight (RabbitMQ's in-flight count comes from
        its management API, which lags about 5 s)."""
        stats = await self.stats(alias)

        async def nothing_in_flight() -> bool:
            nonlocal stats
            stats = await self.stats(alias)
            return stats.in_flight == 0

        await wait_for(nothing_in_flight, 20, f"nothing in flight on {alias!r}")
        return stats

    def pilot_token(self) -> str:
        """A pilot token scoped to the taskforce."""
        return self.q.wms.authority.mint("pilot", Role.PILOT, 3600, scope=self.taskforce_uuid)

    def pilot_environment(self, task_args: str, **overrides: str) -> dict[str, str]:
        """The pilot's environment as the TMS would set it, plus ``overrides``."""
        self.counter += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("EWMS_")}
        token = self.pilot_token()
        env.update(
            {
                "EWMS_PILOT_WMS_ADDRESS": self.q.wms.address,
                "EWMS_PILOT_TOKEN": token,
                "EWMS_PILOT_TASKFORCE_UUID": self.taskforce_uuid,
                "EWMS_PILOT_WORKER_ID": f"worker-{self.counter}",
                "EWMS_PILOT_TASK_ARGS": task_args,
                "EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST": str(self.tmp / f"pilot-{self.counter}"),
                "EWMS_PILOT_TIMEOUT_QUEUE_WAIT_FOR_FIRST_MESSAGE": "20",
                "EWMS_PILOT_TIMEOUT_QUEUE_INCOMING": "1",
                "EWMS_PILOT_CL_LOG": "DEBUG",
            }
        )
        for side, aliases in (("INCOMING", ["in"]), ("OUTGOING", ["out", "out2"])):
            queues = [self.queue(a) for a in aliases]
            prefix = f"EWMS_PILOT_QUEUE_{side}"
            env[prefix] = ";".join(q.queue_id for q in queues)
            env[f"{prefix}_MAX_ATTEMPTS"] = str(queues[0].max_attempts)
            if self.backend == "rabbitmq":
                env[f"{prefix}_BROKER_TYPE"] = "rabbitmq"
                user = queues[0].credentials.username
                env[f"{prefix}_BROKER_ADDRESS"] = queues[0].address.replace("://", f"://{user}@")
                env[f"{prefix}_AUTH_TOKEN"] = queues[0].credentials.password
            else:
                env[f"{prefix}_BROKER_TYPE"] = "embedded"
                env[f"{prefix}_BROKER_ADDRESS"] = self.q.wms.address
                env[f"{prefix}_AUTH_TOKEN"] = token
        (self.tmp / f"pilot-{self.counter}").mkdir(parents=True, exist_ok=True)
        env.update(overrides)
        return env

    async def start_pilot(self, task_args: str, **overrides: str) -> PilotProcess:
        """Start ``python -m services.pilot`` with the task."""
        return await self.start_pilot_env(self.pilot_environment(task_args, **overrides))

    async def start_pilot_env(self, env: dict[str, str]) -> PilotProcess:
        """Start a pilot with exactly this environment."""
        log_path = self.tmp / f"pilot-{len(self.processes) + 1}.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "services.pilot",
                env=env,
                cwd=str(REPO),
                stdout=log,
                stderr=log,
            )
        pilot = PilotProcess(proc, log_path)
        self.processes.append(pilot)
        return pilot

    async def run_pilot(self, task_args: str, within: float = 60.0, **overrides: str) -> int:
        """Run a pilot to its end; returns its exit code."""
        pilot = await self.start_pilot(task_args, **overrides)
        return await pilot.wait(within)

    async def taskforce(self) -> Any:
        """The taskforce as the WMS shows it."""
        from ewms.v1 import workflow_service_pb2 as ws

        return await self.q.workflows.GetTaskforce(
            ws.GetTaskforceRequest(taskforce_uuid=self.taskforce_uuid), metadata=self.q.alice
        )


def pilot_workflow_request(**task: Any) -> workflow_service_pb2.CreateWorkflowRequest:
    """alice's workflow: task reads "in", writes "out" and "out2" (all public)."""
    return parse(
        workflow_json(
            minimal_task(max_attempts=MAX_ATTEMPTS, output_queue_aliases=["out", "out2"], **task),
            public_queue_aliases=["in", "out", "out2"],
        )
    )


@pytest.fixture(params=["embedded", "rabbitmq"])
async def penv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PilotEnv]:
    """A WMS on each queue backend with alice's pilot workflow."""
    backend = str(request.param)
    if backend == "rabbitmq":
        require_rabbitmq()
    q = await open_env(backend, tmp_path / "wms-data", max_event_bytes=1024 * 1024)
    q.workflow = await q.workflows.CreateWorkflow(pilot_workflow_request(), metadata=q.alice)
    env = PilotEnv(q, tmp_path)
    try:
        yield env
    finally:
        for p in env.processes:
            if p.proc.returncode is None:
                p.proc.send_signal(signal.SIGKILL)
                await p.proc.wait()
        await close_env(q)


__all__ = ["PilotEnv", "PilotProcess", "bearer", "wait_for"]
