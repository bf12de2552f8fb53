"""The original EWMS's REST dialect under /original: its clients' requests, unchanged, against a
real WMS, read the way its clients read the responses (dict keys, JSON types)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf import timestamp_pb2

from ewms.v1 import queue_pb2, taskforce_pb2, workflow_pb2
from services.auth import Role
from services.wms import RunningWms, start_wms
from services.wms.http import original_query
from services.wms.http import original_shapes as shapes
from tests.conftest import seed_request, wms_settings
from tests.wms.helpers import Env, compound, snapshot, submitted_taskforce
from tests.wms.http.conftest import auth
from tests.wms.requests import minimal_task, workflow_json

Phase = taskforce_pb2.TaskforcePhase
Job = taskforce_pb2.JobState
Pilot = taskforce_pb2.PilotPhase
BASE = "/original"
SEED_SIZE_BYTES = 512 * 1024 * 1024  # "512M"
TIMEOUT = 10.0
# The original's enum of TaskforceObject.phase (its OpenAPI document).
ORIGINAL_PHASES = {
    "pre-mq-activation",
    "pre-launch",
    "pending-starter",
    "condor-submit",
    "pending-stopper",
    "condor-rm",
    "condor-complete",
}
PHASE_CHANGE_KEYS = {
    "target_phase",
    "timestamp",
    "was_successful",
    "source_event_time",
    "source_entity",
    "context",
}
MQPROFILE_KEYS = {
    "mqid",
    "workflow_id",
    "timestamp",
    "alias",
    "is_public",
    "is_activated",
    "auth_token",
    "broker_type",
    "broker_address",
}


class HttpError(Exception):
    """A non-2xx answer, as rest_tools' RestClient raises it."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


class RestClient:
    """The part of rest_tools' RestClient the original's clients use: ``request(method, path,
    args)`` returns the decoded JSON body, raising on an error status."""

    def __init__(self, http: aiohttp.ClientSession, token: str, base: str = BASE) -> None:
        self._http = http
        self._headers = auth(token)
        self._base = base

    async def request(self, method: str, path: str, args: dict[str, Any] | None = None) -> Any:
        async with self._http.request(
            method, self._base + path, json=args, headers=self._headers
        ) as resp:
            body = await resp.json()
            if resp.status >= 300:
                raise HttpError(resp.status, body)
            return body


@pytest.fixture
def rc(http: aiohttp.ClientSession, token_for: Any) -> RestClient:
    """alice's client of the original dialect."""
    return RestClient(http, token_for("alice"))


async def error_of(rc: RestClient, method: str, path: str, args: Any = None) -> HttpError:
    with pytest.raises(HttpError) as err:
        await rc.request(method, path, args)
    return err.value


async def create(rc: RestClient, body: dict[str, Any] | None = None) -> dict[str, Any]:
    resp: dict[str, Any] = await rc.request("POST", "/v1/workflows", body or workflow_json())
    return resp


# --- POST /v1/workflows ---------------------------------------------------------------------------


async def test_seed_request_is_accepted_unchanged_in_the_originals_shapes(rc: RestClient) -> None:
    resp = await rc.request("POST", "/v1/workflows", seed_request())

    assert set(resp) == {"workflow", "task_directives", "taskforces"}
    wf = resp["workflow"]
    assert set(wf) == set(shapes.WORKFLOW_FIELDS)
    assert wf["workflow_id"].startswith("WF-")
    assert isinstance(wf["timestamp"], float)
    assert abs(wf["timestamp"] - time.time()) < 60
    assert (wf["deactivated"], wf["deactivated_ts"]) == (None, None)
    [td] = resp["task_directives"]
    assert set(td) == set(shapes.TASK_DIRECTIVE_FIELDS)
    assert td["cluster_locations"] == ["osg"]  # sub-2 is an alias of osg here
    assert td["task_args"] == "cp {{INFILE}} {{OUTFILE}}"
    [tf] = resp["taskforces"]
    assert set(tf) == set(shapes.TASKFORCE_FIELDS)
    assert tf["task_id"] == td["task_id"]
    assert (tf["schedd"], tf["collector"], tf["cluster_id"]) == ("osg", None, None)
    assert tf["n_workers"] == 1000
    assert tf["phase"] == "pre-mq-activation"
    assert tf["worker_config"] == {
        "do_transfer_worker_stdouterr": True,
        "max_worker_runtime": 600,
        "n_cores": 1,
        "priority": 99,
        "worker_disk": "512M",
        "worker_memory": "512M",
        "condor_requirements": "",
    }
    assert set(tf["pilot_config"]) == {"tag", "image_source", "environment", "input_files"}
    [created] = tf["phase_change_log"]
    assert set(created) == PHASE_CHANGE_KEYS
    assert created["target_phase"] == "pre-mq-activation"
    assert created["was_successful"] is True
    assert isinstance(created["timestamp"], float)
    assert created["source_event_time"] is None
    assert (tf["compound_statuses"], tf["top_task_errors"], tf["submit_dict"]) == ({}, {}, {})


async def test_invalid_request_is_400_naming_every_field_in_the_originals_error_shape(
    rc: RestClient,
) -> None:
    body = workflow_json(minimal_task(n_workers=0, cluster_locations=["mars"]))

    err = await error_of(rc, "POST", "/v1/workflows", body)

    assert err.status == 400
    assert set(err.body) == {"code", "error"}
    assert err.body["code"] == 400
    assert "tasks[0].n_workers: must be at least 1" in err.body["error"]
    assert "tasks[0].cluster_locations[0]: unknown cluster location 'mars'" in err.body["error"]


async def test_unknown_request_field_is_400_naming_it(rc: RestClient) -> None:
    body = workflow_json(minimal_task(n_cpus=4))

    err = await error_of(rc, "POST", "/v1/workflows", body)

    assert err.status == 400
    assert "tasks[0].n_cpus: unknown field" in err.body["error"]


async def test_mistyped_request_field_is_400_naming_its_path(rc: RestClient) -> None:
    body = workflow_json(minimal_task(n_workers="many"))

    err = await error_of(rc, "POST", "/v1/workflows", body)

    assert err.status == 400
    assert "tasks[0].n_workers: expected an integer" in err.body["error"]


async def test_request_without_a_token_is_401(http: aiohttp.ClientSession) -> None:
    async with http.post(f"{BASE}/v1/workflows", json=seed_request()) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["code"] == 401
    assert "bearer" in body["error"]


# --- the original's client, replayed --------------------------------------------------------------


def request_workflow_body(n_workers: int) -> dict[str, Any]:
    """The body ``examples/request_workflow.py`` of the original POSTs, unchanged."""
    return {
        "public_queue_aliases": ["input-queue", "output-queue"],
        "tasks": [
            {
                "cluster_locations": ["sub-2"],
                "input_queue_aliases": ["input-queue"],
                "output_queue_aliases": ["output-queue"],
                "task_image": "/cvmfs/icecube.opensciencegrid.org/containers/ewms/"
                "observation-management-service/ewms-task-management-service:0.1.44",
                "task_args": 'bash -c "sleep 10 && cp {{INFILE}} {{OUTFILE}}"',
                "n_workers": n_workers,
                "worker_config": {
                    "condor_requirements": "",
                    "do_transfer_worker_stdouterr": True,
                    "max_worker_runtime": 60 * 60 * 1,
                    "n_cores": 1,
                    "priority": 51,
                    "worker_disk": "512M",
                    "worker_memory": "512M",
                },
                "pilot_config": {"environment": {}, "input_files": [], "tag": "0.1.11"},
            }
        ],
    }


async def test_the_originals_documented_client_sequence_works_unchanged(rc: RestClient) -> None:
    # request_workflow(): submit, keep the workflow id and the first queues' mqids.
    resp = await rc.request("POST", "/v1/workflows", request_workflow_body(n_workers=5))
    workflow_id = resp["workflow"]["workflow_id"]
    input_queue = resp["task_directives"][0]["input_queues"][0]
    output_queue = resp["task_directives"][0]["output_queues"][0]

    # Wait until the queues are activated.
    mqprofiles: list[dict[str, Any]] = []
    deadline = time.monotonic() + TIMEOUT
    while not (mqprofiles and all(m["is_activated"] for m in mqprofiles)):
        assert time.monotonic() < deadline, f"queues never activated: {mqprofiles}"
        await asyncio.sleep(0.05)
        mqprofiles = (
            await rc.request("GET", f"/v1/mqs/workflows/{workflow_id}/mq-profiles/public")
        )["mqprofiles"]
    input_mqprofile = next(p for p in mqprofiles if p["mqid"] == input_queue)
    output_mqprofile = next(p for p in mqprofiles if p["mqid"] == output_queue)
    for profile in (input_mqprofile, output_mqprofile):
        assert set(profile) == MQPROFILE_KEYS
        assert profile["workflow_id"] == workflow_id
        assert profile["is_public"] is True
        # What MQClient's Queue(...) is built from.
        assert isinstance(profile["broker_type"], str)
        assert isinstance(profile["broker_address"], str)
    assert {p["alias"] for p in mqprofiles} == {"input-queue", "output-queue"}

    # monitor_workflow(): the workflow, its task directives, its taskforces with a projection.
    workflow = await rc.request("GET", f"/v1/workflows/{workflow_id}")
    assert workflow["deactivated"] is None
    task_directives = (
        await rc.request(
            "POST", "/v1/query/task-directives", {"query": {"workflow_id": workflow_id}}
        )
    )["task_directives"]
    assert [td["task_id"] for td in task_directives] == [resp["task_directives"][0]["task_id"]]
    taskforces = (
        await rc.request(
            "POST",
            "/v1/query/taskforces",
            {"query": {"workflow_id": workflow_id}, "projection": ["taskforce_uuid", "phase"]},
        )
    )["taskforces"]
    assert [set(tf) for tf in taskforces] == [{"taskforce_uuid", "phase"}]
    assert taskforces[0]["phase"] in ORIGINAL_PHASES

    # More workers for the task: a new taskforce, launched ahead (+100 priority).
    task_id = task_directives[0]["task_id"]
    added = await rc.request(
        "POST",
        f"/v1/task-directives/{task_id}/actions/add-workers",
        {"cluster_location": "sub-2", "n_workers": 3},
    )
    assert added["task_id"] == task_id
    assert added["n_workers"] == 3
    assert added["schedd"] == "osg"
    assert added["priority"] == workflow["priority"] + 100

    # abort_workflow.py, twice: the second finds no active workflow.
    aborted = await rc.request("POST", f"/v1/workflows/{workflow_id}/actions/abort")
    assert aborted == {"workflow_id": workflow_id, "n_taskforces": 2}
    err = await error_of(rc, "POST", f"/v1/workflows/{workflow_id}/actions/abort")
    assert err.status == 404
    assert err.body["code"] == 404
    assert workflow_id in err.body["error"]


async def test_finished_deactivates_with_the_originals_strings(rc: RestClient) -> None:
    workflow_id = (await create(rc))["workflow"]["workflow_id"]

    done = await rc.request("POST", f"/v1/workflows/{workflow_id}/actions/finished")
    wf = await rc.request("GET", f"/v1/workflows/{workflow_id}")

    assert done == {"workflow_id": workflow_id, "n_taskforces": 1}
    assert wf["deactivated"] == "FINISHED"
    assert isinstance(wf["deactivated_ts"], float)
    assert wf["deactivated_ts"] >= wf["timestamp"]


async def test_add_workers_on_a_deactivated_workflow_is_422(rc: RestClient) -> None:
    resp = await create(rc)
    await rc.request("POST", f"/v1/workflows/{resp['workflow']['workflow_id']}/actions/abort")
    task_id = resp["task_directives"][0]["task_id"]

    err = await error_of(
        rc,
        "POST",
        f"/v1/task-directives/{task_id}/actions/add-workers",
        {"cluster_location": "local", "n_workers": 1},
    )

    assert err.status == 422
    assert "deactivated" in err.body["error"]


async def test_add_workers_at_an_unknown_location_is_400(rc: RestClient) -> None:
    task_id = (await create(rc))["task_directives"][0]["task_id"]

    err = await error_of(
        rc,
        "POST",
        f"/v1/task-directives/{task_id}/actions/add-workers",
        {"cluster_location": "mars", "n_workers": 1},
    )

    assert err.status == 400
    assert "cluster_location" in err.body["error"]
    assert "'mars'" in err.body["error"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"n_workers": 1}, "cluster_location: required"),
        ({"cluster_location": "local", "n_workers": "1"}, "n_workers: must be an integer"),
        ({"cluster_location": "local", "n_workers": 1, "x": 1}, "unknown field 'x'"),
    ],
)
async def test_add_workers_body_is_checked_as_the_originals(
    rc: RestClient, body: dict[str, Any], named: str
) -> None:
    task_id = (await create(rc))["task_directives"][0]["task_id"]

    err = await error_of(rc, "POST", f"/v1/task-directives/{task_id}/actions/add-workers", body)

    assert err.status == 400
    assert named in err.body["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/workflows/WF-0-00000000",
        "/v1/task-directives/TK-0-00000000-00000000",
        "/v1/taskforces/TF-0-00000000-00000000-00000000",
        "/v1/mqs/workflows/WF-0-00000000/mq-profiles/public",
    ],
)
async def test_missing_objects_are_404(rc: RestClient, path: str) -> None:
    err = await error_of(rc, "GET", path)

    assert err.status == 404
    assert err.body["code"] == 404


async def test_others_objects_are_404(
    http: aiohttp.ClientSession, rc: RestClient, token_for: Any
) -> None:
    resp = await create(rc)
    bob = RestClient(http, token_for("bob"))

    err = await error_of(bob, "GET", f"/v1/taskforces/{resp['taskforces'][0]['taskforce_uuid']}")

    assert err.status == 404


async def test_get_routes_return_the_created_objects(rc: RestClient) -> None:
    resp = await create(rc)
    td, tf = resp["task_directives"][0], resp["taskforces"][0]

    assert await rc.request("GET", f"/v1/task-directives/{td['task_id']}") == td
    got = await rc.request("GET", f"/v1/taskforces/{tf['taskforce_uuid']}")
    assert got["taskforce_uuid"] == tf["taskforce_uuid"]
    assert got["task_id"] == td["task_id"]


async def test_the_originals_tms_routes_are_404_in_its_error_shape(rc: RestClient) -> None:
    err = await error_of(rc, "GET", "/v1/tms/pending-starter/taskforces?schedd=osg")

    assert err.status == 404
    assert set(err.body) == {"code", "error"}


async def test_wrong_method_on_a_route_is_405_naming_the_allowed(rc: RestClient) -> None:
    err = await error_of(rc, "DELETE", "/v1/workflows/WF-0-00000000")

    assert err.status == 405
    assert err.body["code"] == 405
    assert "GET" in err.body["error"]


async def test_root_is_an_empty_object(rc: RestClient) -> None:
    assert await rc.request("GET", "/v1/") == {}


async def test_schema_route_describes_the_dialects_paths(rc: RestClient) -> None:
    doc = await rc.request("GET", "/v1/schema/openapi")

    assert "post" in doc["paths"]["/v1/query/taskforces"]
    assert "get" in doc["paths"]["/v1/mqs/workflows/{workflow_id}/mq-profiles/public"]


# --- FindObject -----------------------------------------------------------------------------------


async def test_query_in_matches_any_listed_value(rc: RestClient) -> None:
    ids = [(await create(rc))["workflow"]["workflow_id"] for _ in range(3)]

    resp = await rc.request(
        "POST", "/v1/query/workflows", {"query": {"workflow_id": {"$in": [ids[0], ids[2]]}}}
    )

    assert sorted(wf["workflow_id"] for wf in resp["workflows"]) == sorted([ids[0], ids[2]])
    assert resp["next_after"] is None


async def test_query_in_on_a_scanned_field(rc: RestClient) -> None:
    a, b = (await create(rc))["workflow"]["workflow_id"], (await create(rc))["workflow"]
    await rc.request("POST", f"/v1/workflows/{a}/actions/abort")

    resp = await rc.request(
        "POST",
        "/v1/query/workflows",
        {"query": {"deactivated": {"$in": ["ABORTED", "FINISHED"]}}, "projection": ["workflow_id"]},
    )

    assert resp["workflows"] == [{"workflow_id": a}]
    assert b["workflow_id"] not in str(resp)


async def test_query_equality_on_null_finds_the_active(rc: RestClient) -> None:
    a = (await create(rc))["workflow"]["workflow_id"]
    b = (await create(rc))["workflow"]["workflow_id"]
    await rc.request("POST", f"/v1/workflows/{a}/actions/finished")

    resp = await rc.request("POST", "/v1/query/workflows", {"query": {"deactivated": None}})

    assert [wf["workflow_id"] for wf in resp["workflows"]] == [b]


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("taskforces", {"query": {"task_id": {"$regex": "^TK-"}}}, "'$regex'"),
        ("workflows", {"query": {"$where": "this.priority > 1"}}, "'$where'"),
        ("workflows", {"query": {"priority": {"$gt": 1}}}, "'$gt'"),
        ("workflows", {"query": {"$or": [{"priority": 1}]}}, "'$or'"),
        ("taskforces", {"query": {"owner": "alice"}}, "'owner'"),
        ("taskforces", {"query": {"pilot_config.tag": "latest"}}, "'pilot_config.tag'"),
        ("task-directives", {"query": {"task_id": {"$in": [{"$ne": 1}]}}}, "$in"),
        ("taskforces", {"query": {}, "projection": ["phase", "secret"]}, "'secret'"),
        ("taskforces", {"query": {}, "projection": []}, "projection"),
        ("workflows", {"query": {}, "limit": 5}, "'limit'"),
        ("workflows", {"projection": ["workflow_id"]}, "query: required"),
        ("workflows", {"query": {}, "after": "not-a-token"}, "after"),
    ],
)
async def test_query_outside_the_safe_subset_is_400_naming_it(
    rc: RestClient, path: str, body: dict[str, Any], named: str
) -> None:
    err = await error_of(rc, "POST", f"/v1/query/{path}", body)

    assert err.status == 400
    assert err.body["code"] == 400
    assert named in err.body["error"]


async def test_paging_with_after_returns_every_object_once(
    rc: RestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(original_query, "PAGE_SIZE", 2)
    ids = [(await create(rc))["workflow"]["workflow_id"] for _ in range(5)]

    # get_all_ids.py's loop.
    seen: list[str] = []
    pages = 0
    after = None
    while True:
        resp = await rc.request(
            "POST",
            "/v1/query/workflows",
            {
                "query": {"priority": 50},
                "projection": ["workflow_id"],
                **({"after": after} if after else {}),
            },
        )
        pages += 1
        assert len(resp["workflows"]) <= 2
        seen.extend(wf["workflow_id"] for wf in resp["workflows"])
        if not (after := resp["next_after"]):
            break

    assert seen == ids
    assert pages >= 3


async def test_after_is_refused_with_another_query(
    rc: RestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(original_query, "PAGE_SIZE", 1)
    for _ in range(2):
        await create(rc)
    first = await rc.request("POST", "/v1/query/workflows", {"query": {}})

    err = await error_of(
        rc,
        "POST",
        "/v1/query/workflows",
        {"query": {"priority": 50}, "after": first["next_after"]},
    )

    assert err.status == 400
    assert "different query" in err.body["error"]


async def test_query_sees_only_the_callers_objects(
    http: aiohttp.ClientSession, rc: RestClient, token_for: Any
) -> None:
    mine = (await create(rc))["workflow"]["workflow_id"]
    bob = RestClient(http, token_for("bob"))
    await create(bob)

    by_scan = await rc.request("POST", "/v1/query/taskforces", {"query": {}})
    others = await bob.request("POST", "/v1/query/workflows", {"query": {"workflow_id": mine}})

    assert {tf["workflow_id"] for tf in by_scan["taskforces"]} == {mine}
    assert others["workflows"] == []


async def test_query_taskforces_by_schedd_and_phase(rc: RestClient) -> None:
    body = workflow_json(minimal_task(cluster_locations=["local", "osg"]))
    workflow_id = (await create(rc, body))["workflow"]["workflow_id"]

    resp = await rc.request(
        "POST",
        "/v1/query/taskforces",
        {
            "query": {"workflow_id": workflow_id, "schedd": "osg"},
            "projection": ["schedd", "phase"],
        },
    )

    [tf] = resp["taskforces"]
    assert tf["schedd"] == "osg"
    assert tf["phase"] in ORIGINAL_PHASES


async def test_query_task_directives_by_list_element(rc: RestClient) -> None:
    body = workflow_json(minimal_task(cluster_locations=["local", "osg"]))
    task_id = (await create(rc, body))["task_directives"][0]["task_id"]

    resp = await rc.request(
        "POST", "/v1/query/task-directives", {"query": {"cluster_locations": "osg"}}
    )

    assert [td["task_id"] for td in resp["task_directives"]] == [task_id]


# --- shapes ---------------------------------------------------------------------------------------


async def test_mq_profiles_list_public_queues_only(rc: RestClient) -> None:
    body = workflow_json(public_queue_aliases=["out"])
    workflow_id = (await create(rc, body))["workflow"]["workflow_id"]

    resp = await rc.request("GET", f"/v1/mqs/workflows/{workflow_id}/mq-profiles/public")

    [profile] = resp["mqprofiles"]
    assert profile["alias"] == "out"
    assert profile["mqid"].startswith("Q-")
    assert profile["is_activated"] is True
    # The embedded backend: reached through the WMS itself, with the owner's own token.
    assert profile["broker_type"] == shapes.EMBEDDED_BROKER_TYPE
    assert profile["auth_token"] is None


def test_rabbitmq_mq_profile_is_in_the_mqs_form() -> None:
    queue = queue_pb2.Queue(
        queue_id="Q-1-2-3",
        workflow_id="WF-1-2",
        alias="in",
        public=True,
        backend=queue_pb2.QUEUE_BACKEND_RABBITMQ,
        address="amqp://mq.example.org:5672/%2F",
        credentials=queue_pb2.QueueCredentials(username="wf-WF-1-2", password="s3cret"),
    )
    wf = workflow_pb2.Workflow(workflow_id="WF-1-2", timestamp=timestamp_pb2.Timestamp(seconds=7))

    profile = shapes.mq_profile(queue, wf)

    assert profile == {
        "mqid": "Q-1-2-3",
        "workflow_id": "WF-1-2",
        "timestamp": 7.0,
        "alias": "in",
        "is_public": True,
        "is_activated": True,
        "auth_token": "s3cret",
        "broker_type": "rabbitmq",
        "broker_address": "wf-WF-1-2@mq.example.org:5672",
    }


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("amqp://mq:5672/%2F", "u@mq:5672"),
        ("amqp://mq/ewms", "u@mq/ewms"),
        ("amqps://mq:5671/ewms", "amqps://u@mq:5671/ewms"),
    ],
)
def test_rabbitmq_address_keeps_port_vhost_and_tls(url: str, address: str) -> None:
    assert shapes.rabbitmq_address(url, "u") == address


def test_deleted_queue_is_no_longer_activated() -> None:
    queue = queue_pb2.Queue(
        queue_id="Q-1-2-3",
        backend=queue_pb2.QUEUE_BACKEND_RABBITMQ,
        address="amqp://mq/ewms",
        deleted_ts=timestamp_pb2.Timestamp(seconds=9),
    )

    profile = shapes.mq_profile(queue, workflow_pb2.Workflow())

    assert (profile["is_activated"], profile["auth_token"]) == (False, None)


@pytest.mark.parametrize("phase", [p for p in Phase.values() if p])
def test_every_phase_is_one_of_the_originals(phase: taskforce_pb2.TaskforcePhase.ValueType) -> None:
    tf = taskforce_pb2.Taskforce(phase=phase)

    assert shapes.taskforce(tf)["phase"] in ORIGINAL_PHASES


def test_cancelled_shows_as_pending_stopper_the_originals_terminal_state() -> None:
    tf = taskforce_pb2.Taskforce(phase=Phase.TASKFORCE_PHASE_CANCELLED)

    assert shapes.taskforce(tf)["phase"] == "pending-stopper"


async def test_taskforce_aborted_before_submit_reads_pending_stopper(rc: RestClient) -> None:
    resp = await create(rc)
    workflow_id, uuid = resp["workflow"]["workflow_id"], resp["taskforces"][0]["taskforce_uuid"]

    await rc.request("POST", f"/v1/workflows/{workflow_id}/actions/abort")
    tf = await rc.request("GET", f"/v1/taskforces/{uuid}")

    assert tf["phase"] == "pending-stopper"
    last = tf["phase_change_log"][-1]
    assert (last["target_phase"], last["was_successful"], last["source_entity"]) == (
        "pending-stopper",
        True,
        "User",
    )


def test_compound_statuses_are_a_dict_of_dicts_keyed_by_the_originals_strings() -> None:
    tf = taskforce_pb2.Taskforce(
        compound_statuses=compound(
            (Job.JOB_STATE_IDLE, "", Pilot.PILOT_PHASE_UNSPECIFIED, 2),
            (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_TASKING, 3),
            (Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_DRAINING, 1),
            (
                Job.JOB_STATE_HELD,
                "Memory usage exceeds a memory limit",
                Pilot.PILOT_PHASE_TASKING,
                1,
            ),
            (Job.JOB_STATE_COMPLETED, "", Pilot.PILOT_PHASE_DONE, 5),
            (Job.JOB_STATE_REMOVED, "", Pilot.PILOT_PHASE_FATAL_ERROR, 1),
        ),
        top_task_errors={"boom": 2},
    )

    got = shapes.taskforce(tf)

    assert got["compound_statuses"] == {
        "IDLE": {"null": 2},
        "RUNNING": {"Tasking": 3, "PendingRemainingTasks": 1},
        "HELD: Memory usage exceeds a memory limit": {"Tasking": 1},
        "COMPLETED": {"Done": 5},
        "REMOVED": {"FatalError": 1},
    }
    assert got["top_task_errors"] == {"boom": 2}


@pytest.mark.parametrize(
    ("pilot", "name"),
    [
        (Pilot.PILOT_PHASE_STARTED, "Started"),
        (Pilot.PILOT_PHASE_RUNNING_INIT, "RunningInitCommand"),
        (Pilot.PILOT_PHASE_AWAITING_FIRST_EVENT, "AwaitingFirstMessage"),
        (Pilot.PILOT_PHASE_TASKING, "Tasking"),
        (Pilot.PILOT_PHASE_DRAINING, "PendingRemainingTasks"),
        (Pilot.PILOT_PHASE_FATAL_ERROR, "FatalError"),
        (Pilot.PILOT_PHASE_DONE, "Done"),
    ],
)
def test_pilot_phases_are_the_original_pilots_statuses(
    pilot: taskforce_pb2.PilotPhase.ValueType, name: str
) -> None:
    statuses = compound((Job.JOB_STATE_RUNNING, "", pilot, 1))

    assert shapes.compound_statuses(statuses) == {"RUNNING": {name: 1}}


async def test_statuses_reported_by_a_tms_and_a_pilot_read_as_the_originals(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    tf, start = await submitted_taskforce(env, stream, 7, n_workers=2)
    pilot = env.pilot(start.pilot_token)
    await pilot.hello(tf.taskforce_uuid, worker_id="7.0")
    await stream.send(
        snapshot=snapshot(
            tf.taskforce_uuid,
            ("7.0", Job.JOB_STATE_RUNNING, ""),
            ("7.1", Job.JOB_STATE_HELD, "Memory usage exceeds a memory limit"),
            full=True,
        )
    )
    await pilot.status(Pilot.PILOT_PHASE_TASKING, last_error="ValueError: bad input")
    token = env.wms.authority.mint("alice", Role.USER, 3600)
    expected = {
        "RUNNING": {"Tasking": 1},
        "HELD: Memory usage exceeds a memory limit": {"null": 1},
    }

    async with aiohttp.ClientSession(base_url=env.wms.http_url) as http:
        rc = RestClient(http, token)
        got: dict[str, Any] = {}
        deadline = time.monotonic() + TIMEOUT
        while got.get("compound_statuses") != expected:
            assert time.monotonic() < deadline, f"statuses never arrived: {got}"
            await asyncio.sleep(0.05)
            got = await rc.request("GET", f"/v1/taskforces/{tf.taskforce_uuid}")

    assert got["phase"] == "condor-submit"
    assert got["cluster_id"] == 7
    assert got["n_workers"] == 2
    submitted = next(c for c in got["phase_change_log"] if c["target_phase"] == "condor-submit")
    assert (submitted["was_successful"], submitted["source_entity"]) == (True, "TMS")
    assert all(isinstance(c["timestamp"], float) for c in got["phase_change_log"])


def test_sizes_of_taskforces_stored_without_the_as_sent_values_read_back_as_bytes() -> None:
    # Taskforces created before WorkerConfig kept the sizes as sent have bytes only.
    wc = taskforce_pb2.WorkerConfig()
    wc.worker_disk.number_value = SEED_SIZE_BYTES
    wc.worker_memory.number_value = SEED_SIZE_BYTES

    got = shapes.worker_config(wc)

    assert (got["worker_disk"], got["worker_memory"]) == (SEED_SIZE_BYTES, SEED_SIZE_BYTES)


async def test_stored_sizes_read_back_as_sent(rc: RestClient) -> None:
    uuid = (await rc.request("POST", "/v1/workflows", seed_request()))["taskforces"][0][
        "taskforce_uuid"
    ]

    got = await rc.request("GET", f"/v1/taskforces/{uuid}")

    assert got["worker_config"]["worker_disk"] == "512M"


# --- the base path --------------------------------------------------------------------------------


@pytest.fixture
async def ewms_base(tmp_path: Path) -> AsyncIterator[RunningWms]:
    """A WMS serving the dialect under /ewms."""
    settings = dataclasses.replace(wms_settings(tmp_path / "wms"), original_base_path="/ewms")
    running = await start_wms(settings)
    try:
        yield running
    finally:
        await running.stop(grace=None)


async def test_base_path_is_configurable(ewms_base: RunningWms) -> None:
    token = ewms_base.authority.mint("alice", Role.USER, 3600)
    async with aiohttp.ClientSession(base_url=ewms_base.http_url) as http:
        rc = RestClient(http, token, base="/ewms")
        assert await rc.request("GET", "/v1/") == {}
        workflow_id = (await rc.request("POST", "/v1/workflows", seed_request()))["workflow"][
            "workflow_id"
        ]
        assert (await rc.request("GET", f"/v1/workflows/{workflow_id}"))["workflow_id"] == (
            workflow_id
        )
        async with http.get(f"{BASE}/v1/", headers=auth(token)) as resp:
            assert resp.status == 404
