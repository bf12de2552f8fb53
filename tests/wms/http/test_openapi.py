"""The OpenAPI document and the API page: generated from the service descriptors, valid OpenAPI
3.1, faithful to the proto3 JSON mapping the gateway speaks, and served without a token."""

from __future__ import annotations

import html
import re
from typing import Any

import aiohttp
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor, json_format
from google.protobuf.timestamp_pb2 import Timestamp
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from ewms.v1 import event_service_pb2, queue_pb2, taskforce_pb2, workflow_service_pb2
from services.wms.http.openapi import Direction, Schemas, load_comments

SERVICES = [
    workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"],
    event_service_pb2.DESCRIPTOR.services_by_name["EventService"],
]


@pytest.fixture
async def document(http: aiohttp.ClientSession) -> dict[str, Any]:
    async with http.get("/v1/openapi.json") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "application/json"
        body: dict[str, Any] = await resp.json()
        return body


def annotated_rpcs() -> list[tuple[descriptor.MethodDescriptor, str, str]]:
    """(method, verb, path) of every google.api.http binding, read straight off the descriptors."""
    found = []
    for service in SERVICES:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            verb = rule.WhichOneof("pattern")
            found.append((method, verb, getattr(rule, verb)))
    return found


def conforms(document: dict[str, Any], name: str, instance: Any) -> bool:
    """Whether a JSON value matches components.schemas[name], references resolved in the
    document."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return Draft202012Validator(schema).is_valid(instance)


def to_json(message: Any) -> Any:
    """The gateway's JSON form of a message."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


async def test_document_is_valid_openapi_3_1_served_without_a_token(
    document: dict[str, Any],
) -> None:
    validate(document)  # raises on any violation
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["title"] == "EWMS Workflow Management Service"
    assert document["servers"] == [{"url": "/"}]


async def test_every_annotated_rpc_is_an_operation_at_its_verb_and_path(
    document: dict[str, Any],
) -> None:
    rpcs = annotated_rpcs()
    assert {method.containing_service.name for method, _, _ in rpcs} == {
        "WorkflowService",
        "EventService",
    }

    for method, verb, path in rpcs:
        operation = document["paths"][path][verb]
        assert operation["operationId"] == f"{method.containing_service.name}_{method.name}"
        assert operation["tags"] == [method.containing_service.name]
    operations = [op for item in document["paths"].values() for op in item.values()]
    assert len(operations) == len(rpcs)


async def test_unannotated_rpcs_are_not_operations(document: dict[str, Any]) -> None:
    ids = {op["operationId"] for item in document["paths"].values() for op in item.values()}
    assert "EventService_Subscribe" not in ids


async def test_path_variables_are_typed_path_parameters(document: dict[str, Any]) -> None:
    operation = document["paths"]["/v1/queues/{queue_id}/stats"]["get"]

    assert operation["parameters"] == [
        {
            "name": "queue_id",
            "in": "path",
            "required": True,
            "description": "The queue's id.",
            "schema": {"type": "string"},
        }
    ]


async def test_get_requests_take_their_other_fields_as_query_parameters(
    document: dict[str, Any],
) -> None:
    parameters = {p["name"]: p for p in document["paths"]["/v1/workflows"]["get"]["parameters"]}

    assert set(parameters) == {
        field.name for field in SERVICES[0].methods_by_name["ListWorkflows"].input_type.fields
    }
    assert all(p["in"] == "query" for p in parameters.values())
    assert parameters["state"]["schema"] == {"$ref": "#/components/schemas/ewms.v1.WorkflowState"}
    assert parameters["created_after"]["schema"] == {"type": "string", "format": "date-time"}
    assert parameters["page_size"]["schema"] == {"type": "integer", "format": "int32"}


async def test_a_star_body_is_the_request_less_its_path_fields(document: dict[str, Any]) -> None:
    operation = document["paths"]["/v1/queues/{queue_id}/actions/ack"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]

    assert set(schema["properties"]) == {"ack_ids"}
    assert schema["required"] == ["ack_ids"]
    assert "parameters" not in operation or all(p["in"] == "path" for p in operation["parameters"])


async def test_a_body_without_path_fields_is_the_request_message(
    document: dict[str, Any],
) -> None:
    body = document["paths"]["/v1/workflows"]["post"]["requestBody"]

    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ewms.v1.CreateWorkflowRequest"
    }
    request = document["components"]["schemas"]["ewms.v1.CreateWorkflowRequest"]
    assert request["required"] == ["tasks"]  # google.api.field_behavior = REQUIRED


async def test_proto_comments_become_summaries_and_descriptions(
    document: dict[str, Any],
) -> None:
    schemas = document["components"]["schemas"]

    assert document["paths"]["/v1/workflows/{workflow_id}"]["get"]["summary"] == (
        "Returns one workflow."
    )
    assert schemas["ewms.v1.Workflow"]["description"].startswith("A workflow: one or more tasks")
    assert schemas["ewms.v1.Workflow"]["properties"]["owner"]["description"].startswith(
        'Subject ("sub" claim) of the token'
    )
    assert (
        "- `DEACTIVATION_ABORTED`: The owner gave up on the workflow"
        in (schemas["ewms.v1.Deactivation"]["description"])
    )
    tags = {tag["name"]: tag for tag in document["tags"]}
    assert tags["EventService"]["description"].startswith("Events in and out of a workflow's")


async def test_every_message_field_and_operation_is_described(document: dict[str, Any]) -> None:
    # The protos comment everything (buf lint COMMENTS): a gap means a stale descriptor set.
    for name, schema in document["components"]["schemas"].items():
        assert schema.get("description"), name
        for field, value in schema.get("properties", {}).items():
            assert value.get("description"), f"{name}.{field}"
    for path, item in document["paths"].items():
        for verb, operation in item.items():
            assert operation.get("description"), f"{verb} {path}"


async def test_int64_fields_are_decimal_strings(document: dict[str, Any]) -> None:
    ready = document["components"]["schemas"]["ewms.v1.QueueStats"]["properties"]["ready"]

    assert ready["type"] == "string"
    assert ready["format"] == "int64"
    stats = queue_pb2.QueueStats(queue_id="Q-1", ready=2**62, acked=3)
    assert conforms(document, "ewms.v1.QueueStats", to_json(stats))
    assert not conforms(document, "ewms.v1.QueueStats", {"ready": 5})


async def test_bytes_are_base64(document: dict[str, Any]) -> None:
    payload = document["components"]["schemas"]["ewms.v1.Event"]["properties"]["payload"]

    assert payload["type"] == "string"
    assert payload["contentEncoding"] == "base64"
    event = queue_pb2.Event(event_id="EV-1", payload=b"\x00\xffbinary", headers={"a": "b"})
    assert to_json(event)["payload"] == "AP9iaW5hcnk="
    assert conforms(document, "ewms.v1.Event", to_json(event))


async def test_enums_are_value_names(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    phase = schemas["ewms.v1.Taskforce"]["properties"]["phase"]

    assert phase["$ref"] == "#/components/schemas/ewms.v1.TaskforcePhase"
    assert schemas["ewms.v1.TaskforcePhase"]["type"] == "string"
    assert schemas["ewms.v1.TaskforcePhase"]["enum"] == [
        value.name for value in taskforce_pb2.TaskforcePhase.DESCRIPTOR.values
    ]
    taskforce = taskforce_pb2.Taskforce(
        taskforce_uuid="TF-1",
        phase=taskforce_pb2.TASKFORCE_PHASE_CONDOR_SUBMIT,
        counters=taskforce_pb2.TaskCounters(events_received=7),
        compound_statuses=[taskforce_pb2.CompoundStatus(job_state=taskforce_pb2.JOB_STATE_HELD)],
        top_task_errors={"boom": 2},
        timestamp=Timestamp(seconds=1_700_000_000),
    )
    assert conforms(document, "ewms.v1.Taskforce", to_json(taskforce))
    assert not conforms(document, "ewms.v1.Taskforce", {"phase": 4})


async def test_errors_are_google_rpc_status(document: dict[str, Any]) -> None:
    status = document["components"]["schemas"]["google.rpc.Status"]["properties"]

    assert status["code"]["type"] == "integer"
    assert status["message"]["type"] == "string"
    assert status["details"]["items"]["properties"]["@type"] == {"type": "string"}
    assert status["details"]["items"]["additionalProperties"] is True
    for item in document["paths"].values():
        for operation in item.values():
            error = operation["responses"]["default"]["content"]["application/json"]
            assert error["schema"] == {"$ref": "#/components/schemas/google.rpc.Status"}
    bad_request = {
        "code": 3,
        "message": "bad",
        "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest", "field_violations": []}],
    }
    assert conforms(document, "google.rpc.Status", bad_request)


async def test_a_server_stream_answers_server_sent_events(document: dict[str, Any]) -> None:
    ok = document["paths"]["/v1/workflows/{workflow_id}/watch"]["get"]["responses"]["200"]

    stream = ok["content"]["text/event-stream"]
    assert stream["schema"] == {"type": "string"}
    assert stream["x-sse-data"] == {"$ref": "#/components/schemas/ewms.v1.WatchWorkflowResponse"}


async def test_every_operation_needs_a_bearer_jwt(document: dict[str, Any]) -> None:
    assert document["security"] == [{"bearer": []}]
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": document["components"]["securitySchemes"]["bearer"]["description"],
    }


def test_a_message_used_both_ways_gets_a_request_schema_only_where_they_differ() -> None:
    stats = queue_pb2.QueueStats.DESCRIPTOR
    event = queue_pb2.Event.DESCRIPTOR
    schemas = Schemas(load_comments(), responses=[stats, event])

    assert schemas.ref(stats, Direction.OUTPUT) == {
        "$ref": "#/components/schemas/ewms.v1.QueueStats"
    }
    assert schemas.ref(stats, Direction.INPUT) == {
        "$ref": "#/components/schemas/ewms.v1.QueueStats-Input"
    }
    assert schemas.components["ewms.v1.QueueStats-Input"]["properties"]["ready"]["type"] == [
        "string",
        "integer",
    ]
    assert schemas.ref(event, Direction.INPUT) == schemas.ref(event, Direction.OUTPUT)


async def test_docs_page_lists_every_operation_without_a_token(
    http: aiohttp.ClientSession, document: dict[str, Any]
) -> None:
    async with http.get("/docs") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()

    for path, item in document["paths"].items():
        assert html.escape(path) in page
        for operation in item.values():
            assert f"id='op-{operation['operationId']}'" in page
    # Every schema link lands on a schema section.
    anchors = set(re.findall(r"id='(schema-[^']+)'", page))
    links = set(re.findall(r"href='#(schema-[^']+)'", page))
    assert links and links <= anchors
    assert "<script" not in page
