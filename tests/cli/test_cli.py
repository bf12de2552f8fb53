"""The ``ewms`` command against a real ``ewms wms serve`` process, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LOCATIONS, ROOT

SEED = ROOT / "examples" / "seed-workflow.json"


def ewms(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the CLI; returns the finished process (stdout, stderr, returncode)."""
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ewms {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture
def served(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`ewms wms serve --port 0` in a subprocess; yields the environment that reaches it."""
    env = {
        **os.environ,
        "EWMS_DATA_DIR": str(tmp_path / "data"),
        "EWMS_CLUSTER_LOCATIONS": LOCATIONS,
    }
    env.pop("EWMS_TOKEN", None)
    log_path = tmp_path / "wms.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "wms",
                "serve",
                "--port",
                "0",
                "--http-port",
                "0",
            ],
            env=env,
            stderr=log,
            cwd=ROOT,
        )
    try:
        port = _wait_for_port(log_path, proc)
        yield {**env, "EWMS_WMS_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_for_port(log_path: Path, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("event") == "wms listening":
                return int(entry["grpc_port"])
        if proc.poll() is not None:
            raise AssertionError(f"wms exited {proc.returncode}: {log_path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"wms did not start within 30 s: {log_path.read_text()}")


def test_seed_request_is_accepted_unchanged_by_workflow_submit(served: dict[str, str]) -> None:
    out = json.loads(ewms("workflow", "submit", str(SEED), "--json", env=served).stdout)
    assert out["workflow"]["workflow_id"].startswith("WF-")
    assert [tf["cluster_location"] for tf in out["taskforces"]] == ["osg"]
    assert out["taskforces"][0]["n_workers"] == 1000
    assert sorted(q["alias"] for q in out["queues"]) == ["input-queue", "output-queue"]


def test_submit_prints_a_table_of_taskforces_and_queues(served: dict[str, str]) -> None:
    out = ewms("workflow", "submit", str(SEED), env=served).stdout
    assert out.startswith("created WF-")
    assert "pre-mq-activation" in out
    assert "input-queue" in out and "output-queue" in out


def test_get_list_abort_and_taskforce_list_round_trip(served: dict[str, str]) -> None:
    created = json.loads(ewms("workflow", "submit", str(SEED), "--json", env=served).stdout)
    wf_id = created["workflow"]["workflow_id"]
    got = json.loads(ewms("workflow", "get", wf_id, "--json", env=served).stdout)
    assert got == created["workflow"]
    listed = json.loads(ewms("workflow", "list", "--json", env=served).stdout)
    assert [w["workflow_id"] for w in listed] == [wf_id]
    aborted = json.loads(ewms("workflow", "abort", wf_id, "--json", env=served).stdout)
    assert aborted["n_taskforces"] == 1
    phases = json.loads(ewms("taskforce", "list", "--workflow", wf_id, "--json", env=served).stdout)
    assert [tf["phase"] for tf in phases] == ["TASKFORCE_PHASE_CANCELLED"]
    table = ewms("taskforce", "list", "--phase", "cancelled", env=served).stdout
    assert "cancelled" in table and created["taskforces"][0]["taskforce_uuid"] in table


def test_invalid_request_lists_every_violation_and_exits_2(
    served: dict[str, str], tmp_path: Path
) -> None:
    bad = json.loads(SEED.read_text())
    bad["priority"] = 500
    bad["tasks"][0]["cluster_locations"] = ["mars"]
    bad["tasks"][0]["worker_config"]["worker_disk"] = "lots"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    proc = ewms("workflow", "submit", str(path), env=served, check=False)
    assert proc.returncode == 2
    assert "INVALID_ARGUMENT" in proc.stderr
    assert "  priority: must be between 0 and 100" in proc.stderr
    assert "  tasks[0].cluster_locations[0]: unknown cluster location 'mars'" in proc.stderr
    assert "  tasks[0].worker_config.worker_disk:" in proc.stderr


def test_unknown_field_in_request_file_is_a_usage_error_naming_it(
    served: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"tasks": [{"foo": 1}]}))
    proc = ewms("workflow", "submit", str(path), env=served, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {path}: 1 problem in the workflow request",
        "  tasks[0].foo: unknown field",
    ]


def test_second_deactivation_exits_5_with_failed_precondition(served: dict[str, str]) -> None:
    wf_id = json.loads(ewms("workflow", "submit", str(SEED), "--json", env=served).stdout)[
        "workflow"
    ]["workflow_id"]
    ewms("workflow", "finish", wf_id, env=served)
    proc = ewms("workflow", "finish", wf_id, env=served, check=False)
    assert proc.returncode == 5
    assert "FAILED_PRECONDITION" in proc.stderr and "already deactivated" in proc.stderr


def test_minted_user_token_sees_only_its_own_workflows(served: dict[str, str]) -> None:
    admin_wf = json.loads(ewms("workflow", "submit", str(SEED), "--json", env=served).stdout)
    token = ewms("token", "create", "--role", "user", "--subject", "alice", env=served).stdout
    alice = {**served, "EWMS_TOKEN": token.strip()}
    proc = ewms("workflow", "get", admin_wf["workflow"]["workflow_id"], env=alice, check=False)
    assert proc.returncode == 3 and "NOT_FOUND" in proc.stderr
    mine = json.loads(ewms("workflow", "submit", str(SEED), "--json", env=alice).stdout)
    assert mine["workflow"]["owner"] == "alice"
    listed = json.loads(ewms("workflow", "list", "--json", env=alice).stdout)
    assert [w["workflow_id"] for w in listed] == [mine["workflow"]["workflow_id"]]


def test_bad_token_exits_4(served: dict[str, str]) -> None:
    proc = ewms("workflow", "list", env={**served, "EWMS_TOKEN": "garbage"}, check=False)
    assert proc.returncode == 4 and "UNAUTHENTICATED" in proc.stderr


def test_unreachable_wms_exits_6(tmp_path: Path) -> None:
    env = {**os.environ, "EWMS_DATA_DIR": str(tmp_path), "EWMS_WMS_ADDRESS": "127.0.0.1:1"}
    proc = ewms("workflow", "list", env=env, check=False)
    assert proc.returncode == 6 and "cannot reach the WMS at 127.0.0.1:1" in proc.stderr
