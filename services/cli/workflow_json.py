"""Parse a request's JSON into its protobuf message, reporting every mistake at once.

``json_format.ParseDict`` stops at the first mistake and words it for protobuf's authors. Here the
JSON is first walked against the message's descriptors, so a new field in a ``.proto`` file is
checked with no change to this file, and each problem names its path
(``tasks[0].n_workers: must be an integer, got "two"``). The walk is never more lenient than
ParseDict: what it passes, ParseDict parses (it refuses a few odd spellings ParseDict lets through,
such as "+5" for an integer).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from google.protobuf import duration_pb2, field_mask_pb2, json_format, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)
FD = FieldDescriptor

# Longest rendering of a bad value in a message; longer ones are cut.
SHOWN_CHARS = 40
INTEGER_RANGES = {
    FD.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FD.CPPTYPE_UINT32: (0, 2**32 - 1),
    FD.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FD.CPPTYPE_UINT64: (0, 2**64 - 1),
}
FLOAT32_MAX = 3.4028234663852886e38
# proto3 JSON numbers may be quoted; ParseDict also reads integers written as "5.0" or "1e3".
NUMBER_TEXT = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", re.ASCII)
QUOTED_FLOATS = ("NaN", "Infinity", "-Infinity")
NOT_UNICODE = "must be Unicode text, without an unpaired surrogate escape such as \\ud800"


@dataclass(frozen=True)
class StringType:
    """A well-known type written as a string in JSON."""

    parse: Callable[[str], None]  # raises ValueError, as ParseDict's call does
    one: str  # what a value must be
    many: str  # what a list holds


STRING_TYPES = {
    "google.protobuf.Timestamp": StringType(
        lambda text: timestamp_pb2.Timestamp().FromJsonString(text),
        'an RFC 3339 time such as "2024-05-01T12:00:00Z"',
        "timestamps",
    ),
    "google.protobuf.Duration": StringType(
        lambda text: duration_pb2.Duration().FromJsonString(text),
        'a duration such as "1.5s"',
        "durations",
    ),
    "google.protobuf.FieldMask": StringType(
        lambda text: field_mask_pb2.FieldMask().FromJsonString(text),
        'a field mask such as "a.b,c"',
        "field masks",
    ),
}
WRAPPERS_FILE = "google/protobuf/wrappers.proto"
# What a list of each scalar type holds ("must be a list of integers").
LIST_KINDS = {
    FD.CPPTYPE_INT32: "integers",
    FD.CPPTYPE_UINT32: "integers",
    FD.CPPTYPE_INT64: "integers",
    FD.CPPTYPE_UINT64: "integers",
    FD.CPPTYPE_DOUBLE: "numbers",
    FD.CPPTYPE_FLOAT: "numbers",
    FD.CPPTYPE_BOOL: "booleans",
    FD.CPPTYPE_ENUM: "enum names",
    FD.CPPTYPE_STRING: "strings",
}


@dataclass(frozen=True)
class Problem:
    """One mistake: where (``tasks[0].n_workers``; empty for the whole document) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class JsonProblems(Exception):
    """The JSON does not fit the message; ``problems`` lists every mistake found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def parse(data: object, message: M) -> M:
    """Fill ``message`` from parsed JSON (as ``json_format.ParseDict``); JsonProblems if it
    does not fit."""
    if not isinstance(data, dict):
        raise JsonProblems([Problem("", f"the top level must be a JSON object, got {_show(data)}")])
    # The stubs type DESCRIPTOR as upb's or Python's Descriptor; at runtime they are one class.
    found = check(data, cast(Descriptor, message.DESCRIPTOR))
    if found:
        raise JsonProblems(found)
    try:
        return json_format.ParseDict(data, message)
    except (json_format.ParseError, ValueError, TypeError, OverflowError) as exc:
        # Something the walk does not know about; protobuf's first line still names it.
        raise JsonProblems([Problem("", str(exc).splitlines()[0])]) from None


def check(data: dict[str, object], descriptor: Descriptor) -> list[Problem]:
    """Every problem of ``data`` as the JSON object of message ``descriptor``, in document
    order."""
    found: list[Problem] = []
    _message(data, descriptor, "", found)
    return found


def _message(value: object, descriptor: Descriptor, path: str, found: list[Problem]) -> None:
    name = descriptor.full_name
    if descriptor.file.name == WRAPPERS_FILE:
        _single(value, descriptor.fields_by_name["value"], path, found)
    elif name == "google.protobuf.Value":
        _json_value(value, path, found)
    elif name == "google.protobuf.ListValue":
        if not isinstance(value, list):
            found.append(Problem(path, f"must be a list, got {_show(value)}"))
        else:
            _json_value(value, path, found)
    elif name in STRING_TYPES:
        if not _parses_as(value, STRING_TYPES[name]):
            found.append(Problem(path, f"must be {STRING_TYPES[name].one}, got {_show(value)}"))
    elif not isinstance(value, dict):
        found.append(Problem(path, f"must be an object, got {_show(value)}"))
    elif name == "google.protobuf.Struct":
        _json_value(value, path, found)
    elif name == "google.protobuf.Any":
        # The type named by @type, and so the rest of the object, is left to ParseDict.
        if value and not isinstance(value.get("@type"), str):
            found.append(Problem(path, 'must name its message type in "@type"'))
    else:
        _fields(value, descriptor, path, found)


def _json_value(value: object, path: str, found: list[Problem]) -> None:
    """Any JSON (a Value, Struct or ListValue), but its text must be Unicode and its numbers
    doubles."""
    if isinstance(value, dict):
        for key, item in value.items():
            here = _child(path, key)
            if not _is_unicode(key):
                found.append(Problem(here, NOT_UNICODE))
            _json_value(item, here, found)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _json_value(item, f"{path}[{i}]", found)
    elif isinstance(value, str) and not _is_unicode(value):
        found.append(Problem(path, NOT_UNICODE))
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max:
        found.append(Problem(path, f"must be a number within a double's range, got {_show(value)}"))


def _fields(
    obj: dict[str, object], descriptor: Descriptor, path: str, found: list[Problem]
) -> None:
    # Plain dicts: upb's own mappings fail on keys that are not valid Unicode.
    by_key = {f.name: f for f in descriptor.fields} | {f.json_name: f for f in descriptor.fields}
    given: dict[str, str] = {}  # field name -> key it was given as
    oneofs: dict[str, str] = {}  # oneof name -> key that set it
    for key, value in obj.items():
        here = _child(path, key)
        field = by_key.get(key)
        if field is None:
            found.append(Problem(here, _unknown_field(key, descriptor)))
            continue
        if field.name in given:
            found.append(Problem(here, f'is given twice, also as "{given[field.name]}"'))
            continue
        given[field.name] = key
        if value is None:
            continue  # null leaves the field unset, as in ParseDict
        oneof = field.containing_oneof
        if oneof is not None:
            if oneof.name in oneofs:
                other = oneofs[oneof.name]
                found.append(Problem(here, f'cannot be set with "{other}" (one of {oneof.name})'))
                continue
            oneofs[oneof.name] = key
        _field(value, field, here, found)


def _unknown_field(key: str, descriptor: Descriptor) -> str:
    # Match proto names and camelCase json names alike, whatever the case; suggest the proto name.
    names = {f.name.lower(): f.name for f in descriptor.fields}
    names.update({f.json_name.lower(): f.name for f in descriptor.fields})
    close = difflib.get_close_matches(key.lower(), names, n=1)
    return f'unknown field; did you mean "{names[close[0]]}"?' if close else "unknown field"


def _field(value: object, field: FD, path: str, found: list[Problem]) -> None:
    if _is_map(field):
        entry = field.message_type
        assert entry is not None
        if not isinstance(value, dict):
            found.append(Problem(path, f"must be an object, got {_show(value)}"))
            return
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        for key, item in value.items():
            here = _child(path, key)
            key_problem = _map_key_problem(key, key_field)
            if key_problem:
                found.append(Problem(here, key_problem))
            _single(item, value_field, here, found)
    elif field.is_repeated:
        if not isinstance(value, list):
            found.append(Problem(path, f"must be a list of {_kinds(field)}, got {_show(value)}"))
            return
        for i, item in enumerate(value):
            _single(item, field, f"{path}[{i}]", found)
    else:
        _single(value, field, path, found)


def _single(value: object, field: FD, path: str, found: list[Problem]) -> None:
    """One value of a field: the field itself, a list element or a map value."""
    if field.message_type is not None:
        _message(value, field.message_type, path, found)
        return
    problem = _scalar_problem(value, field)
    if problem:
        found.append(Problem(path, problem))


def _scalar_problem(value: object, field: FD) -> str | None:
    """Why ``value`` is not a JSON scalar for ``field``, or None when it is."""
    kind = field.cpp_type
    if kind in INTEGER_RANGES:
        number = _integer(value)
        if number is None:
            return f"must be an integer, got {_show(value)}"
        low, high = INTEGER_RANGES[kind]
        if not low <= number <= high:
            return f"must be an integer from {low} to {high}, got {_show(value)}"
    elif kind in (FD.CPPTYPE_DOUBLE, FD.CPPTYPE_FLOAT):
        real = _real(value)
        if real is None:
            return f'must be a number (or "NaN", "Infinity", "-Infinity"), got {_show(value)}'
        if kind == FD.CPPTYPE_FLOAT and math.isfinite(real) and abs(real) > FLOAT32_MAX:
            limit = f"{FLOAT32_MAX:.8g}"
            return f"must be a number from -{limit} to {limit}, got {_show(value)}"
    elif kind == FD.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            return f"must be true or false, got {_show(value)}"
    elif kind == FD.CPPTYPE_ENUM:
        enum = field.enum_type
        assert enum is not None
        names = [v.name for v in enum.values]
        by_name = isinstance(value, str) and value in names
        by_number = type(value) is int and any(v.number == value for v in enum.values)  # no bool
        if not (by_name or by_number):
            return f"must be one of {', '.join(names)}, got {_show(value)}"
    elif field.type == FD.TYPE_BYTES:
        if not isinstance(value, str) or not _is_base64(value):
            return f"must be a base64 string, got {_show(value)}"
    elif not isinstance(value, str):
        return f"must be a string, got {_show(value)}"
    elif not _is_unicode(value):
        return NOT_UNICODE
    return None


def _integer(value: object) -> int | None:
    """The integer a JSON value stands for: 5, 5.0, "5", "5.0" or "1e3", as ParseDict reads it."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and NUMBER_TEXT.fullmatch(value):
        if value.lstrip("-").isdigit():
            return int(value)
        real = float(value)
        return int(real) if real.is_integer() else None
    return None


def _real(value: object) -> float | None:
    """The number a JSON value stands for: 1.5, 2, "1.5", "NaN", "Infinity" or "-Infinity"."""
    try:
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            # A bare NaN or Infinity (Python's json reads them) must be quoted in proto3 JSON.
            real = float(value)
            return real if math.isfinite(real) else None
        if isinstance(value, str) and (NUMBER_TEXT.fullmatch(value) or value in QUOTED_FLOATS):
            return float(value)
    except OverflowError:
        pass  # an integer beyond any float
    return None


def _map_key_problem(key: str, field: FD) -> str | None:
    # JSON object keys are strings; ParseDict reads them as the map's key type.
    if field.cpp_type == FD.CPPTYPE_BOOL:
        ok = key in ("true", "false")
        return None if ok else f'key must be "true" or "false", got {_show(key)}'
    problem = _scalar_problem(key, field)
    return f"key {problem}" if problem else None


def _parses_as(value: object, kind: StringType) -> bool:
    if not isinstance(value, str):
        return False
    try:
        kind.parse(value)
    except ValueError:
        return False
    return True


def _is_base64(text: str) -> bool:
    # ParseDict's reading: URL-safe or standard alphabet, padding optional.
    try:
        base64.urlsafe_b64decode(text + "=" * (4 - len(text) % 4))
    except (binascii.Error, ValueError):
        return False
    return True


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_map(field: FD) -> bool:
    entry = field.message_type
    return field.is_repeated and entry is not None and entry.GetOptions().map_entry


def _kinds(field: FD) -> str:
    """What a list of ``field``'s values holds (``integers``)."""
    message = field.message_type
    if message is None:
        return LIST_KINDS[field.cpp_type]
    if message.full_name in STRING_TYPES:
        return STRING_TYPES[message.full_name].many
    if message.file.name == WRAPPERS_FILE:
        return LIST_KINDS[message.fields_by_name["value"].cpp_type]
    return "values" if message.full_name == "google.protobuf.Value" else "objects"


def _child(path: str, key: str) -> str:
    # A key with a lone surrogate could not be printed; show it escaped.
    key = key.encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{path}.{key}" if path else key


def _show(value: object) -> str:
    """``value`` as JSON, cut to about SHOWN_CHARS characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value)  # escapes the lone surrogate, so it can be printed
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."
