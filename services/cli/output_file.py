"""``ewms run --out``: checked before anything starts, opened only when there is something to
write, so a refused or failed run never truncates the results of an earlier one."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

from services.cli.workflows import UsageError


class OutputError(Exception):
    """Writing --out failed (a full disk, a closed pipe): the run cannot deliver its outputs."""


class OutputFile:
    """Where output lines go: a file (``-``: stdout)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] | None = None

    @property
    def name(self) -> str:
        return "stdout" if self.path == "-" else self.path

    @property
    def opened(self) -> bool:
        return self._file is not None

    def check(self) -> None:
        """UsageError when the file cannot be written: a directory, a missing or read-only
        parent, a read-only file."""
        if self.path == "-":
            return
        target = Path(self.path)
        if target.is_dir():
            raise UsageError(f"--out {self.path}: is a directory; name a file in it")
        parent = target.parent
        if not parent.exists():
            raise UsageError(f"--out {self.path}: directory {parent} does not exist")
        if not parent.is_dir():
            raise UsageError(f"--out {self.path}: {parent} is not a directory")
        if target.exists():
            if not os.access(target, os.W_OK):
                raise UsageError(f"--out {self.path}: not writable (permission denied)")
        elif not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(
                f"--out {self.path}: cannot create files in {parent} (permission denied)"
            )

    def write(self, line: str) -> None:
        """Write and flush one line (a line is acked only once it is written)."""
        try:
            out = self.open()
            out.write(line)
            out.flush()
        except OSError as exc:
            raise OutputError(f"cannot write {self.name}: {exc.strerror or exc}") from None

    def open(self) -> IO[str]:
        """The open file, created or truncated now if not yet."""
        if self._file is None:
            try:
                self._file = (
                    sys.stdout if self.path == "-" else open(self.path, "w", encoding="utf-8")  # noqa: SIM115
                )
            except OSError as exc:
                raise OutputError(f"cannot open {self.name}: {exc.strerror or exc}") from None
        return self._file

    def close(self) -> None:
        """Close the file; OutputError if what was buffered cannot be written."""
        out, self._file = self._file, None
        if out is None or out is sys.stdout:
            return
        try:
            out.close()
        except OSError as exc:
            raise OutputError(f"cannot write {self.name}: {exc.strerror or exc}") from None
