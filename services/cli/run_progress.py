"""``ewms run --progress``: a bar on the terminal, or one JSON line a second for programs.

Both show the same snapshot: events published, settled of the total (done, or dead-lettered),
failed task runs, outputs written, workers running, the rate of settled events (smoothed: an
exponential moving average with a RATE_HALF_LIFE, so one slow second neither halves the rate nor
swings the ETA) and the ETA it gives for the rest. In the JSON lines ``done`` counts the events
done (settled, not dead-lettered), as the summary does; ``done + dead_lettered`` may lag the
bar's count by a second (they come from one reading of the input queue's counters).

The JSON lines go to stderr, never stdout, so they never mix with ``--out -``. Each is one JSON
object on a line of its own with a ``"progress"`` key (``"running"``, then once ``"final"``);
the other lines of stderr (log records, the summary, errors) have no such key.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

MODES = ("auto", "bar", "json", "none")
JSON_INTERVAL = 1.0
BAR_INTERVAL = 0.1
RATE_HALF_LIFE = 10.0  # seconds
BAR_WIDTH = 30


@dataclass
class Snapshot:
    """The counts a progress report shows."""

    published: int = 0
    total: int = 0
    settled: int = 0  # done or dead-lettered (the freshest count: bar, rate, ETA)
    done: int = 0  # settled and not dead-lettered, as one reading of the counters says
    dead_lettered: int = 0
    failed: int = 0
    outputs: int = 0
    workers: int = 0


def resolve_mode(mode: str, no_progress: bool, stream: TextIO) -> str:
    """``auto`` is a bar on a terminal and nothing elsewhere; ``--no-progress`` is ``none``."""
    if no_progress:
        return "none"
    if mode == "auto":
        return "bar" if stream.isatty() else "none"
    return mode


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RateMeter:
    """Events per second of a growing count, exponentially smoothed over time."""

    def __init__(self, half_life: float = RATE_HALF_LIFE) -> None:
        self.half_life = half_life
        self.rate = 0.0
        self._last: tuple[float, int] | None = None
        self._weight = 0.0  # how much of the average is real samples (a fresh meter: none)

    def add(self, now: float, count: int) -> None:
        """Record the count at ``now`` (monotonic seconds)."""
        if self._last is None:
            self._last = (now, count)
            return
        then, before = self._last
        dt = now - then
        if dt <= 0:
            return
        alpha = 1.0 - math.exp(-dt * math.log(2) / self.half_life)
        sample = (count - before) / dt
        # Weighted by how much of the average is real so far, so the first seconds are not
        # dragged towards the meter's initial zero.
        self._weight = self._weight + alpha * (1.0 - self._weight)
        self.rate += (sample - self.rate) * (alpha / self._weight)
        self._last = (now, count)

    def eta(self, remaining: int) -> float | None:
        """Seconds until ``remaining`` more events at the current rate; None if unknown."""
        if remaining <= 0:
            return 0.0
        if self.rate <= 0:
            return None
        return remaining / self.rate


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Draws the bar or prints the JSON lines; a no-op with mode ``none``."""

    def __init__(self, mode: str, started: float, stream: TextIO | None = None) -> None:
        self.mode = mode
        self.started = started
        self.stream = stream or sys.stderr
        self.meter = RateMeter()
        self.last = 0.0
        self._settled = 0
        self._done = 0

    @property
    def bar(self) -> bool:
        return self.mode == "bar"

    @property
    def json(self) -> bool:
        return self.mode == "json"

    def due(self, now: float) -> bool:
        """Whether a report is due (bar: at most 10 a second; JSON: one a second)."""
        if self.mode == "none":
            return False
        return now - self.last >= (JSON_INTERVAL if self.json else BAR_INTERVAL)

    def report(self, snap: Snapshot, *, now: float | None = None, final: bool = False) -> None:
        """Show ``snap`` (a JSON line is printed only when due, or final)."""
        now = time.monotonic() if now is None else now
        # The counts never go back, whichever counter they came from.
        self._settled = max(self._settled, snap.settled)
        self._done = max(self._done, snap.done)
        self.meter.add(now, self._settled)
        if self.mode == "none" or (not final and not self.due(now)):
            return
        self.last = now
        if self.json:
            self.stream.write(json.dumps(self.record(snap, now, final)) + "\n")
        else:
            self.stream.write("\r" + self.line(snap))
            if final:
                self.stream.write("\n")
        self.stream.flush()

    def record(self, snap: Snapshot, now: float, final: bool) -> dict[str, Any]:
        eta = self.meter.eta(snap.total - self._settled)
        return {
            "progress": "final" if final else "running",
            "elapsed": round(now - self.started, 3),
            "published": snap.published,
            "total": snap.total,
            "done": self._done,
            "failed": snap.failed,
            "dead_lettered": snap.dead_lettered,
            "outputs": snap.outputs,
            "workers": snap.workers,
            "rate": round(self.meter.rate, 2),
            "eta_seconds": None if eta is None else round(eta, 1),
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def line(self, snap: Snapshot) -> str:
        total = snap.total
        filled = int(BAR_WIDTH * self._settled / total) if total else BAR_WIDTH
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        eta = format_duration(self.meter.eta(total - self._settled))
        return (
            f"[{bar}] {self._settled}/{total} events · {self.meter.rate:,.0f}/s · ETA {eta} · "
            f"{snap.outputs} outputs · {snap.workers} worker(s) running · {snap.failed} "
            "failure(s) "
        )
