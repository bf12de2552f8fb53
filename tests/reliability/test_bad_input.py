"""Scenario 6, bad input: generated and hand-made bad requests, over gRPC and over REST.

Properties, for every request:
- the answer is never INTERNAL, UNKNOWN or an HTTP 5xx, and over gRPC never RESOURCE_EXHAUSTED
  (an error too large for the client's default metadata limit arrives as that instead of itself);
- every INVALID_ARGUMENT carries BadRequest field violations, each naming a field of the request,
  and when exactly one field was made bad, one of them names that field;
- gRPC and REST answer the same request with the same code and the same fields;
- the WMS keeps answering health checks (within 2 s each) while it checks the largest requests
  it accepts.

Hypothesis is used as a deterministic generator (derandomized, no database): the requests are
drawn first, then sent, many at a time, to one WMS.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ewms.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    pilot_service_pb2,
    queue_pb2,
    task_manager_service_pb2,
    taskforce_pb2,
    workflow_service_pb2,
    workflow_service_pb2_grpc,
)
from services.auth import Role
from services.config import DEFAULT_MAX_EVENT_BYTES
from services.errors import field_violations
from services.wms import RunningWms, limits, start_wms
from services.wms.http.gateway import route_table
from services.wms.server import SERVING_SERVICES
from tests.conftest import bearer, wms_settings
from tests.wms.helpers import PilotStream, TmsStream
from tests.wms.requests import minimal_task, workflow_request

ws = workflow_service_pb2
es = event_service_pb2
T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]
CONCURRENCY = 16
HEALTH_DEADLINE = 2.0  # seconds: liveness, not a benchmark
# Over gRPC: what a bad request may be answered with. Never INTERNAL, UNKNOWN, RESOURCE_EXHAUSTED.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
}
ALLOWED_NUMBERS = {code.value[0] for code in ALLOWED}
# aiohttp's HTTP parser refuses a request line or header longer than this, before any route.
MAX_HTTP_LINE = 8190


# --- drawing requests -------------------------------------------------------------------------


def draw(strategy: st.SearchStrategy[T], n: int) -> list[T]:
    """``n`` examples of ``strategy``, the same ones on every run."""
    drawn: list[T] = []

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(strategy)
    def collect(value: T) -> None:
        drawn.append(value)

    collect()
    return drawn


MIB = 1 << 20
# Edge values as (text, repeat): drawn small, expanded after drawing (hypothesis keeps a repr of
# every value it draws, and a megabyte repr costs as much as it sounds).
EDGE_TEXTS: list[tuple[str, int]] = [
    ("", 1),
    (" ", 1),
    ("\0", 1),
    ("a\0b", 1),
    ("'unclosed", 1),
    ('say "hi', 1),
    ("trailing \\", 1),
    ("../../etc/passwd", 1),
    ("\x1b[31m\r\n\t", 1),
    ("é", 300),
    ("\U0001d518", 5000),  # four bytes each in UTF-8
    ("x", limits.ID_CHARS + 1),
    ("x", limits.ENV_VALUE_CHARS + 1),
    ("a", limits.ARGS_CHARS + 1),
    ("y", 20_000),
    ("z", MIB),
    ("'q", MIB),  # a megabyte word in an unclosed quote (one, as expanded): minutes for shlex
    ("local", 1),
    ("sub-2", 1),
    ("osg", 1),
    ("512M", 1),
    ("9", 400),
    ("9999999999999T", 1),
    ("1P", 1),
    ("1025P", 1),
    ("latest", 1),
    ("1.2.3", 1),
    ("EWMS_PILOT_X", 1),
]


def _expand(edge: tuple[str, int]) -> str:
    """``text * repeat``; a text of two characters is its first and then the second repeated."""
    text, repeat = edge
    return text[0] + text[1] * repeat if len(text) == 2 and repeat > 1 else text * repeat


TEXTS = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=24),
    st.sampled_from(EDGE_TEXTS).map(_expand),
)
TEXT_LISTS = st.one_of(
    st.lists(TEXTS, max_size=3),
    st.sampled_from([("a", limits.ALIASES_PER_LIST + 1), ("local", 17), ("in", 2)]).map(
        lambda edge: [edge[0]] * edge[1]
    ),
)
NUMBERS = st.one_of(
    st.floats(),
    st.sampled_from([math.inf, -math.inf, math.nan, 1e300, -0.0, 0.5, 2.0**53 + 2, 1024.0]),
    st.integers(-(2**63), 2**63).map(float),
)
INT32 = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31), 10_000, 10_001, 100, 101]),
)
INT64 = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -62_135_596_801, 253_402_300_800])
)
ENV_NAMES = st.one_of(
    st.sampled_from(
        [
            "A",
            "EWMS_PILOT_X",
            "_",
            "1A",
            "A-B",
            "",
            "N" * 129,
            "A\0",
            "LD_PRELOAD",
            "PATH",
            "EWMS_PILOT_TASK_ARGS",
        ]
    ),
    st.text(max_size=8, alphabet=st.characters(blacklist_categories=["Cs"])),
)
ENVS = st.one_of(
    st.dictionaries(ENV_NAMES, TEXTS, max_size=3),
    st.sampled_from([(limits.ENV_ENTRIES + 1, 1), (5, limits.ENV_VALUE_CHARS)]).map(
        lambda edge: {f"V{i}": "v" * edge[1] for i in range(edge[0])}
    ),
)


def _value(kind: str, item: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if kind == "string":
        value.string_value = item
    elif kind == "number":
        value.number_value = item
    elif kind == "bool":
        value.bool_value = item
    elif kind == "null":
        value.null_value = struct_pb2.NULL_VALUE
    elif kind == "list":
        value.list_value.values.extend(item)
    else:
        value.struct_value.update(item)
    return value


SCALAR_VALUES = st.one_of(
    st.builds(_value, st.just("string"), TEXTS),
    st.builds(_value, st.just("number"), NUMBERS),
    st.builds(_value, st.just("bool"), st.booleans()),
    st.builds(_value, st.just("null"), st.none()),
)
VALUES = st.one_of(
    SCALAR_VALUES,
    st.builds(_value, st.just("list"), st.lists(SCALAR_VALUES, max_size=20)),
    st.builds(
        _value, st.just("struct"), st.dictionaries(st.text(max_size=5), st.text(), max_size=3)
    ),
)
PILOT_ENVS = st.dictionaries(ENV_NAMES, VALUES, max_size=3)
TASK_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "task_image": TEXTS,
    "task_args": TEXTS,
    "init_image": TEXTS,
    "init_args": TEXTS,
    "task_env": ENVS,
    "init_env": ENVS,
    "cluster_locations": TEXT_LISTS,
    "input_queue_aliases": TEXT_LISTS,
    "output_queue_aliases": TEXT_LISTS,
    "n_workers": INT32,
    "max_attempts": INT32,
    "pilot_config.tag": TEXTS,
    "pilot_config.image_source": TEXTS,
    "pilot_config.environment": PILOT_ENVS,
    "pilot_config.input_files": TEXT_LISTS,
    "worker_config.worker_disk": VALUES,
    "worker_config.worker_memory": VALUES,
    "worker_config.condor_requirements": TEXTS,
    "worker_config.n_cores": INT32,
    "worker_config.max_worker_runtime": INT32,
    "worker_config.priority": INT32,
    "worker_config": st.none(),  # cleared
    "pilot_config": st.none(),
}
TOP_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "priority": INT32,
    "public_queue_aliases": TEXT_LISTS,
    "tasks": st.sampled_from([0, 2, limits.TASKS + 1, 300]),  # how many copies of the task
}
MUTATIONS = st.one_of(
    *(st.tuples(st.just(f"tasks[0].{name}"), s) for name, s in TASK_FIELDS.items()),
    *(st.tuples(st.just(name), s) for name, s in TOP_FIELDS.items()),
)


def _assign(target: Message, name: str, value: Any) -> None:
    """Set one field of ``target`` (a dotted path below it) to a drawn value."""
    *parents, last = name.split(".")
    for parent in parents:
        target = getattr(target, parent)
    if value is None:
        target.ClearField(last)
        return
    current = getattr(target, last)
    if isinstance(value, list):
        del current[:]
        current.extend(value)
    elif isinstance(value, dict):
        current.clear()
        for key, item in value.items():
            if isinstance(item, Message):
                current[key].CopyFrom(item)
            else:
                current[key] = item
    elif isinstance(value, Message):
        current.CopyFrom(value)
    else:
        setattr(target, last, value)


@dataclass
class Drawn:
    """A request, and the field made bad when only one was."""

    request: Message
    only_changed: str | None = None
    rpc: str = "CreateWorkflow"


def _create_workflow(mutations: list[tuple[str, Any]]) -> Drawn:
    request = workflow_request(minimal_task(), public_queue_aliases=[])
    # Copies of the task first, so that a mutation of tasks[0] stays one mutation.
    for name, value in sorted(mutations, key=lambda m: m[0] != "tasks"):
        if name == "tasks":
            task = request.tasks[0] if request.tasks else workflow_request(minimal_task()).tasks[0]
            del request.tasks[:]
            request.tasks.extend([task] * value)
        elif name.startswith("tasks[0].") and request.tasks:
            _assign(request.tasks[0], name.removeprefix("tasks[0]."), value)
        elif not name.startswith("tasks[0]."):
            _assign(request, name, value)
    only = mutations[0][0] if len(mutations) == 1 else None
    return Drawn(request, only)


CREATE_WORKFLOW = st.builds(
    _create_workflow,
    st.one_of(st.lists(MUTATIONS, min_size=1, max_size=1), st.lists(MUTATIONS, max_size=4)),
)


# --- checking answers -------------------------------------------------------------------------

# A field, then list indexes or a map key in brackets ("headers['x-a']"), then a dot or the end.
_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[[^\]]*\])*)(?:\.|$)")


def names_a_field(descriptor: Descriptor, path: str) -> bool:
    """Whether ``path`` (``tasks[0].task_env.NAME``) leads through fields of ``descriptor``: map
    keys and the insides of well-known types (Value, Timestamp) after their field count as named."""
    rest, current = path, descriptor
    while rest:
        step = _STEP.match(rest)
        if step is None:
            return False
        found = current.fields_by_name.get(step.group(1))
        if found is None:
            return False
        rest = rest[step.end() :]
        inner = found.message_type
        if inner is None:
            return not rest
        if inner.GetOptions().map_entry or inner.full_name.startswith("google.protobuf."):
            return True
        current = inner
    return True


def related(changed: str, named: str) -> bool:
    """Whether a violation's field is the changed field, inside it, or contains it."""
    return any(
        a == b or a.startswith(b + ".") or a.startswith(b + "[")
        for a, b in ((named, changed), (changed, named))
    )


@dataclass
class Answer:
    """A call's outcome, from either transport: code number and violations."""

    code: int
    violations: list[tuple[str, str]]
    message: str = ""
    transport: str = "grpc"
    malformed: bool = False  # REST: the body is not JSON the gateway can read (no field to name)


@dataclass
class Tally:
    """What the scenario saw, for the outcome table."""

    sent: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, answer: Answer) -> None:
        self.sent += 1
        key = f"{answer.transport}:{answer.code}"
        self.codes[key] = self.codes.get(key, 0) + 1


def check(drawn: Drawn, answer: Answer, descriptor: Descriptor, tally: Tally) -> None:
    """Record what is wrong with an answer (nothing, if all holds)."""
    tally.add(answer)
    where = f"{answer.transport} {drawn.rpc} {_show(drawn.request)}"
    if answer.code not in ALLOWED_NUMBERS:
        tally.problems.append(f"{where}: code {answer.code}: {answer.message[:300]}")
        return
    if answer.code != grpc.StatusCode.INVALID_ARGUMENT.value[0] or answer.malformed:
        return
    if not answer.violations:
        tally.problems.append(f"{where}: INVALID_ARGUMENT without field violations")
        return
    unnamed = [f for f, _ in answer.violations if not names_a_field(descriptor, f)]
    if unnamed:
        tally.problems.append(f"{where}: violations name no field of the request: {unnamed}")
    if drawn.only_changed and not any(related(drawn.only_changed, f) for f, _ in answer.violations):
        tally.problems.append(
            f"{where}: {drawn.only_changed} was changed, violations name {answer.violations}"
        )


def _show(message: Message) -> str:
    text = str(message).replace("\n", " ")
    return text if len(text) <= 400 else text[:400] + f"… ({len(text)} chars)"


async def grpc_answer(
    call: Callable[..., Awaitable[Any]], request: Message, md: Metadata
) -> Answer:
    try:
        await call(request, metadata=md, timeout=60)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        found = field_violations(exc) if code == grpc.StatusCode.INVALID_ARGUMENT else []
        return Answer(code.value[0], found, exc.details() or "")
    return Answer(0, [])


# --- REST ---------------------------------------------------------------------------------------

# A value JSON cannot hold is drawn as a marker string, then written as these tokens.
_NON_FINITE = {"@@nan@@": "NaN", "@@inf@@": "Infinity", "@@-inf@@": "-Infinity"}
_BAD_TIME = "10000-01-01T00:00:00Z"  # a Timestamp out of range, as JSON would carry it
_SENTINEL_TS = timestamp_pb2.Timestamp(seconds=1, nanos=123_456_789)
_SENTINEL_TEXT = _SENTINEL_TS.ToJsonString()


def _json_safe(message: Message) -> tuple[Message, bool]:
    """A copy whose non-finite numbers and out-of-range timestamps are markers; and whether any
    was."""
    copy = type(message)()
    copy.CopyFrom(message)
    changed = [False]

    def walk(msg: Message) -> None:
        if isinstance(msg, struct_pb2.Value):
            if msg.WhichOneof("kind") == "number_value" and not math.isfinite(msg.number_value):
                n = msg.number_value
                msg.string_value = (
                    "@@nan@@" if math.isnan(n) else ("@@inf@@" if n > 0 else "@@-inf@@")
                )
                changed[0] = True
            elif msg.WhichOneof("kind") == "list_value":
                for item in msg.list_value.values:
                    walk(item)
            elif msg.WhichOneof("kind") == "struct_value":
                for item in msg.struct_value.fields.values():
                    walk(item)
            return
        if isinstance(msg, timestamp_pb2.Timestamp):
            if not _valid_time(msg):
                msg.CopyFrom(_SENTINEL_TS)
                changed[0] = True
            return
        for fd, value in msg.ListFields():
            if fd.message_type is None:
                continue
            if fd.message_type.GetOptions().map_entry:
                items = (
                    value.values() if fd.message_type.fields_by_name["value"].message_type else []
                )
            elif fd.is_repeated:
                items = value
            else:
                items = [value]
            for item in items:
                walk(item)

    walk(copy)
    return copy, changed[0]


def _valid_time(ts: timestamp_pb2.Timestamp) -> bool:
    """google.protobuf.Timestamp's range, years 1 to 9999 (json_format refuses others)."""
    return -62_135_596_800 <= ts.seconds <= 253_402_300_799 and 0 <= ts.nanos < 10**9


def _json_text(message: Message, drop: set[str] = frozenset()) -> tuple[str, bool]:
    safe, changed = _json_safe(message)
    data = json_format.MessageToDict(safe, preserving_proto_field_name=True)
    for name in drop:
        data.pop(name, None)
    text = json.dumps(data, ensure_ascii=False)
    for marker, token in _NON_FINITE.items():
        text = text.replace(f'"{marker}"', token)
    return text.replace(_SENTINEL_TEXT, _BAD_TIME), changed


def _query(message: Message, drop: set[str]) -> list[tuple[str, str]]:
    safe, _ = _json_safe(message)
    data = json_format.MessageToDict(safe, preserving_proto_field_name=True)
    params = []
    for name, value in data.items():
        if name in drop:
            continue
        for item in value if isinstance(value, list) else [value]:
            text = json.dumps(item) if isinstance(item, bool) else str(item)
            params.append((name, text.replace(_SENTINEL_TEXT, _BAD_TIME)))
    return params


class Rest:
    """Calls of the REST gateway made from the same request messages."""

    def __init__(self, session: aiohttp.ClientSession, token: str) -> None:
        self.session = session
        self.headers = {"Authorization": f"Bearer {token}"}
        self.bindings = {b.rpc.name: b for b in route_table(SERVING_SERVICES[:2])}

    async def call(self, rpc: str, request: Message) -> Answer:
        binding = self.bindings[rpc]
        bound = {path for _, path in binding.template.variables}
        path = binding.template.template
        for _, name in binding.template.variables:
            value = str(getattr(request, name))
            path = path.replace(f"{{{name}}}", urllib.parse.quote(value, safe=""))
        if binding.transcoder.body == "*":
            text, malformed = _json_text(request, bound)
            return await self.send(binding.method, path, [], text.encode(), malformed)
        return await self.send(binding.method, path, _query(request, bound), b"", False)

    async def send(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        body: bytes,
        malformed: bool,
        content_type: str = "application/json",
    ) -> Answer:
        headers = {**self.headers, "Content-Type": content_type} if body else self.headers
        url = path + ("?" + urllib.parse.urlencode(query) if query else "")
        async with self.session.request(method, url, data=body or None, headers=headers) as r:
            text = await r.text()
            if len(url) > MAX_HTTP_LINE - 20:
                # Refused by aiohttp's parser before any route: plain text, never a 5xx.
                return Answer(3 if r.status == 400 else 13, [], text, "rest", True)
            if r.status >= 500:
                return Answer(13, [], f"HTTP {r.status}: {text[:300]}", "rest")
            status = json.loads(text) if r.status >= 400 else {"code": 0}
        violations = [
            (v["field"], v["description"])
            for d in status.get("details", [])
            for v in d.get("field_violations", [])
        ]
        malformed = malformed or (status["code"] == 3 and not status.get("details"))
        return Answer(status["code"], violations, status.get("message", ""), "rest", malformed)


# --- the WMS ------------------------------------------------------------------------------------


@dataclass
class Target:
    """A running WMS, clients on both transports, and real objects to aim requests at."""

    wms: RunningWms
    md: Metadata
    workflows: workflow_service_pb2_grpc.WorkflowServiceStub
    events: event_service_pb2_grpc.EventServiceStub
    rest: Rest
    ids: dict[str, str]
    channel: grpc.aio.Channel


@pytest.fixture
async def target(tmp_path: Path) -> AsyncIterator[Target]:
    settings = wms_settings(tmp_path / "wms")
    wms = await start_wms(settings)
    token = wms.authority.mint("alice", Role.USER, 3600)
    md = bearer(token)
    try:
        # Default client options: errors must arrive within the default metadata limits.
        async with (
            grpc.aio.insecure_channel(wms.address) as channel,
            aiohttp.ClientSession(base_url=wms.http_url) as session,
        ):
            workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
            created = await workflows.CreateWorkflow(workflow_request(minimal_task()), metadata=md)
            ids = {
                "workflow_id": created.workflow.workflow_id,
                "task_id": created.task_directives[0].task_id,
                "taskforce_uuid": created.taskforces[0].taskforce_uuid,
                "queue_id": created.queues[0].queue_id,
            }
            yield Target(
                wms,
                md,
                workflows,
                event_service_pb2_grpc.EventServiceStub(channel),
                Rest(session, token),
                ids,
                channel,
            )
    finally:
        await wms.stop(grace=None)


async def in_batches(items: list[T], send: Callable[[T], Awaitable[None]]) -> None:
    for i in range(0, len(items), CONCURRENCY):
        await asyncio.gather(*(send(item) for item in items[i : i + CONCURRENCY]))


def report(tally: Tally) -> str:
    shown = "\n".join(tally.problems[:15])
    return f"{len(tally.problems)} of {tally.sent} answers broke a property:\n{shown}"


# --- CreateWorkflow -----------------------------------------------------------------------------


async def test_generated_create_workflow_requests_are_refused_by_field_over_both_transports(
    target: Target, outcome: Any
) -> None:
    drawn = draw(CREATE_WORKFLOW, 1100)
    tally = Tally()
    descriptor = ws.CreateWorkflowRequest.DESCRIPTOR
    disagreements: list[str] = []

    async def send(d: Drawn) -> None:
        by_grpc = await grpc_answer(target.workflows.CreateWorkflow, d.request, target.md)
        by_rest = await target.rest.call("CreateWorkflow", d.request)
        check(d, by_grpc, descriptor, tally)
        check(d, by_rest, descriptor, tally)
        if not by_rest.malformed and (by_grpc.code, _fields(by_grpc)) != (
            by_rest.code,
            _fields(by_rest),
        ):
            disagreements.append(
                f"{_show(d.request)}: gRPC {by_grpc.code} {_fields(by_grpc)} / "
                f"REST {by_rest.code} {_fields(by_rest)}"
            )

    await in_batches(drawn, send)

    assert len(drawn) >= 1000
    assert not tally.problems, report(tally)
    assert not disagreements, "\n".join(disagreements[:10])
    reached = _edge_cases_reached(drawn)
    assert reached == set(EDGE_CASES), f"edge cases never drawn: {set(EDGE_CASES) - reached}"
    outcome(
        "bad input: generated CreateWorkflow (gRPC + REST)",
        events_in=tally.sent,
        detail=f"0 INTERNAL/5xx/RESOURCE_EXHAUSTED; codes {dict(sorted(tally.codes.items()))}",
    )


def _fields(answer: Answer) -> list[str]:
    """The fields named, in order: maps come back in no particular order on either transport."""
    return sorted(f for f, _ in answer.violations)


EDGE_CASES: dict[str, Callable[[ws.CreateWorkflowRequest], bool]] = {
    "huge string": lambda r: any(len(s) >= MIB for s in _strings(r)),
    "NUL": lambda r: any("\0" in s for s in _strings(r)),
    "inf/NaN": lambda r: any(not math.isfinite(n) for n in _numbers(r)),
    "400-digit size": lambda r: any(s == "9" * 400 for s in _strings(r)),
    "hundreds of tasks": lambda r: len(r.tasks) >= 300,
    "n_workers 2^31-1": lambda r: any(t.n_workers == 2**31 - 1 for t in r.tasks),
}


def _strings(message: Message) -> list[str]:
    found: list[str] = []
    for fd, value in message.ListFields():
        if fd.type == FieldDescriptor.TYPE_STRING:
            found.extend(value if fd.is_repeated else [value])
        elif fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            found.extend(value.keys())
            found.extend(v.string_value if isinstance(v, Message) else v for v in value.values())
        elif fd.message_type is not None:
            for item in value if fd.is_repeated else [value]:
                if isinstance(item, struct_pb2.Value):
                    found.append(item.string_value)
                else:
                    found.extend(_strings(item))
    return found


def _numbers(message: Message) -> list[float]:
    found: list[float] = []
    for task in getattr(message, "tasks", []):
        wc, env = task.worker_config, task.pilot_config.environment
        found += [wc.worker_disk.number_value, wc.worker_memory.number_value]
        found += [v.number_value for v in env.values()]
    return found


def _edge_cases_reached(drawn: list[Drawn]) -> set[str]:
    return {
        name
        for name, reached in EDGE_CASES.items()
        if any(reached(d.request) for d in drawn)  # type: ignore[arg-type]
    }


# --- the other RPCs -----------------------------------------------------------------------------

IDS = st.sampled_from(
    [("", 1), ("WF-nope", 1), ("x", 129), ("x", 20_000), ("a\0b", 1), ("a/b", 1), ("é", 200)]
).map(_expand)
TIMESTAMPS = st.builds(
    timestamp_pb2.Timestamp,
    seconds=st.one_of(st.integers(0, 2**31), INT64),
    nanos=st.one_of(st.integers(0, 999_999_999), st.sampled_from([-1, 1_000_000_000, 2**31 - 1])),
)
ENUMS = st.one_of(st.integers(0, 9), st.sampled_from([-1, 99, 2**31 - 1]))
PAGE_TOKENS = st.one_of(TEXTS, st.just("eyJhZnRlciI6IDEsICJmIjogIngifQ"))


def _event(**fields: Any) -> queue_pb2.Event:
    event = queue_pb2.Event()
    for name, value in fields.items():
        if value is not None:
            _assign(event, name, value)
    return event


def _json_value() -> st.SearchStrategy[struct_pb2.Value]:
    many = st.just(20_000).map(lambda n: _value("list", [_value("number", 1.0)] * n))
    leaves = st.one_of(SCALAR_VALUES, many)
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.builds(_value, st.just("list"), st.lists(inner, max_size=4)),
            st.builds(
                lambda d: _value("struct", {}) if not d else _struct(d),
                st.dictionaries(st.text(max_size=6), inner, max_size=3),
            ),
        ),
        max_leaves=8,
    )


def _struct(items: dict[str, struct_pb2.Value]) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.struct_value.SetInParent()
    for key, item in items.items():
        value.struct_value.fields[key].CopyFrom(item)
    return value


EVENTS = st.builds(
    _event,
    event_id=st.one_of(st.none(), TEXTS),
    payload=st.one_of(
        st.none(), st.binary(max_size=16), st.just(70 * 1024).map(lambda n: b"\0" * n)
    ),
    json=st.one_of(st.none(), _json_value()),
    text=st.one_of(st.none(), TEXTS),
    content_type=st.one_of(
        st.none(), TEXTS, st.sampled_from(["text/plain; charset=latin1", "application/json"])
    ),
    headers=st.one_of(
        st.none(),
        st.dictionaries(st.one_of(ENV_NAMES, st.just("x-ewms-attempt")), TEXTS, max_size=3),
        st.just(limits.HEADER_ENTRIES + 1).map(lambda n: {f"h{i}": "v" for i in range(n)}),
    ),
    published_ts=st.one_of(st.none(), TIMESTAMPS),
    **{"provenance.worker_id": st.one_of(st.none(), TEXTS)},
)


def other_rpcs(ids: dict[str, str]) -> st.SearchStrategy[Drawn]:
    """Requests to every other unary RPC, aimed at real objects or not."""

    def real(name: str) -> st.SearchStrategy[str]:
        return st.one_of(st.just(ids[name]), IDS, TEXTS)

    queue, workflow, task, tf = (
        real(n) for n in ("queue_id", "workflow_id", "task_id", "taskforce_uuid")
    )
    not_the_workflow = st.one_of(IDS, TEXTS)  # Abort and Finish would end the target workflow
    strategies: dict[str, st.SearchStrategy[Message]] = {
        "GetWorkflow": st.builds(ws.GetWorkflowRequest, workflow_id=workflow),
        "ListWorkflows": st.builds(
            _list_workflows,
            state=ENUMS,
            owner=st.one_of(st.sampled_from(["", "alice", "bob"]), TEXTS),
            after=st.one_of(st.none(), TIMESTAMPS),
            before=st.one_of(st.none(), TIMESTAMPS),
            page_size=INT32,
            page_token=PAGE_TOKENS,
        ),
        "AbortWorkflow": st.builds(ws.AbortWorkflowRequest, workflow_id=not_the_workflow),
        "FinishWorkflow": st.builds(ws.FinishWorkflowRequest, workflow_id=not_the_workflow),
        "GetTaskDirective": st.builds(ws.GetTaskDirectiveRequest, task_id=task),
        "ListTaskDirectives": st.builds(
            ws.ListTaskDirectivesRequest,
            workflow_id=workflow,
            page_size=INT32,
            page_token=PAGE_TOKENS,
        ),
        "AddWorkers": st.builds(
            ws.AddWorkersRequest,
            task_id=task,
            cluster_location=st.one_of(st.just("local"), TEXTS),
            n_workers=INT32,
        ),
        "GetTaskforce": st.builds(ws.GetTaskforceRequest, taskforce_uuid=tf),
        "ListTaskforces": st.builds(
            ws.ListTaskforcesRequest,
            workflow_id=workflow,
            task_id=task,
            cluster_location=TEXTS,
            phase=ENUMS,
            page_size=INT32,
            page_token=PAGE_TOKENS,
        ),
        "ListQueues": st.builds(ws.ListQueuesRequest, workflow_id=workflow),
        "Publish": st.builds(
            es.PublishRequest,
            queue_id=queue,
            events=st.one_of(
                st.lists(EVENTS, max_size=3),
                st.just(limits.PUBLISH_EVENTS + 1).map(lambda n: [queue_pb2.Event()] * n),
            ),
        ),
        "Receive": st.builds(
            es.ReceiveRequest,
            queue_id=queue,
            max_events=INT32,
            lease_seconds=INT32,
            wait_seconds=st.sampled_from([0, -1, 61, 2**31 - 1]),  # never a real wait
            payload_format=ENUMS,
        ),
        "Ack": st.builds(es.AckRequest, queue_id=queue, ack_ids=TEXT_LISTS),
        "Nack": st.builds(
            es.NackRequest, queue_id=queue, ack_id=TEXTS, error=TEXTS, dead_letter=st.booleans()
        ),
        "GetQueueStats": st.builds(es.GetQueueStatsRequest, queue_id=queue),
        "ListDeadLetters": st.builds(
            es.ListDeadLettersRequest,
            queue_id=queue,
            page_size=INT32,
            page_token=PAGE_TOKENS,
            payload_format=ENUMS,
        ),
        "RedriveDeadLetters": st.builds(
            es.RedriveDeadLettersRequest, queue_id=queue, event_ids=TEXT_LISTS
        ),
    }
    return st.one_of(
        *(s.map(lambda m, rpc=rpc: Drawn(m, None, rpc)) for rpc, s in strategies.items())
    )


def _list_workflows(
    after: timestamp_pb2.Timestamp | None, before: timestamp_pb2.Timestamp | None, **fields: Any
) -> ws.ListWorkflowsRequest:
    request = ws.ListWorkflowsRequest(**fields)
    if after is not None:
        request.created_after.CopyFrom(after)
    if before is not None:
        request.created_before.CopyFrom(before)
    return request


async def test_generated_requests_to_the_other_rpcs_are_refused_by_field_over_both_transports(
    target: Target, outcome: Any
) -> None:
    drawn = draw(other_rpcs(target.ids), 450)
    tally = Tally()
    stubs = {"ws": target.workflows, "es": target.events}

    async def send(d: Drawn) -> None:
        stub = stubs["es" if d.request.DESCRIPTOR.file is es.DESCRIPTOR else "ws"]
        descriptor = d.request.DESCRIPTOR
        check(d, await grpc_answer(getattr(stub, d.rpc), d.request, target.md), descriptor, tally)
        check(d, await target.rest.call(d.rpc, d.request), descriptor, tally)

    await in_batches(drawn, send)

    assert len(drawn) >= 300
    assert len({d.rpc for d in drawn}) == 17
    assert not tally.problems, report(tally)
    outcome(
        "bad input: generated requests to 17 other RPCs (gRPC + REST)",
        events_in=tally.sent,
        detail=f"0 INTERNAL/5xx/RESOURCE_EXHAUSTED; codes {dict(sorted(tally.codes.items()))}",
    )


# --- REST bodies that are not the JSON of a request ---------------------------------------------

RAW_BODIES = [
    b"{",
    b"[]",
    b"null",
    b'"tasks"',
    b"\xff\xfe",
    b'{"tasks": NaN}',
    b'{"tasks": [{"n_workers": Infinity}]}',
    b'{"tasks": [{"n_workers": 1e400}]}',
    b'{"tasks": [{"n_workers": ' + b"9" * 400 + b"}]}",
    b'{"tasks": [{"worker_config": {"worker_memory": 1e400}}]}',
    b'{"tasks": [{"worker_config": {"worker_memory": ' + b"9" * 400 + b"}}]}",
    b'{"tasks": "not a list"}',
    b'{"tasks": [1, "two", null, []]}',
    b'{"tasks": [{"task_env": ["A", "B"]}]}',
    b'{"tasks": [{"task_env": {"A": 1}}]}',
    b'{"tasks": [{"cluster_locations": "local"}]}',
    b'{"priority": "high"}',
    b'{"priority": 1.5}',
    b'{"priority": true}',
    b'{"unknown": 1}',
    b'{"tasks": [{"task_args": "a", "taskArgs": "b"}]}',
    b'{"tasks": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
    b'{"tasks": [' + b"{}," * 300_000 + b"{}]}",
    b'{"public_queue_aliases": [' + b'"a",' * 300_000 + b'"a"]}',
    b'{"tasks": [{"task_env": {' + b",".join(b'"V%d": "v"' % i for i in range(100_000)) + b"}}]}",
    b'{"tasks": [{"task_args": "' + b"a" * MIB + b'"}]}',
    b'{"tasks": [{"task_args": "\\u0000"}]}',
    b'{"tasks": [{"task_args": "\\ud800"}]}',
]


async def test_rest_bodies_that_are_no_request_are_invalid_argument(
    target: Target, outcome: Any
) -> None:
    cases = [(body, "application/json") for body in RAW_BODIES]
    cases += [(b"{}", "text/plain"), (b"{}", "application/json; charset=latin1"), (b"{}", "")]
    answers: list[tuple[bytes, Answer]] = []

    async def send(case: tuple[bytes, str]) -> None:
        body, content_type = case
        answer = await target.rest.send("POST", "/v1/workflows", [], body, False, content_type)
        answers.append((body, answer))

    await in_batches(cases, send)

    descriptor = ws.CreateWorkflowRequest.DESCRIPTOR
    for body, answer in answers:
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (body[:80], answer)
        # A body that is no JSON has no field to name; anything else names its fields, the
        # unknown key it sent, or "body" (the gateway's name for a body that is no JSON object).
        named = [f for f, _ in answer.violations if f not in ("unknown", "body")]
        assert answer.malformed or answer.violations, (body[:80], answer)
        assert all(names_a_field(descriptor, f) for f in named), (body[:80], answer)
    outcome(
        "bad input: malformed REST bodies",
        events_in=len(answers),
        detail="all HTTP 400 google.rpc.Status",
    )


# --- events ---------------------------------------------------------------------------------------


async def test_malformed_and_oversized_events_are_refused_naming_the_event_field(
    target: Target, outcome: Any
) -> None:
    queue = target.ids["queue_id"]
    over = DEFAULT_MAX_EVENT_BYTES + 1
    cases: dict[str, queue_pb2.Event] = {
        "events[0].payload": queue_pb2.Event(payload=b"\0" * over),
        "events[0].json": _event(json=_value("number", math.nan)),
        "events[0].text": _event(text="t", payload=b"p"),
        "events[0].content_type": _event(text="t", content_type="text/plain; charset=latin1"),
        "events[0].event_id": _event(event_id="e" * 129, payload=b"p"),
        "events[0].headers": _event(payload=b"p", headers={"n\0": "v"}),
        "events[0].published_ts": _event(
            payload=b"p", published_ts=timestamp_pb2.Timestamp(seconds=253_402_300_800)
        ),
    }
    tally = Tally()
    for name, event in cases.items():
        request = es.PublishRequest(queue_id=queue, events=[event])
        answers = [await grpc_answer(target.events.Publish, request, target.md)]
        if name != "events[0].payload":  # over 16 MiB of JSON is refused with 413 (see limits)
            answers.append(await target.rest.call("Publish", request))
        for answer in answers:
            check(Drawn(request, name, "Publish"), answer, es.PublishRequest.DESCRIPTOR, tally)
            if not answer.malformed:
                assert answer.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], (name, answer)

    assert not tally.problems, report(tally)
    outcome(
        "bad input: malformed and oversized events", events_in=tally.sent, detail="refused by field"
    )


INVALID = grpc.StatusCode.INVALID_ARGUMENT


# --- bytes that are no message at all ------------------------------------------------------------

# Corrupt wire data (a field header promising more bytes than follow), and a string field holding
# invalid UTF-8 (field 1 of CreateWorkflowRequest's tasks is a message; GetWorkflowRequest's
# workflow_id is field 1, a string).
UNDECODABLE = [b"\x0a\xff\xff\xff\x0f", b"\x0a\x02\xc3\x28", b"\xff" * 16]


async def test_requests_that_are_no_protobuf_message_are_invalid_argument(
    target: Target, outcome: Any
) -> None:
    """Raw bytes grpc cannot parse: INVALID_ARGUMENT naming the request, on unary and streaming
    calls, never grpc's own UNKNOWN ("Unexpected DecodeError")."""
    pilot_md = bearer(target.wms.authority.mint("p", Role.PILOT, 3600, scope="x"))
    calls: list[tuple[str, Any]] = [
        ("/ewms.v1.WorkflowService/CreateWorkflow", target.md),
        ("/ewms.v1.WorkflowService/GetWorkflow", target.md),
        ("/ewms.v1.EventService/Publish", target.md),
    ]
    answers = []
    for method, md in calls:
        call = target.channel.unary_unary(method)  # no serializers: raw bytes go out
        for data in UNDECODABLE:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(data, metadata=md, timeout=10)
            answers.append((method, err.value))
    connect = target.channel.stream_stream("/ewms.v1.PilotService/Connect")
    for data in UNDECODABLE:
        stream = connect(iter([data]), metadata=pilot_md, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stream:
                pass
        answers.append(("PilotService/Connect", err.value))
    wrong = [(m, e.code(), e.details()) for m, e in answers if e.code() != INVALID]
    assert not wrong, wrong
    assert all([f for f, _ in field_violations(e)] == ["request"] for _, e in answers)
    outcome("bad input: bytes that are no protobuf message", events_in=len(answers))


# --- pilot and TMS timestamps ---------------------------------------------------------------------


async def test_out_of_range_timestamps_from_pilots_and_tms_are_invalid_argument(
    target: Target,
) -> None:
    uuid = target.ids["taskforce_uuid"]
    pilot = PilotStream(
        target.channel, target.wms.authority.mint("p", Role.PILOT, 3600, scope=uuid)
    )
    await pilot.hello(uuid)
    status = pilot_service_pb2.PilotStatus(phase=taskforce_pb2.PILOT_PHASE_TASKING)
    status.timestamp.seconds = 253_402_300_800
    await pilot.send(status=status)
    pilot_error = await pilot.failure()

    tms = TmsStream(target.channel, target.wms.authority.mint("t", Role.TMS, 3600, scope="local"))
    await tms.hello()
    worker = task_manager_service_pb2.WorkerJobState(
        worker_id="7.0", job_state=taskforce_pb2.JOB_STATE_RUNNING
    )
    worker.chirps.last_updated.nanos = 1_000_000_000
    snapshot = task_manager_service_pb2.JobStatusSnapshot(
        taskforces=[
            task_manager_service_pb2.TaskforceJobStatus(taskforce_uuid=uuid, workers=[worker])
        ]
    )
    await tms.send(snapshot=snapshot)
    tms_error = await tms.failure()

    assert pilot_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(pilot_error)] == ["status.timestamp"]
    assert tms_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(tms_error)] == [
        "snapshot.taskforces[0].workers[0].chirps.last_updated"
    ]


# --- defect 2: the largest allowed request keeps health answered ----------------------------------


def largest_workflow() -> ws.CreateWorkflowRequest:
    """A workflow with every task field at its limit (of characters, entries and items)."""
    request = workflow_request(minimal_task(), public_queue_aliases=[])
    task = request.tasks[0]
    task.task_args = ("'a' " * limits.ARGS_CHARS)[: limits.ARGS_CHARS]
    task.init_args = ("\\a" * limits.ARGS_CHARS)[: limits.ARGS_CHARS]
    task.task_image = task.init_image = "/" + "i" * (limits.IMAGE_CHARS - 1)
    value_chars = limits.ENV_TOTAL_CHARS // limits.ENV_ENTRIES - limits.ENV_NAME_CHARS
    for env in (task.task_env, task.init_env):
        for i in range(limits.ENV_ENTRIES):
            env[f"V{i:03d}".ljust(limits.ENV_NAME_CHARS, "N")] = "v" * value_chars
    for i in range(limits.ENV_ENTRIES):
        strings = [struct_pb2.Value(string_value="")] * limits.LIST_VALUE_ITEMS
        task.pilot_config.environment[f"EWMS_PILOT_V{i}"].list_value.values.extend(strings)
    task.pilot_config.input_files.extend(f"/f{i}" for i in range(limits.INPUT_FILES))
    task.worker_config.condor_requirements = "r" * limits.REQUIREMENTS_CHARS
    task.cluster_locations[:] = ["local"]
    del request.tasks[:]
    request.tasks.extend([task] * limits.TASKS)
    return request


async def test_health_keeps_answering_while_the_largest_requests_are_checked(
    target: Target, outcome: Any
) -> None:
    largest = largest_workflow()
    big_json = queue_pb2.Event()
    big_json.json.list_value.values.extend([struct_pb2.Value(number_value=1.5)] * 1_000_000)
    publish = es.PublishRequest(queue_id=target.ids["queue_id"], events=[big_json])
    # Built before the probe starts: the test shares the WMS's event loop, and turning a million
    # numbers into JSON here would stall that loop itself.
    rest_body = _json_text(publish, {"queue_id"})[0].encode()
    health = health_pb2_grpc.HealthStub(target.channel)
    waits: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        # From one answer to the next, sleep included: the test shares the WMS's event loop, so a
        # stall that begins while the probe sleeps shows only in this gap.
        last = time.monotonic()
        while not done.is_set():
            await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            async with target.rest.session.get("/healthz") as r:
                assert r.status == 200
            now = time.monotonic()
            waits.append(now - last)
            last = now
            await asyncio.sleep(0.02)

    async with grpc.aio.insecure_channel(
        target.wms.address, options=[("grpc.max_receive_message_length", 64 * MIB)]
    ) as big:  # the largest workflow's response is as large as its request
        workflows = workflow_service_pb2_grpc.WorkflowServiceStub(big)
        prober = asyncio.create_task(probe())
        created = await workflows.CreateWorkflow(largest, metadata=target.md, timeout=120)
        await target.events.Publish(publish, metadata=target.md, timeout=120)
        rest = await target.rest.send(
            "POST", f"/v1/queues/{publish.queue_id}/events", [], rest_body, False
        )
        done.set()
        await prober

    assert len(created.task_directives) == limits.TASKS
    assert rest.code == 0
    assert len(waits) >= 3
    assert max(waits) < HEALTH_DEADLINE, f"health waited {max(waits):.2f} s"
    # And one character more is refused, by name.
    largest.tasks[-1].task_args += "a"
    answer = await grpc_answer(target.workflows.CreateWorkflow, largest, target.md)
    assert answer.violations == [
        (f"tasks[{limits.TASKS - 1}].task_args", "at most 16,384 characters (got 16,385)")
    ]
    outcome(
        "bad input: largest requests vs health",
        events_in=3,
        detail=f"{largest.ByteSize() // 1024} KiB workflow, 1M-number JSON event (gRPC + REST); "
        f"health worst {max(waits):.2f} s",
    )
