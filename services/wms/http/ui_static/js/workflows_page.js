// The workflows page (#/): the user's workflows (an admin's: everyone's), newest first, with
// state, owner, age, priority, workers and a progress bar, filtered by state; live through
// WatchWorkflows (GET /v1/workflows:watch, Server-Sent Events).

import { byId, h, setText } from "./dom.js";
import { int, parseTime, relativeTime, setRelativeTime, workflowState } from "./format.js";
import { progressBar } from "./progress.js";
import { watch } from "./sse.js";

export const STATES = [
  "",
  "WORKFLOW_STATE_ACTIVE",
  "WORKFLOW_STATE_ABORTED",
  "WORKFLOW_STATE_FINISHED",
];

export class WorkflowsPage {
  constructor({ setLiveStatus, showError }) {
    this.setLiveStatus = setLiveStatus;
    this.showError = showError;
    this.view = byId("workflows-view");
    this.filter = byId("state-filter");
    this.tbody = byId("workflows-rows");
    this.count = byId("workflows-count");
    this.rows = new Map(); // workflow_id → {tr, cells, progress, created}
    this.summaries = new Map(); // workflow_id → WorkflowSummary
    this.stream = null;
    this.state = "";
    this.filter.addEventListener("change", () => {
      const state = this.filter.value;
      location.hash = state ? `#/?state=${encodeURIComponent(state)}` : "#/";
    });
  }

  /** Show the page for `state` ("" = every state). */
  enter({ state }) {
    const wanted = STATES.includes(state) ? state : "";
    if (this.stream && wanted === this.state) return;
    this.leave();
    this.state = wanted;
    this.filter.value = wanted;
    this.clear();
    setText(this.count, "Loading…");
    const query = wanted ? `?state=${encodeURIComponent(wanted)}` : "";
    this.stream = watch(`/v1/workflows:watch${query}`, {
      onMessage: (message) => this.apply(message),
      onState: (state) => this.setLiveStatus(state),
      onFatal: (error) => {
        this.stream = null; // choosing the page again tries again
        this.showError(error.message);
      },
    });
  }

  leave() {
    this.stream?.close();
    this.stream = null;
  }

  clear() {
    this.rows.clear();
    this.summaries.clear();
    this.tbody.replaceChildren();
  }

  apply(message) {
    if (message.snapshot) this.clear();
    for (const id of message.removed_workflow_ids ?? []) {
      this.summaries.delete(id);
      this.rows.get(id)?.tr.remove();
      this.rows.delete(id);
    }
    for (const summary of message.workflows ?? []) {
      const id = summary.workflow?.workflow_id;
      if (!id) continue;
      this.summaries.set(id, summary);
      this.render(id, summary);
    }
    this.order();
    const n = this.summaries.size;
    setText(
      this.count,
      n === 0 ? "No workflows." : `${n} workflow${n === 1 ? "" : "s"}, newest first.`,
    );
  }

  render(id, summary) {
    let row = this.rows.get(id);
    if (!row) {
      row = this.makeRow(id);
      this.rows.set(id, row);
    }
    const workflow = summary.workflow;
    const progress = summary.progress ?? {};
    const state = workflowState(workflow);
    setText(row.cells.state, state);
    row.cells.state.className = `state state-${state.toLowerCase()}`;
    setText(row.cells.owner, workflow.owner ?? "");
    row.created = parseTime(workflow.timestamp);
    setRelativeTime(row.time, row.created);
    setText(row.cells.priority, String(int(workflow.priority)));
    const tasking = int(progress.workers_tasking);
    const active = int(progress.taskforces_active);
    setText(
      row.cells.workers,
      `${tasking} tasking · ${active} taskforce${active === 1 ? "" : "s"} active`,
    );
    row.progress.update(
      {
        published: int(progress.published),
        done: int(progress.done),
        failed: int(progress.failed),
        deadLettered: int(progress.dead_lettered),
        inFlight: int(progress.in_flight),
      },
      " done",
    );
  }

  makeRow(id) {
    const cell = (field, ...children) => h("td", { dataset: { field } }, ...children);
    const time = relativeTime(null);
    const progress = progressBar();
    const cells = {
      id: h(
        "td",
        { dataset: { field: "workflow_id" } },
        h("a", { href: `#/workflows/${encodeURIComponent(id)}` }, id),
      ),
      state: cell("state"),
      owner: cell("owner"),
      created: cell("created", time),
      priority: h("td", { class: "num", dataset: { field: "priority" } }),
      workers: cell("workers"),
      progress: cell("progress", progress.el),
    };
    const tr = h("tr", { dataset: { workflowId: id } }, Object.values(cells));
    return { tr, cells, time, progress, created: null };
  }

  /** Newest first (the order WatchWorkflows states), by creation time then id. */
  order() {
    const ids = [...this.rows.keys()].sort((a, b) => {
      const ta = this.rows.get(a).created ?? 0;
      const tb = this.rows.get(b).created ?? 0;
      return tb - ta || (a < b ? 1 : a > b ? -1 : 0);
    });
    let previous = null;
    for (const id of ids) {
      const tr = this.rows.get(id).tr;
      const expected = previous ? previous.nextSibling : this.tbody.firstChild;
      if (tr !== expected) this.tbody.insertBefore(tr, expected);
      previous = tr;
    }
  }
}
