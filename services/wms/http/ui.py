"""The dashboard's files: ``GET /`` (its one page) and ``GET /ui/{path}`` (its scripts, style sheet
and vendored libraries), served from ``ui_static/`` in this package, without a token: the page asks
the user for one and sends it with every API call itself.

The files are read once when the application is built: they are a few hundred kilobytes, and a
fixed table of them means a request path is looked up, never joined onto a directory, so no path
can reach outside it. Every answer (errors included) carries a strict Content-Security-Policy (only
this origin's scripts and styles, nothing inline), so text from the server that the page shows, such
as a task's stderr, could not run even if it were ever inserted as markup.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from types import MappingProxyType
from typing import Final

from aiohttp import web

from services.errors import InvalidArgument, NotFound
from services.wms.http.status import respond

STATIC_PACKAGE = "services.wms.http"
STATIC_DIR = "ui_static"
INDEX = "index.html"
# Versioned paths (vendor/<name>-<version>/) never change: browsers may keep them. Everything else
# is revalidated on each load (an ETag match answers 304), so an upgraded WMS is seen at once.
IMMUTABLE_PREFIX = "vendor/"
CACHE_IMMUTABLE = "public, max-age=31536000, immutable"
CACHE_REVALIDATE = "no-cache"

# File name suffix → Content-Type. A file of any other type is not served (see load_files).
CONTENT_TYPES: Final = MappingProxyType(
    {
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".svg": "image/svg+xml",
        ".png": "image/png",
        ".ico": "image/x-icon",
        ".md": "text/markdown; charset=utf-8",
        ".txt": "text/plain; charset=utf-8",
        # LICENSE files.
        "": "text/plain; charset=utf-8",
    }
)

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS: Final = MappingProxyType(
    {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
)


@dataclass(frozen=True)
class StaticFile:
    """One file as it is served."""

    body: bytes
    content_type: str
    etag: str
    cache_control: str


UI_FILES = web.AppKey("ui_files", dict[str, StaticFile])


def add_routes(app: web.Application) -> None:
    """Serve the dashboard at ``/`` and its files under ``/ui/``."""
    app[UI_FILES] = load_files(importlib.resources.files(STATIC_PACKAGE) / STATIC_DIR)
    app.router.add_get("/", index)
    app.router.add_get("/ui/{path:.*}", static_file)


def load_files(root: Traversable) -> dict[str, StaticFile]:
    """Every servable file under ``root``, by its path relative to it (``/``-separated). Hidden
    files, caches and files of unknown types are left out."""
    files: dict[str, StaticFile] = {}
    pending: list[tuple[str, Traversable]] = [("", root)]
    while pending:
        prefix, folder = pending.pop()
        for entry in folder.iterdir():
            name = entry.name
            if name.startswith(".") or name == "__pycache__":
                continue
            if entry.is_dir():
                pending.append((f"{prefix}{name}/", entry))
                continue
            content_type = CONTENT_TYPES.get(suffix(name))
            if content_type is None:
                continue
            path = prefix + name
            body = entry.read_bytes()
            files[path] = StaticFile(
                body=body,
                content_type=content_type,
                etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"',
                cache_control=(
                    CACHE_IMMUTABLE if path.startswith(IMMUTABLE_PREFIX) else CACHE_REVALIDATE
                ),
            )
    return files


def suffix(name: str) -> str:
    """The lower-cased extension with its dot, or "" when the name has none."""
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


async def index(request: web.Request) -> web.Response:
    return serve(request, INDEX)


async def static_file(request: web.Request) -> web.Response:
    path = request.match_info["path"]
    problem = path_problem(path)
    if problem is not None:
        status = InvalidArgument([("path", problem)]).to_status()
        return respond(request, status, headers=SECURITY_HEADERS)
    return serve(request, path)


def path_problem(path: str) -> str | None:
    """Why ``path`` (already percent-decoded) is refused before it is looked up, or None. The
    lookup alone would be safe; this names the mistake instead of answering 404."""
    if not path:
        return "a file path is required after /ui/"
    if "\\" in path or "\0" in path:
        return "backslashes and NUL characters are not allowed"
    segments = path.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return "empty, '.' and '..' segments are not allowed"
    return None


def serve(request: web.Request, path: str) -> web.Response:
    """The file at ``path``; 304 when the client holds this version; 404 when there is none."""
    file = request.app[UI_FILES].get(path)
    if file is None:
        status = NotFound(f"GET {request.path}: no such dashboard file").to_status()
        return respond(request, status, headers=SECURITY_HEADERS)
    headers = {**SECURITY_HEADERS, "Cache-Control": file.cache_control, "ETag": file.etag}
    if file.etag in held_etags(request):
        return web.Response(status=304, headers=headers)
    return web.Response(body=file.body, headers={**headers, "Content-Type": file.content_type})


def held_etags(request: web.Request) -> set[str]:
    """The entity tags of If-None-Match (weak ones compared as strong: the body is all there is)."""
    tags = set()
    for header in request.headers.getall("If-None-Match", []):
        for tag in header.split(","):
            tags.add(tag.strip().removeprefix("W/"))
    return tags
