"""``ewms run`` when things go wrong: every failure says what happened, where, and what to do
next, with the documented exit code; a mistake is refused before anything starts."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import EXAMPLES, Cluster, cli_env, ewms_cmd

RUN_TIMEOUT = 180


@pytest.fixture(autouse=True)
def run_dirs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed run keeps its directory in $TMPDIR: here, the test's own."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


DISK_ON_FIRE = "sh -c 'echo oops: disk on fire >&2; exit 3'"
# Upper-cases each line, but fails (exit 4, with a word on stderr) on a line saying "poison".
POISONABLE = (
    'sh -c \'if grep -q poison "$EWMS_TASK_INFILE"; then echo poisoned line >&2; exit 4; fi; '
    'tr a-z A-Z < "$EWMS_TASK_INFILE" > "$EWMS_TASK_OUTFILE"\''
)


def workflow(tmp_path: Path, task_args: str, **task: Any) -> Path:
    spec = json.loads((EXAMPLES / "text-transform" / "workflow.json").read_text())
    spec["tasks"][0]["task_args"] = task_args
    spec["tasks"][0].update(task)
    path = tmp_path / "workflow.json"
    path.write_text(json.dumps(spec))
    return path


def lines_file(tmp_path: Path, n: int, poison_at: int | None = None) -> Path:
    path = tmp_path / "events.txt"
    path.write_text(
        "".join("poison\n" if i == poison_at else f"line {i}\n" for i in range(1, n + 1))
    )
    return path


def ewms_run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ewms_cmd("run", *args),
        capture_output=True,
        text=True,
        env=cli_env(EWMS_LOG_LEVEL="WARNING", **env),
        timeout=RUN_TIMEOUT,
    )


def run_text_transform(
    out: Path | str, *extra: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """The text-transform example, as it is, writing to ``out``."""
    example = EXAMPLES / "text-transform"
    return ewms_run(
        str(example / "workflow.json"),
        "--in",
        str(example / "events.txt"),
        "--text",
        "--out",
        str(out),
        *extra,
        **env,
    )


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


def test_a_task_that_always_fails_says_why(tmp_path: Path, backend: str) -> None:
    proc = ewms_run(
        str(workflow(tmp_path, DISK_ON_FIRE)),
        "--in",
        str(lines_file(tmp_path, 5)),
        "--text",
        "--out",
        str(tmp_path / "out.txt"),
        "--workers",
        "2",
        EWMS_QUEUE_BACKEND=backend,
    )
    assert proc.returncode == 1, proc.stderr
    no_traceback(proc.stderr)
    assert "5 event(s) in: 0 done, 5 dead-lettered, 0 not settled" in proc.stderr
    assert "5 event(s) dead-lettered: task failed (exit code 3): oops: disk on fire" in proc.stderr
    # The end of the task's stderr, under the error.
    assert re.search(r"stderr \(last 1 line\):\n\s+oops: disk on fire", proc.stderr), proc.stderr


def test_one_poison_event_is_dead_lettered_with_its_line_and_the_rest_complete(
    tmp_path: Path, backend: str
) -> None:
    out = tmp_path / "out.txt"
    events = lines_file(tmp_path, 41, poison_at=17)
    proc = ewms_run(
        str(workflow(tmp_path, POISONABLE)),
        "--in",
        str(events),
        "--text",
        "--out",
        str(out),
        "--workers",
        "2",
        EWMS_QUEUE_BACKEND=backend,
    )
    assert proc.returncode == 1, proc.stderr
    no_traceback(proc.stderr)
    assert len(out.read_text().splitlines()) == 40
    assert "41 event(s) in: 40 done, 1 dead-lettered, 0 not settled; 40 output(s) written" in (
        proc.stderr
    )
    # Listed by its input line, with its error and the end of its stderr.
    listed = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"  {events}:")]
    assert len(listed) == 1, proc.stderr
    assert listed[0].startswith(f"  {events}:17 EV-")
    assert "attempt 3): task failed (exit code 4): poisoned line" in listed[0]
    assert "poisoned line" in proc.stderr.split("task errors:")[1]
    # Its line is ready to run again, and the run's directory (pilot logs) is kept.
    rerun = re.search(r"their input lines are in (\S+):", proc.stderr)
    assert rerun and Path(rerun.group(1)).read_text() == "poison\n"
    kept = re.search(r"run directory kept: (\S+)", proc.stderr)
    assert kept and list(Path(kept.group(1)).glob("tms-local/ewms-taskforce-*/cluster-*/*.err"))


def test_a_failing_event_leaves_the_workers_running_in_a_served_deployment(
    cluster: Any, tmp_path: Path, backend: str
) -> None:
    c: Cluster = cluster(backend)
    c.start_wms()
    c.start_tms(slots=2)
    out = tmp_path / "out.txt"
    run = c.run(
        str(workflow(tmp_path, POISONABLE)),
        "--in",
        str(lines_file(tmp_path, 200, poison_at=3)),
        "--text",
        "--out",
        str(out),
    )
    _, stderr = run.communicate(timeout=RUN_TIMEOUT)
    assert run.returncode == 1, stderr
    assert len(out.read_text().splitlines()) == 199
    assert "200 event(s) in: 199 done, 1 dead-lettered, 0 not settled" in stderr
    assert "attempt 3): task failed (exit code 4): poisoned line" in stderr
    # No worker stopped on the poison: each one drained when the workflow finished.
    assert "fatal error" not in stderr
    # The taskforce's table shows its counters and errors, not only --json.
    (tf,) = c.taskforces()
    shown = subprocess.run(
        ewms_cmd(
            "taskforce", "get", tf.taskforce_uuid, "--wms", c.address, "--data-dir", str(c.data_dir)
        ),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^tasks_failed:\s+3$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^tasks_succeeded:\s+199$", shown.stdout, re.M), shown.stdout
    assert "task failed (exit code 4): poisoned line" in shown.stdout


def test_a_line_over_the_event_size_limit_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    events = tmp_path / "events.txt"
    events.write_text("small\n" + "x" * (20 * 1024 * 1024) + "\nsmall\n")
    out = tmp_path / "out.txt"
    out.write_text("results of an earlier run\n")
    data_dir = tmp_path / "data"
    proc = ewms_run(
        str(EXAMPLES / "text-transform" / "workflow.json"),
        "--in",
        str(events),
        "--text",
        "--out",
        str(out),
        "--data-dir",
        str(data_dir),
    )
    assert proc.returncode == 2, proc.stderr
    no_traceback(proc.stderr)
    assert f"{events}: line 2 is over the limit" in proc.stderr
    assert "nothing was published" in proc.stderr
    assert out.read_text() == "results of an earlier run\n"
    assert not data_dir.exists()  # no WMS was started, so nothing was published


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("missing-dir/out.txt", "missing-dir does not exist"),
        (".", "is a directory"),
    ],
)
def test_an_unwritable_out_is_refused_before_anything_starts(
    tmp_path: Path, out: str, message: str
) -> None:
    data_dir = tmp_path / "data"
    proc = run_text_transform(tmp_path / out, "--data-dir", str(data_dir))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --out "), proc.stderr
    assert message in proc.stderr
    assert not data_dir.exists()


@pytest.mark.parametrize("workers", ["-3", "0"])
def test_a_worker_count_below_one_is_an_error(tmp_path: Path, workers: str) -> None:
    proc = run_text_transform(tmp_path / "out.txt", "--workers", workers)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"error: ewms run: argument --workers: must be at least 1, got {workers} "
        "(see 'ewms run --help')\n"
    )


def test_an_unreachable_rabbitmq_management_api_is_one_error_with_a_hint(
    tmp_path: Path,
) -> None:
    proc = run_text_transform(
        str(tmp_path / "out.txt"),
        EWMS_QUEUE_BACKEND="rabbitmq",
        EWMS_RABBITMQ_MANAGEMENT_URL="http://guest:guest@127.0.0.1:1",
    )
    assert proc.returncode == 6, proc.stderr
    no_traceback(proc.stderr)
    first, hint = proc.stderr.splitlines()
    assert first.startswith("error: RabbitMQ management API at http://127.0.0.1:1 unreachable")
    assert "rabbitmq-plugins enable rabbitmq_management" in hint


def test_a_full_disk_is_reported_as_an_output_error_not_a_lost_wms(tmp_path: Path) -> None:
    proc = run_text_transform("/dev/full")
    assert proc.returncode == 1, proc.stderr
    no_traceback(proc.stderr)
    assert "error: cannot write /dev/full: No space left on device" in proc.stderr
    assert "lost the WMS" not in proc.stderr
