"""The RabbitMQ management HTTP API, as the WMS uses it: per-workflow users and their permissions,
and queue counters.

Each workflow gets one user (``wire.workflow_username``) with a random password and no tags, and
these permissions on the vhost of the WMS's AMQP URL:

- configure ``^$``: nothing -- no declaring, binding, deleting. A passive ``queue.declare`` needs no
  permission at all on RabbitMQ 3.10 (checked empirically, also for other workflows' queues: it
  reveals only whether the queue exists and its counts), so consumers may check their queues.
- write ``^E-<workflow part>$``: publishing through the workflow's exchange only. Not the default
  exchange: RabbitMQ checks write permission on the exchange alone, so ``amq.default`` would reach
  every queue of the vhost. Another workflow's queues are not bound to this exchange, so events
  routed at them come back unroutable.
- read ``^Q-<workflow part>-[0-9a-f]{8}(\\.dead)?$``: consuming (and ``basic.get``, ``queue.purge``)
  the workflow's queues and dead-letter queues only.

When the workflow ends, the write permission goes at once (``^$``: its queues take no new events,
from pilots or anyone holding the credentials) and the user's connections are closed: a channel
caches the permissions it checked until it idles (measured on RabbitMQ 3.10.8: a channel
publishing every 0.1 s kept publishing for 30 s after the change; an idle one was refused after
1 s), so only a new connection is sure to see the change. Clients reconnect and may still read;
the user itself is deleted a short grace period later (``EWMS_QUEUE_CREDENTIAL_GRACE``).

Calls run urllib in a worker thread with a timeout; failures raise
:class:`~services.events.client.QueueError` with the HTTP status and body.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ewms.v1 import queue_pb2
from services.events import wire
from services.events.client import QueueError

DEFAULT_TIMEOUT = 10.0
_WORKFLOW_PART = re.compile(r"[0-9a-f]+-[0-9a-f]{8}")


def vhost_of(amqp_url: str) -> str:
    """The vhost of an AMQP URL (``/%2F`` → ``/``; no path → ``/``, as pika does)."""
    path = urllib.parse.urlsplit(amqp_url).path
    if not path or path == "/":
        return "/"
    return urllib.parse.unquote(path[1:])


def workflow_permissions(workflow_id: str, *, write: bool = True) -> dict[str, str]:
    """The vhost permissions of a workflow's user (see the module docstring); without ``write``,
    those of an ended workflow's."""
    part = workflow_id.removeprefix("WF-")
    if not workflow_id.startswith("WF-") or not _WORKFLOW_PART.fullmatch(part):
        raise ValueError(f"not a workflow id: {workflow_id!r}")
    return {
        "configure": "^$",
        "write": f"^E-{part}$" if write else "^$",
        "read": f"^Q-{part}-[0-9a-f]{{8}}(\\{wire.DEAD_LETTER_SUFFIX})?$",
    }


class RabbitAdmin:
    """A client of the management API with the admin credentials of ``management_url``
    (``http://user:pass@host:15672``), for one vhost."""

    def __init__(
        self, management_url: str, vhost: str = "/", *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        parts = urllib.parse.urlsplit(management_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) management URL: {management_url!r}")
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        self.base_url = urllib.parse.urlunsplit(
            (parts.scheme, netloc, parts.path.rstrip("/"), "", "")
        )
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.vhost = vhost
        self._timeout = timeout

    @classmethod
    def for_amqp_url(
        cls, management_url: str, amqp_url: str, *, timeout: float = DEFAULT_TIMEOUT
    ) -> RabbitAdmin:
        """An admin for the vhost of ``amqp_url``."""
        return cls(management_url, vhost_of(amqp_url), timeout=timeout)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        missing_ok: bool = False,
        reason: str = "",
    ) -> Any:
        """Call the API (``path`` starts with ``/api/``, names already quoted); returns the decoded
        JSON (None for no content, or for 404 with ``missing_ok``). ``reason`` goes to RabbitMQ's
        ``X-Reason`` header (a closed connection's clients see it)."""
        _, result = await asyncio.to_thread(self._request, method, path, body, missing_ok, reason)
        return result

    def _request(
        self, method: str, path: str, body: Any, missing_ok: bool, reason: str = ""
    ) -> tuple[int, Any]:
        """(HTTP status, decoded JSON or None)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Authorization", self._auth)
        if reason:
            request.add_header("X-Reason", reason)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return 404, None
            detail = exc.read()[:1000].decode("utf-8", errors="replace")
            raise QueueError(
                f"RabbitMQ management API: {method} {path} failed with HTTP {exc.code}: {detail}"
            ) from None
        except (OSError, TimeoutError) as exc:
            raise QueueError(
                f"RabbitMQ management API at {self.base_url} unreachable ({method} {path}): {exc}"
            ) from None
        return status, json.loads(raw) if raw.strip() else None

    def _vhost(self) -> str:
        return urllib.parse.quote(self.vhost, safe="")

    @staticmethod
    def _name(name: str) -> str:
        return urllib.parse.quote(name, safe="")

    async def put_user(self, username: str, password: str) -> None:
        """Create the user, or replace its password; no tags (no management access)."""
        await self.request(
            "PUT", f"/api/users/{self._name(username)}", {"password": password, "tags": ""}
        )

    async def set_permissions(
        self, username: str, *, configure: str, write: str, read: str
    ) -> None:
        """Set the user's permissions on the vhost (regular expressions)."""
        await self.request(
            "PUT",
            f"/api/permissions/{self._vhost()}/{self._name(username)}",
            {"configure": configure, "write": write, "read": read},
        )

    async def provision_workflow_user(self, workflow_id: str) -> queue_pb2.QueueCredentials:
        """Create (or reset) the workflow's user with a new random password and its permissions;
        returns its credentials (they do not expire)."""
        permissions = workflow_permissions(workflow_id)
        username = wire.workflow_username(workflow_id)
        password = secrets.token_urlsafe(24)
        await self.put_user(username, password)
        await self.set_permissions(username, **permissions)
        return queue_pb2.QueueCredentials(username=username, password=password)

    async def revoke_workflow_write(self, workflow_id: str) -> bool:
        """Take the write permission of the workflow's user (keeping read); False if there is no
        such user."""
        username = wire.workflow_username(workflow_id)
        if await self.user(username) is None:
            return False
        await self.set_permissions(username, **workflow_permissions(workflow_id, write=False))
        await self.close_connections(username, "the workflow ended: its queues take no new events")
        return True

    async def close_connections(self, username: str, reason: str) -> None:
        """Close every connection of the user now, with ``reason`` (by user name: the connection
        list lags about 5 s behind new connections)."""
        path = f"/api/connections/username/{self._name(username)}"
        await self.request("DELETE", path, missing_ok=True, reason=reason)

    async def delete_user(self, username: str) -> bool:
        """Delete the user (RabbitMQ closes its connections); False if there was none."""
        path = f"/api/users/{self._name(username)}"
        status, _ = await asyncio.to_thread(self._request, "DELETE", path, None, True)
        return status != 404

    async def user(self, username: str) -> dict[str, Any] | None:
        """The user, or None."""
        found: dict[str, Any] | None = await self.request(
            "GET", f"/api/users/{self._name(username)}", missing_ok=True
        )
        return found

    async def permissions(self, username: str) -> dict[str, Any] | None:
        """The user's permissions on the vhost, or None."""
        found: dict[str, Any] | None = await self.request(
            "GET", f"/api/permissions/{self._vhost()}/{self._name(username)}", missing_ok=True
        )
        return found

    async def queue(self, name: str) -> dict[str, Any] | None:
        """A queue's details and counters (refreshed by RabbitMQ every ~5 s), or None."""
        found: dict[str, Any] | None = await self.request(
            "GET", f"/api/queues/{self._vhost()}/{self._name(name)}", missing_ok=True
        )
        return found

    async def exchange(self, name: str) -> dict[str, Any] | None:
        """An exchange's details, or None."""
        found: dict[str, Any] | None = await self.request(
            "GET", f"/api/exchanges/{self._vhost()}/{self._name(name)}", missing_ok=True
        )
        return found

    async def connections(self) -> list[dict[str, Any]]:
        """Open client connections (all vhosts)."""
        found: list[dict[str, Any]] = await self.request("GET", "/api/connections") or []
        return found
