"""The reliability suite: fault injection, attacks and load against real processes.

Every scenario records what it measured with the ``outcome`` fixture, as a JSON line appended to
``$EWMS_RELIABILITY_REPORT`` (tests/conftest.py sets it for the run, so records from pytest-xdist's
workers reach the controller). The records are printed as a table at the end of the run; the
README's "Reliability" table is copied from it.
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


@pytest.fixture
def outcome() -> Callable[..., Outcome]:
    """Record a scenario's outcome: ``outcome("WMS kill -9, 2 s down", backend, events_in=...)``.
    Record only after the assertions passed, so the table lists what held."""

    def record(scenario: str, backend: str = "-", **values: Any) -> Outcome:  # noqa: F811
        row = Outcome(scenario, backend, **values)
        path = os.environ.get("EWMS_RELIABILITY_REPORT")
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps(asdict(row)) + "\n")
        return row

    return record
