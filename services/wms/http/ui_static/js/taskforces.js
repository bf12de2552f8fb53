// One section per taskforce (#taskforces): location, phase and its log, HTCondor cluster id,
// counters, and its workers by compound status (job state × pilot phase) as a stacked bar whose
// legend states every count as text. Sections are updated in place, so an open phase log stays
// open while the taskforce changes.

import { h, replaceChildren, setText } from "./dom.js";
import {
  absoluteTime,
  enumLabel,
  int,
  parseTime,
  relativeTime,
  setRelativeTime,
} from "./format.js";

// Pilot phases in lifecycle order: the order of the bar's segments and of its legend.
const PILOT_PHASES = [
  "PILOT_PHASE_UNSPECIFIED",
  "PILOT_PHASE_STARTED",
  "PILOT_PHASE_RUNNING_INIT",
  "PILOT_PHASE_AWAITING_FIRST_EVENT",
  "PILOT_PHASE_TASKING",
  "PILOT_PHASE_DRAINING",
  "PILOT_PHASE_DONE",
  "PILOT_PHASE_FATAL_ERROR",
  "PILOT_PHASE_LOST",
];
const JOB_STATES = [
  "JOB_STATE_UNSPECIFIED",
  "JOB_STATE_IDLE",
  "JOB_STATE_RUNNING",
  "JOB_STATE_TRANSFERRING_OUTPUT",
  "JOB_STATE_SUSPENDED",
  "JOB_STATE_HELD",
  "JOB_STATE_COMPLETED",
  "JOB_STATE_REMOVED",
];
const TERMINAL_PHASES = new Set(["TASKFORCE_PHASE_CONDOR_COMPLETE", "TASKFORCE_PHASE_CANCELLED"]);

export function phaseLabel(phase) {
  return enumLabel(phase, "TASKFORCE_PHASE_");
}

export function isTerminal(taskforce) {
  return TERMINAL_PHASES.has(taskforce.phase);
}

export function taskforceLink(workflowId, uuid) {
  return `#/workflows/${encodeURIComponent(workflowId)}/taskforces/${encodeURIComponent(uuid)}`;
}

/** Workers grouped by (job state, pilot phase), in lifecycle order, with what sets them apart. */
export function compoundGroups(statuses) {
  const groups = new Map();
  for (const status of statuses ?? []) {
    const job = status.job_state || "JOB_STATE_UNSPECIFIED";
    const pilot = status.pilot_phase || "PILOT_PHASE_UNSPECIFIED";
    const key = `${job.replace("JOB_STATE_", "")}/${pilot.replace("PILOT_PHASE_", "")}`;
    let group = groups.get(key);
    if (!group) {
      group = { key, job, pilot, count: 0, notes: new Set() };
      groups.set(key, group);
    }
    group.count += int(status.count);
    if (status.hold_reason) group.notes.add(`held: ${status.hold_reason}`);
    const exit = status.job_exit;
    if (exit)
      group.notes.add(
        int(exit.signal) ? `signal ${int(exit.signal)}` : `exit code ${int(exit.exit_code)}`,
      );
  }
  return [...groups.values()]
    .filter((g) => g.count > 0)
    .sort(
      (a, b) =>
        PILOT_PHASES.indexOf(a.pilot) - PILOT_PHASES.indexOf(b.pilot) ||
        JOB_STATES.indexOf(a.job) - JOB_STATES.indexOf(b.job),
    );
}

function groupLabel(group) {
  const job =
    group.job === "JOB_STATE_UNSPECIFIED" ? "job not reported" : enumLabel(group.job, "JOB_STATE_");
  const pilot =
    group.pilot === "PILOT_PHASE_UNSPECIFIED"
      ? "no pilot yet"
      : enumLabel(group.pilot, "PILOT_PHASE_");
  return `${job} × ${pilot}`;
}

function segmentClass(group) {
  return `seg pilot-${enumLabel(group.pilot, "PILOT_PHASE_")} job-${enumLabel(group.job, "JOB_STATE_")}`;
}

export class TaskforceSection {
  constructor(workflowId, uuid) {
    this.uuid = uuid;
    const field = (name) => h("dd", { dataset: { field: name } });
    this.fields = {
      location: field("location"),
      phase: field("phase"),
      cluster_id: field("cluster_id"),
      n_workers: field("n_workers"),
      task_id: field("task_id"),
      counters: field("counters"),
    };
    this.created = relativeTime(null);
    this.bar = h("div", { class: "compound-bar", "aria-hidden": "true" });
    this.legend = h("ul", {
      class: "compound-legend",
      "aria-label": "Workers by job state × pilot phase",
    });
    this.errors = h("ul", { class: "worker-errors" });
    this.errorsBlock = h(
      "div",
      { class: "worker-errors-block", hidden: true },
      h("h4", {}, "Workers' last task errors"),
      this.errors,
    );
    this.logCount = h("span");
    this.logBody = h("tbody");
    const titleId = `taskforce-title-${uuid}`;
    this.el = h(
      "section",
      {
        class: "taskforce",
        id: `taskforce-${uuid}`,
        tabindex: "-1",
        "aria-labelledby": titleId,
        dataset: { taskforceUuid: uuid },
      },
      h(
        "h3",
        { id: titleId },
        h("a", { href: taskforceLink(workflowId, uuid), title: "Link to this taskforce" }, uuid),
      ),
      h(
        "dl",
        { class: "facts" },
        h("div", {}, h("dt", {}, "Location"), this.fields.location),
        h("div", {}, h("dt", {}, "Phase"), this.fields.phase),
        h("div", {}, h("dt", {}, "HTCondor cluster"), this.fields.cluster_id),
        h("div", {}, h("dt", {}, "Workers asked"), this.fields.n_workers),
        h("div", {}, h("dt", {}, "Task"), this.fields.task_id),
        h("div", {}, h("dt", {}, "Created"), h("dd", {}, this.created)),
        h("div", { class: "wide" }, h("dt", {}, "Tasks"), this.fields.counters),
      ),
      h("div", { class: "compound" }, h("h4", {}, "Workers by status"), this.bar, this.legend),
      this.errorsBlock,
      h(
        "details",
        { class: "phase-log" },
        h("summary", {}, "Phase log ", this.logCount),
        h(
          "table",
          {},
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["Target phase", "When", "Changed", "By", "Context"].map((t) =>
                h("th", { scope: "col" }, t),
              ),
            ),
          ),
          this.logBody,
        ),
      ),
    );
  }

  update(taskforce) {
    const f = this.fields;
    setText(f.location, taskforce.cluster_location ?? "");
    setText(f.phase, phaseLabel(taskforce.phase));
    f.phase.className = `phase phase-${phaseLabel(taskforce.phase)}`;
    f.phase.title = taskforce.phase ?? "";
    const clusterId = int(taskforce.cluster_id);
    setText(f.cluster_id, clusterId ? String(clusterId) : "not submitted");
    setText(f.n_workers, String(int(taskforce.n_workers)));
    setText(f.task_id, taskforce.task_id ?? "");
    const c = taskforce.counters ?? {};
    setText(
      f.counters,
      `${int(c.events_received)} received · ${int(c.tasks_succeeded)} succeeded · ${int(c.tasks_failed)} failed · ${int(c.events_published)} published`,
    );
    setRelativeTime(this.created, parseTime(taskforce.timestamp));
    this.el.classList.toggle("ended", isTerminal(taskforce));
    this.renderCompound(taskforce);
    this.renderErrors(taskforce.top_task_errors ?? {});
    this.renderLog(taskforce.phase_change_log ?? []);
  }

  renderCompound(taskforce) {
    const groups = compoundGroups(taskforce.compound_statuses);
    const total = groups.reduce((sum, g) => sum + g.count, 0);
    replaceChildren(
      this.bar,
      groups.map((g) => {
        const seg = h("span", { class: segmentClass(g), title: `${groupLabel(g)}: ${g.count}` });
        seg.style.flexGrow = String(g.count);
        return seg;
      }),
    );
    this.bar.classList.toggle("empty", total === 0);
    replaceChildren(
      this.legend,
      groups.length
        ? groups.map((g) =>
            h(
              "li",
              { dataset: { compound: g.key, count: String(g.count) } },
              h("span", { class: `swatch ${segmentClass(g)}`, "aria-hidden": "true" }),
              `${groupLabel(g)}: `,
              h("strong", {}, String(g.count)),
              g.notes.size ? ` (${[...g.notes].join("; ")})` : "",
            ),
          )
        : h("li", { class: "muted" }, "No worker reported yet."),
    );
  }

  renderErrors(topErrors) {
    const entries = Object.entries(topErrors).sort((a, b) => int(b[1]) - int(a[1]));
    this.errorsBlock.hidden = entries.length === 0;
    replaceChildren(
      this.errors,
      entries.map(([error, workers]) =>
        h(
          "li",
          {},
          h("strong", {}, String(int(workers))),
          ` worker${int(workers) === 1 ? "" : "s"}: `,
          h("code", {}, error),
        ),
      ),
    );
  }

  renderLog(log) {
    setText(this.logCount, `(${log.length} change${log.length === 1 ? "" : "s"})`);
    if (this.logBody.childElementCount === log.length) return; // the log only grows
    replaceChildren(
      this.logBody,
      log.map((change) =>
        h(
          "tr",
          {},
          h("td", {}, phaseLabel(change.target_phase)),
          h("td", {}, absoluteTime(parseTime(change.timestamp))),
          h("td", {}, change.was_successful ? "yes" : "no (failed)"),
          h("td", {}, change.source_entity ?? ""),
          h("td", {}, change.context ?? ""),
        ),
      ),
    );
  }

  /** Scroll to this section, mark it, and move the focus to it (a deep link's target). */
  highlight() {
    for (const other of document.querySelectorAll("section.taskforce.highlight"))
      other.classList.remove("highlight");
    this.el.classList.add("highlight");
    this.el.scrollIntoView({ block: "start" });
    this.el.focus({ preventScroll: true });
  }
}
