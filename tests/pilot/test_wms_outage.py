"""A pilot rides out a WMS outage (embedded broker: its queues are the WMS's). Outputs that cannot
be published wait for the WMS instead of failing their task, the input subscription comes back,
the idle clock stops meanwhile, and only an outage longer than ``EWMS_PILOT_OUTAGE_TOLERANCE`` ends
the pilot -- with exit 1 and a clear message, never as a task failure nor as a quiet DONE. The WMS
is a real one, stopped and restarted in this process on its port."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ewms.v1 import taskforce_pb2
from services.pilot.config import PilotConfigError, QueueSide, load_settings
from services.pilot.queue_link import Intake, IntakeFailed, Outage, QueueLink
from services.wms import start_wms
from tests.events.conftest import close_env, open_env, settings_for
from tests.pilot.conftest import PilotEnv, PilotProcess, pilot_workflow_request, wait_for
from tests.pilot.test_config import BASE

MAX_EVENT_BYTES = 1024 * 1024
# The pilot's publish attempts before this fix: five (four retries), then the task failed.
OLD_PUBLISH_ATTEMPTS = 5


@pytest.fixture
async def penv(tmp_path: Path) -> AsyncIterator[PilotEnv]:
    """A WMS with the embedded broker and alice's pilot workflow."""
    q = await open_env("embedded", tmp_path / "wms-data", max_event_bytes=MAX_EVENT_BYTES)
    q.workflow = await q.workflows.CreateWorkflow(pilot_workflow_request(), metadata=q.alice)
    env = PilotEnv(q, tmp_path)
    try:
        yield env
    finally:
        for p in env.processes:
            if p.proc.returncode is None:
                p.proc.send_signal(signal.SIGKILL)
                await p.proc.wait()
        await close_env(env.q)


async def stop_wms(penv: PilotEnv) -> int:
    """Stop the WMS at once (its streams break, as when it dies); returns its port."""
    port = penv.q.wms.port
    await penv.q.wms.stop(grace=None)
    return port


async def restart_wms(penv: PilotEnv, port: int) -> None:
    """Start the WMS again on its data directory and port (the test's channel reconnects)."""
    penv.q.wms = await start_wms(
        settings_for(
            "embedded", penv.tmp / "wms-data", max_event_bytes=MAX_EVENT_BYTES, grpc_port=port
        )
    )


def records(pilot: PilotProcess, event: str, **fields: str) -> list[dict[str, Any]]:
    """The pilot's log records of ``event`` (with these field values)."""
    out = []
    for line in pilot.log().splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event and fields.items() <= record.items():
                out.append(record)
    return out


async def wait_records(
    pilot: PilotProcess, event: str, n: int = 1, within: float = 30.0, **fields: str
) -> None:
    async def seen() -> bool:
        found = len(records(pilot, event, **fields))
        if pilot.proc.returncode is not None and found < n:
            raise AssertionError(f"pilot exited before logging {event!r} {n}x:\n{pilot.log()}")
        return found >= n

    await wait_for(seen, within, f"{n} pilot log record(s) {event!r}")


async def test_outputs_unpublishable_for_a_wms_outage_wait_for_it_and_no_task_fails(
    penv: PilotEnv,
) -> None:
    marker = penv.tmp / "task-started"
    pilot = await penv.start_pilot(
        f"sh -c 'touch {marker}; sleep 1; cp {{{{INFILE}}}} {{{{OUTFILE}}}}'",
        EWMS_PILOT_TIMEOUT_QUEUE_INCOMING="60",
    )
    await penv.publish([b"through the outage"])

    async def task_running() -> bool:
        return marker.exists()

    await wait_for(task_running, what="the task to start")
    port = await stop_wms(penv)
    # More attempts to publish to one queue than the pilot used to make before failing the task.
    await wait_records(
        pilot, "publish failed; retrying", OLD_PUBLISH_ATTEMPTS, queue=penv.queue("out").queue_id
    )
    assert records(pilot, "task failed") == []
    await restart_wms(penv, port)

    # The outputs go out once the WMS is back. The input's ack died with its stream, so the event
    # runs again: at-least-once, the same output twice at most.
    got = await penv.outputs("out", 1)
    assert [e.payload for e in got] == [b"through the outage"]

    async def reported() -> bool:
        [state] = await penv.q.wms.pilots.pilots(penv.taskforce_uuid)
        return state.connected and state.counters.tasks_succeeded >= 1

    await wait_for(reported, what="the pilot's status on the restarted WMS")
    pilot.signal(signal.SIGTERM)
    assert await pilot.wait() == 0
    [finished] = records(pilot, "pilot finished")
    assert finished["failed"] == 0, pilot.log()
    assert records(pilot, "task failed") == []


async def test_the_input_is_subscribed_again_after_a_wms_outage_longer_than_the_idle_timeout(
    penv: PilotEnv,
) -> None:
    pilot = await penv.start_pilot(
        "cp {{INFILE}} {{OUTFILE}}", EWMS_PILOT_TIMEOUT_QUEUE_INCOMING="2"
    )
    await penv.publish([b"before"])
    assert [e.payload for e in await penv.outputs("out", 1)] == [b"before"]
    port = await stop_wms(penv)
    # Re-subscribing fails while the WMS is away (its first write as well as its read).
    await wait_records(pilot, "re-subscribing failed; retrying", 2)
    await asyncio.sleep(3)  # the outage goes on past the idle timeout
    assert pilot.proc.returncode is None, pilot.log()
    await restart_wms(penv, port)
    await wait_records(pilot, "input queue re-subscribed")
    await penv.publish([b"after"])
    seen: list[bytes] = []
    while b"after" not in seen:  # "before" may come round again: its ack was in flight
        seen += [e.payload for e in await penv.outputs("out", 1)]

    async def tasking_again() -> bool:
        [state] = await penv.q.wms.pilots.pilots(penv.taskforce_uuid)
        return state.connected and state.phase == taskforce_pb2.PILOT_PHASE_TASKING

    await wait_for(tasking_again, what="the restarted WMS to see the pilot TASKING")
    # Idle from the last event on, the pilot ends by itself.
    assert await pilot.wait() == 0
    assert "waited 2s for another event" in pilot.log()


async def test_an_outage_longer_than_the_tolerance_ends_the_pilot_with_exit_1_not_a_task_failure(
    penv: PilotEnv,
) -> None:
    marker = penv.tmp / "task-started"
    pilot = await penv.start_pilot(
        f"sh -c 'touch {marker}; sleep 1; cp {{{{INFILE}}}} {{{{OUTFILE}}}}'",
        EWMS_PILOT_OUTAGE_TOLERANCE="3",
        EWMS_PILOT_TIMEOUT_QUEUE_INCOMING="60",
    )
    await penv.publish([b"never published"])

    async def task_running() -> bool:
        return marker.exists()

    await wait_for(task_running, what="the task to start")
    await stop_wms(penv)
    assert await pilot.wait() == 1
    log = pilot.log()
    assert "was unreachable for" in log and "EWMS_PILOT_OUTAGE_TOLERANCE (3 s)" in log, log
    [finished] = records(pilot, "pilot finished")
    assert finished["failed"] == 0 and finished["succeeded"] == 0, log
    assert records(pilot, "task failed") == []


async def test_an_input_reader_that_fails_unexpectedly_fails_the_intake(penv: PilotEnv) -> None:
    side = QueueSide(
        (penv.queue("in").queue_id,), "embedded", penv.q.wms.address, penv.q.alice_token
    )
    link = QueueLink(side, MAX_EVENT_BYTES, "test-in", Outage("the WMS", 60))
    intake = Intake(link, 1)
    await intake.open()

    def broken() -> None:
        raise RuntimeError("a bug in the pilot")

    intake.on_change = broken
    try:
        await penv.publish([b"x"])
        failure = await asyncio.wait_for(intake.failed, 30)
    finally:
        await intake.close()
        await link.close()
    assert isinstance(failure, IntakeFailed)
    assert "its reader failed: RuntimeError('a bug in the pilot')" in str(failure)


def test_the_outage_tolerance_is_ten_minutes_unless_set(tmp_path: Path) -> None:
    env = {**BASE, "EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST": str(tmp_path)}
    assert load_settings(env).outage_tolerance == 600
    assert load_settings({**env, "EWMS_PILOT_OUTAGE_TOLERANCE": "3600"}).outage_tolerance == 3600
    with pytest.raises(PilotConfigError) as err:
        load_settings({**env, "EWMS_PILOT_OUTAGE_TOLERANCE": "0"})
    [problem] = err.value.problems
    assert problem == "EWMS_PILOT_OUTAGE_TOLERANCE='0': must be a number of seconds > 0"
