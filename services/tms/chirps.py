"""Pilot chirps: what a pilot writes into its job's event log through HTChirp (UPSTREAM.md §3.7),
read back by the TMS so that a pilot that cannot reach the WMS still shows its phase.

With ``EWMS_PILOT_HTCHIRP_DEST=JOB_EVENT_LOG`` each chirp is a GENERIC event (``008``) whose text is
``HTChirpEWMSPilot<Attribute>: <value>``, the value a ClassAd literal: a quoted string
(``HTChirpEWMSPilotStatus: "Tasking"``) or a number (``HTChirpEWMSPilotTasksTotal: 12``). This is
what our pilot writes (services/pilot/chirp.py) and what the original pilot writes; the original
TMS also read unquoted text (``HTChirpEWMSPilotStatus: Tasking``), which is kept as it is.

``apply_chirp`` folds chirps into a worker's ``PilotChirps``, the latest value of each.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias

import classad2  # type: ignore[import-untyped]
import structlog
from google.protobuf import timestamp_pb2

from ewms.v1 import task_manager_service_pb2 as tms_pb2
from ewms.v1 import taskforce_pb2

log = structlog.get_logger(__name__)

PREFIX = "HTChirpEWMSPilot"
ChirpValue: TypeAlias = str | int | float

# The original pilot's statuses (its PilotStatus enum) as our pilot phases.
STATUS_PHASES: dict[str, taskforce_pb2.PilotPhase.ValueType] = {
    "Started": taskforce_pb2.PILOT_PHASE_STARTED,
    "RunningInitCommand": taskforce_pb2.PILOT_PHASE_RUNNING_INIT,
    "AwaitingFirstMessage": taskforce_pb2.PILOT_PHASE_AWAITING_FIRST_EVENT,
    "Tasking": taskforce_pb2.PILOT_PHASE_TASKING,
    "PendingRemainingTasks": taskforce_pb2.PILOT_PHASE_DRAINING,
    "FatalError": taskforce_pb2.PILOT_PHASE_FATAL_ERROR,
    "Done": taskforce_pb2.PILOT_PHASE_DONE,
}
# Chirped counters as TaskCounters fields.
COUNTERS = {
    "TasksTotal": "events_received",
    "TasksSuccess": "tasks_succeeded",
    "TasksFailed": "tasks_failed",
}
TIMESTAMPS = {"StartedTimestamp": "started", "LastUpdatedTimestamp": "last_updated"}
# Chirped but not reported: the WMS keeps a pilot's error's first line only.
UNREPORTED = frozenset({"ErrorTraceback"})
ATTRIBUTES = frozenset({"Status", "Error", *COUNTERS, *TIMESTAMPS, *UNREPORTED})
# The WMS refuses a longer last_error (services.wms.control.pilots.MAX_ERROR_CHARS).
MAX_ERROR_CHARS = 4096

_ATTRIBUTE = re.compile(rf"{PREFIX}([A-Za-z]+)")
_INT = re.compile(r"[+-]?\d+")
_REAL = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


@dataclass(frozen=True)
class Chirp:
    """One chirp: the attribute without its ``HTChirpEWMSPilot`` prefix, and its value."""

    attribute: str
    value: ChirpValue


def chirp_value(text: str) -> ChirpValue:
    """A chirped value: a ClassAd string unquoted, a number as a number, anything else as it is
    (the original TMS kept what did not unquote)."""
    text = text.strip()
    if text.startswith('"'):
        try:
            value: str = classad2.unquote(text)
            return value
        except ValueError:
            return text
    if _INT.fullmatch(text):
        return int(text)
    if _REAL.fullmatch(text):
        return float(text)
    return text


def parse_chirp(info: str) -> Chirp | None:
    """The chirp in a GENERIC event's text, or None if the text is not an EWMS pilot chirp of a
    known attribute (e.g. ``Hello from job 3``, another tool's ulog line)."""
    name, sep, rest = info.partition(":")
    match = _ATTRIBUTE.fullmatch(name.strip())
    if not sep or match is None:
        return None
    attribute = match.group(1)
    if attribute not in ATTRIBUTES:
        log.debug("unknown pilot chirp ignored", info=info[:200])
        return None
    return Chirp(attribute, chirp_value(rest))


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def apply_chirp(chirps: tms_pb2.PilotChirps, chirp: Chirp) -> bool:
    """Fold ``chirp`` into ``chirps``; whether it changed anything. A value of the wrong kind (a
    status no pilot has, a counter that is not a count) is logged and ignored."""
    before = chirps.SerializeToString(deterministic=True)
    attribute, value = chirp.attribute, chirp.value
    if attribute == "Status" and isinstance(value, str) and value in STATUS_PHASES:
        chirps.phase = STATUS_PHASES[value]
    elif attribute == "Error" and isinstance(value, str):
        # As the pilot's own stream reports last_error (services.pilot.failures.first_line), so
        # that both count as one top task error.
        first = value.split("\n", 1)[0]
        if len(first) > MAX_ERROR_CHARS:
            first = first[: MAX_ERROR_CHARS - 1] + "…"
        chirps.last_error = first
    elif attribute in COUNTERS and isinstance(value, int) and value >= 0:
        setattr(chirps.counters, COUNTERS[attribute], value)
    elif attribute in TIMESTAMPS and isinstance(value, (int, float)) and value >= 0:
        getattr(chirps, TIMESTAMPS[attribute]).CopyFrom(_timestamp(float(value)))
    elif attribute in UNREPORTED:
        return False
    else:
        log.warning("pilot chirp with an unexpected value ignored", chirp=attribute, value=value)
        return False
    return chirps.SerializeToString(deterministic=True) != before
