"""The dashboard without a mouse (issue 15: "works without a mouse; states are not colour-only"):
sign-in, the state filter, a workflow link and an action dialog with Tab, Enter, arrows and
Escape alone; failures and states are told in text."""

from __future__ import annotations

import re
from collections.abc import Callable

from tests.dashboard.conftest import (
    Dashboard,
    EwmsUp,
    expect,
    slow_workflow,
    start_slow_workflow,
)

MAX_TABS = 80
FAILED_TEXT = re.compile(r"\b[1-9]\d*\s+failed|failed\W{0,3}[1-9]", re.IGNORECASE)


def focused(tab: Dashboard, selector: str) -> bool:
    return bool(
        tab.page.evaluate(
            "(sel) => !!document.activeElement && document.activeElement.matches(sel)", selector
        )
    )


def tab_to(tab: Dashboard, selector: str) -> None:
    """Press Tab until the element ``selector`` has the focus."""
    seen = []
    for _ in range(MAX_TABS):
        if focused(tab, selector):
            return
        tab.page.keyboard.press("Tab")
        seen.append(
            tab.page.evaluate(
                "() => { const e = document.activeElement; return e ? "
                "e.tagName + (e.id ? '#' + e.id : '') : 'none'; }"
            )
        )
    trail = " > ".join(seen[:24])
    raise AssertionError(f"{MAX_TABS} Tabs never reached {selector}; focus went {trail} ...")


def choose(tab: Dashboard, select: str, value: str) -> None:
    """Pick an option of the focused ``select`` with the arrow keys."""
    for key in ("ArrowDown", "ArrowUp"):
        for _ in range(8):
            if tab.page.locator(select).input_value() == value:
                return
            tab.page.keyboard.press(key)
    raise AssertionError(f"the arrow keys never selected {value} in {select}")


def test_sign_in_filter_link_and_dialog_work_by_keyboard_with_states_in_text(
    ewms_up: Callable[..., EwmsUp], dashboard: Callable[[str], Dashboard]
) -> None:
    up = ewms_up(workers=1)
    alice = up.token("alice")
    # Active, with a failing task (the first event); and an aborted one.
    active, _ = start_slow_workflow(up, alice, 4, poison_at=(0,), n_workers=1, sleep=0.2)
    aborted = up.create_workflow(alice, slow_workflow(n_workers=1))["workflow"]["workflow_id"]
    up.api("POST", f"/v1/workflows/{aborted}/actions/abort", alice, {})
    tab = dashboard(up.dashboard_url or f"{up.http_url}/")
    page = tab.page
    tab.open()

    # Sign in: Tab to the token field, type, Enter.
    tab_to(tab, "#token-input")
    page.keyboard.type(alice)
    page.keyboard.press("Enter")
    expect(tab.locator("#sign-out")).to_be_visible()
    active_row = tab.locator(f'table#workflows tr[data-workflow-id="{active}"]')
    aborted_row = tab.locator(f'table#workflows tr[data-workflow-id="{aborted}"]')
    expect(active_row).to_be_visible()
    expect(aborted_row).to_be_visible()

    # States in text; a failed task counted in text in the progress cell.
    expect(active_row.locator("[data-field=state]")).to_have_text("ACTIVE")
    expect(aborted_row.locator("[data-field=state]")).to_have_text("ABORTED")
    expect(active_row.locator("[data-field=progress]")).to_contain_text(FAILED_TEXT)

    # The state filter, by keyboard.
    tab_to(tab, "select#state-filter")
    choose(tab, "select#state-filter", "WORKFLOW_STATE_ABORTED")
    expect(aborted_row).to_be_visible()
    expect(active_row).to_have_count(0)
    choose(tab, "select#state-filter", "WORKFLOW_STATE_ACTIVE")
    expect(active_row).to_be_visible()
    expect(aborted_row).to_have_count(0)

    # The workflow's link, by keyboard.
    tab_to(tab, f'table#workflows tr[data-workflow-id="{active}"] a')
    page.keyboard.press("Enter")
    expect(tab.locator(f'#workflow[data-workflow-id="{active}"]')).to_be_visible()
    expect(tab.locator("#workflow-state")).to_have_text("ACTIVE")
    expect(tab.locator("#workflow-progress")).to_contain_text(FAILED_TEXT)

    # An action's dialog: Enter opens it, Escape closes it with nothing done (no request sent).
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    dialog = tab.locator("dialog#confirm")
    tab_to(tab, "button#action-finish")
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    page.wait_for_timeout(500)  # what an action would have sent by now
    assert posts == []
    assert "deactivated" not in up.api("GET", f"/v1/workflows/{active}", alice)
    expect(tab.locator("#workflow-state")).to_have_text("ACTIVE")

    # Again, confirmed with Tab and Enter inside the dialog.
    tab_to(tab, "button#action-finish")
    page.keyboard.press("Enter")
    expect(dialog).to_be_visible()
    tab_to(tab, "button#confirm-ok")
    page.keyboard.press("Enter")
    expect(dialog).to_be_hidden()
    expect(tab.locator("#action-result")).to_contain_text(re.compile("finish", re.IGNORECASE))
    expect(tab.locator("#workflow-state")).to_have_text("FINISHED")
    assert up.api("GET", f"/v1/workflows/{active}", alice)["deactivated"] == (
        "DEACTIVATION_FINISHED"
    )
