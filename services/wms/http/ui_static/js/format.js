// How values from the API's proto3 JSON are read and shown. Fields at their default are omitted
// by the server, so every reader takes "absent" as the default. 64-bit integers arrive as strings.

import { h } from "./dom.js";

/** An int64/int32 field (string, number or absent) as a number. */
export function int(value) {
  if (value === undefined || value === null || value === "") return 0;
  const n = Number(value);
  return Number.isFinite(n) ? n : 0;
}

/** An RFC 3339 timestamp as epoch milliseconds, or null when absent or unreadable. The server
 * writes nanoseconds; Date parses milliseconds reliably, so the fraction is cut to three digits. */
export function parseTime(value) {
  if (!value) return null;
  let text = String(value);
  // A snapshot carries thousands of timestamps: cut the fraction without a regular expression.
  const dot = text.indexOf(".", 18);
  if (dot !== -1) {
    let end = dot + 1;
    while (end < text.length && text.charCodeAt(end) >= 48 && text.charCodeAt(end) <= 57) end += 1;
    if (end - dot > 4) text = text.slice(0, dot + 4) + text.slice(end);
  }
  const ms = Date.parse(text);
  return Number.isNaN(ms) ? null : ms;
}

// The viewer's locale and time zone (undefined = the browser's).
const absoluteFormat = new Intl.DateTimeFormat(undefined, {
  dateStyle: "medium",
  timeStyle: "long",
});
const clockFormat = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
const shortClockFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });

export function formatAbsolute(ms) {
  return ms === null ? "" : absoluteFormat.format(ms);
}

export function formatClock(ms) {
  return clockFormat.format(ms);
}

export function formatShortClock(ms) {
  return shortClockFormat.format(ms);
}

export function formatNumber(n) {
  return numberFormat.format(n);
}

/** "4 s", "12 min", "3 h 5 min", "2 d 4 h". */
export function formatDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return m % 60 ? `${hours} h ${m % 60} min` : `${hours} h`;
  const days = Math.floor(hours / 24);
  return hours % 24 ? `${days} d ${hours % 24} h` : `${days} d`;
}

/** Seconds with a sensible precision: "40 ms", "1.3 s", "95 s". */
export function formatSeconds(seconds) {
  if (seconds < 1) return `${formatNumber(Math.round(seconds * 1000))} ms`;
  if (seconds < 10) return `${formatNumber(Math.round(seconds * 10) / 10)} s`;
  return `${formatNumber(Math.round(seconds))} s`;
}

export function formatBytes(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = value < 10 && unit > 0 ? 1 : 0;
  return `${value.toFixed(digits)} ${units[unit]}`;
}

/**
 * A <time> showing how long ago `ms` was ("5 min ago"), with the absolute time in the viewer's time
 * zone as its title. Kept current by refreshRelativeTimes.
 */
export function relativeTime(ms) {
  const el = h("time", { "data-relative": "" });
  setRelativeTime(el, ms);
  return el;
}

export function setRelativeTime(el, ms) {
  if (ms === null) {
    el.removeAttribute("datetime");
    el.removeAttribute("title");
    el.dataset.ms = "";
    el.textContent = "—";
    return;
  }
  const iso = new Date(ms).toISOString();
  if (el.getAttribute("datetime") !== iso) {
    el.setAttribute("datetime", iso);
    el.title = formatAbsolute(ms);
    el.dataset.ms = String(ms);
  }
  const text = `${formatDuration((Date.now() - ms) / 1000)} ago`;
  if (el.textContent !== text) el.textContent = text;
}

/** Re-render every relative time on the page (the clock moved; no data is fetched). */
export function refreshRelativeTimes(root = document) {
  for (const el of root.querySelectorAll("time[data-relative]")) {
    if (el.dataset.ms) setRelativeTime(el, Number(el.dataset.ms));
  }
}

/** An absolute <time> in the viewer's time zone. */
export function absoluteTime(ms) {
  if (ms === null) return h("span", {}, "—");
  return h(
    "time",
    { datetime: new Date(ms).toISOString(), title: formatAbsolute(ms) },
    formatAbsolute(ms),
  );
}

/** "WORKFLOW_STATE_ACTIVE" → "ACTIVE"; a Workflow's state from its deactivation. */
export function workflowState(workflow) {
  switch (workflow?.deactivated) {
    case "DEACTIVATION_ABORTED":
      return "ABORTED";
    case "DEACTIVATION_FINISHED":
      return "FINISHED";
    default:
      return "ACTIVE";
  }
}

/** An enum value name without its type prefix, lower-case with hyphens (the original EWMS's
 * phase names: TASKFORCE_PHASE_CONDOR_SUBMIT → condor-submit). */
export function enumLabel(value, prefix) {
  if (!value) return "unspecified";
  return value.replace(prefix, "").toLowerCase().replaceAll("_", "-");
}

/** The nearest-rank percentile `p` (0..100) of a sorted array; null when empty. */
export function percentile(sorted, p) {
  if (!sorted.length) return null;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

/** Natural order of ids with numbers in them ("1.2" before "1.10"). */
export const naturalCompare = new Intl.Collator(undefined, { numeric: true }).compare;
