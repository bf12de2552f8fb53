"""WatchWorkflow over REST as Server-Sent Events: the snapshot first, then each change, then
``event: end`` once the workflow is deactivated and its taskforces are terminal; keep-alive comments
on a quiet stream; a client that leaves ends the server's watch."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from services.wms import RunningWms
from services.wms.http import sse
from tests.wms.helpers import eventually
from tests.wms.http.conftest import auth
from tests.wms.http.test_gateway_routes import submit_seed

TIMEOUT = 10.0


@dataclass
class Event:
    """One SSE block: an event (name, id, JSON data) or a comment."""

    name: str = ""
    id: str = ""
    data: Any = None
    comment: str = ""


async def next_event(resp: aiohttp.ClientResponse) -> Event | None:
    """The next block of the stream; None when the server closed it."""
    try:
        block = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), TIMEOUT)
    except asyncio.IncompleteReadError as exc:
        assert not exc.partial.strip(), f"stream ended mid-event: {exc.partial!r}"
        return None
    if not block:
        return None  # aiohttp's readuntil gives b"" at the end of the body
    found = Event()
    for line in filter(None, block.decode().splitlines()):
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "":
            found.comment = value
        elif field == "event":
            found.name = value
        elif field == "id":
            found.id = value
        elif field == "data":
            found.data = json.loads(value)
    return found


async def watch(
    http: aiohttp.ClientSession, token: str, workflow_id: str
) -> aiohttp.ClientResponse:
    resp = await http.get(f"/v1/workflows/{workflow_id}/watch", headers=auth(token))
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/event-stream"
    return resp


async def test_watch_sends_the_snapshot_then_changes_then_ends(
    http: aiohttp.ClientSession, token_for: Any
) -> None:
    token = token_for("alice")
    created = await submit_seed(http, token)
    workflow_id = created["workflow"]["workflow_id"]
    resp = await watch(http, token, workflow_id)
    try:
        first = await next_event(resp)
        assert first is not None
        assert (first.name, first.id) == ("message", "1")
        assert first.data["snapshot"] is True
        assert first.data["workflow"]["workflow_id"] == workflow_id
        assert [tf["taskforce_uuid"] for tf in first.data["taskforces"]] == [
            tf["taskforce_uuid"] for tf in created["taskforces"]
        ]

        path = f"/v1/workflows/{workflow_id}/actions/abort"
        async with http.post(path, headers=auth(token)) as aborted:
            assert aborted.status == 200

        # Changes until the end: the workflow deactivated, its never-launched taskforce cancelled.
        changes = []
        while (event := await next_event(resp)) is not None and event.name == "message":
            changes.append(event)
        assert event is not None and event.name == "end"
        assert await next_event(resp) is None  # and the server closed the stream
        assert [e.id for e in changes] == [str(i) for i in range(2, len(changes) + 2)]
        assert all("snapshot" not in e.data for e in changes)
        workflows = [e.data["workflow"] for e in changes if "workflow" in e.data]
        assert workflows[-1]["deactivated"] == "DEACTIVATION_ABORTED"
        phases = [tf["phase"] for e in changes for tf in e.data.get("taskforces", [])]
        assert phases[-1] == "TASKFORCE_PHASE_CANCELLED"
    finally:
        resp.close()


async def test_watching_an_ended_workflow_is_the_snapshot_then_end(
    http: aiohttp.ClientSession, token_for: Any
) -> None:
    token = token_for("alice")
    workflow_id = (await submit_seed(http, token))["workflow"]["workflow_id"]
    async with http.post(f"/v1/workflows/{workflow_id}/actions/abort", headers=auth(token)):
        pass
    resp = await watch(http, token, workflow_id)
    try:
        first, end = await next_event(resp), await next_event(resp)
        assert first is not None and first.data["snapshot"] is True
        assert end is not None and (end.name, end.data) == ("end", {})
        assert await next_event(resp) is None
    finally:
        resp.close()


async def test_watching_an_unknown_workflow_is_a_json_404(
    http: aiohttp.ClientSession, token_for: Any
) -> None:
    path = "/v1/workflows/WF-nope/watch"
    async with http.get(path, headers=auth(token_for("alice"))) as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert (await resp.json())["code"] == 5


async def test_a_quiet_watch_sends_keep_alive_comments(
    http: aiohttp.ClientSession, token_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "KEEPALIVE_SECONDS", 0.05)
    token = token_for("alice")
    workflow_id = (await submit_seed(http, token))["workflow"]["workflow_id"]
    resp = await watch(http, token, workflow_id)
    try:
        first = await next_event(resp)
        assert first is not None and first.name == "message"
        keepalive = await next_event(resp)
        assert keepalive is not None and keepalive.comment == "keep-alive"
    finally:
        resp.close()


async def test_a_client_that_leaves_ends_the_servers_watch(
    wms: RunningWms,
    http: aiohttp.ClientSession,
    token_for: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sse, "DISCONNECT_CHECK_SECONDS", 0.05)
    token = token_for("alice")
    workflow_id = (await submit_seed(http, token))["workflow"]["workflow_id"]
    resp = await watch(http, token, workflow_id)
    assert await next_event(resp) is not None
    assert wms.hub.watching(workflow_id) == 1
    resp.close()

    async def closed() -> bool:
        return wms.hub.watching(workflow_id) == 0

    # The hub forgets a watcher only when the servicer's generator is closed.
    await eventually(closed, "the watch's generator closed after the client left")
