// Top task errors (#top-errors), most frequent first: each error's first line and how many task
// runs failed with it, expanding to its latest example: event id, exit code, worker, and the end of
// the task's stderr. Items are updated in place so that an opened one stays open.

import { h, setText } from "./dom.js";
import { absoluteTime, int, parseTime } from "./format.js";
import { taskforceLink } from "./taskforces.js";

export class TopErrors {
  constructor(list, empty) {
    this.list = list;
    this.empty = empty;
    this.items = new Map(); // summary → {li, fields}
  }

  clear() {
    this.items.clear();
    this.list.replaceChildren();
    this.empty.hidden = false;
  }

  /** Render `errors` (sorted, most frequent first); `changed`: the summaries to refresh. */
  update(workflowId, errors, changed, full) {
    const present = new Set(errors.map((e) => e.summary ?? ""));
    for (const [key, item] of this.items) {
      if (!present.has(key)) {
        item.li.remove();
        this.items.delete(key);
      }
    }
    let previous = null;
    for (const error of errors) {
      const key = error.summary ?? "";
      let item = this.items.get(key);
      if (!item) {
        item = this.makeItem(key);
        this.items.set(key, item);
        this.fill(workflowId, item, error);
      } else if (full || changed.has(key)) {
        this.fill(workflowId, item, error);
      }
      const expected = previous ? previous.nextSibling : this.list.firstChild;
      if (item.li !== expected) this.list.insertBefore(item.li, expected);
      previous = item.li;
    }
    this.empty.hidden = errors.length > 0;
  }

  makeItem(summary) {
    const dd = (field, tag = "dd") => h(tag, { dataset: { field } });
    const fields = {
      count: h("span", { class: "count", dataset: { field: "count" } }),
      summary: h("span", { class: "error-summary" }),
      event_id: h("code", { dataset: { field: "event_id" } }),
      exit_code: dd("exit_code"),
      worker: dd("worker"),
      taskforce: h("dd", {}),
      when: h("dd", {}),
      stderr: h("pre", { class: "stderr", tabindex: "0", dataset: { field: "stderr" } }),
    };
    const li = h(
      "li",
      { dataset: { errorSummary: summary } },
      h(
        "details",
        {},
        h("summary", {}, fields.count, h("span", { class: "times" }, " × "), fields.summary),
        h(
          "div",
          { class: "error-example" },
          h(
            "dl",
            { class: "facts" },
            h("div", {}, h("dt", {}, "Latest event"), h("dd", {}, fields.event_id)),
            h("div", {}, h("dt", {}, "Exit code"), fields.exit_code),
            h("div", {}, h("dt", {}, "Worker"), fields.worker),
            h("div", {}, h("dt", {}, "Taskforce"), fields.taskforce),
            h("div", {}, h("dt", {}, "Ended"), fields.when),
          ),
          h("h4", {}, "Error and end of stderr"),
          fields.stderr,
        ),
      ),
    );
    return { li, fields };
  }

  fill(workflowId, item, error) {
    const f = item.fields;
    const latest = error.latest ?? {};
    setText(f.count, String(int(error.count)));
    setText(f.summary, error.summary || "(no error text)");
    setText(f.event_id, latest.event_id ?? "");
    setText(f.exit_code, latest.metrics ? String(int(latest.metrics.exit_code)) : "unknown");
    setText(f.worker, latest.worker_id ?? "");
    const uuid = latest.taskforce_uuid ?? "";
    f.taskforce.replaceChildren(
      uuid ? h("a", { href: taskforceLink(workflowId, uuid) }, uuid) : "",
    );
    f.when.replaceChildren(absoluteTime(parseTime(latest.ended)));
    setText(f.stderr, error.error || error.summary || "");
  }
}
