"""A workflow request's JSON: every mistake reported at once, by path, in our own words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import status_pb2

from ewms.v1 import pilot_service_pb2, taskforce_pb2, workflow_service_pb2
from services.cli import main, workflow_json
from tests.conftest import ROOT, seed_request

WS = workflow_service_pb2
# examples/*/workflow.json and examples/seed-workflow.json
EXAMPLES = sorted(ROOT.glob("examples/**/*workflow.json"))


def problems(data: object, message: Message | None = None) -> list[str]:
    """The problems ``parse`` reports, as printed; empty when it parses."""
    try:
        workflow_json.parse(data, WS.CreateWorkflowRequest() if message is None else message)
    except workflow_json.JsonProblems as exc:
        return [str(problem) for problem in exc.problems]
    return []


def with_task(**fields: Any) -> dict[str, Any]:
    """The seed request with these fields of its first task replaced."""
    request = seed_request()
    request["tasks"][0].update(fields)
    return request


def test_every_unknown_field_is_listed_with_a_suggestion() -> None:
    request = with_task(task_arg="echo", worker_confg={})
    request["priorty"] = 5
    assert problems(request) == [
        'tasks[0].task_arg: unknown field; did you mean "task_args"?',
        'tasks[0].worker_confg: unknown field; did you mean "worker_config"?',
        'priorty: unknown field; did you mean "priority"?',
    ]


def test_an_unknown_field_like_no_other_gets_no_suggestion() -> None:
    request = seed_request()
    request["publik"] = ["input-queue"]
    assert problems(request) == ["publik: unknown field"]


def test_camel_case_names_are_accepted_as_parsedict_accepts_them() -> None:
    request = seed_request()
    task = request["tasks"][0]
    task["taskArgs"] = task.pop("task_args")
    task["nWorkers"] = task.pop("n_workers")
    request["publicQueueAliases"] = request.pop("public_queue_aliases")
    assert workflow_json.parse(request, WS.CreateWorkflowRequest()) == json_format.ParseDict(
        seed_request(), WS.CreateWorkflowRequest()
    )


def test_a_misspelt_camel_case_name_gets_the_proto_name_suggested() -> None:
    assert problems(with_task(taskArg="echo")) == [
        'tasks[0].taskArg: unknown field; did you mean "task_args"?'
    ]


def test_a_field_given_under_both_its_names_is_reported() -> None:
    assert problems(with_task(nWorkers=2)) == [
        'tasks[0].nWorkers: is given twice, also as "n_workers"'
    ]


def test_a_string_for_an_integer_is_reported_in_our_words() -> None:
    assert problems(with_task(n_workers="two")) == [
        'tasks[0].n_workers: must be an integer, got "two"'
    ]


def test_a_string_for_a_list_is_reported_in_our_words() -> None:
    assert problems(with_task(cluster_locations="local")) == [
        'tasks[0].cluster_locations: must be a list of strings, got "local"'
    ]


def test_a_number_for_a_string_is_reported_in_our_words() -> None:
    assert problems(with_task(task_image=3)) == ["tasks[0].task_image: must be a string, got 3"]


def test_a_string_for_a_boolean_is_reported_in_our_words() -> None:
    request = seed_request()
    request["tasks"][0]["worker_config"]["do_transfer_worker_stdouterr"] = "yes"
    assert problems(request) == [
        'tasks[0].worker_config.do_transfer_worker_stdouterr: must be true or false, got "yes"'
    ]


def test_a_list_for_an_object_is_reported_in_our_words() -> None:
    assert problems(with_task(pilot_config=["tag", "latest"])) == [
        'tasks[0].pilot_config: must be an object, got ["tag", "latest"]'
    ]


def test_true_is_not_an_integer() -> None:
    assert problems(with_task(max_attempts=True)) == [
        "tasks[0].max_attempts: must be an integer, got true"
    ]


def test_a_fraction_is_not_an_integer() -> None:
    assert problems(with_task(n_workers=2.5)) == ["tasks[0].n_workers: must be an integer, got 2.5"]


def test_an_integer_beyond_int32_is_reported_with_the_range() -> None:
    assert problems(with_task(n_workers=3_000_000_000)) == [
        "tasks[0].n_workers: must be an integer from -2147483648 to 2147483647, got 3000000000"
    ]


def test_integers_may_be_quoted_or_written_with_a_zero_fraction() -> None:
    for written in ("7", 7.0, "7.0", "7e0"):
        request = with_task(n_workers=written)
        assert workflow_json.parse(request, WS.CreateWorkflowRequest()).tasks[0].n_workers == 7


def test_64_bit_integers_may_be_written_as_strings() -> None:
    beyond_a_double = "9007199254740993"  # 2**53 + 1
    counters = workflow_json.parse(
        {"events_received": beyond_a_double}, taskforce_pb2.TaskCounters()
    )
    assert counters.events_received == 2**53 + 1


def test_64_bit_integers_beyond_their_range_are_reported() -> None:
    assert problems({"tasks_failed": str(2**63)}, taskforce_pb2.TaskCounters()) == [
        "tasks_failed: must be an integer from -9223372036854775808 to 9223372036854775807, "
        'got "9223372036854775808"'
    ]


def test_a_number_field_takes_numbers_and_quoted_infinity_but_not_words() -> None:
    metrics = pilot_service_pb2.TaskMetrics()
    assert problems({"wall_seconds": 1.5, "cpu_seconds": "Infinity"}, metrics) == []
    assert problems({"wall_seconds": "fast"}, metrics) == [
        'wall_seconds: must be a number (or "NaN", "Infinity", "-Infinity"), got "fast"'
    ]


def test_an_unknown_enum_name_lists_the_valid_names() -> None:
    assert problems({"state": "RUNNING"}, WS.ListWorkflowsRequest()) == [
        "state: must be one of WORKFLOW_STATE_UNSPECIFIED, WORKFLOW_STATE_ACTIVE, "
        'WORKFLOW_STATE_ABORTED, WORKFLOW_STATE_FINISHED, got "RUNNING"'
    ]


def test_an_enum_takes_a_name_or_a_number() -> None:
    by_name = workflow_json.parse({"state": "WORKFLOW_STATE_ABORTED"}, WS.ListWorkflowsRequest())
    by_number = workflow_json.parse({"state": 2}, WS.ListWorkflowsRequest())
    assert by_name.state == by_number.state == WS.WORKFLOW_STATE_ABORTED


def test_map_values_are_checked_under_their_key() -> None:
    assert problems(with_task(task_env={"GOOD": "1", "BAD": 1})) == [
        "tasks[0].task_env.BAD: must be a string, got 1"
    ]


def test_a_map_must_be_an_object() -> None:
    assert problems(with_task(task_env=["A=1"])) == [
        'tasks[0].task_env: must be an object, got ["A=1"]'
    ]


def test_problems_in_nested_and_repeated_messages_name_their_full_path() -> None:
    request = seed_request()
    second = json.loads(json.dumps(request["tasks"][0]))
    second["worker_config"]["n_cores"] = "one"
    second["pilot_config"] = {"input_files": "a.txt"}
    request["tasks"].append(second)
    assert problems(request) == [
        'tasks[1].worker_config.n_cores: must be an integer, got "one"',
        'tasks[1].pilot_config.input_files: must be a list of strings, got "a.txt"',
    ]


def test_null_leaves_a_field_unset_as_parsedict_does() -> None:
    request = with_task(n_workers=None, pilot_config=None)
    task = workflow_json.parse(request, WS.CreateWorkflowRequest()).tasks[0]
    assert not task.HasField("n_workers") and not task.HasField("pilot_config")


def test_null_in_a_list_is_reported() -> None:
    assert problems(with_task(cluster_locations=["local", None])) == [
        "tasks[0].cluster_locations[1]: must be a string, got null"
    ]


def test_a_time_must_be_an_rfc3339_string() -> None:
    assert problems({"created_after": "yesterday"}, WS.ListWorkflowsRequest()) == [
        'created_after: must be an RFC 3339 time such as "2024-05-01T12:00:00Z", got "yesterday"'
    ]
    assert problems({"created_after": "2024-05-01T12:00:00Z"}, WS.ListWorkflowsRequest()) == []


def test_a_value_field_takes_any_json() -> None:
    for disk in (512, "1G", None, [1, "2"], {"size": [1, None]}):
        request = seed_request()
        request["tasks"][0]["worker_config"]["worker_disk"] = disk
        assert problems(request) == []


def test_long_values_are_cut_short() -> None:
    assert problems(with_task(task_image=list(range(100)))) == [
        "tasks[0].task_image: must be a string, got [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11..."
    ]


def test_the_top_level_must_be_an_object() -> None:
    assert problems([seed_request()]) == [
        'the top level must be a JSON object, got [{"public_queue_aliases": ["input-que...'
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_examples_parse_unchanged(path: Path) -> None:
    data = json.loads(path.read_text())
    expected = json_format.ParseDict(data, WS.CreateWorkflowRequest())
    assert workflow_json.parse(data, WS.CreateWorkflowRequest()) == expected


def test_what_the_walk_leaves_to_protobuf_is_reported_in_its_first_line() -> None:
    # The walk checks that an Any names its type, not that the type exists.
    unknown_type = {"details": [{"@type": "type.googleapis.com/no.Such"}]}
    [problem] = problems(unknown_type, status_pb2.Status())
    assert problem.startswith("Failed to parse details field: ")
    assert "type.googleapis.com/no.Such" in problem and "\n" not in problem


def write_bad_request(tmp_path: Path) -> str:
    request = with_task(task_arg="echo", n_workers="two", cluster_locations="local")
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(request))
    return str(path)


BAD_REQUEST_LINES = [
    '  tasks[0].cluster_locations: must be a list of strings, got "local"',
    '  tasks[0].n_workers: must be an integer, got "two"',
    '  tasks[0].task_arg: unknown field; did you mean "task_args"?',
]


def test_workflow_submit_lists_every_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EWMS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("EWMS_TOKEN", raising=False)
    path = write_bad_request(tmp_path)
    assert main(["workflow", "submit", path]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: 3 problems in the workflow request",
        *BAD_REQUEST_LINES,
    ]


def test_run_refuses_a_bad_request_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_bad_request(tmp_path)
    events, out = tmp_path / "events.txt", tmp_path / "out.txt"
    events.write_text("a\n")
    assert main(["run", path, "--in", str(events), "--out", str(out), "--text"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: 3 problems in the workflow request",
        *BAD_REQUEST_LINES,
    ]
    assert not out.exists()
