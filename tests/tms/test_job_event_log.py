"""Pilot chirps read from job event logs in HTCondor's own text format (GENERIC events, parsed by
the real ``htcondor2.JobEventLog``), and HTCondor's hold reason table.

The chirps are written as the pilot writes them: ``services.pilot.chirp.Chirper`` with a sender
that appends each chirp to the log as the ``GENERIC`` event HTChirp's ``ulog`` makes of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ewms.v1 import taskforce_pb2
from services.pilot.chirp import Chirper
from services.tms.chirps import Chirp, chirp_value, parse_chirp
from services.tms.hold_reasons import HOLD_CODES, hold_message
from services.tms.htcondor import HTCondorScheduler
from services.tms.job_event_log import JelReader
from services.tms.scheduler import IDLE, RUNNING, PilotChirp
from tests.tms.test_htcondor import (
    CORRUPT,
    TODAY,
    UUID,
    FakeSchedd,
    at,
    change,
    cluster,
    executing,
    generic,
    submitted,
    take,
)

PILOT = "HTChirpEWMSPilot"


def chirped(job: str, when: str, attribute: str, value: str | int | float) -> PilotChirp:
    cluster_id, proc = job.split(".")
    return PilotChirp(
        taskforce_uuid=UUID,
        cluster_id=int(cluster_id),
        proc_id=int(proc),
        chirp=Chirp(attribute, value),
        time=at(when),
    )


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[HTCondorScheduler]:
    s = HTCondorScheduler(tmp_path, FakeSchedd(), poll_interval=0.02, clock=lambda: TODAY)
    yield s
    await s.close()


async def test_chirps_the_pilot_writes_are_read_back_unquoted_with_numbers_as_numbers(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(submitted("123.0", "10:00:00"))

    def ulog(items: list[tuple[str, str]]) -> None:
        # As htchirp_sender with EWMS_PILOT_HTCHIRP_DEST=JOB_EVENT_LOG: one ulog line per chirp.
        with jel.open("a") as f:
            for attr, value in items:
                f.write(generic("123.0", "10:01:00", f"{attr}: {value}"))

    chirper = Chirper(ulog, ratelimit_seconds=0.0)
    chirper.phase(taskforce_pb2.PILOT_PHASE_TASKING)
    await chirper.close()
    counters = taskforce_pb2.TaskCounters(events_received=12, tasks_succeeded=10, tasks_failed=2)
    chirper.counters(counters)
    chirper.error('task failed: "exit 3"\nstderr: boom', "Traceback (most recent call last): …")
    await chirper.close()
    # Read after writing: the chirper stamps LastUpdatedTimestamp with its own clock.
    await scheduler.adopt([cluster(123, jel)])

    got = await take(scheduler, 9)
    assert got[0] == change("123.0", IDLE, "10:00:00")
    chirps = [(e.chirp.attribute, e.chirp.value) for e in got[1:] if isinstance(e, PilotChirp)]
    updated = [v for a, v in chirps if a == "LastUpdatedTimestamp"]
    assert len(updated) == 2 and all(isinstance(v, int) for v in updated)
    assert [c for c in chirps if c[0] != "LastUpdatedTimestamp"] == [
        ("Status", "Tasking"),
        ("TasksTotal", 12),
        ("TasksSuccess", 10),
        ("TasksFailed", 2),
        ("Error", 'task failed: "exit 3"\nstderr: boom'),
        ("ErrorTraceback", "Traceback (most recent call last): …"),
    ]


async def test_chirps_come_in_order_with_the_job_states_of_their_worker(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(
        submitted("123.0", "10:00:00")
        + executing("123.0", "10:00:30")
        + generic("123.0", "10:01:00", f'{PILOT}Status: "Started"')
        + generic("123.0", "10:01:01", f"{PILOT}StartedTimestamp: 1795860061")
        + generic("123.0", "10:02:00", f'{PILOT}Status: "Tasking"')
    )
    await scheduler.adopt([cluster(123, jel)])
    assert await take(scheduler, 5) == [
        change("123.0", IDLE, "10:00:00"),
        change("123.0", RUNNING, "10:00:30"),
        chirped("123.0", "10:01:00", "Status", "Started"),
        chirped("123.0", "10:01:01", "StartedTimestamp", 1795860061),
        chirped("123.0", "10:02:00", "Status", "Tasking"),
    ]


async def test_other_generic_events_and_corrupt_events_are_skipped(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_text(
        submitted("123.0", "10:00:00")
        + generic("123.0", "10:00:10", "Hello from job 3")  # another program's ulog line
        + generic("123.0", "10:00:20", f"{PILOT}Mood: 3")  # an attribute no pilot chirps
        + generic("123.0", "10:00:30", f"{PILOT}Status")  # no value
        + CORRUPT
        + generic("999.0", "10:00:40", f'{PILOT}Status: "Done"')  # not our cluster
        + generic("123.0", "10:01:00", f'{PILOT}Status: "Done"')
    )
    await scheduler.adopt([cluster(123, jel)])
    assert await take(scheduler, 2) == [
        change("123.0", IDLE, "10:00:00"),
        chirped("123.0", "10:01:00", "Status", "Done"),
    ]


def test_the_reader_hands_out_a_generic_events_chirp(tmp_path: Path) -> None:
    jel = tmp_path / "x.jel"
    jel.write_text(
        generic("123.0", "10:00:00", f'{PILOT}Error: "a \\"quoted\\" word\\nsecond line"')
        + generic("123.0", "10:00:01", "Hello from job 3")
    )
    reader = JelReader(jel)
    try:
        first, second = reader.read()
    finally:
        reader.close()
    assert first.chirp == Chirp("Error", 'a "quoted" word\nsecond line')
    assert (first.cluster, first.proc) == (123, 0)
    assert second.chirp is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('"Tasking"', "Tasking"),
        ('  "with \\"quotes\\" and \\\\ backslash"  ', 'with "quotes" and \\ backslash'),
        ("12", 12),
        ("-3", -3),
        ("1795860061.25", 1795860061.25),
        ("Tasking", "Tasking"),  # the original pilot's unquoted chirps, kept as they are
        ('"unterminated', '"unterminated'),
    ],
)
def test_chirped_values_are_classad_literals(text: str, value: str | int | float) -> None:
    assert chirp_value(text) == value
    assert type(chirp_value(text)) is type(value)


def test_only_ewms_pilot_chirps_of_known_attributes_are_chirps() -> None:
    assert parse_chirp(f'{PILOT}Status: "Done"') == Chirp("Status", "Done")
    assert parse_chirp(f"{PILOT}TasksTotal:7") == Chirp("TasksTotal", 7)
    assert parse_chirp(f"{PILOT}Unknown: 1") is None
    assert parse_chirp("SomethingElse: 1") is None
    assert parse_chirp(f"{PILOT}Status") is None


# --- the hold reason table --------------------------------------------------------------------


def test_each_code_of_htcondors_table_renders_as_its_message() -> None:
    # The manual's codes: 1, 3-27, 32-48 (2 and 28-31 are retired), and 0 for a hold with none.
    assert sorted(HOLD_CODES) == [0, 1, *range(3, 28), *range(32, 49)]
    for code, row in HOLD_CODES.items():
        assert hold_message(code) == row.message
        assert hold_message(code, 0) == row.message
        assert not row.message.endswith(".")


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (1, "UserRequest"),
        (3, "JobPolicy"),
        (12, "TransferOutputError"),
        (13, "TransferInputError"),
        (21, "StartdHeldJob"),
        (26, "SystemPolicy"),
        (34, "JobOutOfResources"),
        (46, "JobDurationExceeded"),
        (47, "JobExecuteExceeded"),
        (48, "HookShadowPrepareJobFailure"),
    ],
)
def test_codes_carry_htcondors_num_holds_by_reason_labels(code: int, label: str) -> None:
    assert HOLD_CODES[code].label == label


def test_a_subcode_with_no_meaning_is_shown_as_a_number() -> None:
    assert hold_message(1, 5) == "The user put the job on hold with condor_hold: subcode 5"
    assert hold_message(37, 99) == "User error in the EC2 universe: subcode 99"


def test_the_original_tms_key_is_held_then_the_message() -> None:
    # What the original's compound statuses are keyed by, as ``ewms watch`` prints a held worker.
    assert f"HELD: {hold_message(34, 0)}" == "HELD: Memory usage exceeds a memory limit"
