// The workflow's queues (table#queues): alias, the live counters of QueueStats as plain integers,
// a progress bar (acked, dead-lettered and in flight out of published), and a button that opens
// the queue's dead letters.

import { h, setText } from "./dom.js";
import { int } from "./format.js";
import { progressBar } from "./progress.js";

const COUNTERS = ["ready", "in_flight", "acked", "dead_lettered", "published"];

export class QueuesTable {
  constructor(tbody, { onDeadLetters }) {
    this.tbody = tbody;
    this.onDeadLetters = onDeadLetters;
    this.rows = new Map(); // queue_id → {tr, cells, progress, button}
  }

  clear() {
    this.rows.clear();
    this.tbody.replaceChildren();
  }

  /** `queues`: Map queue_id → Queue (aliases; may be empty before ListQueues answers);
   * `stats`: Map queue_id → QueueStats. */
  update(queues, stats) {
    const ids = [...queues.keys(), ...[...stats.keys()].filter((id) => !queues.has(id))];
    let previous = null;
    for (const id of ids) {
      let row = this.rows.get(id);
      if (!row) {
        row = this.makeRow(id);
        this.rows.set(id, row);
      }
      this.fill(row, queues.get(id), stats.get(id) ?? {});
      const expected = previous ? previous.nextSibling : this.tbody.firstChild;
      if (row.tr !== expected) this.tbody.insertBefore(row.tr, expected);
      previous = row.tr;
    }
    for (const [id, row] of this.rows) {
      if (!queues.has(id) && !stats.has(id)) {
        row.tr.remove();
        this.rows.delete(id);
      }
    }
  }

  makeRow(id) {
    const cells = { alias: h("th", { scope: "row", dataset: { field: "alias" } }) };
    for (const name of COUNTERS) cells[name] = h("td", { class: "num", dataset: { field: name } });
    const progress = progressBar({ compact: true });
    cells.progress = h("td", { dataset: { field: "progress" } }, progress.el);
    const button = h(
      "button",
      { type: "button", class: "small", dataset: { action: "dead-letters" } },
      "Dead letters",
    );
    button.addEventListener("click", () => this.onDeadLetters(this.rows.get(id).queue, button));
    cells.actions = h("td", {}, button);
    const tr = h("tr", { dataset: { queueId: id } }, Object.values(cells));
    return { tr, cells, progress, button, queue: { queue_id: id, alias: "" } };
  }

  fill(row, queue, stats) {
    row.queue = { queue_id: row.queue.queue_id, alias: queue?.alias ?? "" };
    const alias = queue?.alias ?? row.queue.queue_id;
    setText(row.cells.alias, alias);
    row.cells.alias.title = row.queue.queue_id + (queue?.public ? " (public)" : "");
    row.cells.alias.classList.toggle("public", Boolean(queue?.public));
    for (const name of COUNTERS) setText(row.cells[name], String(int(stats[name])));
    row.progress.update(
      {
        published: int(stats.published),
        done: int(stats.acked),
        deadLettered: int(stats.dead_lettered),
        inFlight: int(stats.in_flight),
      },
      " acked",
    );
    row.button.setAttribute(
      "aria-label",
      `Dead letters of queue ${alias} (${int(stats.dead_lettered)})`,
    );
  }
}
