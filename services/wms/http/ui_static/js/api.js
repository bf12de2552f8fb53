// Calls to the WMS's REST gateway with the signed-in user's token. The token lives in this tab's
// sessionStorage only: closing the tab or signing out forgets it.

const TOKEN_KEY = "ewms.token";

export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  },
  set(token) {
    sessionStorage.setItem(TOKEN_KEY, token);
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
  },
};

let unauthenticatedHandler = () => {};

/** Called with the server's message whenever a call answers 401 (an expired or revoked token). */
export function onUnauthenticated(handler) {
  unauthenticatedHandler = handler;
}

export function reportUnauthenticated(message) {
  unauthenticatedHandler(message);
}

/** A failed call: the google.rpc.Status the server answered (or one made up for a network error). */
export class ApiError extends Error {
  constructor(httpStatus, status) {
    const message =
      typeof status?.message === "string" && status.message ? status.message : `HTTP ${httpStatus}`;
    super(message);
    this.name = "ApiError";
    this.httpStatus = httpStatus;
    this.code = typeof status?.code === "number" ? status.code : 0;
    this.violations = fieldViolations(status);
  }
}

// google.rpc.Code numbers.
export const CODE = Object.freeze({
  CANCELLED: 1,
  UNKNOWN: 2,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  ABORTED: 10,
  INTERNAL: 13,
  UNAVAILABLE: 14,
  UNAUTHENTICATED: 16,
});

/** The BadRequest field violations of a Status body, as [{field, description}]. */
export function fieldViolations(status) {
  const out = [];
  for (const detail of Array.isArray(status?.details) ? status.details : []) {
    const list = detail?.field_violations ?? detail?.fieldViolations;
    if (!Array.isArray(list)) continue;
    for (const v of list)
      out.push({ field: String(v?.field ?? ""), description: String(v?.description ?? "") });
  }
  return out;
}

/** The request headers every call carries. */
export function authHeaders() {
  return { Authorization: `Bearer ${session.token}` };
}

/** A path segment, encoded. */
export function seg(value) {
  return encodeURIComponent(value);
}

/** The JSON body of a response, or null when it has none or is not JSON. */
export async function readJson(response) {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return { message: text.slice(0, 500) };
  }
}

/** Call the gateway; the parsed JSON answer, or throws ApiError (after reporting a 401). */
export async function call(method, path, { body, signal } = {}) {
  const headers = { ...authHeaders(), Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error?.name === "AbortError") throw error;
    throw new ApiError(0, {
      code: CODE.UNAVAILABLE,
      message: `cannot reach the WMS: ${error?.message ?? error}`,
    });
  }
  const payload = await readJson(response);
  if (!response.ok) {
    const error = new ApiError(response.status, payload);
    if (response.status === 401) reportUnauthenticated(error.message);
    throw error;
  }
  return payload ?? {};
}

/** GET every page of a list RPC; `key` is the repeated field. Bounded by `maxPages`. */
export async function listAll(path, key, { signal, maxPages = 20 } = {}) {
  const items = [];
  let token = "";
  for (let page = 0; page < maxPages; page += 1) {
    const sep = path.includes("?") ? "&" : "?";
    const url = token ? `${path}${sep}page_token=${encodeURIComponent(token)}` : path;
    const answer = await call("GET", url, { signal });
    items.push(...(answer[key] ?? []));
    token = answer.next_page_token ?? "";
    if (!token) break;
  }
  return items;
}
