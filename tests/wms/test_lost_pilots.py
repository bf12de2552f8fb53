"""Pilots that vanish, on a real WMS: a pilot whose stream ends without DONE or FATAL_ERROR is LOST
once its job has ended (its TMS says so, with how the job's process ended) or once it has not
reconnected within the grace; a pilot that reconnects is live again. grpc.aio clients play the TMS
and the pilots."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2

from ewms.v1 import pilot_service_pb2, task_manager_service_pb2, taskforce_pb2
from services.errors import field_violations
from services.wms.control.pilots import ChangeKind, PilotChange
from tests.wms.helpers import (
    Env,
    PilotStream,
    StartEnv,
    TmsStream,
    compound,
    eventually,
    submitted_taskforce,
)

tms = task_manager_service_pb2
ps = pilot_service_pb2
Job = taskforce_pb2.JobState
Pilot = taskforce_pb2.PilotPhase
SIGKILL = 9


def stamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def ended(
    uuid: str, worker: str, state: int, exit_code: int = 0, signal: int = 0
) -> tms.JobStatusSnapshot:
    """A snapshot of one worker whose job ended, with its exit."""
    return tms.JobStatusSnapshot(
        taskforces=[
            tms.TaskforceJobStatus(
                taskforce_uuid=uuid,
                workers=[
                    tms.WorkerJobState(
                        worker_id=worker,
                        job_state=state,  # type: ignore[arg-type]
                        job_exit=taskforce_pb2.JobExit(exit_code=exit_code, signal=signal),
                    )
                ],
            )
        ]
    )


def running(uuid: str, worker: str) -> tms.JobStatusSnapshot:
    return tms.JobStatusSnapshot(
        taskforces=[
            tms.TaskforceJobStatus(
                taskforce_uuid=uuid,
                workers=[tms.WorkerJobState(worker_id=worker, job_state=Job.JOB_STATE_RUNNING)],
            )
        ]
    )


def killed_row(phase: int, count: int = 1) -> taskforce_pb2.CompoundStatus:
    return taskforce_pb2.CompoundStatus(
        job_state=Job.JOB_STATE_COMPLETED,
        pilot_phase=phase,  # type: ignore[arg-type]
        count=count,
        job_exit=taskforce_pb2.JobExit(signal=SIGKILL),
    )


async def statuses_become(
    env: Env, uuid: str, expected: list[taskforce_pb2.CompoundStatus]
) -> taskforce_pb2.Taskforce:
    """The taskforce once its stored compound statuses are ``expected``."""
    found: list[taskforce_pb2.Taskforce] = []

    async def stored() -> bool:
        found[:] = [await env.taskforce(uuid)]
        return list(found[0].compound_statuses) == expected

    await eventually(stored, f"compound statuses of {uuid}: {expected}")
    return found[0]


async def tasking_pilot(
    env: Env, stream: TmsStream, n_workers: int = 1
) -> tuple[str, PilotStream, tms.StartTaskforce]:
    """A submitted taskforce (cluster 7) and the open stream of its pilot 7.0, RUNNING and
    TASKING."""
    tf, start = await submitted_taskforce(env, stream, 7, n_workers=n_workers)
    uuid = tf.taskforce_uuid
    await stream.send(snapshot=running(uuid, "7.0"))
    pilot = env.pilot(start.pilot_token)
    await pilot.hello(uuid, worker_id="7.0")
    await pilot.status(Pilot.PILOT_PHASE_TASKING)
    row = compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_TASKING, 1))
    await statuses_become(env, uuid, row)
    return uuid, pilot, start


async def test_a_pilot_killed_mid_task_is_lost_with_the_signal_and_its_counters_caught_up(
    env: Env,
) -> None:
    stream = env.tms()
    await stream.hello()
    uuid, pilot, _ = await tasking_pilot(env, stream)
    t0 = time.time()
    counted = ps.PilotStatus(
        phase=Pilot.PILOT_PHASE_TASKING,
        counters=taskforce_pb2.TaskCounters(events_received=3, tasks_succeeded=2),
        timestamp=stamp(t0),
    )
    await pilot.send(status=counted)

    def event(n: int, kind: int, at: float) -> ps.TaskLifecycleEvent:
        return ps.TaskLifecycleEvent(event_id=f"EV-{n}", kind=kind, timestamp=stamp(at))  # type: ignore[arg-type]

    # Event 3 finished before the status (counted by it); event 4 came and finished after it,
    # event 5 came after it: the status that would have counted those two is never sent.
    await pilot.send(
        task_events=ps.TaskLifecycleEvents(
            events=[
                event(3, ps.TASK_EVENT_KIND_FINISHED, t0 - 0.5),
                event(4, ps.TASK_EVENT_KIND_STARTED, t0 + 0.1),
                event(4, ps.TASK_EVENT_KIND_FINISHED, t0 + 0.2),
                event(5, ps.TASK_EVENT_KIND_STARTED, t0 + 0.3),
            ]
        )
    )

    async def events_kept() -> bool:
        return len(env.wms.pilots.recent_task_events(uuid)) == 4

    await eventually(events_kept, "the task events are kept")
    pilot.call.cancel()  # kill -9: the stream ends without DONE
    await stream.send(snapshot=ended(uuid, "7.0", Job.JOB_STATE_COMPLETED, signal=SIGKILL))

    tf = await statuses_become(env, uuid, [killed_row(Pilot.PILOT_PHASE_LOST)])
    assert tf.counters == taskforce_pb2.TaskCounters(events_received=5, tasks_succeeded=3)


async def test_a_pilot_whose_stream_ends_after_its_job_did_is_lost_then(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    uuid, pilot, _ = await tasking_pilot(env, stream)

    await stream.send(snapshot=ended(uuid, "7.0", Job.JOB_STATE_COMPLETED, signal=SIGKILL))
    # Its stream is still open (the WMS has not seen it end yet): not lost.
    await statuses_become(env, uuid, [killed_row(Pilot.PILOT_PHASE_TASKING)])

    pilot.call.cancel()
    await statuses_become(env, uuid, [killed_row(Pilot.PILOT_PHASE_LOST)])


async def test_a_pilot_that_said_done_is_not_lost_when_its_job_ends(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    uuid, pilot, _ = await tasking_pilot(env, stream)
    heard: list[PilotChange] = []
    env.wms.pilots.listen(heard.append)

    await pilot.status(Pilot.PILOT_PHASE_DONE)
    await pilot.call.done_writing()
    assert await pilot.ended_cleanly()
    await stream.send(snapshot=ended(uuid, "7.0", Job.JOB_STATE_COMPLETED))

    done = taskforce_pb2.CompoundStatus(
        job_state=Job.JOB_STATE_COMPLETED,
        pilot_phase=Pilot.PILOT_PHASE_DONE,
        count=1,
        job_exit=taskforce_pb2.JobExit(exit_code=0),
    )
    await statuses_become(env, uuid, [done])
    assert ChangeKind.LOST not in {c.kind for c in heard}


async def test_a_pilot_gone_beyond_the_grace_is_lost_and_live_again_once_it_reconnects(
    env: Env,
) -> None:
    env.wms.pilots.lost_after = 0.3
    stream = env.tms()
    await stream.hello()
    uuid, pilot, start = await tasking_pilot(env, stream)

    pilot.call.cancel()  # a network partition: the job still runs, as far as its TMS knows
    lost = compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_LOST, 1))
    await statuses_become(env, uuid, lost)

    back = env.pilot(start.pilot_token)
    await back.hello(uuid, worker_id="7.0")
    await back.status(Pilot.PILOT_PHASE_TASKING)
    await statuses_become(
        env, uuid, compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_TASKING, 1))
    )


async def test_a_pilot_that_reconnects_within_the_grace_is_never_lost(env: Env) -> None:
    env.wms.pilots.lost_after = 0.3
    stream = env.tms()
    await stream.hello()
    uuid, pilot, start = await tasking_pilot(env, stream)
    heard: list[PilotChange] = []
    env.wms.pilots.listen(heard.append)

    pilot.call.cancel()  # a blip
    back = env.pilot(start.pilot_token)
    await back.hello(uuid, worker_id="7.0")
    await back.status(Pilot.PILOT_PHASE_TASKING)
    # Well past the grace: a timer left running would have fired by now.
    await asyncio.sleep(1.0)

    assert ChangeKind.LOST not in {c.kind for c in heard}
    await statuses_become(
        env, uuid, compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_TASKING, 1))
    )


async def test_a_pilot_may_not_report_itself_lost(env: Env) -> None:
    stream = env.tms()
    await stream.hello()
    _, pilot, _ = await tasking_pilot(env, stream)

    await pilot.status(Pilot.PILOT_PHASE_LOST)

    err = await pilot.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "status.phase" in dict(field_violations(err))


async def test_an_exit_of_a_running_job_or_a_negative_signal_is_invalid_argument(
    env: Env,
) -> None:
    stream = env.tms()
    await stream.hello()
    tf, _ = await submitted_taskforce(env, stream, 7, n_workers=2)
    bad = tms.JobStatusSnapshot(
        taskforces=[
            tms.TaskforceJobStatus(
                taskforce_uuid=tf.taskforce_uuid,
                workers=[
                    tms.WorkerJobState(
                        worker_id="7.0",
                        job_state=Job.JOB_STATE_RUNNING,
                        job_exit=taskforce_pb2.JobExit(exit_code=1),
                    ),
                    tms.WorkerJobState(
                        worker_id="7.1",
                        job_state=Job.JOB_STATE_COMPLETED,
                        job_exit=taskforce_pb2.JobExit(signal=-9),
                    ),
                ],
            )
        ]
    )

    await stream.send(snapshot=bad)

    err = await stream.failure()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = dict(field_violations(err))
    assert (
        "only for a COMPLETED or REMOVED job"
        in violations["snapshot.taskforces[0].workers[0].job_exit"]
    )
    assert "must be 0 to 127" in violations["snapshot.taskforces[0].workers[1].job_exit.signal"]


async def test_a_wms_restart_loses_no_pilot_but_one_that_never_reconnects_is_lost(
    start_env: StartEnv, tmp_path: Path
) -> None:
    env = await start_env(tmp_path / "kept")
    stream = env.tms()
    await stream.hello()
    uuid, _, _ = await tasking_pilot(env, stream)
    await env.stop_wms()  # with the pilot's stream open
    await env.close()

    env = await start_env(tmp_path / "kept")
    env.wms.pilots.lost_after = 0.3
    stored = await env.wms.pilots.pilots(uuid)  # loads the taskforce: its grace starts now
    assert [(p.worker_id, p.phase) for p in stored] == [("7.0", Pilot.PILOT_PHASE_TASKING)]
    stream = env.tms()
    await stream.hello()
    await stream.send(snapshot=running(uuid, "7.0"))

    lost = compound((Job.JOB_STATE_RUNNING, "", Pilot.PILOT_PHASE_LOST, 1))
    await statuses_become(env, uuid, lost)
