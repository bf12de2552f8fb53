"""The output events ``ewms run`` has written, so that a redelivered one is not written twice.

A queue delivers at least once: an output whose ack did not take (a lease that expired while it
waited, a pilot's publish retried after a channel error) comes again, with the same event id. The
ids of every output written are needed to drop those, and a run may write millions: they are kept
in a scratch SQLite file, not in memory (SQLite's page cache, a few MiB, is all it holds). The
file is scratch: no journal, no fsync; it is deleted when the run ends. One ``INSERT OR IGNORE``
per output both asks and records; commits are batched.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

COMMIT_EVERY = 1000
CACHE_KIB = 2048


class SeenOutputs:
    """A set of event ids on disk."""

    def __init__(self, directory: Path | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="ewms-run-seen-", dir=directory))
        self._db = sqlite3.connect(self._dir / "seen.sqlite3", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._db.execute("CREATE TABLE seen (event_id TEXT PRIMARY KEY) WITHOUT ROWID")
        self._db.execute("BEGIN")
        self._pending = 0

    def add(self, event_id: str) -> bool:
        """Record the id; False if it was already there (a duplicate)."""
        cur = self._db.execute("INSERT OR IGNORE INTO seen (event_id) VALUES (?)", (event_id,))
        self._pending += 1
        if self._pending >= COMMIT_EVERY:
            self._db.execute("COMMIT")
            self._db.execute("BEGIN")
            self._pending = 0
        return cur.rowcount == 1

    def close(self) -> None:
        """Close and delete the file. Idempotent."""
        if self._db is not None:
            self._db.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._db = None  # type: ignore[assignment]
