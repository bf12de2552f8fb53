"""The WMS's queue manager: which broker holds a queue, creating a workflow's queues, withdrawing
their broker credentials when the workflow ends (write at once, the rest after a grace period), and
deleting them a retention period after.

What is due is derived from the store each sweep (the workflow's ``deactivated_ts``, and whether
its queues still carry credentials), so a WMS restarted in between still revokes and deletes."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import Mapping, Sequence

import structlog
from google.protobuf import timestamp_pb2

from ewms.v1 import queue_pb2, workflow_pb2
from services.config import DEFAULT_CREDENTIAL_GRACE
from services.errors import FailedPrecondition
from services.wms.queues.broker import Broker
from services.wms.store import QUEUES, Store, Tx

log = structlog.get_logger(__name__)

BACKENDS: Mapping[str, queue_pb2.QueueBackend.ValueType] = {
    "embedded": queue_pb2.QUEUE_BACKEND_EMBEDDED,
    "rabbitmq": queue_pb2.QUEUE_BACKEND_RABBITMQ,
}


def public_amqp_address(url: str) -> str:
    """The AMQP URL without its credentials (clients add the workflow's own)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class QueueManager:
    """Brokers by backend, and the retention sweeper."""

    def __init__(
        self,
        store: Store,
        brokers: Mapping[queue_pb2.QueueBackend.ValueType, Broker],
        default_backend: queue_pb2.QueueBackend.ValueType,
        retention_seconds: int,
        *,
        credential_grace_seconds: int = DEFAULT_CREDENTIAL_GRACE,
    ) -> None:
        self._store = store
        self._brokers = dict(brokers)
        self.default_backend = default_backend
        self._retention = retention_seconds
        self._grace = credential_grace_seconds
        # Ended workflows whose credentials lost write in this process (again after a restart).
        self._write_revoked: set[str] = set()
        self._wake = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the retention sweeper."""
        self._sweeper = asyncio.create_task(self._sweep(), name="queue-retention")

    async def close(self) -> None:
        """Stop the sweeper and close every broker."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for broker in self._brokers.values():
            await broker.close()

    async def problems(self) -> list[str]:
        """Why any backend cannot serve now ([] when all can): for the readiness probe."""
        found = []
        for backend, broker in self._brokers.items():
            problem = await broker.problem()
            if problem:
                name = queue_pb2.QueueBackend.Name(backend).removeprefix("QUEUE_BACKEND_").lower()
                found.append(f"{name} queues: {problem}")
        return found

    def broker(self, queue: queue_pb2.Queue) -> Broker:
        """The broker holding ``queue``."""
        broker = self._brokers.get(queue.backend)
        if broker is None:
            name = queue_pb2.QueueBackend.Name(queue.backend).removeprefix("QUEUE_BACKEND_")
            raise FailedPrecondition(
                f"queue {queue.queue_id} is on the {name.lower()} backend, which this WMS is not "
                "configured for (EWMS_QUEUE_BACKEND)"
            )
        return broker

    async def provision(self, workflow_id: str, queues: Sequence[queue_pb2.Queue]) -> None:
        """Create a new workflow's queues in their broker and put the credentials on them."""
        if not queues:
            return
        creds = await self.broker(queues[0]).provision(workflow_id, queues)
        if creds is not None:
            for q in queues:
                q.credentials.CopyFrom(creds)

    def workflow_ended(self) -> None:
        """A workflow was deactivated: its queues' deletion is now scheduled."""
        self._wake.set()

    async def _sweep(self) -> None:
        """Delete queues of workflows that ended more than the retention period ago; sleep until
        the next one is due or a workflow ends."""
        while True:
            try:
                next_due = await self._delete_due()
            except Exception:
                log.exception("queue retention sweep failed; retrying in a minute")
                next_due = time.time() + 60
            self._wake.clear()
            timeout = None if next_due is None else max(0.0, next_due - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _delete_due(self) -> float | None:
        """Delete what is due; returns when the next deletion is due (None: nothing scheduled)."""

        def ended(tx: Tx) -> list[tuple[workflow_pb2.Workflow, list[queue_pb2.Queue]]]:
            rows = tx.sql.execute(
                "SELECT body FROM workflows WHERE state != 1 AND workflow_id IN "
                "(SELECT workflow_id FROM queues WHERE deleted IS NULL)"
            ).fetchall()
            out = []
            for (body,) in rows:
                wf = workflow_pb2.Workflow.FromString(body)
                queues = [
                    q
                    for _, q in tx.select(QUEUES, [("workflow_id = ?", wf.workflow_id)])
                    if not q.HasField("deleted_ts")
                ]
                out.append((wf, queues))
            return out

        now = time.time()
        next_due: float | None = None
        for wf, queues in await self._store.run(ended, write=False):
            ended_at = wf.deactivated_ts.ToNanoseconds() / 1e9
            due = ended_at + self._retention
            if due > now:
                revoke_due = await self._revoke(wf.workflow_id, queues, ended_at + self._grace, now)
                for when in (due, revoke_due):
                    if when is not None:
                        next_due = when if next_due is None else min(next_due, when)
                continue
            await self._delete(wf.workflow_id, queues)
            log.info(
                "deleted queues after retention",
                workflow_id=wf.workflow_id,
                queues=[q.queue_id for q in queues],
            )
        return next_due

    async def _revoke(
        self, workflow_id: str, queues: list[queue_pb2.Queue], read_due: float, now: float
    ) -> float | None:
        """Withdraw an ended workflow's credentials as far as due: write at once, then, from
        ``read_due``, all (the queues lose their stored credentials: that is the record). Returns
        when the next step is due (None: nothing left)."""
        holding = [q for q in queues if q.credentials.username]
        if not holding:
            return None
        broker = self.broker(holding[0])
        if now < read_due:
            if workflow_id not in self._write_revoked:
                await broker.revoke(workflow_id, read=False)
                self._write_revoked.add(workflow_id)
            return read_due
        await broker.revoke(workflow_id, read=True)
        self._write_revoked.discard(workflow_id)

        def forget(tx: Tx) -> None:
            for q in holding:
                q.ClearField("credentials")
                tx.update(QUEUES, q)

        await self._store.run(forget)
        log.info("revoked queue credentials", workflow_id=workflow_id)
        return None

    async def delete_now(self, workflow_id: str) -> None:
        """Delete a workflow's queues, events and broker credentials now, without waiting for
        the retention period (``ewms run`` on a throw-away data directory)."""

        def live(tx: Tx) -> list[queue_pb2.Queue]:
            return [
                q
                for _, q in tx.select(QUEUES, [("workflow_id = ?", workflow_id)])
                if not q.HasField("deleted_ts")
            ]

        await self._delete(workflow_id, await self._store.run(live, write=False))

    async def _delete(self, workflow_id: str, queues: list[queue_pb2.Queue]) -> None:
        by_backend: dict[int, list[queue_pb2.Queue]] = {}
        for q in queues:
            by_backend.setdefault(q.backend, []).append(q)
        for group in by_backend.values():
            await self.broker(group[0]).delete(workflow_id, group)
        stamp = timestamp_pb2.Timestamp()
        stamp.GetCurrentTime()

        def mark(tx: Tx) -> None:
            for q in queues:
                q.deleted_ts.CopyFrom(stamp)
                q.ClearField("credentials")
                tx.update(QUEUES, q)

        await self._store.run(mark)
