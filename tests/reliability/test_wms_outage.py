"""Scenario 2: the WMS killed with ``kill -9`` mid-run and restarted on its port after 2 s and after
60 s down, on both queue backends. No event is lost; the TMS and the same pilots reconnect and
finish the run without anyone adding workers.

The deployment is served (``ewms wms serve`` and a local TMS as subprocesses) and driven like
``ewms run --wms``: the workflow is created, its events are published, the outputs are collected
and the workflow is finished -- here through the WMS's gRPC API, because the client of ``ewms run``
itself gives up when its WMS goes away.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from ewms.v1 import queue_pb2, taskforce_pb2, workflow_service_pb2, workflow_service_pb2_grpc
from services.events.grpc_client import GrpcQueueClient
from tests.e2e.conftest import Cluster, wait_for

N_EVENTS = 150
TASK = 'sh -c \'sleep 0.05; cp "$EWMS_TASK_INFILE" "$EWMS_TASK_OUTFILE"\''
# Longer than any outage here: a pilot ends when the workflow is finished, never by idling.
PILOT_IDLE_S = 300
# Reading the outputs ends after this long without a delivery (the inputs are settled by then).
QUIET_S = 2.0
WAIT_S = 180


# Deliveries the workflow's two pilots hold at once (EWMS_PILOT_PREFETCH's default, 4 each).
IN_FLIGHT_MAX = 2 * 4


class Api:
    """The served WMS's gRPC API, as its local admin."""

    def __init__(self, c: Cluster) -> None:
        self.c = c

    def _call(self, method: str, request: Any) -> Any:
        with grpc.insecure_channel(self.c.address) as channel:
            stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
            return getattr(stub, method)(
                request, metadata=(("authorization", f"Bearer {self.c.token()}"),), timeout=30
            )

    def create_workflow(self) -> workflow_service_pb2.CreateWorkflowResponse:
        body = {
            "public_queue_aliases": ["in", "out"],
            "tasks": [
                {
                    "cluster_locations": ["local"],
                    "input_queue_aliases": ["in"],
                    "output_queue_aliases": ["out"],
                    "task_args": TASK,
                    "n_workers": 2,
                    "pilot_config": {
                        "environment": {"EWMS_PILOT_TIMEOUT_QUEUE_INCOMING": PILOT_IDLE_S}
                    },
                    "worker_config": {
                        "do_transfer_worker_stdouterr": False,
                        "max_worker_runtime": 3600,
                        "n_cores": 1,
                        "priority": 50,
                        "worker_disk": "1G",
                        "worker_memory": "1G",
                    },
                }
            ],
        }
        request = json_format.ParseDict(body, workflow_service_pb2.CreateWorkflowRequest())
        resp: workflow_service_pb2.CreateWorkflowResponse = self._call("CreateWorkflow", request)
        return resp

    def taskforce(self, uuid: str) -> taskforce_pb2.Taskforce:
        tf: taskforce_pb2.Taskforce = self._call(
            "GetTaskforce", workflow_service_pb2.GetTaskforceRequest(taskforce_uuid=uuid)
        )
        return tf

    def taskforces(self, workflow_id: str) -> list[taskforce_pb2.Taskforce]:
        resp = self._call(
            "ListTaskforces", workflow_service_pb2.ListTaskforcesRequest(page_size=1000)
        )
        return [t for t in resp.taskforces if t.workflow_id == workflow_id]

    def finish(self, workflow_id: str) -> None:
        self._call(
            "FinishWorkflow", workflow_service_pb2.FinishWorkflowRequest(workflow_id=workflow_id)
        )

    def queue_client(self) -> GrpcQueueClient:
        return GrpcQueueClient.connect(self.c.address, self.c.token())

    def publish(self, queue_id: str, n: int) -> None:
        async def go() -> None:
            client = self.queue_client()
            try:
                events = [queue_pb2.Event(payload=json.dumps({"i": i}).encode()) for i in range(n)]
                await client.publish(queue_id, events)
            finally:
                await client.close()

        asyncio.run(go())

    def stats(self, queue_id: str) -> queue_pb2.QueueStats:
        async def go() -> queue_pb2.QueueStats:
            client = self.queue_client()
            try:
                return await client.stats(queue_id)
            finally:
                await client.close()

        return asyncio.run(go())

    def collect(self, queue_id: str, want: int) -> list[int]:
        """Consume (and ack) outputs until ``want`` distinct ones are in, then until QUIET_S passes
        without a delivery: every output, duplicates included."""

        async def go() -> list[int]:
            client = self.queue_client()
            got: list[int] = []
            last = time.monotonic()
            try:
                sub = await client.subscribe(queue_id, 256)

                async def read() -> None:
                    nonlocal last
                    async for delivery in sub:
                        got.append(json.loads(delivery.event.payload)["i"])
                        last = time.monotonic()
                        await sub.ack(delivery)

                reader = asyncio.create_task(read())
                deadline = time.monotonic() + WAIT_S
                while time.monotonic() < deadline and not reader.done():
                    if len(set(got)) >= want and time.monotonic() - last >= QUIET_S:
                        break
                    await asyncio.sleep(0.1)
                await sub.close()
                await reader
            finally:
                await client.close()
            return got

        return asyncio.run(go())


def log_records(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The JSON records of a service's log from byte ``offset`` on (other lines skipped)."""
    out = []
    for line in path.read_bytes()[offset:].decode(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def when(record: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(record["timestamp"]).timestamp()


def first_after(records: list[dict[str, Any]], event: str, since: float) -> float | None:
    times = [when(r) for r in records if r.get("event") == event and when(r) >= since]
    return min(times) if times else None


def pilot_logs(c: Cluster, uuid: str) -> list[Path]:
    return sorted((c.state_dir / f"ewms-taskforce-{uuid}").glob("cluster-*/*.err"))


@pytest.mark.parametrize("down_s", [2, 60], ids=["2s-down", "60s-down"])
def test_a_wms_killed_mid_run_loses_nothing_and_the_same_pilots_finish_the_run(
    tmp_path: Path,
    cluster: Callable[..., Cluster],
    backend: str,
    outcome: Callable[..., Any],
    down_s: int,
) -> None:
    c = cluster(backend)
    c.start_wms()
    c.start_tms(slots=2)
    api = Api(c)
    wf = api.create_workflow()
    queues = {q.alias: q.queue_id for q in wf.queues}
    uuid = wf.taskforces[0].taskforce_uuid
    api.publish(queues["in"], N_EVENTS)
    done_at_kill = wait_for(
        lambda: (n := api.taskforce(uuid).counters.tasks_succeeded) >= N_EVENTS // 3 and n,
        WAIT_S,
        "a third of the events done",
    )
    assert done_at_kill < N_EVENTS, "the WMS is killed mid-run"
    assert c.wms is not None
    c.wms.stop(signal.SIGKILL)
    killed_at = time.time()
    restart_offset = (c.root / "wms.log").stat().st_size
    time.sleep(down_s)  # the outage itself
    c.start_wms(port=c.wms_port)
    [listening] = [
        r for r in log_records(c.root / "wms.log", restart_offset) if r["event"] == "wms listening"
    ]
    back_at = when(listening)

    got = api.collect(queues["out"], N_EVENTS)
    assert set(range(N_EVENTS)) <= set(got), f"lost: {sorted(set(range(N_EVENTS)) - set(got))}"
    # Duplicates only for events in flight at the kill: the deliveries the two pilots hold
    # (IN_FLIGHT_MAX), plus those acked on the stream whose acks the embedded broker had not yet
    # committed (its acks are written behind, in batches); at this task rate (2 pilots x 20 tasks/s)
    # that is at most another IN_FLIGHT_MAX. An output whose publish the WMS committed just before
    # the kill, and never answered, is published again, so one event may appear three times.
    duplicated = [i for i, n in collections.Counter(got).items() if n > 1]
    assert len(duplicated) <= 2 * IN_FLIGHT_MAX, duplicated
    stats = api.stats(queues["in"])
    assert stats.ready == 0
    api.finish(wf.workflow.workflow_id)
    wait_for(
        lambda: api.taskforce(uuid).phase == taskforce_pb2.TASKFORCE_PHASE_CONDOR_COMPLETE,
        WAIT_S,
        "the taskforce to complete",
    )

    # The same two pilot jobs ran the whole run: one submit, two starts, nothing added.
    jobs = c.job_log()
    assert [r["event"] for r in jobs].count("submit") == 1
    starts = [r for r in jobs if r["event"] == "execute"]
    assert len(starts) == 2, starts
    ends = [r for r in jobs if r["event"] in ("terminated", "exited", "aborted")]
    assert len(ends) == 2 and all(r["exit_code"] == 0 for r in ends), ends
    assert all(r["time"] > back_at for r in ends), "a pilot ended during the outage"
    assert len(api.taskforces(wf.workflow.workflow_id)) == 1, "workers were added"

    # Reconnection after the WMS's return: the TMS's stream and each pilot's status stream (and,
    # on the embedded broker, its input subscription), as the restarted WMS and the pilots logged.
    wms_records = log_records(c.root / "wms.log", restart_offset)
    tms_back = first_after(wms_records, "tms connected", killed_at)
    assert tms_back is not None, "the TMS did not reconnect"
    pilots_back: dict[str, float] = {}
    for r in wms_records:
        if r.get("event") == "pilot connected":
            pilots_back.setdefault(r["worker_id"], when(r))
    assert len(pilots_back) == 2, f"pilots reconnected: {sorted(pilots_back)}"
    logs = pilot_logs(c, uuid)
    assert len(logs) == 2
    resubscribed = []
    for path in logs:
        records = log_records(path)
        finished = [r for r in records if r.get("event") == "pilot finished"]
        assert len(finished) == 1 and when(finished[0]) > back_at, path.read_text()
        # Nothing the outage did counts as a task failure.
        assert finished[0]["failed"] == 0, path.read_text()
        t = first_after(records, "input queue re-subscribed", killed_at)
        if backend == "embedded":
            assert t is not None, f"no re-subscription after the return:\n{path.read_text()}"
        if t is not None:
            resubscribed.append(t)
    reconnect = {
        "tms": max(0.0, tms_back - back_at),
        "pilot status": max(0.0, max(pilots_back.values()) - back_at),
    }
    if resubscribed:
        reconnect["pilot intake"] = max(0.0, max(resubscribed) - back_at)
    outcome(
        f"WMS kill -9, {down_s} s down",
        backend,
        events_in=N_EVENTS,
        events_out=len(got),
        duplicates=len(got) - len(set(got)),
        lost=N_EVENTS - len(set(got) & set(range(N_EVENTS))),
        recovery_s=max(reconnect.values()),
        detail=(
            "reconnect after return: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in reconnect.items())
            + "; same 2 pilots, no worker added"
        ),
        extra={"done_at_kill": done_at_kill, **reconnect},
    )
