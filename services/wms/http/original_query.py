"""FindObject, the body of the original's ``POST /v1/query/*``, reduced to a safe subset.

The original hands the caller's MongoDB filter straight to ``find`` (UPSTREAM §9.12). Here a query
may only ask for equality, or ``$in``, on the documented top-level fields of the object type; any
other operator, field or shape is refused (400) with the operator or field named. Objects are read
through the WorkflowService List RPCs (so ownership is the servicers'), rendered in the original's
shapes, then filtered and projected here.

Paging: a response holds at most PAGE_SIZE objects and reads at most MAX_SCANNED; when it stops
early ``next_after`` is set (a page may then be short, even empty) and the client sends it back as
``after``, as the original's clients do until ``next_after`` is null.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services.wms.http import original_shapes as shapes
from services.wms.pagination import MAX_PAGE_SIZE

# Objects in one response at most, and objects read to fill it at most.
PAGE_SIZE = 500
MAX_SCANNED = 5000
# Values of one $in at most.
MAX_IN_VALUES = 500
# What a query value may be (the original's documents hold no other types in these fields).
Scalar = str | int | float | bool | None
FIND_KEYS = ("query", "projection", "after")
SUPPORTED = "a value (equality) or {'$in': [values]}"


class QueryError(ValueError):
    """A FindObject this dialect refuses; the message names the field or operator."""


@dataclass(frozen=True)
class Kind:
    """One queryable object type."""

    # The response's list key, as the original names it ("task_directives").
    name: str
    # Every field of its rendered object: what a projection may name.
    fields: tuple[str, ...]
    # The fields a query may test: scalars, or lists of scalars (matching any element).
    queryable: tuple[str, ...]
    # Its id field: a query naming ids is answered by lookups instead of a scan.
    id_field: str


WORKFLOWS = Kind(
    "workflows",
    shapes.WORKFLOW_FIELDS,
    ("workflow_id", "timestamp", "priority", "deactivated", "deactivated_ts"),
    "workflow_id",
)
TASK_DIRECTIVES = Kind(
    "task_directives",
    shapes.TASK_DIRECTIVE_FIELDS,
    (
        "task_id",
        "workflow_id",
        "cluster_locations",
        "task_image",
        "task_args",
        "init_image",
        "init_args",
        "timestamp",
        "input_queues",
        "output_queues",
    ),
    "task_id",
)
TASKFORCES = Kind(
    "taskforces",
    shapes.TASKFORCE_FIELDS,
    (
        "taskforce_uuid",
        "task_id",
        "workflow_id",
        "timestamp",
        "priority",
        "collector",
        "schedd",
        "n_workers",
        "cluster_id",
        "job_event_log_fpath",
        "phase",
    ),
    "taskforce_uuid",
)

# One page of a List RPC: (page size, page token) → rendered objects and the next page's token.
ListPage = Callable[[int, str], Awaitable[tuple[list[dict[str, Any]], str]]]


@dataclass(frozen=True)
class Find:
    """A parsed, checked FindObject."""

    kind: Kind
    # Field → the values it may equal (one for equality, several for $in).
    conditions: Mapping[str, tuple[Scalar, ...]]
    # Fields to return; None for all.
    projection: tuple[str, ...] | None
    # The List RPC's page token to continue from; "" for the first page.
    page_token: str
    # Identifies the query, so an ``after`` is only accepted back with the query it came from.
    fingerprint: str

    def only(self, field: str) -> tuple[bool, Scalar]:
        """(True, value) when the query requires ``field`` to equal exactly one value."""
        values = self.conditions.get(field)
        if values is not None and len(values) == 1:
            return True, values[0]
        return False, None

    def matches(self, obj: Mapping[str, Any]) -> bool:
        """Whether a rendered object satisfies every condition."""
        return all(
            any(_equal(obj[field], v) for v in values) for field, values in self.conditions.items()
        )

    def project(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The object with the projected fields only."""
        if self.projection is None:
            return obj
        return {field: obj[field] for field in self.projection}

    def next_after(self, page_token: str) -> str:
        """The ``next_after`` that resumes this query at ``page_token``."""
        raw = json.dumps({"t": page_token, "q": self.fingerprint}).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_find(body: object, kind: Kind) -> Find:
    """Check a FindObject for ``kind``; QueryError naming the first problem."""
    if not isinstance(body, dict):
        raise QueryError("the request body must be a FindObject: {query, projection?, after?}")
    for key in body:
        if key not in FIND_KEYS:
            raise QueryError(f"unknown field {key!r} (a FindObject has {', '.join(FIND_KEYS)})")
    if "query" not in body:
        raise QueryError("query: required (use {} for every object)")
    query = body["query"]
    if not isinstance(query, dict):
        raise QueryError("query: must be an object")
    conditions = {field: _condition(kind, field, value) for field, value in query.items()}
    fingerprint = hashlib.sha256(
        json.dumps([kind.name, query], sort_keys=True).encode()
    ).hexdigest()[:16]
    return Find(
        kind=kind,
        conditions=conditions,
        projection=_projection(kind, body.get("projection")),
        page_token=_page_token(body.get("after"), fingerprint),
        fingerprint=fingerprint,
    )


def _condition(kind: Kind, field: str, value: object) -> tuple[Scalar, ...]:
    if field.startswith("$"):
        raise QueryError(
            f"query: operator {field!r} is not supported; each field takes {SUPPORTED}"
        )
    if field not in kind.queryable:
        raise QueryError(
            f"query: unknown field {field!r} for {kind.name} "
            f"(queryable: {', '.join(kind.queryable)})"
        )
    if _is_scalar(value):
        return (value,)  # type: ignore[return-value]
    if isinstance(value, dict):
        if len(value) != 1:
            raise QueryError(f"query.{field}: must be {SUPPORTED}")
        [(op, operand)] = value.items()
        if op not in ("$eq", "$in"):
            what = f"operator {op!r}" if op.startswith("$") else f"nested field {op!r}"
            raise QueryError(f"query.{field}: {what} is not supported; use {SUPPORTED}")
        if op == "$eq":
            if not _is_scalar(operand):
                raise QueryError(f"query.{field}: $eq must be a single value")
            return (operand,)  # type: ignore[return-value]
        if not isinstance(operand, list) or not all(_is_scalar(v) for v in operand):
            raise QueryError(f"query.{field}: $in must be a list of values")
        if len(operand) > MAX_IN_VALUES:
            raise QueryError(f"query.{field}: $in may list at most {MAX_IN_VALUES} values")
        return tuple(operand)
    raise QueryError(f"query.{field}: must be {SUPPORTED}")


def _projection(kind: Kind, projection: object) -> tuple[str, ...] | None:
    if projection is None:
        return None
    if not isinstance(projection, list) or not all(isinstance(f, str) for f in projection):
        raise QueryError("projection: must be a list of field names")
    if not projection:
        raise QueryError("projection: must name at least one field")
    for field in projection:
        if field not in kind.fields:
            raise QueryError(
                f"projection: unknown field {field!r} for {kind.name} "
                f"(fields: {', '.join(kind.fields)})"
            )
    return tuple(dict.fromkeys(projection))


def _page_token(after: object, fingerprint: str) -> str:
    if after is None:
        return ""
    if not isinstance(after, str):
        raise QueryError("after: must be a string (a previous response's next_after)")
    try:
        raw = base64.urlsafe_b64decode(after + "=" * (-len(after) % 4))
        decoded = json.loads(raw)
        token, query = decoded["t"], decoded["q"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise QueryError("after: is not a next_after returned by this query") from None
    if query != fingerprint or not isinstance(token, str):
        raise QueryError("after: was returned for a different query; repeat the same query")
    return token


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _equal(have: Any, want: Scalar) -> bool:
    """MongoDB's equality on our values: a list matches any element; booleans never equal
    numbers (Python's True == 1 does)."""
    if isinstance(have, list):
        return any(_equal(item, want) for item in have)
    if isinstance(have, bool) or isinstance(want, bool):
        return isinstance(have, bool) and isinstance(want, bool) and have == want
    return bool(have == want)


async def find_page(find: Find, list_page: ListPage) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the query's results, read through ``list_page``, and its ``next_after`` (None
    when there are no more). Each List page asks for no more than the response has room for, so
    the next one starts right after the last object read."""
    found: list[dict[str, Any]] = []
    token = find.page_token
    scanned = 0
    while True:
        objects, token = await list_page(min(PAGE_SIZE - len(found), MAX_PAGE_SIZE), token)
        scanned += len(objects)
        found.extend(find.project(o) for o in objects if find.matches(o))
        if not token:
            return found, None
        if len(found) >= PAGE_SIZE or scanned >= MAX_SCANNED:
            return found, find.next_after(token)


def filter_found(find: Find, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The matching objects among ``objects`` (found by id), projected."""
    return [find.project(o) for o in objects if find.matches(o)]
