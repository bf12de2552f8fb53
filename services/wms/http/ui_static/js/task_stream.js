// The task stream: one row per worker, one bar per task run over the last minutes (x = time),
// drawn on a <canvas>. Outcome is shown by colour AND by shape, so it reads without colour: a
// succeeded run is a solid bar, a failed one is hatched with a dark end mark, a running one is an
// outline left open at its right end (it has not ended). Idle workers show as empty row ends,
// stragglers as long bars, failure bursts as columns of hatched bars.

import { formatNumber, formatSeconds, formatShortClock, naturalCompare } from "./format.js";
import { OUTCOME, STREAM_WINDOW_MS, workerKey } from "./workflow_model.js";

const GUTTER = 150; // px for the row labels
const AXIS = 22; // px for the time axis below the rows
const RIGHT_PAD = 8;
const MAX_PLOT_HEIGHT = 360;
const MAX_ROW_HEIGHT = 18;
const MIN_ROW_HEIGHT = 1.5;
const LABEL_MIN_ROW = 12; // rows at least this tall get their worker's name

function cssColour(name, fallback) {
  const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return value || fallback;
}

export class TaskStream {
  constructor(canvas, { summary, hover }) {
    this.canvas = canvas;
    this.summaryEl = summary;
    this.hoverEl = hover;
    this.ctx = canvas.getContext("2d", { alpha: false });
    this.colours = {
      background: cssColour("--surface", "#ffffff"),
      text: cssColour("--text", "#1d1d1f"),
      muted: cssColour("--muted", "#5f6368"),
      grid: cssColour("--grid", "#e3e5e8"),
      succeeded: cssColour("--succeeded", "#3b73b9"),
      failed: cssColour("--failed", "#c8461b"),
      failedMark: cssColour("--failed-mark", "#5a1a05"),
      running: cssColour("--running-fill", "#e6eef8"),
      runningEdge: cssColour("--running-edge", "#1d3f6e"),
    };
    this.hatch = this.makeHatch();
    this.rows = []; // [{key, taskforce, worker, runs: [...]}] as last drawn
    this.layout = null;
    canvas.addEventListener("mousemove", (e) => this.showHover(e));
    canvas.addEventListener("mouseleave", () => this.hoverEl.replaceChildren());
  }

  makeHatch() {
    const tile = document.createElement("canvas");
    tile.width = 6;
    tile.height = 6;
    const t = tile.getContext("2d");
    t.fillStyle = this.colours.failed;
    t.fillRect(0, 0, 6, 6);
    t.strokeStyle = "rgba(255,255,255,0.85)";
    t.lineWidth = 1.5;
    t.beginPath();
    t.moveTo(-1, 7);
    t.lineTo(7, -1);
    t.moveTo(5, 7);
    t.lineTo(7, 5);
    t.moveTo(-1, 1);
    t.lineTo(1, -1);
    t.stroke();
    return this.ctx.createPattern(tile, "repeat");
  }

  /** Redraw from `runs` (the model's Map) as of `now` (epoch ms). */
  draw(runs, now) {
    const from = now - STREAM_WINDOW_MS;
    const byWorker = new Map();
    let running = 0;
    let succeeded = 0;
    let failed = 0;
    for (const run of runs.values()) {
      const end = run.ended ?? now;
      if (end < from) continue;
      const key = workerKey(run);
      let row = byWorker.get(key);
      if (!row) {
        row = { key, taskforce: run.taskforce, worker: run.worker, runs: [], busy: false };
        byWorker.set(key, row);
      }
      row.runs.push(run);
      if (run.outcome === OUTCOME.RUNNING) {
        running += 1;
        row.busy = true;
      } else if (run.outcome === OUTCOME.FAILED) failed += 1;
      else succeeded += 1;
    }
    const rows = [...byWorker.values()].sort(
      (a, b) => naturalCompare(a.taskforce, b.taskforce) || naturalCompare(a.worker, b.worker),
    );
    this.rows = rows;

    const cssWidth = Math.max(320, this.canvas.parentElement.clientWidth);
    const rowHeight = rows.length
      ? Math.max(MIN_ROW_HEIGHT, Math.min(MAX_ROW_HEIGHT, MAX_PLOT_HEIGHT / rows.length))
      : MAX_ROW_HEIGHT;
    const plotHeight = Math.max(rows.length * rowHeight, 40);
    const cssHeight = Math.ceil(plotHeight + AXIS);
    this.resize(cssWidth, cssHeight);
    const x0 = GUTTER;
    const x1 = cssWidth - RIGHT_PAD;
    const scale = (x1 - x0) / STREAM_WINDOW_MS;
    this.layout = { from, now, x0, x1, scale, rowHeight, plotHeight };

    const ctx = this.ctx;
    const c = this.colours;
    ctx.fillStyle = c.background;
    ctx.fillRect(0, 0, cssWidth, cssHeight);
    this.drawAxis(ctx, from, now, x0, scale, plotHeight);

    const gap = rowHeight >= 6 ? 1 : 0;
    const barHeight = rowHeight - gap;
    const done = new Path2D();
    const bad = new Path2D();
    const marks = new Path2D();
    const open = new Path2D();
    const openFill = new Path2D();
    for (let i = 0; i < rows.length; i += 1) {
      const y = i * rowHeight;
      for (const run of rows[i].runs) {
        const start = Math.max(barStart(run, now), from);
        const end = run.ended ?? now;
        const left = x0 + (start - from) * scale;
        const width = Math.max(1, (Math.min(end, now) - start) * scale);
        if (run.outcome === OUTCOME.RUNNING) {
          const right = x1;
          openFill.rect(left, y, right - left, barHeight);
          // Top, left and bottom edges: open at the right, where the run goes on.
          open.moveTo(right, y + 0.5);
          open.lineTo(left + 0.5, y + 0.5);
          open.lineTo(left + 0.5, y + barHeight - 0.5);
          open.lineTo(right, y + barHeight - 0.5);
        } else if (run.outcome === OUTCOME.FAILED) {
          bad.rect(left, y, width, barHeight);
          marks.rect(left + width - Math.min(2, width), y, Math.min(2, width), barHeight);
        } else {
          done.rect(left, y, width, barHeight);
        }
      }
    }
    ctx.fillStyle = c.succeeded;
    ctx.fill(done);
    ctx.fillStyle = this.hatch ?? c.failed;
    ctx.fill(bad);
    ctx.fillStyle = c.failedMark;
    ctx.fill(marks);
    ctx.fillStyle = c.running;
    ctx.fill(openFill);
    ctx.strokeStyle = c.runningEdge;
    ctx.lineWidth = 1;
    ctx.stroke(open);
    this.drawLabels(ctx, rows, rowHeight);

    const idle = rows.filter((row) => !row.busy).length;
    const text = rows.length
      ? `${rows.length} worker${rows.length === 1 ? "" : "s"} active in the last 5 minutes, ` +
        `${running} task${running === 1 ? "" : "s"} running now, ${idle} worker${idle === 1 ? "" : "s"} idle now; ` +
        `${formatNumber(succeeded)} succeeded and ${formatNumber(failed)} failed in the last 5 minutes.`
      : "No task ran in the last 5 minutes.";
    if (this.summaryEl.textContent !== text) this.summaryEl.textContent = text;
    const label = `Task stream, one row per worker over the last 5 minutes. ${text}`;
    if (this.canvas.getAttribute("aria-label") !== label)
      this.canvas.setAttribute("aria-label", label);
  }

  resize(cssWidth, cssHeight) {
    const dpr = window.devicePixelRatio || 1;
    const width = Math.round(cssWidth * dpr);
    const height = Math.round(cssHeight * dpr);
    if (this.canvas.width !== width || this.canvas.height !== height) {
      this.canvas.width = width;
      this.canvas.height = height;
      this.canvas.style.height = `${cssHeight}px`;
    }
    this.ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  }

  drawAxis(ctx, from, now, x0, scale, plotHeight) {
    const c = this.colours;
    ctx.strokeStyle = c.grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = c.muted;
    ctx.font = "12px system-ui, sans-serif";
    ctx.textBaseline = "top";
    ctx.textAlign = "center";
    const minute = 60_000;
    const grid = new Path2D();
    const right = this.canvas.width / (window.devicePixelRatio || 1) - RIGHT_PAD;
    for (let t = Math.ceil(from / minute) * minute; t <= now; t += minute) {
      const x = Math.round(x0 + (t - from) * scale) + 0.5;
      grid.moveTo(x, 0);
      grid.lineTo(x, plotHeight);
      if (x < right - 70) ctx.fillText(formatShortClock(t), x, plotHeight + 5);
    }
    ctx.stroke(grid);
    ctx.textAlign = "right";
    ctx.fillText("now", right, plotHeight + 5);
  }

  drawLabels(ctx, rows, rowHeight) {
    const c = this.colours;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.font = "12px system-ui, sans-serif";
    const separators = new Path2D();
    let groupStart = 0;
    for (let i = 0; i <= rows.length; i += 1) {
      const boundary = i === rows.length || (i > 0 && rows[i].taskforce !== rows[i - 1].taskforce);
      if (boundary && i > 0) {
        if (rowHeight < LABEL_MIN_ROW) {
          // Rows too thin for names: one label per taskforce, across its rows.
          const height = (i - groupStart) * rowHeight;
          if (height >= 12) {
            ctx.fillStyle = c.muted;
            ctx.fillText(
              `${shortTaskforce(rows[groupStart].taskforce)} (${i - groupStart})`,
              4,
              groupStart * rowHeight + height / 2,
              GUTTER - 8,
            );
          }
        }
        if (i < rows.length) {
          separators.moveTo(0, i * rowHeight + 0.5);
          separators.lineTo(GUTTER - 4, i * rowHeight + 0.5);
        }
        groupStart = i;
      }
      if (i < rows.length && rowHeight >= LABEL_MIN_ROW) {
        ctx.fillStyle = c.text;
        ctx.fillText(rowLabel(rows[i]), 4, i * rowHeight + rowHeight / 2, GUTTER - 8);
      }
    }
    ctx.strokeStyle = c.muted;
    ctx.stroke(separators);
  }

  /** Name the run under the mouse pointer (mouse users; the text summary serves everyone). */
  showHover(e) {
    const layout = this.layout;
    if (!layout) return;
    const rect = this.canvas.getBoundingClientRect();
    const x = e.clientX - rect.left;
    const y = e.clientY - rect.top;
    const row = this.rows[Math.floor(y / layout.rowHeight)];
    if (!row || y > layout.plotHeight) {
      this.hoverEl.replaceChildren();
      return;
    }
    const t = layout.from + (x - layout.x0) / layout.scale;
    const slack = 2 / layout.scale;
    const run = row.runs.find(
      (r) => barStart(r, layout.now) - slack <= t && t <= (r.ended ?? layout.now) + slack,
    );
    let text = `${rowLabel(row)} (${row.taskforce})`;
    if (run) {
      const outcome =
        run.outcome === OUTCOME.RUNNING
          ? "running"
          : run.outcome === OUTCOME.FAILED
            ? "failed"
            : "succeeded";
      const seconds = ((run.ended ?? layout.now) - barStart(run, layout.now)) / 1000;
      text += `: event ${run.event}, ${outcome}${run.ended ? " after" : " for"} ${formatSeconds(seconds)}`;
      if (run.outcome === OUTCOME.FAILED && run.summary) text += `: ${run.summary}`;
    } else if (x >= layout.x0) {
      text += ": idle";
    }
    this.hoverEl.textContent = text;
  }
}

/** Where a run's bar begins: an ended run's bar spans its measured wall time (the pilot's clock for
 * the task itself), so that time spent staged before the task ran does not count as running. */
function barStart(run, now) {
  if (run.ended !== null && run.wall > 0)
    return Math.max(run.started ?? 0, run.ended - run.wall * 1000);
  return run.started ?? now;
}

function rowLabel(row) {
  return row.worker || "(unknown worker)";
}

/** TF-<workflow>-<task>-<hex> → TF-…-<hex>: the part that tells a workflow's taskforces apart. */
export function shortTaskforce(uuid) {
  const parts = uuid.split("-");
  return parts.length > 2 ? `TF-…-${parts[parts.length - 1]}` : uuid;
}
