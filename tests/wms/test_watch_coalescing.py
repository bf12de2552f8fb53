"""WatchWorkflow coalesces a burst of changes (defect: thousands of pilot statuses a second made a
message each): messages are at least MIN_GAP apart, and the last one carries the latest state."""

from __future__ import annotations

import asyncio
import time

from ewms.v1 import taskforce_pb2, workflow_service_pb2
from services.auth import Role
from services.wms.control.watch import MIN_GAP
from tests.wms.helpers import TIMEOUT, Env
from tests.wms.requests import minimal_task

BURST = 150
# Statuses a little apart, so that the WMS applies them one by one (a burst written at once may be
# applied in one go, and coalesce by itself).
PAUSE = 0.002


async def test_a_burst_of_pilot_statuses_is_coalesced_and_ends_with_the_latest(env: Env) -> None:
    [tf] = await env.created_and_launched(minimal_task(n_workers=1))
    uuid = tf.taskforce_uuid
    watch = env.workflows.WatchWorkflow(
        workflow_service_pb2.WatchWorkflowRequest(workflow_id=tf.workflow_id),
        metadata=env.alice,
    )
    assert (await asyncio.wait_for(watch.read(), TIMEOUT)).snapshot
    pilot = env.pilot(env.wms.authority.mint("pilot", Role.PILOT, 3600, scope=uuid))
    await pilot.hello(uuid)

    started = time.monotonic()
    for i in range(1, BURST + 1):
        await pilot.status(taskforce_pb2.PILOT_PHASE_TASKING, events_received=i)
        await asyncio.sleep(PAUSE)
    messages = 0
    seen = 0
    while seen < BURST:
        msg = await asyncio.wait_for(watch.read(), TIMEOUT)
        messages += 1
        seen = max([seen, *(t.counters.events_received for t in msg.taskforces)])
    elapsed = time.monotonic() - started
    watch.cancel()

    # Sent at least MIN_GAP apart within ``elapsed`` (which includes the hello's own change).
    assert messages <= elapsed / MIN_GAP + 2, (messages, elapsed)
