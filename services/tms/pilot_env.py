"""The pilot's environment for a start command: what the original TMS injects into
``pilot_config.environment`` (UPSTREAM.md §2.3), built from the ``StartTaskforce`` the WMS sends.

Precedence, lowest first: the TMS's defaults (``EWMS_TMS_PILOT_ENV``), the user's
``pilot_config.environment``, then what the WMS decides (task, queues, credentials, identity),
which nobody overrides. Unlike the original, defaults may also name the ``_EWMS_PILOT_*`` variables
(its quirk #5 silently dropped them).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from google.protobuf import json_format, struct_pb2

from ewms.v1 import queue_pb2, task_manager_service_pb2
from services.tms.scheduler import SubmitSpec, WorkerResources

PILOT_PREFIXES = ("EWMS_PILOT_", "_EWMS_PILOT_")


class PilotEnvError(ValueError):
    """A start command that cannot become a pilot environment."""


def parse_defaults(text: str) -> dict[str, str]:
    """``EWMS_TMS_PILOT_ENV``: shell-quoted ``NAME=value`` words; names must start with
    ``EWMS_PILOT_`` or ``_EWMS_PILOT_``."""
    out: dict[str, str] = {}
    for word in shlex.split(text):
        name, sep, value = word.partition("=")
        if not sep or not name.startswith(PILOT_PREFIXES):
            raise PilotEnvError(
                f"EWMS_TMS_PILOT_ENV: {word!r} is not NAME=value with NAME starting EWMS_PILOT_"
            )
        out[name] = value
    return out


def _value_text(value: struct_pb2.Value) -> str:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return str(int(number)) if number.is_integer() else str(number)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "list_value":
        return ",".join(_value_text(v) for v in value.list_value.values)
    if kind == "null_value" or kind is None:
        return ""
    return json.dumps(json_format.MessageToDict(value), sort_keys=True)


def _broker_type(queue: queue_pb2.Queue) -> str:
    if queue.backend == queue_pb2.QUEUE_BACKEND_RABBITMQ:
        return "rabbitmq"
    return "embedded"


def broker_address(queue: queue_pb2.Queue) -> str:
    """Where the pilot reaches the queue: the WMS for embedded queues, else the AMQP URL with the
    workflow's broker user (the password travels as the side's auth token)."""
    if queue.backend != queue_pb2.QUEUE_BACKEND_RABBITMQ or not queue.credentials.username:
        return queue.address
    parts = urlsplit(queue.address)
    netloc = f"{queue.credentials.username}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _queue_side(
    env: dict[str, str],
    side: str,
    ids: list[str],
    queues: Mapping[str, queue_pb2.Queue],
    pilot_token: str,
) -> None:
    if not ids:
        return
    missing = [q for q in ids if q not in queues]
    if missing:
        raise PilotEnvError(f"start command lacks the profile of queue(s) {', '.join(missing)}")
    first = queues[ids[0]]
    prefix = f"EWMS_PILOT_QUEUE_{side}"
    env[prefix] = ";".join(ids)
    env[f"{prefix}_BROKER_TYPE"] = _broker_type(first)
    env[f"{prefix}_BROKER_ADDRESS"] = broker_address(first)
    env[f"{prefix}_AUTH_TOKEN"] = (
        first.credentials.password
        if first.backend == queue_pb2.QUEUE_BACKEND_RABBITMQ
        else pilot_token
    )
    env[f"{prefix}_MAX_ATTEMPTS"] = str(first.max_attempts or 3)


def pilot_environment(
    start: task_manager_service_pb2.StartTaskforce, defaults: Mapping[str, str] = {}
) -> dict[str, str]:
    """The complete pilot environment of a start command, except the per-worker
    ``EWMS_PILOT_WORKER_ID``."""
    tf, td = start.taskforce, start.task_directive
    env = dict(defaults)
    for name, value in tf.pilot_config.environment.items():
        env[name] = _value_text(value)
    decided: dict[str, str] = {}
    if td.task_image:
        decided["EWMS_PILOT_TASK_IMAGE"] = td.task_image
    if td.task_args:
        decided["EWMS_PILOT_TASK_ARGS"] = td.task_args
    if td.task_env:
        decided["EWMS_PILOT_TASK_ENV_JSON"] = json.dumps(dict(td.task_env), sort_keys=True)
    if td.init_image:
        decided["EWMS_PILOT_INIT_IMAGE"] = td.init_image
    if td.init_args:
        decided["EWMS_PILOT_INIT_ARGS"] = td.init_args
    if td.init_env:
        decided["EWMS_PILOT_INIT_ENV_JSON"] = json.dumps(dict(td.init_env), sort_keys=True)
    queues = {q.queue_id: q for q in start.queues}
    _queue_side(decided, "INCOMING", list(td.input_queues), queues, start.pilot_token)
    _queue_side(decided, "OUTGOING", list(td.output_queues), queues, start.pilot_token)
    decided["EWMS_PILOT_WMS_ADDRESS"] = start.wms_address
    decided["EWMS_PILOT_TOKEN"] = start.pilot_token
    decided["EWMS_PILOT_TASKFORCE_UUID"] = tf.taskforce_uuid
    env.update(decided)
    return env


def _size(value: struct_pb2.Value) -> int:
    return int(value.number_value) if value.WhichOneof("kind") == "number_value" else 0


def submit_spec(
    start: task_manager_service_pb2.StartTaskforce, defaults: Mapping[str, str] = {}
) -> SubmitSpec:
    """The scheduler's view of a start command."""
    tf = start.taskforce
    wc = tf.worker_config
    return SubmitSpec(
        taskforce_uuid=tf.taskforce_uuid,
        n_workers=tf.n_workers,
        environment=pilot_environment(start, defaults),
        resources=WorkerResources(
            n_cores=wc.n_cores or 1,
            memory_bytes=_size(wc.worker_memory),
            disk_bytes=_size(wc.worker_disk),
            max_runtime_seconds=wc.max_worker_runtime,
            priority=wc.priority,
            condor_requirements=wc.condor_requirements,
            transfer_stdouterr=wc.do_transfer_worker_stdouterr,
        ),
        input_files=tuple(tf.pilot_config.input_files),
        pilot_tag=tf.pilot_config.tag or "latest",
        pilot_image_source=tf.pilot_config.image_source or "auto",
    )
