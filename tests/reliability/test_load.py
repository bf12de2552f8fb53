"""Scenario 8, small: N real pilot streams against one WMS subprocess, with the load harness of
``bench/pilot_streams.py`` (pilots in client processes, a TMS and a watcher here). Every stream
must be welcomed and kept, and the taskforce must end up showing exactly what the pilots sent,
both as stored and as the watch last sent it. Latency and CPU are printed, not asserted (a shared
machine); the full curve is the benchmark's."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bench.pilot_streams import LoadConfig, run_load

N = 150


async def test_pilot_streams_are_all_welcomed_kept_and_counted(outcome: Callable[..., Any]) -> None:
    report = await run_load(
        LoadConfig(
            n=N,
            duration=12.0,
            connect_rate=100.0,
            status_interval=2.0,
            events_interval=4.0,
            clients=2,
            settle_timeout=30.0,
        )
    )
    shown = {k: report[k] for k in ("connect_ms", "watch_ms", "wms_cpu_ms_per_status")}
    print(json.dumps(shown, indent=1))

    assert report["welcomed"] == N, report["outcomes"]
    assert report["dropped"] == 0, report["outcomes"]
    assert report["consistent"], report["inconsistency"]
    assert report["watch_missed"] == 0
    watch = report["watch_ms"]
    outcome(
        f"load: {N} pilot streams, {report['status_messages']} statuses in 12 s",
        "embedded",
        events_in=report["status_messages"] + report["batch_messages"],
        lost=report["dropped"],
        detail=(
            f"all welcomed (connect p50 {report['connect_ms']['p50']:.0f} ms), none dropped, "
            f"final compound statuses and counters as sent; watch p50/p99 "
            f"{watch['p50']:.1f}/{watch['p99']:.1f} ms"
        ),
    )
