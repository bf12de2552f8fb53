"""The HTTP health probes: /healthz answers while the process runs; /readyz checks the store and
the queue backends, both without a token."""

from __future__ import annotations

import aiohttp

from services.wms import RunningWms


async def test_healthz_answers_without_a_token(http: aiohttp.ClientSession) -> None:
    async with http.get("/healthz") as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"status": "ok"}


async def test_readyz_is_ready_with_the_store_open(http: aiohttp.ClientSession) -> None:
    async with http.get("/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"


async def test_readyz_is_503_naming_the_closed_store(
    wms: RunningWms, http: aiohttp.ClientSession
) -> None:
    await wms.store.close()
    async with http.get("/readyz") as resp:
        assert resp.status == 503
        body = await resp.json()
        assert body["status"] == "unready"
        assert any(p.startswith("store:") for p in body["problems"])
