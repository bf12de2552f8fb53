// A queue's dead letters (#dead-letters): each event's content and last error, and re-driving them
// (all, or one), confirmed in #confirm. Read once when opened, and again on Refresh or after a
// re-drive: the list is not live, the queue's dead-lettered counter above it is.

import { call, seg } from "./api.js";
import { confirmAction, showError, showResult } from "./dialog.js";
import { byId, h, setText } from "./dom.js";
import { absoluteTime, formatNumber, int, parseTime } from "./format.js";

const PAGE_SIZE = 100;
const MAX_SHOWN_CHARS = 8000;

export class DeadLetters {
  constructor() {
    this.section = byId("dead-letters");
    this.title = byId("dead-letters-title");
    this.rows = byId("dead-letters-rows");
    this.status = byId("dead-letters-status");
    this.more = byId("dead-letters-more");
    this.redrive = byId("redrive");
    this.table = byId("dead-letters-table");
    this.queue = null;
    this.opener = null;
    this.nextToken = "";
    this.shown = 0;
    this.generation = 0;
    byId("dead-letters-close").addEventListener("click", () => this.close());
    byId("dead-letters-refresh").addEventListener("click", () => this.load());
    this.more.addEventListener("click", () => this.load(this.nextToken));
    this.redrive.addEventListener("click", () => this.redriveAll());
    this.section.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && !byId("confirm").open) this.close();
    });
  }

  /** Show `queue`'s ({queue_id, alias}) dead letters; `opener` gets the focus back on close. */
  open(queue, opener) {
    this.queue = queue;
    this.opener = opener;
    this.section.hidden = false;
    this.section.dataset.queueId = queue.queue_id;
    setText(this.title, `Dead letters of queue ${queue.alias || queue.queue_id}`);
    this.load();
    this.title.focus();
  }

  close() {
    this.generation += 1;
    this.section.hidden = true;
    this.queue = null;
    this.rows.replaceChildren();
    if (this.opener?.isConnected) this.opener.focus();
    this.opener = null;
  }

  /** Load the first page (pageToken "") or the next one. */
  async load(pageToken = "") {
    const queue = this.queue;
    if (!queue) return;
    const generation = ++this.generation;
    setText(this.status, "Loading…");
    const params = new URLSearchParams({
      payload_format: "PAYLOAD_FORMAT_DECODED",
      page_size: String(PAGE_SIZE),
    });
    if (pageToken) params.set("page_token", pageToken);
    try {
      const answer = await call("GET", `/v1/queues/${seg(queue.queue_id)}/dead-letters?${params}`);
      if (generation !== this.generation) return;
      const letters = answer.dead_letters ?? [];
      if (!pageToken) {
        this.rows.replaceChildren();
        this.shown = 0;
      }
      for (const letter of letters) this.rows.appendChild(this.row(letter));
      this.shown += letters.length;
      this.nextToken = answer.next_page_token ?? "";
      this.more.hidden = !this.nextToken;
      this.redrive.disabled = this.shown === 0;
      this.table.hidden = this.shown === 0;
      setText(
        this.status,
        this.shown === 0
          ? "This queue has no dead letters."
          : `${formatNumber(this.shown)} dead letter${this.shown === 1 ? "" : "s"} shown${this.nextToken ? "; more below" : ""}, oldest first.`,
      );
    } catch (error) {
      if (generation !== this.generation) return;
      setText(this.status, `Could not list the dead letters: ${error.message}`);
    }
  }

  row(letter) {
    const event = letter.event ?? {};
    const eventId = event.event_id ?? "";
    const redrive = h(
      "button",
      { type: "button", class: "small", dataset: { action: "redrive-one" } },
      "Re-drive…",
    );
    redrive.addEventListener("click", () => this.redriveOne(eventId));
    return h(
      "tr",
      { dataset: { eventId } },
      h("td", {}, h("code", { dataset: { field: "event_id" } }, eventId)),
      h("td", { class: "num", dataset: { field: "attempt" } }, String(int(event.attempt))),
      h("td", {}, absoluteTime(parseTime(letter.dead_lettered_ts))),
      h(
        "td",
        {},
        h("div", { class: "muted" }, event.content_type || "no content type"),
        h(
          "pre",
          { class: "clip", tabindex: "0", dataset: { field: "payload" } },
          clipText(contentOf(event)),
        ),
      ),
      h(
        "td",
        {},
        h(
          "pre",
          { class: "clip", tabindex: "0", dataset: { field: "last_error" } },
          clipText(letter.last_error ?? ""),
        ),
      ),
      h("td", {}, redrive),
    );
  }

  async redriveAll() {
    const queue = this.queue;
    if (!queue) return;
    const ok = await confirmAction({
      title: "Re-drive every dead letter?",
      body: h(
        "p",
        {},
        `All dead letters of queue ${queue.alias || queue.queue_id} go back into it, their attempts reset.`,
      ),
      okLabel: "Re-drive all",
    });
    if (ok) await this.send(queue, {}, "all dead letters");
  }

  async redriveOne(eventId) {
    const queue = this.queue;
    if (!queue) return;
    const ok = await confirmAction({
      title: "Re-drive this dead letter?",
      body: h(
        "p",
        {},
        "Event ",
        h("code", {}, eventId),
        ` goes back into queue ${queue.alias || queue.queue_id}, its attempts reset.`,
      ),
      okLabel: "Re-drive",
    });
    if (ok) await this.send(queue, { event_ids: [eventId] }, `event ${eventId}`);
  }

  async send(queue, body, what) {
    showResult("busy", `re-driving ${what}…`);
    try {
      const answer = await call(
        "POST",
        `/v1/queues/${seg(queue.queue_id)}/dead-letters/actions/redrive`,
        { body },
      );
      const n = int(answer.n_redriven);
      showResult(
        "ok",
        `${n} event${n === 1 ? "" : "s"} re-driven into queue ${queue.alias || queue.queue_id}.`,
      );
      if (this.queue === queue) await this.load();
    } catch (error) {
      showError(`could not re-drive ${what}`, error);
    }
  }
}

/** An event's content as text: its JSON value, its text, or (binary) its size and base64. */
export function contentOf(event) {
  if (event.json !== undefined) return JSON.stringify(event.json, null, 2);
  if (typeof event.text === "string") return event.text;
  if (event.payload) {
    const bytes =
      Math.floor((event.payload.length * 3) / 4) - (event.payload.match(/=+$/)?.[0].length ?? 0);
    return `(binary, ${formatNumber(bytes)} bytes, base64)\n${event.payload}`;
  }
  return "(empty)";
}

function clipText(text) {
  if (text.length <= MAX_SHOWN_CHARS) return text;
  return `${text.slice(0, MAX_SHOWN_CHARS)}\n… (${formatNumber(text.length - MAX_SHOWN_CHARS)} more characters)`;
}
