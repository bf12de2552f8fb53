// Server-Sent Events read with fetch(), because EventSource cannot send the Authorization header.
// The framing (services/wms/http/sse.py): `event: message` per response message with its JSON on
// `data:`; `event: end` when the RPC ends; `event: error` with a google.rpc.Status; `: keep-alive`
// comments while quiet. A dropped stream is reopened with capped, jittered exponential backoff; each
// reopening starts with a fresh snapshot, so the caller resets its state on `snapshot: true`.

import { ApiError, CODE, authHeaders, readJson, reportUnauthenticated } from "./api.js";

const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 30_000;
// The server writes at least a keep-alive every 15 s: silence for this long means a dead connection.
const IDLE_TIMEOUT_MS = 45_000;

// Failures worth another try: the server or the network, not the request.
const RETRY_HTTP = new Set([0, 408, 429, 500, 502, 503, 504]);
const RETRY_CODES = new Set([
  CODE.CANCELLED,
  CODE.UNKNOWN,
  CODE.DEADLINE_EXCEEDED,
  CODE.RESOURCE_EXHAUSTED,
  CODE.ABORTED,
  CODE.INTERNAL,
  CODE.UNAVAILABLE,
]);

/**
 * Follow a server-streaming route until it ends or close() is called.
 * Handlers: onMessage(json), onState("connecting" | "live" | "reconnecting" | "ended" | "failed"),
 * onFatal(ApiError) for an answer that another try would not change (not found, bad request).
 */
export function watch(path, { onMessage, onState = () => {}, onFatal = () => {} }) {
  let closed = false;
  let controller = null;
  let retryTimer = null;
  let backoff = BACKOFF_FIRST_MS;
  let attempt = 0;

  const stop = () => {
    closed = true;
    clearTimeout(retryTimer);
    controller?.abort();
  };

  const fail = (error) => {
    stop();
    onState("failed");
    if (error.httpStatus === 401 || error.code === CODE.UNAUTHENTICATED)
      reportUnauthenticated(error.message);
    else onFatal(error);
  };

  const retry = () => {
    if (closed) return;
    onState("reconnecting");
    const delay = backoff * (0.5 + Math.random() / 2);
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    retryTimer = setTimeout(connect, delay);
  };

  const connect = async () => {
    if (closed) return;
    onState(attempt === 0 ? "connecting" : "reconnecting");
    attempt += 1;
    controller = new AbortController();
    const own = controller;
    let idleTimer = null;
    const touch = () => {
      clearTimeout(idleTimer);
      idleTimer = setTimeout(() => own.abort(), IDLE_TIMEOUT_MS);
    };
    let outcome = "retry";
    try {
      touch();
      const response = await fetch(path, {
        headers: { ...authHeaders(), Accept: "text/event-stream" },
        signal: own.signal,
        cache: "no-store",
      });
      if (!response.ok) {
        const error = new ApiError(response.status, await readJson(response));
        if (!RETRY_HTTP.has(response.status)) return fail(error);
      } else {
        onState("live");
        outcome = await readEvents(response.body, own, touch, (type, data) => {
          if (closed) return "stop";
          if (type === "message") {
            backoff = BACKOFF_FIRST_MS;
            onMessage(JSON.parse(data));
            return null;
          }
          if (type === "end") return "end";
          if (type === "error") {
            let status = null;
            try {
              status = JSON.parse(data);
            } catch {
              status = { code: CODE.UNKNOWN, message: data };
            }
            const error = new ApiError(0, status);
            if (RETRY_CODES.has(error.code)) return "retry";
            fail(error);
            return "stop";
          }
          return null;
        });
      }
    } catch (error) {
      if (closed) return;
      // A dropped connection is expected; anything else (an unreadable message) is worth a note.
      if (error?.name !== "AbortError" && error?.name !== "TypeError")
        console.error("stream failed", error);
      outcome = "retry";
    } finally {
      clearTimeout(idleTimer);
    }
    if (closed || outcome === "stop") return;
    if (outcome === "end") {
      closed = true;
      onState("ended");
      return;
    }
    retry();
  };

  connect();
  return { close: stop };
}

/**
 * Read SSE events from `body` until the stream ends, calling `dispatch(type, data)` for each one;
 * a non-null answer of dispatch stops reading and is returned. Returns "retry" when the server
 * closed the stream without an `end` event.
 */
async function readEvents(body, controller, touch, dispatch) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let type = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return "retry";
      touch();
      buffer += decoder.decode(value, { stream: true });
      let start = 0;
      for (;;) {
        const nl = nextLineEnd(buffer, start);
        if (nl === -1) break;
        const line = buffer.slice(start, nl);
        start = nl + (buffer[nl] === "\r" && buffer[nl + 1] === "\n" ? 2 : 1);
        if (line === "") {
          if (data.length) {
            const answer = dispatch(type || "message", data.join("\n"));
            if (answer !== null) return answer;
          }
          type = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue; // a comment: keep-alive
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let text = colon === -1 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") type = text;
        else if (field === "data") data.push(text);
      }
      buffer = buffer.slice(start);
    }
  } finally {
    // Closes the connection when reading stopped before the server ended it.
    controller.abort();
  }
}

/** Index of the next line end at or after `from`, or -1 when the line is not complete yet (a
 * trailing "\r" may be the first half of "\r\n"). */
function nextLineEnd(buffer, from) {
  for (let i = from; i < buffer.length; i += 1) {
    const c = buffer[i];
    if (c === "\n") return i;
    if (c === "\r") return i + 1 < buffer.length ? i : -1;
  }
  return -1;
}
