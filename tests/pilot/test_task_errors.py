"""A failing event never stops a workflow, and a failed task explains itself.

A failed run's error text is a first line (how it ended, with the most useful line of stderr),
then the last lines of its stderr. The whole text goes with the event (its dead letter, the task's
FAILED event); the pilot's status carries only the first line, which the WMS groups pilots by.
The pilot-level tests run real pilots against a real WMS on both queue backends."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ewms.v1 import event_service_pb2, pilot_service_pb2, queue_pb2
from services.pilot.failures import ContainerRunError, TaskTimeoutError
from services.pilot.runner import run
from services.pilot.runtimes import Launch
from services.pilot.spawner import Spawner
from services.wms.control.pilots import PilotChange
from tests.pilot.conftest import PilotEnv, wait_for
from tests.wms.requests import minimal_task, parse, workflow_json

# What a stderr excerpt may hold, besides its header and indentation.
EXCERPT_BYTES = 2048
DISK_ON_FIRE = (
    'sh -c \'echo "step 1 ok" >&2; echo >&2; echo "step 2: writing" >&2; '
    'echo "oops: disk on fire" >&2; exit 3\''
)
DISK_ON_FIRE_TEXT = (
    "task failed (exit code 3): oops: disk on fire\n"
    "stderr (last 3 lines):\n"
    "  step 1 ok\n"
    "  step 2: writing\n"
    "  oops: disk on fire"
)


# --- the error text of one run ---------------------------------------------------------------


@pytest.fixture
async def spawner() -> AsyncIterator[Spawner]:
    opened = Spawner.start(1)
    try:
        yield opened
    finally:
        await opened.close()


async def failed_run(
    spawner: Spawner,
    tmp_path: Path,
    argv: list[str],
    *,
    path: str | None = None,
    time_limit: float | None = None,
) -> ContainerRunError:
    """Run ``argv`` as the pilot runs a task; the error it fails with."""
    launch = Launch(argv, {"PATH": path if path is not None else os.environ["PATH"]}, tmp_path)
    with pytest.raises(ContainerRunError) as raised:
        await run(
            launch,
            tmp_path / "stdoutfile",
            tmp_path / "stderrfile",
            alias="task",
            time_limit=time_limit,
            kill_grace=1.0,
            spawner=spawner,
        )
    return raised.value


async def test_a_failed_runs_error_is_its_first_line_then_the_last_lines_of_stderr(
    spawner: Spawner, tmp_path: Path
) -> None:
    script = (
        "echo 'step 1 ok' >&2; echo >&2; echo '  indented detail' >&2; "
        "echo 'oops: disk on fire' >&2; exit 3"
    )
    error = await failed_run(spawner, tmp_path, ["sh", "-c", script])
    assert str(error) == (
        "task failed (exit code 3): oops: disk on fire\n"
        "stderr (last 3 lines):\n"
        "  step 1 ok\n"
        "    indented detail\n"
        "  oops: disk on fire"
    )
    assert error.summary == "task failed (exit code 3): oops: disk on fire"


async def test_the_stderr_excerpt_keeps_the_last_ten_non_empty_lines_each_cut_short(
    spawner: Spawner, tmp_path: Path
) -> None:
    # Fifteen lines of 308 characters, with blank lines between them.
    script = (
        "for i in $(seq 10 24); do echo \"line $i $(printf 'x%.0s' $(seq 1 300))\" >&2; "
        "echo >&2; done; exit 1"
    )
    error = await failed_run(spawner, tmp_path, ["sh", "-c", script])
    first, header, *lines = str(error).split("\n")
    assert first == "task failed (exit code 1): line 24 " + "x" * 300
    assert header == "stderr (last 10 lines):"
    assert lines == [f"  line {i} " + "x" * (200 - 9) + "…" for i in range(15, 25)]


async def test_the_stderr_excerpt_stays_within_its_byte_budget(
    spawner: Spawner, tmp_path: Path
) -> None:
    # Ten lines of 200 two-byte characters would be 4 KiB: fewer lines are kept.
    script = "for i in $(seq 1 10); do printf 'é%.0s' $(seq 1 200) >&2; echo >&2; done; exit 1"
    error = await failed_run(spawner, tmp_path, ["sh", "-c", script])
    header, *lines = str(error).split("\n")[1:]
    assert header == "stderr (last 5 lines):"
    assert lines == ["  " + "é" * 200] * 5
    assert sum(len(line.strip().encode()) for line in lines) <= EXCERPT_BYTES


async def test_a_timeout_error_also_ends_with_the_stderr_excerpt(
    spawner: Spawner, tmp_path: Path
) -> None:
    script = "echo 'loading' >&2; echo 'still loading' >&2; exec sleep 30"
    error = await failed_run(spawner, tmp_path, ["sh", "-c", script], time_limit=0.5)
    assert isinstance(error, TaskTimeoutError)
    assert str(error) == (
        "task timed out after 0.5s and was killed (last stderr: still loading)\n"
        "stderr (last 2 lines):\n"
        "  loading\n"
        "  still loading"
    )
    assert error.summary == "task timed out after 0.5s and was killed (last stderr: still loading)"


async def test_a_run_without_stderr_has_only_its_first_line(
    spawner: Spawner, tmp_path: Path
) -> None:
    error = await failed_run(spawner, tmp_path, ["sh", "-c", "exit 2"])
    assert str(error) == error.summary == "task failed (exit code 2): (no stderr)"


async def test_a_command_path_that_does_not_exist_is_named_as_missing(
    spawner: Spawner, tmp_path: Path
) -> None:
    error = await failed_run(spawner, tmp_path, ["/no/such/binary", "x"])
    assert str(error) == "task could not start: /no/such/binary does not exist"


@pytest.mark.parametrize(
    ("make", "why"),
    [("directory", "is a directory"), ("plain file", "is not executable")],
)
async def test_a_command_path_that_cannot_be_executed_says_why(
    spawner: Spawner, tmp_path: Path, make: str, why: str
) -> None:
    target = tmp_path / "tool"
    if make == "directory":
        target.mkdir()
    else:
        target.write_text("#!/bin/sh\n")
        target.chmod(0o644)
    error = await failed_run(spawner, tmp_path, [str(target)])
    assert str(error) == f"task could not start: {target} {why}"


async def test_a_bare_command_name_is_not_found_in_the_path_it_was_looked_up_in(
    spawner: Spawner, tmp_path: Path
) -> None:
    error = await failed_run(
        spawner, tmp_path, ["no-such-command"], path="/nowhere/bin:/nowhere/sbin"
    )
    assert str(error) == (
        "task could not start: no-such-command not found in PATH (/nowhere/bin:/nowhere/sbin)"
    )


# --- real pilots -----------------------------------------------------------------------------


async def use_max_attempts(penv: PilotEnv, max_attempts: int) -> None:
    """Give the test a workflow whose queues have ``max_attempts`` (the fixture's have 2)."""
    request = parse(
        workflow_json(
            minimal_task(max_attempts=max_attempts, output_queue_aliases=["out", "out2"]),
            public_queue_aliases=["in", "out", "out2"],
        )
    )
    penv.q.workflow = await penv.q.workflows.CreateWorkflow(request, metadata=penv.q.alice)
    assert penv.queue("in").max_attempts == max_attempts


async def the_dead_letter(penv: PilotEnv) -> queue_pb2.DeadLetter:
    """The input queue's only dead letter, once there is one."""
    letters: list[queue_pb2.DeadLetter] = []

    async def listed() -> bool:
        nonlocal letters
        found = await penv.q.events.ListDeadLetters(
            event_service_pb2.ListDeadLettersRequest(queue_id=penv.queue("in").queue_id),
            metadata=penv.q.alice,
        )
        letters = list(found.dead_letters)
        return bool(letters)

    await wait_for(listed, 60, "a dead letter")
    [letter] = letters
    return letter


def payloads(events: list[queue_pb2.Event]) -> list[bytes]:
    return sorted(e.payload for e in events)


async def test_a_poison_event_is_dead_lettered_while_two_pilots_finish_the_rest_and_go_on(
    penv: PilotEnv,
) -> None:
    await use_max_attempts(penv, 3)
    runs = penv.tmp / "poison-runs"
    task = (
        f"sh -c 'if grep -q poison {{{{INFILE}}}}; then echo run >> {runs}; "
        'echo "it is poison" >&2; exit 3; fi; cp {{INFILE}} {{OUTFILE}}\''
    )
    good = [f"good {i}".encode() for i in range(39)]
    ids = await penv.publish([*good[:5], b"poison", *good[5:]])
    # Default settings: EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR unset.
    envs = [penv.pilot_environment(task, EWMS_PILOT_TIMEOUT_QUEUE_INCOMING="120") for _ in range(2)]
    pilots = [await penv.start_pilot_env(env) for env in envs]

    assert payloads(await penv.outputs("out", 39)) == sorted(good)
    letter = await the_dead_letter(penv)
    assert letter.event.event_id == ids[5]
    assert letter.event.attempt == 3
    assert runs.read_text().split() == ["run"] * 3
    assert letter.last_error.startswith("task failed (exit code 3): it is poison\n")
    assert "\n  it is poison" in letter.last_error

    # Both pilots go on consuming.
    assert [p.proc.returncode for p in pilots] == [None, None]
    later = [f"later {i}".encode() for i in range(20)]
    await penv.publish(later)
    done = await penv.outputs("out", 20)
    assert payloads(done) == sorted(later)
    assert {e.provenance.worker_id for e in done} == {e["EWMS_PILOT_WORKER_ID"] for e in envs}
    for pilot in pilots:
        pilot.signal(signal.SIGTERM)
    assert [await p.wait() for p in pilots] == [0, 0]


async def test_the_dead_letter_and_the_failed_task_events_carry_the_end_of_stderr(
    penv: PilotEnv,
) -> None:
    failed: list[str] = []

    def on_change(change: PilotChange) -> None:
        event = change.task_event
        if event is not None and event.kind == pilot_service_pb2.TASK_EVENT_KIND_FAILED:
            failed.append(event.error)

    penv.q.wms.pilots.listen(on_change)
    await penv.publish([b"doomed"])
    assert await penv.run_pilot(DISK_ON_FIRE) == 0
    letter = await the_dead_letter(penv)
    assert letter.last_error == DISK_ON_FIRE_TEXT

    async def both_attempts_reported() -> bool:
        return len(failed) == penv.queue("in").max_attempts

    await wait_for(both_attempts_reported, what="a FAILED task event per attempt")
    assert failed == [DISK_ON_FIRE_TEXT] * len(failed)


async def test_the_wms_counts_pilots_by_the_first_line_of_their_task_error(
    penv: PilotEnv,
) -> None:
    # Each run's stderr ends differently (its pid); the first line is the same.
    task = 'sh -c \'echo "run $$" >&2; echo "oops: disk on fire" >&2; exit 3\''
    failed: list[str] = []

    def on_change(change: PilotChange) -> None:
        event = change.task_event
        if event is not None and event.kind == pilot_service_pb2.TASK_EVENT_KIND_FAILED:
            failed.append(event.error)

    penv.q.wms.pilots.listen(on_change)
    for name in (b"first", b"second"):  # one pilot after the other, each fails its event
        await penv.publish([name])
        assert await penv.run_pilot(task) == 0
    summary = "task failed (exit code 3): oops: disk on fire"

    attempts = 2 * penv.queue("in").max_attempts

    async def all_reported() -> bool:
        tf = await penv.taskforce()
        return tf.counters.tasks_failed == attempts and len(failed) == attempts

    await wait_for(all_reported, what="every failed attempt reported")
    assert dict((await penv.taskforce()).top_task_errors) == {summary: 2}
    assert len(set(failed)) == attempts
    assert all(text.startswith(summary + "\nstderr (last 2 lines):\n  run ") for text in failed)


async def test_a_task_whose_command_path_does_not_exist_says_so_in_its_dead_letter(
    penv: PilotEnv,
) -> None:
    await penv.publish([b"never run"])
    assert await penv.run_pilot("/no/such/binary {{INFILE}}") == 0
    letter = await the_dead_letter(penv)
    assert letter.last_error == "task could not start: /no/such/binary does not exist"
