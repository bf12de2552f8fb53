"""Server-streaming RPCs over HTTP as Server-Sent Events (``text/event-stream``).

Each response message is one ``event: message`` with an ``id:`` counting from 1 and the message's
JSON on one ``data:`` line. A quiet stream sends a ``: keep-alive`` comment every KEEPALIVE_SECONDS
so proxies keep the connection open. When the RPC ends, ``event: end`` is sent and the response
closed; when it fails after the stream has started, ``event: error`` carries the google.rpc.Status
JSON instead. A failure before anything was sent (bad id, not found, no permission) is an ordinary
JSON error response with its HTTP status. A client that goes away stops the servicer's generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog
from aiohttp import web
from google.protobuf.message import Message

from services.wms.http.status import error_status, note_code, respond, status_body

log = structlog.get_logger(__name__)

# Seconds between keep-alive comments on a quiet stream (read per stream, so tests can lower it).
KEEPALIVE_SECONDS = 15.0
# How often a quiet stream checks that its client is still there. aiohttp does not cancel a handler
# whose client disconnected, so without this a stream would hold the servicer's generator (a watch,
# a subscription) until its next write failed.
DISCONNECT_CHECK_SECONDS = 1.0


def event(name: str, data: Any, event_id: int | None = None) -> bytes:
    """One SSE event. json.dumps escapes newlines, so the data is always one line."""
    lines = [f"id: {event_id}"] if event_id is not None else []
    lines += [f"event: {name}", f"data: {json.dumps(data, separators=(',', ':'))}"]
    return ("\n".join(lines) + "\n\n").encode()


KEEPALIVE = b": keep-alive\n\n"


async def stream(
    request: web.Request,
    messages: AsyncIterator[Message],
    encode: Callable[[Message], Any],
) -> web.StreamResponse:
    """Send a server stream's messages as SSE until it ends, fails, or the client leaves."""
    keepalive = KEEPALIVE_SECONDS
    loop = asyncio.get_running_loop()
    response: web.StreamResponse | None = None
    last_write = loop.time()
    sent = 0
    pending: asyncio.Future[Message] | None = None

    async def send(data: bytes) -> web.StreamResponse:
        nonlocal response, last_write
        if response is None:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream; charset=utf-8",
                    "Cache-Control": "no-cache",
                    # nginx buffers responses unless told not to.
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
        await response.write(data)
        last_write = loop.time()
        return response

    try:
        while True:
            # The next message is awaited in a task of its own so that keep-alives can be sent
            # meanwhile without cancelling (and so ending) the servicer's generator.
            pending = asyncio.ensure_future(anext(messages))
            while not pending.done():
                tick = min(keepalive, DISCONNECT_CHECK_SECONDS)
                await asyncio.wait({pending}, timeout=tick)
                if pending.done():
                    break
                if _client_gone(request):
                    return _gone(request, response, sent)
                if loop.time() - last_write >= keepalive:
                    await send(KEEPALIVE)
            done, pending = pending, None
            try:
                message = done.result()
            except StopAsyncIteration:
                resp = await send(event("end", {}))
                await resp.write_eof()
                return resp
            except Exception as exc:
                status, http, headers = error_status(exc, request)
                if response is None:
                    return respond(request, status, http, headers)
                note_code(request, status.code)
                await send(event("error", status_body(status)))
                await response.write_eof()
                return response
            sent += 1
            await send(event("message", encode(message), sent))
    except ConnectionResetError:
        return _gone(request, response, sent)
    finally:
        await _close(messages, pending)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _gone(
    request: web.Request, response: web.StreamResponse | None, sent: int
) -> web.StreamResponse:
    """The end of a stream whose client left: CANCELLED, nothing more to send."""
    log.debug("sse client went away", path=request.path, sent=sent)
    note_code(request, grpc.StatusCode.CANCELLED.value[0])
    return response if response is not None else web.Response(status=499)


async def _close(messages: AsyncIterator[Message], pending: asyncio.Future[Message] | None) -> None:
    """Stop the servicer's generator: cancel a pending step (the generator ends with it), then
    aclose() so its ``finally`` blocks run if it was suspended at a yield."""
    if pending is not None:
        pending.cancel()
        await asyncio.wait({pending})
        if not pending.cancelled():
            pending.exception()  # retrieved: the stream is over either way
    aclose = getattr(messages, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
