"""The reliability suite: fault injection, attacks and load against real processes.

Every scenario records what it measured with the ``outcome`` fixture. The records are printed as a
table at the end of the run (the README's "Reliability" table is copied from it) and written as
JSON lines to ``$EWMS_RELIABILITY_REPORT`` when that is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest

# The e2e harness (a WMS and a local TMS as subprocesses) is shared with this suite.
from tests.e2e.conftest import backend, cluster  # noqa: F401  (fixtures re-exported)


@dataclass
class Outcome:
    """One scenario's measured outcome (a row of the README's "Reliability" table)."""

    scenario: str
    backend: str = "-"
    events_in: int | None = None
    events_out: int | None = None
    duplicates: int | None = None
    lost: int | None = None
    recovery_s: float | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[str]:
        def show(v: object) -> str:
            if v is None:
                return "-"
            return f"{v:.1f}" if isinstance(v, float) else str(v)

        return [
            self.scenario,
            self.backend,
            show(self.events_in),
            show(self.events_out),
            show(self.duplicates),
            show(self.lost),
            show(self.recovery_s),
            self.detail,
        ]


_OUTCOMES: list[Outcome] = []
HEADER = ["scenario", "backend", "in", "out", "dup", "lost", "recovery s", "detail"]


@pytest.fixture
def outcome() -> Callable[..., Outcome]:
    """Record a scenario's outcome: ``outcome("WMS kill -9, 2 s down", backend, events_in=...)``.
    Record only after the assertions passed, so the table lists what held."""

    def record(scenario: str, backend: str = "-", **values: Any) -> Outcome:  # noqa: F811
        row = Outcome(scenario, backend, **values)
        _OUTCOMES.append(row)
        return row

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _OUTCOMES:
        return
    rows = [HEADER, *(o.cells() for o in _OUTCOMES)]
    terminalreporter.section("reliability outcomes")
    for row in rows:
        terminalreporter.write_line("| " + " | ".join(row) + " |")
    path = os.environ.get("EWMS_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as fh:
            for o in _OUTCOMES:
                fh.write(json.dumps(asdict(o)) + "\n")
