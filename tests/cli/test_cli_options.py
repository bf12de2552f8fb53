"""The command line says what it does: each command lists only the options it uses, invalid
values are errors rather than silent defaults, and a mistake is one line (a bug: a traceback and a
request to report it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import services.cli.serve
from services.cli import main
from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "text-transform"
CLIENT_ONLY = ("--wms", "--token", "--json")


def ewms(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}", **env},
    )


def options_in_help(*command: str) -> set[str]:
    proc = ewms(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    return set(re.findall(r"(--[a-z][a-z-]*)", proc.stdout))


@pytest.mark.parametrize("command", [("wms", "serve"), ("up",), ("token", "create")], ids=" ".join)
def test_server_commands_list_no_client_options(command: tuple[str, ...]) -> None:
    shown = options_in_help(*command)
    assert "--data-dir" in shown
    assert not shown & set(CLIENT_ONLY), shown


def test_tms_serve_lists_its_connection_but_no_output_options() -> None:
    shown = options_in_help("tms", "serve")
    assert {"--wms", "--token", "--data-dir"} <= shown
    assert "--json" not in shown


def test_tms_serve_explains_its_scheduler_and_its_default() -> None:
    text = " ".join(ewms("tms", "serve", "--help").stdout.split())
    assert re.search(r"--scheduler \{local,htcondor\}\s+where workers run: .*\(default\)", text)


def test_run_help_says_what_wms_and_data_dir_really_default_to() -> None:
    text = " ".join(ewms("run", "--help").stdout.split())
    assert "EWMS_WMS_ADDRESS is not read" in text
    assert "--data-dir DATA_DIR without --wms: the embedded WMS's data directory" in text


def test_run_has_no_json_option_that_does_nothing() -> None:
    proc = ewms("run", str(EXAMPLE / "workflow.json"), "--in", "x", "--out", "-", "--json")
    assert proc.returncode == 2
    assert proc.stderr == ("error: ewms: unrecognized arguments: --json (see 'ewms --help')\n")


@pytest.mark.parametrize(
    "command",
    [
        ("up", "--workers", "0"),
        ("tms", "serve", "--location", "local", "--slots", "0"),
        ("run", str(EXAMPLE / "workflow.json"), "--in", "x", "--out", "-", "--workers", "0"),
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_zero_workers_is_an_error_not_the_number_of_cpus(command: tuple[str, ...]) -> None:
    proc = ewms(*command)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert "must be at least 1, got 0" in proc.stderr


def test_workers_with_a_running_wms_is_an_error(tmp_path: Path) -> None:
    proc = ewms(
        "run",
        str(EXAMPLE / "workflow.json"),
        "--in",
        str(EXAMPLE / "events.txt"),
        "--text",
        "--out",
        str(tmp_path / "out.txt"),
        "--wms",
        "127.0.0.1:1",
        "--workers",
        "2",
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --workers sizes the embedded local TMS")


def test_a_lone_violation_is_printed_once(tmp_path: Path) -> None:
    spec = json.loads((EXAMPLE / "workflow.json").read_text())
    spec["tasks"][0]["n_workers"] = -1
    (tmp_path / "wf.json").write_text(json.dumps(spec))
    proc = ewms(
        "run",
        str(tmp_path / "wf.json"),
        "--in",
        str(EXAMPLE / "events.txt"),
        "--text",
        "--out",
        str(tmp_path / "out.txt"),
        "--data-dir",
        str(tmp_path / "data"),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("tasks[0].n_workers: must be at least 1 (got -1)") == 1, proc.stderr


def test_a_bug_shows_its_traceback_and_asks_for_a_report(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def broken(_args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(services.cli.serve, "run_wms", broken)
    assert main(["wms", "serve", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err
    assert err.rstrip().splitlines()[-1].startswith("error: an unexpected failure")
    assert "Please report it" in err


def test_the_readme_first_steps_outputs_are_git_ignored() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (ROOT / "README.md").read_text()
    outputs = {
        out
        for block in re.findall(r"```sh\n(.*?)```", readme, re.S)
        for out in re.findall(r"--out (\S+)", block)
        if out != "-"
    }
    assert outputs, "the README's first steps write no files?"
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *sorted(outputs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert sorted(proc.stdout.split()) == sorted(outputs), proc.stderr


def test_a_json_number_too_large_for_json_is_a_bad_line(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"a": 1}\n1e400\n')
    proc = ewms(
        "run",
        str(ROOT / "examples" / "json-transform" / "workflow.json"),
        "--in",
        str(events),
        "--out",
        str(tmp_path / "out.jsonl"),
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {events}: line 2 is not valid JSON; nothing was published",
        "  line 2: the number 1e400 is too large for a JSON number",
    ]
