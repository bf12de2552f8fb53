// The workflow page (#/workflows/{id}, and .../taskforces/{uuid} to point at one taskforce), live
// through WatchWorkflow with include_task_activity. Messages are applied to the model as they
// arrive; the page is redrawn once per animation frame, and only the parts that changed. The clock
// moving (the task stream's and the throughput chart's time axes) redraws once a second.

import { addWorkers, abortWorkflow, finishWorkflow } from "./actions.js";
import { ApiError, listAll, seg } from "./api.js";
import { DurationsChart, ThroughputChart } from "./charts.js";
import { DeadLetters } from "./dead_letters.js";
import { clearResult } from "./dialog.js";
import { byId, setText } from "./dom.js";
import { int, parseTime, setRelativeTime, workflowState } from "./format.js";
import { progressBar } from "./progress.js";
import { QueuesTable } from "./queues.js";
import { watch } from "./sse.js";
import { TaskStream } from "./task_stream.js";
import { TaskforceSection } from "./taskforces.js";
import { TopErrors } from "./top_errors.js";
import { WorkflowModel } from "./workflow_model.js";

const TICK_MS = 1000;
const THROUGHPUT_TICK_MS = 10_000;
const MAX_CLOCK_SKEW_MS = 60_000;

export class WorkflowPage {
  constructor({ setLiveStatus, showError, renderStats }) {
    this.setLiveStatus = setLiveStatus;
    this.showError = showError;
    this.stats = renderStats;
    this.view = byId("workflow-view");
    this.article = byId("workflow");
    this.el = {
      id: byId("workflow-id"),
      state: byId("workflow-state"),
      owner: byId("workflow-owner"),
      created: byId("workflow-created"),
      priority: byId("workflow-priority"),
      taskforces: byId("taskforces"),
      taskforcesEmpty: byId("taskforces-empty"),
      abort: byId("action-abort"),
      finish: byId("action-finish"),
      addWorkers: byId("action-add-workers"),
      inactive: byId("actions-inactive"),
    };
    const progress = progressBar();
    progress.text.id = "workflow-progress";
    byId("workflow-progress-slot").replaceChildren(progress.el);
    this.progress = progress;
    this.queuesTable = new QueuesTable(byId("queues-rows"), {
      onDeadLetters: (queue, button) => this.deadLetters.open(queue, button),
    });
    this.deadLetters = new DeadLetters();
    this.topErrors = new TopErrors(byId("top-errors"), byId("top-errors-empty"));
    this.taskStream = new TaskStream(byId("task-stream"), {
      summary: byId("task-stream-summary"),
      hover: byId("task-stream-hover"),
    });
    this.throughput = new ThroughputChart({
      chart: byId("throughput-chart"),
      summary: byId("throughput-summary"),
    });
    this.durations = new DurationsChart({
      chart: byId("durations-chart"),
      summary: byId("durations-summary"),
      table: byId("durations-percentiles"),
    });
    this.el.abort.addEventListener("click", () => abortWorkflow(this.workflowId));
    this.el.finish.addEventListener("click", () => finishWorkflow(this.workflowId));
    this.el.addWorkers.addEventListener("click", () => addWorkers(this.tasks));
    new ResizeObserver(() => this.requestFrame(false)).observe(byId("task-stream-box"));

    this.workflowId = null;
    this.model = new WorkflowModel();
    this.stream = null;
    this.fetches = null;
    this.queues = new Map();
    this.tasks = [];
    this.tasksKnown = false;
    this.sections = new Map();
    this.ended = false;
    this.frameRequested = false;
    this.pendingApplyMs = 0;
    this.pendingUpdate = false;
    this.pendingSnapshot = false;
    this.lastThroughput = 0;
    this.timer = null;
    this.pendingTaskforce = null;
  }

  /** Show workflow `workflowId`; with `taskforce`, point at that taskforce once it is drawn. */
  enter({ workflowId, taskforce }) {
    this.pendingTaskforce = taskforce || null;
    if (this.stream && workflowId === this.workflowId) {
      this.revealTaskforce();
      return;
    }
    this.leave();
    this.workflowId = workflowId;
    this.reset();
    this.fetches = new AbortController();
    this.loadQueuesAndTasks(this.fetches.signal);
    const path = `/v1/workflows/${seg(workflowId)}/watch?include_task_activity=true`;
    this.stream = watch(path, {
      onMessage: (message) => this.onMessage(message),
      onState: (state) => this.onStreamState(state),
      onFatal: (error) => this.fail(error),
    });
    this.timer = setInterval(() => this.tick(), TICK_MS);
  }

  leave() {
    this.stream?.close();
    this.stream = null;
    this.fetches?.abort();
    this.fetches = null;
    clearInterval(this.timer);
    this.timer = null;
    if (!this.deadLetters.section.hidden) this.deadLetters.close();
  }

  reset() {
    this.model = new WorkflowModel();
    this.queues = new Map();
    this.tasks = [];
    this.tasksKnown = false;
    this.ended = false;
    this.article.hidden = false;
    this.article.dataset.workflowId = this.workflowId;
    setText(this.el.id, this.workflowId);
    for (const key of ["state", "owner", "priority"]) setText(this.el[key], "…");
    this.el.state.className = "state";
    setRelativeTime(this.el.created, null);
    this.progress.update(
      { published: 0, done: 0, failed: 0, deadLettered: 0, inFlight: 0 },
      " done",
    );
    this.queuesTable.clear();
    this.topErrors.clear();
    this.sections.clear();
    this.el.taskforces.replaceChildren();
    this.el.taskforcesEmpty.hidden = false;
    this.setActionsEnabled(false);
    clearResult();
    // The charts are made now, empty, so that making them does not weigh on the first frame.
    this.throughput.update(this.model, this.now());
    this.durations.update(this.model);
    this.requestFrame(false);
  }

  fail(error) {
    this.stream = null; // coming back to this page tries again
    this.article.hidden = true;
    this.showError(error.message);
  }

  async loadQueuesAndTasks(signal) {
    const id = seg(this.workflowId);
    try {
      const [queues, tasks] = await Promise.all([
        listAll(`/v1/workflows/${id}/queues`, "queues", { signal, maxPages: 1 }),
        listAll(`/v1/task-directives?workflow_id=${id}&page_size=1000`, "task_directives", {
          signal,
        }),
      ]);
      this.queues = new Map(queues.map((q) => [q.queue_id, q]));
      this.tasks = tasks;
      this.tasksKnown = true;
      this.model.changed.add("queues");
      this.requestFrame(false);
    } catch (error) {
      if (error?.name === "AbortError" || signal.aborted) return;
      // Without the tasks, the progress counts every queue (see renderProgress).
      this.tasksKnown = true;
      this.model.changed.add("queues");
      this.requestFrame(false);
      // The stream reports a missing workflow itself; anything else is worth saying.
      if (!(error instanceof ApiError && error.httpStatus === 404))
        this.showError(`Could not load the workflow's queues and tasks: ${error.message}`);
    }
  }

  onMessage(message) {
    const started = performance.now();
    if (message.snapshot) this.pendingSnapshot = true;
    this.model.apply(message);
    this.pendingApplyMs += performance.now() - started;
    this.requestFrame(true);
  }

  onStreamState(state) {
    this.setLiveStatus(state);
    if (state === "ended") {
      this.ended = true;
      this.endedAt = this.now();
      clearInterval(this.timer);
      this.timer = null;
      this.requestFrame(false);
    }
  }

  /** The time the charts end at: the browser's clock, moved ahead (by a minute at most) when the
   * runs' times are ahead of it, so that a slow browser clock does not hide the latest runs. */
  now() {
    if (this.ended && this.endedAt) return this.endedAt;
    const clock = Date.now();
    return clock + Math.min(Math.max(this.model.latestSeen - clock, 0), MAX_CLOCK_SKEW_MS);
  }

  tick() {
    if (document.hidden || this.view.hidden) return;
    this.requestFrame(false);
  }

  requestFrame(update) {
    if (update) this.pendingUpdate = true;
    if (this.frameRequested) return;
    this.frameRequested = true;
    requestAnimationFrame(() => this.frame());
  }

  frame() {
    this.frameRequested = false;
    if (this.view.hidden) return;
    const started = performance.now();
    const update = this.pendingUpdate;
    this.pendingUpdate = false;
    const changes = this.model.takeChanges();
    const what = changes.what;
    const full = what.has("snapshot");
    const now = this.now();
    if (what.has("workflow")) this.renderHeader();
    if (what.has("taskforces")) this.renderTaskforces(changes.taskforces, full);
    if (what.has("queues") || what.has("taskforces")) {
      this.queuesTable.update(this.queues, this.model.queueStats);
      this.renderProgress();
    }
    if (what.has("errors"))
      this.topErrors.update(this.workflowId, this.model.sortedErrors(), changes.errors, full);
    if (what.has("throughput") || performance.now() - this.lastThroughput > THROUGHPUT_TICK_MS) {
      this.throughput.update(this.model, now);
      this.lastThroughput = performance.now();
    }
    if (what.has("runs")) this.durations.update(this.model);
    this.taskStream.draw(this.model.runs, now);
    if (update) {
      const ms = this.pendingApplyMs + (performance.now() - started);
      this.pendingApplyMs = 0;
      if (this.pendingSnapshot) {
        // A (re)connection's full snapshot is not an update: timed on its own.
        this.pendingSnapshot = false;
        this.stats.snapshotFrameMs = ms;
      } else {
        this.stats.frames += 1;
        this.stats.lastFrameMs = ms;
        this.stats.maxFrameMs = Math.max(this.stats.maxFrameMs, ms);
      }
    }
    this.revealTaskforce();
  }

  renderHeader() {
    const workflow = this.model.workflow;
    if (!workflow) return;
    const state = workflowState(workflow);
    setText(this.el.state, state);
    this.el.state.className = `state state-${state.toLowerCase()}`;
    setText(this.el.owner, workflow.owner ?? "");
    setRelativeTime(this.el.created, parseTime(workflow.timestamp));
    setText(this.el.priority, String(int(workflow.priority)));
    this.setActionsEnabled(state === "ACTIVE");
    const inactive =
      state === "ACTIVE"
        ? ""
        : `This workflow is ${state.toLowerCase()}: it takes no more actions.`;
    setText(this.el.inactive, inactive);
    this.el.inactive.hidden = !inactive;
    document.title = `${this.workflowId} (${state}) · EWMS`;
  }

  setActionsEnabled(enabled) {
    for (const button of [this.el.abort, this.el.finish, this.el.addWorkers])
      button.disabled = !enabled;
  }

  /** The workflow's progress, summed over its tasks' input queues (as WorkflowProgress is). */
  renderProgress() {
    if (!this.tasksKnown) return; // which queues are inputs is not known yet
    const inputs = new Set(this.tasks.flatMap((t) => t.input_queues ?? []));
    const counted = inputs.size ? inputs : new Set(this.model.queueStats.keys());
    const sum = { published: 0, done: 0, deadLettered: 0, inFlight: 0, failed: 0 };
    for (const id of counted) {
      const stats = this.model.queueStats.get(id) ?? {};
      sum.published += int(stats.published);
      sum.done += int(stats.acked);
      sum.deadLettered += int(stats.dead_lettered);
      sum.inFlight += int(stats.in_flight);
    }
    for (const taskforce of this.model.taskforces.values())
      sum.failed += int(taskforce.counters?.tasks_failed);
    this.progress.update(sum, " done");
  }

  renderTaskforces(changed, full) {
    const taskforces = this.model.taskforces;
    if (full) {
      for (const [uuid, section] of this.sections) {
        if (!taskforces.has(uuid)) {
          section.el.remove();
          this.sections.delete(uuid);
        }
      }
    }
    for (const uuid of full ? taskforces.keys() : changed) {
      const taskforce = taskforces.get(uuid);
      if (!taskforce) continue;
      let section = this.sections.get(uuid);
      if (!section) {
        section = new TaskforceSection(this.workflowId, uuid);
        this.sections.set(uuid, section);
        this.el.taskforces.appendChild(section.el); // created oldest first; the stream keeps order
      }
      section.update(taskforce);
    }
    this.el.taskforcesEmpty.hidden = this.sections.size > 0;
  }

  /** Point at the deep link's taskforce once its section exists. */
  revealTaskforce() {
    const uuid = this.pendingTaskforce;
    if (!uuid || !this.model.snapshotSeen) return;
    const section = this.sections.get(uuid);
    this.pendingTaskforce = null;
    if (section) section.highlight();
    else this.showError(`taskforce ${uuid} is not part of workflow ${this.workflowId}`);
  }
}
