// One workflow as WatchWorkflow (include_task_activity) describes it: the first message is a full
// snapshot, later ones carry only what changed, each item replacing the one with the same key.
// Everything here is bounded: runs, buckets and errors by the server's own window (sent in the
// snapshot's activity_window), taskforces and queues by the workflow.

import { int, parseTime } from "./format.js";

// Used until the snapshot states the server's bounds.
const DEFAULT_MAX_RUNS = 10_000;
const DEFAULT_BUCKET_SECONDS = 10;
const DEFAULT_MAX_BUCKETS = 360;
const DEFAULT_MAX_ERRORS = 100;
// The task stream's horizon; runs older than it are kept (for the durations) until the bound.
export const STREAM_WINDOW_MS = 5 * 60 * 1000;

export const OUTCOME = Object.freeze({ RUNNING: 1, SUCCEEDED: 2, FAILED: 3 });

function outcomeOf(name, ended) {
  switch (name) {
    case "TASK_RUN_OUTCOME_SUCCEEDED":
      return OUTCOME.SUCCEEDED;
    case "TASK_RUN_OUTCOME_FAILED":
      return OUTCOME.FAILED;
    case "TASK_RUN_OUTCOME_RUNNING":
      return OUTCOME.RUNNING;
    default:
      return ended === null ? OUTCOME.RUNNING : OUTCOME.SUCCEEDED;
  }
}

/** A TaskRun as the dashboard uses it: times in epoch ms, metrics flattened. */
export function normalizeRun(run) {
  const started = parseTime(run.started);
  const ended = parseTime(run.ended);
  const metrics = run.metrics ?? {};
  return {
    taskforce: run.taskforce_uuid ?? "",
    worker: run.worker_id ?? "",
    event: run.event_id ?? "",
    started: started ?? ended,
    ended,
    outcome: outcomeOf(run.outcome, ended),
    wall: Number(metrics.wall_seconds ?? 0),
    cpu: Number(metrics.cpu_seconds ?? 0),
    rss: int(metrics.max_rss_bytes),
    exitCode: int(metrics.exit_code),
    hasMetrics: run.metrics !== undefined,
    summary: run.error_summary ?? "",
  };
}

export function runKey(run) {
  return `${run.taskforce}\u0000${run.worker}\u0000${run.event}`;
}

export function workerKey(run) {
  return `${run.taskforce}\u0000${run.worker}`;
}

export class WorkflowModel {
  constructor() {
    this.reset();
  }

  reset() {
    this.workflow = null;
    this.taskforces = new Map(); // taskforce_uuid → Taskforce
    this.queueStats = new Map(); // queue_id → QueueStats
    this.runs = new Map(); // runKey → normalized run
    this.buckets = new Map(); // start ms → {start, seconds, succeeded, failed}
    this.errors = new Map(); // summary → TaskErrorExample
    this.maxRuns = DEFAULT_MAX_RUNS;
    this.bucketSeconds = DEFAULT_BUCKET_SECONDS;
    this.maxBuckets = DEFAULT_MAX_BUCKETS;
    this.maxErrors = DEFAULT_MAX_ERRORS;
    // What changed since the last render: "workflow", "taskforces", "queues", "runs", "throughput",
    // "errors"; plus the keys of the taskforces and errors that did.
    this.changed = new Set();
    this.changedTaskforces = new Set();
    this.changedErrors = new Set();
    this.snapshotSeen = false;
    this.latestSeen = 0; // the latest start or end of a run, epoch ms
  }

  /** Apply one WatchWorkflowResponse. */
  apply(message) {
    if (message.snapshot) {
      this.reset();
      this.snapshotSeen = true;
      this.changed = new Set([
        "snapshot",
        "workflow",
        "taskforces",
        "queues",
        "runs",
        "throughput",
        "errors",
      ]);
    }
    const window = message.activity_window;
    if (window) {
      this.maxRuns = int(window.max_task_runs) || DEFAULT_MAX_RUNS;
      this.bucketSeconds = int(window.bucket_seconds) || DEFAULT_BUCKET_SECONDS;
      this.maxBuckets = int(window.max_buckets) || DEFAULT_MAX_BUCKETS;
      this.maxErrors = int(window.max_task_errors) || DEFAULT_MAX_ERRORS;
    }
    if (message.workflow) {
      this.workflow = message.workflow;
      this.changed.add("workflow");
    }
    for (const taskforce of message.taskforces ?? []) {
      this.taskforces.set(taskforce.taskforce_uuid, taskforce);
      this.changedTaskforces.add(taskforce.taskforce_uuid);
      this.changed.add("taskforces");
    }
    for (const stats of message.queue_stats ?? []) {
      this.queueStats.set(stats.queue_id, stats);
      this.changed.add("queues");
    }
    const runs = message.task_runs ?? [];
    for (const raw of runs) {
      const run = normalizeRun(raw);
      this.runs.set(runKey(run), run);
      const t = run.ended ?? run.started ?? 0;
      if (t > this.latestSeen) this.latestSeen = t;
    }
    if (runs.length) {
      this.changed.add("runs");
      this.pruneRuns();
    }
    const buckets = message.throughput ?? [];
    for (const raw of buckets) {
      const start = parseTime(raw.start);
      if (start === null) continue;
      this.buckets.set(start, {
        start,
        seconds: int(raw.seconds) || this.bucketSeconds,
        succeeded: int(raw.succeeded),
        failed: int(raw.failed),
      });
    }
    if (buckets.length) {
      this.changed.add("throughput");
      this.pruneBuckets();
    }
    for (const error of message.task_errors ?? []) {
      this.errors.set(error.summary ?? "", error);
      this.changedErrors.add(error.summary ?? "");
      this.changed.add("errors");
    }
    if (this.errors.size > this.maxErrors) this.pruneErrors();
  }

  /** Take the record of what changed (for one render). */
  takeChanges() {
    const changes = {
      what: this.changed,
      taskforces: this.changedTaskforces,
      errors: this.changedErrors,
    };
    this.changed = new Set();
    this.changedTaskforces = new Set();
    this.changedErrors = new Set();
    return changes;
  }

  // The server bounds its window; the page keeps no more than it, dropping the runs that ended
  // first (running ones last), as the server does. Pruned in batches so that it stays cheap.
  pruneRuns() {
    const limit = this.maxRuns;
    if (this.runs.size <= limit + Math.max(16, limit / 10)) return;
    const entries = [...this.runs.entries()];
    entries.sort((a, b) => endOrder(a[1]) - endOrder(b[1]));
    for (const [key] of entries.slice(0, entries.length - limit)) this.runs.delete(key);
  }

  pruneBuckets() {
    const horizon = Date.now() - this.bucketSeconds * this.maxBuckets * 1000;
    for (const start of this.buckets.keys()) if (start < horizon) this.buckets.delete(start);
  }

  pruneErrors() {
    const kept = [...this.errors.values()]
      .sort((a, b) => int(b.count) - int(a.count))
      .slice(0, this.maxErrors);
    const keep = new Set(kept.map((e) => e.summary ?? ""));
    for (const key of this.errors.keys()) if (!keep.has(key)) this.errors.delete(key);
  }

  /** The task errors, most frequent first. */
  sortedErrors() {
    return [...this.errors.values()].sort(
      (a, b) => int(b.count) - int(a.count) || String(a.summary).localeCompare(String(b.summary)),
    );
  }
}

function endOrder(run) {
  return run.ended ?? Number.MAX_SAFE_INTEGER;
}
