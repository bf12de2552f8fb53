"""Scenario 7, attacks: every case fails closed, against real processes and a real RabbitMQ.

- bad tokens of 14 kinds are UNAUTHENTICATED at every door (four gRPC services and REST);
- another user can neither see nor touch a workflow or its queues, answered exactly as for ones
  that do not exist (NOT_FOUND), on 22 operations;
- a pilot token is least privilege: it receives only from its taskforce's input queues, publishes
  only into its output queues, re-drives nothing and creates no workflow;
- a TMS token acts only for its location, and one naming none is refused;
- a workflow's RabbitMQ credentials reach only its own queues and exchange, lose write the moment
  it ends and are gone after the grace period (also across a WMS restart);
- task arguments, task variables and event ids never reach a shell;
- a bwrap task cannot write outside its directory, read the WMS's data directory or use the
  network, and a user cannot ask for a pilot without the site's sandbox or change its loader;
- the data directory is private, the WMS binds loopback by default, and a second WMS on its port
  fails loudly instead of sharing it.

Most cases share one in-process WMS (module scope); the pilot cases run real pilot processes, and
the last group a WMS and a local TMS as subprocesses (one cluster for the module).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import pika
import pika.exceptions
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa

from ewms.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    pilot_service_pb2,
    pilot_service_pb2_grpc,
    queue_pb2,
    task_manager_service_pb2,
    task_manager_service_pb2_grpc,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import ISSUER, SECRET_FILE, Role
from services.cli import main as ewms_main
from services.errors import field_violations
from services.events import wire
from services.pilot.runtimes import Mount, RuntimeOptions, TaskSpec, make_runtime
from services.tms.htcondor import envfile_text
from services.wms import RunningWms, start_wms
from services.wms.queues.rabbitmq_admin import RabbitAdmin
from tests.conftest import RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL, bearer, wms_settings
from tests.e2e.conftest import Cluster, cli_env, ewms_cmd, wait_for
from tests.events.conftest import amqp_url, close_env, open_env
from tests.pilot.conftest import REPO, PilotEnv, pilot_workflow_request
from tests.wms.requests import minimal_task, workflow_request
from tests.wms.test_data_dir_privacy import loose_entries, mode

ws = workflow_service_pb2
es = event_service_pb2
tms_pb = task_manager_service_pb2
Metadata = tuple[tuple[str, str], ...]
Code = grpc.StatusCode
module_loop = pytest.mark.asyncio(loop_scope="module")
TIMEOUT = 30.0


# --- the shared in-process WMS --------------------------------------------------------------------


@dataclass
class Site:
    """One WMS (locations local, osg, sub-2=osg) with stubs on one channel and tokens."""

    wms: RunningWms
    data_dir: Path
    channel: grpc.aio.Channel
    http: aiohttp.ClientSession

    @property
    def workflows(self) -> workflow_service_pb2_grpc.WorkflowServiceStub:
        return workflow_service_pb2_grpc.WorkflowServiceStub(self.channel)

    @property
    def events(self) -> event_service_pb2_grpc.EventServiceStub:
        return event_service_pb2_grpc.EventServiceStub(self.channel)

    def token(self, subject: str, role: Role = Role.USER, scope: str = "") -> str:
        return self.wms.authority.mint(subject, role, 3600, scope=scope)

    def md(self, subject: str, role: Role = Role.USER, scope: str = "") -> Metadata:
        return bearer(self.token(subject, role, scope))

    async def create(self, owner: str, request: Any = None) -> ws.CreateWorkflowResponse:
        resp: ws.CreateWorkflowResponse = await self.workflows.CreateWorkflow(
            request or workflow_request(), metadata=self.md(owner)
        )
        return resp


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    data_dir = tmp_path_factory.mktemp("security") / "wms-data"
    wms = await start_wms(wms_settings(data_dir))
    channel = grpc.aio.insecure_channel(wms.address)
    http = aiohttp.ClientSession(wms.http_url)
    try:
        yield Site(wms, data_dir, channel, http)
    finally:
        await http.close()
        await channel.close()
        await wms.stop(grace=None)


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error of a unary call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def stream_refused(call: Any, first: Any) -> grpc.aio.AioRpcError:
    """The error that ends a stream whose first message is ``first``."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        # Refused before reading the write: the read below raises the status.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.write(first)
        while await asyncio.wait_for(call.read(), TIMEOUT) is not grpc.aio.EOF:
            pass
    call.cancel()
    return err.value


async def first_reply(call: Any, first: Any) -> Any:
    """The first message a stream answers ``first`` with (the stream is then cancelled)."""
    await call.write(first)
    reply = await asyncio.wait_for(call.read(), TIMEOUT)
    call.cancel()
    return reply


# --- 1. bad tokens at every door ------------------------------------------------------------------


def bad_authorizations(secret: bytes) -> dict[str, str | None]:
    """Fourteen ways of presenting no valid token: the ``authorization`` value (None: absent)."""
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ISSUER, "sub": "alice", "role": "user", "iat": now}
    good = {**claims, "exp": now + 600}

    def hs256(body: dict[str, Any], key: bytes = secret, alg: str = "HS256") -> str:
        return "Bearer " + jwt.encode(body, key, algorithm=alg)

    header, _, signature = jwt.encode(good, secret, algorithm="HS256").split(".")
    admin = {**good, "role": "admin"}
    forged = base64.urlsafe_b64encode(json.dumps(admin).encode()).rstrip(b"=").decode()
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "absent": None,
        "empty bearer": "Bearer ",
        "basic scheme": "Basic YWxpY2U6c2VjcmV0",
        "not a JWT": "Bearer not.a.jwt",
        "expired": hs256({**claims, "iat": now - 120, "exp": now - 60}),
        "signed with another secret": hs256(good, key=b"another-secret-" * 3),
        "alg none": "Bearer " + jwt.encode(good, None, algorithm="none"),
        "another issuer": hs256({**good, "iss": "https://evil.example"}),
        "another issuer's key (RS256)": "Bearer "
        + jwt.encode({**good, "iss": "https://idp.example"}, other_key, algorithm="RS256"),
        "payload changed to admin": f"Bearer {header}.{forged}.{signature}",
        "no exp": hs256(claims),
        "unknown role": hs256({**good, "role": "root"}),
        "HS512": hs256(good, alg="HS512"),
        "not yet valid (nbf)": hs256({**good, "nbf": now + 3600}),
    }


def with_auth(value: str | None) -> Metadata:
    return () if value is None else (("authorization", value),)


async def door_codes(site: Site, value: str | None, queue_id: str, taskforce: str) -> list[Any]:
    """The answer of each door to one authorization: four gRPC codes and the REST Status code."""
    md = with_auth(value)
    codes: list[Any] = []
    try:
        await site.workflows.ListWorkflows(ws.ListWorkflowsRequest(), metadata=md)
        codes.append(Code.OK)
    except grpc.aio.AioRpcError as exc:
        codes.append(exc.code())
    try:
        await site.events.GetQueueStats(es.GetQueueStatsRequest(queue_id=queue_id), metadata=md)
        codes.append(Code.OK)
    except grpc.aio.AioRpcError as exc:
        codes.append(exc.code())
    tms = task_manager_service_pb2_grpc.TaskManagerServiceStub(site.channel).Connect(metadata=md)
    hello = tms_pb.TaskManagerServiceConnectRequest(
        hello=tms_pb.TmsHello(cluster_location="osg", scheduler="local", tms_id="t", version="0")
    )
    try:
        await first_reply(tms, hello)
        codes.append(Code.OK)
    except grpc.aio.AioRpcError as exc:
        codes.append(exc.code())
    pilot = pilot_service_pb2_grpc.PilotServiceStub(site.channel).Connect(metadata=md)
    pilot_hello = pilot_service_pb2.PilotServiceConnectRequest(
        hello=pilot_service_pb2.PilotHello(
            taskforce_uuid=taskforce, worker_id="1.0", host="h", pilot_version="0"
        )
    )
    try:
        await first_reply(pilot, pilot_hello)
        codes.append(Code.OK)
    except grpc.aio.AioRpcError as exc:
        codes.append(exc.code())
    headers = {} if value is None else {"Authorization": value}
    async with site.http.get("/v1/workflows", headers=headers) as resp:
        body = await resp.json()
        codes.append((resp.status, body.get("code")))
    return codes


@module_loop
async def test_bad_tokens_are_unauthenticated_at_every_door(
    site: Site, outcome: Callable[..., Any]
) -> None:
    created = await site.create("alice")
    queue_id = created.queues[0].queue_id
    taskforce = created.taskforces[0].taskforce_uuid
    secret = (site.data_dir / SECRET_FILE).read_text().strip().encode()
    # What each door answers to valid tokens (the same checks, so that they can fail).
    valid = {
        "user": await door_codes(site, f"Bearer {site.token('alice')}", queue_id, taskforce),
        "tms": (await door_codes(site, f"Bearer {site.token('t', Role.TMS, 'osg')}", "", ""))[2],
        "pilot": (
            await door_codes(
                site, f"Bearer {site.token('p', Role.PILOT, taskforce)}", "", taskforce
            )
        )[3],
    }
    assert valid["user"][:2] == [Code.OK, Code.OK] and valid["user"][4] == (200, None)
    assert (valid["tms"], valid["pilot"]) == (Code.OK, Code.OK)

    answers = {
        name: await door_codes(site, value, queue_id, taskforce)
        for name, value in bad_authorizations(secret).items()
    }

    unauthenticated = [Code.UNAUTHENTICATED] * 4 + [(401, Code.UNAUTHENTICATED.value[0])]
    assert {name: codes for name, codes in answers.items() if codes != unauthenticated} == {}
    outcome(
        "bad tokens x doors",
        detail=f"{len(answers)}x5 UNAUTHENTICATED (4 gRPC services + REST); valid tokens pass",
    )


# --- 2. another user's workflow and queues -------------------------------------------------------


async def bobs_attempts(site: Site, alices: ws.CreateWorkflowResponse) -> dict[str, Any]:
    """bob's every operation on alice's workflow and queue: the gRPC error, list, or HTTP status
    with the error message of each."""
    bob = site.md("bob")
    wf = alices.workflow.workflow_id
    td = alices.task_directives[0].task_id
    tf = alices.taskforces[0].taskforce_uuid
    q = alices.queues[0].queue_id
    w, e = site.workflows, site.events
    unary: dict[str, Awaitable[Any]] = {
        "GetWorkflow": w.GetWorkflow(ws.GetWorkflowRequest(workflow_id=wf), metadata=bob),
        "AbortWorkflow": w.AbortWorkflow(ws.AbortWorkflowRequest(workflow_id=wf), metadata=bob),
        "FinishWorkflow": w.FinishWorkflow(ws.FinishWorkflowRequest(workflow_id=wf), metadata=bob),
        "GetTaskDirective": w.GetTaskDirective(
            ws.GetTaskDirectiveRequest(task_id=td), metadata=bob
        ),
        "GetTaskforce": w.GetTaskforce(ws.GetTaskforceRequest(taskforce_uuid=tf), metadata=bob),
        "AddWorkers": w.AddWorkers(
            ws.AddWorkersRequest(task_id=td, cluster_location="local", n_workers=1), metadata=bob
        ),
        "ListQueues": w.ListQueues(ws.ListQueuesRequest(workflow_id=wf), metadata=bob),
        "ListWorkflows(owner=alice)": w.ListWorkflows(
            ws.ListWorkflowsRequest(owner="alice"), metadata=bob
        ),
        "Publish": e.Publish(
            es.PublishRequest(queue_id=q, events=[queue_pb2.Event(payload=b"x")]), metadata=bob
        ),
        "Receive": e.Receive(es.ReceiveRequest(queue_id=q), metadata=bob),
        "Ack": e.Ack(es.AckRequest(queue_id=q, ack_ids=["a"]), metadata=bob),
        "Nack": e.Nack(es.NackRequest(queue_id=q, ack_id="a", dead_letter=True), metadata=bob),
        "GetQueueStats": e.GetQueueStats(es.GetQueueStatsRequest(queue_id=q), metadata=bob),
        "ListDeadLetters": e.ListDeadLetters(es.ListDeadLettersRequest(queue_id=q), metadata=bob),
        "RedriveDeadLetters": e.RedriveDeadLetters(
            es.RedriveDeadLettersRequest(queue_id=q), metadata=bob
        ),
    }
    got: dict[str, Any] = {}
    for name, call in unary.items():
        err = await refused(call)
        got[name] = (err.code(), err.details())
    got["WatchWorkflow"] = await stream_first_error(
        w.WatchWorkflow(ws.WatchWorkflowRequest(workflow_id=wf), metadata=bob)
    )
    err = await stream_refused(
        e.Subscribe(metadata=bob), es.SubscribeRequest(open=es.SubscribeOpen(queue_id=q))
    )
    got["Subscribe"] = (err.code(), err.details())
    for name, request in {
        "ListTaskDirectives(workflow_id)": ws.ListTaskDirectivesRequest(workflow_id=wf),
        "ListTaskforces(workflow_id)": ws.ListTaskforcesRequest(workflow_id=wf),
    }.items():
        method = getattr(w, name.split("(")[0])
        listed = await method(request, metadata=bob)
        got[name] = (
            "listed",
            len(listed.task_directives if "Directive" in name else listed.taskforces),
        )
    headers = {"Authorization": bob[0][1]}
    for name, (verb, path) in {
        "REST GET workflow": ("GET", f"/v1/workflows/{wf}"),
        "REST publish": ("POST", f"/v1/queues/{q}/events"),
        "REST original MQ profiles": ("GET", f"/original/v1/mqs/workflows/{wf}/mq-profiles/public"),
    }.items():
        body = {"events": [{"text": "x"}]} if verb == "POST" else None
        async with site.http.request(verb, path, headers=headers, json=body) as resp:
            got[name] = ("http", resp.status)
    return got


async def stream_first_error(call: Any) -> tuple[Any, str | None]:
    """The status a server stream ends with before any message."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while await asyncio.wait_for(call.read(), TIMEOUT) is not grpc.aio.EOF:
            pass
    return err.value.code(), err.value.details()


@module_loop
async def test_another_user_is_refused_on_every_operation_as_if_nothing_existed(
    site: Site, outcome: Callable[..., Any]
) -> None:
    alices = await site.create("alice")
    alice = site.md("alice")
    wf = alices.workflow.workflow_id
    queue_id = alices.queues[0].queue_id
    await site.events.Publish(
        es.PublishRequest(queue_id=queue_id, events=[queue_pb2.Event(payload=b"mine")]),
        metadata=alice,
    )
    before = await site.workflows.GetWorkflow(ws.GetWorkflowRequest(workflow_id=wf), metadata=alice)
    # What a queue that does not exist gets, with its id in place of the real one.
    unknown = "Q-0000000000000000-00000000-00000000"
    nothing = await refused(
        site.events.GetQueueStats(es.GetQueueStatsRequest(queue_id=unknown), metadata=alice)
    )

    got = await bobs_attempts(site, alices)

    not_found = {n: v for n, v in got.items() if v[0] == Code.NOT_FOUND}
    assert set(got) - set(not_found) == {
        "ListWorkflows(owner=alice)",
        "ListTaskDirectives(workflow_id)",
        "ListTaskforces(workflow_id)",
        "REST GET workflow",
        "REST publish",
        "REST original MQ profiles",
    }, got
    assert got["ListWorkflows(owner=alice)"][0] == Code.PERMISSION_DENIED
    assert (
        got["ListTaskDirectives(workflow_id)"]
        == got["ListTaskforces(workflow_id)"]
        == (
            "listed",
            0,
        )
    )
    assert {got[n] for n in got if n.startswith("REST")} == {("http", 404)}
    # A queue of alice's is answered word for word as one that does not exist.
    for name in ("Publish", "Receive", "Ack", "Nack", "GetQueueStats", "Subscribe"):
        assert not_found[name][1].replace(queue_id, unknown) == nothing.details(), name
    assert all("another user" not in (details or "") for _, details in not_found.values())
    # Nothing changed.
    after = await site.workflows.GetWorkflow(ws.GetWorkflowRequest(workflow_id=wf), metadata=alice)
    stats = await site.events.GetQueueStats(
        es.GetQueueStatsRequest(queue_id=queue_id), metadata=alice
    )
    assert after == before
    assert (stats.published, stats.ready, stats.dead_lettered) == (1, 1, 0)
    outcome(
        "another user x A's workflow",
        detail=f"{len(got)} operations refused: {len(not_found)} NOT_FOUND as if absent, "
        "1 PERMISSION_DENIED (list by owner), 2 empty lists, 3 REST 404; nothing changed",
    )


# --- 3. pilot tokens: least privilege -------------------------------------------------------------


def pipeline_request() -> ws.CreateWorkflowRequest:
    """Two tasks: "a" → task 1 → "b" → task 2 → "c"."""
    return workflow_request(
        minimal_task(input_queue_aliases=["a"], output_queue_aliases=["b"]),
        minimal_task(input_queue_aliases=["b"], output_queue_aliases=["c"]),
        public_queue_aliases=["a", "c"],
    )


@module_loop
async def test_a_pilot_token_is_least_privilege(site: Site, outcome: Callable[..., Any]) -> None:
    alices = await site.create("alice", pipeline_request())
    bobs = await site.create("bob")
    first, second = (tf.taskforce_uuid for tf in alices.taskforces)
    q = {x.alias: x.queue_id for x in alices.queues}
    pilot = site.md("pilot", Role.PILOT, first)  # task 1's: reads "a", writes "b"
    e = site.events
    event = [queue_pb2.Event(payload=b"x")]

    # What its task needs works.
    await e.Publish(es.PublishRequest(queue_id=q["b"], events=event), metadata=pilot)
    await e.Receive(es.ReceiveRequest(queue_id=q["a"]), metadata=pilot)
    await e.GetQueueStats(es.GetQueueStatsRequest(queue_id=q["b"]), metadata=pilot)
    published = await e.Receive(es.ReceiveRequest(queue_id=q["b"]), metadata=site.md("alice"))
    opened = await first_reply(
        e.Subscribe(metadata=pilot), es.SubscribeRequest(open=es.SubscribeOpen(queue_id=q["a"]))
    )
    assert opened.WhichOneof("kind") == "opened"

    denied = {
        "publish into its input": e.Publish(
            es.PublishRequest(queue_id=q["a"], events=event), metadata=pilot
        ),
        "receive from its output": e.Receive(es.ReceiveRequest(queue_id=q["b"]), metadata=pilot),
        "ack on its output": e.Ack(es.AckRequest(queue_id=q["b"], ack_ids=["x"]), metadata=pilot),
        "nack on its output": e.Nack(es.NackRequest(queue_id=q["b"], ack_id="x"), metadata=pilot),
        "list dead letters": e.ListDeadLetters(
            es.ListDeadLettersRequest(queue_id=q["a"]), metadata=pilot
        ),
        "re-drive dead letters": e.RedriveDeadLetters(
            es.RedriveDeadLettersRequest(queue_id=q["a"]), metadata=pilot
        ),
        "create a workflow": site.workflows.CreateWorkflow(workflow_request(), metadata=pilot),
    }
    absent = {
        "another taskforce's output": e.Receive(es.ReceiveRequest(queue_id=q["c"]), metadata=pilot),
        "another user's queue": e.Publish(
            es.PublishRequest(queue_id=bobs.queues[0].queue_id, events=event), metadata=pilot
        ),
    }
    codes = {name: (await refused(call)).code() for name, call in {**denied, **absent}.items()}
    subscribe_out = await stream_refused(
        e.Subscribe(metadata=pilot), es.SubscribeRequest(open=es.SubscribeOpen(queue_id=q["b"]))
    )
    as_other_taskforce = await stream_refused(
        pilot_service_pb2_grpc.PilotServiceStub(site.channel).Connect(metadata=pilot),
        pilot_service_pb2.PilotServiceConnectRequest(
            hello=pilot_service_pb2.PilotHello(
                taskforce_uuid=second, worker_id="1.0", host="h", pilot_version="0"
            )
        ),
    )
    async with site.http.post(
        "/v1/workflows", headers={"Authorization": pilot[0][1]}, json={"tasks": []}
    ) as resp:
        rest_create = resp.status

    assert codes == {
        **{name: Code.PERMISSION_DENIED for name in denied},
        **{name: Code.NOT_FOUND for name in absent},
    }
    assert subscribe_out.code() == Code.PERMISSION_DENIED
    assert as_other_taskforce.code() == Code.PERMISSION_DENIED
    assert rest_create == 403
    # What it published says which taskforce published it.
    [delivery] = published.deliveries
    assert delivery.event.provenance.taskforce_uuid == first
    outcome(
        "pilot token least privilege",
        detail=f"{len(denied) + 3} PERMISSION_DENIED (incl. subscribe to output, other taskforce's "
        f"status, REST create), {len(absent)} NOT_FOUND; its own 4 uses pass",
    )


# --- 4. TMS tokens: one location each -------------------------------------------------------------


@module_loop
async def test_a_tms_token_acts_only_for_its_location(
    site: Site, tmp_path: Path, outcome: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    def hello(location: str) -> tms_pb.TaskManagerServiceConnectRequest:
        return tms_pb.TaskManagerServiceConnectRequest(
            hello=tms_pb.TmsHello(
                cluster_location=location, scheduler="local", tms_id="t", version="0"
            )
        )

    def connect(token: str) -> Any:
        stub = task_manager_service_pb2_grpc.TaskManagerServiceStub(site.channel)
        return stub.Connect(metadata=bearer(token))

    welcome = await first_reply(connect(site.token("t", Role.TMS, "sub-2")), hello("osg"))
    other = await stream_refused(connect(site.token("t", Role.TMS, "osg")), hello("local"))
    unscoped = {
        location: await stream_refused(connect(site.token("t", Role.TMS)), hello(location))
        for location in ("local", "osg")
    }
    rc = ewms_main(
        ["token", "create", "--role", "tms", "--subject", "t", "--data-dir", str(tmp_path)]
    )

    assert welcome.WhichOneof("kind") == "welcome"  # an alias names the same location
    assert other.code() == Code.PERMISSION_DENIED and "'osg'" in (other.details() or "")
    for err in unscoped.values():
        assert err.code() == Code.PERMISSION_DENIED
        assert "names no cluster location" in (err.details() or "")
    assert rc == 2 and "--scope is required" in capsys.readouterr().err
    outcome(
        "TMS token scope",
        detail="another location's and unscoped (x2 locations) PERMISSION_DENIED; "
        "`ewms token create --role tms` without --scope exits 2",
    )


# --- 5. RabbitMQ credentials: one workflow's, and only while it runs -----------------------------


def amqp_channel(url: str) -> tuple[pika.BlockingConnection, Any]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    return connection, channel


def broker_answer(url: str, action: Callable[[Any], Any]) -> str:
    """What RabbitMQ answers ``action`` on a fresh channel with these credentials: "ok", or the
    reply text of the error closing the channel (``ACCESS_REFUSED - ...``)."""
    connection, channel = amqp_channel(url)
    try:
        action(channel)
        return "ok"
    except pika.exceptions.ChannelClosedByBroker as exc:
        return f"{exc.reply_code} {exc.reply_text}"
    finally:
        if connection.is_open:
            connection.close()


@module_loop
async def test_a_workflows_broker_credentials_reach_only_its_queues_and_exchange(
    tmp_path: Path, outcome: Callable[..., Any]
) -> None:
    env = await open_env("rabbitmq", tmp_path / "wms-data")
    try:
        bobs = await env.create_workflow(env.bob_token)
        mine, theirs = env.queue("in"), next(x for x in bobs.queues if x.alias == "in")
        url = amqp_url(mine)
        own_exchange = wire.workflow_exchange(mine.queue_id)
        their_exchange = wire.workflow_exchange(theirs.queue_id)
        t = theirs.queue_id
        attempts: dict[str, Callable[[Any], Any]] = {
            "publish via their exchange": lambda ch: ch.basic_publish(their_exchange, t, b"x"),
            "publish via the default exchange": lambda ch: ch.basic_publish("", t, b"x"),
            "get from their queue": lambda ch: ch.basic_get(t),
            "consume their queue": lambda ch: ch.basic_consume(t, lambda *a: None),
            "get from their dead letters": lambda ch: ch.basic_get(wire.dead_letter_queue(t)),
            "purge their queue": lambda ch: ch.queue_purge(t),
            "declare (configure) their queue": lambda ch: ch.queue_declare(t, durable=True),
            "bind their queue to my exchange": lambda ch: ch.queue_bind(t, own_exchange, "k"),
            "delete their exchange": lambda ch: ch.exchange_delete(their_exchange),
        }
        own = await asyncio.to_thread(
            broker_answer,
            url,
            lambda ch: (
                ch.basic_publish(own_exchange, mine.queue_id, b"x"),
                ch.basic_get(mine.queue_id),
            ),
        )
        answers = {
            name: await asyncio.to_thread(broker_answer, url, action)
            for name, action in attempts.items()
        }
    finally:
        await close_env(env)

    assert own == "ok"
    assert {n: a for n, a in answers.items() if not a.startswith("403 ACCESS_REFUSED")} == {}
    outcome(
        "broker credentials x another workflow",
        "rabbitmq",
        detail=f"{len(answers)} AMQP operations on another workflow's queue/exchange: "
        "ACCESS_REFUSED; its own publish and get pass",
    )


def login_refused(url: str) -> bool:
    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
    except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError):
        return True
    return False


@module_loop
async def test_an_ended_workflows_broker_credentials_lose_write_at_once_and_the_rest_later(
    tmp_path: Path, outcome: Callable[..., Any]
) -> None:
    data_dir = tmp_path / "wms-data"
    # A grace far longer than the test: the write permission must go at once, not at its end.
    env = await open_env("rabbitmq", data_dir, queue_credential_grace_seconds=3600)
    queue = env.queue("in")
    url = amqp_url(queue)
    exchange = wire.workflow_exchange(queue.queue_id)
    connection, channel = await asyncio.to_thread(amqp_channel, url)
    try:
        await asyncio.to_thread(channel.basic_publish, exchange, queue.queue_id, b"before")
        ended = time.monotonic()
        await env.workflows.FinishWorkflow(
            ws.FinishWorkflowRequest(workflow_id=env.workflow.workflow.workflow_id),
            metadata=env.alice,
        )
        # The connection opened while the workflow ran is closed: it cannot go on publishing.
        while True:
            assert time.monotonic() - ended < TIMEOUT, "write permission still held"
            try:
                await asyncio.to_thread(channel.basic_publish, exchange, queue.queue_id, b"after")
                await asyncio.sleep(0.1)
            except pika.exceptions.AMQPError as exc:
                closed = repr(exc)
                break
        revoked_in = time.monotonic() - ended
        # A new one may read what is left during the grace period, and publish nothing.
        refusal = await asyncio.to_thread(
            broker_answer, url, lambda ch: ch.basic_publish(exchange, queue.queue_id, b"late")
        )
        read: list[bytes] = []
        answer = await asyncio.to_thread(
            broker_answer, url, lambda ch: read.append(ch.basic_get(queue.queue_id, True)[2])
        )
    finally:
        if connection.is_open:
            await asyncio.to_thread(connection.close)
        await close_env(env, delete_queues=False)
    assert "ended" in closed  # the reason RabbitMQ gave the connection
    assert refusal.startswith("403 ACCESS_REFUSED")
    assert (answer, read) == ("ok", [b"before"])
    assert not await asyncio.to_thread(login_refused, url)

    # A WMS started after the grace period is over deletes the user at once: what is due comes
    # from the store, not from the process that saw the workflow end.
    env = await open_env("rabbitmq", data_dir, queue_credential_grace_seconds=0)
    try:
        wait_for(lambda: login_refused(url), TIMEOUT, "the ended workflow's user to be deleted")
        listed = await env.workflows.ListQueues(
            ws.ListQueuesRequest(workflow_id=env.workflow.workflow.workflow_id), metadata=env.alice
        )
        admin = RabbitAdmin.for_amqp_url(RABBITMQ_MANAGEMENT_URL, RABBITMQ_URL)
        ended_queue = await admin.queue(queue.queue_id)
    finally:
        await close_env(env)
    assert all(x.credentials.username for x in listed.queues)  # the new, running workflow's
    assert ended_queue is not None  # events stay for the retention period
    outcome(
        "broker credentials after the workflow ends",
        "rabbitmq",
        recovery_s=revoked_in,
        detail="write refused on the open connection at once (ACCESS_REFUSED), read kept; "
        "user deleted by a restarted WMS once the grace period was over",
    )


# --- 6. no shell between a user and a process -----------------------------------------------------


def injected(markers: Path, tmp_path: Path) -> list[Path]:
    """Files a shell running the injections would have made: in ``markers``, or named
    injected-* relative to a task's or the pilot's directory."""
    return [*markers.iterdir(), *tmp_path.rglob("injected-*"), *REPO.glob("injected-*")]


# The task: write its arguments (after the outfile) and $X to the outfile, as JSON.
ECHO_ARGS = (
    "import json, os, sys; "
    "open(sys.argv[1], 'w').write(json.dumps([sys.argv[2:], os.environ['X']]))"
)


@module_loop
async def test_task_arguments_variables_and_event_ids_never_reach_a_shell(
    tmp_path: Path, outcome: Callable[..., Any]
) -> None:
    m = tmp_path / "markers"
    m.mkdir()
    hostile_args = (
        f"$(touch {m}/1) ; touch {m}/2 `touch {m}/3` | touch {m}/4 && touch {m}/5 > {m}/6 "
        f"$((1+1)) '$(touch {m}/7)' \"$(touch {m}/8)\""
    )
    hostile_value = f"$(touch {m}/9);`touch {m}/10` && touch {m}/11"
    hostile_id = "$(touch injected-12);`touch injected-13`|touch injected-14&&x"
    task_args = f"{sys.executable} -c {shlex.quote(ECHO_ARGS)} {{{{OUTFILE}}}} {hostile_args}"
    q = await open_env("embedded", tmp_path / "wms-data")
    try:
        q.workflow = await q.workflows.CreateWorkflow(pilot_workflow_request(), metadata=q.alice)
        penv = PilotEnv(q, tmp_path)
        await q.client().publish(
            penv.queue("in").queue_id, [queue_pb2.Event(event_id=hostile_id, payload=b"x")]
        )
        code = await penv.run_pilot(
            task_args, EWMS_PILOT_TASK_ENV_JSON=json.dumps({"X": hostile_value})
        )
        assert injected(m, tmp_path) == []
        [output] = await penv.outputs("out", 1)
    finally:
        await close_env(q)
    # The HTCondor TMS's envfile, sourced by bash on the worker, keeps the value as it is.
    envfile = tmp_path / "envfile.sh"
    envfile.write_text(envfile_text({"X": hostile_value}))
    sourced = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        f'source {shlex.quote(str(envfile))} && printf %s "$X"',
        stdout=asyncio.subprocess.PIPE,
    )
    value, _ = await asyncio.wait_for(sourced.communicate(), TIMEOUT)

    assert code == 0
    assert json.loads(output.payload) == [shlex.split(hostile_args), hostile_value]
    assert output.provenance.input_event_id == hostile_id
    assert value.decode() == hostile_value
    outcome(
        "no shell for task args, env, event ids",
        "embedded",
        events_in=1,
        events_out=1,
        detail="14 injections ($(), ;, |, &&, >, backticks in args, env value, event id, "
        "envfile): arrived verbatim, no file created",
    )


# --- 7. the site's sandbox, with a WMS and a local TMS as processes -------------------------------

# The site fixes the runtime (bwrap) and keeps task directories to look into afterwards.
SITE_PILOT_ENV = (
    "EWMS_PILOT_RUNTIME=bwrap EWMS_PILOT_KEEP_ALL_TASK_FILES=true "
    "EWMS_PILOT_TIMEOUT_QUEUE_INCOMING=2"
)
# The task: try to escape, and report how each attempt ended, as JSON in its outfile.
PROBE = """
import json, os, socket, sys
out, data_dir, outside, port = sys.argv[1:5]
report = {}
def attempt(name, action):
    try:
        report[name] = action()
    except OSError as exc:
        report[name] = type(exc).__name__ + ": " + str(exc.strerror)
attempt("write outside", lambda: open(outside, "w").write("escaped"))
attempt("read the WMS secret", lambda: open(os.path.join(data_dir, "secret.key")).read())
attempt("list the WMS data dir", lambda: sorted(os.listdir(data_dir)))
attempt("connect to the WMS", lambda: socket.create_connection(("127.0.0.1", int(port)), 5).close())
open(out, "w").write(json.dumps(report))
"""


@pytest.fixture(scope="module")
def site_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A WMS and a bwrap-only local TMS. The WMS's data directory is under the home directory, as
    its default is (bwrap gives tasks a /tmp of their own, which would hide it anyway); so is the
    file tasks try to write outside their directories (``home``)."""
    home = Path(tempfile.mkdtemp(prefix="ewms-security-", dir=Path.home()))
    c = Cluster(tmp_path_factory.mktemp("site"), "embedded", TMS_ACTION_RETRIES="0")
    c.data_dir = home / "wms"
    try:
        c.start_wms()
        c.start_tms(slots=2, EWMS_TMS_PILOT_ENV=SITE_PILOT_ENV)
        yield c
    finally:
        c.close()
        shutil.rmtree(home, ignore_errors=True)


def admin_md(c: Cluster) -> Metadata:
    return bearer(c.token())


def sync_stubs(
    c: Cluster,
) -> tuple[grpc.Channel, workflow_service_pb2_grpc.WorkflowServiceStub, Any]:
    channel = grpc.insecure_channel(c.address)
    return (
        channel,
        workflow_service_pb2_grpc.WorkflowServiceStub(channel),
        event_service_pb2_grpc.EventServiceStub(channel),
    )


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            # The kernel writes each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, words))
    return found


def test_the_wms_binds_loopback_and_a_second_one_on_its_port_fails_loudly(
    site_cluster: Cluster, outcome: Callable[..., Any]
) -> None:
    c = site_cluster
    listening = next(
        json.loads(line)
        for line in (c.root / "wms.log").read_text().splitlines()
        if '"wms listening"' in line
    )
    http_port = int(listening["http_url"].rsplit(":", 1)[1])
    other_dir = c.root / "second-wms"
    second = subprocess.Popen(
        ewms_cmd("wms", "serve", "--port", str(c.wms_port), "--data-dir", str(other_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(EWMS_HTTP_PORT="0"),
    )
    try:
        output, _ = second.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        second.kill()
        output, _ = second.communicate()
        raise AssertionError(f"a second WMS is serving on the same port:\n{output}") from None
    # New connections, each on a fresh channel: only the first WMS accepts its admin token.
    served = 0
    for _ in range(20):
        with grpc.insecure_channel(c.address) as fresh:
            workflow_service_pb2_grpc.WorkflowServiceStub(fresh).ListWorkflows(
                ws.ListWorkflowsRequest(), metadata=admin_md(c), timeout=TIMEOUT
            )
            served += 1

    assert listening["grpc_host"] == "127.0.0.1"
    assert listening_addresses(c.wms_port) <= {"127.0.0.1", "::ffff:127.0.0.1"}
    assert listening_addresses(http_port) <= {"127.0.0.1", "::ffff:127.0.0.1"}
    assert listening_addresses(c.wms_port) and listening_addresses(http_port)
    assert second.returncode == 1, output
    assert f"error: cannot listen on 127.0.0.1:{c.wms_port}: the address is in use" in output
    assert served == 20

    # A second WMS clashing only on the HTTP port fails as loudly, before serving anything.
    clash = subprocess.run(
        ewms_cmd("wms", "serve", "--port", "0", "--data-dir", str(c.root / "third-wms")),
        capture_output=True,
        text=True,
        env=cli_env(EWMS_HTTP_PORT=str(http_port)),
        timeout=TIMEOUT,
    )
    assert clash.returncode == 1, clash.stderr
    assert f"error: cannot serve HTTP on 127.0.0.1:{http_port}" in clash.stderr, clash.stderr
    assert "Traceback" not in clash.stderr, clash.stderr
    outcome(
        "WMS bind",
        detail="gRPC and HTTP on loopback only; a second WMS on the gRPC or HTTP port exits 1 "
        "naming it; "
        "20/20 new connections reach the first",
    )


def receive_one(events: Any, queue_id: str, md: Metadata) -> queue_pb2.Event:
    """The first event of a queue (acked), waiting for it."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        got = events.Receive(
            es.ReceiveRequest(queue_id=queue_id, wait_seconds=10), metadata=md, timeout=TIMEOUT
        )
        for delivery in got.deliveries:
            events.Ack(es.AckRequest(queue_id=queue_id, ack_ids=[delivery.ack_id]), metadata=md)
            return delivery.event
    raise AssertionError(f"no event in {queue_id} within 90 s")


def probe_request(c: Cluster, outside: Path) -> ws.CreateWorkflowRequest:
    args = [str(c.data_dir), str(outside), str(c.wms_port)]
    task_args = f"{sys.executable} -c {shlex.quote(PROBE)} {{{{OUTFILE}}}} {shlex.join(args)}"
    return workflow_request(minimal_task(task_image="", task_args=task_args))


def test_a_bwrap_task_cannot_write_outside_read_the_wms_data_or_use_the_network(
    site_cluster: Cluster, outcome: Callable[..., Any]
) -> None:
    c = site_cluster
    outside = c.data_dir.parent / "escaped.txt"
    channel, workflows, events = sync_stubs(c)
    with channel:
        created = workflows.CreateWorkflow(probe_request(c, outside), metadata=admin_md(c))
        q = {x.alias: x.queue_id for x in created.queues}
        events.Publish(
            es.PublishRequest(queue_id=q["in"], events=[queue_pb2.Event(payload=b"x")]),
            metadata=admin_md(c),
        )
        output = receive_one(events, q["out"], admin_md(c))
        workflows.FinishWorkflow(
            ws.FinishWorkflowRequest(workflow_id=created.workflow.workflow_id),
            metadata=admin_md(c),
        )
    report = json.loads(output.payload)

    assert report == {
        "write outside": "OSError: Read-only file system",
        "read the WMS secret": "FileNotFoundError: No such file or directory",
        "list the WMS data dir": [],
        "connect to the WMS": "ConnectionRefusedError: Connection refused",
    }
    assert not outside.exists()
    assert (c.data_dir / SECRET_FILE).exists()  # hidden from the task, not absent
    outcome(
        "bwrap task escape",
        "embedded",
        events_in=1,
        events_out=1,
        detail="site-fixed bwrap: write outside EROFS, WMS data dir empty to it, "
        "WMS port refused (own network namespace)",
    )


# Loader and interpreter variables, and one the pilot does not read.
REFUSED_NAMES = ("LD_PRELOAD", "LD_LIBRARY_PATH", "PATH", "PYTHONPATH", "BASH_ENV", "IFS", "FOO")


def test_a_user_can_neither_unset_the_sites_sandbox_nor_change_the_pilots_loader(
    site_cluster: Cluster, outcome: Callable[..., Any]
) -> None:
    c = site_cluster
    outside = c.data_dir.parent / "unsandboxed.txt"
    wants_process = probe_request(c, outside)
    wants_process.tasks[0].pilot_config.environment["EWMS_PILOT_RUNTIME"].string_value = "process"
    loader = workflow_request()
    for name in REFUSED_NAMES:
        loader.tasks[0].pilot_config.environment[name].string_value = "/tmp/x"
    channel, workflows, _ = sync_stubs(c)
    with channel:
        created = workflows.CreateWorkflow(wants_process, metadata=admin_md(c))
        uuid = created.taskforces[0].taskforce_uuid

        def refusal() -> str | None:
            tf = workflows.GetTaskforce(
                ws.GetTaskforceRequest(taskforce_uuid=uuid), metadata=admin_md(c)
            )
            failed = [p.context for p in tf.phase_change_log if not p.was_successful]
            return failed[0] if failed else None

        context = wait_for(refusal, 60, "the TMS to refuse the start")
        with pytest.raises(grpc.RpcError) as err:
            workflows.CreateWorkflow(loader, metadata=admin_md(c))
        workflows.AbortWorkflow(
            ws.AbortWorkflowRequest(workflow_id=created.workflow.workflow_id),
            metadata=admin_md(c),
        )
    violations = dict(field_violations(err.value))

    assert "pilot_config.environment.EWMS_PILOT_RUNTIME" in context
    assert "EWMS_TMS_PILOT_LOCKED" in context
    assert not any(
        job["event"] == "submit" and job.get("taskforce_uuid") == uuid for job in c.job_log()
    )
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert sorted(violations) == sorted(
        f"tasks[0].pilot_config.environment.{name}" for name in REFUSED_NAMES
    )
    assert "dynamic loader" in violations["tasks[0].pilot_config.environment.LD_PRELOAD"]
    outcome(
        "site-fixed pilot settings",
        detail="EWMS_PILOT_RUNTIME=process at a bwrap site: start refused naming the variable; "
        "7 loader/interpreter/other variables: INVALID_ARGUMENT at CreateWorkflow",
    )


def test_the_data_directory_and_tms_state_are_private(site_cluster: Cluster) -> None:
    c = site_cluster
    # After the scenarios above: the WMS has written its database, the TMS its job log.
    assert mode(c.data_dir) == 0o700
    assert loose_entries(c.data_dir) == []
    assert mode(c.state_dir) == 0o700
    for name in (SECRET_FILE, "admin.token"):
        assert mode(c.data_dir / name) == 0o600


@module_loop
async def test_a_tasks_variables_cannot_choose_the_bwrap_that_runs_it(tmp_path: Path) -> None:
    """bwrap itself runs outside the sandbox: a task's PATH must not pick which one runs, nor
    its LD_PRELOAD what that one loads. The task still sees both inside."""
    fake = tmp_path / "bin"
    fake.mkdir()
    marker = tmp_path / "ran-outside-the-sandbox"
    (fake / "bwrap").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (fake / "bwrap").chmod(0o755)
    dirs = tmp_path / "ewms-pilot-data" / "task-io"
    dirs.mkdir(parents=True)
    runtime = make_runtime("bwrap", RuntimeOptions())
    await runtime.prepare("")
    spec = TaskSpec(
        alias="task",
        image="",
        argv=["sh", "-c", 'echo "$PATH|$LD_PRELOAD"'],
        env={"PATH": f"{fake}:/usr/bin:/bin", "LD_PRELOAD": str(tmp_path / "evil.so")},
        workdir=dirs,
        mounts=(Mount(dirs, str(dirs), writable=True),),
        workdir_target=str(dirs),
    )
    launch = runtime.launch(spec)
    proc = await asyncio.create_subprocess_exec(
        *launch.argv, env=launch.env, cwd=launch.cwd, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)

    assert not marker.exists()
    assert (proc.returncode, out.decode()) == (0, f"{fake}:/usr/bin:/bin|{tmp_path}/evil.so\n")
