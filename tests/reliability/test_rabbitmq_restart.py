"""Scenario 3: RabbitMQ restarted mid-run. The broker is a private node this test starts on spare
ports (tests/reliability/private_rabbitmq.py), so the machine's shared broker is untouched. The
WMS and the pilots reconnect by themselves and nothing is lost; events in flight at the restart
may come twice (their acks died with the broker's channels).

The deployment is served (``ewms wms serve`` and a local TMS as subprocesses) and driven through
the WMS's gRPC API, as ``ewms run --wms`` drives it: ``ewms run`` itself gives up at the broker's
first refused call (exit 6, and it aborts the workflow)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from ewms.v1 import event_service_pb2 as ES
from ewms.v1 import event_service_pb2_grpc, queue_pb2, taskforce_pb2, workflow_service_pb2_grpc
from ewms.v1 import workflow_service_pb2 as WS
from services.cli.workflows import read_request
from tests.e2e.conftest import Cluster, wait_for
from tests.e2e.test_run import slow_workflow
from tests.reliability.private_rabbitmq import PrivateRabbit, server_script
from tests.reliability.test_process_faults import PREFETCH, no_worker_lost, tally

N = 60
WAIT = 90  # seconds any awaited change may take on a loaded machine
# Errors of calls made while the WMS has not yet reconnected to the restarted broker.
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)


class Api:
    """The served WMS's gRPC API, as its local admin (one channel)."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.channel = grpc.insecure_channel(c.address)
        self.workflows = workflow_service_pb2_grpc.WorkflowServiceStub(self.channel)
        self.events = event_service_pb2_grpc.EventServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {c.token()}"),)

    def call(self, method: Any, request: Any) -> Any:
        return method(request, metadata=self.metadata, timeout=30)

    def taskforce(self, uuid: str) -> taskforce_pb2.Taskforce:
        request = WS.GetTaskforceRequest(taskforce_uuid=uuid)
        tf: taskforce_pb2.Taskforce = self.call(self.workflows.GetTaskforce, request)
        return tf

    def counters(self, uuid: str) -> taskforce_pb2.TaskCounters:
        return self.taskforce(uuid).counters

    def complete(self, uuid: str) -> taskforce_pb2.Taskforce | None:
        tf = self.taskforce(uuid)
        return tf if tf.phase == taskforce_pb2.TASKFORCE_PHASE_CONDOR_COMPLETE else None

    def collect(self, queue_id: str, outputs: list[int], until: Callable[[], bool]) -> None:
        """Receive and ack outputs into ``outputs`` until ``until()``; calls refused while the
        WMS reconnects to the broker are tried again (within WAIT)."""
        deadline = time.monotonic() + WAIT
        while not until():
            assert time.monotonic() < deadline, f"{len(set(outputs))} of {N} outputs"
            try:
                got = self.call(
                    self.events.Receive,
                    ES.ReceiveRequest(queue_id=queue_id, max_events=100, wait_seconds=1),
                )
                if got.deliveries:
                    outputs.extend(json.loads(d.event.payload)["i"] for d in got.deliveries)
                    ack = ES.AckRequest(
                        queue_id=queue_id, ack_ids=[d.ack_id for d in got.deliveries]
                    )
                    self.call(self.events.Ack, ack)
            except grpc.RpcError as exc:
                if exc.code() not in TRANSIENT:  # type: ignore[attr-defined]
                    raise
                time.sleep(0.2)


@pytest.fixture
def rabbit(tmp_path: Path) -> Any:
    if server_script() is None:
        pytest.skip("needs rabbitmq-server installed (a private node is started)")
    node = PrivateRabbit(tmp_path / "rabbit")
    try:
        yield node
    finally:
        node.delete()


def test_a_rabbitmq_restart_mid_run_loses_nothing_and_everyone_reconnects(
    tmp_path: Path,
    cluster: Callable[..., Cluster],
    rabbit: PrivateRabbit,
    outcome: Callable[..., Any],
) -> None:
    first_start = rabbit.start()
    c = cluster(
        "rabbitmq",
        EWMS_RABBITMQ_URL=rabbit.url,
        EWMS_RABBITMQ_MANAGEMENT_URL=rabbit.management_url,
    )
    c.start_wms()
    c.start_tms(slots=2)
    api = Api(c)
    body = json.loads(slow_workflow(tmp_path / "wf.json", sleep=0.2).read_text())
    body["tasks"][0]["pilot_config"] = {"environment": {"EWMS_PILOT_PREFETCH": PREFETCH}}
    (tmp_path / "wf.json").write_text(json.dumps(body))
    created = api.call(api.workflows.CreateWorkflow, read_request(str(tmp_path / "wf.json")))
    queues = {q.alias: q.queue_id for q in created.queues}
    [uuid] = [tf.taskforce_uuid for tf in created.taskforces]
    events = [queue_pb2.Event(payload=json.dumps({"i": i}).encode()) for i in range(N)]
    api.call(api.events.Publish, ES.PublishRequest(queue_id=queues["in"], events=events))
    outputs: list[int] = []
    api.collect(queues["out"], outputs, lambda: len(outputs) >= 10)

    down_at = time.monotonic()
    rabbit.stop()
    restart = rabbit.start()
    down = time.monotonic() - down_at
    succeeded = api.counters(uuid).tasks_succeeded
    back_at = time.monotonic()
    wait_for(
        lambda: api.counters(uuid).tasks_succeeded > succeeded, WAIT, "the pilots to task again"
    )
    recovery = time.monotonic() - back_at
    api.collect(queues["out"], outputs, lambda: set(outputs) >= set(range(N)))
    # Then until the queues are settled: a duplicate may still be on its way.
    api.collect(queues["out"], outputs, lambda: settled(api, queues))
    finish = WS.FinishWorkflowRequest(workflow_id=created.workflow.workflow_id)
    api.call(api.workflows.FinishWorkflow, finish)
    done = wait_for(lambda: api.complete(uuid), WAIT, "the taskforce to complete")
    api.channel.close()

    events_out, duplicates, lost = tally(outputs, set(range(N)))
    assert lost == 0
    # Events in flight at the restart (at most each pilot's prefetch) may be done twice.
    assert duplicates <= 2 * PREFETCH, Counter(outputs).most_common(5)
    no_worker_lost(list(done.compound_statuses))  # the same pilots, reconnected, ended DONE
    assert len(rabbit.start_seconds) == 2
    outcome(
        "RabbitMQ restarted mid-run (private node)",
        "rabbitmq",
        events_in=N,
        events_out=events_out,
        duplicates=duplicates,
        lost=lost,
        recovery_s=recovery,
        detail=(
            f"broker down {down:.1f} s (clean stop, start {restart:.1f} s; first start "
            f"{first_start:.1f} s); recovery: broker up until the pilots succeed a task again"
        ),
    )


def settled(api: Api, queues: dict[str, str]) -> bool:
    """Nothing ready or in flight in the input queue, nor ready in the output queue."""
    stats = [
        api.call(api.events.GetQueueStats, ES.GetQueueStatsRequest(queue_id=q))
        for q in (queues["in"], queues["out"])
    ]
    return not (stats[0].ready or stats[0].in_flight or stats[1].ready)
