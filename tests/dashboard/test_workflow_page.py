"""The workflow page on a real ``ewms up`` running a slow task: it updates live without a reload,
shows a failing task's stderr in the top errors, aborts the workflow from the page until every
taskforce has left, and looks right in a screenshot taken mid-run (issue 15's acceptance)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from tests.dashboard.conftest import (
    FINAL_PHASE_TEXT,
    FINAL_PHASES,
    LIVE_JOB_STATES,
    POISON_EXIT,
    POISON_STDERR,
    VIEWPORT,
    Dashboard,
    EwmsUp,
    done_of_published,
    expect,
    integer,
    png_size,
    start_slow_workflow,
)

# Events of the running workflow: with 2 workers and 1 s per task, well over 10 s of work.
N_EVENTS = 24


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Re-read the page until ``check`` holds (the test's own polling: the page pushes)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def open_workflow(tab: Dashboard, token: str, workflow_id: str) -> None:
    """Sign in and follow the workflow's deep link."""
    tab.open()
    tab.sign_in(token)
    tab.go(f"#/workflows/{workflow_id}")
    expect(tab.locator(f'#workflow[data-workflow-id="{workflow_id}"]')).to_be_visible()


def queue_cell(tab: Dashboard, alias: str, field: str) -> int:
    row = tab.locator("table#queues tr[data-queue-id]").filter(
        has=tab.locator(f'[data-field=alias]:text-is("{alias}")')
    )
    return integer(row.locator(f"[data-field={field}]").inner_text())


def test_ewms_up_prints_the_dashboard_url_which_serves_the_sign_in(
    ewms_up: Callable[..., EwmsUp], dashboard: Callable[[str], Dashboard]
) -> None:
    up = ewms_up(workers=1)

    assert up.dashboard_url == f"{up.http_url}/", up.up_line
    tab = dashboard(up.dashboard_url)
    tab.open()
    expect(tab.locator("form#sign-in")).to_be_visible()
    expect(tab.locator("#token-input")).to_be_visible()


def test_a_running_workflow_updates_without_a_reload_and_shows_a_failing_tasks_stderr(
    ewms_up: Callable[..., EwmsUp], dashboard: Callable[[str], Dashboard]
) -> None:
    up = ewms_up(workers=2)
    alice = up.token("alice")
    workflow_id, event_ids = start_slow_workflow(up, alice, N_EVENTS, poison_at=(2,))
    tab = dashboard(up.dashboard_url or f"{up.http_url}/")

    # Sign in with the token, and open the workflow from the workflows list.
    tab.open()
    tab.sign_in(alice)
    row = tab.locator(f'table#workflows tr[data-workflow-id="{workflow_id}"]')
    expect(row).to_be_visible()
    row.locator("a").first.click()
    expect(tab.locator(f'#workflow[data-workflow-id="{workflow_id}"]')).to_be_visible()
    expect(tab.locator("#workflow-state")).to_have_text("ACTIVE")
    tab.mark()

    # First reading: the snapshot has every event published, not all done.
    progress = tab.locator("#workflow-progress")
    expect(progress).to_contain_text(re.compile(rf"/\s*{N_EVENTS}\s*done"))
    done_before, published = done_of_published(progress.inner_text())
    acked_before = queue_cell(tab, "in", "acked")
    assert published == N_EVENTS
    assert queue_cell(tab, "in", "published") == N_EVENTS
    assert done_before < N_EVENTS, "the workflow was over before the page could watch it run"

    # Later readings are larger: pushed to the page, which has not reloaded.
    wait_until(
        lambda: done_of_published(progress.inner_text())[0] > done_before,
        60,
        f"#workflow-progress to count more than {done_before} done",
    )
    wait_until(
        lambda: queue_cell(tab, "in", "acked") > acked_before,
        30,
        f"the in queue's acked cell to exceed {acked_before}",
    )
    assert tab.marked(), "the page reloaded"
    expect(tab.locator("#live-status")).to_have_text("live")

    # The poison event's failure: its error with a count, and the latest example's details.
    item = tab.locator("#top-errors li[data-error-summary]").first
    expect(item).to_be_visible(timeout=60_000)
    assert integer(item.locator("[data-field=count]").inner_text()) >= 1
    details = item.locator("details")
    details.locator("summary").click()
    expect(details).to_have_attribute("open", "")
    stderr = details.locator("pre[data-field=stderr]")
    expect(stderr).to_be_visible()
    expect(stderr).to_contain_text(POISON_STDERR)
    # The stderr tail itself (a line of its own), not just the error's first line quoting it.
    tail = [line.strip() for line in stderr.inner_text().splitlines()[1:]]
    assert POISON_STDERR in tail, stderr.inner_text()
    assert integer(details.locator("[data-field=exit_code]").inner_text()) == POISON_EXIT
    expect(details.locator("[data-field=event_id]")).to_have_text(event_ids[2])
    assert tab.marked(), "the page reloaded"


def test_abort_from_the_page_ends_every_taskforce(
    ewms_up: Callable[..., EwmsUp], dashboard: Callable[[str], Dashboard]
) -> None:
    up = ewms_up(workers=2)
    alice = up.token("alice")
    workflow_id, _ = start_slow_workflow(up, alice, N_EVENTS)
    tab = dashboard(up.dashboard_url or f"{up.http_url}/")
    open_workflow(tab, alice, workflow_id)
    # Running: a task has been done.
    wait_until(lambda: queue_cell(tab, "in", "acked") >= 1, 60, "a first task to be done")
    sections = tab.locator("#taskforces section[data-taskforce-uuid]")
    expect(sections.first).to_be_visible()

    # Abort, confirmed in the dialog; the result is reported.
    tab.locator("button#action-abort").click()
    dialog = tab.locator("dialog#confirm")
    expect(dialog).to_be_visible()
    tab.locator("button#confirm-ok").click()
    expect(dialog).to_be_hidden()
    expect(tab.locator("#action-result")).to_contain_text(re.compile("abort", re.IGNORECASE))
    expect(tab.locator("#workflow-state")).to_have_text("ABORTED")

    # Every taskforce on the page reaches a final phase.
    uuids = set()
    for i in range(sections.count()):
        section = sections.nth(i)
        uuids.add(section.get_attribute("data-taskforce-uuid"))
        expect(section.locator("[data-field=phase]")).to_have_text(FINAL_PHASE_TEXT)

    # And the API agrees: the same taskforces, all final, with no worker left.
    taskforces = up.taskforces(workflow_id)
    assert {tf["taskforce_uuid"] for tf in taskforces} == uuids
    for tf in taskforces:
        assert tf["phase"] in FINAL_PHASES, tf
        live = [
            s
            for s in tf.get("compound_statuses", [])
            if s.get("job_state") in LIVE_JOB_STATES and int(s.get("count", 0)) > 0
        ]
        assert not live, f"workers left in {tf['taskforce_uuid']}: {live}"
    workflow = up.api("GET", f"/v1/workflows/{workflow_id}", up.admin_token())
    assert workflow["deactivated"] == "DEACTIVATION_ABORTED"


SNAPSHOT_JS = """(workflowId) => ({
  workflow: !!document.querySelector(`#workflow[data-workflow-id="${workflowId}"]`),
  queues: document.querySelectorAll('table#queues tr[data-queue-id]').length,
  taskforces: document.querySelectorAll('#taskforces section[data-taskforce-uuid]').length,
  progress: (document.querySelector('#workflow-progress') || {}).innerText || '',
})"""


def test_a_screenshot_mid_run_shows_the_workflow(
    ewms_up: Callable[..., EwmsUp], dashboard: Callable[[str], Dashboard], tmp_path: Path
) -> None:
    up = ewms_up(workers=2)
    alice = up.token("alice")
    workflow_id, _ = start_slow_workflow(up, alice, N_EVENTS, poison_at=(1,))
    tab = dashboard(up.dashboard_url or f"{up.http_url}/")
    open_workflow(tab, alice, workflow_id)
    canvas = tab.locator("canvas#task-stream")
    expect(canvas).to_be_visible()
    ink_before = tab.canvas_ink()

    # Mid-run: some tasks done, not all; task runs drawn on the stream.
    wait_until(
        lambda: 2 <= done_of_published(tab.text("#workflow-progress"))[0] < N_EVENTS,
        60,
        "two tasks done",
    )
    wait_until(lambda: tab.canvas_ink() > ink_before + 200, 30, "task runs drawn on the stream")

    path = tmp_path / "workflow-page.png"
    before = tab.page.evaluate(SNAPSHOT_JS, workflow_id)
    tab.page.screenshot(path=str(path))
    after = tab.page.evaluate(SNAPSHOT_JS, workflow_id)
    ink = tab.canvas_ink()
    print(f"screenshot of the workflow page mid-run: {path}")

    for shown in (before, after):
        assert shown["workflow"], shown
        assert shown["queues"] == 2, shown  # "in" and "out"
        assert shown["taskforces"] >= 1, shown
        done, published = done_of_published(shown["progress"])
        assert 0 < done < published == N_EVENTS, shown
    assert ink > ink_before + 200
    assert png_size(path) == (VIEWPORT["width"], VIEWPORT["height"])
