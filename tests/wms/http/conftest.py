"""Fixtures of the HTTP-face tests: a client session on the test WMS's HTTP port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from services.wms import RunningWms


@pytest.fixture
async def http(wms: RunningWms) -> AsyncIterator[aiohttp.ClientSession]:
    """A session on the test WMS's HTTP face: ``await http.get("/healthz")``."""
    async with aiohttp.ClientSession(base_url=wms.http_url) as session:
        yield session


def auth(token: str) -> dict[str, str]:
    """HTTP headers carrying a bearer token."""
    return {"Authorization": f"Bearer {token}"}
