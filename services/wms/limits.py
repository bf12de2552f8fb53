"""Limits on what a client may send the WMS: the length of every string field of every request of
WorkflowService and EventService, the number of items of every list and map, and the bounds of
numbers. One table, in one place:

- ``TEXT`` bounds every string, list and map field, by its full proto name. ``check`` walks a
  request and enforces it (before any other validation, so no rule ever runs on oversized input);
  the REST gateway consults ``max_items`` while it transcodes, so an oversized JSON list is refused
  before it is parsed. A test fails when a request field has no row.
- ``NUMBERS`` documents the bounds of numbers that validation.py enforces with these constants.
- ``markdown()`` renders both; ``docs/limits.md`` is its output (``python
  scripts/gen_limits_doc.py``) and a test keeps the two equal.

Why these values: a command line and every environment variable must fit one Linux argument string
(MAX_ARG_STRLEN, 128 KiB) even as 4-byte UTF-8; ids are what the WMS issues (under 64 characters)
with room to spare; counts are far beyond real workflows but small enough that the largest allowed
request validates in about a second, in a worker thread (``off_loop_if_large``), while the event
loop keeps answering. NUL cannot travel in a command line or an environment variable,
so no string may hold one, except event content and error texts. A whole gRPC message is capped at
EWMS_MAX_EVENT_BYTES + 1 MiB (17 MiB by default) by the server's max receive size, and a REST body
at 4/3 of EWMS_MAX_EVENT_BYTES + 1 MiB.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, ParamSpec, TypeVar

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from ewms.v1 import event_service_pb2, workflow_service_pb2
from services.errors import InvalidArgument, quoted

# --- the values ---

ID_CHARS = 128  # workflow, task, taskforce, queue, event and ack ids; worker ids
OWNER_CHARS = 256  # a token subject (OIDC allows 255)
PAGE_TOKEN_CHARS = 512
LOCATION_CHARS = 128
ALIAS_CHARS = 128  # also validation.QUEUE_ALIAS's own bound
IMAGE_CHARS = 4096  # a path (PATH_MAX) or an image reference
ARGS_CHARS = 16_384  # at 4 bytes of UTF-8 each: 64 KiB, half of MAX_ARG_STRLEN
ENV_ENTRIES = 64
ENV_NAME_CHARS = 128
ENV_VALUE_CHARS = 4096
ENV_TOTAL_CHARS = 16_384  # names and values of one map together: its JSON is one variable
LIST_VALUE_ITEMS = 16  # a pilot environment value given as a list of strings
FILE_CHARS = 4096
INPUT_FILES = 64
SIZE_TEXT_CHARS = 64  # "512M", "8 GiB", …
REQUIREMENTS_CHARS = 4096
TAG_CHARS = 128
IMAGE_SOURCE_CHARS = 16
TASKS = 100
LOCATIONS_PER_TASK = 16
ALIASES_PER_LIST = 100
ERROR_TEXT_CHARS = 65_536  # a nack's error; the broker keeps its first 4,096
CONTENT_TYPE_CHARS = 255
HEADER_ENTRIES = 1024
HEADER_NAME_CHARS = 255  # an AMQP short string
HEADER_VALUE_CHARS = 65_536  # and all headers of an event together: 64 KiB (event_service)
PUBLISH_EVENTS = 10_000
ACK_IDS = 10_000
REDRIVE_EVENT_IDS = 10_000

MAX_N_WORKERS = 10_000  # per taskforce, at creation and per AddWorkers
MAX_SIZE_BYTES = 2**50  # worker_memory and worker_disk: 1 PiB
MAX_ENV_NUMBER = 2**53  # a pilot environment number: an integer a double holds exactly
TIMESTAMP_RANGE = "0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z"
_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
_NANOS_PER_SECOND = 1_000_000_000
EVENT_BYTES = "EWMS_MAX_EVENT_BYTES (16 MiB by default), encoded"
# Requests (serialized, or REST bodies) larger than this are checked and converted in a worker
# thread: an event's JSON of a million numbers takes seconds of Python, which on the event loop
# would stall every other call, health included.
INLINE_BYTES = 64 * 1024
_TEXT_TYPES = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


@dataclass(frozen=True)
class Limit:
    """The bound of one field. ``chars`` bounds a string, each string of a list, or each value of
    a map; ``items`` the number of items or entries; ``key_chars`` a map's keys; ``total_chars`` a
    map's keys and values together. ``elsewhere`` names a bound enforced elsewhere: the walk
    leaves such a field alone. ``note`` adds words for the documentation."""

    chars: int | None = None
    items: int | None = None
    key_chars: int | None = None
    total_chars: int | None = None
    nul: bool = False
    elsewhere: str = ""
    note: str = ""

    def describe(self) -> str:
        """The limit in words, for the documentation."""
        parts = []
        if self.items is not None:
            parts.append(f"≤ {self.items:,} {'entries' if self.key_chars else 'items'}")
        if self.key_chars is not None:
            parts.append(f"names ≤ {self.key_chars:,} characters")
        if self.chars is not None:
            each = "each " if self.items is not None else ""
            parts.append(f"{each}≤ {self.chars:,} characters")
        if self.total_chars is not None:
            parts.append(f"≤ {self.total_chars:,} characters in all")
        if self.chars is not None or self.key_chars is not None:
            parts.append("NUL allowed" if self.nul else "no NUL")
        if self.elsewhere:
            parts.append(self.elsewhere)
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)


_ID = Limit(chars=ID_CHARS)
_PAGE_TOKEN = Limit(chars=PAGE_TOKEN_CHARS)
_LOCATION = Limit(chars=LOCATION_CHARS)
_ALIASES = Limit(chars=ALIAS_CHARS, items=ALIASES_PER_LIST)
_IMAGE = Limit(chars=IMAGE_CHARS)
_ARGS = Limit(chars=ARGS_CHARS, note="must split like a POSIX shell line")
_ENV = Limit(
    chars=ENV_VALUE_CHARS,
    items=ENV_ENTRIES,
    key_chars=ENV_NAME_CHARS,
    total_chars=ENV_TOTAL_CHARS,
)
_SIZE = Limit(chars=SIZE_TEXT_CHARS, note="a string; as a number see below")
_TIMESTAMP = Limit(note=f"a Timestamp from {TIMESTAMP_RANGE}")

TEXT: Final[Mapping[str, Limit]] = MappingProxyType(
    {
        f"ewms.v1.{name}": limit
        for name, limit in {
            # WorkflowService
            "CreateWorkflowRequest.tasks": Limit(items=TASKS),
            "CreateWorkflowRequest.public_queue_aliases": _ALIASES,
            "TaskSpec.cluster_locations": Limit(chars=LOCATION_CHARS, items=LOCATIONS_PER_TASK),
            "TaskSpec.task_image": _IMAGE,
            "TaskSpec.task_args": _ARGS,
            "TaskSpec.task_env": _ENV,
            "TaskSpec.init_image": _IMAGE,
            "TaskSpec.init_args": _ARGS,
            "TaskSpec.init_env": _ENV,
            "TaskSpec.input_queue_aliases": _ALIASES,
            "TaskSpec.output_queue_aliases": _ALIASES,
            "TaskSpec.pilot_config": Limit(),
            "TaskSpec.worker_config": Limit(),
            "PilotConfig.tag": Limit(chars=TAG_CHARS),
            "PilotConfig.image_source": Limit(chars=IMAGE_SOURCE_CHARS),
            "PilotConfig.environment": Limit(
                chars=ENV_VALUE_CHARS,
                items=ENV_ENTRIES,
                key_chars=ENV_NAME_CHARS,
                total_chars=ENV_TOTAL_CHARS,
                note=f"a list value ≤ {LIST_VALUE_ITEMS} strings",
            ),
            "PilotConfig.input_files": Limit(chars=FILE_CHARS, items=INPUT_FILES),
            "WorkerConfig.worker_disk": _SIZE,
            "WorkerConfig.worker_memory": _SIZE,
            "WorkerConfig.condor_requirements": Limit(chars=REQUIREMENTS_CHARS),
            "WorkerConfig.worker_disk_as_sent": Limit(elsewhere="output only: ignored"),
            "WorkerConfig.worker_memory_as_sent": Limit(elsewhere="output only: ignored"),
            "GetWorkflowRequest.workflow_id": _ID,
            "ListWorkflowsRequest.owner": Limit(chars=OWNER_CHARS),
            "ListWorkflowsRequest.created_after": _TIMESTAMP,
            "ListWorkflowsRequest.created_before": _TIMESTAMP,
            "ListWorkflowsRequest.page_token": _PAGE_TOKEN,
            "AbortWorkflowRequest.workflow_id": _ID,
            "FinishWorkflowRequest.workflow_id": _ID,
            "WatchWorkflowRequest.workflow_id": _ID,
            "WatchWorkflowsRequest.owner": Limit(chars=OWNER_CHARS),
            "GetTaskDirectiveRequest.task_id": _ID,
            "ListTaskDirectivesRequest.workflow_id": _ID,
            "ListTaskDirectivesRequest.page_token": _PAGE_TOKEN,
            "AddWorkersRequest.task_id": _ID,
            "AddWorkersRequest.cluster_location": _LOCATION,
            "GetTaskforceRequest.taskforce_uuid": _ID,
            "ListTaskforcesRequest.workflow_id": _ID,
            "ListTaskforcesRequest.task_id": _ID,
            "ListTaskforcesRequest.cluster_location": _LOCATION,
            "ListTaskforcesRequest.page_token": _PAGE_TOKEN,
            "ListQueuesRequest.workflow_id": _ID,
            # EventService
            "PublishRequest.queue_id": _ID,
            "PublishRequest.events": Limit(items=PUBLISH_EVENTS),
            "Event.event_id": _ID,
            "Event.queue_id": Limit(chars=ID_CHARS, note="set by the WMS"),
            "Event.payload": Limit(elsewhere=f"≤ {EVENT_BYTES}"),
            "Event.json": Limit(elsewhere=f"≤ {EVENT_BYTES}"),
            "Event.text": Limit(elsewhere=f"≤ {EVENT_BYTES}"),
            "Event.content_type": Limit(chars=CONTENT_TYPE_CHARS),
            "Event.headers": Limit(
                chars=HEADER_VALUE_CHARS,
                items=HEADER_ENTRIES,
                key_chars=HEADER_NAME_CHARS,
                note="≤ 64 KiB in all",
            ),
            "Event.published_ts": _TIMESTAMP,
            "Event.provenance": Limit(),
            "EventProvenance.taskforce_uuid": _ID,
            "EventProvenance.worker_id": _ID,
            "EventProvenance.input_event_id": _ID,
            "SubscribeRequest.open": Limit(),
            "SubscribeRequest.ack": Limit(),
            "SubscribeRequest.nack": Limit(),
            "SubscribeRequest.pause": Limit(),
            "SubscribeRequest.prefetch": Limit(),
            "SubscribeOpen.queue_id": _ID,
            "SubscribeAck.ack_ids": Limit(chars=ID_CHARS, items=ACK_IDS),
            "SubscribeNack.ack_id": _ID,
            "SubscribeNack.error": Limit(chars=ERROR_TEXT_CHARS, nul=True),
            "ReceiveRequest.queue_id": _ID,
            "AckRequest.queue_id": _ID,
            "AckRequest.ack_ids": Limit(chars=ID_CHARS, items=ACK_IDS),
            "NackRequest.queue_id": _ID,
            "NackRequest.ack_id": _ID,
            "NackRequest.error": Limit(chars=ERROR_TEXT_CHARS, nul=True),
            "GetQueueStatsRequest.queue_id": _ID,
            "ListDeadLettersRequest.queue_id": _ID,
            "ListDeadLettersRequest.page_token": _PAGE_TOKEN,
            "RedriveDeadLettersRequest.queue_id": _ID,
            "RedriveDeadLettersRequest.event_ids": Limit(chars=ID_CHARS, items=REDRIVE_EVENT_IDS),
        }.items()
    }
)

# Bounds of numbers, enforced by validation.py with the constants above (documentation only here).
NUMBERS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "TaskSpec.n_workers": f"1 to {MAX_N_WORKERS:,}",
        "AddWorkersRequest.n_workers": f"1 to {MAX_N_WORKERS:,}",
        "WorkerConfig.worker_memory": f"1 byte to {MAX_SIZE_BYTES:,} bytes (1 PiB), finite",
        "WorkerConfig.worker_disk": f"1 byte to {MAX_SIZE_BYTES:,} bytes (1 PiB), finite",
        "PilotConfig.environment (a number)": f"an integer of at most ±2^53 ({MAX_ENV_NUMBER:,})",
    }
)
# Bounds of whole requests, set where the servers are built (documentation only here).
WHOLE_REQUESTS: Final = (
    "Whole requests: a gRPC message is at most EWMS_MAX_EVENT_BYTES + 1 MiB (17 MiB by",
    "default; RESOURCE_EXHAUSTED above it); a REST body at most 4/3 of EWMS_MAX_EVENT_BYTES",
    "+ 1 MiB (HTTP 413 above it); a REST request line and each header at most 8,190 bytes",
    "(HTTP 400 from the HTTP parser, in plain text: it stops before any route). Requests over",
    "64 KiB are checked in a worker thread, so that the event loop keeps answering meanwhile.",
)
REQUEST_SERVICES: Final = (
    workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"],
    event_service_pb2.DESCRIPTOR.services_by_name["EventService"],
)


P = ParamSpec("P")
R = TypeVar("R")


async def off_loop_if_large(
    size: int, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs
) -> R:
    """``work(*args)``: here when ``size`` (bytes of the request) is at most INLINE_BYTES, else in
    a worker thread, so that the event loop keeps answering while it runs."""
    if size <= INLINE_BYTES:
        return work(*args, **kwargs)
    return await asyncio.to_thread(work, *args, **kwargs)


def max_items(field: FieldDescriptor) -> int | None:
    """The most items a list or map field of a request may hold (None: not bounded here)."""
    limit = TEXT.get(field.full_name)
    return limit.items if limit is not None else None


def check(request: Message) -> None:
    """INVALID_ARGUMENT naming every field of ``request`` over its limit, if there is one."""
    found = violations(request)
    if found:
        raise InvalidArgument(found)


def violations(message: Message, path: str = "") -> list[tuple[str, str]]:
    """Every (field path, rule) of ``message`` that breaks TEXT or the Timestamp range. Lists and
    maps over their count are not looked into: their size is the whole problem."""
    found: list[tuple[str, str]] = []
    for field, value in message.ListFields():
        if not _has_limit(field):
            continue
        limit = TEXT.get(field.full_name)
        if limit is None or limit.elsewhere:
            continue  # not a request of these services (a test keeps TEXT complete), or elsewhere
        here = f"{path}.{field.name}" if path else field.name
        if _is_map(field):
            _check_map(value, here, limit, field, found)
        elif field.is_repeated:
            if limit.items is not None and len(value) > limit.items:
                found.append((here, f"at most {limit.items:,} items (got {len(value):,})"))
                continue
            for i, item in enumerate(value):
                _check_one(item, f"{here}[{i}]", limit, found)
        else:
            _check_one(value, here, limit, found)
    return found


def _has_limit(field: FieldDescriptor) -> bool:
    """Strings, bytes, messages, lists and maps have a row in TEXT; numbers, enums and bools are
    validation.py's (NUMBERS)."""
    return field.message_type is not None or field.type in _TEXT_TYPES


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _check_one(value: object, path: str, limit: Limit, found: list[tuple[str, str]]) -> None:
    if isinstance(value, str):
        _check_text(value, path, limit.chars, limit.nul, found)
    elif isinstance(value, timestamp_pb2.Timestamp):
        if problem := timestamp_problem(value):
            found.append((path, problem))
    elif isinstance(value, struct_pb2.Value):
        _check_value(value, path, limit, found)
    elif isinstance(value, Message):
        found.extend(violations(value, path))


def _check_text(
    text: str, path: str, chars: int | None, nul: bool, found: list[tuple[str, str]]
) -> None:
    if chars is not None and len(text) > chars:
        found.append((path, f"at most {chars:,} characters (got {len(text):,})"))
    if not nul and "\0" in text:
        found.append((path, "must not contain NUL characters"))


def _check_map(
    entries: Mapping[str, object],
    path: str,
    limit: Limit,
    field: FieldDescriptor,
    found: list[tuple[str, str]],
) -> None:
    if limit.items is not None and len(entries) > limit.items:
        found.append((path, f"at most {limit.items:,} entries (got {len(entries):,})"))
        return
    total = 0
    for key, value in entries.items():
        total += len(key)
        if limit.key_chars is not None and len(key) > limit.key_chars:
            found.append(
                (path, f"name {quoted(key)} is longer than {limit.key_chars:,} characters")
            )
            continue
        if not limit.nul and "\0" in key:
            found.append((path, f"name {quoted(key)} contains a NUL character"))
            continue
        if isinstance(value, str):
            total += len(value)
            _check_text(value, f"{path}.{key}", limit.chars, limit.nul, found)
        else:
            assert isinstance(value, struct_pb2.Value), field.full_name
            total += _check_value(value, f"{path}.{key}", limit, found)
    if limit.total_chars is not None and total > limit.total_chars:
        found.append(
            (
                path,
                f"names and values at most {limit.total_chars:,} characters in all (got {total:,})",
            )
        )


def _check_value(
    value: struct_pb2.Value, path: str, limit: Limit, found: list[tuple[str, str]]
) -> int:
    """Check a Value's strings (alone or in a list); return their characters. Other kinds are
    validation.py's to judge. Strings of a list are read as one Python list: per-item access to
    protobuf messages costs microseconds, and a request may hold 400,000 of them."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        _check_text(value.string_value, path, limit.chars, limit.nul, found)
        return len(value.string_value)
    if kind != "list_value":
        return 0
    items = value.list_value.values
    if len(items) > LIST_VALUE_ITEMS:
        found.append((path, f"at most {LIST_VALUE_ITEMS} items (got {len(items):,})"))
        return 0
    texts = [item.string_value for item in items]  # "" for items that are not strings
    for i, text in enumerate(texts):
        if (limit.chars is not None and len(text) > limit.chars) or "\0" in text:
            _check_text(text, f"{path}[{i}]", limit.chars, limit.nul, found)
    return sum(map(len, texts))


def timestamp_problem(ts: timestamp_pb2.Timestamp) -> str | None:
    """Why ``ts`` is not a valid google.protobuf.Timestamp (None if it is)."""
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS:
        return f"must be from {TIMESTAMP_RANGE} (seconds {ts.seconds} is out of range)"
    if not 0 <= ts.nanos < _NANOS_PER_SECOND:
        return f"nanos must be from 0 to 999,999,999 (got {ts.nanos:,})"
    return None


# --- documentation ---


def request_fields() -> Iterator[FieldDescriptor]:
    """Every field of every request message of the services, each once, in declaration order
    (well-known types such as Timestamp and Value are leaves)."""
    seen: set[str] = set()

    def walk(descriptor: Descriptor) -> Iterator[FieldDescriptor]:
        if descriptor.full_name in seen or descriptor.full_name.startswith("google.protobuf."):
            return
        seen.add(descriptor.full_name)
        for field in descriptor.fields:
            if not _has_limit(field):
                continue
            yield field
            if field.message_type is not None and not _is_map(field):
                yield from walk(field.message_type)

    for service in REQUEST_SERVICES:
        for method in service.methods:
            yield from walk(method.input_type)


def markdown() -> str:
    """The limits as the Markdown of docs/limits.md."""
    lines = [
        "# Request limits",
        "",
        "Generated from `services/wms/limits.py` by `python scripts/gen_limits_doc.py`; a test",
        "keeps this file equal to the table. A request over any limit is refused with",
        "INVALID_ARGUMENT naming each field over its limit, before any other rule is checked.",
        "",
        "| Field | Limit |",
        "|---|---|",
    ]
    for field in request_fields():
        name = field.full_name.removeprefix("ewms.v1.")
        lines.append(f"| `{name}` | {TEXT[field.full_name].describe() or 'its fields below'} |")
    lines += ["", "| Number | Bounds |", "|---|---|"]
    lines += [f"| `{name}` | {rule} |" for name, rule in NUMBERS.items()]
    lines += ["", *WHOLE_REQUESTS]
    return "\n".join(lines) + "\n"
