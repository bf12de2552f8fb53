"""Reading an HTCondor job event log (JEL): the events the TMS uses, parsed by ``htcondor2``.

``JelReader`` reads a JEL in batches (on a worker thread) and turns each event into a ``LogEvent``:
its type, job, time, and for a JOB_HELD event its hold code, subcode and text, for a
JOB_TERMINATED event its exit code or the signal that killed it, for a GENERIC event the pilot
chirp it carries (services/tms/chirps.py). ``EVENT_STATES`` is the original's event → job
state mapping (condor_watch_q's). A corrupt event is logged and skipped, never fatal: a
ULOG_RD_ERROR used to crash-loop the original TMS.

``htcondor2`` alone loses events around bad text, so the reader watches its byte offset (the one its
pickling support exposes) and repositions it: a corrupt event swallows the events up to the next
"..." line, so reading resumes at the next event header inside what it swallowed; text that is no
event is skipped a line per poll, so the reader goes on at once; the first bytes of an event header
caught while the schedd writes them are consumed as garbage, taking the event with them, so a skip
that ends mid-line is undone until the line is complete. Skipped text is logged with its offset and
(the start of) the text. A log whose first line is garbage (say, zeros after a crash) htcondor2 does
not read at all: it tells a log's format from its first character. That is logged as an error, once.
"""

from __future__ import annotations

import re
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
    JobExit,
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
TERMINATED = int(_EVENT.JOB_TERMINATED)
GENERIC = int(_EVENT.GENERIC)
CLUSTER_REMOVE = int(_EVENT.CLUSTER_REMOVE)
READ_BATCH = 1000  # events (or skipped pieces of text) read per thread hop
# The first line of an event: "005 (123.000.000) 2026-11-21 10:01:00 Job terminated."
EVENT_HEADER = re.compile(rb"^[0-9]{3} \(-?[0-9]+\.-?[0-9]+\.-?[0-9]+\) ", re.MULTILINE)
MAX_SCANNED_BYTES = 1 << 20  # of a corrupt event, searched for the next header
MAX_LOGGED_BYTES = 200


@dataclass(frozen=True)
class LogEvent:
    """What the TMS uses of one JEL event. ``hold_*``: a JOB_HELD event's HoldReasonCode,
    HoldReasonSubCode and HoldReason. ``chirp``: a GENERIC event's pilot chirp. ``job_exit``: a
    JOB_TERMINATED event's ReturnValue, or its TerminatedBySignal when not TerminatedNormally."""

    type: int
    cluster: int
    proc: int
    time: float
    hold_code: int = 0
    hold_subcode: int = 0
    hold_reason: str = ""
    chirp: Chirp | None = None
    job_exit: JobExit | None = None


def _terminated_exit(event: Mapping[str, Any]) -> JobExit:
    if event.get("TerminatedNormally", True):
        return JobExit(exit_code=int(event.get("ReturnValue", 0) or 0))
    return JobExit(signal=int(event.get("TerminatedBySignal", 0) or 0))


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
        job_exit=_terminated_exit(event) if number == TERMINATED else None,
    )


class JelReader:
    """One JEL, read in batches on a worker thread; the lock keeps a late read and ``close``
    apart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._jel: Any = None
        self._unreadable = False

    @property
    def opened(self) -> bool:
        return self._jel is not None

    def read(self) -> list[LogEvent]:
        """The events appended since the last read (at most READ_BATCH); corrupt ones and text
        that is no event are logged and skipped. Nothing while the file does not exist yet (the
        schedd creates the day's JEL at its first submit)."""
        out: list[LogEvent] = []
        with self._lock:
            if self._jel is None:
                if not self.path.exists():
                    return out
                self._jel = htcondor2.JobEventLog(str(self.path))
            for _ in range(READ_BATCH):
                start = self._offset()
                try:
                    out.append(parse_event(next(self._jel.events(stop_after=0))))
                except StopIteration:
                    if not self._skipped(start):
                        break
                except (htcondor2.HTCondorException, ValueError, TypeError) as e:
                    self._corrupt(start, str(e))
        return out

    def _offset(self) -> int:
        return int(self._jel.__getstate__()[1])

    def _move_to(self, offset: int) -> None:
        """Go on reading at ``offset`` (as an unpickled JobEventLog does)."""
        state, _ = self._jel.__getstate__()
        self._jel.close()
        self._jel = htcondor2.JobEventLog.__new__(htcondor2.JobEventLog)
        self._jel.__setstate__((state, offset))

    def _text(self, start: int, end: int) -> bytes:
        with self.path.open("rb") as f:
            f.seek(start)
            return f.read(min(end - start, MAX_SCANNED_BYTES))

    def _skipped(self, start: int) -> bool:
        """After the reader found no event at ``start``: whether a line of text that is no event
        was skipped there (logged; reading goes on). A skip ending mid-line is the start of an
        event being written, undone until the line is complete."""
        end = self._offset()
        if end == start:
            if start == 0 and not self._unreadable:
                self._check_first_line()
            return False
        text = self._text(start, end)
        if not text.endswith(b"\n"):
            self._move_to(start)
            return False
        log.warning(
            "job event log text that is no event skipped",
            jel=str(self.path),
            offset=start,
            text=text[:MAX_LOGGED_BYTES].decode(errors="replace"),
        )
        return True

    def _check_first_line(self) -> None:
        """Log (once) a complete first line that keeps htcondor2 from reading the log."""
        text = self._text(0, MAX_SCANNED_BYTES)
        line_end = text.find(b"\n") + 1
        if line_end and not EVENT_HEADER.match(text):
            self._unreadable = True
            log.error(
                "job event log unreadable: HTCondor cannot tell its format from its first line",
                jel=str(self.path),
                text=text[: min(line_end, MAX_LOGGED_BYTES)].decode(errors="replace"),
            )

    def _corrupt(self, start: int, error: str) -> None:
        """Log the corrupt event at ``start``; go on at the next event header it swallowed."""
        end = self._offset()
        text = self._text(start, end)
        header = EVENT_HEADER.search(text, 1)
        if header is not None:
            text = text[: header.start()]
            self._move_to(start + header.start())
        log.warning(
            "corrupt job event skipped",
            jel=str(self.path),
            offset=start,
            error=error,
            text=text[:MAX_LOGGED_BYTES].decode(errors="replace"),
        )

    def close(self) -> None:
        with self._lock:
            if self._jel is not None:
                self._jel.close()
                self._jel = None
