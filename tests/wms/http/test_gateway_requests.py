"""REST requests of the ewms.v1 contracts: the original's seed workflow POSTed as is, responses in
proto field names, and list filters and pages from query parameters."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import seed_request
from tests.wms.http.conftest import auth
from tests.wms.http.test_gateway_routes import submit_seed


def keys(value: Any, skip: frozenset[str] = frozenset({"task_env", "init_env"})) -> set[str]:
    """Every object key in a JSON value (map fields' user keys left out)."""
    found: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            found.add(k)
            if k not in skip:
                found |= keys(v, skip)
    elif isinstance(value, list):
        for v in value:
            found |= keys(v, skip)
    return found


async def test_the_seed_request_is_accepted_unchanged_and_answered_in_proto_names(
    http: aiohttp.ClientSession, token_for: Any
) -> None:
    async with http.post(
        "/v1/workflows", json=seed_request(), headers=auth(token_for("alice"))
    ) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert {"workflow", "task_directives", "taskforces", "queues"} <= set(body)
    assert body["workflow"]["owner"] == "alice"
    assert body["workflow"]["public_queue_aliases"] == ["input-queue", "output-queue"]
    tf = body["taskforces"][0]
    assert tf["cluster_location"] == "osg"  # the seed's "sub-2" is an alias of osg
    assert tf["n_workers"] == 1000
    # A google.protobuf.Value: plain JSON (the size in bytes), not a wrapped object.
    assert isinstance(tf["worker_config"]["worker_memory"], int | float)
    every_key = keys(body)
    assert {"workflow_id", "task_id", "taskforce_uuid", "queue_id"} <= every_key
    assert not [k for k in every_key if k != k.lower()], "camelCase keys in a REST response"


async def test_list_pages_follow_page_size_and_page_token(
    http: aiohttp.ClientSession, token_for: Any
) -> None:
    token = token_for("alice")
    ids = [(await submit_seed(http, token))["workflow"]["workflow_id"] for _ in range(3)]
    seen: list[str] = []
    page_token = ""
    for _ in range(3):
        query = {"page_size": "2", **({"page_token": page_token} if page_token else {})}
        async with http.get("/v1/workflows", params=query, headers=auth(token)) as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.json()
        assert len(page["workflows"]) <= 2
        seen += [w["workflow_id"] for w in page["workflows"]]
        page_token = page.get("next_page_token", "")
        if not page_token:
            break
    assert seen == ids


async def test_an_enum_filter_takes_a_name_or_a_number(
    http: aiohttp.ClientSession, token_for: Any
) -> None:
    token = token_for("alice")
    aborted = (await submit_seed(http, token))["workflow"]["workflow_id"]
    active = (await submit_seed(http, token))["workflow"]["workflow_id"]
    async with http.post(f"/v1/workflows/{aborted}/actions/abort", headers=auth(token)) as resp:
        assert resp.status == 200
    for state, expected in [
        ("WORKFLOW_STATE_ABORTED", [aborted]),
        ("2", [aborted]),
        ("WORKFLOW_STATE_ACTIVE", [active]),
    ]:
        async with http.get(f"/v1/workflows?state={state}", headers=auth(token)) as resp:
            assert resp.status == 200, await resp.text()
            listed = [w["workflow_id"] for w in (await resp.json()).get("workflows", [])]
        assert listed == expected, state


async def test_a_timestamp_filter_takes_rfc_3339(
    http: aiohttp.ClientSession, token_for: Any
) -> None:
    token = token_for("alice")
    await submit_seed(http, token)
    for after, n in [("2000-01-01T00:00:00Z", 1), ("2999-01-01T00:00:00Z", 0)]:
        async with http.get(
            "/v1/workflows", params={"created_after": after}, headers=auth(token)
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert len((await resp.json()).get("workflows", [])) == n


async def test_taskforces_filter_by_workflow_and_phase(
    http: aiohttp.ClientSession, token_for: Any
) -> None:
    token = token_for("alice")
    created = await submit_seed(http, token)
    workflow_id = created["workflow"]["workflow_id"]
    async with http.post(f"/v1/workflows/{workflow_id}/actions/abort", headers=auth(token)) as resp:
        assert resp.status == 200
    await submit_seed(http, token)  # another workflow's taskforce, not listed
    query = {"workflow_id": workflow_id, "phase": "TASKFORCE_PHASE_CANCELLED"}
    async with http.get("/v1/taskforces", params=query, headers=auth(token)) as resp:
        assert resp.status == 200, await resp.text()
        listed = (await resp.json())["taskforces"]
    assert [tf["taskforce_uuid"] for tf in listed] == [created["taskforces"][0]["taskforce_uuid"]]
    query["phase"] = "TASKFORCE_PHASE_CONDOR_SUBMIT"
    async with http.get("/v1/taskforces", params=query, headers=auth(token)) as resp:
        assert (await resp.json()).get("taskforces", []) == []
