// The throughput chart and the task durations histogram, drawn with the vendored uPlot (a global
// from vendor/uplot-1.6.32/uPlot.iife.min.js). Each chart has a text summary beside it, also used
// as its ARIA label, so the numbers are there without the picture; series differ by line style as
// well as colour.

import { h, replaceChildren, setText } from "./dom.js";
import { formatBytes, formatNumber, formatSeconds, percentile } from "./format.js";
import { OUTCOME } from "./workflow_model.js";

const HOUR_S = 3600;
const CHART_HEIGHT = 190;

function cssColour(name, fallback) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

function withAlpha(hex, alpha) {
  const m = /^#([0-9a-f]{6})$/i.exec(hex);
  if (!m) return hex;
  const n = Number.parseInt(m[1], 16);
  return `rgba(${n >> 16},${(n >> 8) & 255},${n & 255},${alpha})`;
}

/** A uPlot chart sized to its container, created once the container has a width. */
class SizedChart {
  constructor(container, makeOptions) {
    this.container = container;
    this.makeOptions = makeOptions;
    this.plot = null;
    this.data = null;
    this.observer = new ResizeObserver(() => this.fit());
    this.observer.observe(container);
  }

  width() {
    return Math.floor(this.container.clientWidth);
  }

  setData(data, scaleX) {
    this.data = data;
    this.scaleX = scaleX;
    if (!this.plot) {
      if (this.width() < 50 || typeof window.uPlot !== "function") return;
      this.plot = new window.uPlot(
        this.makeOptions(this.width(), CHART_HEIGHT),
        data,
        this.container,
      );
    } else {
      this.plot.setData(data, scaleX === undefined);
    }
    if (scaleX) this.plot.setScale("x", scaleX);
  }

  fit() {
    const width = this.width();
    if (width < 50) return;
    if (!this.plot && this.data) this.setData(this.data, this.scaleX);
    else if (this.plot && Math.abs(this.plot.width - width) > 1)
      this.plot.setSize({ width, height: CHART_HEIGHT });
  }

  destroy() {
    this.observer.disconnect();
    this.plot?.destroy();
    this.plot = null;
  }
}

export class ThroughputChart {
  constructor({ chart, summary }) {
    this.summaryEl = summary;
    this.chartEl = chart;
    const succeeded = cssColour("--succeeded", "#3b73b9");
    const failed = cssColour("--failed", "#c8461b");
    const stepped = window.uPlot?.paths?.stepped?.({ align: 1 });
    this.chart = new SizedChart(chart, (width, height) => ({
      width,
      height,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (_u, _min, max) => [0, Math.max(max, 0.1)] } },
      axes: [{}, { label: "tasks/s", size: 56 }],
      series: [
        {},
        {
          label: "succeeded/s",
          stroke: succeeded,
          fill: withAlpha(succeeded, 0.18),
          width: 2,
          paths: stepped,
          points: { show: false },
        },
        {
          label: "failed/s",
          stroke: failed,
          width: 2,
          dash: [6, 4],
          paths: stepped,
          points: { show: false },
        },
      ],
    }));
  }

  /** Redraw from the model's buckets as of `now` (epoch ms). */
  update(model, now) {
    const step = model.bucketSeconds;
    const nowS = now / 1000;
    const last = Math.floor(nowS / step) * step;
    const first = last - Math.ceil(HOUR_S / step) * step + step;
    const n = Math.round((last - first) / step) + 1;
    const xs = new Array(n);
    const ok = new Array(n).fill(0);
    const bad = new Array(n).fill(0);
    for (let i = 0; i < n; i += 1) xs[i] = first + i * step;
    let totalOk = 0;
    let totalBad = 0;
    let peak = 0;
    const counts = new Array(n).fill(null);
    for (const bucket of model.buckets.values()) {
      const startS = bucket.start / 1000;
      const i = Math.floor((startS - first) / step);
      if (i < 0 || i >= n) continue;
      counts[i] = counts[i] ?? [0, 0, 0];
      counts[i][0] += bucket.succeeded;
      counts[i][1] += bucket.failed;
      counts[i][2] = Math.max(counts[i][2], bucket.seconds || step);
      totalOk += bucket.succeeded;
      totalBad += bucket.failed;
    }
    for (let i = 0; i < n; i += 1) {
      if (!counts[i]) continue;
      // The current bucket is still filling: its rate is over the seconds it has had so far.
      const seconds = Math.max(1, Math.min(counts[i][2], nowS - xs[i]));
      ok[i] = counts[i][0] / seconds;
      bad[i] = counts[i][1] / seconds;
      peak = Math.max(peak, ok[i] + bad[i]);
    }
    const minute = Math.max(1, Math.round(60 / step));
    const recent = (arr) => arr.slice(-minute).reduce((a, b) => a + b, 0) / minute;
    const text =
      totalOk + totalBad === 0
        ? "No task ended in the last hour."
        : `Last minute: ${formatNumber(recent(ok))} succeeded/s, ${formatNumber(recent(bad))} failed/s. ` +
          `Last hour: ${formatNumber(totalOk)} succeeded, ${formatNumber(totalBad)} failed, peak ${formatNumber(peak)} tasks/s.`;
    setText(this.summaryEl, text);
    this.chartEl.setAttribute(
      "aria-label",
      `Throughput chart, tasks per second over the last hour. ${text}`,
    );
    this.chart.setData([xs, ok, bad], { min: last - HOUR_S + step, max: nowS });
  }

  destroy() {
    this.chart.destroy();
  }
}

const BINS = 20;

export class DurationsChart {
  constructor({ chart, summary, table }) {
    this.chartEl = chart;
    this.summaryEl = summary;
    this.tableEl = table;
    const colour = cssColour("--succeeded", "#3b73b9");
    const bars = window.uPlot?.paths?.bars?.({ size: [0.9, 80], align: 0 });
    this.chart = new SizedChart(chart, (width, height) => ({
      width,
      height,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: false }, y: { range: (_u, _min, max) => [0, Math.max(max, 1)] } },
      axes: [
        { label: "wall time (s)", values: (_u, ticks) => ticks.map((t) => formatNumber(t)) },
        { label: "task runs", size: 50 },
      ],
      series: [
        {},
        {
          label: "runs",
          fill: withAlpha(colour, 0.75),
          stroke: colour,
          width: 1,
          paths: bars,
          points: { show: false },
        },
      ],
    }));
  }

  /** Redraw from the ended runs of the model that carry metrics. */
  update(model) {
    const wall = [];
    const cpu = [];
    const rss = [];
    for (const run of model.runs.values()) {
      if (run.outcome === OUTCOME.RUNNING || !run.hasMetrics) continue;
      wall.push(run.wall);
      cpu.push(run.cpu);
      rss.push(run.rss);
    }
    const numeric = (a, b) => a - b;
    wall.sort(numeric);
    cpu.sort(numeric);
    rss.sort(numeric);
    const max = wall.length ? wall[wall.length - 1] : 0;
    const width = niceWidth(max / BINS);
    const n = Math.max(1, Math.min(BINS, Math.ceil(max / width) || 1));
    const xs = [];
    const counts = new Array(n).fill(0);
    for (let i = 0; i < n; i += 1) xs.push((i + 0.5) * width);
    for (const w of wall) counts[Math.min(n - 1, Math.floor(w / width))] += 1;
    const heights = counts.map((count) => count || null); // an empty bin draws nothing

    const rows = [
      ["Wall time", wall, formatSeconds],
      ["CPU time", cpu, formatSeconds],
      ["Peak RSS", rss, formatBytes],
    ];
    replaceChildren(
      this.tableEl,
      h(
        "caption",
        {},
        `Percentiles of ${formatNumber(wall.length)} ended task run${wall.length === 1 ? "" : "s"}`,
      ),
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", { scope: "col" }, "Measure"),
          ...["p50", "p90", "p99"].map((p) => h("th", { scope: "col" }, p)),
        ),
      ),
      h(
        "tbody",
        {},
        rows.map(([name, values, fmt]) =>
          h(
            "tr",
            { dataset: { measure: name } },
            h("th", { scope: "row" }, name),
            [50, 90, 99].map((p) => {
              const v = percentile(values, p);
              return h("td", { dataset: { percentile: `p${p}` } }, v === null ? "—" : fmt(v));
            }),
          ),
        ),
      ),
    );
    const text = wall.length
      ? `${formatNumber(wall.length)} ended task runs; wall time p50 ${formatSeconds(percentile(wall, 50))}, ` +
        `p90 ${formatSeconds(percentile(wall, 90))}, p99 ${formatSeconds(percentile(wall, 99))}, longest ${formatSeconds(max)}.`
      : "No ended task run with metrics yet.";
    setText(this.summaryEl, text);
    this.chartEl.setAttribute("aria-label", `Histogram of task wall times. ${text}`);
    this.chart.setData([xs, heights], { min: 0, max: n * width });
  }

  destroy() {
    this.chart.destroy();
  }
}

/** A bin width of 1, 2 or 5 × a power of ten, at least `raw`. */
function niceWidth(raw) {
  if (!(raw > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) if (m * power >= raw) return m * power;
  return 10 * power;
}
