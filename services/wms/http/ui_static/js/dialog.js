// The one confirmation <dialog> (#confirm) every action goes through, and the role=status region
// (#action-result) where its result or error is told. showModal() gives the dialog its keyboard
// behaviour: focus moves into it and stays there, Escape cancels.

import { byId, h, replaceChildren } from "./dom.js";

let pending = null;
let opener = null;

function elements() {
  return {
    dialog: byId("confirm"),
    form: byId("confirm-form"),
    title: byId("confirm-title"),
    body: byId("confirm-body"),
    ok: byId("confirm-ok"),
    cancel: byId("confirm-cancel"),
  };
}

/** Wire the dialog once, at start. */
export function installDialog() {
  const { dialog, form, cancel } = elements();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    dialog.close("ok");
  });
  cancel.addEventListener("click", () => dialog.close("cancel"));
  dialog.addEventListener("close", () => {
    const resolve = pending;
    pending = null;
    const ok = dialog.returnValue === "ok";
    replaceChildren(byId("confirm-body"));
    // Back to the control that opened the dialog.
    if (opener && opener.isConnected) opener.focus();
    opener = null;
    resolve?.(ok);
  });
}

/**
 * Ask for confirmation. `body`: nodes or text shown under the title; `okLabel`: the OK button's
 * text (say what it does); `focus`: the element to focus first (default: Cancel, so that Enter
 * alone never does something destructive). Resolves true when confirmed.
 */
export function confirmAction({ title, body = [], okLabel = "OK", danger = false, focus = null }) {
  const els = elements();
  if (els.dialog.open) els.dialog.close("cancel");
  opener = document.activeElement;
  els.title.textContent = title;
  replaceChildren(els.body, ...(Array.isArray(body) ? body : [body]));
  els.ok.textContent = okLabel;
  els.ok.classList.toggle("danger", danger);
  els.dialog.returnValue = "";
  return new Promise((resolve) => {
    pending = resolve;
    els.dialog.showModal();
    (focus ?? els.cancel).focus();
  });
}

/** Tell the outcome of an action in #action-result: a message, and an error's field violations. */
export function showResult(kind, message, violations = []) {
  const region = byId("action-result");
  // A single violation is usually in the message already; list only what it does not say.
  const listed = violations.filter((v) => !message.includes(`${v.field}: ${v.description}`));
  region.dataset.kind = kind;
  replaceChildren(
    region,
    h(
      "p",
      {},
      h("strong", {}, kind === "error" ? "Failed: " : kind === "busy" ? "Working: " : "Done: "),
      message,
    ),
    listed.length
      ? h(
          "ul",
          { class: "violations" },
          listed.map((v) => h("li", {}, h("code", {}, v.field || "request"), ": ", v.description)),
        )
      : null,
  );
}

export function clearResult() {
  const region = byId("action-result");
  delete region.dataset.kind;
  region.replaceChildren();
}

/** Report a failed call (ApiError or other) in #action-result. */
export function showError(what, error) {
  showResult("error", `${what}: ${error?.message ?? error}`, error?.violations ?? []);
}
