"""The pilot's environment for a start command: what the original TMS injects into
``pilot_config.environment`` (UPSTREAM.md §2.3), built from the ``StartTaskforce`` the WMS sends.

Precedence, lowest first: the user's ``pilot_config.environment``, the site's settings
(``EWMS_TMS_PILOT_ENV``), then what the WMS decides (task, queues, credentials, identity), which
nobody overrides. Unlike the original (whose TMS values were defaults a user could override), the
site's values win: a site that sets ``EWMS_PILOT_RUNTIME=bwrap`` means every pilot to sandbox its
tasks. Names the site locks (``EWMS_TMS_PILOT_LOCKED``; by default the runtime, network and mount
settings) a user may not set at all, and a user's variable outside the rules of
``services.env_rules`` (a workflow stored before them) refuses the start too: either fails the
submit with the variable's name rather than starting a pilot the site did not mean. Unlike the
original, site values may also name the ``_EWMS_PILOT_*`` variables (its quirk #5 silently dropped
them).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import structlog
from google.protobuf import json_format, struct_pb2

from ewms.v1 import queue_pb2, task_manager_service_pb2, taskforce_pb2
from services.env_rules import PILOT_PREFIXES, pilot_env_problem
from services.tms.scheduler import SubmitSpec, WorkerResources

log = structlog.get_logger(__name__)

# What a user may not set unless the site says otherwise: the runtime (and so the sandbox), the
# task's network, and what is mounted or written on the host.
DEFAULT_LOCKED = frozenset(
    {
        "EWMS_PILOT_RUNTIME",
        "_EWMS_PILOT_CONTAINER_PLATFORM",
        "EWMS_PILOT_TASK_NETWORK",
        "EWMS_PILOT_EXTERNAL_DIRECTORIES",
        "EWMS_PILOT_HIDDEN_DIRECTORIES",
        "EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST",
        "_EWMS_PILOT_APPTAINER_BUILD_WORKDIR",
    }
)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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


def parse_locked(text: str) -> frozenset[str]:
    """``EWMS_TMS_PILOT_LOCKED``: variable names separated by commas or spaces."""
    names = frozenset(n for n in re.split(r"[\s,]+", text) if n)
    bad = sorted(n for n in names if not _NAME.match(n))
    if bad:
        raise PilotEnvError(f"EWMS_TMS_PILOT_LOCKED: {', '.join(map(repr, bad))} are not names")
    return names


@dataclass(frozen=True)
class SiteEnv:
    """The site's pilot settings: ``values`` win over a user's ``pilot_config.environment``, and
    a user may not set the ``locked`` names at all."""

    values: Mapping[str, str] = field(default_factory=dict)
    locked: frozenset[str] = DEFAULT_LOCKED

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SiteEnv:
        """``EWMS_TMS_PILOT_ENV`` and ``EWMS_TMS_PILOT_LOCKED`` (unset: DEFAULT_LOCKED; set,
        exactly the names given, so a site may also unlock)."""
        locked = env.get("EWMS_TMS_PILOT_LOCKED")
        return cls(
            parse_defaults(env.get("EWMS_TMS_PILOT_ENV", "")),
            DEFAULT_LOCKED if locked is None else parse_locked(locked),
        )

    def hiding(self, directory: Path) -> SiteEnv:
        """These settings, with ``directory`` added to the ones bwrap tasks may not see
        (``EWMS_PILOT_HIDDEN_DIRECTORIES``): a local TMS hides the data directory of the WMS
        beside it, which holds the secret that signs every token."""
        name = "EWMS_PILOT_HIDDEN_DIRECTORIES"
        hidden = [p for p in re.split(r"[,;\s]+", self.values.get(name, "")) if p]
        values = {**self.values, name: ",".join([*hidden, str(directory.absolute())])}
        return replace(self, values=values)


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


def _users_environment(tf: taskforce_pb2.Taskforce, site: SiteEnv) -> dict[str, str]:
    """The user's ``pilot_config.environment`` as text; PilotEnvError naming every variable the
    user may not set."""
    env: dict[str, str] = {}
    refused: list[str] = []
    for name, value in sorted(tf.pilot_config.environment.items()):
        problem = pilot_env_problem(name)
        if problem is None and name in site.locked:
            problem = "refused: fixed by this site (EWMS_TMS_PILOT_LOCKED)"
        if problem is None:
            env[name] = _value_text(value)
        else:
            refused.append(f"pilot_config.environment.{name}: {problem}")
    if refused:
        raise PilotEnvError("; ".join(refused))
    overridden = sorted(n for n, v in site.values.items() if env.get(n, v) != v)
    if overridden:
        # Values are not logged: they may be secrets.
        log.warning(
            "site pilot settings override the user's",
            taskforce_uuid=tf.taskforce_uuid,
            names=overridden,
        )
    return env


def pilot_environment(
    start: task_manager_service_pb2.StartTaskforce, site: SiteEnv = SiteEnv()
) -> dict[str, str]:
    """The complete pilot environment of a start command, except the per-worker
    ``EWMS_PILOT_WORKER_ID``."""
    tf, td = start.taskforce, start.task_directive
    env = _users_environment(tf, site)
    env.update(site.values)
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
    start: task_manager_service_pb2.StartTaskforce, site: SiteEnv = SiteEnv()
) -> SubmitSpec:
    """The scheduler's view of a start command."""
    tf = start.taskforce
    wc = tf.worker_config
    return SubmitSpec(
        taskforce_uuid=tf.taskforce_uuid,
        n_workers=tf.n_workers,
        environment=pilot_environment(start, site),
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
