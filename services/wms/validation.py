"""Validation of workflow requests, as the original EWMS validates them, except that every violation
is collected and reported at once (BadRequest field violations) instead of the first one only.

Field paths use the request's JSON names: ``tasks[0].worker_config.worker_disk``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from google.protobuf import struct_pb2, timestamp_pb2

from ewms.v1 import taskforce_pb2, workflow_service_pb2
from services.config import ClusterLocations
from services.env_rules import pilot_env_problem
from services.errors import InvalidArgument, quoted
from services.events.client import DEFAULT_MAX_ATTEMPTS
from services.shell_words import split_problem
from services.sizes import parse_size
from services.wms import limits

DEFAULT_WORKFLOW_PRIORITY = 50
MAX_WORKFLOW_PRIORITY = 100
DEFAULT_N_WORKERS = 1
MAX_ATTEMPTS_LIMIT = 100
DEFAULT_PILOT_TAG = "latest"
IMAGE_SOURCES = ("auto", "cvmfs")

# Set from the task's own fields (task_image, task_args, task_env, init_*), never by hand: the
# original rejects them in pilot_config.environment (its PR #47).
RESERVED_PILOT_ENV = {
    "EWMS_PILOT_TASK_IMAGE": "task_image",
    "EWMS_PILOT_TASK_ARGS": "task_args",
    "EWMS_PILOT_TASK_ENV_JSON": "task_env",
    "EWMS_PILOT_INIT_IMAGE": "init_image",
    "EWMS_PILOT_INIT_ARGS": "init_args",
    "EWMS_PILOT_INIT_ENV_JSON": "init_env",
}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
QUEUE_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The original's pattern: immutable tags only ("X.Y.Z", "latest", "<name>-<suffix>").
PILOT_TAG = re.compile(
    r"^(?:[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}|latest|[a-z0-9._-]+-[a-z0-9]{1,128})$"
)


def require_fields(**fields: str) -> None:
    """INVALID_ARGUMENT naming every one of these fields that is empty."""
    missing = [(name, "required") for name, value in fields.items() if not value]
    if missing:
        raise InvalidArgument(missing)


class Violations:
    """Collects (field, description) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        """Record one violation."""
        self.items.append((field, description))

    def raise_if_any(self, what: str = "request") -> None:
        """INVALID_ARGUMENT with every violation, if there is one."""
        if self.items:
            raise InvalidArgument(self.items, what)


def validate_create_workflow(
    req: workflow_service_pb2.CreateWorkflowRequest, locations: ClusterLocations
) -> workflow_service_pb2.CreateWorkflowRequest:
    """Check a workflow request; return a normalized copy (defaults filled, locations canonical,
    sizes in bytes) or raise InvalidArgument listing every violation. Fields over their limits
    (limits.py) are refused first, alone: no other rule runs on oversized input."""
    limits.check(req)
    out = workflow_service_pb2.CreateWorkflowRequest()
    out.CopyFrom(req)
    v = Violations()

    if req.HasField("priority") and not 0 <= req.priority <= MAX_WORKFLOW_PRIORITY:
        v.add("priority", f"must be between 0 and {MAX_WORKFLOW_PRIORITY} (got {req.priority})")
    if not req.HasField("priority"):
        out.priority = DEFAULT_WORKFLOW_PRIORITY

    if not req.tasks:
        v.add("tasks", "at least one task is required")
    used_aliases: set[str] = set()
    input_attempts: dict[str, tuple[int, int]] = {}  # alias -> (max_attempts, task index)
    for i, task in enumerate(out.tasks):
        _validate_task(f"tasks[{i}]", task, locations, v)
        used_aliases.update(task.input_queue_aliases, task.output_queue_aliases)
        for alias in task.input_queue_aliases:
            first = input_attempts.setdefault(alias, (task.max_attempts, i))
            if first[0] != task.max_attempts:
                v.add(
                    f"tasks[{i}].max_attempts",
                    f"input queue {quoted(alias)} is also consumed by tasks[{first[1]}] with "
                    f"max_attempts {first[0]}; tasks sharing an input queue must agree",
                )

    _check_unique_aliases("public_queue_aliases", req.public_queue_aliases, v)
    for j, alias in enumerate(req.public_queue_aliases):
        if alias and alias not in used_aliases:
            v.add(
                f"public_queue_aliases[{j}]",
                f"alias {quoted(alias)} is not an input or output queue alias of any task",
            )
    v.raise_if_any("workflow request")
    return out


def _validate_task(
    path: str, task: workflow_service_pb2.TaskSpec, locations: ClusterLocations, v: Violations
) -> None:
    # Cluster locations: known names or aliases, stored canonically, no duplicates.
    if not task.cluster_locations:
        v.add(f"{path}.cluster_locations", "at least one cluster location is required")
    canonical: list[str] = []
    for j, name in enumerate(task.cluster_locations):
        resolved = locations.resolve(name)
        if resolved is None:
            v.add(
                f"{path}.cluster_locations[{j}]",
                f"unknown cluster location {quoted(name)}; known: {locations.describe()}",
            )
        elif resolved in canonical:
            v.add(
                f"{path}.cluster_locations[{j}]",
                f"duplicate location {quoted(name)} (= {resolved!r})",
            )
        else:
            canonical.append(resolved)
    del task.cluster_locations[:]
    task.cluster_locations.extend(canonical)

    # What runs: an image with optional args, or (no image) a command on the worker itself.
    if not task.task_image and not task.task_args.strip():
        v.add(
            f"{path}.task_args",
            "required when task_image is empty: the command to run for each event",
        )
    for field in ("task_args", "init_args"):
        if problem := split_problem(getattr(task, field)):
            v.add(f"{path}.{field}", f"cannot be split into arguments: {problem}")
    for field in ("task_env", "init_env"):
        for name in getattr(task, field):
            if not ENV_NAME.match(name):
                v.add(f"{path}.{field}.{name}", f"variable name must match {ENV_NAME.pattern}")

    for field in ("input_queue_aliases", "output_queue_aliases"):
        _check_unique_aliases(f"{path}.{field}", getattr(task, field), v)

    _validate_pilot_config(f"{path}.pilot_config", task.pilot_config, v)
    if task.HasField("worker_config"):
        _validate_worker_config(f"{path}.worker_config", task.worker_config, v)
    else:
        v.add(f"{path}.worker_config", "required")

    if not task.HasField("n_workers"):
        task.n_workers = DEFAULT_N_WORKERS
    elif not 1 <= task.n_workers <= limits.MAX_N_WORKERS:
        v.add(f"{path}.n_workers", n_workers_rule(task.n_workers))
    if not task.HasField("max_attempts"):
        task.max_attempts = DEFAULT_MAX_ATTEMPTS
    elif not 1 <= task.max_attempts <= MAX_ATTEMPTS_LIMIT:
        v.add(
            f"{path}.max_attempts",
            f"must be between 1 and {MAX_ATTEMPTS_LIMIT} (got {task.max_attempts})",
        )


def _check_unique_aliases(path: str, aliases: Iterable[str], v: Violations) -> None:
    seen: set[str] = set()
    for j, alias in enumerate(aliases):
        if not QUEUE_ALIAS.match(alias):
            v.add(
                f"{path}[{j}]",
                f"queue alias {quoted(alias)} must match {QUEUE_ALIAS.pattern}",
            )
        elif alias in seen:
            v.add(f"{path}[{j}]", f"duplicate alias {quoted(alias)}")
        seen.add(alias)


def _validate_pilot_config(path: str, pc: taskforce_pb2.PilotConfig, v: Violations) -> None:
    if not pc.tag:
        pc.tag = DEFAULT_PILOT_TAG
    elif not PILOT_TAG.match(pc.tag):
        v.add(
            f"{path}.tag",
            f"{quoted(pc.tag)} is not an immutable pilot tag ('X.Y.Z', 'latest' or "
            "'<name>-<suffix>')",
        )
    if not pc.image_source:
        pc.image_source = "auto"
    elif pc.image_source not in IMAGE_SOURCES:
        v.add(f"{path}.image_source", f"must be one of {', '.join(IMAGE_SOURCES)}")
    for name, value in pc.environment.items():
        field = f"{path}.environment.{name}"
        if name in RESERVED_PILOT_ENV:
            v.add(field, f"reserved: set the task's {RESERVED_PILOT_ENV[name]} field instead")
        elif not ENV_NAME.match(name):
            v.add(field, f"variable name must match {ENV_NAME.pattern}")
        elif problem := pilot_env_problem(name):
            v.add(field, problem)
        if not _is_env_value(value):
            v.add(
                field,
                "value must be a string, an integer of at most ±2^53 or a list of strings",
            )
    _check_unique_paths(f"{path}.input_files", pc.input_files, v)


def _is_env_value(value: struct_pb2.Value) -> bool:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return True
    if kind == "number_value":
        number = value.number_value  # inf and NaN are not integers
        return number.is_integer() and abs(number) <= limits.MAX_ENV_NUMBER
    if kind == "list_value":
        return all(item.WhichOneof("kind") == "string_value" for item in value.list_value.values)
    return False


def _check_unique_paths(path: str, files: Iterable[str], v: Violations) -> None:
    seen: set[str] = set()
    for j, name in enumerate(files):
        if not name.strip():
            v.add(f"{path}[{j}]", "must not be empty")
        elif name in seen:
            v.add(f"{path}[{j}]", f"duplicate path {quoted(name)}")
        seen.add(name)


def _validate_worker_config(path: str, wc: taskforce_pb2.WorkerConfig, v: Violations) -> None:
    required = ("do_transfer_worker_stdouterr", "max_worker_runtime", "n_cores", "priority")
    for field in required:
        if not wc.HasField(field):  # type: ignore[arg-type]
            v.add(f"{path}.{field}", "required")
    if wc.HasField("max_worker_runtime") and wc.max_worker_runtime < 1:
        v.add(
            f"{path}.max_worker_runtime",
            f"must be a positive number of seconds (got {wc.max_worker_runtime})",
        )
    if wc.HasField("n_cores") and wc.n_cores < 1:
        v.add(f"{path}.n_cores", f"must be at least 1 (got {wc.n_cores})")
    # Output only: whatever a client sent there is replaced by what it sent as the size itself.
    wc.ClearField("worker_disk_as_sent")
    wc.ClearField("worker_memory_as_sent")
    for field in ("worker_disk", "worker_memory"):
        value: struct_pb2.Value = getattr(wc, field)
        kind = value.WhichOneof("kind") if wc.HasField(field) else None  # type: ignore[arg-type]
        if kind is None or kind == "null_value":
            v.add(f"{path}.{field}", "required")
            continue
        try:
            if kind == "string_value":
                size = parse_size(value.string_value)
            elif kind == "number_value":
                size = parse_size(value.number_value)
            else:
                raise ValueError("must be a whole number of bytes or a size string such as '512M'")
        except ValueError as exc:
            v.add(f"{path}.{field}", str(exc))
            continue
        if size > limits.MAX_SIZE_BYTES:
            v.add(
                f"{path}.{field}",
                f"at most {limits.MAX_SIZE_BYTES:,} bytes (1 PiB) (got {_size_shown(value)})",
            )
            continue
        getattr(wc, f"{field}_as_sent").CopyFrom(value)  # kept for the original dialect
        value.number_value = size


def _size_shown(value: struct_pb2.Value) -> str:
    if value.WhichOneof("kind") == "string_value":
        return quoted(value.string_value)
    return f"{value.number_value:g}"


def n_workers_rule(n_workers: int) -> str:
    """The violation of an n_workers outside 1 to limits.MAX_N_WORKERS."""
    if n_workers < 1:
        return f"must be at least 1 (got {n_workers:,})"
    return f"must be at most {limits.MAX_N_WORKERS:,} per taskforce (got {n_workers:,})"


def check_timestamp(v: Violations, field: str, ts: timestamp_pb2.Timestamp) -> None:
    """Add a violation if ``ts`` is outside google.protobuf.Timestamp's valid range, which every
    conversion of it (to seconds, to JSON) would otherwise fail on later, as an internal error."""
    if problem := limits.timestamp_problem(ts):
        v.add(field, problem)
