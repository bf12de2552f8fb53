"""Authentication and authorization on a real WMS: bearer tokens, roles, and ownership (a user sees
and acts on only their own workflows; others' are NOT_FOUND; admins see all)."""

from __future__ import annotations

import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ewms.v1 import workflow_service_pb2, workflow_service_pb2_grpc
from services.auth import ADMIN_TOKEN_FILE, ISSUER, SECRET_FILE, Role, TokenAuthority
from services.wms import RunningWms
from tests.conftest import bearer
from tests.wms.helpers import assert_all_moved_on, launched
from tests.wms.requests import seed

Stub = workflow_service_pb2_grpc.WorkflowServiceStub
ws = workflow_service_pb2
Metadata = tuple[tuple[str, str], ...]
LIST_WORKFLOWS = workflow_service_pb2.ListWorkflowsRequest()


async def call_fails(call: Any, request: Any, **kwargs: Any) -> grpc.aio.AioRpcError:
    """The error of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(request, **kwargs)
    return err.value


async def create(workflows: Stub, md: Metadata) -> workflow_service_pb2.CreateWorkflowResponse:
    return await workflows.CreateWorkflow(seed(), metadata=md)  # type: ignore[no-any-return]


# --- Authentication -------------------------------------------------------------------------------


async def test_call_without_a_token_is_unauthenticated(workflows: Stub) -> None:
    err = await call_fails(workflows.ListWorkflows, LIST_WORKFLOWS)

    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in (err.details() or "")


async def test_token_signed_with_another_secret_is_unauthenticated(workflows: Stub) -> None:
    forged = TokenAuthority(secrets.token_hex(32).encode()).mint("alice", Role.USER, 3600)

    err = await call_fails(workflows.ListWorkflows, LIST_WORKFLOWS, metadata=bearer(forged))

    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "signature" in (err.details() or "")


async def test_expired_token_is_unauthenticated(workflows: Stub, data_dir: Path) -> None:
    secret = (data_dir / SECRET_FILE).read_text().strip().encode()
    now = int(time.time())
    expired = jwt.encode(
        {"iss": ISSUER, "sub": "alice", "role": "user", "iat": now - 120, "exp": now - 60},
        secret,
        algorithm="HS256",
    )

    err = await call_fails(workflows.ListWorkflows, LIST_WORKFLOWS, metadata=bearer(expired))

    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (err.details() or "")


@pytest.mark.parametrize(
    "template", ["Basic YWxpY2U6c2VjcmV0", "Bearer ", "{token}", "JWT {token}"]
)
async def test_authorization_that_is_not_a_bearer_token_is_unauthenticated(
    workflows: Stub, token_for: Any, template: str
) -> None:
    value = template.format(token=token_for("alice"))  # a valid token, wrongly presented

    err = await call_fails(
        workflows.ListWorkflows, LIST_WORKFLOWS, metadata=(("authorization", value),)
    )

    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer <token>" in (err.details() or "")


async def test_garbage_token_is_unauthenticated(workflows: Stub) -> None:
    err = await call_fails(workflows.ListWorkflows, LIST_WORKFLOWS, metadata=bearer("not.a.jwt"))

    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("role", [Role.TMS, Role.PILOT])
async def test_non_user_role_may_not_call_the_workflow_service(
    workflows: Stub, token_for: Any, role: Role
) -> None:
    err = await call_fails(
        workflows.ListWorkflows, LIST_WORKFLOWS, metadata=bearer(token_for("svc", role))
    )

    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert repr(role.value) in (err.details() or "")


async def test_health_check_needs_no_token(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    resp = await health.Check(health_pb2.HealthCheckRequest(service="ewms.v1.WorkflowService"))

    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("name", [SECRET_FILE, ADMIN_TOKEN_FILE])
async def test_secret_and_admin_token_are_private_files(
    wms: RunningWms, data_dir: Path, name: str
) -> None:
    mode = stat.S_IMODE((data_dir / name).stat().st_mode)

    assert mode == 0o600


async def test_admin_token_file_holds_a_working_admin_token(
    workflows: Stub, alice: Metadata, data_dir: Path
) -> None:
    mine = await create(workflows, alice)
    token = (data_dir / ADMIN_TOKEN_FILE).read_text().strip()

    got = await workflows.GetWorkflow(
        workflow_service_pb2.GetWorkflowRequest(workflow_id=mine.workflow.workflow_id),
        metadata=bearer(token),
    )

    assert got == mine.workflow


# --- Ownership ------------------------------------------------------------------------------------


Response = workflow_service_pb2.CreateWorkflowResponse
# Every call that names an object of a workflow: the method, and its request built from the
# workflow's CreateWorkflow response.
CALLS_ON_A_WORKFLOW: dict[str, tuple[str, Callable[[Response], Any]]] = {
    "get workflow": (
        "GetWorkflow",
        lambda r: ws.GetWorkflowRequest(workflow_id=r.workflow.workflow_id),
    ),
    "abort": (
        "AbortWorkflow",
        lambda r: ws.AbortWorkflowRequest(workflow_id=r.workflow.workflow_id),
    ),
    "finish": (
        "FinishWorkflow",
        lambda r: ws.FinishWorkflowRequest(workflow_id=r.workflow.workflow_id),
    ),
    "get task directive": (
        "GetTaskDirective",
        lambda r: ws.GetTaskDirectiveRequest(task_id=r.task_directives[0].task_id),
    ),
    "get taskforce": (
        "GetTaskforce",
        lambda r: ws.GetTaskforceRequest(taskforce_uuid=r.taskforces[0].taskforce_uuid),
    ),
    "add workers": (
        "AddWorkers",
        lambda r: ws.AddWorkersRequest(
            task_id=r.task_directives[0].task_id, cluster_location="local", n_workers=1
        ),
    ),
    "list queues": (
        "ListQueues",
        lambda r: ws.ListQueuesRequest(workflow_id=r.workflow.workflow_id),
    ),
}


@pytest.mark.parametrize("call", sorted(CALLS_ON_A_WORKFLOW))
async def test_other_users_workflow_is_not_found(
    workflows: Stub, alice: Metadata, bob: Metadata, call: str
) -> None:
    alices = await create(workflows, alice)
    method, build = CALLS_ON_A_WORKFLOW[call]

    err = await call_fails(getattr(workflows, method), build(alices), metadata=bob)

    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_other_users_failed_actions_change_nothing(
    workflows: Stub, alice: Metadata, bob: Metadata
) -> None:
    resp = await create(workflows, alice)
    # Once launch control has released them, nothing but a TMS or the owner changes the taskforces.
    before = await launched(workflows, alice, resp.workflow.workflow_id)
    for method, build in CALLS_ON_A_WORKFLOW.values():
        await call_fails(getattr(workflows, method), build(resp), metadata=bob)

    got = await workflows.GetWorkflow(
        workflow_service_pb2.GetWorkflowRequest(workflow_id=resp.workflow.workflow_id),
        metadata=alice,
    )
    assert got == resp.workflow
    taskforces = await workflows.ListTaskforces(
        workflow_service_pb2.ListTaskforcesRequest(), metadata=alice
    )
    assert list(taskforces.taskforces) == before
    assert_all_moved_on(before, list(resp.taskforces))


async def test_other_users_objects_are_absent_from_lists(
    workflows: Stub, alice: Metadata, bob: Metadata
) -> None:
    await create(workflows, alice)
    bobs = await create(workflows, bob)

    listed_wf = await workflows.ListWorkflows(ws.ListWorkflowsRequest(), metadata=bob)
    listed_td = await workflows.ListTaskDirectives(ws.ListTaskDirectivesRequest(), metadata=bob)
    listed_tf = await workflows.ListTaskforces(ws.ListTaskforcesRequest(), metadata=bob)

    assert list(listed_wf.workflows) == [bobs.workflow]
    assert list(listed_td.task_directives) == list(bobs.task_directives)
    assert_all_moved_on(list(listed_tf.taskforces), list(bobs.taskforces))


async def test_filtering_by_another_workflow_id_lists_nothing(
    workflows: Stub, alice: Metadata, bob: Metadata
) -> None:
    alices = await create(workflows, alice)
    wf = alices.workflow.workflow_id

    listed_td = await workflows.ListTaskDirectives(
        ws.ListTaskDirectivesRequest(workflow_id=wf), metadata=bob
    )
    listed_tf = await workflows.ListTaskforces(
        ws.ListTaskforcesRequest(workflow_id=wf), metadata=bob
    )

    assert list(listed_td.task_directives) == []
    assert list(listed_tf.taskforces) == []


async def test_admin_sees_every_owners_workflows(
    workflows: Stub, alice: Metadata, bob: Metadata, admin: Metadata
) -> None:
    alices = await create(workflows, alice)
    bobs = await create(workflows, bob)

    listed = await workflows.ListWorkflows(LIST_WORKFLOWS, metadata=admin)

    assert list(listed.workflows) == [alices.workflow, bobs.workflow]


async def test_admin_may_filter_by_owner(
    workflows: Stub, alice: Metadata, bob: Metadata, admin: Metadata
) -> None:
    await create(workflows, alice)
    bobs = await create(workflows, bob)

    listed = await workflows.ListWorkflows(
        workflow_service_pb2.ListWorkflowsRequest(owner="bob"), metadata=admin
    )

    assert list(listed.workflows) == [bobs.workflow]


async def test_admin_may_act_on_any_workflow(
    workflows: Stub, alice: Metadata, admin: Metadata
) -> None:
    alices = await create(workflows, alice)

    done = await workflows.AbortWorkflow(
        workflow_service_pb2.AbortWorkflowRequest(workflow_id=alices.workflow.workflow_id),
        metadata=admin,
    )

    assert done.n_taskforces == 1


async def test_user_filtering_by_another_owner_is_permission_denied(
    workflows: Stub, alice: Metadata
) -> None:
    err = await call_fails(
        workflows.ListWorkflows,
        workflow_service_pb2.ListWorkflowsRequest(owner="bob"),
        metadata=alice,
    )

    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_user_may_filter_by_their_own_name(workflows: Stub, alice: Metadata) -> None:
    alices = await create(workflows, alice)

    listed = await workflows.ListWorkflows(
        workflow_service_pb2.ListWorkflowsRequest(owner="alice"), metadata=alice
    )

    assert list(listed.workflows) == [alices.workflow]
