"""``ewms events ...``: publish to, read from and inspect a workflow's queues (EventService).

A QUEUE argument is a queue id (``Q-...``) or ``WORKFLOW_ID/ALIAS`` (``WF-6b01-a954/in``), the
latter resolved with WorkflowService.ListQueues.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from ewms.v1 import event_service_pb2, event_service_pb2_grpc, queue_pb2, workflow_service_pb2
from services.cli.connection import Connection
from services.cli.input_file import InputChanged, InputFile, Line, byte_count
from services.cli.render import print_json, print_table, when
from services.cli.workflows import CommandError, UsageError, _add_limit, _pages
from services.config import ClientSettings
from services.errors import field_violations

ES = event_service_pb2
DEFAULT_BATCH = 500
MAX_BATCH = 10_000  # EventService's limit of events per Publish
# A batch is also cut before it passes this many serialized bytes: the WMS accepts messages of one
# maximal event plus 1 MiB, so a batch this big always fits (a bigger event travels alone).
BATCH_BYTES = 1024 * 1024
RECEIVE_CHUNK = 100  # EventService's limit of events per Receive
DEFAULT_READ_MAX = 10
DEFAULT_LEASE = 30
MAX_WAIT = 60
MAX_LEASE = 7 * 24 * 3600
_VIOLATION_INDEX = re.compile(r"^events\[(\d+)\](.*)$")

READ_HELP = f"""\
Lease up to --max events and print each as one JSON line on stdout (--json changes nothing):
{{"event_id", "attempt", "content_type", "headers", "payload"}}, where payload is the parsed JSON
for application/json (and */*+json), the text for text/*, else base64 with "payload_base64": true.

With --ack each batch of events is acked once printed, and leaves the queue for good.

Without --ack nothing is acked or nacked: the events stay leased to this command and return to the
queue when their lease (--lease, default {DEFAULT_LEASE} s) expires. Either way a read is a delivery
attempt, as a nack would be: an event read without --ack as often as its queue's max_attempts is
dead-lettered. Letting leases expire rather than nacking keeps the events away until this command
is done, so one read never prints an event twice, and costs no call per event; the price is that
consumers get them back only when the lease ends (use a short --lease to peek at a busy queue)."""


def _int_in(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the events command group."""
    ev = sub.add_parser(
        "events", help="publish, read and inspect events of a workflow's queues"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    queue_help = "queue id (Q-...) or WORKFLOW_ID/ALIAS, e.g. WF-6b01-a954/in"

    p = ev.add_parser(
        "publish",
        parents=[common],
        help="publish events from a file, one per line",
        description="Publish one event per non-blank line of a file. By default each line is a "
        "JSON value, published as compact JSON (application/json); a line that is not JSON stops "
        "the command before anything is published. Events go in batches; each batch is stored "
        "whole or not at all, so if the WMS rejects a batch (e.g. an event over its size limit) "
        "the earlier batches stay published.",
    )
    p.add_argument("queue", metavar="QUEUE", help=queue_help)
    p.add_argument("--file", required=True, help="the events, one per line ('-' for stdin)")
    p.add_argument(
        "--text",
        action="store_true",
        help="each line is raw text (text/plain, trailing newline stripped), not JSON",
    )
    p.add_argument(
        "--content-type",
        default="",
        metavar="T",
        help="content type of every event (default application/json, or text/plain with --text)",
    )
    p.add_argument(
        "--batch",
        type=_int_in(1, MAX_BATCH),
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"events per Publish call (default {DEFAULT_BATCH}; a batch is also kept under "
        "1 MiB unless one event is bigger)",
    )
    p.set_defaults(run=publish)

    p = ev.add_parser(
        "read",
        parents=[common],
        help="lease events and print them as JSON lines (--ack to consume them)",
        description=READ_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("queue", metavar="QUEUE", help=queue_help)
    p.add_argument(
        "--max",
        type=_int_in(1, 1_000_000),
        default=DEFAULT_READ_MAX,
        metavar="N",
        help=f"at most this many events (default {DEFAULT_READ_MAX})",
    )
    p.add_argument(
        "--ack",
        action="store_true",
        help="ack the events once printed, so they leave the queue (default: leave them leased)",
    )
    p.add_argument(
        "--wait",
        type=_int_in(0, MAX_WAIT),
        default=0,
        metavar="SECONDS",
        help=f"wait up to this long for a first event when none is ready (0-{MAX_WAIT}, default 0)",
    )
    p.add_argument(
        "--lease",
        type=_int_in(1, MAX_LEASE),
        default=DEFAULT_LEASE,
        metavar="SECONDS",
        help="lease of each event: unacked events return to the queue when it expires "
        f"(default {DEFAULT_LEASE})",
    )
    p.set_defaults(run=read)

    p = ev.add_parser("stats", parents=[common], help="a queue's counters")
    p.add_argument("queue", metavar="QUEUE", help=queue_help)
    p.set_defaults(run=stats)

    p = ev.add_parser(
        "dead-letters",
        parents=[common],
        help="list a queue's dead letters, oldest first, or re-drive them",
        description="List a queue's dead letters (the table shows the last line of each one's "
        "last error; --json shows everything), or with --redrive move them back into the queue "
        "with a fresh attempt count: all of them, or those named by --event-id.",
    )
    p.add_argument("queue", metavar="QUEUE", help=queue_help)
    p.add_argument(
        "--redrive", action="store_true", help="re-drive instead of listing; prints how many"
    )
    p.add_argument(
        "--event-id",
        dest="event_ids",
        action="append",
        default=[],
        metavar="ID",
        help="with --redrive: only this event (repeat for more)",
    )
    _add_limit(p)
    p.set_defaults(run=dead_letters)


# --- plumbing ---


@contextmanager
def _events_stub(conn: Connection) -> Iterator[event_service_pb2_grpc.EventServiceStub]:
    """An EventService stub on a channel of its own: received messages may be as large as the WMS
    sends (events of up to EWMS_MAX_EVENT_BYTES, 16 MiB by default), not just gRPC's 4 MiB."""
    channel = grpc.insecure_channel(conn.address, options=[("grpc.max_receive_message_length", -1)])
    try:
        yield event_service_pb2_grpc.EventServiceStub(channel)
    finally:
        channel.close()


def resolve_queue(conn: Connection, text: str) -> str:
    """The queue id named by a QUEUE argument (a queue id or WORKFLOW_ID/ALIAS)."""
    if "/" not in text:
        if text.startswith("WF-"):
            raise UsageError(
                f"{text} is a workflow id; name one of its queues as {text}/ALIAS "
                f"(see: ewms queue list {text})"
            )
        if not text:
            raise UsageError("QUEUE must not be empty")
        return text
    workflow_id, _, alias = text.partition("/")
    if not workflow_id or not alias:
        raise UsageError(f"QUEUE must be a queue id (Q-...) or WORKFLOW_ID/ALIAS, got {text!r}")
    resp = conn.call(
        conn.workflows.ListQueues, workflow_service_pb2.ListQueuesRequest(workflow_id=workflow_id)
    )
    for queue in resp.queues:
        if queue.alias == alias:
            return str(queue.queue_id)
    known = ", ".join(q.alias for q in resp.queues) or "none"
    raise CommandError(
        f"NOT_FOUND: workflow {workflow_id} has no queue alias {alias!r}; its aliases: {known}", 3
    )


def _dump(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _message_dict(msg: Message) -> dict[str, Any]:
    """A message as proto JSON, zero counters included (scripts need not guess a missing key)."""
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


# --- publish ---


def _batches(lines: Iterator[Line], size: int, content_type: str) -> Iterator[list[Line]]:
    """The lines in batches of at most ``size`` events and (unless one event alone) BATCH_BYTES,
    read as they are asked for."""
    batch: list[Line] = []
    nbytes = 0
    for line in lines:
        # An event's serialized size: its payload and content type, and a few bytes of framing.
        event_bytes = len(line.payload) + len(content_type) + 16
        if batch and (len(batch) >= size or nbytes + event_bytes > BATCH_BYTES):
            yield batch
            batch, nbytes = [], 0
        batch.append(line)
        nbytes += event_bytes
    if batch:
        yield batch


def _line_span(first: int, last: int) -> str:
    return f"line {first}" if first == last else f"lines {first}-{last}"


def publish(conn: Connection, args: Any) -> None:
    """ewms events publish QUEUE --file F: the file is checked whole first (a bad line: exit 2,
    nothing published), then read again and published batch by batch, never held in memory."""
    limit = ClientSettings.from_env().max_event_bytes
    source = InputFile(args.file, text=args.text, max_event_bytes=limit)
    source.check()
    n_published = 0
    first_line = last_line = 0
    event_ids: list[str] = []  # kept only for --json, which lists them
    try:
        queue_id = resolve_queue(conn, args.queue)
        content_type = args.content_type or ("text/plain" if args.text else "application/json")
        with _events_stub(conn) as stub:
            for lines in _batches(source.events(), args.batch, content_type):
                events = [
                    queue_pb2.Event(payload=ln.payload, content_type=content_type) for ln in lines
                ]
                try:
                    resp = conn.call(
                        stub.Publish, ES.PublishRequest(queue_id=queue_id, events=events)
                    )
                except grpc.RpcError as exc:
                    done = (
                        f"{n_published} event(s) of earlier batches "
                        f"({_line_span(first_line, last_line)}) were published"
                        if n_published
                        else "nothing was published"
                    )
                    _publish_failed(exc, lines, done)
                    raise
                n_published += len(resp.event_ids)
                first_line = first_line or lines[0].number
                last_line = lines[-1].number
                if args.json:
                    event_ids.extend(resp.event_ids)
    except InputChanged as exc:
        raise CommandError(f"{exc}; {n_published} event(s) were published before", 1) from None
    finally:
        source.close()
    if args.json:
        _dump({"queue_id": queue_id, "n_published": n_published, "event_ids": event_ids})
        return
    print(f"published {n_published} event(s) to {queue_id}")


def _publish_failed(exc: grpc.RpcError, lines: list[Line], done: str) -> None:
    """Say what a failed batch means (``done``: what earlier batches published); CommandError for
    rejected events (exit 2)."""
    span = _line_span(lines[0].number, lines[-1].number)
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    reason: str = exc.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # The request passed this CLI's EWMS_MAX_EVENT_BYTES but not the WMS's gRPC message limit
        # (its own EWMS_MAX_EVENT_BYTES + 1 MiB); a batch that big is one event (see _batches).
        size = sum(len(ln.payload) for ln in lines)
        raise CommandError(
            f"RESOURCE_EXHAUSTED: the WMS refused the batch of {span} ({byte_count(size)}) as "
            f"larger than it accepts ({reason}); {done}",
            2,
            ["hint: the WMS's EWMS_MAX_EVENT_BYTES is likely smaller than this CLI's"],
        ) from None
    if code != grpc.StatusCode.INVALID_ARGUMENT:
        if done != "nothing was published":
            print(f"note: {done}; the batch of {span} failed", file=sys.stderr)
        return
    details: list[str] = []
    for field, description in field_violations(exc):
        match = _VIOLATION_INDEX.match(field)
        if match and int(match.group(1)) < len(lines):
            line = lines[int(match.group(1))].number
            where = f"{match.group(2).removeprefix('.')} " if match.group(2) else ""
            details.append(f"line {line}: {where}{description}")
        else:
            details.append(f"{field}: {description}")
    raise CommandError(
        f"INVALID_ARGUMENT: the WMS rejected the batch of {span} ({reason}); {done}",
        2,
        details,
    ) from None


# --- read ---


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def event_json(event: queue_pb2.Event) -> dict[str, Any]:
    """One event as printed by ``ewms events read``."""
    out: dict[str, Any] = {
        "event_id": event.event_id,
        "attempt": event.attempt,
        "content_type": event.content_type,
        "headers": dict(event.headers),
    }
    media = _media_type(event.content_type)
    try:
        if media == "application/json" or media.endswith("+json"):
            out["payload"] = json.loads(event.payload.decode("utf-8"))
            return out
        if media.startswith("text/"):
            out["payload"] = event.payload.decode("utf-8")
            return out
    except ValueError:  # not UTF-8 or not JSON after all: fall through to base64
        pass
    out["payload"] = base64.b64encode(event.payload).decode("ascii")
    out["payload_base64"] = True
    return out


def read(conn: Connection, args: Any) -> None:
    """ewms events read QUEUE."""
    queue_id = resolve_queue(conn, args.queue)
    n_read, expired = 0, 0
    with _events_stub(conn) as stub:
        while n_read < args.max:
            resp = conn.call(
                stub.Receive,
                ES.ReceiveRequest(
                    queue_id=queue_id,
                    max_events=min(RECEIVE_CHUNK, args.max - n_read),
                    lease_seconds=args.lease,
                    wait_seconds=args.wait if n_read == 0 else 0,
                ),
            )
            if not resp.deliveries:
                break
            for delivery in resp.deliveries:
                sys.stdout.write(json.dumps(event_json(delivery.event), ensure_ascii=False))
                sys.stdout.write("\n")
            sys.stdout.flush()  # printed before acked: a failed write leaves them in the queue
            n_read += len(resp.deliveries)
            if args.ack:
                ack_ids = [d.ack_id for d in resp.deliveries]
                ack = conn.call(stub.Ack, ES.AckRequest(queue_id=queue_id, ack_ids=ack_ids))
                expired += len(ack.expired_ack_ids)
    if args.ack and expired:
        raise CommandError(
            f"FAILED_PRECONDITION: {expired} of {n_read} event(s) were not acked: their lease "
            "expired first, so they will be delivered again (use a longer --lease)",
            5,
        )
    if not n_read:
        print(f"no events ready in {queue_id}", file=sys.stderr)
    elif args.ack:
        print(f"read and acked {n_read} event(s) from {queue_id}", file=sys.stderr)
    else:
        print(
            f"read {n_read} event(s) from {queue_id}, not acked: they return to the queue when "
            f"their {args.lease} s lease expires",
            file=sys.stderr,
        )


# --- stats and dead letters ---


def stats(conn: Connection, args: Any) -> None:
    """ewms events stats QUEUE."""
    queue_id = resolve_queue(conn, args.queue)
    with _events_stub(conn) as stub:
        st = conn.call(stub.GetQueueStats, ES.GetQueueStatsRequest(queue_id=queue_id))
    if args.json:
        print_json(_message_dict(st))
        return
    print_table(
        ["QUEUE", "READY", "IN_FLIGHT", "ACKED", "DEAD_LETTERED", "PUBLISHED"],
        [(st.queue_id, st.ready, st.in_flight, st.acked, st.dead_lettered, st.published)],
    )


def _last_line(text: str, width: int = 80) -> str:
    line = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "-")
    return line if len(line) <= width else line[: width - 1] + "…"


def dead_letters(conn: Connection, args: Any) -> None:
    """ewms events dead-letters QUEUE [--redrive [--event-id ID ...]]."""
    if args.event_ids and not args.redrive:
        raise UsageError("--event-id selects dead letters to re-drive; add --redrive")
    queue_id = resolve_queue(conn, args.queue)
    with _events_stub(conn) as stub:
        if args.redrive:
            resp = conn.call(
                stub.RedriveDeadLetters,
                ES.RedriveDeadLettersRequest(queue_id=queue_id, event_ids=args.event_ids),
            )
            if args.json:
                print_json({"queue_id": queue_id, **_message_dict(resp)})
                return
            of = f" of {len(args.event_ids)} named" if args.event_ids else ""
            print(f"re-drove {resp.n_redriven}{of} dead letter(s) into {queue_id}")
            return

        def fetch(token: str, size: int) -> tuple[list[Any], str]:
            page = conn.call(
                stub.ListDeadLetters,
                ES.ListDeadLettersRequest(queue_id=queue_id, page_size=size, page_token=token),
            )
            return list(page.dead_letters), page.next_page_token

        letters = list(_pages(fetch, args))
    if args.json:
        print_json(letters)
        return
    print_table(
        ["EVENT", "ATTEMPT", "DEAD_LETTERED", "LAST_ERROR"],
        [
            (d.event.event_id, d.event.attempt, when(d.dead_lettered_ts), _last_line(d.last_error))
            for d in letters
        ],
    )
