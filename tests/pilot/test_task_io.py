"""The pilot's reusable task directories (services/pilot/task_io.py TaskDirs), on the real file
system."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ewms.v1 import queue_pb2
from services.pilot.failures import InvalidDataForInfileException, InvalidOutputError
from services.pilot.task_io import TaskDirs, read_outputs


def event(event_id: str, payload: bytes, attempt: int = 1) -> queue_pb2.Event:
    return queue_pb2.Event(event_id=event_id, payload=payload, attempt=attempt)


def staged_run(dirs: TaskDirs, ev: queue_pb2.Event) -> tuple[Path, Path]:
    """Take a directory for ``ev`` and write its infile; returns (root, infile)."""
    staged = dirs.take(ev)
    staged.write_infile()
    staged.close()
    return staged.paths.root, staged.paths.infile


def test_a_recycled_directory_is_reused_clean_with_the_next_events_infile(tmp_path: Path) -> None:
    data = tmp_path / "ewms-pilot-data"
    dirs = TaskDirs(data, ".in", ".out", maps_paths=False)
    staged = dirs.take(event("EV-1", b"a long first payload"))
    staged.write_infile()
    paths = staged.paths
    assert paths.root == data / "task-1"
    assert paths.infile == paths.task_io / "infile-EV-1.in"
    assert paths.infile.read_bytes() == b"a long first payload"
    os.write(staged.stdout_fd, b"first stdout")
    staged.close()
    # What a task may leave behind: its outfile, outdir files, stray files, a read-only tree, a
    # link to something outside that must survive.
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    paths.outfile.write_text("out")
    (paths.outdir / "sub").mkdir()
    (paths.outdir / "sub" / "x.txt").write_text("x")
    (paths.task_io / "scratch.tmp").write_text("scratch")
    locked = paths.task_io / "locked"
    (locked / "deeper").mkdir(parents=True)
    (locked / "deeper" / "f").write_text("f")
    os.chmod(locked / "deeper", stat.S_IRUSR | stat.S_IXUSR)
    os.chmod(locked, stat.S_IRUSR | stat.S_IXUSR)
    (paths.task_io / "link").symlink_to(outside)
    outputs, size = read_outputs(paths, ".out", 1000, event("EV-1", b""))
    assert [o.payload for o in outputs] == [b"out", b"x"] and size == 4

    dirs.recycle(paths)
    assert sorted(p.name for p in paths.task_io.iterdir()) == ["infile-EV-1.in", "outdir"]
    assert list(paths.outdir.iterdir()) == []
    assert outside.read_text() == "keep me"

    again = dirs.take(event("EV-2", b"short"))
    again.write_infile()
    assert again.paths.root == paths.root  # reused, not a new directory
    assert sorted(p.name for p in again.paths.task_io.iterdir()) == ["infile-EV-2.in", "outdir"]
    assert again.paths.infile.read_bytes() == b"short"  # overwritten in place and truncated
    assert again.paths.stdout.read_bytes() == b""  # emptied for the new run
    again.close()
    assert dirs.pooled == 1


def test_a_task_that_replaces_its_infile_or_outdir_cannot_redirect_the_next_write(
    tmp_path: Path,
) -> None:
    dirs = TaskDirs(tmp_path / "data", ".in", ".out", maps_paths=False)
    staged = dirs.take(event("EV-1", b"one"))
    staged.write_infile()
    staged.close()
    paths = staged.paths
    target = tmp_path / "target.txt"
    target.write_text("untouched")
    paths.infile.unlink()
    paths.infile.symlink_to(target)  # the task swaps its infile for a link
    paths.outdir.rmdir()
    paths.outdir.write_text("not a directory")
    dirs.recycle(paths)
    assert target.read_text() == "untouched"
    assert paths.outdir.is_dir()

    root, infile = staged_run(dirs, event("EV-2", b"two"))
    assert root == paths.root
    assert not infile.is_symlink() and infile.read_bytes() == b"two"
    assert target.read_text() == "untouched"


def test_a_kept_directory_leaves_the_pool_under_its_events_name(tmp_path: Path) -> None:
    data = tmp_path / "ewms-pilot-data"
    dirs = TaskDirs(data, ".in", ".out", maps_paths=False)
    ev = event("EV-9", b"failing", attempt=2)
    staged = dirs.take(ev)
    staged.write_infile()
    os.write(staged.stderr_fd, b"boom\n")
    staged.close()
    kept = dirs.keep(staged.paths, ev)
    assert kept.root.parent == data and kept.root.name.startswith("EV-9-2-")
    assert kept.stderr.read_text() == "boom\n"
    assert kept.infile.read_bytes() == b"failing"
    assert dirs.pooled == 0

    root, _ = staged_run(dirs, event("EV-10", b"next"))
    assert root == data / "task-2"  # a fresh directory: the kept one is not reused
    dirs.close()
    assert sorted(p.name for p in data.iterdir()) == sorted(["data-hub", kept.root.name])


def test_each_event_in_flight_has_its_own_directory_and_close_removes_the_pool(
    tmp_path: Path,
) -> None:
    data = tmp_path / "ewms-pilot-data"
    data.mkdir()
    (data / "task-1").mkdir()  # left by an earlier pilot in the same directory
    dirs = TaskDirs(data, ".in", ".out", maps_paths=True)
    first = dirs.take(event("EV-1", b"1"))
    second = dirs.take(event("EV-2", b"2"))
    assert {first.paths.root.name, second.paths.root.name} == {"task-2", "task-3"}
    assert first.paths.infile_seen == "/ewms-pilot-data/task-io/infile-EV-1.in"
    for staged in (first, second):
        staged.close()
    dirs.recycle(first.paths)
    assert dirs.pooled == 2
    dirs.close()
    assert sorted(p.name for p in data.iterdir()) == ["data-hub", "task-1"]


def test_a_json_infile_refuses_a_payload_that_is_not_json_before_taking_a_directory(
    tmp_path: Path,
) -> None:
    dirs = TaskDirs(tmp_path / "data", ".json", ".json", maps_paths=False)
    with pytest.raises(InvalidDataForInfileException, match="not JSON"):
        dirs.take(event("EV-1", b"{not json"))
    assert dirs.pooled == 0
    _, infile = staged_run(dirs, event("EV-2", b'{"ok": true}'))
    assert infile.read_bytes() == b'{"ok": true}'


def test_outputs_that_are_links_or_not_regular_files_are_refused(tmp_path: Path) -> None:
    dirs = TaskDirs(tmp_path / "data", ".in", ".out", maps_paths=False)
    staged = dirs.take(event("EV-1", b"x"))
    staged.close()
    paths = staged.paths
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the queue")
    paths.outfile.symlink_to(secret)
    with pytest.raises(InvalidOutputError, match="is a symbolic link"):
        read_outputs(paths, ".out", 1000, event("EV-1", b""))
    paths.outfile.unlink()
    os.mkfifo(paths.outdir / "pipe")
    with pytest.raises(InvalidOutputError, match="pipe is not a regular file"):
        read_outputs(paths, ".out", 1000, event("EV-1", b""))
    (paths.outdir / "pipe").unlink()
    (paths.outdir / "a" / "b").mkdir(parents=True)
    (paths.outdir / "a" / "b" / "deep.json").write_text('{"n": 1}')
    (paths.outdir / "top.txt").write_text("top")
    paths.outfile.write_text("main")
    outputs, size = read_outputs(paths, ".out", 1000, event("EV-1", b""))
    assert [(o.headers.get("filename"), o.payload, o.content_type) for o in outputs] == [
        (None, b"main", "text/plain"),
        ("top.txt", b"top", "text/plain"),
        ("a/b/deep.json", b'{"n": 1}', "application/json"),
    ]
    assert size == 4 + 3 + 8


def test_an_event_id_cannot_place_files_outside_the_task_directory(tmp_path: Path) -> None:
    data = tmp_path / "ewms-pilot-data"
    dirs = TaskDirs(data, ".in", ".out", maps_paths=False)
    hostile = event("../../escape/..\x00x", b"payload")
    staged = dirs.take(hostile)
    staged.write_infile()
    staged.close()
    paths = staged.paths
    assert paths.infile.parent == paths.task_io and paths.outfile.parent == paths.task_io
    assert paths.infile.name == "infile-_.._escape_.._x.in"
    assert paths.infile.read_bytes() == b"payload"
    kept = dirs.keep(paths, hostile)
    assert kept.root.parent == data and kept.root.name.startswith("_.._escape_.._x-1-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ewms-pilot-data"]
