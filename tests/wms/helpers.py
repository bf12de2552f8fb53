"""Helpers shared by the WMS tests: waiting for a condition, waiting for launch control to release
taskforces, comparing taskforces that launch control has moved on, and pilot and TMS streams driven
by the test."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from ewms.v1 import (
    pilot_service_pb2,
    pilot_service_pb2_grpc,
    task_manager_service_pb2,
    task_manager_service_pb2_grpc,
    taskforce_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import Role
from services.wms import RunningWms
from tests.conftest import bearer
from tests.wms.requests import minimal_task, workflow_request

Phase = taskforce_pb2.TaskforcePhase
Stub = workflow_service_pb2_grpc.WorkflowServiceStub
Metadata = tuple[tuple[str, str], ...]
tms = task_manager_service_pb2
ps = pilot_service_pb2
ws = workflow_service_pb2
TIMEOUT = 10.0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until ``check`` holds; fail after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {TIMEOUT} s: {what}")
        await asyncio.sleep(0.02)


async def list_taskforces(
    workflows: Stub, md: Metadata, workflow_id: str
) -> list[taskforce_pb2.Taskforce]:
    """Every taskforce of a workflow, oldest first."""
    listed = await workflows.ListTaskforces(
        workflow_service_pb2.ListTaskforcesRequest(workflow_id=workflow_id, page_size=1000),
        metadata=md,
    )
    return list(listed.taskforces)


async def get_taskforce(workflows: Stub, md: Metadata, uuid: str) -> taskforce_pb2.Taskforce:
    return await workflows.GetTaskforce(  # type: ignore[no-any-return]
        workflow_service_pb2.GetTaskforceRequest(taskforce_uuid=uuid), metadata=md
    )


async def wait_for_phase(
    workflows: Stub,
    md: Metadata,
    uuid: str,
    phase: taskforce_pb2.TaskforcePhase.ValueType,
) -> taskforce_pb2.Taskforce:
    """The taskforce once it is in ``phase`` (as stored)."""
    found: list[taskforce_pb2.Taskforce] = []

    async def reached() -> bool:
        found[:] = [await get_taskforce(workflows, md, uuid)]
        return found[0].phase == phase

    await eventually(reached, f"taskforce {uuid} in {Phase.Name(phase)}")
    return found[0]


async def launched(
    workflows: Stub, md: Metadata, workflow_id: str
) -> list[taskforce_pb2.Taskforce]:
    """The workflow's taskforces once launch control has released every one of them (to
    pending-starter: nothing limits a test WMS's locations unless it says so); from then on
    nothing changes them until a TMS or the user acts."""
    found: list[taskforce_pb2.Taskforce] = []

    async def released() -> bool:
        found[:] = await list_taskforces(workflows, md, workflow_id)
        return all(tf.phase == Phase.TASKFORCE_PHASE_PENDING_STARTER for tf in found)

    await eventually(released, f"the taskforces of {workflow_id} released by launch control")
    return found


def assert_moved_on(got: taskforce_pb2.Taskforce, created: taskforce_pb2.Taskforce) -> None:
    """``got`` is ``created`` as the WMS has moved it since: equal in everything but the phase and
    the phase change log, which only grew (``created``'s log is its beginning), and the phase is the
    target of the last successful change."""
    assert _without_phase(got) == _without_phase(created)
    n = len(created.phase_change_log)
    assert list(got.phase_change_log[:n]) == list(created.phase_change_log)
    last_success = [c.target_phase for c in got.phase_change_log if c.was_successful][-1]
    assert got.phase == last_success


def assert_all_moved_on(
    got: list[taskforce_pb2.Taskforce], created: list[taskforce_pb2.Taskforce]
) -> None:
    """``assert_moved_on`` pairwise, and the same taskforces in the same order."""
    assert [tf.taskforce_uuid for tf in got] == [tf.taskforce_uuid for tf in created]
    for g, c in zip(got, created, strict=True):
        assert_moved_on(g, c)


def _without_phase(tf: taskforce_pb2.Taskforce) -> taskforce_pb2.Taskforce:
    copy = taskforce_pb2.Taskforce()
    copy.CopyFrom(tf)
    copy.ClearField("phase")
    copy.ClearField("phase_change_log")
    return copy


class TmsStream:
    """One TMS's Connect stream, driven by the test."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        stub = task_manager_service_pb2_grpc.TaskManagerServiceStub(channel)
        self.call = stub.Connect(metadata=bearer(token))

    async def send(self, **kind: Any) -> None:
        await self.call.write(tms.TaskManagerServiceConnectRequest(**kind))

    async def hello(
        self, location: str = "local", scheduler: str = "local", tms_id: str = "tms-1"
    ) -> tms.TmsWelcome:
        """Say hello; the WMS's welcome."""
        await self.send(
            hello=tms.TmsHello(
                cluster_location=location, scheduler=scheduler, tms_id=tms_id, version="0.1.0"
            )
        )
        msg = await self.read()
        assert msg.WhichOneof("kind") == "welcome", msg
        return msg.welcome

    async def read(self) -> tms.TaskManagerServiceConnectResponse:
        """The next message from the WMS (the stream must not end)."""
        msg = await asyncio.wait_for(self.call.read(), TIMEOUT)
        assert msg is not grpc.aio.EOF, "the WMS ended the stream"
        return msg  # type: ignore[no-any-return]

    async def start(self) -> tms.StartTaskforce:
        """The next message, which must be a start command."""
        msg = await self.read()
        assert msg.WhichOneof("kind") == "start", msg
        return msg.start

    async def stop(self) -> tms.StopTaskforce:
        """The next message, which must be a stop command."""
        msg = await self.read()
        assert msg.WhichOneof("kind") == "stop", msg
        return msg.stop

    async def submitted(
        self,
        start: tms.StartTaskforce,
        cluster_id: int,
        n_workers: int | None = None,
        **fields: Any,
    ) -> None:
        """Confirm a start command."""
        await self.send(
            submitted=tms.TaskforceSubmitted(
                taskforce_uuid=start.taskforce.taskforce_uuid,
                cluster_id=cluster_id,
                n_workers=start.taskforce.n_workers if n_workers is None else n_workers,
                **fields,
            )
        )

    async def failure(self) -> grpc.aio.AioRpcError:
        """The error the WMS ends the stream with (messages before it are skipped)."""
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await asyncio.wait_for(self.call.read(), TIMEOUT) is not grpc.aio.EOF:
                pass
        return err.value


class PilotStream:
    """One pilot's Connect stream, driven by the test."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        stub = pilot_service_pb2_grpc.PilotServiceStub(channel)
        self.call = stub.Connect(metadata=bearer(token))

    async def send(self, **kind: Any) -> None:
        await self.call.write(ps.PilotServiceConnectRequest(**kind))

    async def hello(
        self, taskforce_uuid: str, worker_id: str = "1.0", host: str = "node-1"
    ) -> ps.PilotServiceConnectResponse:
        """Say hello and return the WMS's answer."""
        hello = ps.PilotHello(
            taskforce_uuid=taskforce_uuid, worker_id=worker_id, host=host, pilot_version="0.1.0"
        )
        await self.send(hello=hello)
        return await self.read()

    async def status(
        self,
        phase: taskforce_pb2.PilotPhase.ValueType = taskforce_pb2.PILOT_PHASE_TASKING,
        last_error: str = "",
        **counters: int,
    ) -> None:
        status = ps.PilotStatus(
            phase=phase, counters=taskforce_pb2.TaskCounters(**counters), last_error=last_error
        )
        await self.send(status=status)

    async def read(self) -> ps.PilotServiceConnectResponse:
        """The next message from the WMS (the stream must not end)."""
        msg = await asyncio.wait_for(self.call.read(), TIMEOUT)
        assert msg is not grpc.aio.EOF, "the WMS ended the stream"
        return msg  # type: ignore[no-any-return]

    async def failure(self) -> grpc.aio.AioRpcError:
        """The error the WMS ends the stream with (messages before it are skipped)."""
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await asyncio.wait_for(self.call.read(), TIMEOUT) is not grpc.aio.EOF:
                pass
        return err.value

    async def ended_cleanly(self) -> bool:
        """Whether the WMS ends the stream with OK once the messages before it are read."""
        while await asyncio.wait_for(self.call.read(), TIMEOUT) is not grpc.aio.EOF:
            pass
        return bool(await self.call.code() == grpc.StatusCode.OK)


# Short, so that retries come quickly; tests wait for them, never for a fixed time.
RETRY_DELAY = 0.3
RETRIES = 2


@dataclasses.dataclass
class Env:
    """A running WMS, a channel to it, and the streams the test opened on it."""

    wms: RunningWms
    channel: grpc.aio.Channel
    # Streams (anything with a grpc.aio ``call``) cancelled when the env closes.
    streams: list[Any] = dataclasses.field(default_factory=list)
    closed: bool = False
    stopped: bool = False

    @property
    def workflows(self) -> Stub:
        return workflow_service_pb2_grpc.WorkflowServiceStub(self.channel)

    @property
    def alice(self) -> Metadata:
        return bearer(self.wms.authority.mint("alice", Role.USER, 3600))

    def tms(self, location: str = "local", token: str = "") -> TmsStream:
        """A TMS stream with a TMS token scoped to ``location`` (or ``token``)."""
        token = token or self.wms.authority.mint(f"tms-{location}", Role.TMS, 3600, scope=location)
        stream = TmsStream(self.channel, token)
        self.streams.append(stream)
        return stream

    def pilot(self, token: str) -> PilotStream:
        stream = PilotStream(self.channel, token)
        self.streams.append(stream)
        return stream

    async def create(
        self, *tasks: dict[str, Any], **fields: Any
    ) -> workflow_service_pb2.CreateWorkflowResponse:
        """alice's workflow of ``tasks`` (one minimal task at local if none)."""
        return await self.workflows.CreateWorkflow(  # type: ignore[no-any-return]
            workflow_request(*tasks, **fields), metadata=self.alice
        )

    async def created_and_launched(
        self, *tasks: dict[str, Any], **fields: Any
    ) -> list[taskforce_pb2.Taskforce]:
        """A new workflow's taskforces once launch control has released them."""
        resp = await self.create(*tasks, **fields)
        return await launched(self.workflows, self.alice, resp.workflow.workflow_id)

    async def taskforce(self, uuid: str) -> taskforce_pb2.Taskforce:
        return await get_taskforce(self.workflows, self.alice, uuid)

    async def phase(
        self, uuid: str, phase: taskforce_pb2.TaskforcePhase.ValueType
    ) -> taskforce_pb2.Taskforce:
        """The taskforce once it is in ``phase``."""
        return await wait_for_phase(self.workflows, self.alice, uuid, phase)

    async def deactivate(self, action: str, workflow_id: str) -> None:
        if action == "abort":
            await self.workflows.AbortWorkflow(
                ws.AbortWorkflowRequest(workflow_id=workflow_id), metadata=self.alice
            )
        else:
            await self.workflows.FinishWorkflow(
                ws.FinishWorkflowRequest(workflow_id=workflow_id), metadata=self.alice
            )

    async def stop_wms(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.wms.stop(grace=None)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in self.streams:
            stream.call.cancel()
        await self.channel.close()
        await self.stop_wms()


StartEnv = Callable[..., Awaitable[Env]]


def task(location: str = "local", n_workers: int = 1, **overrides: Any) -> dict[str, Any]:
    """A minimal task at one location."""
    return minimal_task(cluster_locations=[location], n_workers=n_workers, **overrides)


async def submitted_taskforce(
    env: Env, stream: TmsStream, cluster_id: int, **task_fields: Any
) -> tuple[taskforce_pb2.Taskforce, tms.StartTaskforce]:
    """A new workflow's only taskforce, started through ``stream`` (which said hello) and confirmed
    as ``cluster_id``."""
    [tf] = await env.created_and_launched(task(**task_fields))
    start = await stream.start()
    assert start.taskforce.taskforce_uuid == tf.taskforce_uuid
    await stream.submitted(start, cluster_id)
    return await env.phase(tf.taskforce_uuid, Phase.TASKFORCE_PHASE_CONDOR_SUBMIT), start


def snapshot(
    uuid: str, *workers: tuple[str, int, str], full: bool = False
) -> tms.JobStatusSnapshot:
    """A snapshot of one taskforce's workers, each (worker id, job state, hold reason)."""
    return tms.JobStatusSnapshot(
        taskforces=[
            tms.TaskforceJobStatus(
                taskforce_uuid=uuid,
                full=full,
                workers=[
                    tms.WorkerJobState(worker_id=w, job_state=s, hold_reason=r)  # type: ignore[arg-type]
                    for w, s, r in workers
                ],
            )
        ]
    )


def compound(*rows: tuple[int, str, int, int]) -> list[taskforce_pb2.CompoundStatus]:
    """Compound statuses from (job state, hold reason, pilot phase, count)."""
    return [
        taskforce_pb2.CompoundStatus(
            job_state=s,  # type: ignore[arg-type]
            hold_reason=r,
            pilot_phase=p,  # type: ignore[arg-type]
            count=n,
        )
        for s, r, p, n in rows
    ]
