"""Schema versions of the WMS store, applied in order; ``PRAGMA user_version`` records the last one.

Objects are stored as serialized protobuf messages (``body``) next to the columns that queries
filter and sort on. Adding a proto field needs no migration; a new filter column does: append a
step here, never edit a released one.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[str, str]] = [
    (
        "workflows, task directives, taskforces and queues",
        """
        CREATE TABLE workflows (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            workflow_id TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL,
            created REAL NOT NULL,
            state INTEGER NOT NULL,
            body BLOB NOT NULL
        );
        CREATE INDEX workflows_by_owner ON workflows (owner, seq);
        CREATE INDEX workflows_by_created ON workflows (created);

        CREATE TABLE task_directives (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id TEXT NOT NULL UNIQUE,
            workflow_id TEXT NOT NULL REFERENCES workflows (workflow_id),
            owner TEXT NOT NULL,
            created REAL NOT NULL,
            body BLOB NOT NULL
        );
        CREATE INDEX task_directives_by_workflow ON task_directives (workflow_id, seq);

        CREATE TABLE taskforces (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            taskforce_uuid TEXT NOT NULL UNIQUE,
            workflow_id TEXT NOT NULL REFERENCES workflows (workflow_id),
            task_id TEXT NOT NULL REFERENCES task_directives (task_id),
            owner TEXT NOT NULL,
            created REAL NOT NULL,
            cluster_location TEXT NOT NULL,
            phase INTEGER NOT NULL,
            priority INTEGER NOT NULL,
            body BLOB NOT NULL
        );
        CREATE INDEX taskforces_by_workflow ON taskforces (workflow_id, seq);
        CREATE INDEX taskforces_by_task ON taskforces (task_id, seq);
        CREATE INDEX taskforces_by_location_phase ON taskforces (cluster_location, phase, priority);

        CREATE TABLE queues (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            queue_id TEXT NOT NULL UNIQUE,
            workflow_id TEXT NOT NULL REFERENCES workflows (workflow_id),
            owner TEXT NOT NULL,
            created REAL NOT NULL,
            alias TEXT NOT NULL,
            body BLOB NOT NULL,
            UNIQUE (workflow_id, alias)
        );
        """,
    ),
    (
        "the embedded broker's events and counters; queues' deletion time",
        """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY,
            queue_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT NOT NULL DEFAULT '',
            dead_ts REAL,
            body BLOB NOT NULL
        );
        CREATE INDEX events_ready ON events (queue_id, seq) WHERE dead_ts IS NULL;
        CREATE INDEX events_dead ON events (queue_id, seq) WHERE dead_ts IS NOT NULL;

        ALTER TABLE queues ADD COLUMN deleted REAL;

        CREATE TABLE queue_counters (
            queue_id TEXT PRIMARY KEY,
            published INTEGER NOT NULL DEFAULT 0,
            acked INTEGER NOT NULL DEFAULT 0
        );
        """,
    ),
    (
        "pilots' latest state and the drain/stop command of each taskforce",
        """
        -- Plain columns (no proto message describes a pilot); written behind by the pilot
        -- registry, together with the taskforces' roll-ups of them.
        CREATE TABLE pilots (
            taskforce_uuid TEXT NOT NULL REFERENCES taskforces (taskforce_uuid),
            worker_id TEXT NOT NULL,
            host TEXT NOT NULL,
            pilot_version TEXT NOT NULL,
            phase INTEGER NOT NULL,
            events_received INTEGER NOT NULL,
            tasks_succeeded INTEGER NOT NULL,
            tasks_failed INTEGER NOT NULL,
            events_published INTEGER NOT NULL,
            last_error TEXT NOT NULL,
            connected INTEGER NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            status_ts REAL,
            PRIMARY KEY (taskforce_uuid, worker_id)
        ) WITHOUT ROWID;

        -- The last drain or stop of each taskforce: pilots connecting later get it too.
        CREATE TABLE pilot_commands (
            taskforce_uuid TEXT PRIMARY KEY,
            command TEXT NOT NULL,
            reason TEXT NOT NULL,
            recorded REAL NOT NULL
        );
        """,
    ),
]
