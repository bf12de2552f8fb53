"""Events become files and files become events: the task directory of one run, its infile, the
argument placeholders, and the outputs read back (UPSTREAM.md §3.4 and §3.6).

Layout under ``<EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST>/ewms-pilot-data/``::

    data-hub/                               shared by the init task and every task
    init-<hex>/outputs/{stdoutfile,stderrfile}
    task-<n>/task-io/infile-<event id><ext>, outfile-<event id><ext>, outdir/
    task-<n>/outputs/{stdoutfile,stderrfile}
    <event id>-<attempt>-<hex>/...          a kept task directory (same inside)

Task directories are reused (:class:`TaskDirs`): after a run its directory is emptied of everything
but the infile and goes back to a pool, and the next event renames the infile and overwrites it in
place. A directory per event would create and delete five inodes per task; on the file systems of
batch slots (ext4 and xfs scratch, network file systems) inode creation and deletion cost far more
than the task's own I/O at hundreds of tasks per second. A failed task's directory (every task's,
with ``EWMS_PILOT_KEEP_ALL_TASK_FILES``) is renamed to ``<event id>-<attempt>-<hex>`` and kept.

Runtimes that map paths (containers) see ``task-io`` at ``/ewms-pilot-data/task-io`` and the data
hub at ``/ewms-pilot-data/data-hub``; the others see host paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import secrets
import shlex
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog

from ewms.v1 import queue_pb2
from services.pilot.failures import (
    InvalidDataForInfileException,
    InvalidOutputError,
    OutputTooLargeError,
)

CONTAINER_TASK_IO = "/ewms-pilot-data/task-io"
CONTAINER_DATA_HUB = "/ewms-pilot-data/data-hub"
# The original's placeholders and aliases, plus {{OUTDIR}}.
PLACEHOLDERS = {
    "infile": ("{{INFILE}}", "{{IN_FILE}}"),
    "outfile": ("{{OUTFILE}}", "{{OUT_FILE}}"),
    "data_hub": ("{{DATA_HUB}}", "{{DATAHUB}}"),
    "outdir": ("{{OUTDIR}}", "{{OUT_DIR}}"),
}
log = structlog.get_logger(__name__)

JSON_TYPE = "application/json"
# Infiles larger than this are written in a worker thread instead of on the event loop.
INLINE_WRITE_BYTES = 256 * 1024
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def file_name_part(event_id: str) -> str:
    """The event id as it may appear in a file name: ids are the broker's message ids, which any
    publisher sets, so anything but letters, digits, ``.``, ``_`` and ``-`` becomes ``_`` (no
    ``/``, no leading dot), at most 100 characters."""
    name = _UNSAFE.sub("_", event_id)[:100].lstrip(".")
    return name or "event"


def data_hub(data_dir: Path) -> Path:
    """The shared data hub (created)."""
    hub = data_dir / "data-hub"
    hub.mkdir(parents=True, exist_ok=True)
    return hub


@dataclass(frozen=True)
class TaskPaths:
    """Host paths of one task run and how the task sees them."""

    root: Path  # removed after success unless files are kept
    task_io: Path
    infile: Path
    outfile: Path
    outdir: Path
    stdout: Path
    stderr: Path
    hub: Path
    # As the task sees them.
    task_io_seen: str
    infile_seen: str
    outfile_seen: str
    outdir_seen: str
    hub_seen: str

    def replacements(self) -> dict[str, str]:
        """Placeholder -> task-visible path."""
        values = {
            "infile": self.infile_seen,
            "outfile": self.outfile_seen,
            "data_hub": self.hub_seen,
            "outdir": self.outdir_seen,
        }
        return {ph: values[key] for key, names in PLACEHOLDERS.items() for ph in names}

    def task_env(self) -> dict[str, str]:
        """The variables every task gets (they win over the user's)."""
        return {
            "EWMS_TASK_INFILE": self.infile_seen,
            "EWMS_TASK_OUTFILE": self.outfile_seen,
            "EWMS_TASK_OUTDIR": self.outdir_seen,
            "EWMS_TASK_DATA_HUB_DIR": self.hub_seen,
        }

    def moved(self, root: Path) -> TaskPaths:
        """The same paths after the directory was renamed to ``root`` (as the task saw them)."""

        def rebase(path: Path) -> Path:
            return root / path.relative_to(self.root)

        return dataclasses.replace(
            self,
            root=root,
            task_io=rebase(self.task_io),
            infile=rebase(self.infile),
            outfile=rebase(self.outfile),
            outdir=rebase(self.outdir),
            stdout=rebase(self.stdout),
            stderr=rebase(self.stderr),
        )


@dataclass(frozen=True)
class InitPaths:
    """Host paths of the init task run."""

    root: Path
    stdout: Path
    stderr: Path
    hub: Path
    hub_seen: str


def make_init_dir(data_dir: Path, maps_paths: bool) -> InitPaths:
    """A fresh directory for the init task."""
    hub = data_hub(data_dir)
    root = data_dir / f"init-{secrets.token_hex(4)}"
    (root / "outputs").mkdir(parents=True)
    return InitPaths(
        root=root,
        stdout=root / "outputs" / "stdoutfile",
        stderr=root / "outputs" / "stderrfile",
        hub=hub,
        hub_seen=CONTAINER_DATA_HUB if maps_paths else str(hub),
    )


def build_argv(args: str | list[str], replacements: dict[str, str]) -> list[str]:
    """Split ``args`` like a shell line (or take the words already split), then replace
    placeholders inside each word (so a path with spaces stays one argument). No shell is
    involved unless the user writes one."""
    words = shlex.split(args) if isinstance(args, str) else args
    out = []
    for word in words:
        if "{{" in word:
            for placeholder, value in replacements.items():
                if placeholder in word:
                    word = word.replace(placeholder, value)
        out.append(word)
    return out


def check_infile(event: queue_pb2.Event, infile_ext: str) -> None:
    """``.json`` infiles must receive a JSON payload; every other extension gets the payload's
    bytes as they are (text stays text, binary stays binary)."""
    if infile_ext == ".json":
        try:
            json.loads(event.payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidDataForInfileException(
                f"event {event.event_id}: the infile extension is .json but the payload is not "
                f"JSON ({exc})"
            ) from None


class _Dir:
    """One pooled task directory, with the paths that stay the same from run to run."""

    def __init__(self, root: Path, hub: Path, maps_paths: bool) -> None:
        self.root = root
        self.task_io = root / "task-io"
        self.outdir = self.task_io / "outdir"
        self.stdout = root / "outputs" / "stdoutfile"
        self.stderr = root / "outputs" / "stderrfile"
        self.hub = hub
        if maps_paths:
            self.io_seen, self.hub_seen = CONTAINER_TASK_IO, CONTAINER_DATA_HUB
        else:
            self.io_seen, self.hub_seen = str(self.task_io), str(hub)
        self.infile_name = ""  # the infile's current name in task-io ("" when there is none)

    def paths(self, event: queue_pb2.Event, infile_ext: str, outfile_ext: str) -> TaskPaths:
        """The paths of one run of the task on ``event`` here."""
        name = file_name_part(event.event_id)
        infile_name = f"infile-{name}{infile_ext}"
        outfile_name = f"outfile-{name}{outfile_ext}"
        return TaskPaths(
            root=self.root,
            task_io=self.task_io,
            infile=self.task_io / infile_name,
            outfile=self.task_io / outfile_name,
            outdir=self.outdir,
            stdout=self.stdout,
            stderr=self.stderr,
            hub=self.hub,
            task_io_seen=self.io_seen,
            infile_seen=f"{self.io_seen}/{infile_name}",
            outfile_seen=f"{self.io_seen}/{outfile_name}",
            outdir_seen=f"{self.io_seen}/outdir",
            hub_seen=self.hub_seen,
        )


@dataclass
class StagedIn:
    """A task directory taken for one event: its paths, and its stdout and stderr files open for
    the task. :meth:`write_infile` fills the infile."""

    paths: TaskPaths
    payload: bytes
    stdout_fd: int
    stderr_fd: int

    @property
    def bytes_in(self) -> int:
        """The infile's size."""
        return len(self.payload)

    def write_infile(self) -> None:
        """Write the payload over the infile, in place (no new inode: the directory's previous
        infile was renamed for this event)."""
        fd = os.open(self.paths.infile, _CREATE, 0o644)
        try:
            view = memoryview(self.payload)
            while view:
                view = view[os.write(fd, view) :]
            os.ftruncate(fd, len(self.payload))
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the output descriptors if the task never took them."""
        for fd in (self.stdout_fd, self.stderr_fd):
            if fd >= 0:
                os.close(fd)
        self.stdout_fd = self.stderr_fd = -1


class TaskDirs:
    """The pilot's task directories: taken for an event, then recycled (emptied and reused) or
    kept. Used from the event loop only."""

    def __init__(self, data_dir: Path, infile_ext: str, outfile_ext: str, maps_paths: bool) -> None:
        self.data_dir = data_dir
        self._infile_ext = infile_ext
        self._outfile_ext = outfile_ext
        self._maps_paths = maps_paths
        self._hub: Path | None = None
        self._free: list[_Dir] = []
        self._taken: dict[Path, _Dir] = {}
        self._made = 0

    @property
    def pooled(self) -> int:
        """Directories in the pool (free or taken)."""
        return len(self._free) + len(self._taken)

    def take(self, event: queue_pb2.Event) -> StagedIn:
        """A directory for ``event`` with its infile named (not yet written: see
        :meth:`StagedIn.write_infile`) and its stdout and stderr files open and empty. Raises
        InvalidDataForInfileException for a payload the infile cannot take, OSError when the
        directory cannot be made."""
        check_infile(event, self._infile_ext)
        d = self._free.pop() if self._free else self._make()
        self._taken[d.root] = d
        try:
            paths = d.paths(event, self._infile_ext, self._outfile_ext)
            if d.infile_name and d.infile_name != paths.infile.name:
                with contextlib.suppress(FileNotFoundError):  # the last task removed it
                    os.rename(paths.task_io / d.infile_name, paths.infile)
            d.infile_name = paths.infile.name
            flags = _CREATE | os.O_TRUNC
            out = os.open(paths.stdout, flags, 0o644)
            try:
                err = os.open(paths.stderr, flags, 0o644)
            except OSError:
                os.close(out)
                raise
        except OSError:
            self._drop(d)
            raise
        return StagedIn(paths, event.payload, out, err)

    def recycle(self, paths: TaskPaths) -> None:
        """The run is over and its outputs read: empty the directory of everything but the infile
        and return it to the pool. One that cannot be emptied is removed instead."""
        d = self._taken.pop(paths.root, None)
        if d is None:
            return
        try:
            self._empty(d, paths)
        except OSError as exc:
            log.warning("a task directory could not be emptied; removing it", error=str(exc))
            self._drop(d)
            return
        self._free.append(d)

    def keep(self, paths: TaskPaths, event: queue_pb2.Event) -> TaskPaths:
        """Take the directory out of the pool and keep it as ``<event id>-<attempt>-<hex>``;
        returns the paths under that name (the old ones if it could not be renamed)."""
        self._taken.pop(paths.root, None)
        name = file_name_part(event.event_id)
        root = self.data_dir / f"{name}-{event.attempt}-{secrets.token_hex(3)}"
        try:
            os.rename(paths.root, root)
        except OSError as exc:
            log.warning("a task directory could not be renamed", error=str(exc))
            return paths
        return paths.moved(root)

    def close(self) -> None:
        """Remove every pooled directory (at the pilot's end)."""
        for d in [*self._free, *self._taken.values()]:
            shutil.rmtree(d.root, ignore_errors=True)
        self._free.clear()
        self._taken.clear()

    def _make(self) -> _Dir:
        if self._hub is None:
            self._hub = data_hub(self.data_dir)
        while True:
            self._made += 1
            root = self.data_dir / f"task-{self._made}"
            try:
                root.mkdir()
            except FileExistsError:
                continue  # left by an earlier pilot in the same data directory
            (root / "task-io" / "outdir").mkdir(parents=True)
            (root / "outputs").mkdir()
            return _Dir(root, self._hub, self._maps_paths)

    def _drop(self, d: _Dir) -> None:
        self._taken.pop(d.root, None)
        shutil.rmtree(d.root, ignore_errors=True)

    @staticmethod
    def _empty(d: _Dir, paths: TaskPaths) -> None:
        has_outdir = False
        with os.scandir(paths.task_io) as entries:
            for entry in entries:
                if entry.name == d.infile_name and entry.is_file(follow_symlinks=False):
                    continue
                if entry.name == "outdir" and entry.is_dir(follow_symlinks=False):
                    has_outdir = True
                    with os.scandir(entry.path) as inside:
                        for each in inside:
                            _remove_entry(each)
                    continue
                if entry.name == d.infile_name:
                    d.infile_name = ""  # replaced by something else: made again next time
                _remove_entry(entry)
        if not has_outdir:
            os.mkdir(paths.outdir)


def _remove_entry(entry: os.DirEntry[str]) -> None:
    """Delete a file, link or directory tree a task left (read-only directories too)."""
    if not entry.is_dir(follow_symlinks=False):
        os.unlink(entry.path)
        return
    os.chmod(entry.path, stat.S_IRWXU)
    for dirpath, dirnames, _files in os.walk(entry.path):
        for name in dirnames:  # before os.walk descends into them
            sub = os.path.join(dirpath, name)
            if not os.path.islink(sub):
                os.chmod(sub, stat.S_IRWXU)
    shutil.rmtree(entry.path)


def _output_event(
    name: str, data: bytes, json_required: bool, input_event: queue_pb2.Event
) -> queue_pb2.Event:
    if json_required:
        try:
            json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidOutputError(f"output {name} is not valid JSON ({exc})") from None
        content_type = JSON_TYPE
    else:
        try:
            data.decode()
            content_type = "text/plain"
        except UnicodeDecodeError:
            content_type = "application/octet-stream"
    event = queue_pb2.Event(payload=data, content_type=content_type)
    event.provenance.input_event_id = input_event.event_id
    return event


def _read_output(path: str, name: str, max_event_bytes: int) -> bytes | None:
    """One output file's bytes (None if it does not exist). Links are not followed: a task in a
    sandbox must not publish what the pilot can read and it cannot."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidOutputError(
                f"output {name} is a symbolic link; outputs must be regular files"
            ) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidOutputError(f"output {name} is not a regular file")
        if info.st_size > max_event_bytes:
            raise OutputTooLargeError(
                f"output {name} is {info.st_size} bytes, over the event size limit of "
                f"{max_event_bytes} bytes"
            )
        chunks = []
        size = 0
        while chunk := os.read(fd, max(info.st_size, 65536)):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_event_bytes:  # it grew meanwhile
                raise OutputTooLargeError(
                    f"output {name} is over the event size limit of {max_event_bytes} bytes"
                )
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def read_outputs(
    paths: TaskPaths, outfile_ext: str, max_event_bytes: int, input_event: queue_pb2.Event
) -> tuple[list[queue_pb2.Event], int]:
    """The output events: the outfile (if written), then every file under ``outdir`` in name order
    (each its own event, with header ``filename``). Returns them with their total size. An output
    that is a link or not a regular file is an InvalidOutputError."""
    events: list[queue_pb2.Event] = []
    total = 0
    name = paths.outfile.name
    data = _read_output(str(paths.outfile), name, max_event_bytes)
    if data is not None:
        events.append(_output_event(name, data, outfile_ext == ".json", input_event))
        total += len(data)
    outdir = str(paths.outdir)
    for dirpath, dirnames, filenames in os.walk(outdir):
        dirnames.sort()
        prefix = dirpath[len(outdir) + 1 :]
        for name in sorted(filenames):
            relative = os.path.join(prefix, name) if prefix else name
            data = _read_output(os.path.join(dirpath, name), relative, max_event_bytes)
            if data is None:
                continue  # removed meanwhile
            event = _output_event(relative, data, name.endswith(".json"), input_event)
            event.headers["filename"] = relative
            events.append(event)
            total += len(data)
    return events, total


def remove(root: Path) -> None:
    """Delete a task directory (best effort: a task may have left read-only files)."""
    shutil.rmtree(root, ignore_errors=True)
