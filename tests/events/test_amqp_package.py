"""``services.events.amqp`` is a package of one-job modules layered without import cycles, and every
name the rest of the code imports from ``services.events.amqp`` is still there.

Each check runs in a fresh interpreter: in this one the package is long imported, so a cycle (which
fails only for some first imports) could not show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "services.events.amqp"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / "services" / "events" / "amqp"

# The layers, from the ground up: a module may import at run time only modules before it (the
# back-references are under TYPE_CHECKING, for annotations only).
LAYERS = ("codec", "errors", "transport", "channel", "connection", "subscription", "client")

# Each public name with the module that defines it: the package re-exports exactly these.
PUBLIC = {
    "codec": (
        "BROKER_HEADERS",
        "DEAD_LETTER_HEADERS",
        "MAX_ERROR_BYTES",
        "PERSISTENT",
        "OutMessage",
        "RawMessage",
        "dead_letter_message",
        "event_message",
        "header_int",
        "header_text",
        "message_event",
        "redriven_message",
        "timestamp_ns",
        "truncate_error",
    ),
    "errors": ("broker_error",),
    "transport": (),
    "channel": ("AmqpChannel",),
    "connection": (
        "BLOCKED_CONNECTION_TIMEOUT",
        "CLOSE_TIMEOUT",
        "DEFAULT_CONNECT_ATTEMPTS",
        "DEFAULT_CONNECT_TIMEOUT",
        "DEFAULT_HEARTBEAT",
        "AmqpConnection",
    ),
    "subscription": ("AmqpSubscription",),
    "client": ("AmqpQueueClient",),
}

# Imports ``services.events.amqp.<argv[1]>`` with the package's ``__init__`` left out (it imports
# every module, which would hide what one module needs), then prints which of the package's
# modules got loaded and which of the given names the module lacks.
ALONE = """
import importlib, json, sys, types
import services.events
package = types.ModuleType({package!r})
package.__path__ = [{path!r}]
sys.modules[{package!r}] = package
module = importlib.import_module({package!r} + "." + sys.argv[1])
loaded = sorted(n.rpartition(".")[2] for n in sys.modules if n.startswith({package!r} + "."))
missing = [n for n in sys.argv[2:] if not hasattr(module, n)]
print(json.dumps({{"loaded": loaded, "missing": missing}}))
"""

# Imports the package as the rest of the code does and checks every public name against the
# module that defines it.
WHOLE = """
import importlib, json
package = importlib.import_module({package!r})
public = json.loads({public!r})
homes = {{home: importlib.import_module({package!r} + "." + home) for home in public}}
wrong = [
    n for home, names in public.items() for n in names
    if getattr(package, n, None) is not getattr(homes[home], n)
]
print(json.dumps({{"all": sorted(package.__all__), "wrong": wrong}}))
"""


def _run(code: str, *args: str) -> dict[str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, list[str]] = json.loads(done.stdout)
    return result


def test_the_package_has_exactly_the_layered_modules() -> None:
    on_disk = {p.stem for p in PACKAGE_DIR.glob("*.py")} - {"__init__"}
    assert on_disk == set(LAYERS)


@pytest.mark.parametrize("module", LAYERS)
def test_module_imports_alone_and_loads_nothing_above_it(module: str) -> None:
    result = _run(ALONE.format(package=PACKAGE, path=str(PACKAGE_DIR)), module, *PUBLIC[module])
    allowed = set(LAYERS[: LAYERS.index(module) + 1])
    assert set(result["loaded"]) <= allowed, f"{module} imports a module above it"
    assert result["missing"] == [], f"{module} lacks its public names"


def test_public_names_are_importable_from_the_package() -> None:
    result = _run(WHOLE.format(package=PACKAGE, public=json.dumps(PUBLIC)))
    assert result["all"] == sorted(n for names in PUBLIC.values() for n in names)
    assert result["wrong"] == []
