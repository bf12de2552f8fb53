"""``ewms run`` end to end: the examples on both queue backends, a TMS killed mid-run, abort,
memory holds and the location capacity, with the real WMS, TMS, pilots and tasks."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from ewms.v1 import taskforce_pb2
from services.events.wire import workflow_username
from tests.conftest import RABBITMQ_MANAGEMENT_URL, require_rabbitmq
from tests.e2e.conftest import EXAMPLES, Cluster, cli_env, ewms_cmd, pid_alive, wait_for

Phase = taskforce_pb2.TaskforcePhase
RUN_TIMEOUT = 180


@pytest.fixture(autouse=True)
def run_dirs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed run keeps its directory in $TMPDIR: here, the test's own."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def run_example(
    name: str, infile: str, tmp_path: Path, backend: str, *extra: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / f"{name}.out"
    proc = subprocess.run(
        ewms_cmd(
            "run",
            str(EXAMPLES / name / "workflow.json"),
            "--in",
            str(EXAMPLES / name / infile),
            "--out",
            str(out),
            "--workers",
            "2",
            *extra,
        ),
        capture_output=True,
        text=True,
        env=cli_env(EWMS_QUEUE_BACKEND=backend, EWMS_LOG_LEVEL="WARNING"),
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, out


def text_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_text_transform(tmp_path: Path, backend: str) -> None:
    proc, out = run_example("text-transform", "events.txt", tmp_path, backend, "--text")
    events = text_lines(EXAMPLES / "text-transform" / "events.txt")
    assert sorted(text_lines(out)) == sorted(e.upper() for e in events)
    n = len(events)
    assert (
        f"{n} event(s) in: {n} done, 0 dead-lettered, 0 not settled; {n} output(s) written\n"
        in (proc.stderr)
    )


def test_run_serves_http_on_a_free_port_while_8080_is_taken(tmp_path: Path) -> None:
    # Hold the default HTTP port (or find it held already): a run must not need it.
    holder = socket.socket()
    with contextlib.suppress(OSError):
        holder.bind(("127.0.0.1", 8080))
        holder.listen()
    with holder:
        _, out = run_example("text-transform", "events.txt", tmp_path, "embedded", "--text")
    assert len(text_lines(out)) == len(text_lines(EXAMPLES / "text-transform" / "events.txt"))


def rabbitmq_users() -> set[str]:
    mgmt = urllib.parse.urlsplit(RABBITMQ_MANAGEMENT_URL)
    request = urllib.request.Request(f"{mgmt.scheme}://{mgmt.hostname}:{mgmt.port}/api/users")
    creds = base64.b64encode(f"{mgmt.username}:{mgmt.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {creds}")
    with urllib.request.urlopen(request, timeout=10) as resp:
        return {u["name"] for u in json.load(resp)}


def test_json_transform_with_an_init_task(tmp_path: Path, backend: str) -> None:
    proc, out = run_example("json-transform", "events.jsonl", tmp_path, backend)
    workflow_id = proc.stderr.strip().splitlines()[-1].split(":")[0]
    assert workflow_id.startswith("WF-")
    if backend == "rabbitmq":
        # The run's data directory was thrown away: so are its broker user and queues.
        assert workflow_username(workflow_id) not in rabbitmq_users()
    events = [json.loads(line) for line in text_lines(EXAMPLES / "json-transform" / "events.jsonl")]
    # The init task wrote gain 2.5 and offset -1.0 to the data hub; each task read them.
    expected = sorted((e["sensor"], round(e["raw"] * 2.5 - 1.0, 9)) for e in events)
    got = sorted((o["sensor"], round(o["value"], 9)) for o in map(json.loads, text_lines(out)))
    assert got == expected


def test_two_task_pipeline(tmp_path: Path, backend: str) -> None:
    _, out = run_example("pipeline", "events.txt", tmp_path, backend, "--text")
    events = text_lines(EXAMPLES / "pipeline" / "events.txt")
    assert sorted(text_lines(out)) == sorted(e.upper()[::-1] for e in events)


def test_dead_lettered_events_make_the_run_fail_and_are_listed(tmp_path: Path) -> None:
    workflow = json.loads((EXAMPLES / "json-transform" / "workflow.json").read_text())
    workflow["tasks"][0]["max_attempts"] = 1
    (tmp_path / "wf.json").write_text(json.dumps(workflow))
    (tmp_path / "in.jsonl").write_text('{"sensor": "a", "raw": 1}\n{"no_sensor": true}\n')
    proc = subprocess.run(
        ewms_cmd(
            "run",
            str(tmp_path / "wf.json"),
            "--in",
            str(tmp_path / "in.jsonl"),
            "--out",
            str(tmp_path / "out.jsonl"),
        ),
        capture_output=True,
        text=True,
        env=cli_env(EWMS_LOG_LEVEL="WARNING"),
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 1, proc.stderr
    assert "2 event(s) in: 1 done, 1 dead-lettered, 0 not settled; 1 output(s) written" in (
        proc.stderr
    )
    assert "dead-lettered events:" in proc.stderr
    assert "KeyError" in proc.stderr
    assert len(text_lines(tmp_path / "out.jsonl")) == 1


def slow_workflow(path: Path, *, sleep: float, n_workers: int = 2, **worker: object) -> Path:
    """A one-task workflow at "local" whose task sleeps, then copies its input."""
    wc: dict[str, object] = {
        "do_transfer_worker_stdouterr": False,
        "max_worker_runtime": 3600,
        "n_cores": 1,
        "priority": 50,
        "worker_disk": "1G",
        "worker_memory": "1G",
    }
    wc.update(worker)
    body = {
        "public_queue_aliases": ["in", "out"],
        "tasks": [
            {
                "cluster_locations": ["local"],
                "input_queue_aliases": ["in"],
                "output_queue_aliases": ["out"],
                "task_args": (
                    f'sh -c \'sleep {sleep}; cp "$EWMS_TASK_INFILE" "$EWMS_TASK_OUTFILE"\''
                ),
                "n_workers": n_workers,
                "worker_config": wc,
            }
        ],
    }
    path.write_text(json.dumps(body))
    return path


def numbered_events(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(n)))
    return path


def test_a_tms_killed_mid_run_is_restarted_and_the_run_completes(
    tmp_path: Path, cluster: Callable[..., Cluster]
) -> None:
    c = cluster()
    c.start_wms()
    tms = c.start_tms(slots=2)
    wf = slow_workflow(tmp_path / "wf.json", sleep=0.2)
    events = numbered_events(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.jsonl"
    run = c.run(str(wf), "--in", str(events), "--out", str(out))
    try:
        wait_for(lambda: out.exists() and len(text_lines(out)) >= 5, 60, "the first outputs")
        tms.stop(signal.SIGKILL)
        n_at_kill = len(text_lines(out))
        # The pilots run on without their TMS; restart it on the same state directory.
        c.start_tms(slots=2)
        _, err = run.communicate(timeout=RUN_TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    got = sorted(json.loads(line)["i"] for line in text_lines(out))
    assert got == list(range(40)), "every event exactly once in the output file"
    assert n_at_kill < 40, "the TMS was killed mid-run"
    submits = [r for r in c.job_log() if r["event"] == "submit"]
    assert len(submits) == 1, "the restarted TMS did not submit the taskforce again"
    (tf,) = c.taskforces()
    confirmed = [
        e
        for e in tf.phase_change_log
        if e.target_phase == Phase.TASKFORCE_PHASE_CONDOR_SUBMIT and e.was_successful
    ]
    assert len(confirmed) == 1
    assert tf.cluster_id == submits[0]["cluster"]


def _worker_pids(c: Cluster) -> list[int]:
    return [r["pid"] for r in c.job_log() if r["event"] == "execute"]


def test_abort_mid_run_stops_every_worker_within_the_grace_period(
    tmp_path: Path, cluster: Callable[..., Cluster]
) -> None:
    c = cluster()
    c.start_wms()
    c.start_tms(slots=2)
    wf = slow_workflow(tmp_path / "wf.json", sleep=30)
    events = numbered_events(tmp_path / "in.jsonl", 6)
    run = c.run(str(wf), "--in", str(events), "--out", str(tmp_path / "out.jsonl"))
    try:
        pids = wait_for(
            lambda: len(_worker_pids(c)) == 2 and _worker_pids(c), 60, "two running workers"
        )
        (tf,) = wait_for(
            lambda: [
                t
                for t in c.taskforces()
                if any(
                    s.pilot_phase == taskforce_pb2.PILOT_PHASE_TASKING for s in t.compound_statuses
                )
            ],
            60,
            "pilots tasking",
        )
        aborted = subprocess.run(
            ewms_cmd(
                "workflow",
                "abort",
                tf.workflow_id,
                "--wms",
                c.address,
                "--data-dir",
                str(c.data_dir),
            ),
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=30,
        )
        assert aborted.returncode == 0, aborted.stderr
        t0 = time.monotonic()
        # The pilots get "stop" at once; the TMS's SIGKILL comes after its 15 s grace at most.
        wait_for(lambda: not any(pid_alive(p) for p in pids), 25, "every worker to be gone")
        stopped_after = time.monotonic() - t0
        done = wait_for(
            lambda: [t for t in c.taskforces() if t.phase == Phase.TASKFORCE_PHASE_CONDOR_COMPLETE],
            30,
            "the taskforce to complete",
        )
        states = {s.job_state for s in done[0].compound_statuses}
        assert states == {taskforce_pb2.JOB_STATE_REMOVED}
        assert stopped_after < 25
        run.communicate(timeout=60)
        assert run.returncode != 0, "a run whose workflow was aborted does not succeed"
    finally:
        if run.poll() is None:
            run.kill()


def test_a_worker_over_its_memory_limit_is_held_with_the_reason(
    tmp_path: Path, cluster: Callable[..., Cluster]
) -> None:
    c = cluster()
    c.start_wms()
    c.start_tms(slots=2)
    body = json.loads(slow_workflow(tmp_path / "wf.json", sleep=0, n_workers=1).read_text())
    body["tasks"][0]["worker_config"]["worker_memory"] = "160M"
    body["tasks"][0]["task_args"] = (
        'python3 -c \'import time; b = bytearray(400 * 2**20); b[::4096] = b"x" * len(b[::4096]);'
        " time.sleep(60)'"
    )
    (tmp_path / "wf.json").write_text(json.dumps(body))
    run = c.run(
        str(tmp_path / "wf.json"),
        "--in",
        str(numbered_events(tmp_path / "in.jsonl", 1)),
        "--out",
        str(tmp_path / "out.jsonl"),
    )
    try:
        held = wait_for(
            lambda: [
                s
                for t in c.taskforces()
                for s in t.compound_statuses
                if s.job_state == taskforce_pb2.JOB_STATE_HELD
            ],
            90,
            "a HELD worker",
        )
        assert held[0].hold_reason == "Memory usage exceeds a memory limit"
        pids = _worker_pids(c)
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "the held worker to be killed")
    finally:
        run.send_signal(signal.SIGINT)
        try:
            run.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()


def test_taskforces_beyond_the_location_capacity_wait_until_it_frees(
    tmp_path: Path, cluster: Callable[..., Cluster]
) -> None:
    c = cluster(EWMS_LOCATION_MAX_WORKERS="local=2")
    c.start_wms()
    c.start_tms(slots=4)
    worker_config = json.loads(slow_workflow(tmp_path / "x.json", sleep=0).read_text())["tasks"][0][
        "worker_config"
    ]
    task = {
        "cluster_locations": ["local"],
        "task_args": 'sh -c \'cp "$EWMS_TASK_INFILE" "$EWMS_TASK_OUTFILE"\'',
        "n_workers": 2,
        # With no events, workers end after 2 s, which frees the capacity.
        "pilot_config": {
            "environment": {
                "EWMS_PILOT_TIMEOUT_QUEUE_WAIT_FOR_FIRST_MESSAGE": 2,
                "EWMS_PILOT_TIMEOUT_QUEUE_INCOMING": 2,
            }
        },
        "worker_config": worker_config,
    }
    body = {
        "public_queue_aliases": ["a", "b"],
        "tasks": [
            {**task, "input_queue_aliases": ["a"]},
            {**task, "input_queue_aliases": ["b"]},
        ],
    }
    (tmp_path / "wf.json").write_text(json.dumps(body))
    submitted = subprocess.run(
        ewms_cmd(
            "workflow",
            "submit",
            str(tmp_path / "wf.json"),
            "--wms",
            c.address,
            "--data-dir",
            str(c.data_dir),
        ),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    tfs = wait_for(
        lambda: (lambda t: t if len(t) == 2 else None)(c.taskforces()), 30, "two taskforces"
    )
    first, second = sorted(tfs, key=lambda t: t.phase, reverse=True)
    assert first.phase != Phase.TASKFORCE_PHASE_PRE_LAUNCH
    assert second.phase == Phase.TASKFORCE_PHASE_PRE_LAUNCH
    done = wait_for(
        lambda: (
            lambda t: (
                t
                if len(t) == 2 and all(x.phase == Phase.TASKFORCE_PHASE_CONDOR_COMPLETE for x in t)
                else None
            )
        )(c.taskforces()),
        90,
        "both taskforces to run and complete, one after the other",
    )
    by_uuid = {t.taskforce_uuid: t for t in done}

    def when(tf: taskforce_pb2.Taskforce, phase: int) -> int:
        return next(
            e.timestamp.ToNanoseconds()
            for e in tf.phase_change_log
            if e.target_phase == phase and e.was_successful
        )

    released = when(by_uuid[second.taskforce_uuid], Phase.TASKFORCE_PHASE_PENDING_STARTER)
    completed = when(by_uuid[first.taskforce_uuid], Phase.TASKFORCE_PHASE_CONDOR_COMPLETE)
    assert released >= completed
    # Never more than 2 workers at once, although the TMS had 4 slots.
    running, peak = 0, 0
    for r in c.job_log():
        if r["event"] == "execute":
            running += 1
        elif r["event"] in ("exited", "terminated"):
            running -= 1
        peak = max(peak, running)
    assert peak == 2


@pytest.mark.parametrize("command", [["up", "--port", "0"]])
def test_ewms_up_serves_until_interrupted(tmp_path: Path, command: list[str]) -> None:
    proc = subprocess.Popen(
        ewms_cmd(*command, "--data-dir", str(tmp_path / "d")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(EWMS_HTTP_PORT="0"),
    )
    try:
        line = proc.stderr.readline() if proc.stderr else ""
        deadline = time.monotonic() + 30
        while "ewms up:" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline() if proc.stderr else ""
        assert "ewms up: WMS at 127.0.0.1:" in line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.path.exists(tmp_path / "d" / "admin.token")


def test_ewms_watch_shows_the_snapshot_then_changes_until_the_workflow_is_done(
    tmp_path: Path, cluster: Callable[..., Cluster]
) -> None:
    c = cluster()
    c.start_wms()
    c.start_tms(slots=2)
    body = json.loads(slow_workflow(tmp_path / "wf.json", sleep=0, n_workers=1).read_text())
    (tmp_path / "wf.json").write_text(json.dumps(body))
    submitted = subprocess.run(
        ewms_cmd(
            "workflow",
            "submit",
            str(tmp_path / "wf.json"),
            "--json",
            "--wms",
            c.address,
            "--data-dir",
            str(c.data_dir),
        ),
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    workflow_id = json.loads(submitted.stdout)["workflow"]["workflow_id"]
    watch = subprocess.Popen(
        ewms_cmd("watch", workflow_id, "--json", "--wms", c.address, "--data-dir", str(c.data_dir)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert watch.stdout is not None
        first = json.loads(watch.stdout.readline())
        assert first["snapshot"] is True
        assert first["workflow"]["workflow_id"] == workflow_id
        assert len(first["taskforces"]) == 1
        # Let the pilot start, then finish the workflow: its worker drains and the cluster leaves.
        wait_for(
            lambda: any(
                s.pilot_phase != taskforce_pb2.PILOT_PHASE_UNSPECIFIED
                for t in c.taskforces()
                for s in t.compound_statuses
            ),
            60,
            "the pilot to report",
        )
        finished = subprocess.run(
            ewms_cmd(
                "workflow", "finish", workflow_id, "--wms", c.address, "--data-dir", str(c.data_dir)
            ),
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=30,
        )
        assert finished.returncode == 0, finished.stderr
        rest, err = watch.communicate(timeout=60)
        assert watch.returncode == 0, err
    finally:
        if watch.poll() is None:
            watch.kill()
    changes = [json.loads(line) for line in rest.splitlines() if line.strip()]
    phases = [tf["phase"] for msg in changes for tf in msg.get("taskforces", [])]
    assert "TASKFORCE_PHASE_PENDING_STOPPER" in phases
    assert phases[-1] == "TASKFORCE_PHASE_CONDOR_COMPLETE"
    pilot_phases = {
        s.get("pilot_phase")
        for msg in changes
        for tf in msg.get("taskforces", [])
        for s in tf.get("compound_statuses", [])
    }
    assert "PILOT_PHASE_DONE" in pilot_phases or "PILOT_PHASE_DRAINING" in pilot_phases
    assert any(
        msg.get("workflow", {}).get("deactivated") == "DEACTIVATION_FINISHED" for msg in changes
    )


def test_a_run_whose_wms_goes_away_fails_instead_of_waiting(
    tmp_path: Path, cluster: Callable[..., Cluster]
) -> None:
    c = cluster()
    c.start_wms()
    c.start_tms(slots=2)
    wf = slow_workflow(tmp_path / "wf.json", sleep=0.5)
    out = tmp_path / "out.jsonl"
    run = c.run(str(wf), "--in", str(numbered_events(tmp_path / "in.jsonl", 40)), "--out", str(out))
    try:
        wait_for(lambda: out.exists() and len(text_lines(out)) >= 2, 60, "the first outputs")
        assert c.wms is not None
        c.wms.stop(signal.SIGKILL)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 6, err
    assert f"error: lost the WMS at {c.address}" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_aborts_its_workflow_and_leaves_no_worker(
    tmp_path: Path, sig: int
) -> None:
    wf = slow_workflow(tmp_path / "wf.json", sleep=30)
    data_dir = tmp_path / "data"
    run = subprocess.Popen(
        ewms_cmd(
            "run",
            str(wf),
            "--in",
            str(numbered_events(tmp_path / "in.jsonl", 4)),
            "--out",
            str(tmp_path / "out.jsonl"),
            "--data-dir",
            str(data_dir),
            "--workers",
            "2",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(EWMS_LOG_LEVEL="WARNING"),
    )
    job_log = data_dir / "tms-local" / "local-schedd.log"

    def pids() -> list[int]:
        if not job_log.exists():
            return []
        records = [json.loads(line) for line in job_log.read_text().splitlines() if line]
        return [r["pid"] for r in records if r["event"] == "execute"]

    try:
        started = wait_for(lambda: len(pids()) == 2 and pids(), 60, "two workers")
        time.sleep(1)  # let the pilots take their first events
        run.send_signal(sig)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 128 + sig, err
    assert "interrupted after 0 output(s); the workflow was aborted" in err
    assert not any(pid_alive(p) for p in started)


def test_a_run_completes_when_the_acks_counts_are_lost_with_a_closed_channel(
    tmp_path: Path,
) -> None:
    # Pilots that stop 1 s after their last event close their channel within RabbitMQ's 5 s
    # statistics refresh, which mostly drops those acks from the queue's `acked` counter. The run
    # still completes: nothing ready or in flight for long enough is settled.
    require_rabbitmq()
    workflow = json.loads((EXAMPLES / "text-transform" / "workflow.json").read_text())
    workflow["tasks"][0]["pilot_config"] = {"environment": {"EWMS_PILOT_TIMEOUT_QUEUE_INCOMING": 1}}
    (tmp_path / "wf.json").write_text(json.dumps(workflow))
    events = text_lines(EXAMPLES / "text-transform" / "events.txt")
    proc = subprocess.run(
        ewms_cmd(
            "run",
            str(tmp_path / "wf.json"),
            "--in",
            str(EXAMPLES / "text-transform" / "events.txt"),
            "--out",
            str(tmp_path / "out.txt"),
            "--text",
        ),
        capture_output=True,
        text=True,
        env=cli_env(EWMS_QUEUE_BACKEND="rabbitmq", EWMS_LOG_LEVEL="WARNING"),
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(text_lines(tmp_path / "out.txt")) == sorted(e.upper() for e in events)
