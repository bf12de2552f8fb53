"""How many deliveries a pilot holds: more when its tasks are short.

A held delivery beyond those its slots run is work another pilot cannot start, so the default
prefetch is small (3 * concurrency + 1: per slot one running, one staged, one being published and
acked). Short tasks need more: a finished task's outputs linger to be published with others'
(``EWMS_PILOT_PUBLISH_LINGER``), and every event lingering keeps a delivery out. So, unless
``EWMS_PILOT_PREFETCH`` fixes it, the pilot holds besides the base about ``HOLD_SECONDS`` of its
own work, measured on its recent tasks: a pilot of 3 ms tasks holds about 20 more, one of 1 s tasks
none. Held events beyond the base thus delay other pilots by ``HOLD_SECONDS`` at most.
"""

from __future__ import annotations

import math
import statistics

# Work held beyond the base, in seconds of this pilot's tasks.
HOLD_SECONDS = 0.05
# Tasks between two decisions: their median length decides (a few stalled tasks do not).
WINDOW = 16
# Never more than this many held beyond the base per slot, nor in all, whatever the tasks: past
# about a dozen per slot, batches are as large as the linger makes them (bench/e2e.py: the same
# rate at 16 as at 64 for 2 ms tasks), and a cap keeps noisy short lengths from moving it.
MAX_EXTRA_PER_SLOT = 12
MAX_PREFETCH = 64


def base_prefetch(concurrency: int) -> int:
    """The default prefetch before any task was measured."""
    return 3 * concurrency + 1


class AdaptivePrefetch:
    """Feed it each finished task's wall time; it says when the prefetch should change."""

    def __init__(self, concurrency: int, current: int) -> None:
        self._concurrency = concurrency
        self._base = base_prefetch(concurrency)
        self.current = current
        self._lengths: list[float] = []

    def target(self, mean_seconds: float) -> int:
        """The prefetch for tasks taking ``mean_seconds`` each."""
        c = self._concurrency
        extra = min(math.ceil(c * HOLD_SECONDS / max(mean_seconds, 1e-4)), MAX_EXTRA_PER_SLOT * c)
        return max(self._base, min(MAX_PREFETCH, self._base + extra))

    def observe(self, wall_seconds: float) -> int | None:
        """A task ran this long; returns the new prefetch when it should change, else None.
        Every ``WINDOW`` tasks it compares the target for their median length with the current
        prefetch: it grows by half or more, and shrinks only to a third or less (tasks that got
        much longer), so that the noise of task lengths does not flap it."""
        self._lengths.append(wall_seconds)
        if len(self._lengths) < WINDOW:
            return None
        median = statistics.median(self._lengths)
        self._lengths.clear()
        target = self.target(median)
        if target >= self.current * 1.5 or target <= self.current / 3:
            self.current = target
            return target
        return None
