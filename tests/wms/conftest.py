"""Fixtures of the WMS tests that drive the dispatcher: a WMS with a short TMS retry delay, started
with any other settings a test needs."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.wms import start_wms
from tests.conftest import wms_settings
from tests.wms.helpers import RETRIES, RETRY_DELAY, Env, StartEnv


@pytest.fixture
async def start_env(tmp_path: Path) -> AsyncIterator[StartEnv]:
    """Start a WMS with the test settings, a short retry delay and any other settings given
    (``data_dir=`` to reuse one); everything is stopped after the test."""
    envs: list[Env] = []

    async def start(data_dir: Path | None = None, **overrides: Any) -> Env:
        settings = dataclasses.replace(
            wms_settings(data_dir or tmp_path / f"wms-{len(envs)}"),
            **{"tms_retry_delay": RETRY_DELAY, "tms_action_retries": RETRIES, **overrides},
        )
        wms = await start_wms(settings)
        env = Env(wms, grpc.aio.insecure_channel(wms.address))
        envs.append(env)
        return env

    yield start
    for env in envs:
        await env.close()


@pytest.fixture
async def env(start_env: StartEnv) -> Env:
    return await start_env()
