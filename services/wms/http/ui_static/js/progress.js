// A progress bar of events: done, dead-lettered and in flight out of published. The bar is a
// picture of the text beside it, which says the same numbers (and is what screen readers read).
// Segments differ by pattern as well as colour (see style.css).

import { h, setText } from "./dom.js";

const SEGMENTS = ["done", "dead-lettered", "in-flight"];

/** `compact`: the text says only "<done> / <published>" (a table row shows the rest in columns). */
export function progressBar({ compact = false } = {}) {
  const segments = Object.fromEntries(
    SEGMENTS.map((name) => [name, h("span", { class: `seg seg-${name}` })]),
  );
  const bar = h("span", { class: "progress", "aria-hidden": "true" }, Object.values(segments));
  const text = h("span", { class: "progress-text" });
  const el = h("span", { class: compact ? "progress-cell compact" : "progress-cell" }, bar, text);
  return {
    el,
    text,
    /** counts: {published, done, deadLettered, inFlight, failed?}; `suffix` follows "<done> / <published>". */
    update(counts, suffix = "") {
      const total = Math.max(
        counts.published,
        counts.done + counts.deadLettered + counts.inFlight,
        1,
      );
      const pct = (n) => `${Math.min(100, (100 * n) / total).toFixed(2)}%`;
      setWidth(segments.done, pct(counts.done));
      setWidth(segments["dead-lettered"], pct(counts.deadLettered));
      setWidth(segments["in-flight"], pct(counts.inFlight));
      const parts = [`${counts.done} / ${counts.published}${suffix}`];
      if (compact) {
        setText(text, parts[0]);
        return;
      }
      if (counts.failed !== undefined) parts.push(`${counts.failed} failed`);
      parts.push(`${counts.deadLettered} dead-lettered`);
      if (counts.inFlight) parts.push(`${counts.inFlight} in flight`);
      setText(text, parts.join(" · "));
    },
  };
}

function setWidth(el, width) {
  if (el.style.width !== width) el.style.width = width;
}
