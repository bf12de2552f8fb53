"""The pilot's configuration: every ``EWMS_PILOT_*`` variable of the original pilot, with its name
and meaning (UPSTREAM.md §3.2), plus ours. Read from the environment once; every bad variable is
reported in one :class:`PilotConfigError`."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from services.events.client import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_EVENT_BYTES
from services.pilot.chirp import chirp_config_present
from services.pilot.prefetch import base_prefetch
from services.pilot.runtimes import RUNTIMES

T = TypeVar("T")

# The original quit after 1 s of an empty queue; real users set 300 s and 60 s (UPSTREAM.md §3.3).
DEFAULT_FIRST_EVENT_TIMEOUT = 300.0
DEFAULT_IDLE_TIMEOUT = 60.0
# HTCondor sends SIGKILL JobMaxVacateTime (default 10 s) after SIGTERM; finish or nack before it.
DEFAULT_DRAIN_GRACE = 10.0
# A timed-out task gets this long between SIGTERM and SIGKILL.
DEFAULT_KILL_GRACE = 5.0
# How long the pilot rides out an unreachable WMS or broker (as the TMS does) before it exits 1.
DEFAULT_OUTAGE_TOLERANCE = 600.0
# Outputs of tasks ending within this of each other go in one publish (and their acks in one
# message): a short task costs the broker a fraction of a call instead of one each (bench/e2e.py).
DEFAULT_PUBLISH_LINGER = 0.02
BROKER_TYPES = ("embedded", "rabbitmq")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
FALSE = frozenset({"0", "false", "f", "no", "n", "off", ""})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class PilotConfigError(Exception):
    """The configuration is invalid; ``problems`` names each bad variable and its rule."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid pilot configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class QueueSide:
    """The input or output side: queue ids and how to reach their broker."""

    queues: tuple[str, ...]
    broker_type: str  # "embedded" (EventService at address) or "rabbitmq" (AMQP)
    address: str  # WMS gRPC address, or AMQP URL with the token as password
    token: str
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


@dataclass(frozen=True)
class PilotSettings:
    """Everything the pilot reads from its environment."""

    # Task and init (the original's names).
    task_image: str
    task_args: str
    task_env: dict[str, str]
    init_image: str
    init_args: str
    init_env: dict[str, str]
    init_timeout: float | None
    task_timeout: float | None
    # Queues.
    incoming: QueueSide
    outgoing: QueueSide
    # The original's optional settings.
    data_dir_parent: Path
    infile_ext: str
    outfile_ext: str
    prefetch: int
    # EWMS_PILOT_PREFETCH unset: the prefetch follows the tasks' length (pilot/prefetch.py).
    prefetch_adaptive: bool
    first_event_timeout: float
    idle_timeout: float
    external_directories: tuple[Path, ...]
    log_level: str
    log_level_third_party: str
    htchirp: bool
    htchirp_dest: str
    htchirp_ratelimit_interval: float
    stop_listening_on_task_error: bool
    okay_errors: frozenset[str]
    max_concurrent_tasks: int
    keep_all_task_files: bool
    dump_task_output: bool
    quarantine_time: float
    container_debug: bool
    apptainer_build_workdir: Path
    apptainer_image_must_be_present: bool
    docker_shm_size: str | None
    # Ours.
    wms_address: str
    token: str
    taskforce_uuid: str
    worker_id: str
    runtime: str
    task_network: bool
    drain_grace: float
    kill_grace: float
    # EWMS_PILOT_OUTAGE_TOLERANCE: seconds of an unreachable WMS or broker the pilot waits out
    # (outputs kept and retried, the input re-subscribed; never a task failure), then exits 1.
    outage_tolerance: float
    # EWMS_PILOT_PUBLISH_LINGER: seconds a finished task's outputs wait for other tasks' outputs
    # to be published (and their inputs acked) together; 0 publishes each at once.
    publish_linger: float
    max_event_bytes: int
    events_exchange: str
    events_url: str
    hostname: str = field(default_factory=socket.gethostname)
    # EWMS_PILOT_HIDDEN_DIRECTORIES: host directories bwrap tasks do not see (a local WMS's data).
    hidden_directories: tuple[Path, ...] = ()

    @property
    def data_dir(self) -> Path:
        """``<parent>/ewms-pilot-data``: the data hub, init and task directories."""
        return self.data_dir_parent / "ewms-pilot-data"


class _Reader:
    """Reads variables, collecting every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return None if value is None else value.strip()

    def text(self, name: str, default: str = "") -> str:
        value = self.raw(name)
        return default if value is None else value

    def _parse(self, name: str, default: T, parse: Callable[[str], T], rule: str) -> T:
        value = self.raw(name)
        if value is None or value == "":
            return default
        try:
            return parse(value)
        except (ValueError, TypeError):
            self.problems.append(f"{name}={value!r}: {rule}")
            return default

    def boolean(self, name: str, default: bool) -> bool:
        def parse(value: str) -> bool:
            low = value.lower()
            if low in TRUE:
                return True
            if low in FALSE:
                return False
            raise ValueError

        return self._parse(name, default, parse, "must be a boolean (true/false, 1/0, yes/no)")

    def integer(self, name: str, default: int, minimum: int) -> int:
        def parse(value: str) -> int:
            number = int(value)
            if number < minimum:
                raise ValueError
            return number

        return self._parse(name, default, parse, f"must be an integer >= {minimum}")

    def seconds(self, name: str, default: float | None, *, positive: bool = True) -> float | None:
        def parse(value: str) -> float:
            number = float(value)
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError
            if number < 0 or (positive and number == 0):
                raise ValueError
            return number

        rule = "must be a number of seconds " + ("> 0" if positive else ">= 0")
        return self._parse(name, default, parse, rule)

    def env_json(self, name: str) -> dict[str, str]:
        value = self.raw(name)
        if not value:
            return {}
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            self.problems.append(f"{name}: not valid JSON ({exc.msg} at position {exc.pos})")
            return {}
        if not isinstance(data, dict):
            self.problems.append(f"{name}: must be a JSON object of variable names to values")
            return {}
        out: dict[str, str] = {}
        for key, val in data.items():
            if not ENV_NAME.match(key):
                self.problems.append(f"{name}: variable name {key!r} must match {ENV_NAME.pattern}")
            elif isinstance(val, bool) or not isinstance(val, str | int):
                self.problems.append(f"{name}: value of {key} must be a string or an integer")
            else:
                out[key] = str(val)
        return out

    def args(self, name: str) -> str:
        value = self.text(name)
        try:
            shlex.split(value)
        except ValueError as exc:
            self.problems.append(f"{name}: cannot be split like a shell line ({exc})")
        return value

    def problem(self, text: str) -> None:
        self.problems.append(text)


def _split_list(value: str) -> tuple[str, ...]:
    """Queues and directories: separated by commas, semicolons (the original TMS's join) or
    spaces."""
    return tuple(part for part in re.split(r"[,;\s]+", value) if part)


def amqp_url(address: str, token: str) -> str:
    """The AMQP URL of a RabbitMQ ``address`` (``amqp://user@host:port/vhost`` or the original's
    ``user@host[/vhost]``) with ``token`` as the password (as the original passes queue tokens)."""
    if "://" not in address:
        address = f"amqp://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError("must be an AMQP URL such as amqp://user@host:5672/vhost")
    if not token:
        return address
    user = parts.username or ""
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:{quote(token, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _queue_side(r: _Reader, side: str, wms_address: str, token: str, required: bool) -> QueueSide:
    prefix = f"EWMS_PILOT_QUEUE_{side}"
    queues = _split_list(r.text(prefix))
    if required and not queues:
        r.problem(f"{prefix}: required (the id of the queue(s) to consume)")
    broker_type = r.text(f"{prefix}_BROKER_TYPE", "embedded").lower()
    if broker_type not in BROKER_TYPES:
        r.problem(f"{prefix}_BROKER_TYPE={broker_type!r}: must be one of {', '.join(BROKER_TYPES)}")
    side_token = r.text(f"{prefix}_AUTH_TOKEN") or token
    address = r.text(f"{prefix}_BROKER_ADDRESS")
    if broker_type == "embedded":
        address = address or wms_address
        if queues and not address:
            r.problem(
                f"{prefix}_BROKER_ADDRESS: required for the embedded broker "
                "(or set EWMS_PILOT_WMS_ADDRESS)"
            )
        if queues and not side_token:
            r.problem(
                f"{prefix}_AUTH_TOKEN: required for the embedded broker (or EWMS_PILOT_TOKEN)"
            )
    elif broker_type == "rabbitmq" and queues:
        if not address:
            r.problem(f"{prefix}_BROKER_ADDRESS: required for rabbitmq (an AMQP URL)")
        else:
            try:
                address = amqp_url(address, r.text(f"{prefix}_AUTH_TOKEN"))
            except ValueError as exc:
                r.problem(f"{prefix}_BROKER_ADDRESS={address!r}: {exc}")
    max_attempts = r.integer(f"{prefix}_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, 1)
    return QueueSide(queues, broker_type, address, side_token, max_attempts)


def load_settings(env: Mapping[str, str] | None = None) -> PilotSettings:
    """Read and check the configuration; raises :class:`PilotConfigError` listing every problem."""
    env = os.environ if env is None else env
    r = _Reader(env)
    task_image = r.text("EWMS_PILOT_TASK_IMAGE")
    task_args = r.args("EWMS_PILOT_TASK_ARGS")
    if not task_image and not task_args:
        r.problem(
            "EWMS_PILOT_TASK_IMAGE / EWMS_PILOT_TASK_ARGS: one is required "
            "(an image, or a command to run on the worker itself)"
        )
    init_image = r.text("EWMS_PILOT_INIT_IMAGE")
    init_args = r.args("EWMS_PILOT_INIT_ARGS")
    task_timeout_name = (
        "EWMS_PILOT_TASK_TIMEOUT"
        if r.raw("EWMS_PILOT_TASK_TIMEOUT")
        else "EWMS_PILOT_SUBPROC_TIMEOUT"  # the original's legacy alias
    )
    wms_address = r.text("EWMS_PILOT_WMS_ADDRESS")
    token = r.text("EWMS_PILOT_TOKEN")
    incoming = _queue_side(r, "INCOMING", wms_address, token, required=True)
    outgoing = _queue_side(r, "OUTGOING", wms_address, token, required=False)

    concurrency = r.integer("EWMS_PILOT_MAX_CONCURRENT_TASKS", 1, 1)
    # Per slot: one event running, one staged and queued in the spawner to start the moment the
    # slot frees, and one whose outputs are being published and confirmed before its ack; plus one
    # on its way. Fewer leaves slots idle while acks make room for new deliveries (measured with
    # bench/pilot.py); more only hoards events other pilots could run.
    prefetch = r.integer("EWMS_PILOT_PREFETCH", base_prefetch(concurrency), 1)
    if prefetch < concurrency:
        r.problem(
            f"EWMS_PILOT_PREFETCH={prefetch}: must be >= EWMS_PILOT_MAX_CONCURRENT_TASKS "
            f"({concurrency}), or tasks would wait for events the pilot may not take"
        )

    idle_timeout = r.seconds("EWMS_PILOT_TIMEOUT_QUEUE_INCOMING", DEFAULT_IDLE_TIMEOUT)
    first_event_timeout = r.seconds(
        "EWMS_PILOT_TIMEOUT_QUEUE_WAIT_FOR_FIRST_MESSAGE", DEFAULT_FIRST_EVENT_TIMEOUT
    )

    external = tuple(Path(p) for p in _split_list(r.text("EWMS_PILOT_EXTERNAL_DIRECTORIES")))
    for path in external:
        if not path.is_absolute():
            r.problem(f"EWMS_PILOT_EXTERNAL_DIRECTORIES: {str(path)!r} must be an absolute path")
        elif not path.is_dir():
            r.problem(f"EWMS_PILOT_EXTERNAL_DIRECTORIES: {str(path)!r} is not a directory")
    hidden = tuple(Path(p) for p in _split_list(r.text("EWMS_PILOT_HIDDEN_DIRECTORIES")))
    for path in hidden:
        if not path.is_absolute():
            r.problem(f"EWMS_PILOT_HIDDEN_DIRECTORIES: {str(path)!r} must be an absolute path")

    log_level = r.text("EWMS_PILOT_CL_LOG", "INFO").upper()
    log_level_3rd = r.text("EWMS_PILOT_CL_LOG_THIRD_PARTY", "WARNING").upper()
    for name, level in (
        ("EWMS_PILOT_CL_LOG", log_level),
        ("EWMS_PILOT_CL_LOG_THIRD_PARTY", log_level_3rd),
    ):
        if level not in LOG_LEVELS:
            r.problem(f"{name}={level!r}: must be one of {', '.join(LOG_LEVELS)}")

    htchirp = r.boolean("EWMS_PILOT_HTCHIRP", False)
    if htchirp and not chirp_config_present():
        r.problem(
            "EWMS_PILOT_HTCHIRP: chirps need an HTCondor job "
            "($_CONDOR_CHIRP_CONFIG or ./.chirp.config); unset it outside HTCondor"
        )
    htchirp_dest = r.text("EWMS_PILOT_HTCHIRP_DEST", "JOB_ATTR").upper()
    if htchirp_dest not in ("JOB_ATTR", "JOB_EVENT_LOG"):
        r.problem(f"EWMS_PILOT_HTCHIRP_DEST={htchirp_dest!r}: must be JOB_ATTR or JOB_EVENT_LOG")

    # The original's default is true: it had no dead-letter queue. Here a failing event is retried
    # up to its queue's max_attempts and then dead-lettered with its error while the pilot goes on;
    # stopping would leave the rest of the queue to fewer and fewer pilots, and the poison event
    # short of its last attempt.
    stop_listening = r.boolean("EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR", False)
    quarantine = r.seconds("EWMS_PILOT_QUARANTINE_TIME", 0.0, positive=False) or 0.0
    if quarantine and not stop_listening:
        r.problem(
            "EWMS_PILOT_QUARANTINE_TIME: only allowed when "
            "EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR is true (the quarantine is the wait before "
            "a pilot stopped by a task error exits): set EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR="
            "true, or unset EWMS_PILOT_QUARANTINE_TIME"
        )

    runtime = r.text("EWMS_PILOT_RUNTIME").lower()
    platform = r.text("_EWMS_PILOT_CONTAINER_PLATFORM").lower()
    if not runtime:
        runtime = (platform or "apptainer") if task_image else "process"
    if runtime not in RUNTIMES:
        r.problem(f"EWMS_PILOT_RUNTIME={runtime!r}: must be one of {', '.join(RUNTIMES)}")
    elif runtime in ("process", "bwrap") and (task_image or init_image):
        r.problem(
            f"EWMS_PILOT_RUNTIME={runtime}: runs commands on the worker and takes no image; "
            "unset EWMS_PILOT_TASK_IMAGE/EWMS_PILOT_INIT_IMAGE or choose a container runtime"
        )
    elif runtime not in ("process", "bwrap") and not task_image:
        r.problem(f"EWMS_PILOT_TASK_IMAGE: required by the {runtime} runtime")

    ext_rule = "must start with '.' and contain no '/'"
    infile_ext = r.text("EWMS_PILOT_INFILE_EXT", ".in")
    outfile_ext = r.text("EWMS_PILOT_OUTFILE_EXT", ".out")
    for name, ext in (
        ("EWMS_PILOT_INFILE_EXT", infile_ext),
        ("EWMS_PILOT_OUTFILE_EXT", outfile_ext),
    ):
        if not ext.startswith(".") or "/" in ext or len(ext) < 2:
            r.problem(f"{name}={ext!r}: {ext_rule}")

    exchange = r.text("EWMS_PILOT_EVENTS_EXCHANGE")
    events_url = r.text("EWMS_PILOT_EVENTS_URL")
    if exchange and not events_url:
        if incoming.broker_type == "rabbitmq":
            events_url = incoming.address
        else:
            r.problem(
                "EWMS_PILOT_EVENTS_URL: required with EWMS_PILOT_EVENTS_EXCHANGE "
                "when the input queue is not on RabbitMQ"
            )

    data_dir_parent = Path(r.text("EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST") or os.getcwd())
    if not data_dir_parent.is_absolute():
        data_dir_parent = Path.cwd() / data_dir_parent

    settings = PilotSettings(
        task_image=task_image,
        task_args=task_args,
        task_env=r.env_json("EWMS_PILOT_TASK_ENV_JSON"),
        init_image=init_image,
        init_args=init_args,
        init_env=r.env_json("EWMS_PILOT_INIT_ENV_JSON"),
        init_timeout=r.seconds("EWMS_PILOT_INIT_TIMEOUT", None),
        task_timeout=r.seconds(task_timeout_name, None),
        incoming=incoming,
        outgoing=outgoing,
        data_dir_parent=data_dir_parent,
        infile_ext=infile_ext,
        outfile_ext=outfile_ext,
        prefetch=prefetch,
        prefetch_adaptive=not r.raw("EWMS_PILOT_PREFETCH"),
        first_event_timeout=first_event_timeout or DEFAULT_FIRST_EVENT_TIMEOUT,
        idle_timeout=idle_timeout or DEFAULT_IDLE_TIMEOUT,
        external_directories=external,
        log_level=log_level,
        log_level_third_party=log_level_3rd,
        htchirp=htchirp,
        htchirp_dest=htchirp_dest,
        htchirp_ratelimit_interval=r.seconds("EWMS_PILOT_HTCHIRP_RATELIMIT_INTERVAL", 60.0) or 60.0,
        stop_listening_on_task_error=stop_listening,
        okay_errors=frozenset(_split_list(r.text("EWMS_PILOT_OKAY_ERRORS"))),
        max_concurrent_tasks=concurrency,
        keep_all_task_files=r.boolean("EWMS_PILOT_KEEP_ALL_TASK_FILES", False),
        dump_task_output=r.boolean("EWMS_PILOT_DUMP_TASK_OUTPUT", False),
        quarantine_time=quarantine,
        container_debug=r.boolean("EWMS_PILOT_CONTAINER_DEBUG", False),
        apptainer_build_workdir=Path(r.text("_EWMS_PILOT_APPTAINER_BUILD_WORKDIR", "/var/tmp")),
        apptainer_image_must_be_present=r.boolean(
            "_EWMS_PILOT_APPTAINER_IMAGE_DIRECTORY_MUST_BE_PRESENT", True
        ),
        docker_shm_size=r.text("_EWMS_PILOT_DOCKER_SHM_SIZE") or None,
        wms_address=wms_address,
        token=token,
        taskforce_uuid=r.text("EWMS_PILOT_TASKFORCE_UUID"),
        worker_id=r.text("EWMS_PILOT_WORKER_ID")
        or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}",
        runtime=runtime,
        task_network=r.boolean("EWMS_PILOT_TASK_NETWORK", False),
        drain_grace=r.seconds("EWMS_PILOT_DRAIN_GRACE", DEFAULT_DRAIN_GRACE, positive=False) or 0.0,
        kill_grace=r.seconds("EWMS_PILOT_TASK_KILL_GRACE", DEFAULT_KILL_GRACE, positive=False)
        or 0.0,
        outage_tolerance=r.seconds("EWMS_PILOT_OUTAGE_TOLERANCE", DEFAULT_OUTAGE_TOLERANCE)
        or DEFAULT_OUTAGE_TOLERANCE,
        publish_linger=r.seconds(
            "EWMS_PILOT_PUBLISH_LINGER", DEFAULT_PUBLISH_LINGER, positive=False
        )
        or 0.0,
        max_event_bytes=r.integer("EWMS_PILOT_MAX_EVENT_BYTES", DEFAULT_MAX_EVENT_BYTES, 1),
        events_exchange=exchange,
        events_url=events_url,
        hidden_directories=hidden,
    )
    if settings.wms_address and not settings.taskforce_uuid:
        r.problem("EWMS_PILOT_TASKFORCE_UUID: required to report status to the WMS")
    if settings.wms_address and not settings.token:
        r.problem("EWMS_PILOT_TOKEN: required to report status to the WMS")
    if r.problems:
        raise PilotConfigError(r.problems)
    return settings


def describe(settings: PilotSettings) -> dict[str, Any]:
    """The settings for the start-up log, without secrets."""
    out: dict[str, Any] = {}
    for key, value in settings.__dict__.items():
        if key in ("token",):
            continue
        if isinstance(value, QueueSide):
            value = {
                "queues": list(value.queues),
                "broker_type": value.broker_type,
                "address": _hide_password(value.address),
                "max_attempts": value.max_attempts,
            }
        elif key == "events_url":
            value = _hide_password(value)
        elif isinstance(value, Path | frozenset | tuple):
            value = str(value) if isinstance(value, Path) else sorted(map(str, value))
        out[key] = value
    return out


def _hide_password(url: str) -> str:
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
