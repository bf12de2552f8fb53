"""Event content as json or text instead of payload bytes: published events are stored as bytes
(canonical JSON, UTF-8 text) under the size limit, and come back as json or text when the receiver
asks for PAYLOAD_FORMAT_DECODED -- the contract that lets a REST client skip base64."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from ewms.v1 import event_service_pb2, event_service_pb2_grpc, queue_pb2, workflow_service_pb2
from services.errors import field_violations
from tests.wms.helpers import Env, StartEnv
from tests.wms.requests import workflow_request

es = event_service_pb2
DECODED = es.PAYLOAD_FORMAT_DECODED
Events = event_service_pb2_grpc.EventServiceStub


def value(obj: object) -> struct_pb2.Value:
    return json_format.ParseDict(obj, struct_pb2.Value())


def form(event: queue_pb2.Event) -> str:
    """Which field holds a received event's content."""
    return next((f for f in ("json", "text") if event.HasField(f)), "payload")


async def input_queue(env: Env) -> str:
    """The input queue ("in") of a new workflow of alice's."""
    created = await env.workflows.CreateWorkflow(workflow_request(), metadata=env.alice)
    listed = await env.workflows.ListQueues(
        workflow_service_pb2.ListQueuesRequest(workflow_id=created.workflow.workflow_id),
        metadata=env.alice,
    )
    [queue] = [q for q in listed.queues if q.alias == "in"]
    return queue.queue_id


async def publish(env: Env, queue_id: str, *events: queue_pb2.Event) -> list[str]:
    resp = await Events(env.channel).Publish(
        es.PublishRequest(queue_id=queue_id, events=events), metadata=env.alice
    )
    return list(resp.event_ids)


async def receive(
    env: Env, queue_id: str, n: int, payload_format: int = es.PAYLOAD_FORMAT_UNSPECIFIED
) -> list[queue_pb2.Event]:
    resp = await Events(env.channel).Receive(
        es.ReceiveRequest(
            queue_id=queue_id, max_events=n, wait_seconds=5, payload_format=payload_format
        ),
        metadata=env.alice,
    )
    assert len(resp.deliveries) == n
    return [d.event for d in resp.deliveries]


async def rejected(env: Env, queue_id: str, *events: queue_pb2.Event) -> dict[str, str]:
    """The field violations of a publish that must be rejected, as {field: description}."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await publish(env, queue_id, *events)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return dict(field_violations(err.value))


@pytest.fixture
async def env(start_env: StartEnv) -> Env:
    return await start_env(max_event_bytes=1024)


@pytest.fixture
async def queue_id(env: Env) -> str:
    return await input_queue(env)


async def test_json_event_is_stored_as_compact_json_bytes(env: Env, queue_id: str) -> None:
    await publish(env, queue_id, queue_pb2.Event(json=value({"b": [1, 2.5, None], "a": "é"})))

    [event] = await receive(env, queue_id, 1)

    assert event.payload == '{"a":"é","b":[1,2.5,null]}'.encode()
    assert event.content_type == "application/json"
    assert not event.HasField("json")


async def test_json_event_keeps_a_json_content_type_given(env: Env, queue_id: str) -> None:
    await publish(
        env,
        queue_id,
        queue_pb2.Event(json=value({"x": 1}), content_type="application/vnd.reading+json"),
    )

    [event] = await receive(env, queue_id, 1)

    assert event.content_type == "application/vnd.reading+json"


async def test_text_event_is_stored_as_utf8_bytes(env: Env, queue_id: str) -> None:
    await publish(env, queue_id, queue_pb2.Event(text="héllo\n"))

    [event] = await receive(env, queue_id, 1)

    assert event.payload == "héllo\n".encode()
    assert event.content_type == "text/plain; charset=utf-8"


async def test_decoded_receive_returns_json_and_text(env: Env, queue_id: str) -> None:
    await publish(
        env,
        queue_id,
        queue_pb2.Event(json=value({"sensor": "a", "raw": 3})),
        queue_pb2.Event(text="plain words"),
        queue_pb2.Event(payload=b"[1, 2]", content_type="application/json"),
    )

    events = await receive(env, queue_id, 3, DECODED)

    assert [form(e) for e in events] == ["json", "text", "json"]
    assert json_format.MessageToDict(events[0].json) == {"sensor": "a", "raw": 3}
    assert events[1].text == "plain words"
    assert json_format.MessageToDict(events[2].json) == [1, 2]
    assert all(e.payload == b"" for e in events)


async def test_decoded_receive_keeps_bytes_that_are_not_utf8(env: Env, queue_id: str) -> None:
    await publish(
        env, queue_id, queue_pb2.Event(payload=b"\xff\x00", content_type="application/octet-stream")
    )

    [event] = await receive(env, queue_id, 1, DECODED)

    assert form(event) == "payload"
    assert event.payload == b"\xff\x00"


async def test_decoded_receive_gives_inexact_json_as_text(env: Env, queue_id: str) -> None:
    # An integer no double holds exactly would change as a Value; as text it stays exact.
    big = b'{"id": 12345678901234567890}'
    await publish(env, queue_id, queue_pb2.Event(payload=big, content_type="application/json"))

    [event] = await receive(env, queue_id, 1, DECODED)

    assert form(event) == "text"
    assert event.text == big.decode()


async def test_default_receive_returns_bytes(env: Env, queue_id: str) -> None:
    await publish(env, queue_id, queue_pb2.Event(text="t"))

    [event] = await receive(env, queue_id, 1)

    assert form(event) == "payload"
    assert event.payload == b"t"


async def test_decoded_dead_letters_return_json(env: Env, queue_id: str) -> None:
    events = Events(env.channel)
    await publish(env, queue_id, queue_pb2.Event(json=value({"bad": True})))
    resp = await events.Receive(es.ReceiveRequest(queue_id=queue_id), metadata=env.alice)
    await events.Nack(
        es.NackRequest(queue_id=queue_id, ack_id=resp.deliveries[0].ack_id, dead_letter=True),
        metadata=env.alice,
    )

    listed = await events.ListDeadLetters(
        es.ListDeadLettersRequest(queue_id=queue_id, payload_format=DECODED), metadata=env.alice
    )

    [letter] = listed.dead_letters
    assert json_format.MessageToDict(letter.event.json) == {"bad": True}


async def test_payload_and_json_together_are_rejected(env: Env, queue_id: str) -> None:
    violations = await rejected(
        env, queue_id, queue_pb2.Event(text="ok"), queue_pb2.Event(payload=b"x", json=value(1))
    )

    assert list(violations) == ["events[1].json"]
    assert "payload and json are set" in violations["events[1].json"]


async def test_json_and_text_together_are_rejected(env: Env, queue_id: str) -> None:
    violations = await rejected(env, queue_id, queue_pb2.Event(json=value("a"), text="a"))

    assert list(violations) == ["events[0].text"]
    assert "json and text are set" in violations["events[0].text"]


async def test_json_over_the_size_limit_is_rejected(env: Env, queue_id: str) -> None:
    violations = await rejected(env, queue_id, queue_pb2.Event(json=value({"x": "y" * 1100})))

    assert list(violations) == ["events[0].json"]
    assert "over the limit of 1024 bytes" in violations["events[0].json"]


async def test_text_over_the_size_limit_is_rejected(env: Env, queue_id: str) -> None:
    # 600 characters, 1200 bytes: the limit counts the encoded bytes.
    violations = await rejected(env, queue_id, queue_pb2.Event(text="é" * 600))

    assert violations["events[0].text"].startswith("encodes to a payload of 1200 bytes")


async def test_json_with_a_text_content_type_is_rejected(env: Env, queue_id: str) -> None:
    violations = await rejected(
        env, queue_id, queue_pb2.Event(json=value({}), content_type="text/plain")
    )

    assert "must be a JSON type" in violations["events[0].content_type"]


async def test_text_with_another_charset_is_rejected(env: Env, queue_id: str) -> None:
    violations = await rejected(
        env, queue_id, queue_pb2.Event(text="a", content_type="text/plain; charset=latin-1")
    )

    assert "latin-1" in violations["events[0].content_type"]


async def test_json_value_with_no_kind_is_rejected(env: Env, queue_id: str) -> None:
    nested = value({"a": [1]})
    nested.struct_value.fields["a"].list_value.values.add()

    violations = await rejected(env, queue_id, queue_pb2.Event(json=nested))

    assert "the value at '/a/1' has no kind set" in violations["events[0].json"]


async def test_non_finite_json_number_is_rejected_and_nothing_stored(
    env: Env, queue_id: str
) -> None:
    violations = await rejected(
        env, queue_id, queue_pb2.Event(text="a"), queue_pb2.Event(json=value({"n": float("nan")}))
    )

    assert "'/n' is nan; JSON numbers are finite" in violations["events[1].json"]
    stats = await Events(env.channel).GetQueueStats(
        es.GetQueueStatsRequest(queue_id=queue_id), metadata=env.alice
    )

    assert stats.published == 0


async def test_unknown_payload_format_is_rejected(env: Env, queue_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await receive(env, queue_id, 1, payload_format=7)

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(field_violations(err.value)).keys() == {"payload_format"}
