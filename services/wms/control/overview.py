"""WorkflowService.WatchWorkflows: the caller's workflows, newest first, each with its progress (the
dashboard's workflows page): a snapshot, then what changed.

Every watcher follows all workflows through ``WatchHub.on_any_change``, which names a workflow
whenever its state, a taskforce or its queues changed. The listener only takes a note (it runs
inside whoever made the change): a workflow the watcher shows is marked dirty; any other one may be
new or may have entered the filter, so the watcher re-reads which workflows its page holds (one
indexed query). A watcher keeps O(page_size): a digest of each summary it last sent and the dirty
subset of them.

A watcher sends at most one message per ``INTERVAL``: a workflow changed 100 times within it goes
out once, in its latest state, and only if its summary differs from what this watcher last saw.
Workflows that leave the filter, or that newer ones push out of the page, are named in
``removed_workflow_ids``.

Progress has two sources. The live taskforces (failed tasks, tasking workers, active taskforces) are
in memory and cheap. The broker's counters of the tasks' input queues (published, done,
dead-lettered, in flight, ready) cost a management API call per queue on RabbitMQ: they are read
only for workflows that changed (or that a watcher shows for the first time), never on a timer, and
at most once per ``INTERVAL`` per workflow however many watchers there are. Reads are shared through
``_QueueReads``; a watcher that needs a newer read than that allows yet sends the latest numbers and
comes back for the workflow once a read is allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ewms.v1 import queue_pb2, taskforce_pb2, workflow_pb2, workflow_service_pb2
from services.wms.control.watch import TERMINAL, Live, WatchHub
from services.wms.pagination import MAX_PAGE_SIZE
from services.wms.queues.manager import QueueManager
from services.wms.store import QUEUES, TASK_DIRECTIVES, TASKFORCES, WORKFLOWS, Store, Tx
from services.wms.validation import Violations

ws = workflow_service_pb2
State = ws.WorkflowState

# Seconds between a watcher's messages, and between two broker reads of one workflow's queues.
INTERVAL = 1.0
DEFAULT_PAGE_SIZE = 200
# Broker reads in progress at once, over all watchers (a 1,000-workflow snapshot on RabbitMQ).
READ_CONCURRENCY = 8
# Workflow ids bound into one SQL statement.
_CHUNK = 500

QueueCounters = dict[str, queue_pb2.QueueStats]


@dataclass(frozen=True)
class Selection:
    """Which workflows a watcher shows: one owner's (None: everyone's), in one state (0: any), the
    newest ``page_size``."""

    owner: str | None
    state: int
    page_size: int

    def newest(self, tx: Tx) -> list[str]:
        """The ids of the workflows shown now, newest first."""
        where: list[str] = []
        params: list[object] = []
        if self.owner is not None:
            where.append("owner = ?")
            params.append(self.owner)
        if self.state:
            where.append("state = ?")
            params.append(self.state)
        sql = "SELECT workflow_id FROM workflows"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        return [wid for (wid,) in tx.sql.execute(sql, [*params, self.page_size])]


def selection_of(request: ws.WatchWorkflowsRequest, owner: str | None) -> Selection:
    """The request's selection for ``owner`` (already checked against the caller); INVALID_ARGUMENT
    naming each bad field."""
    v = Violations()
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        v.add(
            "page_size",
            f"must be between 1 and {MAX_PAGE_SIZE} (0 or unset: {DEFAULT_PAGE_SIZE}); "
            f"got {request.page_size}",
        )
    if request.state not in State.values():
        v.add("state", f"unknown workflow state {request.state}; known: {', '.join(State.keys())}")
    v.raise_if_any()
    return Selection(owner, int(request.state), request.page_size or DEFAULT_PAGE_SIZE)


@dataclass
class _Parts:
    """What a workflow's summary is made of, as stored."""

    workflow: workflow_pb2.Workflow
    taskforces: list[taskforce_pb2.Taskforce] = field(default_factory=list)
    # The tasks' input queues that still exist.
    input_queues: list[queue_pb2.Queue] = field(default_factory=list)


def _load(tx: Tx, workflow_ids: list[str]) -> dict[str, _Parts]:
    """The parts of these workflows (those that exist)."""
    found: dict[str, _Parts] = {}
    for i in range(0, len(workflow_ids), _CHUNK):
        chunk = workflow_ids[i : i + _CHUNK]
        among = [(f"workflow_id IN ({', '.join('?' * len(chunk))})", chunk)]
        for _, wf in tx.select(WORKFLOWS, among):
            found[wf.workflow_id] = _Parts(wf)
        inputs = {qid for _, td in tx.select(TASK_DIRECTIVES, among) for qid in td.input_queues}
        for _, tf in tx.select(TASKFORCES, among):
            if tf.workflow_id in found:
                found[tf.workflow_id].taskforces.append(tf)
        for _, q in tx.select(QUEUES, among):
            if q.queue_id in inputs and not q.HasField("deleted_ts") and q.workflow_id in found:
                found[q.workflow_id].input_queues.append(q)
    return found


def summarize(parts: _Parts, live: Live, counters: QueueCounters) -> ws.WorkflowSummary:
    """A workflow and its progress: its input queues' counters, its live taskforces' failures,
    tasking workers and activity."""
    progress = ws.WorkflowProgress()
    for q in parts.input_queues:
        stats = counters.get(q.queue_id)
        if stats is None:
            continue  # unreadable now (the broker is down, or the queue was just deleted)
        progress.published += stats.published
        progress.done += stats.acked
        progress.dead_lettered += stats.dead_lettered
        progress.in_flight += stats.in_flight
        progress.ready += stats.ready
    for stored in parts.taskforces:
        tf = live(stored)
        progress.failed += tf.counters.tasks_failed
        progress.workers_tasking += sum(
            c.count
            for c in tf.compound_statuses
            if c.pilot_phase == taskforce_pb2.PILOT_PHASE_TASKING
        )
        if tf.phase not in TERMINAL:
            progress.taskforces_active += 1
    return ws.WorkflowSummary(workflow=parts.workflow, progress=progress)


@dataclass(frozen=True)
class _Read:
    """One read of a workflow's input queue counters, shared by whoever needs it."""

    started: float
    task: asyncio.Task[QueueCounters]


class _QueueReads:
    """Broker reads of workflows' input queues, shared by every watcher: a read is started at most
    once per INTERVAL per workflow. Reads are kept for 2 x INTERVAL (older ones can no longer be
    newer than a change a watcher is waiting to show), so this holds only the workflows read in
    the last two seconds."""

    def __init__(self, queues: QueueManager) -> None:
        self._queues = queues
        # Oldest first (a new read of a workflow moves it to the end).
        self._reads: dict[str, _Read] = {}
        self._limit = asyncio.Semaphore(READ_CONCURRENCY)

    def __len__(self) -> int:
        return len(self._reads)

    async def read(
        self, workflow_id: str, queues: list[queue_pb2.Queue], since: float
    ) -> tuple[QueueCounters, float]:
        """The counters of ``queues`` and when their read started: one started at or after
        ``since`` when there is one or one may start now, else the latest (which the caller must
        come back for at ``started + INTERVAL``)."""
        now = time.monotonic()
        if not queues:
            return {}, now
        self._forget(now)
        latest = self._reads.get(workflow_id)
        if latest is None or (latest.started < since and now - latest.started >= INTERVAL):
            task = asyncio.create_task(self._counters(queues), name=f"queue-reads-{workflow_id}")
            latest = _Read(now, task)
            self._reads.pop(workflow_id, None)
            self._reads[workflow_id] = latest
        # Shielded: a watcher that leaves does not cancel a read others wait for.
        return await asyncio.shield(latest.task), latest.started

    def _forget(self, now: float) -> None:
        while self._reads:
            workflow_id, oldest = next(iter(self._reads.items()))
            if now - oldest.started < 2 * INTERVAL or not oldest.task.done():
                return
            del self._reads[workflow_id]

    async def _counters(self, queues: list[queue_pb2.Queue]) -> QueueCounters:
        out: QueueCounters = {}
        for q in queues:
            # As WatchWorkflow: a queue that cannot be read now is left out of the sums.
            with contextlib.suppress(Exception):
                async with self._limit:
                    out[q.queue_id] = await self._queues.broker(q).stats(q)
        return out


@dataclass(eq=False)
class _Watcher:
    """One WatchWorkflows stream: what it last sent and what changed since."""

    selection: Selection
    # Digest of the summary last sent, by the id of each workflow shown.
    sent: dict[str, bytes] = field(default_factory=dict)
    # Shown workflows that changed since their last summary: when they last changed (monotonic).
    dirty: dict[str, float] = field(default_factory=dict)
    # A workflow not shown changed: it may be new or have entered the filter.
    outside: bool = False
    # While a message is being made: changes of workflows not yet in ``sent`` are noted too (they
    # may be among those being added).
    busy: bool = False
    # Too many changes to note while busy: when the latest of those not noted happened (every
    # shown workflow is then re-read as if it changed then).
    everything_since: float | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None

    def changed(self, workflow_id: str) -> None:
        """The hub's listener: note the change, wake the stream (cheap, never blocks)."""
        shown = workflow_id in self.sent
        if shown or self.busy:
            if workflow_id in self.dirty or len(self.dirty) < 2 * self.selection.page_size:
                self.dirty[workflow_id] = time.monotonic()
            else:
                self.everything_since = time.monotonic()
        if not shown:
            self.outside = True
        self.wake.set()

    def come_back(self, workflow_id: str, since: float, at: float) -> None:
        """Show this workflow again at monotonic time ``at``, with counters read after ``since``."""
        self.dirty[workflow_id] = max(self.dirty.get(workflow_id, since), since)
        if self.timer is None or self.timer.when() > _loop_time(at):
            if self.timer is not None:
                self.timer.cancel()
            self.timer = asyncio.get_running_loop().call_at(_loop_time(at), self._timer_fired)

    def _timer_fired(self) -> None:
        self.timer = None
        self.wake.set()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _loop_time(monotonic: float) -> float:
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic - time.monotonic())


def _digest(summary: ws.WorkflowSummary) -> bytes:
    return hashlib.blake2b(summary.SerializeToString(deterministic=True), digest_size=16).digest()


class WorkflowsOverview:
    """Streams selections of workflows with their progress (one per WatchWorkflows call)."""

    def __init__(self, store: Store, queues: QueueManager, hub: WatchHub, live: Live) -> None:
        self._store = store
        self._hub = hub
        self._live = live
        self._reads = _QueueReads(queues)

    async def watch(self, selection: Selection) -> AsyncIterator[ws.WatchWorkflowsResponse]:
        """The snapshot, then a message whenever shown workflows changed, appeared or left, at
        most one per INTERVAL; until the caller stops iterating."""
        watcher = _Watcher(selection)
        # Listening before the snapshot is read: no change falls between the two.
        stop_listening = self._hub.on_any_change(watcher.changed)
        try:
            snapshot = await self._message(watcher, first=True)
            assert snapshot is not None
            made = time.monotonic()
            yield snapshot
            while True:
                await watcher.wake.wait()
                if (gap := made + INTERVAL - time.monotonic()) > 0:
                    await asyncio.sleep(gap)
                watcher.wake.clear()
                msg = await self._message(watcher, first=False)
                if msg is not None:
                    made = time.monotonic()
                    yield msg
        finally:
            stop_listening()
            watcher.close()

    async def _message(self, w: _Watcher, *, first: bool) -> ws.WatchWorkflowsResponse | None:
        """The next message of ``w`` (None if nothing it shows changed)."""
        w.busy = True
        try:
            started = time.monotonic()
            dirty, w.dirty = w.dirty, {}
            outside, w.outside = w.outside, False
            if w.everything_since is not None:
                for workflow_id in w.sent:
                    dirty.setdefault(workflow_id, w.everything_since)
                w.everything_since = None
            if not (first or outside or dirty):
                return None
            shown = frozenset(w.sent)

            def read(tx: Tx) -> tuple[list[str], dict[str, _Parts]]:
                ids = w.selection.newest(tx)
                wanted = [i for i in ids if first or i not in shown or i in dirty]
                return ids, _load(tx, wanted)

            ids, parts = await self._store.run(read, write=False)
            # Counters read after the change (for a workflow not shown before: after this
            # message began), or the latest if such a read may not start yet.
            since = {wid: dirty.get(wid, started) for wid in parts}
            reads = await asyncio.gather(
                *(self._reads.read(wid, p.input_queues, since[wid]) for wid, p in parts.items())
            )
            counters = dict(zip(parts, reads, strict=True))
            msg = ws.WatchWorkflowsResponse(snapshot=first)
            page = set(ids)
            for workflow_id in [wid for wid in w.sent if wid not in page]:
                del w.sent[workflow_id]
                msg.removed_workflow_ids.append(workflow_id)
            for workflow_id in ids:
                if workflow_id not in parts:
                    continue
                values, read_started = counters[workflow_id]
                if read_started < since[workflow_id]:
                    w.come_back(workflow_id, since[workflow_id], read_started + INTERVAL)
                summary = summarize(parts[workflow_id], self._live, values)
                digest = _digest(summary)
                if first or w.sent.get(workflow_id) != digest:
                    w.sent[workflow_id] = digest
                    msg.workflows.append(summary)
            return msg if first or msg.workflows or msg.removed_workflow_ids else None
        finally:
            w.busy = False
            # Changes noted while busy matter only for the workflows now shown.
            w.dirty = {wid: t for wid, t in w.dirty.items() if wid in w.sent}
