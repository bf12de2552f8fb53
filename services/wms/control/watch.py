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

With ``include_task_activity`` the snapshot also carries the workflow's task activity window
(activity.py: task runs, throughput, task errors, the window's bounds) and later messages what of
it changed, at most every ``ACTIVITY_MIN_GAP`` seconds: pilots report thousands of task events a
second, and a dashboard redraws no faster. Activity alone never costs a store read or a queue
counter refresh; before the watch ends, the last activity goes out, however recent the previous.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import structlog

from ewms.v1 import queue_pb2, taskforce_pb2, workflow_pb2, workflow_service_pb2
from services.errors import NotFound, Unimplemented
from services.wms.control.activity import ActivitySubscription, TaskActivity
from services.wms.queues.manager import QueueManager
from services.wms.store import QUEUES, TASKFORCES, WORKFLOWS, Store, Tx

log = structlog.get_logger(__name__)

Phase = taskforce_pb2.TaskforcePhase
TERMINAL = (Phase.TASKFORCE_PHASE_CONDOR_COMPLETE, Phase.TASKFORCE_PHASE_CANCELLED)
QUEUE_STATS_MIN_AGE = 1.0
MIN_GAP = 0.02
ACTIVITY_MIN_GAP = 0.25

Live = Callable[[taskforce_pb2.Taskforce], taskforce_pb2.Taskforce]


@dataclass(eq=False)
class _Watcher:
    workflow_id: str
    taskforces: set[str] = field(default_factory=set)
    workflow: bool = False
    all_taskforces: bool = False
    # Whether its queues' counters changed (a publish or re-drive through the WMS).
    queues: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Whether a wake is scheduled for when the queue counters may be refreshed.
    stats_timer: bool = False
    # With include_task_activity: its subscription, whether it has unsent changes, and whether a
    # wake is scheduled for when they may be sent.
    activity_sub: ActivitySubscription | None = None
    activity: bool = False
    activity_timer: bool = False

    def stats_timer_fired(self) -> None:
        self.stats_timer = False
        self.wake.set()

    def activity_changed(self) -> None:
        # Called for every task event: while a send is scheduled, the timer does the waking.
        self.activity = True
        if not self.activity_timer:
            self.wake.set()

    def activity_timer_fired(self) -> None:
        self.activity_timer = False
        self.wake.set()


class WatchHub:
    """Who watches which workflow, and what changed for each of them."""

    def __init__(
        self,
        store: Store,
        queues: QueueManager,
        live: Live,
        activity: TaskActivity | None = None,
    ) -> None:
        self._store = store
        self._queues = queues
        self._live = live
        # The task activity window, for watches with include_task_activity (None: refused).
        self.activity = activity
        self._watchers: dict[str, set[_Watcher]] = {}
        # Called with a workflow's id whenever anything of it changed (its state, a taskforce, a
        # queue's counters), for whoever follows every workflow (WatchWorkflows).
        self._any_change: list[Callable[[str], None]] = []

    def watching(self, workflow_id: str) -> int:
        return len(self._watchers.get(workflow_id, ()))

    def on_any_change(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(workflow_id)`` on every change of any workflow from now on; returns the
        function that stops it. It must be cheap: it runs inside whoever made the change."""
        self._any_change.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._any_change.remove(listener)

        return remove

    def _tell_any(self, workflow_id: str) -> None:
        for listener in list(self._any_change):
            try:
                listener(workflow_id)
            except Exception:
                log.exception("workflow change listener failed", workflow_id=workflow_id)

    def taskforces_changed(self, workflow_id: str, uuids: Iterable[str]) -> None:
        for w in self._watchers.get(workflow_id, ()):
            w.taskforces.update(uuids)
            w.wake.set()
        self._tell_any(workflow_id)

    def workflow_changed(self, workflow_id: str, *, all_taskforces: bool = False) -> None:
        for w in self._watchers.get(workflow_id, ()):
            w.workflow = True
            w.all_taskforces = w.all_taskforces or all_taskforces
            w.wake.set()
        self._tell_any(workflow_id)

    def queues_changed(self, workflow_id: str) -> None:
        """Events were published to (or re-driven in) one of the workflow's queues through the
        WMS: watchers refresh its queue counters (no more often than QUEUE_STATS_MIN_AGE)."""
        for w in self._watchers.get(workflow_id, ()):
            w.queues = True
            w.wake.set()
        self._tell_any(workflow_id)

    async def watch(
        self, workflow_id: str, owner: str | None, *, include_task_activity: bool = False
    ) -> AsyncIterator[workflow_service_pb2.WatchWorkflowResponse]:
        """The snapshot, then changes (with the task activity window and its changes if asked);
        NOT_FOUND if the workflow is not the caller's."""
        if include_task_activity and self.activity is None:
            raise Unimplemented("this WMS keeps no task activity window")
        watcher = _Watcher(workflow_id)
        self._watchers.setdefault(workflow_id, set()).add(watcher)
        try:
            async for msg in self._stream(watcher, owner, include_task_activity):
                yield msg
        finally:
            if watcher.activity_sub is not None:
                watcher.activity_sub.close()
            group = self._watchers.get(workflow_id)
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self._watchers[workflow_id]

    async def _stream(
        self, watcher: _Watcher, owner: str | None, include_task_activity: bool
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
        sub = None
        if include_task_activity and self.activity is not None:
            # Subscribed and snapshotted in one step of the loop: no task event falls between.
            sub = watcher.activity_sub = self.activity.subscribe(
                workflow_id, watcher.activity_changed
            )
            sub.snapshot_into(first)
        yield first
        if _done(wf, tfs):
            return
        sent_at = activity_at = time.monotonic()
        while True:
            await watcher.wake.wait()
            if (gap := sent_at + MIN_GAP - time.monotonic()) > 0:
                await asyncio.sleep(gap)
            watcher.wake.clear()
            uuids = set(sent_tf) if watcher.all_taskforces else set(watcher.taskforces)
            watcher.taskforces.clear()
            want_wf, watcher.workflow, watcher.all_taskforces = watcher.workflow, False, False
            stats_due = stats_due or watcher.queues
            watcher.queues = False
            msg = workflow_service_pb2.WatchWorkflowResponse()
            if sub is not None and not (want_wf or uuids or stats_due):
                # Only task activity changed: nothing to read from the store.
                if self._add_activity(watcher, sub, msg, activity_at, final=False):
                    yield msg
                    sent_at = activity_at = time.monotonic()
                continue

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
            final = bool(wf_now.deactivated) and all(p in TERMINAL for p in phases.values())
            if sub is not None and self._add_activity(watcher, sub, msg, activity_at, final):
                activity_at = time.monotonic()
            if msg.taskforces or msg.queue_stats or msg.HasField("workflow") or _has_activity(msg):
                yield msg
                sent_at = time.monotonic()
            if final:
                return

    @staticmethod
    def _add_activity(
        watcher: _Watcher,
        sub: ActivitySubscription,
        msg: workflow_service_pb2.WatchWorkflowResponse,
        activity_at: float,
        final: bool,
    ) -> bool:
        """Add the activity changes to ``msg`` if ACTIVITY_MIN_GAP has passed since the last were
        sent (or the watch ends), else make sure a wake comes when it has; whether it added
        any."""
        if not watcher.activity and not final:
            return False
        age = time.monotonic() - activity_at
        if final or age >= ACTIVITY_MIN_GAP:
            watcher.activity = False
            return sub.changes_into(msg)
        if not watcher.activity_timer:
            # (Again if the timer fired a little early.)
            watcher.activity_timer = True
            asyncio.get_running_loop().call_later(
                ACTIVITY_MIN_GAP - age, watcher.activity_timer_fired
            )
        return False

    async def _stats(self, queues: list[queue_pb2.Queue]) -> dict[str, queue_pb2.QueueStats]:
        out: dict[str, queue_pb2.QueueStats] = {}
        for q in queues:
            with contextlib.suppress(Exception):
                out[q.queue_id] = await self._queues.broker(q).stats(q)
        return out


def _has_activity(msg: workflow_service_pb2.WatchWorkflowResponse) -> bool:
    return bool(msg.task_runs or msg.throughput or msg.task_errors)


def _done(wf: workflow_pb2.Workflow, tfs: list[taskforce_pb2.Taskforce]) -> bool:
    return bool(wf.deactivated) and all(tf.phase in TERMINAL for tf in tfs)
