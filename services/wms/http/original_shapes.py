"""Our objects in the original EWMS's JSON shapes (its OpenAPI ``components.schemas``), key for key,
so that its clients read them unchanged: epoch-second floats for times, ``null`` for what is not
set yet, its phase and status strings, and no keys of ours (its schemas forbid extra properties).

Where we differ from the original, the nearest honest value is used (see each function).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from ewms.v1 import queue_pb2, taskforce_pb2, workflow_pb2

Phase = taskforce_pb2.TaskforcePhase
Job = taskforce_pb2.JobState
Pilot = taskforce_pb2.PilotPhase

# The original's TaskforcePhase strings. Its taskforces stopped before submission stay in
# pending-stopper for good (UPSTREAM §9.10); ours move to an explicit terminal CANCELLED, shown as
# that same pending-stopper, the state an original client expects such a taskforce to end in.
PHASES: Mapping[int, str] = {
    Phase.TASKFORCE_PHASE_PRE_MQ_ACTIVATION: "pre-mq-activation",
    Phase.TASKFORCE_PHASE_PRE_LAUNCH: "pre-launch",
    Phase.TASKFORCE_PHASE_PENDING_STARTER: "pending-starter",
    Phase.TASKFORCE_PHASE_CONDOR_SUBMIT: "condor-submit",
    Phase.TASKFORCE_PHASE_PENDING_STOPPER: "pending-stopper",
    Phase.TASKFORCE_PHASE_CONDOR_RM: "condor-rm",
    Phase.TASKFORCE_PHASE_CONDOR_COMPLETE: "condor-complete",
    Phase.TASKFORCE_PHASE_CANCELLED: "pending-stopper",
}
# HTCondor's JobStatus names, as the original's TMS keys compound statuses with them.
JOB_STATUSES: Mapping[int, str] = {
    Job.JOB_STATE_IDLE: "IDLE",
    Job.JOB_STATE_RUNNING: "RUNNING",
    Job.JOB_STATE_HELD: "HELD",
    Job.JOB_STATE_SUSPENDED: "SUSPENDED",
    Job.JOB_STATE_COMPLETED: "COMPLETED",
    Job.JOB_STATE_REMOVED: "REMOVED",
    Job.JOB_STATE_TRANSFERRING_OUTPUT: "TRANSFERRING_OUTPUT",
}
# The original pilot's PilotStatus strings (HTChirpEWMSPilotStatus).
PILOT_STATUSES: Mapping[int, str] = {
    Pilot.PILOT_PHASE_STARTED: "Started",
    Pilot.PILOT_PHASE_RUNNING_INIT: "RunningInitCommand",
    Pilot.PILOT_PHASE_AWAITING_FIRST_EVENT: "AwaitingFirstMessage",
    Pilot.PILOT_PHASE_TASKING: "Tasking",
    Pilot.PILOT_PHASE_DRAINING: "PendingRemainingTasks",
    Pilot.PILOT_PHASE_FATAL_ERROR: "FatalError",
    Pilot.PILOT_PHASE_DONE: "Done",
}
# How the original's JSON spells a status that was not reported (Python's None as a JSON key).
NOT_REPORTED = "null"
DEACTIVATIONS: Mapping[int, str | None] = {
    workflow_pb2.DEACTIVATION_UNSPECIFIED: None,
    workflow_pb2.DEACTIVATION_ABORTED: "ABORTED",
    workflow_pb2.DEACTIVATION_FINISHED: "FINISHED",
}
# MQProfile.broker_type of an embedded queue. No MQClient backend reaches it: it is served by the
# WMS's own EventService (gRPC, or REST on the gateway) with the owner's EWMS token.
EMBEDDED_BROKER_TYPE = "ewms-embedded"
RABBITMQ_BROKER_TYPE = "rabbitmq"
DEFAULT_VHOST_PATHS = ("", "/", "/%2F", "/%2f")

WORKFLOW_FIELDS = ("workflow_id", "timestamp", "priority", "deactivated", "deactivated_ts")
TASK_DIRECTIVE_FIELDS = (
    "task_id",
    "workflow_id",
    "cluster_locations",
    "task_image",
    "task_args",
    "task_env",
    "init_image",
    "init_args",
    "init_env",
    "timestamp",
    "input_queues",
    "output_queues",
)
TASKFORCE_FIELDS = (
    "taskforce_uuid",
    "task_id",
    "workflow_id",
    "timestamp",
    "priority",
    "collector",
    "schedd",
    "n_workers",
    "pilot_config",
    "worker_config",
    "cluster_id",
    "submit_dict",
    "job_event_log_fpath",
    "phase",
    "phase_change_log",
    "compound_statuses",
    "top_task_errors",
)


def epoch(ts: timestamp_pb2.Timestamp) -> float:
    """A timestamp as epoch seconds."""
    return ts.ToNanoseconds() / 1e9


def _epoch_if_set(ts: timestamp_pb2.Timestamp, is_set: bool) -> float | None:
    return epoch(ts) if is_set else None


def workflow(wf: workflow_pb2.Workflow) -> dict[str, Any]:
    """A WorkflowObject. ``priority`` is ours (0..100, default 50), not the original's
    ``max(priority, 100)`` (UPSTREAM §9.1)."""
    return {
        "workflow_id": wf.workflow_id,
        "timestamp": epoch(wf.timestamp),
        "priority": wf.priority,
        "deactivated": DEACTIVATIONS[wf.deactivated],
        "deactivated_ts": _epoch_if_set(wf.deactivated_ts, wf.HasField("deactivated_ts")),
    }


def task_directive(td: workflow_pb2.TaskDirective) -> dict[str, Any]:
    """A TaskDirectiveObject; ``input_queues`` and ``output_queues`` hold queue ids, which are the
    ``mqid`` of the queues' MQ profiles."""
    return {
        "task_id": td.task_id,
        "workflow_id": td.workflow_id,
        "cluster_locations": list(td.cluster_locations),
        "task_image": td.task_image,
        "task_args": td.task_args,
        "task_env": dict(td.task_env),
        "init_image": td.init_image,
        "init_args": td.init_args,
        "init_env": dict(td.init_env),
        "timestamp": epoch(td.timestamp),
        "input_queues": list(td.input_queues),
        "output_queues": list(td.output_queues),
    }


def taskforce(
    tf: taskforce_pb2.Taskforce, sizes_as_sent: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A TaskforceObject. ``schedd`` is the canonical cluster location (our TMSs are named by
    location, not by schedd host); ``collector`` is always null, as in the original.
    ``sizes_as_sent`` overrides ``worker_config``'s worker_disk and worker_memory with the values
    of the request (otherwise the stored as-sent values are used; see ``worker_config``)."""
    return {
        "taskforce_uuid": tf.taskforce_uuid,
        "task_id": tf.task_id,
        "workflow_id": tf.workflow_id,
        "timestamp": epoch(tf.timestamp),
        "priority": tf.priority,
        "collector": None,
        "schedd": tf.cluster_location,
        "n_workers": tf.n_workers,
        "pilot_config": pilot_config(tf.pilot_config),
        "worker_config": worker_config(tf.worker_config, sizes_as_sent),
        "cluster_id": tf.cluster_id or None,
        "submit_dict": dict(tf.submit_dict),
        "job_event_log_fpath": tf.job_event_log_fpath,
        "phase": phase_name(tf.phase),
        "phase_change_log": [phase_change(c) for c in tf.phase_change_log],
        "compound_statuses": compound_statuses(tf.compound_statuses),
        "top_task_errors": dict(tf.top_task_errors),
    }


def pilot_config(pc: taskforce_pb2.PilotConfig) -> dict[str, Any]:
    """The original's pilot_config (all four keys)."""
    return {
        "tag": pc.tag,
        "image_source": pc.image_source,
        "environment": {name: json_value(v) for name, v in pc.environment.items()},
        "input_files": list(pc.input_files),
    }


def worker_config(
    wc: taskforce_pb2.WorkerConfig, sizes_as_sent: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The original's worker_config (all seven keys; condor_requirements "" when none). The sizes
    are as the request sent them: ``sizes_as_sent`` if given, else the stored as-sent values, else
    (taskforces created before those were kept) the stored bytes."""
    sizes = sizes_as_sent or {}
    return {
        "do_transfer_worker_stdouterr": wc.do_transfer_worker_stdouterr,
        "max_worker_runtime": wc.max_worker_runtime,
        "n_cores": wc.n_cores,
        "priority": wc.priority,
        "worker_disk": sizes.get("worker_disk", _size_as_sent(wc, "worker_disk")),
        "worker_memory": sizes.get("worker_memory", _size_as_sent(wc, "worker_memory")),
        "condor_requirements": wc.condor_requirements,
    }


def _size_as_sent(wc: taskforce_pb2.WorkerConfig, field: str) -> Any:
    as_sent: struct_pb2.Value = getattr(wc, f"{field}_as_sent")
    if as_sent.WhichOneof("kind") in ("string_value", "number_value"):
        return json_value(as_sent)
    return json_value(getattr(wc, field))


def json_value(value: struct_pb2.Value) -> Any:
    """A protobuf Value as plain JSON, integral numbers as integers (protobuf keeps doubles)."""
    data = json_format.MessageToDict(value)
    if isinstance(data, float) and data.is_integer():
        return int(data)
    return data


def phase_name(phase: int) -> str:
    """The original's string for a phase; one it lacks (a phase added after these) is shown as our
    own name in its style (``TASKFORCE_PHASE_X_Y`` → ``x-y``), never an error."""
    if phase in PHASES:
        return PHASES[phase]
    try:
        name = Phase.Name(phase)  # type: ignore[arg-type]
    except ValueError:
        return NOT_REPORTED
    return name.removeprefix("TASKFORCE_PHASE_").lower().replace("_", "-")


def phase_change(change: taskforce_pb2.PhaseChange) -> dict[str, Any]:
    """One phase_change_log entry."""
    return {
        "target_phase": phase_name(change.target_phase),
        "timestamp": epoch(change.timestamp),
        "was_successful": change.was_successful,
        "source_event_time": _epoch_if_set(
            change.source_event_time, change.HasField("source_event_time")
        ),
        "source_entity": change.source_entity,
        "context": change.context,
    }


def job_status(status: taskforce_pb2.CompoundStatus) -> str:
    """The original's JobStatus key: ``RUNNING``, ``HELD: <reason>``, ... (``null`` if unknown)."""
    name = JOB_STATUSES.get(status.job_state)
    if name is None:
        return NOT_REPORTED
    if status.job_state == Job.JOB_STATE_HELD and status.hold_reason:
        return f"{name}: {status.hold_reason}"
    return name


def compound_statuses(
    statuses: Iterable[taskforce_pb2.CompoundStatus],
) -> dict[str, dict[str, int]]:
    """``{JobStatus: {pilot status: count}}``, summed where two of ours map to one key."""
    out: dict[str, dict[str, int]] = {}
    for status in statuses:
        pilots = out.setdefault(job_status(status), {})
        pilot = PILOT_STATUSES.get(status.pilot_phase, NOT_REPORTED)
        pilots[pilot] = pilots.get(pilot, 0) + status.count
    return out


def deactivated(workflow_id: str, n_taskforces: int) -> dict[str, Any]:
    """A DeactivatedWorkflowResponseObject."""
    return {"workflow_id": workflow_id, "n_taskforces": n_taskforces}


def mq_profile(queue: queue_pb2.Queue, wf: workflow_pb2.Workflow) -> dict[str, Any]:
    """The MQS's MQProfileObject of one of our queues.

    - ``mqid`` is the queue id (the queue's name in its broker, as the original's mqid is).
    - ``timestamp`` is the workflow's: its queues are created in the same transaction.
    - ``is_activated``: our queues exist (with their credentials) before CreateWorkflow answers,
      so a queue is activated until it is deleted, a retention period after the workflow ended.
    - RabbitMQ: ``broker_type`` "rabbitmq", ``broker_address`` ``user@host[:port][/vhost]`` and
      ``auth_token`` the workflow user's password, which MQClient sends as the AMQP password.
    - Embedded: ``broker_type`` "ewms-embedded", ``broker_address`` the WMS's gRPC address and
      ``auth_token`` null: there is no per-queue secret; the owner's EWMS token works.
    """
    activated = not queue.HasField("deleted_ts")
    rabbit = queue.backend == queue_pb2.QUEUE_BACKEND_RABBITMQ
    token = queue.credentials.password if activated and queue.HasField("credentials") else ""
    return {
        "mqid": queue.queue_id,
        "workflow_id": queue.workflow_id,
        "timestamp": epoch(wf.timestamp),
        "alias": queue.alias,
        "is_public": queue.public,
        "is_activated": activated,
        "auth_token": token or None,
        "broker_type": RABBITMQ_BROKER_TYPE if rabbit else EMBEDDED_BROKER_TYPE,
        "broker_address": (
            rabbitmq_address(queue.address, queue.credentials.username)
            if rabbit
            else queue.address or None
        ),
    }


def rabbitmq_address(url: str, username: str) -> str:
    """The MQS's ``user@host[:port][/vhost]`` form of an AMQP URL (``amqp://host:5672/vhost``):
    the scheme only when it is not plain amqp, the vhost only when it is not the default "/"."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    address = f"{username}@{netloc}" if username else netloc
    if parts.path not in DEFAULT_VHOST_PATHS:
        address += parts.path
    if parts.scheme and parts.scheme != "amqp":
        address = f"{parts.scheme}://{address}"
    return address
