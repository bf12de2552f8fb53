"""Every RPC with a google.api.http annotation in the ewms.v1 contracts is served by the REST
gateway: for each binding (rule and additional bindings), read here from the descriptors
independently of the gateway, a real HTTP request with its method and path answers 200.

A binding needs a recipe below saying what to send (and what to create first); a new annotated RPC
without one fails here, as does one the gateway does not serve."""

from __future__ import annotations

import base64
import importlib
import pkgutil
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from google.api import annotations_pb2

import ewms.v1
from tests.conftest import seed_request
from tests.wms.http.conftest import auth


@dataclass(frozen=True)
class AnnotatedBinding:
    """One HTTP binding of an annotated RPC, as the .proto declares it."""

    rpc: str  # ewms.v1.WorkflowService.GetWorkflow
    method: str
    template: str
    streaming: bool

    def __str__(self) -> str:
        return f"{self.rpc} {self.method} {self.template}"


def annotated_bindings() -> list[AnnotatedBinding]:
    """Every HTTP binding of every service in the ewms.v1 modules."""
    found = []
    for info in pkgutil.iter_modules(ewms.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"ewms.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for rpc in service.methods:
                if not rpc.GetOptions().HasExtension(annotations_pb2.http):
                    continue
                rule = rpc.GetOptions().Extensions[annotations_pb2.http]
                for r in [rule, *rule.additional_bindings]:
                    kind = r.WhichOneof("pattern")
                    method, template = (
                        (r.custom.kind, r.custom.path)
                        if kind == "custom"
                        else (kind, getattr(r, kind))
                    )
                    found.append(
                        AnnotatedBinding(
                            rpc.full_name, method.upper(), template, rpc.server_streaming
                        )
                    )
    return found


BINDINGS = annotated_bindings()


def fill(template: str, values: dict[str, str]) -> str:
    """The template with each {field} replaced by the value of that field."""

    def value(match: re.Match[str]) -> str:
        name, pattern = match.group(1), match.group(2)
        assert pattern is None, f"{template}: fill patterned variables ({pattern}) in the recipe"
        assert name in values, f"{template}: no value for path variable {name}"
        return values[name]

    return re.sub(r"\{([^}=]+)(=[^}]*)?\}", value, template)


# --- what each RPC needs ---


@dataclass
class Api:
    """REST calls as alice, and the ids of the seed workflow she created."""

    http: aiohttp.ClientSession
    token: str
    ids: dict[str, str] = field(default_factory=dict)

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, path, json=body, headers=auth(self.token)) as resp:
            assert resp.status == 200, f"{method} {path}: {resp.status} {await resp.text()}"
            return await resp.json()

    async def publish(self, n: int = 1) -> None:
        events = [{"payload": base64.b64encode(f"event {i}".encode()).decode()} for i in range(n)]
        await self.call("POST", f"/v1/queues/{self.ids['queue_id']}/events", {"events": events})

    async def receive(self) -> str:
        """Publish an event and lease it: its ack id."""
        await self.publish()
        body = {"max_events": 1}
        got = await self.call("POST", f"/v1/queues/{self.ids['queue_id']}/actions/receive", body)
        return str(got["deliveries"][0]["ack_id"])


async def submit_seed(http: aiohttp.ClientSession, token: str) -> dict[str, Any]:
    """POST the original's seed workflow over REST; the CreateWorkflowResponse JSON."""
    async with http.post("/v1/workflows", json=seed_request(), headers=auth(token)) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


async def seeded(http: aiohttp.ClientSession, token: str) -> Api:
    created = await submit_seed(http, token)
    input_queue = next(q for q in created["queues"] if q["alias"] == "input-queue")
    ids = {
        "workflow_id": created["workflow"]["workflow_id"],
        "task_id": created["task_directives"][0]["task_id"],
        "taskforce_uuid": created["taskforces"][0]["taskforce_uuid"],
        "queue_id": input_queue["queue_id"],
    }
    return Api(http, token, ids)


Recipe = Callable[[Api], Awaitable[Any]]  # the JSON body to send (None: none)


async def no_body(api: Api) -> None:
    return None


async def ack_body(api: Api) -> dict[str, Any]:
    return {"ack_ids": [await api.receive()]}


async def nack_body(api: Api) -> dict[str, Any]:
    return {"ack_id": await api.receive(), "dead_letter": True}


async def receive_body(api: Api) -> dict[str, Any]:
    await api.publish()
    return {"max_events": 1}


async def redrive_body(api: Api) -> dict[str, Any]:
    await nack_body(api)  # one dead letter to re-drive
    return {}


async def add_workers_body(api: Api) -> dict[str, Any]:
    return {"cluster_location": "local", "n_workers": 2}


async def publish_body(api: Api) -> dict[str, Any]:
    return {"events": [{"payload": base64.b64encode(b"hello").decode()}]}


async def create_body(api: Api) -> dict[str, Any]:
    return seed_request()


RECIPES: dict[str, Recipe] = {
    "ewms.v1.WorkflowService.CreateWorkflow": create_body,
    "ewms.v1.WorkflowService.GetWorkflow": no_body,
    "ewms.v1.WorkflowService.ListWorkflows": no_body,
    "ewms.v1.WorkflowService.AbortWorkflow": no_body,
    "ewms.v1.WorkflowService.FinishWorkflow": no_body,
    "ewms.v1.WorkflowService.WatchWorkflow": no_body,
    "ewms.v1.WorkflowService.WatchWorkflows": no_body,
    "ewms.v1.WorkflowService.GetTaskDirective": no_body,
    "ewms.v1.WorkflowService.ListTaskDirectives": no_body,
    "ewms.v1.WorkflowService.AddWorkers": add_workers_body,
    "ewms.v1.WorkflowService.GetTaskforce": no_body,
    "ewms.v1.WorkflowService.ListTaskforces": no_body,
    "ewms.v1.WorkflowService.ListQueues": no_body,
    "ewms.v1.EventService.Publish": publish_body,
    "ewms.v1.EventService.Receive": receive_body,
    "ewms.v1.EventService.Ack": ack_body,
    "ewms.v1.EventService.Nack": nack_body,
    "ewms.v1.EventService.GetQueueStats": no_body,
    "ewms.v1.EventService.ListDeadLetters": no_body,
    "ewms.v1.EventService.RedriveDeadLetters": redrive_body,
}


def test_the_contracts_have_annotated_rpcs_of_both_services() -> None:
    services = {b.rpc.rsplit(".", 1)[0] for b in BINDINGS}
    assert {"ewms.v1.WorkflowService", "ewms.v1.EventService"} <= services
    assert any(b.streaming for b in BINDINGS)


@pytest.mark.parametrize("binding", BINDINGS, ids=str)
async def test_annotated_rpc_is_served(
    binding: AnnotatedBinding, http: aiohttp.ClientSession, token_for: Any
) -> None:
    recipe = RECIPES.get(binding.rpc)
    assert recipe is not None, f"no recipe for {binding.rpc}: add one to RECIPES"
    api = await seeded(http, token_for("alice"))
    body = await recipe(api)
    path = fill(binding.template, api.ids)
    async with http.request(binding.method, path, json=body, headers=auth(api.token)) as resp:
        assert resp.status == 200, f"{binding}: {resp.status} {await resp.text()}"
        if binding.streaming:
            assert resp.content_type == "text/event-stream"
            first = await resp.content.readuntil(b"\n\n")
            assert b"event: message" in first
        else:
            assert resp.content_type == "application/json"
            assert isinstance(await resp.json(), dict | list)
