"""The real pilot process against a real WMS, on both queue backends: one event's path from the
input queue through the task to every output queue, and everything that can go wrong on the way."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import signal
import sys
from pathlib import Path

import pytest

from ewms.v1 import event_service_pb2, queue_pb2, taskforce_pb2
from services.events.amqp import AmqpConnection
from services.pilot.hyperflow import EventsSubscription, declare_exchange
from services.wms import start_wms
from services.wms.control.pilots import ChangeKind, PilotChange
from tests.conftest import RABBITMQ_URL
from tests.events.conftest import settings_for
from tests.pilot.conftest import PilotEnv, wait_for
from tests.pilot.test_runtimes import busybox_image, require  # noqa: F401 (a fixture)

PY = sys.executable
FAIL_ON_POISON = (
    'sh -c \'if grep -q poison {{INFILE}}; then echo "it is poison" >&2; exit 3; fi; '
    "cp {{INFILE}} {{OUTFILE}}'"
)


def payloads(events: list[queue_pb2.Event]) -> list[bytes]:
    return sorted(e.payload for e in events)


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_each_event_is_copied_to_every_output_queue(penv: PilotEnv) -> None:
    sent = [f"event {i}".encode() for i in range(20)]
    ids = await penv.publish(sent)
    assert await penv.run_pilot("cp {{INFILE}} {{OUTFILE}}") == 0
    for alias in ("out", "out2"):
        got = await penv.outputs(alias, 20)
        assert payloads(got) == sorted(sent)
        assert {e.provenance.input_event_id for e in got} == set(ids)
        assert all(e.provenance.taskforce_uuid == penv.taskforce_uuid for e in got)
        assert all(e.content_type == "text/plain" for e in got)
    stats = await penv.settled("in")
    assert (stats.ready, stats.in_flight, stats.dead_lettered) == (0, 0, 0)


async def test_json_payloads_round_trip_as_json(penv: PilotEnv) -> None:
    script = (
        "import json,sys; d=json.load(open(sys.argv[1])); d['n']*=2; "
        "json.dump(d, open(sys.argv[2],'w'))"
    )
    sent = [json.dumps({"n": i}).encode() for i in range(5)]
    await penv.publish(sent, content_type="application/json")
    code = await penv.run_pilot(
        f"{PY} -c {json.dumps(script)} {{{{INFILE}}}} {{{{OUTFILE}}}}",
        EWMS_PILOT_INFILE_EXT=".json",
        EWMS_PILOT_OUTFILE_EXT=".json",
    )
    assert code == 0
    got = await penv.outputs("out", 5)
    assert sorted(json.loads(e.payload)["n"] for e in got) == [0, 2, 4, 6, 8]
    assert all(e.content_type == "application/json" for e in got)


async def test_binary_payloads_are_kept_byte_for_byte(penv: PilotEnv) -> None:
    blob = bytes(range(256)) * 4 + b"\x00\xff\xfe"
    await penv.publish([blob], content_type="application/octet-stream")
    assert await penv.run_pilot("cp {{INFILE}} {{OUTFILE}}") == 0
    [got] = await penv.outputs("out", 1)
    assert got.payload == blob
    assert got.content_type == "application/octet-stream"


async def test_every_file_in_outdir_becomes_its_own_event(penv: PilotEnv) -> None:
    await penv.publish([b"abc"])
    task = (
        'sh -c \'for p in 1 2 3; do printf "part $p of " > {{OUTDIR}}/part-$p.txt; '
        "cat {{INFILE}} >> {{OUTDIR}}/part-$p.txt; done'"
    )
    assert await penv.run_pilot(task) == 0
    for alias in ("out", "out2"):
        got = await penv.outputs(alias, 3)
        assert payloads(got) == [b"part 1 of abc", b"part 2 of abc", b"part 3 of abc"]
        assert sorted(e.headers["filename"] for e in got) == [
            "part-1.txt",
            "part-2.txt",
            "part-3.txt",
        ]


async def test_a_task_without_output_acks_and_publishes_nothing(penv: PilotEnv) -> None:
    await penv.publish([b"a", b"b", b"c"])
    assert await penv.run_pilot("true") == 0
    stats = await penv.settled("in")
    assert (stats.ready, stats.in_flight, stats.dead_lettered) == (0, 0, 0)
    assert (await penv.stats("out")).ready == 0


async def test_each_task_finds_a_clean_directory_though_directories_are_reused(
    penv: PilotEnv,
) -> None:
    ids = await penv.publish([b"1", b"2", b"3", b"4"])
    # Each task lists its directory, then litters it (files, a read-only tree, outdir files).
    task = (
        "sh -c 'pwd > {{OUTFILE}}; ls -A >> {{OUTFILE}}; echo litter > stray.txt; "
        "mkdir -p junk/deep; chmod 500 junk/deep junk; echo extra > {{OUTDIR}}/extra.txt'"
    )
    env = penv.pilot_environment(task, EWMS_PILOT_MAX_CONCURRENT_TASKS="1", EWMS_PILOT_PREFETCH="2")
    assert await (await penv.start_pilot_env(env)).wait(60) == 0
    got = await penv.outputs("out", 8)
    listings = {
        e.provenance.input_event_id: e.payload.decode().split("\n", 1)
        for e in got
        if "filename" not in e.headers
    }
    assert sorted(listings) == sorted(ids)
    # At most prefetch (2) directories for 4 events: they were reused.
    assert len({cwd for cwd, _ in listings.values()}) <= 2
    for event_id, (_, listing) in listings.items():
        names = listing.split()
        assert sorted(names) == sorted(
            [f"infile-{event_id}.in", "outdir", f"outfile-{event_id}.out"]
        )
    # None is left behind.
    data = Path(env["EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST"]) / "ewms-pilot-data"
    assert sorted(p.name for p in data.iterdir()) == ["data-hub"]


async def test_task_sees_placeholders_and_environment(penv: PilotEnv) -> None:
    await penv.publish([b"x"])
    task = (
        "sh -c 'echo \"$EWMS_TASK_INFILE|$EWMS_TASK_OUTFILE|$EWMS_TASK_DATA_HUB_DIR|$GREETING|"
        "{{IN_FILE}}|{{DATAHUB}}|${EWMS_PILOT_TOKEN:-}\" > {{OUT_FILE}}'"
    )
    env_json = json.dumps({"GREETING": "hello world"})
    assert await penv.run_pilot(task, EWMS_PILOT_TASK_ENV_JSON=env_json) == 0
    [got] = await penv.outputs("out", 1)
    infile, outfile, hub, greeting, infile2, hub2, token = got.payload.decode().strip().split("|")
    assert infile == infile2 and infile.endswith(".in") and "/task-io/infile-EV-" in infile
    assert outfile.endswith(".out") and Path(outfile).parent == Path(infile).parent
    assert hub == hub2 and hub.endswith("ewms-pilot-data/data-hub")
    assert greeting == "hello world"
    assert token == ""  # the pilot's own settings (and secrets) are not passed on


async def test_init_task_prepares_the_data_hub_before_the_first_event(penv: PilotEnv) -> None:
    await penv.publish([b"1", b"2"])
    code = await penv.run_pilot(
        "sh -c 'cat {{DATA_HUB}}/prefix {{INFILE}} > {{OUTFILE}}'",
        EWMS_PILOT_INIT_ARGS="sh -c 'printf ready- > {{DATA_HUB}}/prefix'",
        EWMS_PILOT_INIT_TIMEOUT="10",
    )
    assert code == 0
    assert payloads(await penv.outputs("out", 2)) == [b"ready-1", b"ready-2"]


@pytest.mark.parametrize(
    ("init_args", "limit", "error"),
    [
        ("sh -c 'echo init broke >&2; exit 4'", "10", "init failed (exit code 4): init broke"),
        ("sleep 30", "0.5", "init timed out after 0.5s"),
    ],
    ids=["failure", "timeout"],
)
async def test_init_failure_is_fatal_and_consumes_nothing(
    penv: PilotEnv, init_args: str, limit: str, error: str
) -> None:
    await penv.publish([b"1", b"2"])
    pilot = await penv.start_pilot(
        "cp {{INFILE}} {{OUTFILE}}", EWMS_PILOT_INIT_ARGS=init_args, EWMS_PILOT_INIT_TIMEOUT=limit
    )
    assert await pilot.wait() == 1
    assert error in pilot.log()
    stats = await penv.settled("in")
    assert (stats.ready, stats.in_flight) == (2, 0)

    async def fatal_reported() -> bool:
        tf = await penv.taskforce()
        return any(error in e for e in tf.top_task_errors)

    await wait_for(fatal_reported, what="the init error in top_task_errors")


async def test_task_timeout_kills_the_whole_process_group(penv: PilotEnv) -> None:
    await penv.publish([b"slow"])
    task = "sh -c 'sleep 300 & echo $! > {{DATA_HUB}}/grandchild.pid; wait'"
    pilot = await penv.start_pilot(
        task,
        EWMS_PILOT_TASK_TIMEOUT="1",
        EWMS_PILOT_TASK_KILL_GRACE="1",
        EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR="false",
    )
    assert await pilot.wait() == 0
    pid_file = next(penv.tmp.glob("pilot-*/ewms-pilot-data/data-hub/grandchild.pid"))
    assert not pid_alive(int(pid_file.read_text()))
    assert "task timed out after 1s" in pilot.log()


async def test_a_poison_event_is_dead_lettered_while_the_rest_complete(penv: PilotEnv) -> None:
    sent = [f"good {i}".encode() for i in range(9)] + [b"poison"]
    ids = await penv.publish(sent)
    code = await penv.run_pilot(
        FAIL_ON_POISON,
        EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR="false",
        EWMS_PILOT_MAX_CONCURRENT_TASKS="2",
    )
    assert code == 0
    assert payloads(await penv.outputs("out", 9)) == sorted(sent[:9])
    stats = await penv.settled("in")
    assert (stats.ready, stats.in_flight, stats.dead_lettered) == (0, 0, 1)
    dead = await penv.q.events.ListDeadLetters(
        event_service_pb2.ListDeadLettersRequest(queue_id=penv.queue("in").queue_id),
        metadata=penv.q.alice,
    )
    [letter] = dead.dead_letters
    assert letter.event.event_id == ids[-1]
    assert "task failed (exit code 3): it is poison" in letter.last_error


async def test_a_task_error_stops_the_pilot_and_returns_the_event(penv: PilotEnv) -> None:
    # The original's behaviour, now opted into (the default is to go on).
    await penv.publish([b"poison"])
    pilot = await penv.start_pilot(FAIL_ON_POISON, EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR="true")
    assert await pilot.wait() == 1
    stats = await penv.settled("in")
    assert (stats.ready, stats.in_flight, stats.dead_lettered) == (1, 0, 0)
    assert "FATAL_ERROR" in pilot.log()


async def test_okay_errors_do_not_stop_the_pilot(penv: PilotEnv) -> None:
    await penv.publish([b"poison", b"fine"])
    code = await penv.run_pilot(
        FAIL_ON_POISON,
        EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR="true",
        EWMS_PILOT_OKAY_ERRORS="ContainerRunError",
    )
    assert code == 0
    assert payloads(await penv.outputs("out", 1)) == [b"fine"]


async def test_sigterm_drains_and_loses_nothing(penv: PilotEnv) -> None:
    sent = [f"e{i}".encode() for i in range(8)]
    await penv.publish(sent)
    # Each task marks its start in the data hub: the signal comes while one runs.
    task = "sh -c 'touch {{DATA_HUB}}/started-$$; sleep 0.5; cp {{INFILE}} {{OUTFILE}}'"
    env = penv.pilot_environment(
        task, EWMS_PILOT_MAX_CONCURRENT_TASKS="2", EWMS_PILOT_DRAIN_GRACE="30"
    )
    hub = Path(env["EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST"]) / "ewms-pilot-data" / "data-hub"
    pilot = await penv.start_pilot_env(env)

    async def a_task_runs() -> bool:
        return hub.is_dir() and any(hub.glob("started-*"))

    await wait_for(a_task_runs, 30, "a task to start")
    pilot.signal(signal.SIGTERM)
    assert await pilot.wait() == 0
    assert "DRAINING" in pilot.log()
    stats = await penv.settled("in")
    assert stats.in_flight == 0
    done = 8 - stats.ready
    assert 1 <= done < 8
    first = await penv.outputs("out", done)
    assert await penv.run_pilot(task) == 0
    rest = await penv.outputs("out", 8 - done)
    assert payloads(first + rest) == sorted(sent)


async def test_a_signal_after_the_wms_asked_to_drain_still_drains(penv: PilotEnv) -> None:
    # A finished workflow: the WMS drains its pilots, then the TMS removes the cluster (SIGTERM).
    await penv.publish([b"only"])
    task = "sh -c 'touch {{DATA_HUB}}/started; sleep 1; cp {{INFILE}} {{OUTFILE}}'"
    env = penv.pilot_environment(task, EWMS_PILOT_DRAIN_GRACE="30")
    hub = Path(env["EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST"]) / "ewms-pilot-data" / "data-hub"
    pilot = await penv.start_pilot_env(env)

    async def started() -> bool:
        return (hub / "started").exists()

    await wait_for(started, 30, "the task to start")
    penv.q.wms.pilots.drain(penv.taskforce_uuid, "workflow finished")
    await pilot.wait_log("the WMS asked")
    pilot.signal(signal.SIGTERM)
    assert await pilot.wait() == 0
    assert "SIGTERM again" not in pilot.log()
    assert payloads(await penv.outputs("out", 1)) == [b"only"]


async def test_kill_9_mid_task_loses_nothing(penv: PilotEnv) -> None:
    sent = [f"k{i}".encode() for i in range(4)]
    await penv.publish(sent)
    task = "sh -c 'sleep 0.3; cp {{INFILE}} {{OUTFILE}}'"
    pilot = await penv.start_pilot(task)
    await pilot.wait_log("PILOT_PHASE_TASKING")
    pilot.signal(signal.SIGKILL)
    assert await pilot.wait() == -signal.SIGKILL
    assert await penv.run_pilot(task) == 0
    got = await penv.outputs("out", 4)
    assert payloads(got) == sorted(sent)
    assert (await penv.stats("in")).ready == 0


async def test_the_wms_sees_phases_and_counters(penv: PilotEnv) -> None:
    await penv.publish([b"a", b"poison", b"c"])
    code = await penv.run_pilot(FAIL_ON_POISON, EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR="0")
    assert code == 0

    async def rolled_up() -> bool:
        tf = await penv.taskforce()
        c = tf.counters
        return (c.events_received, c.tasks_succeeded) == (4, 2) and c.tasks_failed == 2

    await wait_for(rolled_up, what="the taskforce counters")
    tf = await penv.taskforce()
    assert tf.counters.events_published == 4  # two outputs, each to two queues
    [(error, pilots)] = tf.top_task_errors.items()
    assert "it is poison" in error and pilots == 1


async def test_keep_all_task_files_keeps_each_task_directory(penv: PilotEnv) -> None:
    await penv.publish([b"keep me"])
    env = penv.pilot_environment(
        "sh -c 'echo to-stdout; echo to-stderr >&2; cp {{INFILE}} {{OUTFILE}}'",
        EWMS_PILOT_KEEP_ALL_TASK_FILES="true",
    )
    assert await (await penv.start_pilot_env(env)).wait() == 0
    data = Path(env["EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST"]) / "ewms-pilot-data"
    [task_dir] = [p for p in data.iterdir() if p.name.startswith("EV-")]
    assert (task_dir / "outputs" / "stdoutfile").read_text() == "to-stdout\n"
    assert (task_dir / "outputs" / "stderrfile").read_text() == "to-stderr\n"
    assert len(list((task_dir / "task-io").glob("infile-*"))) == 1


async def test_failed_task_directories_are_kept_and_successful_ones_removed(
    penv: PilotEnv,
) -> None:
    await penv.publish([b"poison", b"fine"])
    env = penv.pilot_environment(FAIL_ON_POISON, EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR="0")
    env["EWMS_PILOT_QUEUE_INCOMING_MAX_ATTEMPTS"] = "1"
    assert await (await penv.start_pilot_env(env)).wait() == 0
    data = Path(env["EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST"]) / "ewms-pilot-data"
    kept = [p for p in data.iterdir() if p.name.startswith("EV-")]
    assert len(kept) >= 1
    assert all((p / "outputs" / "stderrfile").read_text() == "it is poison\n" for p in kept)


async def test_invalid_configuration_lists_every_bad_variable_and_consumes_nothing(
    penv: PilotEnv,
) -> None:
    await penv.publish([b"untouched"])
    pilot = await penv.start_pilot(
        "cp {{INFILE}} {{OUTFILE}}",
        EWMS_PILOT_MAX_CONCURRENT_TASKS="zero",
        EWMS_PILOT_TASK_TIMEOUT="-3",
        EWMS_PILOT_TASK_ENV_JSON="{not json",
        EWMS_PILOT_RUNTIME="chroot",
        EWMS_PILOT_QUEUE_INCOMING_BROKER_TYPE="pulsar",
    )
    assert await pilot.wait() == 2
    log = pilot.log()
    for name in (
        "EWMS_PILOT_MAX_CONCURRENT_TASKS",
        "EWMS_PILOT_TASK_TIMEOUT",
        "EWMS_PILOT_TASK_ENV_JSON",
        "EWMS_PILOT_RUNTIME",
        "EWMS_PILOT_QUEUE_INCOMING_BROKER_TYPE",
    ):
        assert name in log
    stats = await penv.settled("in")
    assert (stats.ready, stats.in_flight) == (1, 0)


async def test_idle_pilot_without_events_ends_cleanly(penv: PilotEnv) -> None:
    pilot = await penv.start_pilot(
        "cp {{INFILE}} {{OUTFILE}}", EWMS_PILOT_TIMEOUT_QUEUE_WAIT_FOR_FIRST_MESSAGE="0.5"
    )
    assert await pilot.wait() == 0
    assert "waited 0.5s for an event" in pilot.log()


async def test_the_wms_sees_every_phase_in_order(penv: PilotEnv) -> None:
    phases: list[int] = []

    def on_change(change: PilotChange) -> None:
        if change.kind == ChangeKind.STATUS and (not phases or phases[-1] != change.pilot.phase):
            phases.append(change.pilot.phase)

    penv.q.wms.pilots.listen(on_change)
    await penv.publish([b"a", b"b"])
    code = await penv.run_pilot("cp {{INFILE}} {{OUTFILE}}", EWMS_PILOT_INIT_ARGS="true")
    assert code == 0

    async def done() -> bool:
        return taskforce_pb2.PILOT_PHASE_DONE in phases

    await wait_for(done, what="the DONE phase")
    assert phases == [
        taskforce_pb2.PILOT_PHASE_STARTED,
        taskforce_pb2.PILOT_PHASE_RUNNING_INIT,
        taskforce_pb2.PILOT_PHASE_AWAITING_FIRST_EVENT,
        taskforce_pb2.PILOT_PHASE_TASKING,
        taskforce_pb2.PILOT_PHASE_DONE,
    ]


async def test_the_pilot_keeps_working_across_a_wms_restart(penv: PilotEnv) -> None:
    pilot = await penv.start_pilot(
        "cp {{INFILE}} {{OUTFILE}}", EWMS_PILOT_TIMEOUT_QUEUE_INCOMING="60"
    )
    await penv.publish([b"before"])
    assert payloads(await penv.outputs("out", 1)) == [b"before"]
    old = penv.q.wms
    await old.stop(grace=None)
    penv.q.wms = await start_wms(
        settings_for(
            penv.backend,
            penv.tmp / "wms-data",
            max_event_bytes=1024 * 1024,
            grpc_port=old.port,
        )
    )
    # The same channel reconnects to the restarted WMS; the pilot re-subscribes on its own.
    await penv.publish([b"after"])
    # At-least-once: an ack in flight when the WMS stopped may bring "before" round again.
    seen: list[bytes] = []
    while b"after" not in seen:
        seen += payloads(await penv.outputs("out", 1))
    assert set(seen) <= {b"before", b"after"}

    async def reconnected() -> bool:
        [state] = await penv.q.wms.pilots.pilots(penv.taskforce_uuid)
        return state.connected and state.counters.tasks_succeeded >= 2

    await wait_for(reconnected, what="the pilot's status on the restarted WMS")
    pilot.signal(signal.SIGTERM)
    assert await pilot.wait() == 0


async def test_bwrap_runs_each_task_sandboxed(penv: PilotEnv) -> None:
    if penv.backend != "embedded":
        pytest.skip("the runtime does not depend on the queue backend")
    require(None if shutil.which("bwrap") else "bwrap is not installed", "bwrap")
    outside = penv.tmp / "outside.txt"
    await penv.publish([b"sandboxed"])
    task = f"sh -c 'cp {{{{INFILE}}}} {{{{OUTFILE}}}}; echo escaped > {outside} 2>/dev/null; true'"
    assert await penv.run_pilot(task, EWMS_PILOT_RUNTIME="bwrap") == 0
    assert payloads(await penv.outputs("out", 1)) == [b"sandboxed"]
    assert not outside.exists()


async def test_lifecycle_events_reach_the_hyperflow_exchange_under_its_routing_keys(
    penv: PilotEnv,
) -> None:
    if penv.backend != "rabbitmq":
        pytest.skip("the monitoring exchange is on RabbitMQ")
    exchange = f"ewms-test-events-{secrets.token_hex(4)}"
    connection = await AmqpConnection.open(RABBITMQ_URL, name="test-events")
    try:
        await declare_exchange(connection, exchange)
        sub = await EventsSubscription.open(RABBITMQ_URL, exchange, ["#"])
        [event_id] = await penv.publish([b"watched"])
        code = await penv.run_pilot(
            "cp {{INFILE}} {{OUTFILE}}",
            EWMS_PILOT_EVENTS_EXCHANGE=exchange,
            EWMS_PILOT_EVENTS_URL=RABBITMQ_URL,
            EWMS_PILOT_WORKER_ID="executor-7",
        )
        assert code == 0
        got: dict[str, dict[str, object]] = {}

        async def collect() -> None:
            async for received in sub:
                fields = received.fields()
                assert fields is not None
                got[received.routing_key] = fields
                if received.routing_key == f"job.{event_id}.finished":
                    return

        await asyncio.wait_for(collect(), 30)
        await sub.close()
    finally:
        channel = await connection.channel()
        await channel.delete_exchange(exchange)
        await connection.close()
    job = f"job.{event_id}"
    assert list(got) == [
        "executor.ready",
        f"{job}.started",
        f"{job}.stage_in.started",
        f"{job}.stage_in.finished",
        f"{job}.execution.started",
        f"{job}.execution.finished",
        f"{job}.stage_out.started",
        f"{job}.stage_out.finished",
        f"{job}.finished",
    ]
    assert all(f["executor"] == "executor-7" for f in got.values())
    assert got["executor.ready"]["hostname"]
    assert got[f"{job}.execution.finished"]["exit_status"] == 0
    assert got[f"{job}.stage_in.finished"]["bytes"] == len(b"watched")
    finished = got[f"{job}.finished"]
    assert finished["exit_status"] == 0 and finished["executable"] == "cp"
    metrics = finished["metrics"]
    assert isinstance(metrics, dict)
    assert metrics["input_size"] == metrics["output_size"] == len(b"watched")
    assert metrics["execution"] > 0 and metrics["max_rss_bytes"] > 0


async def test_podman_runs_each_task_in_a_container(
    penv: PilotEnv,
    busybox_image: str,  # noqa: F811 (the fixture)
) -> None:
    if penv.backend != "embedded":
        pytest.skip("the runtime does not depend on the queue backend")
    await penv.publish([b"contained"])
    task = "sh -c 'cat {{INFILE}} > {{OUTFILE}}; echo \" in $EWMS_TASK_OUTFILE\" >> {{OUTFILE}}'"
    code = await penv.run_pilot(
        task, EWMS_PILOT_RUNTIME="podman", EWMS_PILOT_TASK_IMAGE=busybox_image
    )
    assert code == 0
    [got] = await penv.outputs("out", 1)
    assert got.payload.decode().split() == [
        "contained",
        "in",
        "/ewms-pilot-data/task-io/" + ("outfile-" + got.provenance.input_event_id + ".out"),
    ]


async def test_an_output_over_the_size_limit_fails_the_task_clearly(penv: PilotEnv) -> None:
    await penv.publish([b"x" * 100])
    pilot = await penv.start_pilot(
        "cp {{INFILE}} {{OUTFILE}}",
        EWMS_PILOT_MAX_EVENT_BYTES="64",
        EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR="false",
    )
    assert await pilot.wait() == 0
    stats = await penv.settled("in")
    assert (stats.ready, stats.in_flight, stats.dead_lettered) == (0, 0, 1)
    dead = await penv.q.events.ListDeadLetters(
        event_service_pb2.ListDeadLettersRequest(queue_id=penv.queue("in").queue_id),
        metadata=penv.q.alice,
    )
    assert "is 100 bytes, over the event size limit of 64 bytes" in dead.dead_letters[0].last_error
    assert (await penv.stats("out")).ready == 0


@pytest.mark.parametrize(
    ("action", "request_type"),
    [("FinishWorkflow", "FinishWorkflowRequest"), ("AbortWorkflow", "AbortWorkflowRequest")],
)
async def test_finishing_or_aborting_the_workflow_ends_its_pilots(
    penv: PilotEnv, action: str, request_type: str
) -> None:
    from ewms.v1 import workflow_service_pb2

    await penv.publish([f"w{i}".encode() for i in range(20)])
    pilot = await penv.start_pilot(
        "sh -c 'sleep 0.2; cp {{INFILE}} {{OUTFILE}}'", EWMS_PILOT_TIMEOUT_QUEUE_INCOMING="60"
    )
    await pilot.wait_log("PILOT_PHASE_TASKING")
    request = getattr(workflow_service_pb2, request_type)(
        workflow_id=penv.workflow.workflow.workflow_id
    )
    await getattr(penv.q.workflows, action)(request, metadata=penv.q.alice)
    assert await pilot.wait(within=30) == 0
    assert "the WMS asked: workflow" in pilot.log()
    stats = await penv.settled("in")
    assert stats.ready > 0  # the rest is back in the queue
