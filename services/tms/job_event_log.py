"""Reading an HTCondor job event log (JEL): the events the TMS uses, parsed by ``htcondor2``.

``JelReader`` reads a JEL in batches (on a worker thread) and turns each event into a ``LogEvent``:
its type, job, time, and for a JOB_HELD event its hold code, subcode and text, for a GENERIC event
the pilot chirp it carries (services/tms/chirps.py). ``EVENT_STATES`` is the original's event → job
state mapping (condor_watch_q's). A corrupt event is logged and skipped, never fatal: a
ULOG_RD_ERROR used to crash-loop the original TMS.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import htcondor2  # type: ignore[import-untyped]
import structlog

from services.tms.chirps import Chirp, parse_chirp
from services.tms.scheduler import (
    COMPLETED,
    HELD,
    IDLE,
    REMOVED,
    RUNNING,
    SUSPENDED,
    JobState,
)

log = structlog.get_logger(__name__)

_EVENT = htcondor2.JobEventType
# The condor_watch_q mapping, as the original: JEL event → the job's new state.
EVENT_STATES: Mapping[int, JobState] = {
    int(_EVENT.SUBMIT): IDLE,
    int(_EVENT.JOB_EVICTED): IDLE,
    int(_EVENT.JOB_UNSUSPENDED): IDLE,
    int(_EVENT.JOB_RELEASED): IDLE,
    int(_EVENT.SHADOW_EXCEPTION): IDLE,
    int(_EVENT.JOB_RECONNECT_FAILED): IDLE,
    int(_EVENT.EXECUTE): RUNNING,
    int(_EVENT.JOB_TERMINATED): COMPLETED,
    int(_EVENT.JOB_HELD): HELD,
    int(_EVENT.JOB_SUSPENDED): SUSPENDED,
    int(_EVENT.JOB_ABORTED): REMOVED,
}
SUBMIT = int(_EVENT.SUBMIT)
GENERIC = int(_EVENT.GENERIC)
CLUSTER_REMOVE = int(_EVENT.CLUSTER_REMOVE)
READ_BATCH = 1000  # events read per thread hop


@dataclass(frozen=True)
class LogEvent:
    """What the TMS uses of one JEL event. ``hold_*``: a JOB_HELD event's HoldReasonCode,
    HoldReasonSubCode and HoldReason. ``chirp``: a GENERIC event's pilot chirp."""

    type: int
    cluster: int
    proc: int
    time: float
    hold_code: int = 0
    hold_subcode: int = 0
    hold_reason: str = ""
    chirp: Chirp | None = None


def _event_time(text: str) -> float:
    # Local time unless the schedd writes UTC ("Z"); JobEvent.timestamp ignores the "Z".
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


def parse_event(event: Mapping[str, Any]) -> LogEvent:
    """A ``htcondor2.JobEvent`` (read as the ClassAd it is) as a LogEvent."""
    # By the raw number: JobEvent.type raises for numbers its enum lacks.
    number = int(event.get("EventTypeNumber", -1))
    chirp = parse_chirp(str(event.get("Info", ""))) if number == GENERIC else None
    return LogEvent(
        type=number,
        cluster=int(event.get("Cluster", -1)),
        proc=int(event.get("Proc", -1)),
        time=_event_time(str(event.get("EventTime", ""))),
        # A held event without a "Code" line reads as code 0 (Unspecified).
        hold_code=int(event.get("HoldReasonCode", 0) or 0),
        hold_subcode=int(event.get("HoldReasonSubCode", 0) or 0),
        hold_reason=str(event.get("HoldReason", "")),
        chirp=chirp,
    )


class JelReader:
    """One JEL, read in batches on a worker thread; the lock keeps a late read and ``close``
    apart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._jel: Any = None

    @property
    def opened(self) -> bool:
        return self._jel is not None

    def read(self) -> list[LogEvent]:
        """The events appended since the last read (at most READ_BATCH); corrupt ones are logged
        and skipped. Nothing while the file does not exist yet (the schedd creates the day's JEL
        at its first submit)."""
        out: list[LogEvent] = []
        with self._lock:
            if self._jel is None:
                if not self.path.exists():
                    return out
                self._jel = htcondor2.JobEventLog(str(self.path))
            events = self._jel.events(stop_after=0)
            for _ in range(READ_BATCH):
                try:
                    out.append(parse_event(next(events)))
                except StopIteration:
                    break
                except (htcondor2.HTCondorException, ValueError, TypeError) as e:
                    # A ULOG_RD_ERROR used to crash-loop the original TMS; the reader resyncs.
                    log.warning("corrupt job event skipped", jel=str(self.path), error=str(e))
        return out

    def close(self) -> None:
        with self._lock:
            if self._jel is not None:
                self._jel.close()
                self._jel = None
