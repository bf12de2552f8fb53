"""``ewms run --in`` and ``ewms events publish --file``: the events file read as a stream, twice,
never held in memory; the one parser of event lines.

A run must refuse a bad line with exit 2 before anything starts, yet must not keep millions of
lines in memory. So the file is read twice: :meth:`InputFile.check` reads every line, checks it
(UTF-8, JSON unless ``--text``, the size limit) and counts it, keeping nothing but the count and
the bad lines' messages (at most MAX_SHOWN_BAD_LINES); :meth:`InputFile.events` then reads it
again while the run publishes. Standard input cannot be read twice: the first pass copies it to a
spool file, which the second pass reads (disk, not memory, grows with the input). A file changed
between the passes (a line that no longer checks, or another number of events) ends the run with
:class:`InputChanged` rather than publish something that was never checked.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from services.cli.workflows import CommandError, UsageError

BOM = b"\xef\xbb\xbf"
SPOOL_CHUNK = 1 << 20
MAX_SHOWN_BAD_LINES = 20


@dataclass(frozen=True)
class Line:
    """One event of the file: its 1-based line number and its payload as published."""

    number: int
    payload: bytes


def byte_count(n: int) -> str:
    return f"{n:,} bytes"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # would be published as Infinity, which is not JSON
        raise ValueError(f"the number {text[:40]} is too large for a JSON number")
    return value


class BadLine(ValueError):
    """A line that cannot be published; ``too_big`` when only its size is wrong."""

    def __init__(self, message: str, *, too_big: bool = False) -> None:
        super().__init__(message)
        self.too_big = too_big


class InputChanged(Exception):
    """The input file changed after it was checked (the run stops publishing)."""


def parse_line(raw: bytes, *, text: bool, max_event_bytes: int | None) -> bytes | None:
    """The payload one line (without its newline) is published as: the raw text with ``text``,
    else its compact JSON; None for a blank line; BadLine (message without the line number) when
    it is not UTF-8, not JSON, or over ``max_event_bytes``."""
    raw = raw.removesuffix(b"\r")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadLine(f"not UTF-8 (byte {exc.start + 1})") from None
    if not line.strip():
        return None
    if text:
        payload = raw
    else:
        try:
            value = json.loads(line, parse_constant=_reject_constant, parse_float=_finite)
        except json.JSONDecodeError as exc:
            raise BadLine(f"{exc.msg} (column {exc.colno})") from None
        except ValueError as exc:
            raise BadLine(str(exc)) from None
        payload = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if max_event_bytes is not None and len(payload) > max_event_bytes:
        # Refused here: the WMS would reject it, or its gRPC limit would, without a line number.
        raise BadLine(f"{byte_count(len(payload))}, {_over(max_event_bytes)}", too_big=True)
    return payload


def _over(max_event_bytes: int) -> str:
    return f"over the limit of {byte_count(max_event_bytes)} (EWMS_MAX_EVENT_BYTES)"


class InputFile:
    """The events of ``--in`` (``-``: stdin), one per non-blank line."""

    def __init__(self, path: str, *, text: bool, max_event_bytes: int | None = None) -> None:
        self.path = path
        self.text = text
        self.max_event_bytes = max_event_bytes
        self.n_events = 0
        self.n_bytes = 0  # the payloads' total size, as published
        self._spool: Path | None = None

    @property
    def name(self) -> str:
        return "stdin" if self.path == "-" else self.path

    def check(self) -> None:
        """Pass 1: check every line and count the events; CommandError (exit 2) naming the bad
        lines, UsageError when the file cannot be read. Keeps no line."""
        bad: list[str] = []
        n_bad = n_too_big = 0
        self.n_events = self.n_bytes = 0
        spool: IO[bytes] | None = None
        try:
            if self.path == "-":
                source = sys.stdin.buffer
                fd, name = tempfile.mkstemp(prefix="ewms-run-stdin-")
                self._spool = Path(name)
                spool = os.fdopen(fd, "wb")
            else:
                source = self._open()
            with source as f:
                for number, raw in enumerate(f, start=1):
                    if spool is not None:
                        spool.write(raw)
                    try:
                        payload = self._parse(number, raw)
                    except BadLine as exc:
                        n_bad += 1
                        n_too_big += exc.too_big
                        if len(bad) < MAX_SHOWN_BAD_LINES:
                            bad.append(f"line {number}: {exc}")
                        continue
                    if payload is not None:
                        self.n_events += 1
                        self.n_bytes += len(payload)
        except OSError as exc:
            self.close()
            raise UsageError(f"cannot read {self.path}: {exc.strerror}") from None
        finally:
            if spool is not None:
                spool.close()
        if n_bad:
            self.close()
            raise self._refusal(bad, n_bad, n_too_big)

    def _refusal(self, bad: list[str], n_bad: int, n_too_big: int) -> CommandError:
        verb = "is" if n_bad == 1 else "are"
        invalid = "not UTF-8 text" if self.text else "not valid JSON"
        over = _over(self.max_event_bytes or 0)
        if not n_too_big:
            what = f"{verb} {invalid}"
        elif n_too_big == n_bad:
            what = f"{verb} {over}"
        else:
            what = f"are {invalid} or are {over}"
        shown = list(bad)
        if n_bad > len(shown):
            shown.append(f"... and {n_bad - len(shown)} more")
        subject = bad[0].split(":")[0] if n_bad == 1 else f"{n_bad} lines"
        return CommandError(f"{self.name}: {subject} {what}; nothing was published", 2, shown)

    def events(self) -> Iterator[Line]:
        """Pass 2: the events with their line numbers, read as they are asked for; InputChanged
        when a line no longer checks or the count differs from pass 1."""
        n = 0
        with self._open() as f:
            for number, raw in enumerate(f, start=1):
                try:
                    payload = self._parse(number, raw)
                except BadLine as exc:
                    raise InputChanged(
                        f"{self.name} changed after it was checked: line {number}: {exc}"
                    ) from None
                if payload is not None:
                    n += 1
                    yield Line(number, payload)
        if n != self.n_events:
            raise InputChanged(
                f"{self.name} changed after it was checked: {n} event(s), not {self.n_events}"
            )

    def payloads(self, numbers: Collection[int]) -> Iterator[bytes]:
        """The payloads of the given line numbers, in file order (for the re-run file)."""
        with self._open() as f:
            for number, raw in enumerate(f, start=1):
                if number in numbers:
                    payload = self._parse_quietly(number, raw)
                    if payload is not None:
                        yield payload

    def close(self) -> None:
        """Remove the spool of stdin, if any."""
        if self._spool is not None:
            self._spool.unlink(missing_ok=True)
            self._spool = None

    def _open(self) -> IO[bytes]:
        try:
            if self._spool is not None:
                return self._spool.open("rb")
            if self.path == "-":
                raise UsageError("standard input can be read only once")
            return Path(self.path).open("rb")
        except OSError as exc:
            raise UsageError(f"cannot read {self.path}: {exc.strerror}") from None

    def _parse(self, number: int, raw: bytes) -> bytes | None:
        raw = raw.removesuffix(b"\n")
        if number == 1:
            raw = raw.removeprefix(BOM)
        return parse_line(raw, text=self.text, max_event_bytes=self.max_event_bytes)

    def _parse_quietly(self, number: int, raw: bytes) -> bytes | None:
        try:
            return self._parse(number, raw)
        except BadLine:
            return None
