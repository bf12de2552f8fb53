"""The task activity window: what a dashboard draws of a workflow's recent task runs.

Pilots report every task run's lifecycle (STARTED, then FINISHED or FAILED with its metrics and,
for FAILED, the error text) on their PilotService stream; the pilot registry hands each event to
its listeners. ``TaskActivity`` is one of them: per workflow it keeps, in memory only,

- the recent **task runs**, keyed (taskforce, worker, event): STARTED makes a RUNNING run, an end
  ends it (an end whose start was not seen makes a run without ``started``). At most
  ``max_task_runs`` per workflow; beyond that the oldest ended runs are dropped first, then the
  oldest running ones (a run whose pilot was lost stays RUNNING until it ages out so);
- **throughput**: runs that ended, succeeded and failed, in buckets of BUCKET_SECONDS, the last
  MAX_BUCKETS (one hour), placed by the end's own timestamp (the pilot's clock; one in the future,
  or more than MAX_LATENESS_SECONDS old, counts as now: a pilot's clock may be wrong);
- **task errors**, by first line (cut to MAX_SUMMARY_CHARS): how many runs failed with it since
  this WMS started, the latest such run and its whole error text cut to MAX_ERROR_BYTES; at most
  MAX_TASK_ERRORS per workflow, the least recently seen dropped first (a dropped error seen
  again counts from 1);

and windows for at most ``max_workflows`` workflows, the least recently active dropped first.

Memory bound, measured with tracemalloc by ``tests/wms/test_activity.py`` at the limits (every
worker id, event id and error summary distinct and as long as allowed, of characters that take 4
bytes each; 4 KiB error texts; every bucket filled): at most RUN_BYTES (3,300 B) per task run plus
WINDOW_BYTES (256 KiB) per workflow, whatever the pilots send. With the defaults (5,000 runs, 16
workflows) that is at most 16.8 MB per workflow and 268 MB in all. Typical ids take far less: with
``EV-<32 hex>`` event ids, ``cluster.proc`` worker ids and 100 distinct errors a full window
measures 4.0 MB (about 800 B per run), 64 MB for 16 workflows. A watcher's pending changes are
keys of runs in the window (at most ``max_task_runs``), changed bucket indices and error summaries.
A message is kept within ``max_message_bytes``: the oldest runs that would not fit are left out.

Runs are slotted objects of plain str/float/int (worker and taskforce ids interned, error
summaries shared with the error table); protobuf is built only when a watcher is sent something.
Watchers subscribe: a snapshot of the window, then the changes since they last looked (a run that
changed twice in between is sent once, in its latest state).
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final

from ewms.v1 import pilot_service_pb2, workflow_service_pb2
from services.config import DEFAULT_ACTIVITY_MAX_TASK_RUNS, DEFAULT_ACTIVITY_MAX_WORKFLOWS
from services.wms.control.pilots import ChangeKind, PilotChange
from services.wms.limits import ID_CHARS

ws = workflow_service_pb2
Outcome = ws.TaskRunOutcome

BUCKET_SECONDS: Final = 10
MAX_BUCKETS: Final = 360  # one hour
MAX_TASK_ERRORS: Final = 20
MAX_ERROR_BYTES: Final = 4096
MAX_SUMMARY_CHARS: Final = 200
# Of an error text cut to MAX_ERROR_BYTES, the first line keeps at most this much; the rest is
# the end of the text (the end of stderr is what explains a failure).
MAX_ERROR_HEAD_BYTES: Final = 1024
# An event stamped longer ago than this (or in the future) counts as happening now: batched events
# arrive a little late, but a pilot whose clock is off would put its runs out of sight.
MAX_LATENESS_SECONDS: Final = 300.0
NO_ERROR_TEXT: Final = "(no error text)"
# The stated memory bound (see the module docstring); the test measures against it.
RUN_BYTES: Final = 3300
WINDOW_BYTES: Final = 256 * 1024

# A watch message's task runs are cut (the oldest left out) to keep it within this many bytes;
# the server passes its own send limit.
DEFAULT_MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
# A repeated message field's tag and length prefix, at most.
_FIELD_OVERHEAD: Final = 6

RunKey = tuple[str, str, str]  # (taskforce_uuid, worker_id, event_id)
_STARTED = pilot_service_pb2.TASK_EVENT_KIND_STARTED
_FAILED = pilot_service_pb2.TASK_EVENT_KIND_FAILED


class _Run:
    """One task run. Mutated only from RUNNING to ended; anything else makes a new object, so that
    an error's ``latest`` never changes under it."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "cpu_seconds",
        "ended",
        "error_summary",
        "event_id",
        "exit_code",
        "max_rss_bytes",
        "outcome",
        "started",
        "taskforce_uuid",
        "wall_seconds",
        "worker_id",
    )

    def __init__(self, key: RunKey, started: float | None) -> None:
        self.taskforce_uuid, self.worker_id, self.event_id = key
        self.started = started
        self.ended: float | None = None
        self.outcome: int = Outcome.TASK_RUN_OUTCOME_RUNNING
        # None: no metrics (running, or the end carried none).
        self.wall_seconds: float | None = None
        self.cpu_seconds = 0.0
        self.max_rss_bytes = 0
        self.exit_code = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.error_summary = ""

    def end(self, at: float, outcome: int, metrics: pilot_service_pb2.TaskMetrics | None) -> None:
        # A start stamped after its end (clocks, clamping) would draw a bar backwards.
        if self.started is not None and self.started > at:
            self.started = at
        self.ended = at
        self.outcome = outcome
        if metrics is not None:
            self.wall_seconds = metrics.wall_seconds
            self.cpu_seconds = metrics.cpu_seconds
            self.max_rss_bytes = metrics.max_rss_bytes
            self.exit_code = metrics.exit_code
            self.bytes_in = metrics.bytes_in
            self.bytes_out = metrics.bytes_out

    def since(self) -> float:
        """When it was first seen (start, else end): the window's order."""
        return self.started if self.started is not None else self.ended or 0.0

    def to_proto(self) -> ws.TaskRun:
        msg = ws.TaskRun(
            taskforce_uuid=self.taskforce_uuid,
            worker_id=self.worker_id,
            event_id=self.event_id,
            outcome=self.outcome,  # type: ignore[arg-type]
            error_summary=self.error_summary,
        )
        if self.started is not None:
            msg.started.FromMicroseconds(round(self.started * 1e6))
        if self.ended is not None:
            msg.ended.FromMicroseconds(round(self.ended * 1e6))
        if self.wall_seconds is not None:
            m = msg.metrics
            m.wall_seconds = self.wall_seconds
            m.cpu_seconds = self.cpu_seconds
            m.max_rss_bytes = self.max_rss_bytes
            m.exit_code = self.exit_code
            m.bytes_in = self.bytes_in
            m.bytes_out = self.bytes_out
        return msg


class _Error:
    """One task error (by summary): its count and latest failing run."""

    __slots__ = ("count", "error", "latest", "seen", "summary")

    def __init__(self, summary: str, latest: _Run) -> None:
        self.summary = summary
        self.count = 0
        self.latest = latest
        self.error = ""
        # When it was last seen, in TaskActivity's sequence: ranks errors of equal count.
        self.seen = 0

    def to_proto(self) -> ws.TaskErrorExample:
        return ws.TaskErrorExample(
            summary=self.summary, count=self.count, latest=self.latest.to_proto(), error=self.error
        )


class _Window:
    """One workflow's recent activity."""

    __slots__ = ("buckets", "ended", "errors", "running")

    def __init__(self) -> None:
        # In order of arrival: of the start (running), of the end (ended).
        self.running: OrderedDict[RunKey, _Run] = OrderedDict()
        self.ended: OrderedDict[RunKey, _Run] = OrderedDict()
        # Bucket index (end timestamp // BUCKET_SECONDS) -> [succeeded, failed].
        self.buckets: dict[int, list[int]] = {}
        # Least recently seen first.
        self.errors: OrderedDict[str, _Error] = OrderedDict()

    def run(self, key: RunKey) -> _Run | None:
        run = self.running.get(key)
        return run if run is not None else self.ended.get(key)

    def __len__(self) -> int:
        return len(self.running) + len(self.ended)


class ActivitySubscription:
    """One watcher of one workflow's activity: a snapshot, then the changes since the last look.
    ``notify`` is called (synchronously, on the event loop) when there is something new."""

    def __init__(self, owner: TaskActivity, workflow_id: str, notify: Callable[[], None]) -> None:
        self._owner = owner
        self.workflow_id = workflow_id
        self.notify = notify
        # What changed since the last look: run keys (a dict keeps their order, and a key once),
        # bucket indices, error summaries. Kept within the window (see TaskActivity).
        self.runs: dict[RunKey, None] = {}
        self.buckets: set[int] = set()
        self.errors: set[str] = set()

    def pending(self) -> bool:
        """Whether anything changed since the last look."""
        return bool(self.runs or self.buckets or self.errors)

    def snapshot_into(self, msg: ws.WatchWorkflowResponse) -> None:
        """Add the whole window and its bounds to ``msg``; pending changes are dropped (the
        snapshot holds them)."""
        self._clear()
        window = self._owner.window(self.workflow_id)
        msg.activity_window.CopyFrom(self._owner.bounds())
        if window is None:
            return
        self._add_buckets(msg, window, window.buckets)
        self._add_errors(msg, window.errors.values())
        runs = sorted([*window.running.values(), *window.ended.values()], key=_Run.since)
        self._add_runs(msg, runs)

    def changes_into(self, msg: ws.WatchWorkflowResponse) -> bool:
        """Add what changed since the last look to ``msg``; whether there was anything."""
        window = self._owner.window(self.workflow_id)
        runs, buckets, errors = self.runs, self.buckets, self.errors
        self._clear()
        if window is None:
            return False
        n_buckets = self._add_buckets(msg, window, buckets)
        changed = [e for s in errors if (e := window.errors.get(s)) is not None]
        self._add_errors(msg, changed)
        found = [run for key in runs if (run := window.run(key)) is not None]
        found.sort(key=_Run.since)
        n_runs = self._add_runs(msg, found)
        return bool(n_runs or n_buckets or changed)

    def close(self) -> None:
        """Stop watching."""
        self._owner.unsubscribe(self)

    def _clear(self) -> None:
        self.runs = {}
        self.buckets = set()
        self.errors = set()

    def _add_runs(self, msg: ws.WatchWorkflowResponse, runs: list[_Run]) -> int:
        """Add ``runs`` (oldest first) to ``msg``: as many of the newest as keep the whole message
        within max_message_bytes (a message over the server's send limit would end the watch).
        How many it added."""
        room = self._owner.max_message_bytes - msg.ByteSize()
        kept = []
        for run in reversed(runs):
            proto = run.to_proto()
            room -= proto.ByteSize() + _FIELD_OVERHEAD
            if room < 0:
                break
            kept.append(proto)
        kept.reverse()
        msg.task_runs.extend(kept)
        return len(kept)

    def _add_buckets(
        self, msg: ws.WatchWorkflowResponse, window: _Window, indices: Iterable[int]
    ) -> int:
        oldest = self._owner.oldest_bucket()
        n = 0
        for i in sorted(indices):
            counts = window.buckets.get(i)
            if i < oldest or counts is None or not any(counts):
                continue
            bucket = msg.throughput.add(
                seconds=BUCKET_SECONDS, succeeded=counts[0], failed=counts[1]
            )
            bucket.start.FromSeconds(i * BUCKET_SECONDS)
            n += 1
        return n

    @staticmethod
    def _add_errors(msg: ws.WatchWorkflowResponse, errors: Iterable[_Error]) -> None:
        # Most frequent first; among equals the most recently seen.
        ranked = sorted(errors, key=lambda e: (-e.count, -e.seen))
        msg.task_errors.extend(e.to_proto() for e in ranked)


class TaskActivity:
    """Every workflow's recent task activity, from the pilots' lifecycle events (a listener of
    the pilot registry: ``registry.listen(activity.on_pilot_change)``). Runs on the event loop."""

    def __init__(
        self,
        max_task_runs: int = DEFAULT_ACTIVITY_MAX_TASK_RUNS,
        max_workflows: int = DEFAULT_ACTIVITY_MAX_WORKFLOWS,
        clock: Callable[[], float] = time.time,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if max_task_runs < 1 or max_workflows < 1:
            raise ValueError("max_task_runs and max_workflows must be at least 1")
        self.max_task_runs = max_task_runs
        self.max_workflows = max_workflows
        # The most a watch message may take: the runs that do not fit, the oldest, are left out.
        self.max_message_bytes = max_message_bytes
        self._clock = clock
        # Least recently active first.
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._subscribers: dict[str, set[ActivitySubscription]] = {}
        self._seq = 0

    # --- reading ---

    def bounds(self) -> ws.TaskActivityWindow:
        """How the window is bounded, as the snapshot tells watchers."""
        return ws.TaskActivityWindow(
            max_task_runs=self.max_task_runs,
            bucket_seconds=BUCKET_SECONDS,
            max_buckets=MAX_BUCKETS,
            max_task_errors=MAX_TASK_ERRORS,
        )

    def window(self, workflow_id: str) -> _Window | None:
        """The workflow's window, if it has one (do not modify)."""
        return self._windows.get(workflow_id)

    def workflows(self) -> list[str]:
        """Workflows with a window, least recently active first."""
        return list(self._windows)

    def counts(self, workflow_id: str) -> tuple[int, int, int]:
        """How many runs, buckets and errors the workflow's window holds."""
        w = self._windows.get(workflow_id)
        return (len(w), len(w.buckets), len(w.errors)) if w is not None else (0, 0, 0)

    def oldest_bucket(self) -> int:
        """The index of the oldest bucket still in the throughput history."""
        return int(self._clock() // BUCKET_SECONDS) - MAX_BUCKETS + 1

    def subscribe(self, workflow_id: str, notify: Callable[[], None]) -> ActivitySubscription:
        """Follow a workflow's activity (``close()`` the subscription when done)."""
        sub = ActivitySubscription(self, workflow_id, notify)
        self._subscribers.setdefault(workflow_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: ActivitySubscription) -> None:
        group = self._subscribers.get(sub.workflow_id)
        if group is not None:
            group.discard(sub)
            if not group:
                del self._subscribers[sub.workflow_id]

    # --- recording ---

    def on_pilot_change(self, change: PilotChange) -> None:
        """The pilot registry's listener: task lifecycle events only."""
        if change.kind is ChangeKind.TASK_EVENT and change.task_event is not None:
            pilot = change.pilot
            self.record(
                change.workflow_id, pilot.taskforce_uuid, pilot.worker_id, change.task_event
            )

    def record(
        self,
        workflow_id: str,
        taskforce_uuid: str,
        worker_id: str,
        event: pilot_service_pb2.TaskLifecycleEvent,
    ) -> None:
        """Apply one validated task lifecycle event of a worker."""
        now = self._clock()
        at = _stamp(event, now)
        key = (
            sys.intern(taskforce_uuid),
            sys.intern(worker_id),
            event.event_id[:ID_CHARS],
        )
        window = self._window_for(workflow_id)
        subs = self._subscribers.get(workflow_id, ())
        bucket: int | None = None
        summary: str | None = None
        if event.kind == _STARTED:
            window.running.pop(key, None)
            window.ended.pop(key, None)
            window.running[key] = _Run(key, at)
        else:
            run = window.running.pop(key, None)
            if run is None:
                # Its start was not seen (or it ended before): a run of its own, without a start.
                window.ended.pop(key, None)
                run = _Run(key, None)
            failed = event.kind == _FAILED
            outcome = (
                Outcome.TASK_RUN_OUTCOME_FAILED if failed else Outcome.TASK_RUN_OUTCOME_SUCCEEDED
            )
            run.end(at, outcome, event.metrics if event.HasField("metrics") else None)
            window.ended[key] = run
            bucket = self._count(window, at, failed, subs)
            if failed:
                summary = self._error(window, run, event.error, subs)
        self._trim(window, subs)
        # (A run may be dropped at once: an end when the window is full of running runs.)
        kept = window.run(key) is not None
        for sub in subs:
            if kept:
                sub.runs[key] = None
            if bucket is not None:
                sub.buckets.add(bucket)
            if summary is not None:
                sub.errors.add(summary)
            sub.notify()

    def _window_for(self, workflow_id: str) -> _Window:
        window = self._windows.get(workflow_id)
        if window is not None:
            self._windows.move_to_end(workflow_id)
            return window
        window = self._windows[workflow_id] = _Window()
        while len(self._windows) > self.max_workflows:
            dropped, _ = self._windows.popitem(last=False)
            # Its watchers keep what they have; their pending keys named the dropped window.
            for sub in self._subscribers.get(dropped, ()):
                sub._clear()
        return window

    def _count(
        self, window: _Window, at: float, failed: bool, subs: Iterable[ActivitySubscription]
    ) -> int:
        """Count an end in its bucket (dropping buckets older than the history); its index."""
        index = int(at // BUCKET_SECONDS)
        counts = window.buckets.get(index)
        if counts is None:
            counts = window.buckets[index] = [0, 0]
            if len(window.buckets) > MAX_BUCKETS:
                oldest = self.oldest_bucket()
                for i in [i for i in window.buckets if i < oldest]:
                    del window.buckets[i]
                for sub in subs:
                    sub.buckets = {i for i in sub.buckets if i >= oldest}
        counts[1 if failed else 0] += 1
        return index

    def _error(
        self, window: _Window, run: _Run, error: str, subs: Iterable[ActivitySubscription]
    ) -> str:
        """Count a failed run under its error's first line; the summary (shared with the run)."""
        summary = _summary(error)
        found = window.errors.get(summary)
        if found is None:
            found = window.errors[summary] = _Error(summary, run)
            if len(window.errors) > MAX_TASK_ERRORS:
                dropped, _ = window.errors.popitem(last=False)
                for sub in subs:
                    sub.errors.discard(dropped)
        else:
            window.errors.move_to_end(summary)
        self._seq += 1
        found.count += 1
        found.seen = self._seq
        found.latest = run
        found.error = _cut_error(error)
        run.error_summary = found.summary
        return found.summary

    def _trim(self, window: _Window, subs: Iterable[ActivitySubscription]) -> None:
        """Drop runs beyond max_task_runs: the oldest ended first, then the oldest running."""
        while len(window) > self.max_task_runs:
            source = window.ended if window.ended else window.running
            key, _ = source.popitem(last=False)
            for sub in subs:
                sub.runs.pop(key, None)


def _stamp(event: pilot_service_pb2.TaskLifecycleEvent, now: float) -> float:
    ts = event.timestamp
    at = ts.seconds + ts.nanos / 1e9
    if at > now or at < now - MAX_LATENESS_SECONDS:
        return now
    return at


def _summary(error: str) -> str:
    """An error's first line, cut to MAX_SUMMARY_CHARS: the key errors are counted by."""
    line = error.split("\n", 1)[0].rstrip("\r")
    if not line.strip():
        return NO_ERROR_TEXT
    return line if len(line) <= MAX_SUMMARY_CHARS else line[: MAX_SUMMARY_CHARS - 1] + "…"


def _cut_error(error: str) -> str:
    """The error text in at most MAX_ERROR_BYTES of UTF-8: its first line (cut to
    MAX_ERROR_HEAD_BYTES) and as much of the end of the rest as fits."""
    raw = error.encode(errors="backslashreplace")
    if len(raw) <= MAX_ERROR_BYTES:
        return error
    head, _, rest = raw.partition(b"\n")
    head = head[:MAX_ERROR_HEAD_BYTES]
    gap = "\n…\n".encode()
    budget = MAX_ERROR_BYTES - len(head) - len(gap)
    tail = rest[-budget:] if budget > 0 else b""
    return (head + gap + tail).decode(errors="ignore")
