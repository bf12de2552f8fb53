"""Taskforce phase changes as the WMS records them: every attempt, successful or not, is an entry
of ``Taskforce.phase_change_log``; a successful one also sets the phase."""

from __future__ import annotations

import time

from google.protobuf import timestamp_pb2

from ewms.v1 import taskforce_pb2


def now_ts() -> timestamp_pb2.Timestamp:
    """The current time as a Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def log_phase(
    tf: taskforce_pb2.Taskforce,
    target: taskforce_pb2.TaskforcePhase.ValueType,
    *,
    ok: bool,
    source: str,
    context: str,
    when: timestamp_pb2.Timestamp | None = None,
    source_event_time: timestamp_pb2.Timestamp | None = None,
) -> None:
    """Record a phase change attempt (at ``when``, default now), and make it if it succeeded.
    ``source_event_time`` is when its cause happened at its source (e.g. a job event log)."""
    entry = tf.phase_change_log.add(
        target_phase=target,
        timestamp=when if when is not None else now_ts(),
        was_successful=ok,
        source_entity=source,
        context=context,
    )
    if source_event_time is not None:
        entry.source_event_time.CopyFrom(source_event_time)
    if ok:
        tf.phase = target
