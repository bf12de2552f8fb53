"""The REST gateway's OpenAPI 3.1 document, generated at start-up from the service descriptors the
gateway routes by, and a plain HTML page made from it: ``GET /v1/openapi.json`` and ``GET /docs``,
both without a token.

Structure comes from the runtime descriptors (``google.api.http`` bindings, field types,
``google.api.field_behavior``); descriptions come from the proto comments, which the runtime drops,
so they are read from the FileDescriptorSet that scripts/gen_protos.py writes beside the generated
code (``ewms/v1/descriptor_set.binpb``). Nothing here names a message or a route.

Schemas follow the proto3 JSON mapping with proto field names, as the gateway speaks it. Where the
mapping lets a request say more than a response does, a message gets a second schema for requests,
``<full name>-Input``, only when it is used both ways and the two differ (see ``Schemas``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from aiohttp import web
from google.api import annotations_pb2, field_behavior_pb2
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from google.rpc import status_pb2

from services.wms.http.api_page import render_page

Schema = dict[str, Any]

TITLE = "EWMS Workflow Management Service"
DESCRIPTOR_SET = ("ewms.v1", "descriptor_set.binpb")
ERROR_MESSAGE = status_pb2.Status.DESCRIPTOR
SCHEMA_REF = "#/components/schemas/"
# A request schema's name when it must differ from the response schema of the same message. A
# hyphen never occurs in a proto name, so it cannot clash with a nested message.
INPUT_SUFFIX = "-Input"

ABOUT = """\
The REST/JSON face of the WMS's gRPC services, generated from their `google.api.http` bindings:
each operation calls the gRPC method named in its `x-grpc-method`, with the same authorization and
the same errors.

JSON follows the proto3 JSON mapping with **proto field names** (`workflow_id`, not `workflowId`;
requests may use either). Responses omit fields that hold their default value (0, "", false, empty
lists, unset messages). 64-bit integers are decimal strings in responses; requests may send strings
or numbers. Enums are value names; requests may also send the numbers, which are not part of this
contract. `bytes` are base64. Timestamps are RFC 3339 strings, durations are seconds with an `s`
suffix. In a request, `null` for any field means unset; an unknown field, or two members of one
oneof, is INVALID_ARGUMENT.

Errors answer with an HTTP status mapped from the gRPC code (`google/rpc/code.proto`) and a
`google.rpc.Status` body whose `details` carry e.g. `google.rpc.BadRequest` field violations.
Server-streaming methods answer with Server-Sent Events."""


class Direction(Enum):
    """Which way a message travels: the mapping accepts more in requests than it produces."""

    OUTPUT = "output"
    INPUT = "input"


# --- comments, from the descriptor set ---


def load_comments() -> dict[str, str]:
    """Proto comments by full name (``ewms.v1.Workflow``, ``ewms.v1.Workflow.owner``, enum values
    as ``ewms.v1.Deactivation.DEACTIVATION_ABORTED``), read from the packaged descriptor set."""
    package, name = DESCRIPTOR_SET
    try:
        data = importlib.resources.files(package).joinpath(name).read_bytes()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{package}/{name} is missing: run 'python scripts/gen_protos.py'"
        ) from exc
    return index_comments(descriptor_pb2.FileDescriptorSet.FromString(data))


def index_comments(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, str]:
    """The leading (else trailing) comment of every message, field, oneof, enum, enum value,
    service and method of the set, by full name. Paths are descriptor.proto's field numbers."""
    comments: dict[str, str] = {}
    for file in fds.file:
        located = {tuple(loc.path): loc for loc in file.source_code_info.location}

        def text(path: tuple[int, ...], located: Any = located) -> str:
            loc = located.get(path)
            return clean_comment(loc.leading_comments or loc.trailing_comments) if loc else ""

        def add_enum(enum: Any, path: tuple[int, ...], scope: str) -> None:
            name = qualify(scope, enum.name)
            comments[name] = text(path)
            for i, value in enumerate(enum.value):
                comments[f"{name}.{value.name}"] = text((*path, 2, i))

        def add_message(message: Any, path: tuple[int, ...], scope: str) -> None:
            name = qualify(scope, message.name)
            comments[name] = text(path)
            for i, field in enumerate(message.field):
                comments[f"{name}.{field.name}"] = text((*path, 2, i))
            for i, nested in enumerate(message.nested_type):
                add_message(nested, (*path, 3, i), name)
            for i, enum in enumerate(message.enum_type):
                add_enum(enum, (*path, 4, i), name)
            for i, oneof in enumerate(message.oneof_decl):
                comments[f"{name}.{oneof.name}"] = text((*path, 8, i))

        for i, message in enumerate(file.message_type):
            add_message(message, (4, i), file.package)
        for i, enum in enumerate(file.enum_type):
            add_enum(enum, (5, i), file.package)
        for i, service in enumerate(file.service):
            name = qualify(file.package, service.name)
            comments[name] = text((6, i))
            for j, method in enumerate(service.method):
                comments[f"{name}.{method.name}"] = text((6, i, 2, j))
    return comments


def qualify(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


def clean_comment(raw: str) -> str:
    """A ``//`` comment's text: the space after each ``//`` removed, outer blank lines dropped."""
    lines = [line[1:] if line.startswith(" ") else line for line in raw.splitlines()]
    return "\n".join(line.rstrip() for line in lines).strip()


def first_sentence(text: str) -> str:
    """An operation's summary: its comment's first sentence."""
    flat = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(\s|$)", flat)
    return match.group(1) if match else flat


# --- schemas ---

FD = descriptor.FieldDescriptor
INT32_TYPES = {FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32}
UINT32_TYPES = {FD.TYPE_UINT32, FD.TYPE_FIXED32}
INT64_TYPES = {FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64}
UINT64_TYPES = {FD.TYPE_UINT64, FD.TYPE_FIXED64}
INTEGER_TYPES = INT32_TYPES | UINT32_TYPES | INT64_TYPES | UINT64_TYPES
WRAPPERS = {
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}
WIDE_WRAPPERS = {"google.protobuf.Int64Value", "google.protobuf.UInt64Value"}
# Well-known types a single URL text can hold (a path or query parameter).
TEXT_MESSAGES = WRAPPERS | {
    "google.protobuf.Timestamp",
    "google.protobuf.Duration",
    "google.protobuf.FieldMask",
}
# Well-known types with a JSON form of their own: written inline, never a component.
SPECIAL_FORMS: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object", "maxProperties": 0},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}
SPECIAL_MESSAGES = WRAPPERS | set(SPECIAL_FORMS)


def scalar_schema(field: descriptor.FieldDescriptor, direction: Direction) -> Schema:
    """A non-message, non-enum value in the proto3 JSON mapping."""
    kind = field.type
    if kind in INT32_TYPES:
        return {"type": "integer", "format": "int32"}
    if kind in UINT32_TYPES:
        return {"type": "integer", "format": "uint32", "minimum": 0}
    if kind in INT64_TYPES or kind in UINT64_TYPES:
        # Strings out (JavaScript numbers lose precision past 2**53); strings or numbers in.
        unsigned = kind in UINT64_TYPES
        return {
            "type": "string" if direction is Direction.OUTPUT else ["string", "integer"],
            "format": "uint64" if unsigned else "int64",
            "pattern": "^[0-9]+$" if unsigned else "^-?[0-9]+$",
        }
    if kind in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return {
            "oneOf": [
                {"type": "number", "format": "float" if kind == FD.TYPE_FLOAT else "double"},
                {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]},
            ]
        }
    if kind == FD.TYPE_BOOL:
        return {"type": "boolean"}
    if kind == FD.TYPE_BYTES:
        return {"type": "string", "format": "byte", "contentEncoding": "base64"}
    return {"type": "string"}


def special_schema(message: descriptor.Descriptor, direction: Direction) -> Schema:
    """The JSON form of a well-known type in SPECIAL_MESSAGES (a fresh copy)."""
    if message.full_name not in WRAPPERS:
        return json.loads(json.dumps(SPECIAL_FORMS[message.full_name]))  # type: ignore[no-any-return]
    wrapped = scalar_schema(message.fields_by_name["value"], direction)
    kind = wrapped.get("type")
    if kind is None:
        return {"oneOf": [*wrapped["oneOf"], {"type": "null"}]}
    return {**wrapped, "type": [*(kind if isinstance(kind, list) else [kind]), "null"]}


def behaviors(field: descriptor.FieldDescriptor) -> set[int]:
    """The field's ``google.api.field_behavior`` values."""
    return set(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def is_required(field: descriptor.FieldDescriptor) -> bool:
    return field_behavior_pb2.REQUIRED in behaviors(field)


def is_map(field: descriptor.FieldDescriptor) -> bool:
    entry = field.message_type
    return bool(entry is not None and field.is_repeated and entry.GetOptions().map_entry)


def map_part(field: descriptor.FieldDescriptor, part: str) -> descriptor.FieldDescriptor:
    """A map field's ``key`` or ``value`` field."""
    assert field.message_type is not None
    return field.message_type.fields_by_name[part]


def reachable(message: descriptor.Descriptor) -> list[descriptor.Descriptor]:
    """Every message with a component schema reachable from this one, itself included."""
    found: dict[str, descriptor.Descriptor] = {}
    stack = [message]
    while stack:
        current = stack.pop()
        if current.full_name in found or current.full_name in SPECIAL_MESSAGES:
            continue
        found[current.full_name] = current
        for field in current.fields:
            value = map_part(field, "value") if is_map(field) else field
            if value.message_type is not None:
                stack.append(value.message_type)
    return list(found.values())


def real_oneofs(message: descriptor.Descriptor) -> list[descriptor.OneofDescriptor]:
    """The message's oneofs, less those protoc makes up for proto3 ``optional`` fields."""
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    synthetic = {proto.oneof_decl[f.oneof_index].name for f in proto.field if f.proto3_optional}
    return [oneof for oneof in message.oneofs if oneof.name not in synthetic]


class Schemas:
    """``components.schemas``: one schema per message and enum, named by its full name, built as
    operations refer to them.

    A message's request (INPUT) schema differs from its response (OUTPUT) schema when the message
    or one it reaches has a 64-bit integer (numbers accepted in) or a REQUIRED field (required only
    in requests). Such a message gets ``<name>-Input`` for requests, but only if responses use it
    too: a message that only travels one way keeps its plain name.
    """

    def __init__(self, comments: dict[str, str], responses: Iterable[descriptor.Descriptor]):
        self.comments = comments
        self.components: dict[str, Schema] = {}
        self._in_responses = {m.full_name for r in responses for m in reachable(r)}

    def ref(self, message: descriptor.Descriptor, direction: Direction) -> Schema:
        """A reference to the message's schema (its inline JSON form for well-known types)."""
        if message.full_name in SPECIAL_MESSAGES:
            return special_schema(message, direction)
        name = self.name(message, direction)
        if name not in self.components:
            self.components[name] = {}  # reserved first: a message may refer to itself
            self.components[name] = self.message_schema(message, direction)
        return {"$ref": SCHEMA_REF + name}

    def name(self, message: descriptor.Descriptor, direction: Direction) -> str:
        if (
            direction is Direction.INPUT
            and message.full_name in self._in_responses
            and any(self.views_differ(m) for m in reachable(message))
        ):
            return message.full_name + INPUT_SUFFIX
        return message.full_name

    @staticmethod
    def views_differ(message: descriptor.Descriptor) -> bool:
        """Whether the message's own fields read differently in requests than in responses."""
        for field in message.fields:
            value = map_part(field, "value") if is_map(field) else field
            if value.type in INT64_TYPES or value.type in UINT64_TYPES or is_required(field):
                return True
            if value.message_type is not None and value.message_type.full_name in WIDE_WRAPPERS:
                return True
        return False

    def enum_ref(self, enum: descriptor.EnumDescriptor) -> Schema:
        """A reference to the enum's schema: its value names, the same both ways."""
        if enum.full_name == "google.protobuf.NullValue":
            return {"type": "null"}
        if enum.full_name not in self.components:
            values = "\n".join(
                f"- `{value.name}`: {self.comments.get(f'{enum.full_name}.{value.name}', '')}"
                for value in enum.values
            )
            comment = self.comments.get(enum.full_name, "")
            self.components[enum.full_name] = {
                "type": "string",
                "enum": [value.name for value in enum.values],
                "description": f"{comment}\n\n{values}" if comment else values,
            }
        return {"$ref": SCHEMA_REF + enum.full_name}

    def message_schema(
        self,
        message: descriptor.Descriptor,
        direction: Direction,
        exclude: frozenset[str] = frozenset(),
    ) -> Schema:
        """The message as a JSON object, without the fields named in ``exclude``."""
        fields = [field for field in message.fields if field.name not in exclude]
        notes = [self.comments.get(message.full_name, "")]
        for oneof in real_oneofs(message):
            members = ", ".join(f"`{f.name}`" for f in oneof.fields)
            comment = self.comments.get(f"{message.full_name}.{oneof.name}", "")
            notes.append(f"Oneof `{oneof.name}`: at most one of {members} is set. {comment}")
        schema: Schema = {"type": "object"}
        description = "\n\n".join(note.strip() for note in notes if note)
        if description:
            schema["description"] = description
        schema["properties"] = {f.name: self.field_schema(f, direction) for f in fields}
        required = [f.name for f in fields if direction is Direction.INPUT and is_required(f)]
        if required:
            schema["required"] = required
        return schema

    def field_schema(self, field: descriptor.FieldDescriptor, direction: Direction) -> Schema:
        """The field's JSON value, described by its comment."""
        if is_map(field):
            key = map_part(field, "key")
            value = self.value_schema(map_part(field, "value"), direction)
            schema: Schema = {"type": "object", "additionalProperties": value}
            if key.type in INTEGER_TYPES:
                schema["propertyNames"] = {"pattern": "^-?[0-9]+$"}
            elif key.type == FD.TYPE_BOOL:
                schema["propertyNames"] = {"enum": ["true", "false"]}
        elif field.is_repeated:
            schema = {"type": "array", "items": self.value_schema(field, direction)}
        else:
            schema = self.value_schema(field, direction)
        description = self.comments.get(field.full_name, "")
        oneof = field.containing_oneof
        if oneof is not None and oneof.name in {o.name for o in real_oneofs(oneof.containing_type)}:
            description = f"{description} Part of oneof `{oneof.name}`.".strip()
        if description:
            schema["description"] = description
        behavior = behaviors(field)
        if field_behavior_pb2.OUTPUT_ONLY in behavior:
            schema["readOnly"] = True
        if field_behavior_pb2.INPUT_ONLY in behavior:
            schema["writeOnly"] = True
        if field.GetOptions().deprecated:
            schema["deprecated"] = True
        return schema

    def value_schema(self, field: descriptor.FieldDescriptor, direction: Direction) -> Schema:
        """One value of the field (an element, for repeated fields), as a fresh dict."""
        if field.enum_type is not None:
            return self.enum_ref(field.enum_type)
        if field.message_type is not None:
            return self.ref(field.message_type, direction)
        return scalar_schema(field, direction)

    def parameter_schema(self, field: descriptor.FieldDescriptor) -> Schema:
        """A path or query parameter's value. It is URL text, so 64-bit integers are integers."""
        if field.type in INT64_TYPES or field.type in UINT64_TYPES:
            value = {"type": "integer", "format": scalar_schema(field, Direction.INPUT)["format"]}
        else:
            value = self.value_schema(field, Direction.INPUT)
        return {"type": "array", "items": value} if field.is_repeated else value


# --- operations ---


@dataclass(frozen=True)
class Binding:
    """One HTTP binding of an RPC: verb, path template, and which fields the bodies carry."""

    method: descriptor.MethodDescriptor
    verb: str
    template: str
    body: str
    response_body: str
    index: int  # 0 for the rule itself, 1.. for its additional_bindings

    @property
    def operation_id(self) -> str:
        base = f"{self.method.containing_service.name}_{self.method.name}"
        return f"{base}_{self.index}" if self.index else base

    @property
    def where(self) -> str:
        return f"{self.method.full_name} ({self.verb.upper()} {self.template})"


PATH_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=([^}]*))?\}")
VERBS = ("get", "put", "post", "delete", "patch")


def bindings(service: descriptor.ServiceDescriptor) -> Iterator[Binding]:
    """Every HTTP binding of the service's annotated methods, in declaration order. Methods that
    stream requests are left out: the gateway cannot carry them and does not route them."""
    for method in service.methods:
        options = method.GetOptions()
        if method.client_streaming or not options.HasExtension(annotations_pb2.http):
            continue
        rule = options.Extensions[annotations_pb2.http]
        for index, each in enumerate([rule, *rule.additional_bindings]):
            pattern = each.WhichOneof("pattern")
            if pattern == "custom":
                verb, template = each.custom.kind.lower(), each.custom.path
            elif pattern is not None:
                verb, template = pattern, getattr(each, pattern)
            else:
                continue
            if verb not in VERBS:
                raise ValueError(f"{method.full_name}: HTTP verb {verb!r} has no OpenAPI form")
            yield Binding(method, verb, template, each.body, each.response_body, index)


def field_at(message: descriptor.Descriptor, path: str, where: str) -> descriptor.FieldDescriptor:
    """The field a dotted path names in the message."""
    scope: descriptor.Descriptor | None = message
    field = None
    for part in path.split("."):
        field = scope.fields_by_name.get(part) if scope is not None else None
        if field is None:
            raise ValueError(f"{where}: {path!r} is not a field of {message.full_name}")
        scope = field.message_type
    assert field is not None
    return field


class Operations:
    """``paths``: one operation per binding, with its parameters, body and responses."""

    def __init__(self, schemas: Schemas) -> None:
        self.schemas = schemas
        self.comments = schemas.comments
        self.paths: dict[str, dict[str, Any]] = {}

    def add(self, binding: Binding) -> None:
        method, request = binding.method, binding.method.input_type
        variables: list[tuple[str, str]] = []  # (field path, the segments it matches)

        def openapi_variable(match: re.Match[str]) -> str:
            variables.append((match.group(1), match.group(2) or "*"))
            return "{" + match.group(1) + "}"

        path = PATH_VARIABLE.sub(openapi_variable, binding.template)
        parameters = [self.path_parameter(binding, name, shape) for name, shape in variables]
        bound = {name for name, _ in variables}

        operation: dict[str, Any] = {
            "operationId": binding.operation_id,
            "tags": [method.containing_service.name],
        }
        comment = self.comments.get(method.full_name, "")
        if comment:
            operation["summary"] = first_sentence(comment)
            operation["description"] = comment
        operation["x-grpc-method"] = f"/{method.containing_service.full_name}/{method.name}"
        if binding.body == "*":
            top_level = frozenset(name for name in bound if "." not in name)
            operation["requestBody"] = self.request_body(request, top_level)
        else:
            if binding.body:
                body_field = field_at(request, binding.body, binding.where)
                operation["requestBody"] = self.field_body(body_field)
                bound.add(binding.body)
            parameters += self.query_parameters(request, "", bound, {request.full_name})
        if parameters:
            operation["parameters"] = parameters
        operation["responses"] = self.responses(binding)
        if method.GetOptions().deprecated:
            operation["deprecated"] = True

        item = self.paths.setdefault(path, {})
        if binding.verb in item:
            raise ValueError(f"{binding.where}: {binding.verb.upper()} {path} is bound twice")
        item[binding.verb] = operation

    def path_parameter(self, binding: Binding, name: str, shape: str) -> Schema:
        field = field_at(binding.method.input_type, name, binding.where)
        description = self.comments.get(field.full_name, "")
        if shape != "*":
            description = f"{description} Matches `{shape}`.".strip()
        parameter: Schema = {"name": name, "in": "path", "required": True}
        if description:
            parameter["description"] = description
        parameter["schema"] = self.schemas.parameter_schema(field)
        return parameter

    def query_parameters(
        self, message: descriptor.Descriptor, prefix: str, bound: set[str], seen: set[str]
    ) -> list[Schema]:
        """The fields left for the query string: scalars, enums by name, repeated values and
        URL-text well-known types; nested messages flattened with dots. Maps, repeated messages
        and JSON-only types (Struct, Value, Any) have no query form."""
        parameters: list[Schema] = []
        for field in message.fields:
            name = prefix + field.name
            nested = field.message_type
            if name in bound or is_map(field):
                continue
            if nested is not None and nested.full_name not in TEXT_MESSAGES:
                if nested.full_name in SPECIAL_MESSAGES or field.is_repeated:
                    continue
                if nested.full_name not in seen:
                    parameters += self.query_parameters(
                        nested, name + ".", bound, seen | {nested.full_name}
                    )
                continue
            parameter: Schema = {"name": name, "in": "query"}
            if is_required(field):
                parameter["required"] = True
            if self.comments.get(field.full_name):
                parameter["description"] = self.comments[field.full_name]
            parameter["schema"] = self.schemas.parameter_schema(field)
            if field.GetOptions().deprecated:
                parameter["deprecated"] = True
            parameters.append(parameter)
        return parameters

    def request_body(self, request: descriptor.Descriptor, path_bound: frozenset[str]) -> Schema:
        """``body: "*"``: the request message less the fields the path carries."""
        if path_bound:
            schema = self.schemas.message_schema(request, Direction.INPUT, exclude=path_bound)
            schema["title"] = request.full_name
        else:
            schema = self.schemas.ref(request, Direction.INPUT)
        body: Schema = {
            "required": any(is_required(f) for f in request.fields if f.name not in path_bound)
        }
        if self.comments.get(request.full_name):
            body["description"] = self.comments[request.full_name]
        body["content"] = {"application/json": {"schema": schema}}
        return body

    def field_body(self, field: descriptor.FieldDescriptor) -> Schema:
        """``body: "<field>"``: that field's JSON value."""
        schema = self.schemas.field_schema(field, Direction.INPUT)
        body: Schema = {"required": is_required(field)}
        if "description" in schema:
            body["description"] = schema.pop("description")
        body["content"] = {"application/json": {"schema": schema}}
        return body

    def responses(self, binding: Binding) -> Schema:
        output = binding.method.output_type
        comment = self.comments.get(output.full_name, "")
        if binding.response_body:
            field = field_at(output, binding.response_body, binding.where)
            schema = self.schemas.field_schema(field, Direction.OUTPUT)
            comment = schema.pop("description", comment)
        else:
            schema = self.schemas.ref(output, Direction.OUTPUT)
        if binding.method.server_streaming:
            # The framing is services/wms/http/sse.py's.
            comment = (
                "Server-Sent Events: each response message is a `message` event whose `data` is "
                "its JSON (`x-sse-data`); the stream ends with an `end` event, or with an "
                f"`error` event whose `data` is a google.rpc.Status. {comment}"
            )
            content = {"text/event-stream": {"schema": {"type": "string"}, "x-sse-data": schema}}
        else:
            content = {"application/json": {"schema": schema}}
        error = self.schemas.ref(ERROR_MESSAGE, Direction.OUTPUT)
        return {
            "200": {"description": comment.strip() or "OK", "content": content},
            "default": {
                "description": (
                    "The call failed: the HTTP status follows the gRPC code; the body is a "
                    "google.rpc.Status."
                ),
                "content": {"application/json": {"schema": error}},
            },
        }


# --- the document ---


def package_version() -> str:
    try:
        return importlib.metadata.version("ewms")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def build_openapi(services: Iterable[str], comments: dict[str, str] | None = None) -> Schema:
    """The OpenAPI 3.1 document of every ``google.api.http`` binding of the named services (full
    names, e.g. ``ewms.v1.WorkflowService``, whose generated modules are imported)."""
    if comments is None:
        comments = load_comments()
    pool = descriptor_pool.Default()
    found = [pool.FindServiceByName(name) for name in services]
    every = [binding for service in found for binding in bindings(service)]
    schemas = Schemas(comments, [ERROR_MESSAGE, *(b.method.output_type for b in every)])
    operations = Operations(schemas)
    for binding in every:
        operations.add(binding)
    tags = []
    for service in found:
        tag: Schema = {"name": service.name}
        if comments.get(service.full_name):
            tag["description"] = comments[service.full_name]
        tag["x-grpc-service"] = service.full_name
        tags.append(tag)
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": package_version(), "description": ABOUT},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": tags,
        "paths": operations.paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A WMS token (`ewms tokens`) or one from the OIDC issuer.",
                }
            },
        },
    }


# --- routes ---


@dataclass(frozen=True)
class ApiDocs:
    """The document, its JSON and its page, built once per application."""

    document: Schema
    json_body: bytes
    html: str


API_DOCS = web.AppKey("api_docs", ApiDocs)


def add_routes(app: web.Application) -> None:
    """Serve ``/v1/openapi.json`` and ``/docs`` (no token), built at start-up for the services
    the HTTP face calls."""
    app.on_startup.append(build_docs)
    app.router.add_get("/v1/openapi.json", openapi_json)
    app.router.add_get("/docs", docs_page)


async def build_docs(app: web.Application) -> None:
    from services.wms.http.server import DEPS

    document = build_openapi(app[DEPS].servicers)
    body = json.dumps(document, ensure_ascii=False).encode()
    app[API_DOCS] = ApiDocs(document, body, render_page(document))


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[API_DOCS].json_body, content_type="application/json")


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=request.app[API_DOCS].html, content_type="text/html")
