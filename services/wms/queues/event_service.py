"""EventService: publish to and consume from a workflow's queues, whichever broker holds them.

Checks here, for every backend: the queue exists and the caller may see it (NOT_FOUND, alike for a
queue that does not exist and one of another user's workflow or another taskforce, as
WorkflowService answers, so existence does not leak), the caller may use it this way
(PERMISSION_DENIED: a pilot receives only from its taskforce's input queues, publishes only into
its output queues, and neither lists nor re-drives dead letters), it was not deleted after
retention (FAILED_PRECONDITION), publishing needs an active workflow (FAILED_PRECONDITION), and
every field is valid (INVALID_ARGUMENT with field violations). Then the queue's broker does the
work.

Brokers hold every event's content as payload bytes. An event published with ``json`` or ``text``
is encoded to payload here, before the size check; a receiver asking for PAYLOAD_FORMAT_DECODED
gets the payload decoded back into ``json`` or ``text`` here, where that is exact.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import grpc
import structlog
from google.protobuf import json_format, struct_pb2

from ewms.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    queue_pb2,
    workflow_pb2,
)
from services import ids
from services.auth import Principal, Role, current_principal
from services.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    grpc_errors,
)
from services.events.client import RESERVED_HEADER_PREFIX
from services.wms import limits
from services.wms.pagination import page_of
from services.wms.queues.broker import UnknownAckId
from services.wms.queues.embedded import EmbeddedBroker
from services.wms.queues.manager import QueueManager
from services.wms.store import QUEUES, TASK_DIRECTIVES, TASKFORCES, WORKFLOWS, Store, Tx
from services.wms.validation import require_fields

log = structlog.get_logger(__name__)

Ctx = Any  # grpc.aio.ServicerContext; grpc ships no type information
MAX_PUBLISH_EVENTS = 10_000
MAX_PUBLISHABLE_CACHED = 10_000
MAX_PREFETCH = 10_000
MAX_LEASE_SECONDS = 7 * 24 * 3600
DEFAULT_RECEIVE_LEASE = 60
MAX_RECEIVE_EVENTS = 100
MAX_WAIT_SECONDS = 60
MAX_ACK_IDS = 10_000
MAX_EVENT_ID_CHARS = 128
MAX_HEADER_BYTES = 64 * 1024
# Subscribers with at least this prefetch get their deliveries batched over up to this long.
LINGER_MIN_PREFETCH = 64
DELIVERY_LINGER_SECONDS = 0.02
JSON_CONTENT_TYPE = "application/json"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
# Integers a double (a JSON number in google.protobuf.Value) holds exactly.
MAX_EXACT_INT = 2**53
PAYLOAD_FORMATS = frozenset(event_service_pb2.PayloadFormat.values())


class Use(enum.Enum):
    """What a call does with a queue, for a pilot's least privilege."""

    PUBLISH = "publish into"  # Publish: the taskforce's output queues
    CONSUME = "receive from"  # Subscribe, Receive, Ack, Nack: its input queues
    INSPECT = "read the counters of"  # GetQueueStats: either
    DEAD_LETTERS = "list or re-drive the dead letters of"  # never: the owner's decision


class PilotQueues(NamedTuple):
    """The queues of a pilot token's taskforce."""

    inputs: frozenset[str]
    outputs: frozenset[str]

    def allow(self, queue_id: str, use: Use) -> bool:
        """Whether the pilot may ``use`` the queue (it is one of the taskforce's)."""
        if use is Use.PUBLISH:
            return queue_id in self.outputs
        if use is Use.CONSUME:
            return queue_id in self.inputs
        return use is Use.INSPECT

    def holds(self, queue_id: str) -> bool:
        """Whether the queue is one of the taskforce's."""
        return queue_id in self.inputs or queue_id in self.outputs


class EventService(event_service_pb2_grpc.EventServiceServicer):
    """Events in and out of queues, for users and pilots."""

    def __init__(
        self,
        store: Store,
        queues: QueueManager,
        max_event_bytes: int,
        on_queues_changed: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        # Told the workflow's id after a publish or re-drive through the WMS (watchers refresh
        # their queue counters).
        self._on_queues_changed = on_queues_changed
        self._queues = queues
        self._max_event_bytes = max_event_bytes
        # Queues a pilot token's taskforce may use, by taskforce uuid (they never change).
        self._pilot_queues: dict[str, PilotQueues] = {}
        # Embedded queues a caller was allowed to publish into, by (queue id, caller): who may
        # publish where never changes, so a later Publish skips that read and the broker checks
        # only what can change (queue deleted, workflow deactivated) inside its own write.
        self._publishable: dict[tuple[str, Principal], queue_pb2.Queue] = {}

    async def _resolve(
        self, queue_id: str, principal: Principal, use: Use
    ) -> tuple[queue_pb2.Queue, workflow_pb2.Workflow]:
        """The queue and its workflow, if the caller may ``use`` it."""
        scope = principal.scope if principal.role is Role.PILOT else ""
        known_pilot = scope in self._pilot_queues

        def load(
            tx: Tx,
        ) -> tuple[queue_pb2.Queue | None, workflow_pb2.Workflow | None, PilotQueues | None]:
            queue = tx.get(QUEUES, queue_id)
            if queue is None:
                return None, None, None
            wf = tx.get(WORKFLOWS, queue.workflow_id)
            allowed = None
            if scope and not known_pilot:
                tf = tx.get(TASKFORCES, scope)
                td = tx.get(TASK_DIRECTIVES, tf.task_id) if tf is not None else None
                allowed = PilotQueues(
                    frozenset(td.input_queues if td is not None else ()),
                    frozenset(td.output_queues if td is not None else ()),
                )
            return queue, wf, allowed

        queue, wf, allowed = await self._store.run(load, write=False)
        if allowed is not None:
            self._pilot_queues[scope] = allowed
        pilot_queues = self._pilot_queues.get(scope, PilotQueues(frozenset(), frozenset()))
        # Another user's queue, or one outside the pilot's taskforce, is answered as one that does
        # not exist: the same code and message, so that existence does not leak.
        visible = queue is not None and (
            principal.is_admin
            or (principal.role is Role.USER and wf is not None and wf.owner == principal.subject)
            or (principal.role is Role.PILOT and pilot_queues.holds(queue_id))
        )
        if queue is None or wf is None or not visible:
            raise NotFound(f"queue {queue_id!r} not found")
        if principal.role is Role.PILOT and not pilot_queues.allow(queue_id, use):
            raise PermissionDenied(
                f"a pilot may not {use.value} queue {queue_id}: taskforce {scope!r} receives "
                "only from its input queues and publishes only into its output queues"
            )
        if queue.HasField("deleted_ts"):
            raise _deleted(queue)
        return queue, wf

    # --- publishing ---

    @grpc_errors
    async def Publish(
        self, request: event_service_pb2.PublishRequest, context: Ctx
    ) -> event_service_pb2.PublishResponse:
        limits.check(request)
        require_fields(queue_id=request.queue_id)
        await limits.off_loop_if_large(request.ByteSize(), self._validate_events, request)
        principal = current_principal()
        known = self._publishable.get((request.queue_id, principal))
        if known is not None:
            queue = known
        else:
            queue, wf = await self._resolve(request.queue_id, principal, Use.PUBLISH)
            if wf.deactivated:
                raise _deactivated(wf)
        broker = self._queues.broker(queue)
        now = time.time_ns()
        events = list(request.events)
        for event in events:
            if not event.event_id:
                event.event_id = ids.event_id()
            event.queue_id = queue.queue_id
            event.attempt = 0
            if not event.HasField("published_ts"):
                event.published_ts.FromNanoseconds(now)
            if principal.role is Role.PILOT:
                event.provenance.taskforce_uuid = principal.scope
        if isinstance(broker, EmbeddedBroker):
            event_ids = await broker.publish(queue, events, check=_still_open(queue))
            if known is None:
                if len(self._publishable) >= MAX_PUBLISHABLE_CACHED:
                    self._publishable.clear()
                self._publishable[(queue.queue_id, principal)] = queue
        else:
            event_ids = await broker.publish(queue, events)
        if self._on_queues_changed is not None:
            self._on_queues_changed(queue.workflow_id)
        return event_service_pb2.PublishResponse(event_ids=event_ids)

    def _validate_events(self, request: event_service_pb2.PublishRequest) -> None:
        violations: list[tuple[str, str]] = []
        if not request.events:
            violations.append(("events", "at least one event is required"))
        if len(request.events) > MAX_PUBLISH_EVENTS:
            violations.append(("events", f"at most {MAX_PUBLISH_EVENTS} events per call"))
        for i, event in enumerate(request.events):
            path = f"events[{i}]"
            source = _encode_content(event, path, violations)
            if len(event.payload) > self._max_event_bytes:
                size = f"{len(event.payload)} bytes"
                violations.append(
                    (
                        f"{path}.{source}",
                        (f"is {size}" if source == "payload" else f"encodes to a payload of {size}")
                        + f", over the limit of {self._max_event_bytes} bytes "
                        "(EWMS_MAX_EVENT_BYTES)",
                    )
                )
            if len(event.event_id) > MAX_EVENT_ID_CHARS or not event.event_id.isprintable():
                violations.append(
                    (
                        f"{path}.event_id",
                        f"must be printable and at most {MAX_EVENT_ID_CHARS} chars",
                    )
                )
            header_bytes = 0
            for key, value in event.headers.items():
                header_bytes += len(key) + len(value)
                if not key:
                    violations.append((f"{path}.headers", "header names must not be empty"))
                elif key.lower().startswith(RESERVED_HEADER_PREFIX):
                    violations.append(
                        (
                            f"{path}.headers[{key!r}]",
                            f"names starting with {RESERVED_HEADER_PREFIX!r} are reserved",
                        )
                    )
            if header_bytes > MAX_HEADER_BYTES:
                violations.append((f"{path}.headers", f"at most {MAX_HEADER_BYTES} bytes in all"))
            if len(event.content_type) > 255:
                violations.append((f"{path}.content_type", "at most 255 characters"))
        if violations:
            raise InvalidArgument(violations)

    # --- consuming ---

    @grpc_errors
    async def Subscribe(
        self,
        request_iterator: AsyncIterator[event_service_pb2.SubscribeRequest],
        context: Ctx,
    ) -> Any:
        principal = current_principal()
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        limits.check(first)
        if first.WhichOneof("kind") != "open":
            raise InvalidArgument([("open", "the first message must open the subscription")])
        opened = first.open
        violations: list[tuple[str, str]] = []
        if not opened.queue_id:
            violations.append(("open.queue_id", "required"))
        if not 0 <= opened.prefetch <= MAX_PREFETCH:
            violations.append(("open.prefetch", f"must be between 1 and {MAX_PREFETCH} (0: 1)"))
        if not 0 <= opened.lease_seconds <= MAX_LEASE_SECONDS:
            violations.append(
                ("open.lease_seconds", f"must be between 0 and {MAX_LEASE_SECONDS} (0: none)")
            )
        if violations:
            raise InvalidArgument(violations)
        queue, _ = await self._resolve(opened.queue_id, principal, Use.CONSUME)
        prefetch = opened.prefetch or 1
        sub = await self._queues.broker(queue).subscribe(queue, prefetch, opened.lease_seconds)
        problem: list[InvalidArgument] = []

        async def read_acks() -> None:
            try:
                async for req in requests:
                    if found := limits.violations(req):
                        problem.append(InvalidArgument(found))
                        break
                    kind = req.WhichOneof("kind")
                    if kind == "ack":
                        await sub.ack(*(queue_pb2.Delivery(ack_id=a) for a in req.ack.ack_ids))
                    elif kind == "nack":
                        await sub.nack(
                            queue_pb2.Delivery(ack_id=req.nack.ack_id),
                            req.nack.error,
                            dead_letter=req.nack.dead_letter,
                        )
                    elif kind == "pause":
                        await sub.pause()
                    elif kind == "prefetch":
                        wanted = req.prefetch.prefetch
                        if not 1 <= wanted <= MAX_PREFETCH:
                            problem.append(
                                InvalidArgument(
                                    [
                                        (
                                            "prefetch.prefetch",
                                            f"must be between 1 and {MAX_PREFETCH}",
                                        )
                                    ]
                                )
                            )
                            break
                        await sub.set_prefetch(wanted)
                    else:
                        problem.append(
                            InvalidArgument([("open", "only the first message may open")])
                        )
                        break
            except (asyncio.CancelledError, grpc.RpcError):
                pass
            finally:
                await sub.close()

        reader = asyncio.create_task(read_acks(), name=f"subscribe-acks-{queue.queue_id}")
        try:
            yield event_service_pb2.SubscribeResponse(
                opened=event_service_pb2.SubscribeOpened(
                    queue_id=queue.queue_id, prefetch=prefetch, lease_seconds=opened.lease_seconds
                )
            )
            # Deliveries ready together go in one message (a backend's subscription may offer
            # ``take_ready`` for that); a lone one goes as it is. A subscriber with a deep prefetch
            # (``ewms run`` collecting outputs) is not waiting for any one event: its deliveries
            # linger up to DELIVERY_LINGER_SECONDS to travel together, which saves a message each
            # way per event (the subscriber acks what arrived together together).
            take_ready = getattr(sub, "take_ready", None)
            linger = DELIVERY_LINGER_SECONDS if prefetch >= LINGER_MIN_PREFETCH else 0.0
            async for delivery in sub:
                if linger and take_ready is not None:
                    await asyncio.sleep(linger)
                more = take_ready() if take_ready is not None else []
                if more:
                    batch = event_service_pb2.DeliveryBatch(deliveries=[delivery, *more])
                    yield event_service_pb2.SubscribeResponse(batch=batch)
                else:
                    yield event_service_pb2.SubscribeResponse(delivery=delivery)
            if problem:
                raise problem[0]
        finally:
            reader.cancel()
            await sub.close()

    @grpc_errors
    async def Receive(
        self, request: event_service_pb2.ReceiveRequest, context: Ctx
    ) -> event_service_pb2.ReceiveResponse:
        limits.check(request)
        violations: list[tuple[str, str]] = []
        if not request.queue_id:
            violations.append(("queue_id", "required"))
        if not 0 <= request.max_events <= MAX_RECEIVE_EVENTS:
            violations.append(("max_events", f"must be between 1 and {MAX_RECEIVE_EVENTS} (0: 1)"))
        if not 0 <= request.lease_seconds <= MAX_LEASE_SECONDS:
            violations.append(
                (
                    "lease_seconds",
                    f"must be between 1 and {MAX_LEASE_SECONDS} (0: {DEFAULT_RECEIVE_LEASE})",
                )
            )
        if not 0 <= request.wait_seconds <= MAX_WAIT_SECONDS:
            violations.append(("wait_seconds", f"must be between 0 and {MAX_WAIT_SECONDS}"))
        violations += _payload_format_violations(request.payload_format)
        if violations:
            raise InvalidArgument(violations)
        queue, _ = await self._resolve(request.queue_id, current_principal(), Use.CONSUME)
        deliveries = await self._queues.broker(queue).receive(
            queue,
            request.max_events or 1,
            request.lease_seconds or DEFAULT_RECEIVE_LEASE,
            float(request.wait_seconds),
        )
        if request.payload_format == event_service_pb2.PAYLOAD_FORMAT_DECODED:
            # Brokers return fresh messages, so decoding in place changes no stored event.
            for delivery in deliveries:
                _decode_content(delivery.event)
        return event_service_pb2.ReceiveResponse(deliveries=deliveries)

    @grpc_errors
    async def Ack(
        self, request: event_service_pb2.AckRequest, context: Ctx
    ) -> event_service_pb2.AckResponse:
        limits.check(request)
        violations: list[tuple[str, str]] = []
        if not request.queue_id:
            violations.append(("queue_id", "required"))
        if not request.ack_ids:
            violations.append(("ack_ids", "at least one ack id is required"))
        if len(request.ack_ids) > MAX_ACK_IDS:
            violations.append(("ack_ids", f"at most {MAX_ACK_IDS} per call"))
        if violations:
            raise InvalidArgument(violations)
        queue, _ = await self._resolve(request.queue_id, current_principal(), Use.CONSUME)
        expired = await self._queues.broker(queue).ack(queue, list(request.ack_ids))
        return event_service_pb2.AckResponse(expired_ack_ids=expired)

    @grpc_errors
    async def Nack(
        self, request: event_service_pb2.NackRequest, context: Ctx
    ) -> event_service_pb2.NackResponse:
        limits.check(request)
        require_fields(queue_id=request.queue_id, ack_id=request.ack_id)
        queue, _ = await self._resolve(request.queue_id, current_principal(), Use.CONSUME)
        try:
            dead = await self._queues.broker(queue).nack(
                queue, request.ack_id, request.error, request.dead_letter
            )
        except UnknownAckId:
            raise FailedPrecondition(
                f"ack id {request.ack_id!r} is not out: its lease expired, it was already acked "
                "or nacked, or it was handed out before the WMS restarted"
            ) from None
        return event_service_pb2.NackResponse(dead_lettered=dead)

    # --- inspection ---

    @grpc_errors
    async def GetQueueStats(
        self, request: event_service_pb2.GetQueueStatsRequest, context: Ctx
    ) -> queue_pb2.QueueStats:
        limits.check(request)
        require_fields(queue_id=request.queue_id)
        queue, _ = await self._resolve(request.queue_id, current_principal(), Use.INSPECT)
        return await self._queues.broker(queue).stats(queue)

    @grpc_errors
    async def ListDeadLetters(
        self, request: event_service_pb2.ListDeadLettersRequest, context: Ctx
    ) -> event_service_pb2.ListDeadLettersResponse:
        limits.check(request)
        require_fields(queue_id=request.queue_id)
        if violations := _payload_format_violations(request.payload_format):
            raise InvalidArgument(violations)
        page = page_of(request.page_size, request.page_token, request.queue_id)
        queue, _ = await self._resolve(request.queue_id, current_principal(), Use.DEAD_LETTERS)
        letters, after = await self._queues.broker(queue).dead_letters(
            queue, page.after_seq, page.size
        )
        token = page.next_token(after, page.size) if after is not None else ""
        if request.payload_format == event_service_pb2.PAYLOAD_FORMAT_DECODED:
            for letter in letters:
                _decode_content(letter.event)
        return event_service_pb2.ListDeadLettersResponse(
            dead_letters=letters, next_page_token=token
        )

    @grpc_errors
    async def RedriveDeadLetters(
        self, request: event_service_pb2.RedriveDeadLettersRequest, context: Ctx
    ) -> event_service_pb2.RedriveDeadLettersResponse:
        limits.check(request)
        require_fields(queue_id=request.queue_id)
        queue, wf = await self._resolve(request.queue_id, current_principal(), Use.DEAD_LETTERS)
        if wf.deactivated:
            raise FailedPrecondition(
                f"workflow {wf.workflow_id} is deactivated; its dead letters cannot be re-driven"
            )
        n = await self._queues.broker(queue).redrive(queue, list(request.event_ids))
        if self._on_queues_changed is not None:
            self._on_queues_changed(queue.workflow_id)
        return event_service_pb2.RedriveDeadLettersResponse(n_redriven=n)


def _deleted(queue: queue_pb2.Queue) -> FailedPrecondition:
    return FailedPrecondition(
        f"queue {queue.queue_id} was deleted at {queue.deleted_ts.ToJsonString()}, a retention "
        "period after its workflow ended"
    )


def _deactivated(wf: workflow_pb2.Workflow) -> FailedPrecondition:
    state = workflow_pb2.Deactivation.Name(wf.deactivated).removeprefix("DEACTIVATION_")
    return FailedPrecondition(
        f"workflow {wf.workflow_id} is deactivated ({state}); its queues take no new events"
    )


def _still_open(queue: queue_pb2.Queue) -> Callable[[Tx], Exception | None]:
    """What of a Publish's checks can change after the first one: run by the embedded broker in
    its write transaction, so a publish after a finish or a deletion is refused exactly."""
    queue_id, workflow_id = queue.queue_id, queue.workflow_id

    def check(tx: Tx) -> Exception | None:
        stored = tx.get(QUEUES, queue_id)
        wf = tx.get(WORKFLOWS, workflow_id)
        if stored is None or wf is None:
            return NotFound(f"queue {queue_id!r} not found")
        if stored.HasField("deleted_ts"):
            return _deleted(stored)
        if wf.deactivated:
            return _deactivated(wf)
        return None

    return check


# --- payload forms: json and text on the way in and, when asked, on the way out ---


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _is_json_type(content_type: str) -> bool:
    media = _media_type(content_type)
    return media == JSON_CONTENT_TYPE or media.endswith("+json")


def _other_charset(content_type: str) -> str | None:
    """The charset a content type names, unless that is UTF-8 or none is named."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
            return None if charset in ("utf-8", "utf8") else charset
    return None


def _payload_format_violations(payload_format: int) -> list[tuple[str, str]]:
    if payload_format in PAYLOAD_FORMATS:
        return []
    names = ", ".join(event_service_pb2.PayloadFormat.DESCRIPTOR.values_by_name)
    return [("payload_format", f"is {payload_format}, not one of {names}")]


def _encode_content(event: queue_pb2.Event, path: str, violations: list[tuple[str, str]]) -> str:
    """Store an event's json or text as its payload bytes (in place), as brokers hold every event;
    returns the field its content came from (payload, json or text), for a size violation."""
    given = [
        name
        for name, is_set in (
            ("payload", bool(event.payload)),
            ("json", event.HasField("json")),
            ("text", event.HasField("text")),
        )
        if is_set
    ]
    if not given:
        return "payload"
    source = given[-1]
    if len(given) > 1:
        both = " and ".join(given) if len(given) == 2 else "payload, json and text"
        violations.append(
            (
                f"{path}.{source}",
                f"{both} are set; an event's content goes in at most one of payload, json and text",
            )
        )
        return "payload"  # the bytes a size check measures, still as given
    if source == "json":
        try:
            value = _python_of(event.json)
        except ValueError as exc:
            violations.append((f"{path}.json", str(exc)))
            return source
        if event.content_type and not _is_json_type(event.content_type):
            violations.append(
                (
                    f"{path}.content_type",
                    f"is {event.content_type!r} while json is set; it must be a JSON type "
                    f"(application/json or */*+json), or empty for {JSON_CONTENT_TYPE}",
                )
            )
            return source
        text = json.dumps(
            value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
        )
        event.payload = text.encode("utf-8")
        event.content_type = event.content_type or JSON_CONTENT_TYPE
        event.ClearField("json")
    elif source == "text":
        charset = _other_charset(event.content_type)
        if charset is not None:
            violations.append(
                (
                    f"{path}.content_type",
                    f"names charset {charset!r} while text is set; text is stored as UTF-8, so "
                    "name charset=utf-8 or no charset",
                )
            )
            return source
        event.payload = event.text.encode("utf-8")
        event.content_type = event.content_type or TEXT_CONTENT_TYPE
        event.ClearField("text")
    return source


def _python_of(value: struct_pb2.Value, at: str = "") -> Any:
    """A Value as the Python object ``json.dumps`` writes: integral numbers a double holds exactly
    as ints (1, not 1.0). ValueError, naming where (a JSON pointer), for what JSON cannot hold."""
    where = f"the value at {at!r}" if at else "the value"
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {
            key: _python_of(item, f"{at}/{key.replace('~', '~0').replace('/', '~1')}")
            for key, item in value.struct_value.fields.items()
        }
    if kind == "list_value":
        return [_python_of(item, f"{at}/{i}") for i, item in enumerate(value.list_value.values)]
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise ValueError(f"{where} is {number}; JSON numbers are finite")
        return int(number) if number.is_integer() and abs(number) <= MAX_EXACT_INT else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "null_value":
        return None
    raise ValueError(f"{where} has no kind set (a JSON null is null_value)")


def _decode_content(event: queue_pb2.Event) -> None:
    """Move an event's payload into json or text (in place) where either holds it exactly, for
    PAYLOAD_FORMAT_DECODED; otherwise leave the bytes."""
    if _is_json_type(event.content_type):
        value = _json_value(event.payload)
        if value is not None:
            event.json.CopyFrom(value)
            event.ClearField("payload")
            return
    if _other_charset(event.content_type) is not None:
        return
    try:
        event.text = event.payload.decode("utf-8")
    except UnicodeDecodeError:
        return
    event.ClearField("payload")


def _json_value(payload: bytes) -> struct_pb2.Value | None:
    """The payload as a Value, if it is JSON that a Value holds exactly: no duplicate keys, no
    NaN or Infinity, integers within a double's exact range. None otherwise."""

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise ValueError("duplicate keys")
        return obj

    def exact_int(digits: str) -> int:
        number = int(digits)
        if abs(number) > MAX_EXACT_INT:
            raise ValueError("integer beyond a double's exact range")
        return number

    def finite_float(digits: str) -> float:
        number = float(digits)
        if not math.isfinite(number):
            raise ValueError("number beyond a double's range")
        return number

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        parsed = json.loads(
            payload.decode("utf-8"),
            object_pairs_hook=unique_keys,
            parse_int=exact_int,
            parse_float=finite_float,
            parse_constant=no_constant,
        )
        return json_format.ParseDict(parsed, struct_pb2.Value())
    except (ValueError, RecursionError, json_format.ParseError):
        return None
