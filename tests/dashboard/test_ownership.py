"""The dashboard has the API's ownership rules: user B's token shows neither user A's workflows nor
A's deep link (issue 15's acceptance), while A's own token shows both."""

from __future__ import annotations

import re
from collections.abc import Callable

from tests.dashboard.conftest import Dashboard, EwmsUp, expect, slow_workflow

# Strings only A's workflow carries (its owner and its queues): none may reach B's page.
A_USER = "ann-q7z"
A_ALIASES = ("ann-private-in", "ann-private-out")


def test_another_users_workflows_and_deep_link_stay_hidden(
    ewms_up: Callable[..., EwmsUp], dashboard: Callable[[str], Dashboard]
) -> None:
    up = ewms_up(workers=1)
    ann, bob = up.token(A_USER), up.token("bob")
    a_id = up.create_workflow(ann, slow_workflow(n_workers=1, aliases=A_ALIASES))["workflow"][
        "workflow_id"
    ]
    b_id = up.create_workflow(bob, slow_workflow(n_workers=1))["workflow"]["workflow_id"]
    url = up.dashboard_url or f"{up.http_url}/"

    # B's list: B's workflow is there (so the list has loaded), A's is not.
    b_tab = dashboard(url)
    b_tab.open()
    b_tab.sign_in(bob)
    expect(b_tab.locator(f'table#workflows tr[data-workflow-id="{b_id}"]')).to_be_visible()
    expect(b_tab.locator("table#workflows tr[data-workflow-id]")).to_have_count(1)
    expect(b_tab.locator(f'tr[data-workflow-id="{a_id}"]')).to_have_count(0)
    assert A_USER not in b_tab.text("body")

    # A's deep link in B's tab: not found, and nothing of A's workflow on the page.
    b_tab.go(f"#/workflows/{a_id}")
    expect(b_tab.locator("#error")).to_be_visible()
    expect(b_tab.locator("#error")).to_contain_text(re.compile("not found", re.IGNORECASE))
    expect(b_tab.locator("table#queues tr[data-queue-id]")).to_have_count(0)
    expect(b_tab.locator("#taskforces section[data-taskforce-uuid]")).to_have_count(0)
    expect(b_tab.locator("#top-errors li[data-error-summary]")).to_have_count(0)
    body = b_tab.text("body")
    assert not any(alias in body for alias in A_ALIASES), body
    assert A_USER not in body, body

    # A's own token shows both: what B was refused exists.
    a_tab = dashboard(url)
    a_tab.open()
    a_tab.sign_in(ann)
    expect(a_tab.locator(f'table#workflows tr[data-workflow-id="{a_id}"]')).to_be_visible()
    expect(a_tab.locator(f'tr[data-workflow-id="{b_id}"]')).to_have_count(0)
    a_tab.go(f"#/workflows/{a_id}")
    expect(a_tab.locator(f'#workflow[data-workflow-id="{a_id}"]')).to_be_visible()
    expect(a_tab.locator("table#queues tr[data-queue-id]")).to_have_count(2)
    expect(a_tab.locator("table#queues")).to_contain_text(A_ALIASES[0])
