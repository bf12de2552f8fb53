"""The pilot's configuration: the original's variables and defaults, ours, and one error listing
every bad variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.pilot.config import (
    DEFAULT_FIRST_EVENT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    PilotConfigError,
    amqp_url,
    load_settings,
)

BASE = {
    "EWMS_PILOT_TASK_ARGS": "cp {{INFILE}} {{OUTFILE}}",
    "EWMS_PILOT_QUEUE_INCOMING": "Q-1-aaaaaaaa",
    "EWMS_PILOT_QUEUE_OUTGOING": "Q-1-bbbbbbbb;Q-1-cccccccc",
    "EWMS_PILOT_WMS_ADDRESS": "127.0.0.1:50051",
    "EWMS_PILOT_TOKEN": "tok",
    "EWMS_PILOT_TASKFORCE_UUID": "TF-1",
}


def test_defaults_suit_real_use(tmp_path: Path) -> None:
    s = load_settings({**BASE, "EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST": str(tmp_path)})
    assert s.runtime == "process"
    assert (s.first_event_timeout, s.idle_timeout) == (
        DEFAULT_FIRST_EVENT_TIMEOUT,
        DEFAULT_IDLE_TIMEOUT,
    )
    assert s.idle_timeout >= 30
    assert s.max_concurrent_tasks == 1 and s.prefetch == 4
    assert s.stop_listening_on_task_error is False  # the queue dead-letters a failing event
    assert s.outgoing.queues == ("Q-1-bbbbbbbb", "Q-1-cccccccc")
    assert s.incoming.broker_type == "embedded" and s.incoming.address == "127.0.0.1:50051"
    assert s.data_dir == tmp_path / "ewms-pilot-data"
    assert (s.infile_ext, s.outfile_ext) == (".in", ".out")


def test_an_image_defaults_to_apptainer_as_on_htcondor() -> None:
    s = load_settings({**BASE, "EWMS_PILOT_TASK_IMAGE": "/cvmfs/x/img", "EWMS_PILOT_TASK_ARGS": ""})
    assert s.runtime == "apptainer"
    s = load_settings({**BASE, "EWMS_PILOT_TASK_IMAGE": "img", "EWMS_PILOT_RUNTIME": "podman"})
    assert s.runtime == "podman"


def test_legacy_subproc_timeout_is_the_task_timeout() -> None:
    assert load_settings({**BASE, "EWMS_PILOT_SUBPROC_TIMEOUT": "7"}).task_timeout == 7.0


def test_okay_errors_are_whitespace_or_comma_separated() -> None:
    s = load_settings({**BASE, "EWMS_PILOT_OKAY_ERRORS": "ContainerRunError  TaskTimeoutError,X"})
    assert s.okay_errors == {"ContainerRunError", "TaskTimeoutError", "X"}


def test_every_bad_variable_is_reported_at_once() -> None:
    bad = {
        **BASE,
        "EWMS_PILOT_MAX_CONCURRENT_TASKS": "0",
        "EWMS_PILOT_PREFETCH": "x",
        "EWMS_PILOT_TASK_TIMEOUT": "-1",
        "EWMS_PILOT_INIT_ENV_JSON": '{"1BAD": "x", "OK": [1]}',
        "EWMS_PILOT_KEEP_ALL_TASK_FILES": "maybe",
        "EWMS_PILOT_QUARANTINE_TIME": "5",
        "EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR": "false",
        "EWMS_PILOT_INFILE_EXT": "json",
        "EWMS_PILOT_EXTERNAL_DIRECTORIES": "relative/dir,/definitely/missing",
        "EWMS_PILOT_QUEUE_OUTGOING_BROKER_TYPE": "nats",
        "EWMS_PILOT_CL_LOG": "LOUD",
    }
    with pytest.raises(PilotConfigError) as err:
        load_settings(bad)
    text = str(err.value)
    for needle in (
        "EWMS_PILOT_MAX_CONCURRENT_TASKS='0': must be an integer >= 1",
        "EWMS_PILOT_PREFETCH='x'",
        "EWMS_PILOT_TASK_TIMEOUT='-1': must be a number of seconds > 0",
        "variable name '1BAD'",
        "value of OK must be a string or an integer",
        "EWMS_PILOT_KEEP_ALL_TASK_FILES='maybe': must be a boolean",
        "EWMS_PILOT_QUARANTINE_TIME: only allowed when",
        "EWMS_PILOT_INFILE_EXT='json'",
        "'relative/dir' must be an absolute path",
        "'/definitely/missing' is not a directory",
        "EWMS_PILOT_QUEUE_OUTGOING_BROKER_TYPE='nats'",
        "EWMS_PILOT_CL_LOG='LOUD'",
    ):
        assert needle in text
    assert len(err.value.problems) == 12


def test_a_quarantine_needs_stop_listening_and_the_error_says_how_to_fix_it() -> None:
    with pytest.raises(PilotConfigError) as err:
        load_settings({**BASE, "EWMS_PILOT_QUARANTINE_TIME": "30"})
    [problem] = err.value.problems
    assert problem.startswith("EWMS_PILOT_QUARANTINE_TIME: only allowed when")
    assert "set EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR=true" in problem
    assert "unset EWMS_PILOT_QUARANTINE_TIME" in problem
    s = load_settings(
        {
            **BASE,
            "EWMS_PILOT_QUARANTINE_TIME": "30",
            "EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR": "true",
        }
    )
    assert (s.stop_listening_on_task_error, s.quarantine_time) == (True, 30.0)


def test_input_queue_and_task_are_required() -> None:
    with pytest.raises(PilotConfigError) as err:
        load_settings({})
    assert "EWMS_PILOT_QUEUE_INCOMING: required" in str(err.value)
    assert "EWMS_PILOT_TASK_IMAGE / EWMS_PILOT_TASK_ARGS: one is required" in str(err.value)


def test_rabbitmq_address_gets_the_token_as_password() -> None:
    assert (
        amqp_url("amqp://ewms-WF-1@host:5672/vh", "s3cr/t")
        == "amqp://ewms-WF-1:s3cr%2Ft@host:5672/vh"
    )
    assert amqp_url("user@host/vhost", "t") == "amqp://user:t@host/vhost"
    with pytest.raises(ValueError):
        amqp_url("http://host", "t")


def test_ewms_pilot_with_a_bad_configuration_exits_2_listing_the_problems() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EWMS_")}
    env["EWMS_PILOT_MAX_CONCURRENT_TASKS"] = "many"
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "pilot"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "EWMS_PILOT_QUEUE_INCOMING: required" in done.stderr
    assert "EWMS_PILOT_MAX_CONCURRENT_TASKS='many'" in done.stderr
