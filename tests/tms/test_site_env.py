"""The site's pilot settings (services/tms/pilot_env.py): what the site sets wins over a user's
``pilot_config.environment``, names it locks (runtime, network, mounts by default) a user may not
set at all, and a user's variable outside the rules of services/env_rules.py refuses the start."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from ewms.v1 import task_manager_service_pb2, taskforce_pb2, workflow_pb2
from services.tms.pilot_env import (
    DEFAULT_LOCKED,
    PilotEnvError,
    SiteEnv,
    parse_locked,
    pilot_environment,
)


def start(**user_env: str) -> task_manager_service_pb2.StartTaskforce:
    """A start command whose user asked for ``user_env`` in pilot_config.environment."""
    config = taskforce_pb2.PilotConfig(
        environment={k: struct_pb2.Value(string_value=v) for k, v in user_env.items()}
    )
    return task_manager_service_pb2.StartTaskforce(
        taskforce=taskforce_pb2.Taskforce(taskforce_uuid="TF-1", pilot_config=config),
        task_directive=workflow_pb2.TaskDirective(task_args="true"),
        pilot_token="the-pilot-token",
        wms_address="wms:50051",
    )


def test_the_sites_value_wins_over_the_users() -> None:
    site = SiteEnv({"EWMS_PILOT_RUNTIME": "bwrap"}, locked=frozenset())

    env = pilot_environment(start(EWMS_PILOT_RUNTIME="process"), site)

    assert env["EWMS_PILOT_RUNTIME"] == "bwrap"


def test_a_user_setting_a_locked_name_refuses_the_start_naming_it() -> None:
    site = SiteEnv({"EWMS_PILOT_RUNTIME": "bwrap"})

    with pytest.raises(PilotEnvError) as err:
        pilot_environment(start(EWMS_PILOT_TASK_NETWORK="true", EWMS_PILOT_CL_LOG="DEBUG"), site)

    assert str(err.value) == (
        "pilot_config.environment.EWMS_PILOT_TASK_NETWORK: refused: fixed by this site "
        "(EWMS_TMS_PILOT_LOCKED)"
    )


def test_runtime_network_and_mounts_are_locked_unless_the_site_says_otherwise() -> None:
    assert SiteEnv.from_env({}).locked == DEFAULT_LOCKED
    assert {
        "EWMS_PILOT_RUNTIME",
        "_EWMS_PILOT_CONTAINER_PLATFORM",
        "EWMS_PILOT_TASK_NETWORK",
        "EWMS_PILOT_EXTERNAL_DIRECTORIES",
        "EWMS_PILOT_DATA_DIR_PARENT_PATH_ON_HOST",
    } <= DEFAULT_LOCKED
    assert SiteEnv.from_env({"EWMS_TMS_PILOT_LOCKED": ""}).locked == frozenset()
    assert parse_locked("EWMS_PILOT_A, EWMS_PILOT_B EWMS_PILOT_C") == {
        "EWMS_PILOT_A",
        "EWMS_PILOT_B",
        "EWMS_PILOT_C",
    }
    with pytest.raises(PilotEnvError, match="'1X'"):
        parse_locked("EWMS_PILOT_A 1X")


@pytest.mark.parametrize("name", ["LD_PRELOAD", "PATH", "PYTHONPATH", "BASH_ENV", "HOME", "FOO"])
def test_a_stored_loader_variable_refuses_the_start(name: str) -> None:
    # A workflow stored before the WMS refused these must not reach a pilot either.
    with pytest.raises(PilotEnvError, match=f"pilot_config.environment.{name}: refused"):
        pilot_environment(start(**{name: "/tmp/x"}), SiteEnv(locked=frozenset()))


def test_what_the_wms_decides_wins_over_the_site() -> None:
    env = pilot_environment(start(), SiteEnv({"EWMS_PILOT_TOKEN": "site's"}))

    assert env["EWMS_PILOT_TOKEN"] == "the-pilot-token"


def test_a_local_tms_hides_the_wms_data_directory_beside_the_sites_own(tmp_path: Path) -> None:
    site = SiteEnv({"EWMS_PILOT_HIDDEN_DIRECTORIES": "/srv/secrets"}).hiding(tmp_path / "wms")

    env = pilot_environment(start(), site)

    assert env["EWMS_PILOT_HIDDEN_DIRECTORIES"] == f"/srv/secrets,{tmp_path / 'wms'}"
