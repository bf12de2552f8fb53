"""Fixtures of the event-queue conformance suite: a real WMS with one queue backend, a workflow of
alice's with queues "in" (max_attempts 2) and "out", and clients of each kind.

``backend`` is parametrized over "embedded" and "rabbitmq"; RabbitMQ runs are skipped with the
reason when no broker is reachable, and fail instead when CI is set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from ewms.v1 import (
    event_service_pb2_grpc,
    queue_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import Role
from services.config import WmsSettings
from services.events.amqp import AmqpQueueClient
from services.events.client import QueueClient
from services.events.grpc_client import GrpcQueueClient, channel_options
from services.wms import RunningWms, start_wms
from tests.conftest import (
    RABBITMQ_MANAGEMENT_URL,
    RABBITMQ_URL,
    bearer,
    require_rabbitmq,
    wms_settings,
)
from tests.wms.requests import minimal_task, parse, workflow_json

# Small, so the size-limit test sends little; the suite runs with it.
MAX_EVENT_BYTES = 64 * 1024
MAX_ATTEMPTS = 2


def settings_for(backend: str, data_dir: Path, **overrides: Any) -> WmsSettings:
    """WMS settings of the suite for one backend."""
    base = wms_settings(data_dir)
    fields: dict[str, Any] = {
        "data_dir": base.data_dir,
        "grpc_host": base.grpc_host,
        "grpc_port": base.grpc_port,
        "cluster_locations": base.cluster_locations,
        "queue_backend": backend,
        "rabbitmq_url": RABBITMQ_URL,
        "rabbitmq_management_url": RABBITMQ_MANAGEMENT_URL,
        "max_event_bytes": MAX_EVENT_BYTES,
    }
    fields.update(overrides)
    return WmsSettings(**fields)


@pytest.fixture(params=["embedded", "rabbitmq"])
def backend(request: pytest.FixtureRequest) -> str:
    """The queue backend under test."""
    if request.param == "rabbitmq":
        require_rabbitmq()
    return str(request.param)


@dataclass
class QueueEnv:
    """One WMS with one of alice's workflows, and what a test needs to use its queues."""

    wms: RunningWms
    backend: str
    channel: grpc.aio.Channel
    workflows: workflow_service_pb2_grpc.WorkflowServiceStub
    events: event_service_pb2_grpc.EventServiceStub
    workflow: workflow_service_pb2.CreateWorkflowResponse
    alice_token: str
    bob_token: str
    # "grpc": through EventService; "amqp": straight to RabbitMQ with the workflow's credentials;
    # "amqp-loop": the same with the AMQP connection on the event loop (as the pilot's).
    kind: str = "grpc"
    opened: list[Any] = field(default_factory=list)

    @property
    def alice(self) -> tuple[tuple[str, str], ...]:
        """alice's call metadata."""
        return bearer(self.alice_token)

    @property
    def bob(self) -> tuple[tuple[str, str], ...]:
        """bob's call metadata."""
        return bearer(self.bob_token)

    def queue(self, alias: str) -> queue_pb2.Queue:
        """alice's workflow's queue with this alias."""
        return next(q for q in self.workflow.queues if q.alias == alias)

    def client(self, token: str | None = None) -> GrpcQueueClient:
        """A gRPC queue client on the shared channel (alice's token by default)."""
        return GrpcQueueClient(
            self.channel, token or self.alice_token, max_event_bytes=MAX_EVENT_BYTES
        )

    async def queue_client(self) -> QueueClient:
        """alice's client of the kind under test: gRPC, or AMQP with her workflow's credentials."""
        if self.kind == "grpc":
            return self.client()
        client = await AmqpQueueClient.connect(
            amqp_url(self.workflow.queues[0]),
            max_attempts={q.queue_id: q.max_attempts for q in self.workflow.queues},
            max_event_bytes=MAX_EVENT_BYTES,
            io_thread=self.kind != "amqp-loop",
        )
        if self.kind == "amqp-loop":
            assert client.connection.thread is None
        self.opened.append(client)
        return client

    async def create_workflow(self, token: str) -> workflow_service_pb2.CreateWorkflowResponse:
        """Another workflow with queues "in" and "out", owned by the token's subject."""
        request = parse(workflow_json(minimal_task(max_attempts=MAX_ATTEMPTS)))
        resp: workflow_service_pb2.CreateWorkflowResponse = await self.workflows.CreateWorkflow(
            request, metadata=bearer(token)
        )
        return resp

    def pilot_token(self, workflow: workflow_service_pb2.CreateWorkflowResponse) -> str:
        """A pilot token of the workflow's first taskforce."""
        return self.wms.authority.mint(
            "pilot-1", Role.PILOT, 3600, scope=workflow.taskforces[0].taskforce_uuid
        )


async def open_env(backend: str, data_dir: Path, **overrides: Any) -> QueueEnv:
    """Start a WMS and create alice's workflow."""
    wms = await start_wms(settings_for(backend, data_dir, **overrides))
    channel = grpc.aio.insecure_channel(wms.address, options=channel_options(MAX_EVENT_BYTES))
    env = QueueEnv(
        wms=wms,
        backend=backend,
        channel=channel,
        workflows=workflow_service_pb2_grpc.WorkflowServiceStub(channel),
        events=event_service_pb2_grpc.EventServiceStub(channel),
        workflow=workflow_service_pb2.CreateWorkflowResponse(),
        alice_token=wms.authority.mint("alice", Role.USER, 3600),
        bob_token=wms.authority.mint("bob", Role.USER, 3600),
    )
    env.workflow = await env.create_workflow(env.alice_token)
    return env


def amqp_url(queue: queue_pb2.Queue) -> str:
    """The AMQP URL of a RabbitMQ-backed queue with its workflow's credentials."""
    creds = f"{queue.credentials.username}:{queue.credentials.password}@"
    return queue.address.replace("://", f"://{creds}", 1)


async def close_env(env: QueueEnv, *, delete_queues: bool = True) -> None:
    """Stop the WMS (deleting the test's RabbitMQ queues and users first)."""
    for client in env.opened:
        await client.close()
    await env.channel.close()
    if delete_queues and env.backend == "rabbitmq":
        broker = env.wms.queues.broker(env.workflow.queues[0])

        def all_queues(tx: Any) -> list[queue_pb2.Queue]:
            rows = tx.sql.execute("SELECT body FROM queues").fetchall()
            return [queue_pb2.Queue.FromString(body) for (body,) in rows]

        queues = await env.wms.store.run(all_queues, write=False)
        by_workflow: dict[str, list[queue_pb2.Queue]] = {}
        for q in queues:
            by_workflow.setdefault(q.workflow_id, []).append(q)
        for workflow_id, group in by_workflow.items():
            await broker.delete(workflow_id, group)
    await env.wms.stop(grace=None)


@pytest.fixture
async def env(backend: str, tmp_path: Path) -> AsyncIterator[QueueEnv]:
    """A WMS on the backend under test with alice's workflow."""
    opened = await open_env(backend, tmp_path / "wms-data")
    try:
        yield opened
    finally:
        await close_env(opened)


@pytest.fixture(params=["embedded", "rabbitmq", "rabbitmq-amqp", "rabbitmq-amqp-loop"])
async def client_env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueEnv]:
    """Like ``env``, and for RabbitMQ also with alice's client talking AMQP directly (as pilots
    do, with the connection on its own I/O thread or on the event loop): the tests of publishing
    and consuming run through every kind of client."""
    backend, _, kind = str(request.param).partition("-")
    if backend == "rabbitmq":
        require_rabbitmq()
    opened = await open_env(backend, tmp_path / "wms-data")
    opened.kind = kind or "grpc"
    try:
        yield opened
    finally:
        await close_env(opened)


def subscriber_env() -> dict[str, str]:
    """Environment of a subscriber subprocess: this interpreter's import path."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "gen"), env.get("PYTHONPATH", "")])
    return env
