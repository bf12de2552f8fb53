"""``/docs``: the OpenAPI document as one plain HTML page, made from the document alone (no scripts,
no fetched assets; the WMS may run offline)."""

from __future__ import annotations

import re
from html import escape
from typing import Any

SCHEMA_REF = "#/components/schemas/"

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       color: #1d1d1f; }
code, .path { font-family: ui-monospace, monospace; font-size: 0.92em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2.5rem; }
section { margin: 1.5rem 0 2rem; }
.verb { display: inline-block; min-width: 4.2em; font-weight: bold; text-transform: uppercase; }
.get { color: #0a6b2f; } .post { color: #8a4b00; } .delete { color: #a11; }
.put, .patch { color: #3b3bb3; }
table { border-collapse: collapse; width: 100%; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f6; }
.muted { color: #666; }
"""


def render_page(document: dict[str, Any]) -> str:
    """The whole page: operations by tag, then every schema they refer to."""
    info = document["info"]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(info['title'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(info['title'])} <span class='muted'>{escape(info['version'])}</span></h1>",
        text_html(info.get("description", "")),
        "<p>Every operation needs <code>Authorization: Bearer &lt;token&gt;</code>. The machine-"
        'readable document is <a href="v1/openapi.json"><code>/v1/openapi.json</code></a>.</p>',
        "<h2>Operations</h2>",
        contents(document),
    ]
    for tag in document.get("tags", []):
        parts.append(f"<h2 id='tag-{escape(tag['name'])}'>{escape(tag['name'])}</h2>")
        parts.append(text_html(tag.get("description", "")))
        for path, verb, operation in operations(document, tag["name"]):
            parts.append(operation_html(path, verb, operation))
    parts.append("<h2 id='schemas'>Schemas</h2>")
    for name, schema in document["components"]["schemas"].items():
        parts.append(schema_html(name, schema))
    parts.append("</body></html>")
    return "\n".join(parts)


def operations(document: dict[str, Any], tag: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, verb, operation)
        for path, item in document["paths"].items()
        for verb, operation in item.items()
        if tag in operation.get("tags", [])
    ]


def contents(document: dict[str, Any]) -> str:
    rows = []
    for tag in document.get("tags", []):
        for path, verb, operation in operations(document, tag["name"]):
            rows.append(
                f"<tr><td>{verb_html(verb)} "
                f"<a class='path' href='#op-{escape(operation['operationId'])}'>{escape(path)}</a>"
                f"</td><td>{escape(operation.get('summary', ''))}</td></tr>"
            )
    return "<table><tr><th>Operation</th><th>Summary</th></tr>" + "".join(rows) + "</table>"


def verb_html(verb: str) -> str:
    return f"<span class='verb {escape(verb)}'>{escape(verb)}</span>"


def operation_html(path: str, verb: str, operation: dict[str, Any]) -> str:
    parts = [
        f"<section id='op-{escape(operation['operationId'])}'>",
        f"<h3>{verb_html(verb)} <span class='path'>{escape(path)}</span></h3>",
        f"<p class='muted'>gRPC <code>{escape(operation.get('x-grpc-method', ''))}</code></p>",
        text_html(operation.get("description", operation.get("summary", ""))),
    ]
    parameters = operation.get("parameters", [])
    if parameters:
        rows = "".join(
            f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p['in'])}</td>"
            f"<td>{type_html(p['schema'])}</td><td>{'yes' if p.get('required') else ''}</td>"
            f"<td>{inline_text(p.get('description', ''))}</td></tr>"
            for p in parameters
        )
        parts.append(
            "<h4>Parameters</h4><table><tr><th>Name</th><th>In</th><th>Type</th>"
            f"<th>Required</th><th>Description</th></tr>{rows}</table>"
        )
    body = operation.get("requestBody")
    if body:
        schema = body["content"]["application/json"]["schema"]
        if "title" in schema:  # the request message less the fields the path carries
            shown = f"<code>{escape(schema['title'])}</code> without its path fields"
        else:
            shown = type_html(schema)
        parts.append(f"<h4>Request body</h4><p>JSON: {shown}</p>")
        if "properties" in schema:
            parts.append(fields_html(schema))
    parts.append("<h4>Responses</h4><table><tr><th>Status</th><th>Body</th></tr>")
    for status, response in operation["responses"].items():
        for media, content in response.get("content", {}).items():
            shown = content.get("x-sse-data", content["schema"])
            kind = "a stream of " if media == "text/event-stream" else ""
            parts.append(
                f"<tr><td>{escape(status)}</td><td><code>{escape(media)}</code>: {kind}"
                f"{type_html(shown)}<br>{inline_text(response.get('description', ''))}</td></tr>"
            )
    parts.append("</table></section>")
    return "\n".join(parts)


def schema_html(name: str, schema: dict[str, Any]) -> str:
    parts = [f"<section id='schema-{escape(name)}'><h3><code>{escape(name)}</code></h3>"]
    if "enum" in schema:
        # The values and their meanings are the description's list.
        parts.append(text_html(schema.get("description", "")))
    else:
        parts.append(text_html(schema.get("description", "")))
        parts.append(fields_html(schema))
    parts.append("</section>")
    return "\n".join(parts)


def fields_html(schema: dict[str, Any]) -> str:
    required = set(schema.get("required", []))
    rows = "".join(
        f"<tr><td><code>{escape(name)}</code></td><td>{type_html(field)}</td>"
        f"<td>{'yes' if name in required else ''}</td>"
        f"<td>{inline_text(field.get('description', ''))}</td></tr>"
        for name, field in schema.get("properties", {}).items()
    )
    if not rows:
        return "<p class='muted'>No fields.</p>"
    return (
        "<table><tr><th>Field</th><th>Type</th><th>Required</th><th>Description</th></tr>"
        f"{rows}</table>"
    )


def type_html(schema: dict[str, Any]) -> str:
    """A schema in a few words, linking the named schemas."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(SCHEMA_REF)
        return f"<a href='#schema-{escape(name)}'><code>{escape(name)}</code></a>"
    if "oneOf" in schema:
        return " or ".join(type_html(s) for s in schema["oneOf"])
    kind = schema.get("type")
    if kind is None:
        return "any JSON value"
    if isinstance(kind, list):
        words = " or ".join(escape(k) for k in kind)
    elif kind == "array":
        return "array of " + type_html(schema.get("items", {}))
    elif kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return "map of string to " + type_html(schema["additionalProperties"])
    else:
        words = escape(kind)
    if "enum" in schema:
        words += " (" + ", ".join(f"<code>{escape(str(v))}</code>" for v in schema["enum"]) + ")"
    if "format" in schema:
        words += f" <span class='muted'>({escape(schema['format'])})</span>"
    return words


def inline_text(text: str) -> str:
    """Escaped text with the Markdown the comments use: `code`, **bold**, [links](url), and
    googleapis' [cross][references] shown as their text."""
    text = escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"\[([^\]]+)\]\[[^\]]*\]", r"\1", text)
    return re.sub(r"\[([^\]]+)\]\((https?://[^)\s\"]+)\)", r'<a href="\2">\1</a>', text)


def text_html(text: str) -> str:
    """Paragraphs (blank-line separated) and ``- `` lists of a description."""
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if not block:
            continue
        lines = block.splitlines()
        if all(line.startswith("- ") for line in lines):
            items = "".join(f"<li>{inline_text(line[2:])}</li>" for line in lines)
            blocks.append(f"<ul>{items}</ul>")
        else:
            blocks.append(f"<p>{inline_text(block)}</p>")
    return "\n".join(blocks)
