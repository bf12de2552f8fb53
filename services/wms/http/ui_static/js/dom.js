// Building DOM from data. Everything the server sends (ids, stderr, payloads, error messages) is
// untrusted: it only ever becomes text nodes and attribute values, never markup. There is no
// innerHTML anywhere in the dashboard.

/**
 * Create an element. `attrs`: `class` (string), `dataset` (object), `on` (event → handler),
 * `hidden`/`disabled`/... (booleans become properties), anything else an attribute.
 * Children: nodes, or strings and numbers (text), null/undefined/false are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "on")
      for (const [type, fn] of Object.entries(value)) el.addEventListener(type, fn);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replace an element's children. */
export function replaceChildren(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

/** Set text only when it changed (a live page rewrites the same numbers many times a second). */
export function setText(el, text) {
  const value = String(text);
  if (el.textContent !== value) el.textContent = value;
}

export function byId(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing element #${id}`);
  return el;
}

/** Show one of a set of mutually exclusive elements. */
export function showOnly(shown, all) {
  for (const el of all) el.hidden = el !== shown;
}
