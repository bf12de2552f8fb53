// The workflow page's actions: abort, finish, add workers. Each is confirmed in #confirm, then
// called on the REST gateway; its result, or the server's message and field violations, is told in
// #action-result. The page itself learns the consequences from its live stream.

import { call, seg } from "./api.js";
import { confirmAction, showError, showResult } from "./dialog.js";
import { h } from "./dom.js";
import { int } from "./format.js";

export async function abortWorkflow(workflowId) {
  const ok = await confirmAction({
    title: "Abort this workflow?",
    body: [
      h(
        "p",
        {},
        "Workflow ",
        h("code", {}, workflowId),
        " will be deactivated as ABORTED and its taskforces stopped.",
      ),
      h("p", {}, "Events still in its queues will not be processed. This cannot be undone."),
    ],
    okLabel: "Abort workflow",
    danger: true,
  });
  if (!ok) return;
  await deactivate(workflowId, "abort", "aborted");
}

export async function finishWorkflow(workflowId) {
  const ok = await confirmAction({
    title: "Finish this workflow?",
    body: [
      h(
        "p",
        {},
        "Workflow ",
        h("code", {}, workflowId),
        " will be deactivated as FINISHED and its taskforces stopped.",
      ),
      h("p", {}, "Do this once every event is done. This cannot be undone."),
    ],
    okLabel: "Finish workflow",
  });
  if (!ok) return;
  await deactivate(workflowId, "finished", "finished");
}

async function deactivate(workflowId, action, done) {
  showResult("busy", `asking the WMS to mark ${workflowId} ${done}…`);
  try {
    const answer = await call("POST", `/v1/workflows/${seg(workflowId)}/actions/${action}`);
    const n = int(answer.n_taskforces);
    showResult(
      "ok",
      `workflow ${workflowId} ${done}; ${n} taskforce${n === 1 ? "" : "s"} stopping.`,
    );
  } catch (error) {
    showError(`could not mark ${workflowId} ${done}`, error);
  }
}

/** `tasks`: the workflow's TaskDirectives. */
export async function addWorkers(tasks) {
  if (!tasks.length) {
    showResult("error", "the workflow's tasks are not known yet; try again in a moment.");
    return;
  }
  const taskSelect = h(
    "select",
    { id: "add-workers-task", name: "task" },
    tasks.map((task) => h("option", { value: task.task_id }, taskLabel(task))),
  );
  const locationSelect = h("select", { id: "add-workers-location", name: "location" });
  const fillLocations = () => {
    const task = tasks.find((t) => t.task_id === taskSelect.value) ?? tasks[0];
    locationSelect.replaceChildren(
      ...(task.cluster_locations ?? []).map((loc) => h("option", { value: loc }, loc)),
    );
  };
  taskSelect.addEventListener("change", fillLocations);
  fillLocations();
  // No client-side limits beyond the input type: the server checks every field and names it.
  const count = h("input", {
    id: "add-workers-n",
    name: "n_workers",
    type: "number",
    inputmode: "numeric",
    value: "1",
    min: "1",
    step: "1",
  });
  const ok = await confirmAction({
    title: "Add workers",
    body: [
      h(
        "p",
        {},
        "A new taskforce of this many workers is launched ahead of the workflow's others.",
      ),
      h("div", { class: "field" }, h("label", { for: "add-workers-task" }, "Task"), taskSelect),
      h(
        "div",
        { class: "field" },
        h("label", { for: "add-workers-location" }, "Cluster location"),
        locationSelect,
      ),
      h(
        "div",
        { class: "field" },
        h("label", { for: "add-workers-n" }, "Number of workers"),
        count,
      ),
    ],
    okLabel: "Add workers",
    focus: taskSelect,
  });
  if (!ok) return;
  const taskId = taskSelect.value;
  const location = locationSelect.value;
  const raw = count.value.trim();
  // Sent as typed (a number when it is one) so that the server's own check names a bad value.
  const nWorkers = /^-?\d+$/.test(raw) ? Number(raw) : raw;
  showResult("busy", `adding workers to ${taskId}…`);
  try {
    const taskforce = await call("POST", `/v1/task-directives/${seg(taskId)}/actions/add-workers`, {
      body: { cluster_location: location, n_workers: nWorkers },
    });
    showResult(
      "ok",
      `taskforce ${taskforce.taskforce_uuid} of ${int(taskforce.n_workers)} worker(s) added at ${taskforce.cluster_location} for ${taskId}.`,
    );
  } catch (error) {
    showError(`could not add workers to ${taskId}`, error);
  }
}

function taskLabel(task) {
  const what = task.task_image || task.task_args || "";
  const short = what.length > 60 ? `${what.slice(0, 57)}…` : what;
  return short ? `${task.task_id} (${short})` : task.task_id;
}
