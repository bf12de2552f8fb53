"""The limits table (services/wms/limits.py): every request field has a row, the documentation is
the table's own rendering, and the walk refuses what is over a limit, naming the field."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import struct_pb2

from ewms.v1 import event_service_pb2, queue_pb2, workflow_service_pb2
from services.wms import limits
from tests.wms.requests import minimal_task, workflow_request

DOC = Path(__file__).resolve().parents[2] / "docs" / "limits.md"


def test_every_string_list_and_map_field_of_every_request_has_a_limit() -> None:
    fields = {f.full_name for f in limits.request_fields()}

    assert fields - set(limits.TEXT) == set(), "request fields without a row in limits.TEXT"
    assert set(limits.TEXT) - fields == set(), "rows of limits.TEXT that are no request field"


def test_docs_limits_md_is_the_tables_rendering() -> None:
    assert DOC.read_text() == limits.markdown(), "run: python scripts/gen_limits_doc.py"


def test_largest_allowed_values_pass_the_walk() -> None:
    req = workflow_request(
        minimal_task(
            task_args="a" * limits.ARGS_CHARS,
            task_env={"A" * limits.ENV_NAME_CHARS: "v" * limits.ENV_VALUE_CHARS},
            cluster_locations=["l" * limits.LOCATION_CHARS] * limits.LOCATIONS_PER_TASK,
        )
    )

    assert limits.violations(req) == []


def test_one_character_over_is_named_by_field_path() -> None:
    req = workflow_request(minimal_task(), minimal_task(init_args="a" * (limits.ARGS_CHARS + 1)))

    assert limits.violations(req) == [
        ("tasks[1].init_args", f"at most {limits.ARGS_CHARS:,} characters (got 16,385)")
    ]


def test_map_name_value_and_total_are_each_bounded() -> None:
    env = {f"V{i}": "x" * limits.ENV_VALUE_CHARS for i in range(4)}  # 16,392 characters in all
    env["N" * (limits.ENV_NAME_CHARS + 1)] = "v"
    env["BIG"] = "x" * (limits.ENV_VALUE_CHARS + 1)
    req = workflow_request(minimal_task(task_env=env))

    found = sorted(limits.violations(req))  # a map's entries come in no particular order

    assert [field for field, _ in found] == [
        "tasks[0].task_env",
        "tasks[0].task_env",
        "tasks[0].task_env.BIG",
    ]
    name_rule, total_rule = sorted(description for _, description in found[:2])
    assert "is longer than 128 characters" in name_rule
    assert total_rule.startswith("names and values at most 16,384 characters in all")
    assert found[2][1] == "at most 4,096 characters (got 4,097)"


def test_nul_is_refused_in_names_values_and_lists() -> None:
    req = workflow_request(minimal_task(task_env={"A": "x\0"}, cluster_locations=["lo\0cal"]))
    req.tasks[0].pilot_config.environment["EWMS_PILOT_X"].list_value.values.add(string_value="a\0")

    fields = [field for field, _ in limits.violations(req)]

    assert fields == [
        "tasks[0].cluster_locations[0]",
        "tasks[0].task_env.A",
        "tasks[0].pilot_config.environment.EWMS_PILOT_X[0]",
    ]


def test_a_list_over_its_count_is_not_looked_into() -> None:
    req = event_service_pb2.AckRequest(queue_id="q", ack_ids=["x" * 1000] * (limits.ACK_IDS + 1))

    assert limits.violations(req) == [("ack_ids", "at most 10,000 items (got 10,001)")]


def test_timestamps_out_of_range_are_named() -> None:
    req = workflow_service_pb2.ListWorkflowsRequest()
    req.created_after.seconds = 253_402_300_800
    req.created_before.nanos = 1_000_000_000
    event = queue_pb2.Event(payload=b"x")
    event.published_ts.seconds = -62_135_596_801

    assert [f for f, _ in limits.violations(req)] == ["created_after", "created_before"]
    assert [f for f, _ in limits.violations(event)] == ["published_ts"]


def test_event_content_is_left_to_the_event_size_check() -> None:
    event = queue_pb2.Event(text="\0" * 100_000, payload=b"\0")
    event.json.CopyFrom(struct_pb2.Value(string_value="\0" * 100_000))

    assert limits.violations(event) == []
