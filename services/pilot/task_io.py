"""Events become files and files become events: the task directory of one run, its infile, the
argument placeholders, and the outputs read back (UPSTREAM.md §3.4 and §3.6).

Layout under ``<EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST>/ewms-pilot-data/``::

    data-hub/                               shared by the init task and every task
    init-<hex>/outputs/{stdoutfile,stderrfile}
    <event id>-<attempt>-<hex>/task-io/infile-<event id><ext>, outfile-<event id><ext>, outdir/
    <event id>-<attempt>-<hex>/outputs/{stdoutfile,stderrfile}

Runtimes that map paths (containers) see ``task-io`` at ``/ewms-pilot-data/task-io`` and the data
hub at ``/ewms-pilot-data/data-hub``; the others see host paths.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

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
JSON_TYPE = "application/json"


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


def make_task_dir(
    data_dir: Path, event: queue_pb2.Event, infile_ext: str, outfile_ext: str, maps_paths: bool
) -> TaskPaths:
    """A fresh directory for one run of the task on ``event``."""
    hub = data_hub(data_dir)
    name = event.event_id or "event"
    root = data_dir / f"{name}-{event.attempt}-{secrets.token_hex(3)}"
    task_io = root / "task-io"
    outdir = task_io / "outdir"
    outputs = root / "outputs"
    outdir.mkdir(parents=True)
    outputs.mkdir()
    infile = task_io / f"infile-{name}{infile_ext}"
    outfile = task_io / f"outfile-{name}{outfile_ext}"
    if maps_paths:
        io_seen, hub_seen = CONTAINER_TASK_IO, CONTAINER_DATA_HUB
    else:
        io_seen, hub_seen = str(task_io), str(hub)
    return TaskPaths(
        root=root,
        task_io=task_io,
        infile=infile,
        outfile=outfile,
        outdir=outdir,
        stdout=outputs / "stdoutfile",
        stderr=outputs / "stderrfile",
        hub=hub,
        task_io_seen=io_seen,
        infile_seen=f"{io_seen}/{infile.name}",
        outfile_seen=f"{io_seen}/{outfile.name}",
        outdir_seen=f"{io_seen}/outdir",
        hub_seen=hub_seen,
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


def write_infile(paths: TaskPaths, event: queue_pb2.Event, infile_ext: str) -> int:
    """Write the event's payload to the infile; returns its size. ``.json`` infiles must receive a
    JSON payload; every other extension gets the payload's bytes as they are (text stays text,
    binary stays binary)."""
    payload = event.payload
    if infile_ext == ".json":
        try:
            json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidDataForInfileException(
                f"event {event.event_id}: the infile extension is .json but the payload is not "
                f"JSON ({exc})"
            ) from None
    paths.infile.write_bytes(payload)
    return len(payload)


@dataclass
class StagedIn:
    """A task directory ready to run: its paths, the infile's size, and its stdout and stderr
    files open for the task."""

    paths: TaskPaths
    bytes_in: int
    stdout_fd: int
    stderr_fd: int

    def close(self) -> None:
        """Close the output descriptors if the task never took them."""
        for fd in (self.stdout_fd, self.stderr_fd):
            if fd >= 0:
                os.close(fd)
        self.stdout_fd = self.stderr_fd = -1


def stage_in(
    data_dir: Path, event: queue_pb2.Event, infile_ext: str, outfile_ext: str, maps_paths: bool
) -> StagedIn:
    """Everything before a run, in one call (the pilot runs it in a worker thread): the task
    directory, the infile, and the stdout/stderr files opened."""
    paths = make_task_dir(data_dir, event, infile_ext, outfile_ext, maps_paths)
    size = write_infile(paths, event, infile_ext)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    out = os.open(paths.stdout, flags, 0o644)
    try:
        err = os.open(paths.stderr, flags, 0o644)
    except OSError:
        os.close(out)
        raise
    return StagedIn(paths, size, out, err)


def _output_event(
    path: Path, data: bytes, json_required: bool, input_event: queue_pb2.Event
) -> queue_pb2.Event:
    if json_required:
        try:
            json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidOutputError(f"output {path.name} is not valid JSON ({exc})") from None
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


def read_outputs(
    paths: TaskPaths, outfile_ext: str, max_event_bytes: int, input_event: queue_pb2.Event
) -> tuple[list[queue_pb2.Event], int]:
    """The output events: the outfile (if written), then every file under ``outdir`` in name order
    (each its own event, with header ``filename``). Returns them with their total size."""
    files: list[tuple[Path, bool]] = []
    if paths.outfile.is_file():
        files.append((paths.outfile, outfile_ext == ".json"))
    if paths.outdir.is_dir():
        for dirpath, dirnames, filenames in os.walk(paths.outdir):
            dirnames.sort()
            for name in sorted(filenames):
                file = Path(dirpath) / name
                if file.is_file():
                    files.append((file, file.suffix == ".json"))
    events: list[queue_pb2.Event] = []
    total = 0
    for file, json_required in files:
        size = file.stat().st_size
        if size > max_event_bytes:
            raise OutputTooLargeError(
                f"output {file.name} is {size} bytes, over the event size limit of "
                f"{max_event_bytes} bytes"
            )
        data = file.read_bytes()
        event = _output_event(file, data, json_required, input_event)
        if file.parent != paths.task_io:
            event.headers["filename"] = str(file.relative_to(paths.outdir))
        events.append(event)
        total += size
    return events, total


def remove(root: Path) -> None:
    """Delete a task directory (best effort: a task may have left read-only files)."""
    shutil.rmtree(root, ignore_errors=True)
