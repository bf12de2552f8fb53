"""The WMS's durable state: one SQLite database (WAL) in the data directory.

All access goes through one dedicated thread, so the event loop never blocks on SQLite and every
``Store.run`` call is one serialized transaction: domain code writes plain synchronous functions of
a ``Tx`` and gets atomicity for free.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from ewms.v1 import queue_pb2, taskforce_pb2, workflow_pb2
from services.private_files import PRIVATE_FILE, private_dir, private_file, tighten
from services.wms.metrics import WmsMetrics
from services.wms.migrations import MIGRATIONS

DB_FILE = "wms.sqlite3"
# Files SQLite keeps beside the database (WAL mode uses the first two).
SIDE_FILE_SUFFIXES = ("-wal", "-shm", "-journal")

M = TypeVar("M", bound=Message)
T = TypeVar("T")


class StoreVersionError(RuntimeError):
    """The database was written by a newer WMS."""


@dataclass(frozen=True)
class Table(Generic[M]):
    """How one message type is stored: its table, id column and the columns derived from it."""

    name: str
    key: str
    message: type[M]
    columns: Callable[[M], dict[str, Any]]


def _workflow_state(wf: workflow_pb2.Workflow) -> int:
    # Deactivation none/ABORTED/FINISHED (0/1/2) maps onto WorkflowState ACTIVE/ABORTED/FINISHED.
    return int(wf.deactivated) + 1


WORKFLOWS: Table[workflow_pb2.Workflow] = Table(
    "workflows",
    "workflow_id",
    workflow_pb2.Workflow,
    lambda wf: {
        "workflow_id": wf.workflow_id,
        "owner": wf.owner,
        "created": wf.timestamp.ToNanoseconds() / 1e9,
        "state": _workflow_state(wf),
    },
)
TASK_DIRECTIVES: Table[workflow_pb2.TaskDirective] = Table(
    "task_directives",
    "task_id",
    workflow_pb2.TaskDirective,
    lambda td: {
        "task_id": td.task_id,
        "workflow_id": td.workflow_id,
        "created": td.timestamp.ToNanoseconds() / 1e9,
    },
)
TASKFORCES: Table[taskforce_pb2.Taskforce] = Table(
    "taskforces",
    "taskforce_uuid",
    taskforce_pb2.Taskforce,
    lambda tf: {
        "taskforce_uuid": tf.taskforce_uuid,
        "workflow_id": tf.workflow_id,
        "task_id": tf.task_id,
        "created": tf.timestamp.ToNanoseconds() / 1e9,
        "cluster_location": tf.cluster_location,
        "phase": int(tf.phase),
        "priority": tf.priority,
    },
)
QUEUES: Table[queue_pb2.Queue] = Table(
    "queues",
    "queue_id",
    queue_pb2.Queue,
    lambda q: {
        "queue_id": q.queue_id,
        "workflow_id": q.workflow_id,
        "alias": q.alias,
        "deleted": q.deleted_ts.ToNanoseconds() / 1e9 if q.HasField("deleted_ts") else None,
    },
)


class Tx:
    """Typed access to the tables inside one transaction (valid only inside ``Store.run``)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @property
    def sql(self) -> sqlite3.Connection:
        """The raw connection, for tables that are not message tables (the embedded broker's)."""
        return self._conn

    def insert(self, table: Table[M], msg: M, *, owner: str, created: float = 0.0) -> None:
        """Insert a new object; ``owner`` is the owning workflow's owner."""
        cols = {"owner": owner, "created": created, **table.columns(msg)}
        cols["body"] = msg.SerializeToString()
        names = ", ".join(cols)
        marks = ", ".join("?" * len(cols))
        self._conn.execute(
            f"INSERT INTO {table.name} ({names}) VALUES ({marks})", list(cols.values())
        )

    def update(self, table: Table[M], msg: M) -> None:
        """Replace a stored object (its owner never changes)."""
        cols = table.columns(msg)
        key = cols.pop(table.key)
        cols["body"] = msg.SerializeToString()
        sets = ", ".join(f"{c} = ?" for c in cols)
        cur = self._conn.execute(
            f"UPDATE {table.name} SET {sets} WHERE {table.key} = ?", [*cols.values(), key]
        )
        if cur.rowcount != 1:
            raise KeyError(f"{table.name}: no {key}")

    def get(self, table: Table[M], key: str, owner: str | None = None) -> M | None:
        """One object by id; None if missing or (when ``owner`` is given) owned by someone else."""
        sql = f"SELECT body FROM {table.name} WHERE {table.key} = ?"
        params: list[Any] = [key]
        if owner is not None:
            sql += " AND owner = ?"
            params.append(owner)
        row = self._conn.execute(sql, params).fetchone()
        return None if row is None else _parse(table, row[0])

    def select(
        self,
        table: Table[M],
        conditions: Sequence[tuple[str, Any]] = (),
        *,
        after_seq: int = 0,
        limit: int | None = None,
    ) -> list[tuple[int, M]]:
        """Objects matching every condition (SQL fragments written in code, values bound), in
        creation order, after ``after_seq``; each with its sequence number for page tokens."""
        where = ["seq > ?", *(c for c, _ in conditions)]
        params: list[Any] = [after_seq]
        for _, value in conditions:
            # A list or tuple binds several placeholders (``phase IN (?, ?)``).
            params.extend(value) if isinstance(value, list | tuple) else params.append(value)
        sql = f"SELECT seq, body FROM {table.name} WHERE {' AND '.join(where)} ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [(seq, _parse(table, body)) for seq, body in self._conn.execute(sql, params)]


def _parse(table: Table[M], body: bytes) -> M:
    msg = table.message()
    msg.ParseFromString(body)
    return msg


class Store:
    """The WMS database. Open with ``await Store.open(data_dir)``; close with ``await close()``."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        metrics: WmsMetrics | None = None,
    ) -> None:
        self._conn = conn
        self._executor = executor
        self._tx = Tx(conn)
        self._closed = False
        seconds = (metrics or WmsMetrics()).store_transaction_seconds
        self._seconds = {False: seconds.labels("read"), True: seconds.labels("write")}

    @classmethod
    async def open(cls, data_dir: Path, metrics: WmsMetrics | None = None) -> Store:
        """Open (creating and migrating as needed) the database in ``data_dir``; its transactions
        are timed into ``metrics``."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wms-store")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, data_dir / DB_FILE)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(conn, executor, metrics)

    async def run(self, fn: Callable[[Tx], T], *, write: bool = True) -> T:
        """Run ``fn`` in the store's thread: in one IMMEDIATE transaction when ``write``, else as a
        plain read."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._timed, fn, write)

    def _timed(self, fn: Callable[[Tx], T], write: bool) -> T:
        started = time.perf_counter()
        try:
            return self._call(fn, write)
        finally:
            self._seconds[write].observe(time.perf_counter() - started)

    def _call(self, fn: Callable[[Tx], T], write: bool) -> T:
        if not write:
            return fn(self._tx)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self._tx)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return result

    async def problems(self) -> list[str]:
        """Why the store cannot serve now ([] when it can): for the readiness probe."""
        if self._closed:
            return ["store: closed"]
        try:
            await asyncio.wait_for(
                self.run(lambda tx: tx.sql.execute("SELECT 1").fetchone(), write=False), 5.0
            )
        except Exception as exc:
            return [f"store: {exc!r}"]
        return []

    async def close(self) -> None:
        """Close the database and its thread; closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=True)


def _connect(path: Path) -> sqlite3.Connection:
    # Private: event payloads and broker credentials. SQLite gives the side files it creates the
    # database's mode, but leaves ones a crash left behind as they were.
    private_dir(path.parent)
    private_file(path)
    for suffix in SIDE_FILE_SUFFIXES:
        tighten(path.with_name(path.name + suffix), PRIVATE_FILE)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a commit is on disk before the RPC answers, so an acknowledged change survives a crash
    # of the machine, not only of the process.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 5000")
    try:
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations; returns the schema version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StoreVersionError(
            f"database schema version {version} is newer than this WMS knows "
            f"({len(MIGRATIONS)}); upgrade ewms"
        )
    for number, (_, sql) in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.executescript(f"BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {number}; COMMIT;")
    return len(MIGRATIONS)
