"""``ewms watch``: a workflow's live status, and the view of it that ``ewms run`` shares."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format

from ewms.v1 import queue_pb2, taskforce_pb2, workflow_service_pb2_grpc
from ewms.v1 import workflow_service_pb2 as WS
from services.cli.connection import resolve_token
from services.cli.options import Parents
from services.cli.workflows import job_exit_label
from services.config import ClientSettings

Phase = taskforce_pb2.TaskforcePhase
TERMINAL = (Phase.TASKFORCE_PHASE_CONDOR_COMPLETE, Phase.TASKFORCE_PHASE_CANCELLED)


def add_commands(sub: Any, parents: Parents) -> None:
    """Register ``watch``."""
    p = sub.add_parser("watch", parents=[parents.client], help="show a workflow's live status")
    p.add_argument("workflow_id")
    p.set_defaults(run=watch_command, needs_wms=False)


def watch_command(args: Any) -> int:
    settings = ClientSettings.from_env()
    address = args.wms or settings.wms_address
    token = resolve_token(args.token, settings, address, args.data_dir or settings.data_dir)

    async def watch() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            view = WorkflowView()
            async for msg in stub.WatchWorkflow(
                WS.WatchWorkflowRequest(workflow_id=args.workflow_id), metadata=metadata
            ):
                if args.json:
                    print(
                        json.dumps(
                            json_format.MessageToDict(msg, preserving_proto_field_name=True)
                        ),
                        flush=True,
                    )
                    continue
                view.apply(msg)
                print(view.describe(time.strftime("%H:%M:%S")), flush=True)

    try:
        asyncio.run(watch())
    except KeyboardInterrupt:
        return 130
    return 0


@dataclass
class WorkflowView:
    """A workflow as a watch stream made it so far."""

    workflow: Any = None
    taskforces: dict[str, taskforce_pb2.Taskforce] = field(default_factory=dict)
    stats: dict[str, queue_pb2.QueueStats] = field(default_factory=dict)

    def apply(self, msg: WS.WatchWorkflowResponse) -> None:
        if msg.HasField("workflow"):
            self.workflow = msg.workflow
        for tf in msg.taskforces:
            self.taskforces[tf.taskforce_uuid] = tf
        for s in msg.queue_stats:
            self.stats[s.queue_id] = s

    def workers(self, state: int) -> int:
        return sum(
            c.count
            for tf in self.taskforces.values()
            for c in tf.compound_statuses
            if c.job_state == state
        )

    def tasks_failed(self) -> int:
        return sum(tf.counters.tasks_failed for tf in self.taskforces.values())

    def all_terminal(self) -> bool:
        return bool(self.taskforces) and all(
            tf.phase in TERMINAL for tf in self.taskforces.values()
        )

    def describe(self, stamp: str) -> str:
        lines = []
        wf = self.workflow
        state = "active"
        if wf is not None and wf.deactivated:
            state = "finished" if wf.deactivated == 2 else "aborted"
        lines.append(f"[{stamp}] {wf.workflow_id if wf is not None else '?'} ({state})")
        for tf in self.taskforces.values():
            phase = Phase.Name(tf.phase).removeprefix("TASKFORCE_PHASE_").lower().replace("_", "-")
            compound = ", ".join(
                f"{taskforce_pb2.JobState.Name(c.job_state).removeprefix('JOB_STATE_')}"
                f"{': ' + c.hold_reason if c.hold_reason else ''}"
                f"{' (' + job_exit_label(c) + ')' if c.HasField('job_exit') else ''}"
                f"/{taskforce_pb2.PilotPhase.Name(c.pilot_phase).removeprefix('PILOT_PHASE_')}"
                f"={c.count}"
                for c in tf.compound_statuses
            )
            c = tf.counters
            lines.append(
                f"  {tf.taskforce_uuid} {phase:<16} ok {c.tasks_succeeded} failed "
                f"{c.tasks_failed} | {compound or 'no workers yet'}"
            )
            for error, n in tf.top_task_errors.items():
                lines.append(f"    error x{n}: {error.splitlines()[0][:100] if error else ''}")
        for s in self.stats.values():
            lines.append(
                f"  queue {s.queue_id}: ready {s.ready} in flight {s.in_flight} acked {s.acked} "
                f"dead {s.dead_lettered}"
            )
        return "\n".join(lines)
