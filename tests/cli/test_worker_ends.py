"""How the CLI shows a worker's end: the signal that killed its job, or its exit code, and a lost
pilot (``ewms watch`` and ``ewms taskforce get``)."""

from __future__ import annotations

from ewms.v1 import taskforce_pb2 as tf_pb2
from services.cli.watch import WorkflowView
from services.cli.workflows import job_exit_label


def status(job: int, phase: int, job_exit: tf_pb2.JobExit | None = None) -> tf_pb2.CompoundStatus:
    return tf_pb2.CompoundStatus(job_state=job, pilot_phase=phase, count=1, job_exit=job_exit)  # type: ignore[arg-type]


def test_a_job_ends_by_its_signals_name_or_its_exit_code_and_unknown_is_a_dash() -> None:
    assert job_exit_label(status(5, 8, tf_pb2.JobExit(signal=9))) == "SIGKILL"
    assert job_exit_label(status(5, 7, tf_pb2.JobExit(exit_code=3))) == "exit 3"
    assert job_exit_label(status(5, 7, tf_pb2.JobExit())) == "exit 0"
    assert job_exit_label(status(5, 7, tf_pb2.JobExit(signal=99))) == "signal 99"
    assert job_exit_label(status(2, 4)) == "-"


def test_watch_shows_a_killed_worker_as_completed_by_its_signal_with_its_pilot_lost() -> None:
    view = WorkflowView()
    view.taskforces["TF-1"] = tf_pb2.Taskforce(
        taskforce_uuid="TF-1",
        compound_statuses=[
            status(tf_pb2.JOB_STATE_COMPLETED, tf_pb2.PILOT_PHASE_LOST, tf_pb2.JobExit(signal=9)),
            status(tf_pb2.JOB_STATE_RUNNING, tf_pb2.PILOT_PHASE_TASKING),
        ],
    )

    assert "COMPLETED (SIGKILL)/LOST=1, RUNNING/TASKING=1" in view.describe("12:00:00")
