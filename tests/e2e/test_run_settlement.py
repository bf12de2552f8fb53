"""``ewms run`` on RabbitMQ knows exactly when every input is settled (services/cli/settlement.py):
never before, and without waiting for a quiet period or the management API's statistics.

The pilots here never exit by themselves (``EWMS_PILOT_TIMEOUT_QUEUE_INCOMING`` of an hour), so
a run can only end by the balance (every input counted succeeded or dead-lettered, nothing
ready): a verdict that needed its workers gone, or a quiet period, would never come and the run
would time out. A verdict that came early would leave an output unwritten (``ewms run`` stops
collecting once it is settled), or count a dead letter as done."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import require_rabbitmq
from tests.e2e.conftest import Cluster, wait_for
from tests.e2e.test_run import numbered_events, text_lines
from tests.reliability.test_process_faults import (
    WAIT,
    in_flight,
    killed_and_lost,
    pilot_workflow,
    read_marks,
    start_tms,
    tally,
    worker_pid,
)

RUN_TIMEOUT = 120
NEVER_IDLE = {"EWMS_PILOT_TIMEOUT_QUEUE_INCOMING": 3600}


def finish(run: subprocess.Popen[str]) -> tuple[int, str]:
    """The run's exit code and stderr (it is killed if it does not end in RUN_TIMEOUT)."""
    try:
        _, err = run.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        run.kill()
        _, err = run.communicate()
        raise AssertionError(f"the run did not end in {RUN_TIMEOUT} s:\n{err}") from None
    return run.returncode, err


def test_a_pilot_killed_mid_task_delays_the_verdict_until_its_event_is_done_again(
    tmp_path: Path, cluster: Callable[..., Cluster]
) -> None:
    require_rabbitmq()
    n = 30
    c = cluster("rabbitmq")
    c.start_wms()
    start_tms(c)
    marks = tmp_path / "marks"
    wf = pilot_workflow(tmp_path / "wf.json", sleep=0.3, n_workers=3, marks=marks)
    body = json.loads(wf.read_text())
    body["tasks"][0]["pilot_config"]["environment"].update(NEVER_IDLE)
    wf.write_text(json.dumps(body))
    out = tmp_path / "out.jsonl"
    run = c.run(str(wf), "--in", str(numbered_events(tmp_path / "in.jsonl", n)), "--out", str(out))
    try:
        pid = worker_pid(c, 0, run)
        held = wait_for(lambda: in_flight(read_marks(marks), 0), WAIT, "a task of worker 0")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: killed_and_lost(c), WAIT, "the killed pilot LOST")
    except BaseException:
        run.kill()
        raise
    code, err = finish(run)
    assert code == 0, err

    got = [json.loads(line)["i"] for line in text_lines(out)]
    _, _, lost = tally(got, set(range(n)))
    assert lost == 0, (
        f"every output written before the verdict ({sorted(set(range(n)) - set(got))})"
    )
    starts = [m.i for m in read_marks(marks) if m.kind == "start"]
    assert any(starts.count(i) >= 2 for i in held), "the killed task's event ran again"
    assert f"{n} event(s) in: {n} done, 0 dead-lettered, 0 not settled" in err, err


def test_dead_letters_count_as_settled_and_the_run_ends_with_their_number(
    tmp_path: Path, cluster: Callable[..., Cluster]
) -> None:
    require_rabbitmq()
    n, poison = 12, {3, 7}
    c = cluster("rabbitmq")
    c.start_wms()
    start_tms(c)
    fail_poison = (
        'sh -c \'grep -q poison "$EWMS_TASK_INFILE" && exit 3; '
        'cp "$EWMS_TASK_INFILE" "$EWMS_TASK_OUTFILE"\''
    )
    body = json.loads(
        pilot_workflow(tmp_path / "wf.json", sleep=0, n_workers=2, marks=None).read_text()
    )
    body["tasks"][0]["task_args"] = fail_poison
    body["tasks"][0]["pilot_config"]["environment"].update(NEVER_IDLE)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(body))
    infile = tmp_path / "in.jsonl"
    infile.write_text(
        "".join(
            json.dumps({"i": i, "poison": 1} if i in poison else {"i": i}) + "\n" for i in range(n)
        )
    )
    out = tmp_path / "out.jsonl"
    code, err = finish(c.run(str(wf), "--in", str(infile), "--out", str(out)))

    assert code == 1, err
    done = n - len(poison)
    assert f"{n} event(s) in: {done} done, {len(poison)} dead-lettered, 0 not settled" in err
    got = sorted(json.loads(line)["i"] for line in text_lines(out))
    assert got == sorted(set(range(n)) - poison)
    listed = {int(m) for m in re.findall(rf"^  {re.escape(str(infile))}:(\d+) EV-", err, re.M)}
    assert listed == {i + 1 for i in poison}, err
