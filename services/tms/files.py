"""Keeps the JEL directory of the htcondor scheduler from growing forever: the original TMS's five
file rules with its default expiries (UPSTREAM.md §2.5).

Each pass applies, in order:

1. ``*.tms.jel`` idle longer than ``jel_short`` and not ``in_use`` → gzip (``*.tms.jel.gz``);
2. ``*.tms.jel`` idle longer than ``jel_long`` → gzip, in use or not;
3. ``*.tms.jel.gz`` older than ``jel_archive_delete`` → delete;
4. ``ewms-taskforce-*`` directories idle longer than ``taskforce_dirs`` → ``.tar.gz`` next to
   them, then delete the directory;
5. those tarballs older than ``taskforce_dirs_tar`` → delete.

A directory's age counts its newest entry (recursively) and itself. Archives are written to a
temporary name and renamed into place, so a crash never leaves a truncated archive under the real
name. A failed action is logged and skipped; the next pass tries again.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

DAY = 24 * 3600.0
DEFAULT_INTERVAL = 3600.0
JEL_PATTERN = "*.tms.jel"
JEL_ARCHIVE_PATTERN = "*.tms.jel.gz"
TASKFORCE_DIR_PATTERN = "ewms-taskforce-*"
TASKFORCE_TAR_SUFFIX = ".tar.gz"


@dataclass(frozen=True)
class Expiries:
    """Seconds of idleness (or age) before each rule acts; the original's defaults."""

    jel_short: float = 1 * DAY
    jel_long: float = 7 * DAY
    jel_archive_delete: float = 7 * DAY
    taskforce_dirs: float = 5 * DAY
    taskforce_dirs_tar: float = 5 * DAY

    def __post_init__(self) -> None:
        if self.jel_long < self.jel_short:
            raise ValueError(
                f"JEL expiries: the long expiry ({self.jel_long}s) must be at least the short "
                f"one ({self.jel_short}s)"
            )


class FileManager:
    """Archives and deletes the files of one JEL directory (see the module docstring)."""

    def __init__(
        self,
        job_event_log_dir: Path,
        in_use: Callable[[Path], bool],
        expiries: Expiries = Expiries(),
    ) -> None:
        """``in_use(jel)``: whether a taskforce that has not completed still writes to it."""
        self._dir = job_event_log_dir
        self._in_use = in_use
        self._expiries = expiries

    def run_once(self, now: float | None = None) -> None:
        """One pass of the five rules, as of ``now`` (epoch seconds; default: the clock)."""
        now = time.time() if now is None else now
        e = self._expiries
        for jel in self._older(JEL_PATTERN, e.jel_short, now):
            if not self._jel_in_use(jel):
                self._act("gzip idle job event log", jel, lambda p: _gzip(p, now))
        for jel in self._older(JEL_PATTERN, e.jel_long, now):
            self._act("gzip old job event log", jel, lambda p: _gzip(p, now))
        for archive in self._older(JEL_ARCHIVE_PATTERN, e.jel_archive_delete, now):
            self._act("delete job event log archive", archive, _unlink)
        for directory in self._older(TASKFORCE_DIR_PATTERN, e.taskforce_dirs, now, dirs=True):
            self._act("archive taskforce directory", directory, lambda p: _tar_and_remove(p, now))
        tar_pattern = TASKFORCE_DIR_PATTERN + TASKFORCE_TAR_SUFFIX
        for tarball in self._older(tar_pattern, e.taskforce_dirs_tar, now):
            self._act("delete taskforce directory archive", tarball, _unlink)

    async def run(self, interval: float = DEFAULT_INTERVAL) -> None:
        """A pass every ``interval`` seconds, the file work on a thread. ``in_use`` is asked on
        the event loop (it may read the scheduler's state) before each pass."""
        while True:
            busy = {jel for jel in self._dir.glob(JEL_PATTERN) if self._jel_in_use(jel)}
            manager = FileManager(self._dir, busy.__contains__, self._expiries)
            await asyncio.to_thread(manager.run_once, time.time())
            await asyncio.sleep(interval)

    def _jel_in_use(self, jel: Path) -> bool:
        try:
            return self._in_use(jel)
        except Exception as e:  # an unknown answer keeps the file
            log.error("job event log use unknown; kept", jel=str(jel), error=repr(e))
            return True

    def _older(self, pattern: str, expiry: float, now: float, dirs: bool = False) -> Iterator[Path]:
        for path in sorted(self._dir.glob(pattern)):
            try:
                if path.is_dir() != dirs or path.is_symlink():
                    continue
                newest = _newest_mtime(path) if dirs else path.stat().st_mtime
            except OSError as e:
                log.warning("file skipped", path=str(path), error=str(e))
                continue
            if now - newest > expiry:
                yield path

    @staticmethod
    def _act(what: str, path: Path, action: Callable[[Path], None]) -> None:
        try:
            action(path)
        except OSError as e:
            log.error(f"{what} failed; skipped", path=str(path), error=str(e))
        else:
            log.info(what, path=str(path))


def _newest_mtime(directory: Path) -> float:
    newest = directory.stat().st_mtime
    for root, dirnames, filenames in os.walk(directory):
        for name in [*dirnames, *filenames]:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def _tmp_for(final: Path) -> Path:
    # A dot name that no rule's pattern matches.
    return final.with_name(f".{final.name}.tmp")


def _gzip(jel: Path, now: float) -> None:
    final = jel.with_name(jel.name + ".gz")
    tmp = _tmp_for(final)
    try:
        with jel.open("rb") as source, gzip.open(tmp, "wb") as target:
            shutil.copyfileobj(source, target)
        os.utime(tmp, (now, now))  # archived now: rule 3 counts from here
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    jel.unlink()


def _tar_and_remove(directory: Path, now: float) -> None:
    final = directory.with_name(directory.name + TASKFORCE_TAR_SUFFIX)
    tmp = _tmp_for(final)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(directory, arcname=directory.name)
        os.utime(tmp, (now, now))  # archived now: rule 5 counts from here
        os.replace(tmp, final)
    except tarfile.TarError as e:
        raise OSError(f"tar: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    shutil.rmtree(directory)


def _unlink(path: Path) -> None:
    path.unlink()
