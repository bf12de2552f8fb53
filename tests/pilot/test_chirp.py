"""HTChirp attributes as the original sets them; the chirp transport (a running HTCondor starter)
does not exist here, so chirps are collected where they would be sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from ewms.v1 import taskforce_pb2
from services.pilot.chirp import Chirper, classad_string
from services.pilot.config import PilotConfigError, load_settings
from tests.pilot.test_config import BASE


class Collected:
    def __init__(self, fail_times: int = 0) -> None:
        self.batches: list[dict[str, str]] = []
        self.fail_times = fail_times

    def __call__(self, items: list[tuple[str, str]]) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise OSError("chirp server went away")
        self.batches.append(dict(items))


async def test_status_chirps_use_the_originals_attributes_and_names() -> None:
    sent = Collected()
    chirper = Chirper(sent, ratelimit_seconds=60)
    chirper.started()
    chirper.phase(taskforce_pb2.PILOT_PHASE_DRAINING)
    await chirper.close()
    merged = {k: v for batch in sent.batches for k, v in batch.items()}
    assert merged["HTChirpEWMSPilotStatus"] == '"PendingRemainingTasks"'
    assert int(merged["HTChirpEWMSPilotStartedTimestamp"]) > 0
    assert "HTChirpEWMSPilotLastUpdatedTimestamp" in merged


async def test_counter_chirps_are_rate_limited() -> None:
    sent = Collected()
    chirper = Chirper(sent, ratelimit_seconds=3600)
    chirper.phase(taskforce_pb2.PILOT_PHASE_TASKING)
    await chirper.close()
    for n in range(1, 50):
        chirper.counters(taskforce_pb2.TaskCounters(events_received=n, tasks_succeeded=n))
    assert len(sent.batches) == 1  # the counters wait for the interval or the final flush
    await chirper.close()
    assert sent.batches[-1]["HTChirpEWMSPilotTasksTotal"] == "49"
    assert sent.batches[-1]["HTChirpEWMSPilotTasksSuccess"] == "49"


async def test_a_failed_chirp_keeps_its_backlog_for_the_next() -> None:
    sent = Collected(fail_times=1)
    chirper = Chirper(sent, ratelimit_seconds=60)
    chirper.error('task failed: "quoted"\nsecond line')
    await chirper.close()
    assert chirper.failures == 1
    assert sent.batches[-1]["HTChirpEWMSPilotError"] == classad_string(
        'task failed: "quoted"\nsecond line'
    )


def test_chirps_outside_an_htcondor_job_are_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("_CONDOR_CHIRP_CONFIG", raising=False)
    with pytest.raises(PilotConfigError, match="EWMS_PILOT_HTCHIRP: chirps need an HTCondor job"):
        load_settings({**BASE, "EWMS_PILOT_HTCHIRP": "true"})
    (tmp_path / ".chirp.config").write_text("127.0.0.1 9618 cookie\n")
    assert load_settings({**BASE, "EWMS_PILOT_HTCHIRP": "true"}).htchirp is True
