// The dashboard's entry point: sign-in, hash routing (deep links work and the Back button too),
// the connection status and the page-wide error message.
//   #/                                  workflows (#/?state=WORKFLOW_STATE_ACTIVE filters them)
//   #/workflows/{id}                    one workflow
//   #/workflows/{id}/taskforces/{uuid}  that workflow, scrolled to one of its taskforces

import { call, onUnauthenticated, session } from "./api.js";
import { installDialog } from "./dialog.js";
import { byId, setText, showOnly } from "./dom.js";
import { refreshRelativeTimes } from "./format.js";
import { WorkflowPage } from "./workflow_page.js";
import { WorkflowsPage } from "./workflows_page.js";

// Read by the browser tests: task stream redraws after an update (a message after the snapshot),
// and how long the last and the slowest such frame took (applying the messages plus redrawing), in
// milliseconds; and how long the frame of the last full snapshot took.
const renderStats = { frames: 0, lastFrameMs: 0, maxFrameMs: 0, snapshotFrameMs: 0 };
window.ewmsDashboard = { renderStats };

const LIVE_TEXT = {
  connecting: "connecting",
  live: "live",
  reconnecting: "reconnecting",
  ended: "ended",
  failed: "disconnected",
};

const views = {
  signIn: byId("sign-in-view"),
  workflows: byId("workflows-view"),
  workflow: byId("workflow-view"),
};
const liveStatus = byId("live-status");
const errorBox = byId("error");
const signOut = byId("sign-out");
const nav = byId("main-nav");

function setLiveStatus(state) {
  setText(liveStatus, LIVE_TEXT[state] ?? state);
  liveStatus.dataset.state = state;
  liveStatus.hidden = false;
}

function showError(message) {
  setText(errorBox, message);
  errorBox.hidden = !message;
}

const pages = {
  workflows: new WorkflowsPage({ setLiveStatus, showError }),
  workflow: new WorkflowPage({ setLiveStatus, showError, renderStats }),
};
let current = null;

function leaveCurrent(next) {
  if (current && current !== next) current.leave();
  current = next;
}

function showSignIn(message = "") {
  leaveCurrent(null);
  showOnly(views.signIn, Object.values(views));
  signOut.hidden = true;
  nav.hidden = true;
  liveStatus.hidden = true;
  showError("");
  setText(byId("sign-in-error"), message);
  document.title = "Sign in · EWMS";
  byId("token-input").focus();
}

function route() {
  if (!session.token) {
    showSignIn();
    return;
  }
  signOut.hidden = false;
  nav.hidden = false;
  showError("");
  const hash = location.hash || "#/";
  const workflow = /^#\/workflows\/([^/?#]+)(?:\/taskforces\/([^/?#]+))?\/?$/.exec(hash);
  if (workflow) {
    const workflowId = decode(workflow[1]);
    const taskforce = workflow[2] ? decode(workflow[2]) : null;
    const entering = current !== pages.workflow || pages.workflow.workflowId !== workflowId;
    leaveCurrent(pages.workflow);
    showOnly(views.workflow, Object.values(views));
    if (entering) document.title = `${workflowId} · EWMS`;
    pages.workflow.enter({ workflowId, taskforce });
    if (entering && !taskforce) byId("workflow-heading").focus({ preventScroll: true });
    return;
  }
  const list = /^#\/?(?:\?(.*))?$/.exec(hash);
  if (list) {
    const params = new URLSearchParams(list[1] ?? "");
    const entering = current !== pages.workflows;
    leaveCurrent(pages.workflows);
    showOnly(views.workflows, Object.values(views));
    document.title = "Workflows · EWMS";
    pages.workflows.enter({ state: params.get("state") ?? "" });
    if (entering) byId("workflows-heading").focus({ preventScroll: true });
    return;
  }
  leaveCurrent(null);
  showOnly(null, Object.values(views));
  liveStatus.hidden = true;
  showError(`No such page: ${hash}. The workflows are at #/.`);
}

function decode(part) {
  try {
    return decodeURIComponent(part);
  } catch {
    return part;
  }
}

byId("sign-in").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = byId("token-input");
  const button = byId("sign-in-button");
  const token = input.value.trim();
  const error = byId("sign-in-error");
  if (!token) {
    setText(error, "Paste a token first (ewms token create --role user --subject YOU).");
    input.focus();
    return;
  }
  setText(error, "Checking the token…");
  button.disabled = true;
  session.set(token);
  try {
    // Any call checks the token; this one is cheap.
    await call("GET", "/v1/workflows?page_size=1");
  } catch (failure) {
    session.clear();
    button.disabled = false;
    setText(error, `Sign-in failed: ${failure.message}`);
    input.focus();
    return;
  }
  button.disabled = false;
  input.value = "";
  setText(error, "");
  route();
});

signOut.addEventListener("click", () => {
  session.clear();
  showSignIn("Signed out.");
});

onUnauthenticated((message) => {
  session.clear();
  showSignIn(`Signed out: ${message}`);
});

window.addEventListener("hashchange", route);
// Relative ages ("5 min ago") follow the clock; nothing is fetched.
setInterval(() => {
  if (!document.hidden) refreshRelativeTimes();
}, 15_000);

installDialog();
route();
