"""HTTP ↔ protobuf as ``google.api.http`` defines it: a path template becomes an aiohttp route; a
request's path variables, query parameters and JSON body become the RPC's request message; the
response message becomes JSON with proto field names.

Every bad input is reported at once as INVALID_ARGUMENT field violations, with the field's path in
proto names (``tasks[0].worker_config.n_cores``), the same way the servicers report theirs. A body
that cannot be read at all (malformed JSON, wrong Content-Type) has no field to name and is a plain
INVALID_ARGUMENT. Annotations the gateway cannot serve fail at start-up (TemplateError).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from services.errors import ApiError, InvalidArgument
from services.wms import limits

# Messages whose JSON form is a plain value; they are parsed whole by json_format.
WRAPPERS: Final = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
# Of those, the ones a single URL text can hold (a query parameter or path variable).
TEXT_MESSAGES: Final = WRAPPERS | {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
}
SPECIAL_JSON: Final = TEXT_MESSAGES | {
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
    "google.protobuf.Any",
    "google.protobuf.Empty",
}
# A segment of a path template (AIP-127 / google/api/http.proto): URL characters but none of the
# template's own syntax.
_LITERAL = re.compile(r"[^/{}*:=]+")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ONE_SEGMENT = "[^/]+"
_ANY_SEGMENTS = ".*"
FD = FieldDescriptor


class TemplateError(ValueError):
    """A google.api.http annotation the gateway cannot serve (raised at start-up)."""


class MalformedRequest(ApiError):
    """A request the gateway cannot read at all (bad JSON, wrong Content-Type): INVALID_ARGUMENT
    without a field to name."""

    code = grpc.StatusCode.INVALID_ARGUMENT


# --- path templates ---


@dataclass(frozen=True)
class PathTemplate:
    """A parsed path template and its aiohttp route."""

    template: str
    # The aiohttp path: ``{var}`` for one segment, ``{var:regex}`` for more.
    route: str
    # (aiohttp route variable, request field path) for each ``{field.path}`` of the template.
    variables: tuple[tuple[str, str], ...]


def parse_template(template: str) -> PathTemplate:
    """Parse ``/v1/{name=shelves/*}/books/{book.id}:verb`` into an aiohttp route."""
    if not template.startswith("/"):
        raise TemplateError(f"path template {template!r} must start with '/'")
    path, verb = _split_verb(template[1:], template)
    parts: list[str] = []
    variables: list[tuple[str, str]] = []
    for i, segment in enumerate(_split_segments(path, template)):
        if segment.startswith("{") and segment.endswith("}"):
            field_path, eq, pattern = segment[1:-1].partition("=")
            if not all(_IDENT.fullmatch(p) for p in field_path.split(".")):
                raise TemplateError(f"{template!r}: bad variable name {field_path!r}")
            if any(field_path == f for _, f in variables):
                raise TemplateError(f"{template!r}: variable {field_path!r} appears twice")
            regex = _segments_regex(pattern.split("/") if eq else ["*"], template)
            # aiohttp names are identifiers; a dotted field path gets "__" for its dots.
            name = field_path.replace(".", "__")
            variables.append((name, field_path))
            parts.append(f"{{{name}}}" if regex == _ONE_SEGMENT else f"{{{name}:{regex}}}")
        elif segment in ("*", "**"):
            # A wildcard outside a variable matches but binds nothing.
            parts.append(f"{{_wildcard{i}:{_segments_regex([segment], template)}}}")
        elif _LITERAL.fullmatch(segment):
            parts.append(segment)
        else:
            raise TemplateError(f"{template!r}: bad segment {segment!r}")
    route = "/" + "/".join(parts) + (f":{verb}" if verb else "")
    return PathTemplate(template, route, tuple(variables))


def _split_verb(path: str, template: str) -> tuple[str, str]:
    """The path and its ``:verb`` suffix: a colon outside braces after the last '/'."""
    depth, colon = 0, -1
    for i, ch in enumerate(path):
        if ch == "{":
            depth += 1
            if depth > 1:
                raise TemplateError(f"{template!r}: nested braces")
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise TemplateError(f"{template!r}: unbalanced braces")
        elif depth == 0 and ch == "/":
            colon = -1
        elif depth == 0 and ch == ":" and colon < 0:
            colon = i
    if depth:
        raise TemplateError(f"{template!r}: unbalanced braces")
    if colon < 0:
        return path, ""
    verb = path[colon + 1 :]
    if not _LITERAL.fullmatch(verb):
        raise TemplateError(f"{template!r}: bad verb {verb!r}")
    return path[:colon], verb


def _split_segments(path: str, template: str) -> list[str]:
    """The '/'-separated segments, keeping a variable's own '/'s inside it."""
    segments, depth, start = [], 0, 0
    for i, ch in enumerate(path):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "/" and depth == 0:
            segments.append(path[start:i])
            start = i + 1
    segments.append(path[start:])
    if any(not s for s in segments):
        raise TemplateError(f"{template!r}: empty segment")
    return segments


def _segments_regex(segments: list[str], template: str) -> str:
    out = []
    for segment in segments:
        if segment == "*":
            out.append(_ONE_SEGMENT)
        elif segment == "**":
            out.append(_ANY_SEGMENTS)
        elif _LITERAL.fullmatch(segment):
            out.append(re.escape(segment))
        else:
            raise TemplateError(f"{template!r}: bad segment {segment!r} in a variable")
    return "/".join(out)


# --- fields ---


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


@functools.cache
def _fields_by_key(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    """A message's fields by proto name and by JSON name: clients may use either."""
    by_key = {f.json_name: f for f in descriptor.fields}
    by_key.update(descriptor.fields_by_name)
    return by_key


def _known(descriptor: Descriptor) -> str:
    return ", ".join(f.name for f in descriptor.fields) or "none"


def resolve_field_path(
    descriptor: Descriptor, path: str, *, json_names: bool = False
) -> list[FieldDescriptor]:
    """The fields along a dotted path (every step but the last a singular message). LookupError
    saying what is wrong otherwise."""
    fields: list[FieldDescriptor] = []
    current: Descriptor | None = descriptor
    for step in path.split("."):
        if current is None or (fields and (fields[-1].is_repeated or _is_map(fields[-1]))):
            prefix = ".".join(f.name for f in fields)
            raise LookupError(f"{prefix} is not a single message; it has no field {step!r}")
        by_key = _fields_by_key(current) if json_names else dict(current.fields_by_name)
        field = by_key.get(step)
        if field is None:
            raise LookupError(
                f"{current.full_name} has no field {step!r} (known: {_known(current)})"
            )
        fields.append(field)
        current = field.message_type
    return fields


def _text_problem(field: FieldDescriptor, name: str) -> str | None:
    """Why a field cannot take its value from URL text (a query parameter or path variable)."""
    if _is_map(field):
        return "is a map; maps can be given only in a JSON body"
    mt = field.message_type
    if mt is not None and mt.full_name not in TEXT_MESSAGES:
        if field.is_repeated:
            return "is a list of messages; it can be given only in a JSON body"
        return f"is a message ({mt.full_name}); give its fields as {name}.<field>"
    return None


# --- what a field expects, for error messages ---

_INT_KINDS: Final = {
    FD.TYPE_INT32: "int32",
    FD.TYPE_SINT32: "int32",
    FD.TYPE_SFIXED32: "int32",
    FD.TYPE_INT64: "int64",
    FD.TYPE_SINT64: "int64",
    FD.TYPE_SFIXED64: "int64",
    FD.TYPE_UINT32: "uint32",
    FD.TYPE_FIXED32: "uint32",
    FD.TYPE_UINT64: "uint64",
    FD.TYPE_FIXED64: "uint64",
}
_MESSAGE_FORMS: Final = {
    "google.protobuf.Timestamp": "an RFC 3339 timestamp such as 2024-01-31T12:00:00Z",
    "google.protobuf.Duration": "a duration in seconds such as 1.5s",
    "google.protobuf.FieldMask": "comma-separated field paths",
    "google.protobuf.Struct": "a JSON object",
    "google.protobuf.Value": "a JSON value",
    "google.protobuf.ListValue": "a JSON list",
    "google.protobuf.Any": 'a JSON object with "@type"',
    "google.protobuf.Empty": "an empty JSON object",
}


def _expected(field: FieldDescriptor, *, item: bool = False) -> str:
    """What a field's JSON or URL value must look like, in words."""
    if _is_map(field) and not item:
        return "a JSON object (a map)"
    if field.is_repeated and not item:
        return f"a list, each item {_expected(field, item=True)}"
    mt, et = field.message_type, field.enum_type
    if mt is not None:
        if mt.full_name in WRAPPERS:
            return _expected(mt.fields_by_name["value"])
        return _MESSAGE_FORMS.get(mt.full_name, f"a JSON object ({mt.full_name})")
    if et is not None:
        names = [v.name for v in et.values]
        shown = ", ".join(names[:12]) + (", …" if len(names) > 12 else "")
        return f"one of {shown} (or its number)"
    if field.type in _INT_KINDS:
        return f"an integer ({_INT_KINDS[field.type]})"
    return {
        FD.TYPE_BOOL: "true or false",
        FD.TYPE_STRING: "a string",
        FD.TYPE_BYTES: "base64-encoded bytes",
        FD.TYPE_DOUBLE: "a number",
        FD.TYPE_FLOAT: "a number",
    }.get(field.type, "a value")


def _show(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# --- JSON → message ---


def merge_json(
    value: object, message: Message, path: str, violations: list[tuple[str, str]]
) -> None:
    """Merge a decoded JSON value into ``message``, adding a violation (field path, rule) for each
    unknown field and each value of the wrong kind, instead of stopping at the first."""
    descriptor: Descriptor = cast(Descriptor, message.DESCRIPTOR)
    if descriptor.full_name in SPECIAL_JSON:
        try:
            json_format.ParseDict(cast(Any, value), message)
        except (json_format.ParseError, OverflowError):  # a 400-digit integer for a double
            form = _MESSAGE_FORMS.get(descriptor.full_name, "a JSON value")
            violations.append((path or "body", f"expected {form}, got {_show(value)}"))
        return
    if not isinstance(value, dict):
        violations.append(
            (path or "body", f"expected a JSON object ({descriptor.full_name}), got {_show(value)}")
        )
        return
    seen: dict[str, str] = {}  # field name → the key that set it
    oneofs: dict[str, str] = {}  # oneof name → the member set
    for key, item in value.items():
        field = _fields_by_key(descriptor).get(key)
        if field is None:
            violations.append(
                (
                    _join(path, key),
                    f"unknown field of {descriptor.full_name} (known: {_known(descriptor)})",
                )
            )
            continue
        here = _join(path, field.name)
        if field.name in seen:
            violations.append((here, f"given twice, as {seen[field.name]!r} and {key!r}"))
            continue
        seen[field.name] = key
        oneof = field.containing_oneof
        # A proto3 optional field is a one-member synthetic oneof: nothing to conflict with.
        if oneof is not None and len(oneof.fields) > 1 and item is not None:
            if oneof.name in oneofs:
                violations.append(
                    (
                        here,
                        f"only one of {oneof.name}'s fields may be set (also given: "
                        f"{oneofs[oneof.name]})",
                    )
                )
                continue
            oneofs[oneof.name] = field.name
        mt = field.message_type
        if item is None and (mt is None or mt.full_name != "google.protobuf.Value"):
            message.ClearField(field.name)  # JSON null: the field's default
        elif _too_many(field, item, here, violations):
            continue
        elif mt is None or _is_map(field) or mt.full_name in SPECIAL_JSON:
            _parse_leaf(message, field, item, here, violations)
        elif field.is_repeated:
            container: Any = getattr(message, field.name)
            del container[:]
            if not isinstance(item, list):
                violations.append((here, f"expected {_expected(field)}, got {_show(item)}"))
                continue
            for i, element in enumerate(item):
                merge_json(element, container.add(), f"{here}[{i}]", violations)
        else:
            sub: Message = getattr(message, field.name)
            sub.SetInParent()
            merge_json(item, sub, here, violations)


def _too_many(
    field: FieldDescriptor, value: object, path: str, violations: list[tuple[str, str]]
) -> bool:
    """Whether a JSON list or object has more items than the field's limit (limits.py), which is
    then the violation: parsing a million items would stall the event loop for nothing."""
    most = limits.max_items(field)
    if most is None or not isinstance(value, list | dict) or len(value) <= most:
        return False
    what = "entries" if isinstance(value, dict) else "items"
    violations.append((path, f"at most {most:,} {what} (got {len(value):,})"))
    return True


def _parse_leaf(
    message: Message,
    field: FieldDescriptor,
    value: object,
    path: str,
    violations: list[tuple[str, str]],
) -> None:
    """Set one field (scalar, list of scalars, map, or a message with its own JSON form) from its
    JSON value, with json_format's rules."""
    try:
        json_format.ParseDict({field.name: value}, message)
    except (json_format.ParseError, OverflowError):
        violations.append((path, f"expected {_expected(field)}, got {_show(value)}"))


def _json_of_text(field: FieldDescriptor, text: str) -> object:
    """The JSON value of URL text for a scalar or text-shaped field; ValueError if it has none."""
    mt, et = field.message_type, field.enum_type
    if mt is not None and mt.full_name in WRAPPERS:
        return _json_of_text(mt.fields_by_name["value"], text)
    if field.type == FD.TYPE_BOOL:
        if text not in ("true", "false"):
            raise ValueError(text)
        return text == "true"
    if et is not None and re.fullmatch(r"-?[0-9]+", text):
        number = int(text)
        if et.values_by_number.get(number) is None:
            raise ValueError(text)
        return number
    # Strings, numbers, enum names, bytes (base64), Timestamp, Duration, FieldMask: json_format
    # parses the text as it would a JSON string.
    return text


def set_from_text(
    message: Message,
    fields: list[FieldDescriptor],
    texts: list[str],
    name: str,
    violations: list[tuple[str, str]],
) -> None:
    """Set the field at the end of ``fields`` from URL text (one value, or several for a repeated
    field)."""
    parent = message
    for step in fields[:-1]:
        parent = getattr(parent, step.name)
    leaf = fields[-1]
    try:
        values = [_json_of_text(leaf, text) for text in texts]
        json_format.ParseDict({leaf.name: values if leaf.is_repeated else values[0]}, parent)
    except (ValueError, OverflowError, json_format.ParseError):
        got = ", ".join(_show(t) for t in texts)
        violations.append((name, f"expected {_expected(leaf, item=True)}, got {got}"))


def read_json_body(body: bytes, content_type: str | None) -> object:
    """The decoded JSON of a request body; MalformedRequest if it is not UTF-8 JSON sent as
    application/json (a charset parameter, if any, must be utf-8)."""
    mime, *params = (content_type or "").split(";")
    mime = mime.strip().lower()
    if mime != "application/json" and not (
        mime.startswith("application/") and mime.endswith("+json")
    ):
        raise MalformedRequest(
            f"a request body must be JSON sent as Content-Type: application/json "
            f"(got {content_type.strip()!r})"
            if content_type
            else "a request body must be JSON sent as Content-Type: application/json "
            "(no Content-Type given)"
        )
    for param in params:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            raise MalformedRequest(f"JSON must be UTF-8 (Content-Type says charset={val.strip()})")
    try:
        return json.loads(body.decode("utf-8-sig"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise MalformedRequest(
            f"malformed JSON body: not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise MalformedRequest(f"malformed JSON body: {exc}") from None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# --- a binding's transcoder ---


class Transcoder:
    """Turns HTTP requests into one RPC's request messages, and its responses into JSON, for one
    HTTP binding (path template, body and response_body of a google.api.http rule)."""

    def __init__(
        self,
        input_type: Descriptor,
        template: PathTemplate,
        body: str = "",
        response_body: str = "",
        output_type: Descriptor | None = None,
    ) -> None:
        where = f"{template.template} ({input_type.full_name})"
        self.template = template
        self.body = body
        self.response_body = response_body
        self._input = input_type
        self._cls = GetMessageClass(input_type)
        self._variables: list[tuple[str, str, list[FieldDescriptor]]] = []
        for route_name, field_path in template.variables:
            fields = self._resolve(field_path, where)
            problem = _text_problem(fields[-1], field_path)
            if problem is not None or fields[-1].is_repeated:
                raise TemplateError(
                    f"{where}: path variable {field_path} {problem or 'is repeated'}"
                )
            self._variables.append((route_name, field_path, fields))
        self._body_field: FieldDescriptor | None = None
        if body not in ("", "*"):
            self._body_field = self._resolve(body, where)[0]
            if "." in body:
                raise TemplateError(f"{where}: body must name a top-level field, not {body!r}")
        self._response_field: FieldDescriptor | None = None
        if response_body and output_type is not None:
            field = output_type.fields_by_name.get(response_body)
            if field is None:
                raise TemplateError(f"{where}: response_body {response_body!r} is not a field")
            self._response_field = field

    def _resolve(self, path: str, where: str) -> list[FieldDescriptor]:
        try:
            return resolve_field_path(self._input, path)
        except LookupError as exc:
            raise TemplateError(f"{where}: {exc}") from None

    def request(
        self,
        path_values: Mapping[str, str],
        query: Iterable[tuple[str, str]],
        body: bytes,
        content_type: str | None,
    ) -> Message:
        """The request message: body first, then query parameters, then path variables (which win
        over the body). InvalidArgument with every bad field, or MalformedRequest."""
        message: Message = self._cls()
        violations: list[tuple[str, str]] = []
        if self.body:
            value = read_json_body(body, content_type) if body.strip() else None
            if self._body_field is None:
                merge_json({} if value is None else value, message, "", violations)
            elif value is not None:
                field = self._body_field
                if field.message_type is not None and not field.is_repeated and not _is_map(field):
                    sub: Message = getattr(message, field.name)
                    sub.SetInParent()
                    merge_json(value, sub, field.name, violations)
                else:
                    _parse_leaf(message, field, value, field.name, violations)
        elif body.strip() and read_json_body(body, content_type) != {}:
            raise MalformedRequest(
                f"{self.template.template} takes no request body; give the fields in the path "
                "and the query string"
            )
        self._apply_query(message, query, violations)
        for route_name, field_path, fields in self._variables:
            set_from_text(message, fields, [path_values[route_name]], field_path, violations)
        if violations:
            # And what did parse but is over its limits: every violation at once, as over gRPC.
            found = set(violations)
            violations += [v for v in limits.violations(message) if v not in found]
            raise InvalidArgument(violations)
        return message

    def _apply_query(
        self, message: Message, query: Iterable[tuple[str, str]], violations: list[tuple[str, str]]
    ) -> None:
        grouped: dict[str, list[str]] = {}
        for key, text in query:
            grouped.setdefault(key, []).append(text)
        bound = [field_path for _, field_path, _ in self._variables]
        for key, texts in grouped.items():
            if self.body == "*":
                violations.append(
                    (key, "unknown query parameter: this method takes its fields in the JSON body")
                )
                continue
            try:
                fields = resolve_field_path(self._input, key, json_names=True)
            except LookupError as exc:
                violations.append((key, f"unknown query parameter: {exc}"))
                continue
            path = ".".join(f.name for f in fields)
            if any(_overlaps(path, b) for b in bound):
                violations.append((key, f"is set by the path ({self.template.template})"))
                continue
            if self.body and _overlaps(path, self.body):
                violations.append((key, "is set by the request body"))
                continue
            problem = _text_problem(fields[-1], key)
            if problem is not None:
                violations.append((key, problem))
            elif len(texts) > 1 and not fields[-1].is_repeated:
                violations.append((key, f"given {len(texts)} times; it takes one value"))
            else:
                set_from_text(message, fields, texts, key, violations)

    def response(self, message: Message) -> Any:
        """The JSON of a response message, or of its response_body field."""
        if self._response_field is None:
            return json_format.MessageToDict(message, preserving_proto_field_name=True)
        # One field alone: present even when it holds its default, so the body is never empty.
        data = json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        return data.get(self._response_field.name)


def _overlaps(path: str, other: str) -> bool:
    """Whether two dotted field paths name the same field or one contains the other."""
    return path == other or path.startswith(other + ".") or other.startswith(path + ".")
