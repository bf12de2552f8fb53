"""Pilot chirps read from job event logs in HTCondor's own text format (GENERIC events, parsed by
the real ``htcondor2.JobEventLog``), and HTCondor's hold reason table.

The chirps are written as the pilot writes them: ``services.pilot.chirp.Chirper`` with a sender
that appends each chirp to the log as the ``GENERIC`` event HTChirp's ``ulog`` makes of it.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from ewms.v1 import taskforce_pb2
from services.pilot.chirp import Chirper
from services.tms.chirps import Chirp, chirp_value, parse_chirp
from services.tms.hold_reasons import HOLD_CODES, hold_message
from services.tms.htcondor import HTCondorScheduler
from services.tms.job_event_log import EVENT_HEADER, JelReader, LogEvent
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
    held,
    submitted,
    take,
    terminated,
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


# --- bad text in the log -------------------------------------------------------------------------

GOOD = [
    submitted("123.0", "10:00:00"),
    executing("123.0", "10:01:00"),
    held("123.0", "10:02:00", "Error from slot1@ep: memory", 34),
    generic("123.0", "10:03:00", f'{PILOT}Status: "Tasking"'),
    terminated("123.0", "10:04:00"),
    submitted("124.1", "10:05:00"),
]
# An event cut off before its "..." line (the schedd died writing it, or the disk filled up).
TRUNCATED = "005 (123.000.000) 2026-11-21 10:01:30 Job terminated.\n\t(1) Normal termination\n"


def jobs(events: list[LogEvent]) -> list[tuple[int, int, int, float]]:
    return [(e.type, e.cluster, e.proc, e.time) for e in events]


def read_all(reader: JelReader) -> list[LogEvent]:
    """Everything the reader hands out until it has nothing more (a few polls' worth)."""
    out: list[LogEvent] = []
    while batch := reader.read():
        out += batch
    return out


def expected(*texts: str) -> list[tuple[int, int, int, float]]:
    """The events of well-formed ``texts``, as a reader of nothing else hands them out."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clean.jel"
        path.write_text("".join(texts))
        reader = JelReader(path)
        try:
            return jobs(read_all(reader))
        finally:
            reader.close()


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[JelReader]:
    r = JelReader(tmp_path / "x.jel")
    yield r
    r.close()


def test_lines_of_garbage_are_logged_and_the_events_after_them_read_at_once(
    reader: JelReader,
) -> None:
    garbage = b"\x00\xff\xfe binary \x01\nnot an event either\n"
    reader.path.write_bytes(GOOD[0].encode() + garbage + GOOD[1].encode() + GOOD[2].encode())

    with capture_logs() as logs:
        got = reader.read()

    assert jobs(got) == expected(*GOOD[:3])
    skipped = [e for e in logs if e["event"] == "job event log text that is no event skipped"]
    assert [(e["offset"], e["text"]) for e in skipped] == [
        (len(GOOD[0]), "\x00\ufffd\ufffd binary \x01\n"),
        (len(GOOD[0]) + 13, "not an event either\n"),
    ]


def test_an_event_cut_off_is_logged_and_the_event_it_swallowed_is_read(reader: JelReader) -> None:
    reader.path.write_text(GOOD[0] + TRUNCATED + TRUNCATED + GOOD[1] + GOOD[2])

    with capture_logs() as logs:
        got = read_all(reader)

    assert jobs(got) == expected(*GOOD[:3])
    corrupt = [e for e in logs if e["event"] == "corrupt job event skipped"]
    assert [(e["offset"], e["text"], e["error"]) for e in corrupt] == [
        (len(GOOD[0]), TRUNCATED, "ULOG_RD_ERROR"),
        (len(GOOD[0]) + len(TRUNCATED), TRUNCATED, "ULOG_RD_ERROR"),
    ]


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_an_event_being_written_is_read_once_complete_and_not_logged(
    reader: JelReader, cut: int
) -> None:
    # HTCondor's reader takes the first bytes of a header for garbage, and the event with them.
    reader.path.write_text(GOOD[0] + GOOD[1][:cut])
    with capture_logs() as logs:
        first = read_all(reader)
        with reader.path.open("a") as f:
            f.write(GOOD[1][cut:] + GOOD[2])
        then = read_all(reader)

    assert jobs(first) == expected(GOOD[0])
    assert jobs(then) == expected(GOOD[1], GOOD[2])
    assert [e for e in logs if e["log_level"] == "warning"] == []


async def test_the_scheduler_follows_a_log_with_bad_text_and_other_clusters(
    scheduler: HTCondorScheduler, tmp_path: Path
) -> None:
    jel = tmp_path / "2026-11-21.tms.jel"
    jel.write_bytes(
        submitted("123.0", "10:00:00").encode()
        + b"\x89PNG\r\n\x1a\n\x00\x00\n"
        + TRUNCATED.encode()
        + executing("123.1", "10:00:30").encode()  # swallowed by the truncated event
        + executing("999.0", "10:00:40").encode()  # not ours
        + CORRUPT.encode()
        + executing("123.0", "10:01:00").encode()
    )
    await scheduler.adopt([cluster(123, jel)])
    assert await take(scheduler, 3) == [
        change("123.0", IDLE, "10:00:00"),
        change("123.1", RUNNING, "10:00:30"),
        change("123.0", RUNNING, "10:01:00"),
    ]


def test_a_log_whose_first_line_is_garbage_is_reported_unreadable_once(
    reader: JelReader,
) -> None:
    # HTCondor tells a log's format from its first character: it reads none of this log.
    reader.path.write_bytes(b"\x00\x00\x00\n" + GOOD[0].encode() + GOOD[1].encode())

    with capture_logs() as logs:
        got = [*reader.read(), *reader.read()]

    assert got == []
    assert [(e["log_level"], e["text"]) for e in logs] == [("error", "\x00\x00\x00\n")]


def garbage_line() -> st.SearchStrategy[str]:
    """A line that is no event (nor its header): bytes as text, newline-free."""
    return (
        st.binary(max_size=40)
        .map(lambda b: b.replace(b"\n", b" ").decode("latin-1") + "\n")
        .filter(lambda line: EVENT_HEADER.match(line.encode("latin-1")) is None)
    )


# From a good event on (see the test above); no cut-off events: HTCondor's reader takes a second
# over each (the tests above have them).
PIECES = st.tuples(
    st.sampled_from(range(len(GOOD))),
    st.lists(st.one_of(st.sampled_from(range(len(GOOD))), garbage_line()), max_size=11),
).map(lambda first_rest: [first_rest[0], *first_rest[1]])


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(pieces=PIECES, cuts=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 3)), max_size=3))
def test_every_good_event_is_read_once_in_order_whatever_surrounds_it(
    tmp_path: Path, pieces: list[int | str], cuts: list[tuple[int, int]]
) -> None:
    # Written in parts, read after each: the good events come out in order, each once; nothing
    # raises. Parts end at the first bytes of a piece (a reader may see the schedd's writes half
    # done); other cuts cost HTCondor's reader a second each (the tests above have them).
    texts = [(GOOD[p] if isinstance(p, int) else p).encode("latin-1") for p in pieces]
    starts = [sum(map(len, texts[:i])) for i in range(len(texts))]
    text = b"".join(texts)
    ends = sorted(min(starts[i % len(starts)] + k, len(text)) for i, k in cuts)
    path = tmp_path / f"{abs(hash((tuple(pieces), tuple(cuts))))}.jel"
    path.write_bytes(b"")
    reader = JelReader(path)
    got: list[LogEvent] = []
    try:
        for start, end in zip([0, *ends], [*ends, len(text)], strict=True):
            with path.open("ab") as f:
                f.write(text[start:end])
            got += read_all(reader)
    finally:
        reader.close()
    assert jobs(got) == expected(*(GOOD[p] for p in pieces if isinstance(p, int)))
