"""WorkflowService.WatchWorkflow: a full snapshot of a workflow, then every change as it happens.

Changes come from whoever makes them (the dispatcher: phases, compound statuses, counters and
errors as pilots report them; WorkflowService: deactivation, new taskforces). Each watcher keeps
the set of what changed since its last message, so a slow client gets fewer, fuller messages
instead of a growing backlog; and messages are at least ``MIN_GAP`` seconds apart, so that
thousands of pilots reporting do not turn into thousands of messages: a change after a quiet spell
goes out at once, changes within the gap join the next message, which always carries the latest
state. A taskforce is sent only if it differs from what this watcher last sent. Queue counters
ride along with other changes, refreshed at most every ``QUEUE_STATS_MIN_AGE`` seconds (for
RabbitMQ they cost a management API call). The stream ends once the workflow is deactivated and
every taskforce is in a terminal phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import structlog

from ewms.v1 import queue_pb2, taskforce_pb2, workflow_pb2, workflow_service_pb2
from services.errors import NotFound
from services.wms.queues.manager import QueueManager
from services.wms.store import QUEUES, TASKFORCES, WORKFLOWS, Store, Tx

log = structlog.get_logger(__name__)

Phase = taskforce_pb2.TaskforcePhase
TERMINAL = (Phase.TASKFORCE_PHASE_CONDOR_COMPLETE, Phase.TASKFORCE_PHASE_CANCELLED)
QUEUE_STATS_MIN_AGE = 1.0
MIN_GAP = 0.02

Live = Callable[[taskforce_pb2.Taskforce], taskforce_pb2.Taskforce]


@dataclass(eq=False)
class _Watcher:
    workflow_id: str
    taskforces: set[str] = field(default_factory=set)
    workflow: bool = False
    all_taskforces: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Whether a wake is scheduled for when the queue counters may be refreshed.
    stats_timer: bool = False

    def stats_timer_fired(self) -> None:
        self.stats_timer = False
        self.wake.set()


class WatchHub:
    """Who watches which workflow, and what changed for each of them."""

    def __init__(self, store: Store, queues: QueueManager, live: Live) -> None:
        self._store = store
        self._queues = queues
        self._live = live
        self._watchers: dict[str, set[_Watcher]] = {}

    def watching(self, workflow_id: str) -> int:
        return len(self._watchers.get(workflow_id, ()))

    def taskforces_changed(self, workflow_id: str, uuids: Iterable[str]) -> None:
        for w in self._watchers.get(workflow_id, ()):
            w.taskforces.update(uuids)
            w.wake.set()

    def workflow_changed(self, workflow_id: str, *, all_taskforces: bool = False) -> None:
        for w in self._watchers.get(workflow_id, ()):
            w.workflow = True
            w.all_taskforces = w.all_taskforces or all_taskforces
            w.wake.set()

    async def watch(
        self, workflow_id: str, owner: str | None
    ) -> AsyncIterator[workflow_service_pb2.WatchWorkflowResponse]:
        """The snapshot, then changes; NOT_FOUND if the workflow is not the caller's."""
        watcher = _Watcher(workflow_id)
        self._watchers.setdefault(workflow_id, set()).add(watcher)
        try:
            async for msg in self._stream(watcher, owner):
                yield msg
        finally:
            group = self._watchers.get(workflow_id)
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self._watchers[workflow_id]

    async def _stream(
        self, watcher: _Watcher, owner: str | None
    ) -> AsyncIterator[workflow_service_pb2.WatchWorkflowResponse]:
        workflow_id = watcher.workflow_id

        def snapshot(
            tx: Tx,
        ) -> tuple[
            workflow_pb2.Workflow | None, list[taskforce_pb2.Taskforce], list[queue_pb2.Queue]
        ]:
            wf = tx.get(WORKFLOWS, workflow_id, owner)
            if wf is None:
                return None, [], []
            tfs = [tf for _, tf in tx.select(TASKFORCES, [("workflow_id = ?", workflow_id)])]
            qs = [
                q
                for _, q in tx.select(QUEUES, [("workflow_id = ?", workflow_id)])
                if not q.HasField("deleted_ts")
            ]
            return wf, tfs, qs

        wf, tfs, queues = await self._store.run(snapshot, write=False)
        if wf is None:
            raise NotFound(f"workflow {workflow_id!r} not found")
        sent_tf: dict[str, bytes] = {}
        phases: dict[str, int] = {tf.taskforce_uuid: tf.phase for tf in tfs}
        stats_due = False
        sent_wf = wf.SerializeToString()
        first = workflow_service_pb2.WatchWorkflowResponse(snapshot=True, workflow=wf)
        for tf in tfs:
            live = self._live(tf)
            sent_tf[tf.taskforce_uuid] = live.SerializeToString(deterministic=True)
            first.taskforces.append(live)
        stats_at = time.monotonic()
        sent_stats = await self._stats(queues)
        first.queue_stats.extend(sent_stats.values())
        yield first
        if _done(wf, tfs):
            return
        sent_at = time.monotonic()
        while True:
            await watcher.wake.wait()
            if (gap := sent_at + MIN_GAP - time.monotonic()) > 0:
                await asyncio.sleep(gap)
            watcher.wake.clear()
            uuids = set(sent_tf) if watcher.all_taskforces else set(watcher.taskforces)
            watcher.taskforces.clear()
            want_wf, watcher.workflow, watcher.all_taskforces = watcher.workflow, False, False

            def changes(
                tx: Tx,
                uuids: set[str] = uuids,
            ) -> tuple[workflow_pb2.Workflow | None, list[taskforce_pb2.Taskforce]]:
                w = tx.get(WORKFLOWS, workflow_id)
                found = [tx.get(TASKFORCES, u) for u in sorted(uuids)]
                return w, [tf for tf in found if tf is not None]

            wf_now, changed = await self._store.run(changes, write=False)
            if wf_now is None:
                return  # deleted
            msg = workflow_service_pb2.WatchWorkflowResponse()
            body = wf_now.SerializeToString()
            if want_wf and body != sent_wf:
                msg.workflow.CopyFrom(wf_now)
                sent_wf = body
            for tf in changed:
                live = self._live(tf)
                data = live.SerializeToString(deterministic=True)
                if sent_tf.get(tf.taskforce_uuid) != data:
                    sent_tf[tf.taskforce_uuid] = data
                    phases[tf.taskforce_uuid] = tf.phase
                    msg.taskforces.append(live)
            if msg.taskforces or msg.HasField("workflow") or stats_due:
                age = time.monotonic() - stats_at
                if age >= QUEUE_STATS_MIN_AGE:
                    stats_due = False
                    stats_at = time.monotonic()
                    now_stats = await self._stats(queues)
                    for qid, s in now_stats.items():
                        if sent_stats.get(qid) != s:
                            msg.queue_stats.append(s)
                    sent_stats = now_stats
                else:
                    # Refreshed too recently: catch up once the minimum age has passed (again if
                    # the timer fired a little early).
                    stats_due = True
                    if not watcher.stats_timer:
                        watcher.stats_timer = True
                        asyncio.get_running_loop().call_later(
                            QUEUE_STATS_MIN_AGE - age, watcher.stats_timer_fired
                        )
            if msg.taskforces or msg.queue_stats or msg.HasField("workflow"):
                yield msg
                sent_at = time.monotonic()
            if wf_now.deactivated and all(p in TERMINAL for p in phases.values()):
                return

    async def _stats(self, queues: list[queue_pb2.Queue]) -> dict[str, queue_pb2.QueueStats]:
        out: dict[str, queue_pb2.QueueStats] = {}
        for q in queues:
            with contextlib.suppress(Exception):
                out[q.queue_id] = await self._queues.broker(q).stats(q)
        return out


def _done(wf: workflow_pb2.Workflow, tfs: list[taskforce_pb2.Taskforce]) -> bool:
    return bool(wf.deactivated) and all(tf.phase in TERMINAL for tf in tfs)
