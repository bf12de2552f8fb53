"""``GET /metrics``: the WMS's Prometheus metrics, without a token -- requests of both transports by
method and code, events by queue backend, pilots and TMSs connected, taskforces by phase and store
transactions; each WMS its own numbers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ewms.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    queue_pb2,
    taskforce_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import Role
from services.events.grpc_client import GrpcQueueClient
from services.wms import RunningWms
from services.wms.store import Tx
from tests.conftest import (
    RABBITMQ_MANAGEMENT_URL,
    RABBITMQ_URL,
    bearer,
    require_rabbitmq,
    seed_request,
)
from tests.wms.helpers import Env, StartEnv, eventually, launched, task
from tests.wms.http.conftest import auth
from tests.wms.requests import parse, workflow_request

ws = workflow_service_pb2
es = event_service_pb2
GET_WORKFLOW = "/ewms.v1.WorkflowService/GetWorkflow"
TMS_CONNECT = "/ewms.v1.TaskManagerService/Connect"
PILOT_CONNECT = "/ewms.v1.PilotService/Connect"
FAMILIES = {
    "ewms_requests",
    "ewms_request_seconds",
    "ewms_events_published",
    "ewms_events_delivered",
    "ewms_events_acked",
    "ewms_events_dead_lettered",
    "ewms_pilots_connected",
    "ewms_tms_connected",
    "ewms_taskforces",
    "ewms_store_transaction_seconds",
}


@dataclass
class Scraped:
    """One scrape of /metrics, parsed."""

    families: dict[str, Any]
    samples: list[Sample]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` carrying these labels (0 if there are none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def labels(self, name: str, label: str) -> set[str]:
        """Every value of ``label`` among the samples named ``name``."""
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


async def scrape(base_url: str) -> Scraped:
    """GET /metrics of the WMS at ``base_url`` (no token) and parse it."""
    async with aiohttp.ClientSession(base_url=base_url) as http, http.get("/metrics") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    return Scraped(families, [s for f in families.values() for s in f.samples])


def requests(scraped: Scraped, transport: str, method: str, code: str) -> float:
    return scraped.value("ewms_requests_total", transport=transport, method=method, code=code)


def timed(scraped: Scraped, transport: str, method: str, code: str) -> float:
    return scraped.value(
        "ewms_request_seconds_count", transport=transport, method=method, code=code
    )


@pytest.fixture
def events_stub(channel: grpc.aio.Channel) -> event_service_pb2_grpc.EventServiceStub:
    return event_service_pb2_grpc.EventServiceStub(channel)


# --- the endpoint ---------------------------------------------------------------------------------


async def test_metrics_are_served_without_a_token_in_the_prometheus_text_format(
    wms: RunningWms,
) -> None:
    scraped = await scrape(wms.http_url)

    assert set(scraped.families) >= FAMILIES
    assert scraped.families["ewms_requests"].type == "counter"
    assert scraped.families["ewms_request_seconds"].type == "histogram"
    assert scraped.families["ewms_taskforces"].type == "gauge"


async def test_scrapes_are_not_counted_as_requests(wms: RunningWms) -> None:
    await scrape(wms.http_url)
    scraped = await scrape(wms.http_url)

    assert not any("metrics" in m for m in scraped.labels("ewms_requests_total", "method"))


# --- requests -------------------------------------------------------------------------------------


async def test_grpc_calls_are_counted_and_timed_by_method_and_code(
    wms: RunningWms, workflows: workflow_service_pb2_grpc.WorkflowServiceStub, alice: Any
) -> None:
    created = await workflows.CreateWorkflow(workflow_request(), metadata=alice)
    wf_id = created.workflow.workflow_id
    await workflows.GetWorkflow(ws.GetWorkflowRequest(workflow_id=wf_id), metadata=alice)
    for missing in ("WF-missing-1", "WF-missing-2"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await workflows.GetWorkflow(ws.GetWorkflowRequest(workflow_id=missing), metadata=alice)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    scraped = await scrape(wms.http_url)

    assert requests(scraped, "grpc", GET_WORKFLOW, "OK") == 1
    assert requests(scraped, "grpc", GET_WORKFLOW, "NOT_FOUND") == 2
    assert timed(scraped, "grpc", GET_WORKFLOW, "OK") == 1
    assert timed(scraped, "grpc", GET_WORKFLOW, "NOT_FOUND") == 2
    assert requests(scraped, "grpc", "/ewms.v1.WorkflowService/CreateWorkflow", "OK") == 1
    assert scraped.labels("ewms_requests_total", "status") == {""}


async def test_grpc_calls_refused_by_authentication_are_counted(
    wms: RunningWms, workflows: workflow_service_pb2_grpc.WorkflowServiceStub
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await workflows.GetWorkflow(ws.GetWorkflowRequest(workflow_id="WF-1"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    scraped = await scrape(wms.http_url)

    assert requests(scraped, "grpc", GET_WORKFLOW, "UNAUTHENTICATED") == 1


async def test_rest_requests_are_counted_and_timed_by_route_and_code(
    wms: RunningWms, http: aiohttp.ClientSession
) -> None:
    for _ in range(2):
        async with http.get("/healthz") as resp:
            assert resp.status == 200

    scraped = await scrape(wms.http_url)

    labels = {"transport": "rest", "method": "GET /healthz", "code": "OK"}
    assert scraped.value("ewms_requests_total", **labels, status="200") == 2
    assert scraped.value("ewms_request_seconds_count", **labels) == 2


async def test_unknown_paths_share_one_label_and_count_as_not_found(
    wms: RunningWms, http: aiohttp.ClientSession
) -> None:
    for path in ("/nowhere/WF-1", "/nowhere/WF-2"):
        async with http.get(path) as resp:
            assert resp.status == 404

    scraped = await scrape(wms.http_url)

    assert requests(scraped, "rest", "unmatched", "NOT_FOUND") == 2
    assert not any("WF-" in m for m in scraped.labels("ewms_requests_total", "method"))


async def test_rest_gateway_calls_are_counted_by_their_rpc_like_grpc_calls(
    wms: RunningWms, http: aiohttp.ClientSession, token_for: Any
) -> None:
    headers = auth(token_for("alice"))
    async with http.get("/v1/workflows/WF-missing", headers=headers) as resp:
        assert resp.status == 404
    async with http.get("/v1/workflows/WF-missing") as resp:
        assert resp.status == 401

    scraped = await scrape(wms.http_url)

    not_found = {"transport": "rest", "method": GET_WORKFLOW, "code": "NOT_FOUND"}
    assert scraped.value("ewms_requests_total", **not_found, status="404") == 1
    assert scraped.value("ewms_request_seconds_count", **not_found) == 1
    assert requests(scraped, "rest", GET_WORKFLOW, "UNAUTHENTICATED") == 1
    assert not any("WF-" in m for m in scraped.labels("ewms_requests_total", "method"))


# --- pilots and TMSs connected --------------------------------------------------------------------


async def test_tms_gauge_follows_task_manager_streams_and_streams_count_when_they_end(
    env: Env,
) -> None:
    assert (await scrape(env.wms.http_url)).value("ewms_tms_connected") == 0
    local, osg = env.tms("local"), env.tms("osg")
    await local.hello("local")
    await osg.hello("osg", scheduler="htcondor")

    assert (await scrape(env.wms.http_url)).value("ewms_tms_connected") == 2

    local.call.cancel()

    async def one_left() -> bool:
        scraped = await scrape(env.wms.http_url)
        return scraped.value("ewms_tms_connected") == 1 and (
            requests(scraped, "grpc", TMS_CONNECT, "CANCELLED") == 1
        )

    await eventually(one_left, "the cancelled TMS stream is gone and counted")
    scraped = await scrape(env.wms.http_url)
    assert requests(scraped, "grpc", TMS_CONNECT, "OK") == 0  # the other is still open
    assert scraped.value("ewms_request_seconds_count", method=TMS_CONNECT) == 0  # not timed


async def test_pilot_gauge_follows_pilot_streams(env: Env) -> None:
    created = await env.create()
    uuid = created.taskforces[0].taskforce_uuid
    token = env.wms.authority.mint("pilot", Role.PILOT, 3600, scope=uuid)
    first, second = env.pilot(token), env.pilot(token)
    await first.hello(uuid, worker_id="1.0")
    await second.hello(uuid, worker_id="1.1")

    assert (await scrape(env.wms.http_url)).value("ewms_pilots_connected") == 2

    first.call.cancel()

    async def one_left() -> bool:
        return (await scrape(env.wms.http_url)).value("ewms_pilots_connected") == 1

    await eventually(one_left, "the cancelled pilot stream is gone")
    assert requests(await scrape(env.wms.http_url), "grpc", PILOT_CONNECT, "CANCELLED") == 1


# --- taskforces and the store ---------------------------------------------------------------------


async def test_taskforces_are_counted_by_phase_with_the_originals_phase_names(
    env: Env,
) -> None:
    created = await env.workflows.CreateWorkflow(parse(seed_request()), metadata=env.alice)
    [tf] = await launched(env.workflows, env.alice, created.workflow.workflow_id)
    phase = taskforce_pb2.TaskforcePhase.Name(tf.phase)
    name = phase.removeprefix("TASKFORCE_PHASE_").lower().replace("_", "-")

    scraped = await scrape(env.wms.http_url)

    assert scraped.labels("ewms_taskforces", "phase") == {
        "pre-mq-activation",
        "pre-launch",
        "pending-starter",
        "condor-submit",
        "pending-stopper",
        "condor-rm",
        "condor-complete",
        "cancelled",
    }
    assert scraped.value("ewms_taskforces", phase=name) == 1
    assert scraped.value("ewms_taskforces") == 1


async def test_store_transactions_are_timed_by_kind(
    wms: RunningWms, workflows: workflow_service_pb2_grpc.WorkflowServiceStub, alice: Any
) -> None:
    before = await scrape(wms.http_url)
    created = await workflows.CreateWorkflow(workflow_request(), metadata=alice)
    await workflows.GetWorkflow(
        ws.GetWorkflowRequest(workflow_id=created.workflow.workflow_id), metadata=alice
    )

    after = await scrape(wms.http_url)

    for kind in ("read", "write"):
        name = "ewms_store_transaction_seconds_count"
        assert after.value(name, kind=kind) > before.value(name, kind=kind) > 0
        assert after.value("ewms_store_transaction_seconds_sum", kind=kind) > 0


# --- events ---------------------------------------------------------------------------------------


@pytest.fixture(params=["embedded", "rabbitmq"])
async def queue_env(request: pytest.FixtureRequest, start_env: StartEnv) -> AsyncIterator[Env]:
    """A WMS on the queue backend under test (RabbitMQ runs need a reachable broker)."""
    if request.param == "embedded":
        yield await start_env()
        return
    require_rabbitmq()
    env = await start_env(
        queue_backend="rabbitmq",
        rabbitmq_url=RABBITMQ_URL,
        rabbitmq_management_url=RABBITMQ_MANAGEMENT_URL,
    )
    yield env

    def workflow_ids(tx: Tx) -> list[str]:
        return [row[0] for row in tx.sql.execute("SELECT workflow_id FROM workflows")]

    for workflow_id in await env.wms.store.run(workflow_ids, write=False):
        await env.wms.queues.delete_now(workflow_id)  # the test's RabbitMQ queues and user


def event_counts(scraped: Scraped, backend: str) -> tuple[float, float, float, float]:
    """(published, delivered, acked, dead-lettered) of one backend."""
    return (
        scraped.value("ewms_events_published_total", backend=backend),
        scraped.value("ewms_events_delivered_total", backend=backend),
        scraped.value("ewms_events_acked_total", backend=backend),
        scraped.value("ewms_events_dead_lettered_total", backend=backend),
    )


async def test_events_are_counted_per_backend_through_every_path_of_the_event_service(
    queue_env: Env, request: pytest.FixtureRequest
) -> None:
    env = queue_env
    backend = request.node.callspec.params["queue_env"]
    created = await env.create(task(max_attempts=2))
    queue = next(q for q in created.queues if q.alias == "in")
    events = event_service_pb2_grpc.EventServiceStub(env.channel)
    token = env.wms.authority.mint("alice", Role.USER, 3600)
    md = bearer(token)
    published = [queue_pb2.Event(payload=f"e{i}".encode()) for i in range(4)]
    await events.Publish(es.PublishRequest(queue_id=queue.queue_id, events=published), metadata=md)
    # Unary: receive all four, ack two, dead-letter one, requeue one (its first of two attempts).
    got: list[queue_pb2.Delivery] = []
    while len(got) < 4:
        received = await events.Receive(
            es.ReceiveRequest(
                queue_id=queue.queue_id, max_events=4 - len(got), lease_seconds=60, wait_seconds=5
            ),
            metadata=md,
        )
        got.extend(received.deliveries)
    await events.Ack(
        es.AckRequest(queue_id=queue.queue_id, ack_ids=[d.ack_id for d in got[:2]]), metadata=md
    )
    nacked = await events.Nack(
        es.NackRequest(queue_id=queue.queue_id, ack_id=got[2].ack_id, dead_letter=True),
        metadata=md,
    )
    assert nacked.dead_lettered
    requeued = await events.Nack(
        es.NackRequest(queue_id=queue.queue_id, ack_id=got[3].ack_id, error="once"), metadata=md
    )
    assert not requeued.dead_lettered
    # Streaming: the requeued event comes again, at its last attempt; a nack dead-letters it.
    client = GrpcQueueClient(env.channel, token)
    async with await client.subscribe(queue.queue_id, 1) as sub:
        async for delivery in sub:
            assert delivery.event.attempt == 2
            await sub.nack(delivery, "twice")
            break

        async def counted() -> bool:
            return event_counts(await scrape(env.wms.http_url), backend) == (4, 5, 2, 2)

        await eventually(counted, f"events counted on {backend}: 4 published, 5 delivered ...")

    other = "rabbitmq" if backend == "embedded" else "embedded"
    assert event_counts(await scrape(env.wms.http_url), other) == (0, 0, 0, 0)


async def test_an_event_out_of_attempts_when_its_lease_expires_is_counted_as_dead_lettered(
    env: Env,
) -> None:
    created = await env.create(task(max_attempts=1))
    queue = next(q for q in created.queues if q.alias == "in")
    events = event_service_pb2_grpc.EventServiceStub(env.channel)
    await events.Publish(
        es.PublishRequest(queue_id=queue.queue_id, events=[queue_pb2.Event(payload=b"x")]),
        metadata=env.alice,
    )
    await events.Receive(
        es.ReceiveRequest(queue_id=queue.queue_id, max_events=1, lease_seconds=1),
        metadata=env.alice,
    )

    async def dead() -> bool:
        scraped = await scrape(env.wms.http_url)
        return scraped.value("ewms_events_dead_lettered_total", backend="embedded") == 1

    await eventually(dead, "the expired lease's event is dead-lettered and counted")


# --- one registry per WMS -------------------------------------------------------------------------


async def test_two_wmss_in_one_process_keep_separate_numbers(start_env: StartEnv) -> None:
    one, two = await start_env(), await start_env()
    async with aiohttp.ClientSession(base_url=one.wms.http_url) as http:
        for _ in range(3):
            async with http.get("/healthz") as resp:
                assert resp.status == 200
    await one.create()
    await one.tms("local").hello("local")

    first, second = await scrape(one.wms.http_url), await scrape(two.wms.http_url)

    assert requests(first, "rest", "GET /healthz", "OK") == 3
    assert requests(second, "rest", "GET /healthz", "OK") == 0
    create = "/ewms.v1.WorkflowService/CreateWorkflow"
    assert (requests(first, "grpc", create, "OK"), requests(second, "grpc", create, "OK")) == (1, 0)
    assert (first.value("ewms_tms_connected"), second.value("ewms_tms_connected")) == (1, 0)
    assert (first.value("ewms_taskforces"), second.value("ewms_taskforces")) == (1, 0)
