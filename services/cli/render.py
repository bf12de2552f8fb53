"""Output of the CLI: aligned tables for people, JSON (proto field names) for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message


def to_dict(msg: Message) -> dict[str, Any]:
    """A message as the JSON object the REST gateway would return."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def print_json(value: Message | Sequence[Message] | dict[str, Any]) -> None:
    """Print a message, a list of messages or a dict as indented JSON."""
    if isinstance(value, Message):
        data: Any = to_dict(value)
    elif isinstance(value, dict):
        data = value
    else:
        data = [to_dict(m) for m in value]
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print rows under headers, columns aligned; "(none)" for no rows."""
    cells = [[str(c) for c in row] for row in rows]
    if not cells:
        print("(none)")
        return
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_fields(pairs: Iterable[tuple[str, object]]) -> None:
    """Print "key: value" lines, keys aligned."""
    items = [(k, str(v)) for k, v in pairs]
    width = max((len(k) for k, _ in items), default=0)
    for key, value in items:
        print(f"{key + ':':<{width + 1}} {value}")


def when(ts: timestamp_pb2.Timestamp) -> str:
    """A timestamp for people: UTC, to the second; "-" if unset."""
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")


def enum_label(name: str, prefix: str) -> str:
    """``TASKFORCE_PHASE_PENDING_STARTER`` → ``pending-starter``."""
    return name.removeprefix(prefix).lower().replace("_", "-")
