"""The embedded broker keeps at most MEMORY_READY ready events of a queue in memory; the rest wait
in SQLite and are loaded in order as the queue drains, across restarts too."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.wms.queues import embedded as embedded_broker
from tests.events.conftest import close_env, open_env
from tests.events.test_conformance import make_events, receive_all, stats_until


@pytest.fixture
def small_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_broker, "MEMORY_READY", 50)
    monkeypatch.setattr(embedded_broker, "LOAD_BELOW", 10)


def in_memory(env: object, queue_id: str) -> int:
    broker = env.wms.queues._brokers[1]  # type: ignore[attr-defined]
    return len(broker._queues[queue_id].ready)


async def test_spilled_events_are_delivered_once_in_order(
    small_memory: None, tmp_path: Path
) -> None:
    env = await open_env("embedded", tmp_path / "wms-data")
    queue_id = env.queue("in").queue_id
    try:
        client = env.client()
        first = await client.publish(queue_id, make_events(120))
        second = await client.publish(queue_id, make_events(180, start=120))
        await stats_until(env, queue_id, ready=300)
        assert in_memory(env, queue_id) == 50
        got = await receive_all(env, queue_id, 300)
        assert [d.event.event_id for d in got] == first + second
        assert await receive_all(env, queue_id, 1) == []
    finally:
        await close_env(env)


async def test_spilled_events_survive_a_restart(small_memory: None, tmp_path: Path) -> None:
    data_dir = tmp_path / "wms-data"
    env = await open_env("embedded", data_dir)
    queue_id = env.queue("in").queue_id
    try:
        event_ids = await env.client().publish(queue_id, make_events(200))
        await receive_all(env, queue_id, 30)  # leased, never acked
    finally:
        await close_env(env)
    env = await open_env("embedded", data_dir)
    try:
        await stats_until(env, queue_id, ready=200, published=200)
        got = await receive_all(env, queue_id, 200)
        assert sorted(d.event.event_id for d in got) == sorted(event_ids)
        assert len(got) == 200
    finally:
        await close_env(env)
