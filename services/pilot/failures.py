"""Why a task run failed. Class names matter: ``EWMS_PILOT_OKAY_ERRORS`` lists them (any class in
an error's hierarchy matches, so ``ContainerRunError`` also covers timeouts), as in the original.

The error text of a failed run comes from its stderr (UPSTREAM.md §3.5): a first line with the
last Python traceback's exception line, else the last non-empty line that is not Apptainer's own
logging, else Apptainer's last log line; then the last lines of stderr (:func:`stderr_excerpt`).
The whole text goes with the nacked event (its dead letter, the task's FAILED event); only the
first line (:attr:`TaskError.summary`) is the pilot's last error, which the WMS groups pilots by.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# Enough of stderr's end to hold a long traceback.
STDERR_TAIL_BYTES = 64 * 1024
APPTAINER_LOG = re.compile(r"^(INFO|WARNING|ERROR|FATAL|DEBUG|VERBOSE):\s")
TRACEBACK = "Traceback (most recent call last):"
# The end of stderr carried in an error text: enough for a traceback's last frames, and small
# enough to fit the brokers' error fields (4 KiB) with the first line (at most DETAIL_CHARS).
EXCERPT_LINES = 10
EXCERPT_LINE_CHARS = 200
EXCERPT_BYTES = 2048
# The first line's detail from stderr (a task may print one huge line).
DETAIL_CHARS = 1000


class TaskError(Exception):
    """A task run failed; the event is nacked with ``str(error)``."""

    # Whether the event can never succeed, so it is dead-lettered at once.
    dead_letter = False

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.message = message
        # The run's measurements (a runner.RunResult) when the task ran at all.
        self.result = result

    def __str__(self) -> str:
        return self.message

    @property
    def summary(self) -> str:
        """The error's first line, without the stderr excerpt: what the pilot reports as its last
        error, so that pilots failing the same way are counted together."""
        return first_line(self.message)

    def matches(self, names: frozenset[str]) -> bool:
        """Whether any class of this error's hierarchy is named in ``names``."""
        return any(cls.__name__ in names for cls in type(self).__mro__)


class ContainerRunError(TaskError):
    """The task (or init task) exited non-zero, was killed, or could not start."""


class TaskTimeoutError(ContainerRunError):
    """The task ran longer than its timeout and was killed with its whole process group."""


class InvalidDataForInfileException(TaskError):
    """The event's payload cannot be written as the infile (not JSON for a ``.json`` infile)."""

    dead_letter = True


class OutputTooLargeError(TaskError):
    """An output file is over the event size limit."""


class InvalidOutputError(TaskError):
    """An output file breaks its extension's rule (a ``.json`` file that is not JSON)."""


class OutputPublishError(TaskError):
    """The outputs could not be published; the input is nacked so it runs again."""


class WorkflowEndedError(TaskError):
    """The workflow was finished or aborted while the task ran: its outputs have nowhere to go.
    Not the task's fault, so it never stops the pilot as a task error would; the pilot drains."""


class PilotStopped(TaskError):
    """The pilot stopped (drain grace over, or told to stop) before the task finished."""


def first_line(text: str) -> str:
    """The first line of an error text."""
    return text.split("\n", 1)[0]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stderr_excerpt(stderr: str) -> str:
    """The last non-empty lines of ``stderr`` (at most EXCERPT_LINES, each cut to
    EXCERPT_LINE_CHARS, at most EXCERPT_BYTES of them in all), to append to an error text: a new
    line ``stderr (last N lines):``, then each line indented by two spaces. Empty when stderr
    is."""
    kept: list[str] = []
    size = 0
    for line in reversed(stderr.splitlines()):
        text = line.rstrip()
        if not text.strip():
            continue
        text = _cut(text, EXCERPT_LINE_CHARS)
        size += len(text.encode(errors="replace"))
        if size > EXCERPT_BYTES or len(kept) == EXCERPT_LINES:
            break
        kept.append(text)
    if not kept:
        return ""
    kept.reverse()
    count = "1 line" if len(kept) == 1 else f"{len(kept)} lines"
    return f"\nstderr (last {count}):\n" + "\n".join(f"  {line}" for line in kept)


def extract_error(stderr: str) -> str:
    """The most useful line of a failed run's stderr (cut to DETAIL_CHARS)."""
    return _cut(_most_useful_line(stderr), DETAIL_CHARS)


def _most_useful_line(stderr: str) -> str:
    lines = stderr.splitlines()
    start = None
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(TRACEBACK):
            start = i
            break
    if start is not None:
        for line in lines[start + 1 :]:
            if line.strip() and not line[0].isspace():
                return line.strip()
    apptainer_line = ""
    for line in reversed(lines):
        text = line.strip()
        if not text:
            continue
        if APPTAINER_LOG.match(text):
            apptainer_line = apptainer_line or text
            continue
        return text
    if apptainer_line:
        return f"[Apptainer-Error] {apptainer_line}"
    return ""


def stderr_tail(path: Path) -> str:
    """The end of a stderr file, decoded leniently."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - STDERR_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
