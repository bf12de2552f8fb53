"""``ewms events ...`` against a real ``ewms wms serve`` process, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ewms.v1 import event_service_pb2, event_service_pb2_grpc
from services.auth import read_admin_token
from tests.cli.test_cli import SEED, _wait_for_port, ewms, served  # noqa: F401  (served: fixture)
from tests.conftest import ROOT

ES = event_service_pb2


def submit(env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Submit the seed workflow; returns its id and its queue ids by alias."""
    out = json.loads(ewms("workflow", "submit", str(SEED), "--json", env=env).stdout)
    return out["workflow"]["workflow_id"], {q["alias"]: q["queue_id"] for q in out["queues"]}


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def stats(queue: str, env: dict[str, str]) -> dict[str, int]:
    out = json.loads(ewms("events", "stats", queue, "--json", env=env).stdout)
    return {k: int(v) for k, v in out.items() if k != "queue_id"}


def read_lines(*args: str, env: dict[str, str]) -> list[dict[str, Any]]:
    out = ewms("events", "read", *args, env=env).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def stub(served: dict[str, str]) -> Iterator[tuple[event_service_pb2_grpc.EventServiceStub, Any]]:  # noqa: F811
    """A raw EventService stub on the served WMS, with the admin token's metadata."""
    token = read_admin_token(Path(served["EWMS_DATA_DIR"]))
    assert token
    with grpc.insecure_channel(served["EWMS_WMS_ADDRESS"]) as channel:
        yield (
            event_service_pb2_grpc.EventServiceStub(channel),
            (("authorization", f"Bearer {token}"),),
        )


def test_publish_json_lines_then_read_with_ack_consumes_them(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    wf_id, queues = submit(served)
    events = write(
        tmp_path,
        "events.jsonl",
        '{"n": 1, "name": "a"}\n\n  \n[1, 2,  3]\n"just a string"\n',
    )
    out = ewms("events", "publish", f"{wf_id}/input-queue", "--file", events, env=served).stdout
    assert out == f"published 3 event(s) to {queues['input-queue']}\n"

    got = read_lines(queues["input-queue"], "--max", "10", "--ack", env=served)
    assert [e["payload"] for e in got] == [{"n": 1, "name": "a"}, [1, 2, 3], "just a string"]
    assert all(e["content_type"] == "application/json" for e in got)
    assert all(e["attempt"] == 1 and e["headers"] == {} for e in got)
    assert all(e["event_id"].startswith("EV-") for e in got)
    assert "payload_base64" not in got[0]
    assert stats(queues["input-queue"], served) == {
        "ready": 0,
        "in_flight": 0,
        "acked": 3,
        "dead_lettered": 0,
        "published": 3,
    }
    table = ewms("events", "stats", f"{wf_id}/input-queue", env=served).stdout.splitlines()
    assert table[0].split() == [
        "QUEUE",
        "READY",
        "IN_FLIGHT",
        "ACKED",
        "DEAD_LETTERED",
        "PUBLISHED",
    ]
    assert table[1].split() == [queues["input-queue"], "0", "0", "3", "0", "3"]
    # Acked events are gone for good.
    assert ewms("events", "read", queues["input-queue"], env=served).stdout == ""


def test_publish_json_reports_event_ids_and_compact_payloads(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, queues = submit(served)
    events = write(tmp_path, "e.jsonl", '{ "a" : [1,  2] }\n{"b": "é"}\n{"c": null}\n')
    out = json.loads(
        ewms(
            "events", "publish", queues["output-queue"], "--file", events, "--batch", "2",
            "--json", env=served,
        ).stdout
    )  # fmt: skip
    assert out["queue_id"] == queues["output-queue"] and out["n_published"] == 3
    assert len(set(out["event_ids"])) == 3
    got = read_lines(queues["output-queue"], "--ack", env=served)
    assert [e["event_id"] for e in got] == out["event_ids"]
    assert [e["payload"] for e in got] == [{"a": [1, 2]}, {"b": "é"}, {"c": None}]


def test_publish_text_lines_from_stdin(served: dict[str, str]) -> None:  # noqa: F811
    _, queues = submit(served)
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "events", "publish", queues["input-queue"],
         "--file", "-", "--text"],
        input="first line\n\nsecond {not json}\r\n  third  \n",
        env=served, capture_output=True, text=True, timeout=60, cwd=ROOT, check=True,
    )  # fmt: skip
    assert proc.stdout == f"published 3 event(s) to {queues['input-queue']}\n"
    got = read_lines(queues["input-queue"], "--ack", env=served)
    assert [(e["content_type"], e["payload"]) for e in got] == [
        ("text/plain", "first line"),
        ("text/plain", "second {not json}"),
        ("text/plain", "  third  "),
    ]


def test_binary_content_type_is_read_back_as_base64(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, queues = submit(served)
    events = write(tmp_path, "e.txt", "hello\n")
    ewms(
        "events", "publish", queues["input-queue"], "--file", events, "--text",
        "--content-type", "application/octet-stream", env=served,
    )  # fmt: skip
    (got,) = read_lines(queues["input-queue"], "--ack", env=served)
    assert got["content_type"] == "application/octet-stream"
    assert got["payload"] == "aGVsbG8=" and got["payload_base64"] is True


def test_read_without_ack_returns_events_to_the_queue_when_the_lease_expires(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    wf_id, queues = submit(served)
    q = queues["input-queue"]
    ewms("events", "publish", q, "--file", write(tmp_path, "e", "1\n2\n3\n"), env=served)

    proc = ewms("events", "read", f"{wf_id}/input-queue", "--lease", "1", env=served)
    first = [json.loads(line) for line in proc.stdout.splitlines()]
    # --max 10 > 3 ready: the leased events are not handed out twice within one read.
    assert [(e["payload"], e["attempt"]) for e in first] == [(1, 1), (2, 1), (3, 1)]
    assert "return to the queue when their 1 s lease expires" in proc.stderr
    time.sleep(2.5)
    again = read_lines(q, "--ack", env=served)
    assert [(e["event_id"], e["payload"], e["attempt"]) for e in again] == [
        (e["event_id"], e["payload"], 2) for e in first
    ]
    assert stats(q, served) == {
        "ready": 0,
        "in_flight": 0,
        "acked": 3,
        "dead_lettered": 0,
        "published": 3,
    }


def test_read_without_ack_keeps_events_in_flight_for_the_lease(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, queues = submit(served)
    q = queues["output-queue"]
    ewms("events", "publish", q, "--file", write(tmp_path, "e", "1\n2\n3\n"), env=served)
    leased = read_lines(q, "--max", "2", "--lease", "60", env=served)
    assert [e["payload"] for e in leased] == [1, 2]
    st = stats(q, served)
    assert (st["ready"], st["in_flight"], st["acked"]) == (1, 2, 0)
    # While leased, the two are not handed out again: only the third is ready.
    assert [e["payload"] for e in read_lines(q, "--lease", "60", env=served)] == [3]
    proc = ewms("events", "read", q, "--ack", env=served)
    assert proc.stdout == "" and "no events ready" in proc.stderr


def test_reading_without_ack_max_attempts_times_dead_letters_the_event(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    # What `ewms events read --help` warns about: a read is a delivery attempt (default 3).
    _, queues = submit(served)
    q = queues["input-queue"]
    ewms("events", "publish", q, "--file", write(tmp_path, "e", '"x"\n'), env=served)
    for attempt in (1, 2, 3):
        (event,) = read_lines(q, "--lease", "1", env=served)
        assert event["attempt"] == attempt
        time.sleep(1.6)
    assert ewms("events", "read", q, env=served).stdout == ""
    rows = ewms("events", "dead-letters", q, env=served).stdout.splitlines()
    assert len(rows) == 2
    assert rows[1].split()[:2] == [event["event_id"], "3"]
    assert rows[1].endswith("lease expired without ack or nack")


def test_read_max_spans_several_receive_calls(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, queues = submit(served)
    q = queues["input-queue"]
    lines = "".join(f"{i}\n" for i in range(250))
    ewms(
        "events", "publish", q, "--file", write(tmp_path, "e", lines), "--batch", "100", env=served
    )
    got = read_lines(q, "--max", "230", "--ack", env=served)
    assert [e["payload"] for e in got] == list(range(230))
    assert stats(q, served) == {
        "ready": 20,
        "in_flight": 0,
        "acked": 230,
        "dead_lettered": 0,
        "published": 250,
    }


def test_bad_json_line_exits_2_naming_the_line_and_publishes_nothing(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, queues = submit(served)
    events = write(tmp_path, "bad.jsonl", '{"ok": 1}\n\n{"broken": \n[2]\n')
    proc = ewms(
        "events", "publish", queues["input-queue"], "--file", events, env=served, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {events}: line 3 is not valid JSON; nothing was published",
        "  line 3: Expecting value (column 12)",
    ]
    assert proc.stdout == ""
    assert stats(queues["input-queue"], served)["published"] == 0


def test_unknown_queue_or_alias_exits_3(served: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    wf_id, _ = submit(served)
    events = write(tmp_path, "e", "1\n")
    proc = ewms("events", "publish", "Q-nope", "--file", events, env=served, check=False)
    assert proc.returncode == 3 and "NOT_FOUND" in proc.stderr and "Q-nope" in proc.stderr
    proc = ewms("events", "stats", f"{wf_id}/nope", env=served, check=False)
    assert proc.returncode == 3
    assert proc.stderr == (
        f"error: NOT_FOUND: workflow {wf_id} has no queue alias 'nope'; "
        "its aliases: input-queue, output-queue\n"
    )
    proc = ewms("events", "read", "WF-0000-0000/input-queue", env=served, check=False)
    assert proc.returncode == 3 and "NOT_FOUND" in proc.stderr


def test_another_users_queue_is_not_found(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, queues = submit(served)  # the admin's workflow
    token = ewms("token", "create", "--role", "user", "--subject", "alice", env=served).stdout
    alice = {**served, "EWMS_TOKEN": token.strip()}
    q = queues["input-queue"]
    # As for a queue that does not exist: whether it does is not alice's to know.
    proc = ewms("events", "stats", q, env=alice, check=False)
    assert proc.returncode == 3
    assert "NOT_FOUND" in proc.stderr and "another user" not in proc.stderr
    proc = ewms(
        "events", "publish", q, "--file", write(tmp_path, "e", "1\n"), env=alice, check=False
    )
    assert proc.returncode == 3 and "NOT_FOUND" in proc.stderr
    assert stats(q, served)["published"] == 0


@pytest.fixture
def small_wms(served: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:  # noqa: F811
    """A second WMS, served like ``served`` but with a 1 KiB event limit (EWMS_MAX_EVENT_BYTES);
    the environment it yields keeps the CLI's default limit, so the WMS is what rejects events."""
    env = {**served, "EWMS_MAX_EVENT_BYTES": "1024", "EWMS_DATA_DIR": str(tmp_path / "small")}
    log_path = tmp_path / "small-wms.log"
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
        client = {k: v for k, v in env.items() if k != "EWMS_MAX_EVENT_BYTES"}
        yield {**client, "EWMS_WMS_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_event_over_the_size_limit_exits_2_naming_its_line(
    small_wms: dict[str, str], tmp_path: Path
) -> None:
    _, queues = submit(small_wms)
    q = queues["input-queue"]
    lines = write(tmp_path, "e", f"ok 1\nok 2\n{'x' * 2000}\nok 4\n")
    res = ewms("events", "publish", q, "--file", lines, "--text", env=small_wms, check=False)
    assert res.returncode == 2
    err = res.stderr.splitlines()
    assert err[0].startswith("error: INVALID_ARGUMENT: the WMS rejected the batch of lines 1-4")
    assert err[0].endswith("; nothing was published")
    assert err[1:] == [
        "  line 3: payload is 2000 bytes, over the limit of 1024 bytes (EWMS_MAX_EVENT_BYTES)"
    ]
    assert stats(q, small_wms)["published"] == 0

    # In batches of 2 the first batch is stored before the second is rejected; the error says so.
    res = ewms(
        "events", "publish", q, "--file", lines, "--text", "--batch", "2", env=small_wms,
        check=False,
    )  # fmt: skip
    assert res.returncode == 2
    assert "the WMS rejected the batch of lines 3-4" in res.stderr
    assert "; 2 event(s) of earlier batches (lines 1-2) were published" in res.stderr
    assert "  line 3: payload is 2000 bytes" in res.stderr
    assert stats(q, small_wms)["published"] == 2


MIB = 1024 * 1024
BIG = 20 * MIB  # over the default limit of 16 MiB (and gRPC's receive limit of a default WMS)


def assert_nothing_published(queue: str, env: dict[str, str]) -> None:
    counts = stats(queue, env)
    assert (counts["published"], counts["ready"]) == (0, 0)


def test_json_line_over_the_default_limit_is_refused_naming_its_line(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, queues = submit(served)
    q = queues["input-queue"]
    big = '"' + "x" * (BIG - 2) + '"'  # compact JSON of exactly BIG bytes
    events = write(tmp_path, "big.jsonl", f'{{"n": 1}}\n{big}\n{{"n": 3}}\n')
    res = ewms("events", "publish", q, "--file", events, env=served, check=False)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"error: {events}: line 2 is over the limit of 16,777,216 bytes (EWMS_MAX_EVENT_BYTES); "
        "nothing was published",
        "  line 2: 20,971,520 bytes, over the limit of 16,777,216 bytes (EWMS_MAX_EVENT_BYTES)",
    ]
    assert res.stdout == ""
    assert_nothing_published(q, served)


def test_text_line_over_the_default_limit_is_refused_naming_its_line(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, queues = submit(served)
    q = queues["input-queue"]
    events = write(tmp_path, "big.txt", f"one\ntwo\n\n{'y' * BIG}\r\nfive\n")
    res = ewms("events", "publish", q, "--file", events, "--text", env=served, check=False)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"error: {events}: line 4 is over the limit of 16,777,216 bytes (EWMS_MAX_EVENT_BYTES); "
        "nothing was published",
        "  line 4: 20,971,520 bytes, over the limit of 16,777,216 bytes (EWMS_MAX_EVENT_BYTES)",
    ]
    assert_nothing_published(q, served)


def test_line_just_over_the_clients_own_limit_is_refused_naming_its_line(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, queues = submit(served)  # the WMS keeps its default limit: the CLI alone refuses
    q = queues["input-queue"]
    client = {**served, "EWMS_MAX_EVENT_BYTES": "1024"}
    events = write(tmp_path, "e", f"ok\n{'z' * 1024}\n{'z' * 1025}\nok\n")
    res = ewms("events", "publish", q, "--file", events, "--text", env=client, check=False)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"error: {events}: line 3 is over the limit of 1,024 bytes (EWMS_MAX_EVENT_BYTES); "
        "nothing was published",
        "  line 3: 1,025 bytes, over the limit of 1,024 bytes (EWMS_MAX_EVENT_BYTES)",
    ]
    assert_nothing_published(q, served)


def test_bad_and_oversized_json_lines_are_reported_together_in_file_order(
    served: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, queues = submit(served)
    q = queues["input-queue"]
    client = {**served, "EWMS_MAX_EVENT_BYTES": "1024"}
    long = '"' + "w" * 1100 + '"'
    events = write(tmp_path, "e.jsonl", f"1\n{long}\n{{oops\n{long}\n")
    res = ewms("events", "publish", q, "--file", events, env=client, check=False)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"error: {events}: 3 lines are not valid JSON or are over the limit of 1,024 bytes "
        "(EWMS_MAX_EVENT_BYTES); nothing was published",
        "  line 2: 1,102 bytes, over the limit of 1,024 bytes (EWMS_MAX_EVENT_BYTES)",
        "  line 3: Expecting property name enclosed in double quotes (column 2)",
        "  line 4: 1,102 bytes, over the limit of 1,024 bytes (EWMS_MAX_EVENT_BYTES)",
    ]
    assert_nothing_published(q, served)


def test_event_over_the_wms_message_limit_but_within_the_clients_exits_2_naming_its_line(
    small_wms: dict[str, str], tmp_path: Path
) -> None:
    # The WMS accepts gRPC messages of its limit (1 KiB) + 1 MiB; the CLI's limit is 16 MiB, so a
    # 2 MiB event reaches the WMS and is refused by gRPC (RESOURCE_EXHAUSTED), not by EventService.
    _, queues = submit(small_wms)
    q = queues["input-queue"]
    events = write(tmp_path, "e", f"ok 1\nok 2\n{'x' * (2 * MIB)}\nok 4\n")
    res = ewms("events", "publish", q, "--file", events, "--text", env=small_wms, check=False)
    assert res.returncode == 2
    err = res.stderr.splitlines()
    # ok 1 and ok 2 form the first batch, stored before the big event (which travels alone).
    assert err[0].startswith(
        "error: RESOURCE_EXHAUSTED: the WMS refused the batch of line 3 (2,097,152 bytes) as "
        "larger than it accepts ("
    )
    assert err[0].endswith("); 2 event(s) of earlier batches (lines 1-2) were published")
    assert err[1:] == ["  hint: the WMS's EWMS_MAX_EVENT_BYTES is likely smaller than this CLI's"]
    assert stats(q, small_wms)["published"] == 2


def test_dead_letters_are_listed_and_redriven(
    served: dict[str, str],  # noqa: F811
    stub: tuple[event_service_pb2_grpc.EventServiceStub, Any],
    tmp_path: Path,
) -> None:
    events_stub, metadata = stub
    wf_id, queues = submit(served)
    q = queues["input-queue"]
    published = json.loads(
        ewms(
            "events", "publish", q, "--file", write(tmp_path, "e", "1\n2\n3\n"), "--json",
            env=served,
        ).stdout
    )["event_ids"]  # fmt: skip
    assert ewms("events", "dead-letters", q, env=served).stdout == "(none)\n"

    received = events_stub.Receive(
        ES.ReceiveRequest(queue_id=q, max_events=2, lease_seconds=60), metadata=metadata
    )
    assert [d.event.event_id for d in received.deliveries] == published[:2]
    for d in received.deliveries:
        resp = events_stub.Nack(
            ES.NackRequest(
                queue_id=q,
                ack_id=d.ack_id,
                error=f"Traceback (most recent call last):\nValueError: bad {d.event.event_id}",
                dead_letter=True,
            ),
            metadata=metadata,
        )
        assert resp.dead_lettered

    table = ewms("events", "dead-letters", f"{wf_id}/input-queue", env=served).stdout.splitlines()
    assert table[0].split() == ["EVENT", "ATTEMPT", "DEAD_LETTERED", "LAST_ERROR"]
    assert len(table) == 3
    for row, event_id in zip(table[1:], published[:2], strict=True):
        assert row.startswith(event_id)
        assert row.split()[1] == "1"
        assert row.endswith(f"ValueError: bad {event_id}")
        assert "Traceback" not in row
    full = json.loads(ewms("events", "dead-letters", q, "--json", env=served).stdout)
    assert [d["event"]["event_id"] for d in full] == published[:2]
    assert full[0]["last_error"].startswith("Traceback (most recent call last):\n")
    limited = json.loads(
        ewms("events", "dead-letters", q, "--limit", "1", "--json", env=served).stdout
    )
    assert [d["event"]["event_id"] for d in limited] == published[:1]
    assert stats(q, served)["dead_lettered"] == 2

    # --event-id needs --redrive.
    proc = ewms("events", "dead-letters", q, "--event-id", published[0], env=served, check=False)
    assert proc.returncode == 2 and "--redrive" in proc.stderr
    out = ewms(
        "events", "dead-letters", q, "--redrive", "--event-id", published[1], env=served
    ).stdout
    assert out == f"re-drove 1 of 1 named dead letter(s) into {q}\n"
    assert [d["event"]["event_id"] for d in json.loads(
        ewms("events", "dead-letters", q, "--json", env=served).stdout
    )] == published[:1]  # fmt: skip
    out = json.loads(ewms("events", "dead-letters", q, "--redrive", "--json", env=served).stdout)
    assert out == {"queue_id": q, "n_redriven": 1}
    assert ewms("events", "dead-letters", q, env=served).stdout == "(none)\n"
    st = stats(q, served)
    assert st["dead_lettered"] == 0 and st["ready"] == 3

    got = read_lines(q, "--ack", env=served)
    assert sorted(e["event_id"] for e in got) == sorted(published)
    assert all(e["attempt"] == 1 for e in got)  # re-driven with a fresh attempt count
