"""CreateWorkflow's validation: each rule, broken alone, comes back as an INVALID_ARGUMENT field
violation naming the field; several faults come back together; a rejected request creates
nothing."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, timestamp_pb2

from ewms.v1 import workflow_service_pb2, workflow_service_pb2_grpc
from services.errors import field_violations
from services.wms import limits
from tests.conftest import seed_request
from tests.wms.requests import (
    IMAGE,
    minimal_task,
    parse,
    seed,
    worker_config,
    workflow_json,
    workflow_request,
)

Stub = workflow_service_pb2_grpc.WorkflowServiceStub
Metadata = tuple[tuple[str, str], ...]
RESERVED_PILOT_ENV = [
    "EWMS_PILOT_TASK_IMAGE",
    "EWMS_PILOT_TASK_ARGS",
    "EWMS_PILOT_TASK_ENV_JSON",
    "EWMS_PILOT_INIT_IMAGE",
    "EWMS_PILOT_INIT_ARGS",
    "EWMS_PILOT_INIT_ENV_JSON",
]
WORKER_CONFIG_REQUIRED = [
    "do_transfer_worker_stdouterr",
    "max_worker_runtime",
    "n_cores",
    "priority",
    "worker_disk",
    "worker_memory",
]


async def rejected(
    workflows: Stub, md: Metadata, request: workflow_service_pb2.CreateWorkflowRequest
) -> dict[str, str]:
    """The field violations of a request that must be rejected, as {field: description}."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await workflows.CreateWorkflow(request, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert violations, "INVALID_ARGUMENT without BadRequest field violations"
    return dict(violations)


async def only_violation(
    workflows: Stub, md: Metadata, request: workflow_service_pb2.CreateWorkflowRequest
) -> tuple[str, str]:
    """The single field violation of a request that breaks exactly one rule."""
    violations = await rejected(workflows, md, request)
    assert len(violations) == 1, violations
    [(field, description)] = violations.items()
    return field, description


async def accepted(
    workflows: Stub, md: Metadata, request: workflow_service_pb2.CreateWorkflowRequest
) -> workflow_service_pb2.CreateWorkflowResponse:
    return await workflows.CreateWorkflow(request, metadata=md)


# --- Tasks and worker_config ----------------------------------------------------------------------


async def test_request_without_tasks_is_rejected(workflows: Stub, alice: Metadata) -> None:
    field, description = await only_violation(workflows, alice, parse({"tasks": []}))

    assert field == "tasks"
    assert "at least one task" in description


async def test_task_without_worker_config_is_rejected(workflows: Stub, alice: Metadata) -> None:
    task = minimal_task()
    del task["worker_config"]

    field, description = await only_violation(workflows, alice, workflow_request(task))

    assert (field, description) == ("tasks[0].worker_config", "required")


@pytest.mark.parametrize("key", WORKER_CONFIG_REQUIRED)
async def test_worker_config_key_is_required(workflows: Stub, alice: Metadata, key: str) -> None:
    config = worker_config()
    del config[key]

    field, description = await only_violation(
        workflows, alice, workflow_request(minimal_task(worker_config=config))
    )

    assert (field, description) == (f"tasks[0].worker_config.{key}", "required")


async def test_condor_requirements_is_optional(workflows: Stub, alice: Metadata) -> None:
    assert "condor_requirements" not in seed_request()["tasks"][0]["worker_config"]

    resp = await accepted(workflows, alice, seed())

    assert resp.taskforces[0].worker_config.condor_requirements == ""


async def test_zero_max_worker_runtime_is_rejected(workflows: Stub, alice: Metadata) -> None:
    request = workflow_request(minimal_task(worker_config=worker_config(max_worker_runtime=0)))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[0].worker_config.max_worker_runtime"
    assert "positive" in description


async def test_zero_n_cores_is_rejected(workflows: Stub, alice: Metadata) -> None:
    request = workflow_request(minimal_task(worker_config=worker_config(n_cores=0)))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[0].worker_config.n_cores"
    assert "at least 1" in description


@pytest.mark.parametrize("size", ["lots", "-5", 0, "512Q"])
@pytest.mark.parametrize("key", ["worker_disk", "worker_memory"])
async def test_bad_size_is_rejected(workflows: Stub, alice: Metadata, key: str, size: Any) -> None:
    request = workflow_request(minimal_task(worker_config=worker_config(**{key: size})))

    field, description = await only_violation(workflows, alice, request)

    assert field == f"tasks[0].worker_config.{key}"
    assert "'512M'" in description  # the rule shows what a size looks like


@pytest.mark.parametrize(
    ("size", "size_bytes"),
    [("512M", 536870912), ("1GiB", 1073741824), (1024, 1024), ("1.5G", 1610612736)],
)
async def test_good_size_is_stored_in_bytes(
    workflows: Stub, alice: Metadata, size: Any, size_bytes: int
) -> None:
    request = workflow_request(minimal_task(worker_config=worker_config(worker_memory=size)))

    resp = await accepted(workflows, alice, request)

    assert resp.taskforces[0].worker_config.worker_memory.number_value == size_bytes


@pytest.mark.parametrize("size", ["512M", 536870912])
async def test_size_is_also_kept_as_sent(workflows: Stub, alice: Metadata, size: Any) -> None:
    request = workflow_request(
        minimal_task(worker_config=worker_config(worker_disk=size, worker_memory=size))
    )

    wc = (await accepted(workflows, alice, request)).taskforces[0].worker_config

    assert json_format.MessageToDict(wc.worker_disk_as_sent) == size
    assert json_format.MessageToDict(wc.worker_memory_as_sent) == size
    assert wc.worker_disk.number_value == wc.worker_memory.number_value == 536870912


async def test_as_sent_sizes_in_a_request_are_ignored(workflows: Stub, alice: Metadata) -> None:
    config = worker_config(worker_disk="1G", worker_disk_as_sent="1T", worker_memory_as_sent=7)
    request = workflow_request(minimal_task(worker_config=config))

    wc = (await accepted(workflows, alice, request)).taskforces[0].worker_config

    assert wc.worker_disk_as_sent.string_value == "1G"
    assert wc.worker_memory_as_sent.string_value == "512M"


async def test_zero_n_workers_is_rejected(workflows: Stub, alice: Metadata) -> None:
    field, description = await only_violation(
        workflows, alice, workflow_request(minimal_task(n_workers=0))
    )

    assert field == "tasks[0].n_workers"
    assert "at least 1" in description


# --- Pilot config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RESERVED_PILOT_ENV)
async def test_reserved_pilot_environment_key_is_rejected(
    workflows: Stub, alice: Metadata, name: str
) -> None:
    request = workflow_request(minimal_task(pilot_config={"environment": {name: "x"}}))

    field, description = await only_violation(workflows, alice, request)

    assert field == f"tasks[0].pilot_config.environment.{name}"
    assert "reserved" in description


async def test_other_pilot_settings_are_allowed_in_the_environment(
    workflows: Stub, alice: Metadata
) -> None:
    request = workflow_request(
        minimal_task(pilot_config={"environment": {"EWMS_PILOT_TASK_TIMEOUT": 3600}})
    )

    resp = await accepted(workflows, alice, request)

    env = resp.taskforces[0].pilot_config.environment
    assert env["EWMS_PILOT_TASK_TIMEOUT"].number_value == 3600


async def test_mutable_pilot_tag_is_rejected(workflows: Stub, alice: Metadata) -> None:
    request = workflow_request(minimal_task(pilot_config={"tag": "1.2"}))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[0].pilot_config.tag"
    assert "'1.2'" in description
    assert "immutable" in description


async def test_unknown_image_source_is_rejected(workflows: Stub, alice: Metadata) -> None:
    request = workflow_request(minimal_task(pilot_config={"image_source": "dockerhub"}))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[0].pilot_config.image_source"
    assert "cvmfs" in description


# --- Environment names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_fields", "path"),
    [
        ({"task_env": {"1BAD": "x"}}, "tasks[0].task_env.1BAD"),
        ({"init_env": {"BAD-NAME": "x"}}, "tasks[0].init_env.BAD-NAME"),
        (
            {"pilot_config": {"environment": {"NOT AN IDENT": "x"}}},
            "tasks[0].pilot_config.environment.NOT AN IDENT",
        ),
    ],
)
async def test_environment_name_that_is_not_an_identifier_is_rejected(
    workflows: Stub, alice: Metadata, task_fields: dict[str, Any], path: str
) -> None:
    request = workflow_request(minimal_task(**task_fields))

    field, description = await only_violation(workflows, alice, request)

    assert field == path
    assert "variable name must match" in description


# --- What runs ------------------------------------------------------------------------------------


async def test_no_image_and_no_command_is_rejected(workflows: Stub, alice: Metadata) -> None:
    request = workflow_request(minimal_task(task_image="", task_args=""))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[0].task_args"
    assert "task_image is empty" in description


async def test_no_image_with_a_command_runs_the_command_on_the_worker(
    workflows: Stub, alice: Metadata
) -> None:
    request = workflow_request(minimal_task(task_image="", task_args="wc -l {{INFILE}}"))

    resp = await accepted(workflows, alice, request)

    td = resp.task_directives[0]
    assert (td.task_image, td.task_args) == ("", "wc -l {{INFILE}}")


async def test_image_without_args_is_accepted(workflows: Stub, alice: Metadata) -> None:
    resp = await accepted(workflows, alice, workflow_request(minimal_task(task_args="")))

    td = resp.task_directives[0]
    assert (td.task_image, td.task_args) == (IMAGE, "")


@pytest.mark.parametrize("key", ["task_args", "init_args"])
async def test_unbalanced_quotes_in_args_are_rejected(
    workflows: Stub, alice: Metadata, key: str
) -> None:
    request = workflow_request(minimal_task(**{key: "python -c 'print(1)"}))

    field, description = await only_violation(workflows, alice, request)

    assert field == f"tasks[0].{key}"
    assert "cannot be split" in description


# --- Locations, queues, priority ------------------------------------------------------------------


async def test_unknown_cluster_location_is_rejected_listing_the_known_ones(
    workflows: Stub, alice: Metadata
) -> None:
    request = workflow_request(minimal_task(cluster_locations=["osg", "mars"]))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[0].cluster_locations[1]"
    assert "'mars'" in description
    assert "local" in description
    assert "osg" in description


async def test_task_without_cluster_locations_is_rejected(workflows: Stub, alice: Metadata) -> None:
    field, _ = await only_violation(
        workflows, alice, workflow_request(minimal_task(cluster_locations=[]))
    )

    assert field == "tasks[0].cluster_locations"


async def test_location_given_twice_by_name_and_alias_is_rejected(
    workflows: Stub, alice: Metadata
) -> None:
    request = workflow_request(minimal_task(cluster_locations=["osg", "sub-2"]))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[0].cluster_locations[1]"
    assert "duplicate" in description


async def test_public_alias_used_by_no_task_is_rejected(workflows: Stub, alice: Metadata) -> None:
    request = parse(workflow_json(public_queue_aliases=["in", "out", "orphan"]))

    field, description = await only_violation(workflows, alice, request)

    assert field == "public_queue_aliases[2]"
    assert "'orphan'" in description


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (workflow_json(public_queue_aliases=["in", "in"]), "public_queue_aliases[1]"),
        (
            workflow_json(minimal_task(input_queue_aliases=["in", "in"])),
            "tasks[0].input_queue_aliases[1]",
        ),
        (
            workflow_json(minimal_task(output_queue_aliases=["out", "out"])),
            "tasks[0].output_queue_aliases[1]",
        ),
    ],
)
async def test_duplicate_alias_is_rejected(
    workflows: Stub, alice: Metadata, body: dict[str, Any], path: str
) -> None:
    field, description = await only_violation(workflows, alice, parse(body))

    assert field == path
    assert "duplicate alias" in description


async def test_queue_alias_with_bad_characters_is_rejected(
    workflows: Stub, alice: Metadata
) -> None:
    request = parse(
        workflow_json(minimal_task(output_queue_aliases=["out/../x"]), public_queue_aliases=["in"])
    )

    field, _ = await only_violation(workflows, alice, request)

    assert field == "tasks[0].output_queue_aliases[0]"


@pytest.mark.parametrize("priority", [101, -1])
async def test_workflow_priority_out_of_range_is_rejected(
    workflows: Stub, alice: Metadata, priority: int
) -> None:
    field, description = await only_violation(workflows, alice, workflow_request(priority=priority))

    assert field == "priority"
    assert "between 0 and 100" in description


@pytest.mark.parametrize("max_attempts", [0, 101])
async def test_max_attempts_out_of_range_is_rejected(
    workflows: Stub, alice: Metadata, max_attempts: int
) -> None:
    request = workflow_request(minimal_task(max_attempts=max_attempts))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[0].max_attempts"
    assert "between 1 and 100" in description


async def test_tasks_sharing_an_input_queue_must_agree_on_max_attempts(
    workflows: Stub, alice: Metadata
) -> None:
    request = workflow_request(minimal_task(max_attempts=3), minimal_task(max_attempts=5))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[1].max_attempts"
    assert "'in'" in description
    assert "tasks[0]" in description


# --- All at once ----------------------------------------------------------------------------------


async def test_every_violation_is_reported_in_one_error(workflows: Stub, alice: Metadata) -> None:
    broken = minimal_task(
        cluster_locations=["mars"],
        task_env={"9LIVES": "x"},
        n_workers=0,
        pilot_config={"tag": "1.2", "environment": {"EWMS_PILOT_TASK_ARGS": "x"}},
        worker_config=worker_config(n_cores=0, worker_disk="lots"),
    )
    request = parse(workflow_json(broken, public_queue_aliases=["in", "nowhere"], priority=101))

    violations = await rejected(workflows, alice, request)

    assert set(violations) == {
        "priority",
        "tasks[0].cluster_locations[0]",
        "tasks[0].task_env.9LIVES",
        "tasks[0].n_workers",
        "tasks[0].pilot_config.tag",
        "tasks[0].pilot_config.environment.EWMS_PILOT_TASK_ARGS",
        "tasks[0].worker_config.n_cores",
        "tasks[0].worker_config.worker_disk",
        "public_queue_aliases[1]",
    }


async def test_error_message_counts_the_problems(workflows: Stub, alice: Metadata) -> None:
    request = workflow_request(minimal_task(n_workers=0, max_attempts=0))

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await workflows.CreateWorkflow(request, metadata=alice)

    assert err.value.details() == "invalid workflow request: 2 problems"


async def test_rejected_request_creates_nothing(workflows: Stub, alice: Metadata) -> None:
    await rejected(workflows, alice, workflow_request(minimal_task(n_workers=0)))

    listed = await workflows.ListWorkflows(
        workflow_service_pb2.ListWorkflowsRequest(), metadata=alice
    )
    assert list(listed.workflows) == []
    taskforces = await workflows.ListTaskforces(
        workflow_service_pb2.ListTaskforcesRequest(), metadata=alice
    )
    assert list(taskforces.taskforces) == []


# --- Limits and edge values: refused by name, never INTERNAL, always receivable -------------------


def _with_number(key: str, number: float) -> workflow_service_pb2.CreateWorkflowRequest:
    request = workflow_request(minimal_task())
    getattr(request.tasks[0].worker_config, key).number_value = number
    return request


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan, 1e300])
@pytest.mark.parametrize("key", ["worker_disk", "worker_memory"])
async def test_size_that_is_no_whole_byte_count_up_to_a_pebibyte_is_rejected(
    workflows: Stub, alice: Metadata, key: str, number: float
) -> None:
    field, _ = await only_violation(workflows, alice, _with_number(key, number))

    assert field == f"tasks[0].worker_config.{key}"


@pytest.mark.parametrize("size", ["9" * 400, "9" * 60, "9999999999999T", "1025P"])
async def test_oversized_size_string_is_rejected(
    workflows: Stub, alice: Metadata, size: str
) -> None:
    request = workflow_request(minimal_task(worker_config=worker_config(worker_memory=size)))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[0].worker_config.worker_memory"
    assert "at most" in description


async def test_largest_size_is_a_pebibyte(workflows: Stub, alice: Metadata) -> None:
    request = workflow_request(minimal_task(worker_config=worker_config(worker_disk="1P")))

    resp = await accepted(workflows, alice, request)

    assert resp.taskforces[0].worker_config.worker_disk.number_value == limits.MAX_SIZE_BYTES


@pytest.mark.parametrize("number", [math.inf, -math.inf, math.nan, 2.0**60, 0.5])
async def test_pilot_environment_number_must_be_an_exact_integer(
    workflows: Stub, alice: Metadata, number: float
) -> None:
    request = workflow_request(minimal_task())
    request.tasks[0].pilot_config.environment["EWMS_PILOT_TIMEOUT"].number_value = number

    field, _ = await only_violation(workflows, alice, request)

    assert field == "tasks[0].pilot_config.environment.EWMS_PILOT_TIMEOUT"


async def test_n_workers_above_the_maximum_is_rejected(workflows: Stub, alice: Metadata) -> None:
    request = workflow_request(minimal_task(n_workers=2**31 - 1))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[0].n_workers"
    assert description == "must be at most 10,000 per taskforce (got 2,147,483,647)"


async def test_add_workers_above_the_maximum_is_rejected(workflows: Stub, alice: Metadata) -> None:
    request = workflow_service_pb2.AddWorkersRequest(
        task_id="TK-x", cluster_location="local", n_workers=limits.MAX_N_WORKERS + 1
    )

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await workflows.AddWorkers(request, metadata=alice)

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["n_workers"]


@pytest.mark.parametrize(
    ("task", "field"),
    [
        (minimal_task(task_args="cp\0 a b"), "tasks[0].task_args"),
        (minimal_task(init_args="\0"), "tasks[0].init_args"),
        (minimal_task(task_env={"A": "x\0y"}), "tasks[0].task_env.A"),
        (minimal_task(init_env={"A\0B": "x"}), "tasks[0].init_env"),
        (minimal_task(task_image="/img\0"), "tasks[0].task_image"),
    ],
)
async def test_nul_in_a_command_line_or_environment_is_rejected(
    workflows: Stub, alice: Metadata, task: dict[str, Any], field: str
) -> None:
    got, description = await only_violation(workflows, alice, workflow_request(task))

    assert got == field
    assert "NUL" in description


@pytest.mark.parametrize(
    ("task", "field", "limit"),
    [
        ({"task_args": "a"}, "tasks[0].task_args", limits.ARGS_CHARS),
        ({"init_args": "a"}, "tasks[0].init_args", limits.ARGS_CHARS),
        ({"task_image": "i"}, "tasks[0].task_image", limits.IMAGE_CHARS),
        ({"init_image": "i"}, "tasks[0].init_image", limits.IMAGE_CHARS),
        ({"task_env": {"A": "v"}}, "tasks[0].task_env.A", limits.ENV_VALUE_CHARS),
        ({"input_queue_aliases": ["q"]}, "tasks[0].input_queue_aliases[0]", limits.ALIAS_CHARS),
    ],
)
async def test_string_at_its_limit_is_accepted_and_one_more_character_is_rejected(
    workflows: Stub, alice: Metadata, task: dict[str, Any], field: str, limit: int
) -> None:
    def sized(n: int) -> dict[str, Any]:
        ((key, value),) = task.items()
        if isinstance(value, dict):
            return {key: {k: v * n for k, v in value.items()}}
        if isinstance(value, list):
            return {key: [v * n for v in value], "output_queue_aliases": []}
        return {key: value * n}

    await accepted(
        workflows, alice, workflow_request(minimal_task(**sized(limit)), public_queue_aliases=[])
    )
    got, description = await only_violation(
        workflows,
        alice,
        workflow_request(minimal_task(**sized(limit + 1)), public_queue_aliases=[]),
    )

    assert (got, description) == (field, f"at most {limit:,} characters (got {limit + 1:,})")


async def test_20000_character_alias_is_rejected_in_a_receivable_error(
    workflows: Stub, alice: Metadata
) -> None:
    request = workflow_request(minimal_task(input_queue_aliases=["a" * 20_000]))

    field, description = await only_violation(workflows, alice, request)

    assert field == "tasks[0].input_queue_aliases[0]"
    assert description == "at most 128 characters (got 20,000)"


async def test_20000_character_id_is_rejected_in_a_receivable_error(
    workflows: Stub, alice: Metadata
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await workflows.GetWorkflow(
            workflow_service_pb2.GetWorkflowRequest(workflow_id="W" * 20_000), metadata=alice
        )

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == ["workflow_id"]


async def test_more_tasks_than_allowed_is_one_violation(workflows: Stub, alice: Metadata) -> None:
    request = workflow_request(*[minimal_task(n_workers=0)] * 300)

    field, description = await only_violation(workflows, alice, request)

    assert (field, description) == ("tasks", "at most 100 items (got 300)")


async def test_hundreds_of_violations_come_back_as_twenty_and_a_count(
    workflows: Stub, alice: Metadata
) -> None:
    request = workflow_request(*[minimal_task(n_workers=0, max_attempts=0)] * limits.TASKS)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await workflows.CreateWorkflow(request, metadata=alice)

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(err.value)
    assert len(violations) == 21
    assert violations[0] == ("tasks[0].n_workers", "must be at least 1 (got 0)")
    assert violations[-1] == ("tasks", "and 180 more violations, not listed (of 200), in tasks")


@pytest.mark.parametrize(
    ("field", "seconds", "nanos"),
    [
        ("created_after", 0, 1_000_000_000),
        ("created_before", 253_402_300_800, 0),
        ("created_after", -62_135_596_801, 0),
        ("created_before", 0, -1),
    ],
)
async def test_list_workflows_with_a_timestamp_out_of_range_is_rejected(
    workflows: Stub, alice: Metadata, field: str, seconds: int, nanos: int
) -> None:
    request = workflow_service_pb2.ListWorkflowsRequest()
    getattr(request, field).CopyFrom(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await workflows.ListWorkflows(request, metadata=alice)

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err.value)] == [field]
