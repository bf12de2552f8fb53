"""Durability: everything the WMS acknowledged is still there after a restart on the same data
directory, and the store's schema is versioned."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ewms.v1 import (
    queue_pb2,
    taskforce_pb2,
    workflow_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import ADMIN_TOKEN_FILE, Role
from services.wms import RunningWms, start_wms
from services.wms.migrations import MIGRATIONS
from services.wms.store import DB_FILE, StoreVersionError, migrate
from tests.conftest import bearer, wms_settings
from tests.wms.requests import minimal_task, seed, workflow_request

Stub = workflow_service_pb2_grpc.WorkflowServiceStub
ws = workflow_service_pb2


@dataclass
class Snapshot:
    """Everything the WMS holds, as an admin lists it."""

    workflows: list[workflow_pb2.Workflow]
    task_directives: list[workflow_pb2.TaskDirective]
    taskforces: list[taskforce_pb2.Taskforce]
    queues: dict[str, list[queue_pb2.Queue]]


async def snapshot(stub: Stub, admin: tuple[tuple[str, str], ...]) -> Snapshot:
    wfs = await stub.ListWorkflows(ws.ListWorkflowsRequest(), metadata=admin)
    tds = await stub.ListTaskDirectives(ws.ListTaskDirectivesRequest(), metadata=admin)
    tfs = await stub.ListTaskforces(ws.ListTaskforcesRequest(), metadata=admin)
    queues = {}
    for wf in wfs.workflows:
        listed = await stub.ListQueues(
            ws.ListQueuesRequest(workflow_id=wf.workflow_id), metadata=admin
        )
        queues[wf.workflow_id] = list(listed.queues)
    return Snapshot(list(wfs.workflows), list(tds.task_directives), list(tfs.taskforces), queues)


@dataclass
class BeforeRestart:
    """What a first WMS on the data directory did and held when it stopped."""

    state: Snapshot
    aborted_id: str
    added_taskforce_uuid: str
    alice_token: str
    admin_token_file: str


@pytest.fixture
async def before_restart(data_dir: Path) -> BeforeRestart:
    """A first WMS on ``data_dir`` with three workflows, one aborted, one with added workers;
    stopped."""
    first = await start_wms(wms_settings(data_dir))
    try:
        alice_token = first.authority.mint("alice", Role.USER, 3600)
        alice = bearer(alice_token)
        admin = bearer(first.authority.mint("root", Role.ADMIN, 3600))
        async with grpc.aio.insecure_channel(first.address) as channel:
            stub = Stub(channel)
            aborted = await stub.CreateWorkflow(seed(), metadata=alice)
            grown = await stub.CreateWorkflow(
                workflow_request(minimal_task(cluster_locations=["local", "osg"])), metadata=alice
            )
            await stub.CreateWorkflow(workflow_request(priority=7), metadata=alice)
            await stub.AbortWorkflow(
                ws.AbortWorkflowRequest(workflow_id=aborted.workflow.workflow_id), metadata=alice
            )
            added = await stub.AddWorkers(
                ws.AddWorkersRequest(
                    task_id=grown.task_directives[0].task_id, cluster_location="osg", n_workers=3
                ),
                metadata=alice,
            )
            state = await snapshot(stub, admin)
    finally:
        await first.stop()
    return BeforeRestart(
        state=state,
        aborted_id=aborted.workflow.workflow_id,
        added_taskforce_uuid=added.taskforce_uuid,
        alice_token=alice_token,
        admin_token_file=(data_dir / ADMIN_TOKEN_FILE).read_text(),
    )


@pytest.fixture
async def restarted(data_dir: Path, before_restart: BeforeRestart) -> AsyncIterator[RunningWms]:
    """A second WMS on the same data directory."""
    second = await start_wms(wms_settings(data_dir))
    try:
        yield second
    finally:
        await second.stop(grace=None)


@pytest.fixture
async def stub(restarted: RunningWms) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        yield Stub(channel)


@pytest.fixture
def admin(restarted: RunningWms) -> tuple[tuple[str, str], ...]:
    return bearer(restarted.authority.mint("root", Role.ADMIN, 3600))


async def test_workflows_survive_a_restart(
    before_restart: BeforeRestart, stub: Stub, admin: tuple[tuple[str, str], ...]
) -> None:
    after = await snapshot(stub, admin)

    assert after.workflows == before_restart.state.workflows
    assert len(after.workflows) == 3
    aborted = next(wf for wf in after.workflows if wf.workflow_id == before_restart.aborted_id)
    assert aborted.deactivated == workflow_pb2.DEACTIVATION_ABORTED


async def test_task_directives_survive_a_restart(
    before_restart: BeforeRestart, stub: Stub, admin: tuple[tuple[str, str], ...]
) -> None:
    after = await snapshot(stub, admin)

    assert after.task_directives == before_restart.state.task_directives
    assert len(after.task_directives) == 3


async def test_taskforces_with_their_phases_and_logs_survive_a_restart(
    before_restart: BeforeRestart, stub: Stub, admin: tuple[tuple[str, str], ...]
) -> None:
    after = await snapshot(stub, admin)

    assert after.taskforces == before_restart.state.taskforces
    assert len(after.taskforces) == 5  # 1 (aborted) + 2 + 1 added + 1
    assert before_restart.added_taskforce_uuid in {tf.taskforce_uuid for tf in after.taskforces}


async def test_queues_survive_a_restart(
    before_restart: BeforeRestart, stub: Stub, admin: tuple[tuple[str, str], ...]
) -> None:
    after = await snapshot(stub, admin)

    assert after.queues == before_restart.state.queues
    assert sum(len(qs) for qs in after.queues.values()) == 6


async def test_tokens_minted_before_a_restart_still_work(
    before_restart: BeforeRestart, stub: Stub
) -> None:
    listed = await stub.ListWorkflows(
        ws.ListWorkflowsRequest(), metadata=bearer(before_restart.alice_token)
    )

    assert len(listed.workflows) == 3


async def test_admin_token_file_is_kept_and_still_works(
    before_restart: BeforeRestart, data_dir: Path, stub: Stub
) -> None:
    token_file = (data_dir / ADMIN_TOKEN_FILE).read_text()

    listed = await stub.ListWorkflows(
        ws.ListWorkflowsRequest(), metadata=bearer(token_file.strip())
    )

    assert token_file == before_restart.admin_token_file
    assert len(listed.workflows) == 3


async def test_new_workflows_can_be_created_after_a_restart(
    before_restart: BeforeRestart, stub: Stub, admin: tuple[tuple[str, str], ...]
) -> None:
    alice = bearer(before_restart.alice_token)

    created = await stub.CreateWorkflow(seed(), metadata=alice)

    listed = await stub.ListWorkflows(ws.ListWorkflowsRequest(), metadata=alice)
    assert [wf.workflow_id for wf in listed.workflows] == [
        *(wf.workflow_id for wf in before_restart.state.workflows),
        created.workflow.workflow_id,
    ]


# --- Schema versions ------------------------------------------------------------------------------


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {name for (name,) in rows} - {"sqlite_sequence"}


def test_migrate_brings_a_fresh_database_to_the_current_version(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)) as conn:
        version = migrate(conn)

        assert version == len(MIGRATIONS)
        assert user_version(conn) == len(MIGRATIONS)
        assert tables(conn) == {
            "workflows",
            "task_directives",
            "taskforces",
            "queues",
            "events",
            "queue_counters",
            "pilots",
            "pilot_commands",
        }


def test_migrate_leaves_a_current_database_unchanged(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)) as conn:
        migrate(conn)
        schema = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()

        assert migrate(conn) == len(MIGRATIONS)
        assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema


def test_migrate_refuses_a_database_from_a_newer_wms(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")

        with pytest.raises(StoreVersionError, match="newer"):
            migrate(conn)

        assert user_version(conn) == len(MIGRATIONS) + 1
        assert tables(conn) == set()


@pytest.fixture
def newer_database(data_dir: Path) -> Path:
    """A data directory whose database was written by a newer WMS."""
    data_dir.mkdir(parents=True)
    with closing(sqlite3.connect(data_dir / DB_FILE, isolation_level=None)) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    return data_dir


async def test_wms_refuses_to_start_on_a_database_from_a_newer_wms(newer_database: Path) -> None:
    with pytest.raises(StoreVersionError):
        await start_wms(wms_settings(newer_database))
