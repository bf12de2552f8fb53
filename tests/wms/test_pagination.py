"""Paginated and filtered lists: keyset pages with opaque tokens bound to their filters."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from ewms.v1 import workflow_pb2, workflow_service_pb2, workflow_service_pb2_grpc
from services.errors import field_violations
from tests.wms.helpers import assert_all_moved_on, launched
from tests.wms.requests import minimal_task, workflow_request

Stub = workflow_service_pb2_grpc.WorkflowServiceStub
Metadata = tuple[tuple[str, str], ...]
ws = workflow_service_pb2


async def create_workflows(workflows: Stub, md: Metadata, n: int) -> list[workflow_pb2.Workflow]:
    """n workflows, created one after the other (so oldest first)."""
    created = []
    for _ in range(n):
        resp = await workflows.CreateWorkflow(workflow_request(), metadata=md)
        created.append(resp.workflow)
    return created


async def all_pages(
    list_page: Callable[[str], Awaitable[Any]], items: str
) -> tuple[list[list[Any]], list[str]]:
    """Follow next_page_token from the first page to the last: the pages and the tokens."""
    pages, tokens, token = [], [], ""
    while True:
        resp = await list_page(token)
        pages.append(list(getattr(resp, items)))
        tokens.append(resp.next_page_token)
        token = resp.next_page_token
        if not token:
            return pages, tokens
        assert len(pages) < 100, "pagination does not end"


async def invalid_argument_fields(call: Awaitable[Any]) -> list[str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return [field for field, _ in field_violations(err.value)]


# --- ListWorkflows pages --------------------------------------------------------------------------


async def test_workflows_come_in_pages_of_page_size_oldest_first(
    workflows: Stub, alice: Metadata
) -> None:
    created = await create_workflows(workflows, alice, 7)

    pages, tokens = await all_pages(
        lambda token: workflows.ListWorkflows(
            ws.ListWorkflowsRequest(page_size=3, page_token=token), metadata=alice
        ),
        "workflows",
    )

    assert [len(page) for page in pages] == [3, 3, 1]
    assert [wf for page in pages for wf in page] == created
    assert all(tokens[:-1])
    assert tokens[-1] == ""


async def test_full_last_page_is_followed_by_an_empty_one(workflows: Stub, alice: Metadata) -> None:
    created = await create_workflows(workflows, alice, 6)

    pages, _ = await all_pages(
        lambda token: workflows.ListWorkflows(
            ws.ListWorkflowsRequest(page_size=3, page_token=token), metadata=alice
        ),
        "workflows",
    )

    assert [len(page) for page in pages] == [3, 3, 0]
    assert [wf for page in pages for wf in page] == created


async def test_page_is_stable_while_new_workflows_are_created(
    workflows: Stub, alice: Metadata
) -> None:
    created = await create_workflows(workflows, alice, 4)
    first = await workflows.ListWorkflows(ws.ListWorkflowsRequest(page_size=2), metadata=alice)
    newer = await create_workflows(workflows, alice, 1)

    second = await workflows.ListWorkflows(
        ws.ListWorkflowsRequest(page_size=2, page_token=first.next_page_token), metadata=alice
    )
    third = await workflows.ListWorkflows(
        ws.ListWorkflowsRequest(page_size=2, page_token=second.next_page_token), metadata=alice
    )

    assert list(first.workflows) == created[:2]
    assert list(second.workflows) == created[2:]
    assert list(third.workflows) == newer
    assert third.next_page_token == ""


async def test_default_page_holds_everything_up_to_100(workflows: Stub, alice: Metadata) -> None:
    created = await create_workflows(workflows, alice, 3)

    listed = await workflows.ListWorkflows(ws.ListWorkflowsRequest(), metadata=alice)

    assert list(listed.workflows) == created
    assert listed.next_page_token == ""


async def test_token_reused_with_other_filters_is_rejected(
    workflows: Stub, alice: Metadata
) -> None:
    await create_workflows(workflows, alice, 3)
    first = await workflows.ListWorkflows(ws.ListWorkflowsRequest(page_size=2), metadata=alice)

    fields = await invalid_argument_fields(
        workflows.ListWorkflows(
            ws.ListWorkflowsRequest(
                page_size=2,
                page_token=first.next_page_token,
                state=ws.WORKFLOW_STATE_ACTIVE,
            ),
            metadata=alice,
        )
    )

    assert fields == ["page_token"]


async def test_token_of_another_user_is_rejected(
    workflows: Stub, alice: Metadata, bob: Metadata
) -> None:
    await create_workflows(workflows, alice, 3)
    first = await workflows.ListWorkflows(ws.ListWorkflowsRequest(page_size=2), metadata=alice)

    fields = await invalid_argument_fields(
        workflows.ListWorkflows(
            ws.ListWorkflowsRequest(page_size=2, page_token=first.next_page_token), metadata=bob
        )
    )

    assert fields == ["page_token"]


@pytest.mark.parametrize("token", ["garbage", "!!!", "eyJhZnRlciI6IDF9", "W10"])
async def test_token_not_issued_by_the_list_is_rejected(
    workflows: Stub, alice: Metadata, token: str
) -> None:
    # "eyJhZnRlciI6IDF9" is {"after": 1} without a fingerprint; "W10" is [].
    fields = await invalid_argument_fields(
        workflows.ListWorkflows(ws.ListWorkflowsRequest(page_token=token), metadata=alice)
    )

    assert fields == ["page_token"]


@pytest.mark.parametrize("page_size", [5000, 1001, -1])
async def test_page_size_outside_1_to_1000_is_rejected(
    workflows: Stub, alice: Metadata, page_size: int
) -> None:
    fields = await invalid_argument_fields(
        workflows.ListWorkflows(ws.ListWorkflowsRequest(page_size=page_size), metadata=alice)
    )

    assert fields == ["page_size"]


async def test_largest_page_size_is_accepted(workflows: Stub, alice: Metadata) -> None:
    created = await create_workflows(workflows, alice, 1)

    listed = await workflows.ListWorkflows(ws.ListWorkflowsRequest(page_size=1000), metadata=alice)

    assert list(listed.workflows) == created


# --- ListWorkflows filters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (ws.WORKFLOW_STATE_UNSPECIFIED, ["active", "aborted", "finished"]),
        (ws.WORKFLOW_STATE_ACTIVE, ["active"]),
        (ws.WORKFLOW_STATE_ABORTED, ["aborted"]),
        (ws.WORKFLOW_STATE_FINISHED, ["finished"]),
    ],
)
async def test_workflows_filter_by_state(
    workflows: Stub, alice: Metadata, state: Any, expected: list[str]
) -> None:
    active, aborted, finished = await create_workflows(workflows, alice, 3)
    await workflows.AbortWorkflow(
        ws.AbortWorkflowRequest(workflow_id=aborted.workflow_id), metadata=alice
    )
    await workflows.FinishWorkflow(
        ws.FinishWorkflowRequest(workflow_id=finished.workflow_id), metadata=alice
    )
    names = {active.workflow_id: "active", aborted.workflow_id: "aborted"}
    names[finished.workflow_id] = "finished"

    listed = await workflows.ListWorkflows(ws.ListWorkflowsRequest(state=state), metadata=alice)

    assert [names[wf.workflow_id] for wf in listed.workflows] == expected


def at(wf: workflow_pb2.Workflow) -> timestamp_pb2.Timestamp:
    return wf.timestamp


async def test_created_after_includes_the_boundary(workflows: Stub, alice: Metadata) -> None:
    created = await create_workflows(workflows, alice, 5)

    listed = await workflows.ListWorkflows(
        ws.ListWorkflowsRequest(created_after=at(created[2])), metadata=alice
    )

    assert list(listed.workflows) == created[2:]


async def test_created_before_excludes_the_boundary(workflows: Stub, alice: Metadata) -> None:
    created = await create_workflows(workflows, alice, 5)

    listed = await workflows.ListWorkflows(
        ws.ListWorkflowsRequest(created_before=at(created[2])), metadata=alice
    )

    assert list(listed.workflows) == created[:2]


async def test_created_after_and_before_make_a_window(workflows: Stub, alice: Metadata) -> None:
    created = await create_workflows(workflows, alice, 5)

    listed = await workflows.ListWorkflows(
        ws.ListWorkflowsRequest(created_after=at(created[1]), created_before=at(created[4])),
        metadata=alice,
    )

    assert list(listed.workflows) == created[1:4]


async def test_filtered_list_is_paginated(workflows: Stub, alice: Metadata) -> None:
    created = await create_workflows(workflows, alice, 6)
    for wf in created[::2]:
        await workflows.AbortWorkflow(
            ws.AbortWorkflowRequest(workflow_id=wf.workflow_id), metadata=alice
        )

    pages, _ = await all_pages(
        lambda token: workflows.ListWorkflows(
            ws.ListWorkflowsRequest(state=ws.WORKFLOW_STATE_ACTIVE, page_size=2, page_token=token),
            metadata=alice,
        ),
        "workflows",
    )

    assert [[wf.workflow_id for wf in page] for page in pages] == [
        [created[1].workflow_id, created[3].workflow_id],
        [created[5].workflow_id],
    ]


# --- Other lists ----------------------------------------------------------------------------------


async def test_taskforces_come_in_pages(workflows: Stub, alice: Metadata) -> None:
    request = workflow_request(
        minimal_task(cluster_locations=["local", "osg"]),
        minimal_task(
            cluster_locations=["local", "osg"], input_queue_aliases=["out"], output_queue_aliases=[]
        ),
    )
    created = []
    for _ in range(2):
        resp = await workflows.CreateWorkflow(request, metadata=alice)
        created.extend(resp.taskforces)
        await launched(workflows, alice, resp.workflow.workflow_id)  # no changes while paging

    pages, tokens = await all_pages(
        lambda token: workflows.ListTaskforces(
            ws.ListTaskforcesRequest(page_size=3, page_token=token), metadata=alice
        ),
        "taskforces",
    )

    assert [len(page) for page in pages] == [3, 3, 2]
    assert_all_moved_on([tf for page in pages for tf in page], created)
    assert tokens[-1] == ""


async def test_taskforce_token_reused_with_another_location_is_rejected(
    workflows: Stub, alice: Metadata
) -> None:
    await workflows.CreateWorkflow(
        workflow_request(minimal_task(cluster_locations=["local", "osg"])), metadata=alice
    )
    first = await workflows.ListTaskforces(
        ws.ListTaskforcesRequest(page_size=1, cluster_location="local"), metadata=alice
    )

    fields = await invalid_argument_fields(
        workflows.ListTaskforces(
            ws.ListTaskforcesRequest(
                page_size=1, cluster_location="osg", page_token=first.next_page_token
            ),
            metadata=alice,
        )
    )

    assert fields == ["page_token"]


async def test_task_directives_come_in_pages(workflows: Stub, alice: Metadata) -> None:
    created = []
    for _ in range(3):
        resp = await workflows.CreateWorkflow(workflow_request(), metadata=alice)
        created.extend(resp.task_directives)

    pages, _ = await all_pages(
        lambda token: workflows.ListTaskDirectives(
            ws.ListTaskDirectivesRequest(page_size=2, page_token=token), metadata=alice
        ),
        "task_directives",
    )

    assert [len(page) for page in pages] == [2, 1]
    assert [td for page in pages for td in page] == created
