"""``ewms pilot``: run a pilot (configured by its environment), and ``ewms pilot metrics``: the
metric collector of hyperflow-amqp-executor (``shared/design/HYPERFLOW.md``) for our pilots'
monitoring events (:mod:`services.pilot.hyperflow`): its columns, then ours (``COLUMNS``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import signal
import sys
import textwrap
from typing import Any

from services.cli.options import positive_int
from services.cli.workflows import CommandError
from services.events.client import QueueAccessDenied, QueueError, QueueNotFound
from services.logs import configure_logging
from services.pilot.hyperflow import DEFAULT_EXCHANGE, EventsSubscription, ReceivedEvent

DEFAULT_EVENTS_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_BINDING = "job.*.finished"
# (header, where the value is in a job.finished event): top-level field or "metrics.<name>".
COLUMNS = (
    ("time", None),  # wall-clock time the line is printed, ISO 8601 UTC
    ("executor", "executor"),
    ("thread", "thread"),
    ("job", "job"),
    ("executable", "executable"),
    ("execution", "metrics.execution"),
    ("input_size", "metrics.input_size"),
    ("output_size", "metrics.output_size"),
    ("exit_status", "exit_status"),
    ("cpu_user", "metrics.cpu_user"),
    ("cpu_system", "metrics.cpu_system"),
    ("max_rss_bytes", "metrics.max_rss_bytes"),
)
NA = "NA"
_COLUMN_LIST = textwrap.fill(
    ", ".join(name for name, _ in COLUMNS), 96, initial_indent="  ", subsequent_indent="  "
)
METRICS_HELP = f"""\
Subscribe to the pilots' monitoring exchange and print one tab-separated line per finished task
(job.*.finished) on stdout, flushed per line. Columns:
{_COLUMN_LIST}
(time: when the line is printed, UTC; execution, cpu_*: seconds; *_size, max_rss_bytes: bytes);
{NA} for a missing value. Events without metrics go to stderr as they came. Runs until SIGINT or
SIGTERM (exit 0) or until --count lines are printed.

Exit codes: 2 bad arguments; 3 the exchange does not exist (it is not created); 4 the broker refused
the credentials; 6 the broker is unreachable or the connection was lost."""
# Characters that would break a TSV line, replaced by a space in values.
_TSV_BREAKERS = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


def add_commands(sub: Any) -> None:
    """Register ``pilot`` and ``pilot metrics``."""
    p = sub.add_parser(
        "pilot",
        help="run a pilot (configured by EWMS_PILOT_* variables), or watch pilots' metrics",
        description="Without an action: run a pilot configured by its environment "
        "(EWMS_PILOT_*); its exit code is the command's.",
    )
    p.set_defaults(run=run_pilot_command, needs_wms=False)
    actions = p.add_subparsers(dest="action", required=False, metavar="ACTION")
    m = actions.add_parser(
        "metrics",
        help="print one TSV line per finished task from the pilots' monitoring exchange",
        description=METRICS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument(
        "--url",
        help=f"AMQP URL of the broker (default EWMS_PILOT_EVENTS_URL, else {DEFAULT_EVENTS_URL})",
    )
    m.add_argument(
        "--exchange",
        help="the pilots' events exchange (default EWMS_PILOT_EVENTS_EXCHANGE, else "
        f"{DEFAULT_EXCHANGE})",
    )
    m.add_argument(
        "--binding",
        default=DEFAULT_BINDING,
        help="routing-key pattern to subscribe to (default %(default)s)",
    )
    m.add_argument("--count", type=positive_int, help="stop after printing this many lines")
    m.add_argument("--header", action="store_true", help="print a header line first")
    m.set_defaults(run=metrics, needs_wms=False)


def run_pilot_command(_args: Any) -> int:
    """ewms pilot: run a pilot; its exit code is the command's."""
    from services.pilot.run import main as run_pilot

    code: int = run_pilot()
    return code


# --- ewms pilot metrics ---


def metrics(args: Any) -> None:
    """ewms pilot metrics."""
    configure_logging("WARNING")  # to stderr: stdout carries only the TSV lines
    try:
        asyncio.run(_collect(args))
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _lookup(event: dict[str, Any], path: str) -> Any:
    value: Any = event
    for name in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return NA
    if isinstance(value, str):
        return value.translate(_TSV_BREAKERS)
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).translate(_TSV_BREAKERS)


def header_line() -> str:
    """The header line of ``ewms pilot metrics``."""
    return "\t".join(name for name, _ in COLUMNS)


def tsv_line(event: dict[str, Any], now: datetime.datetime) -> str:
    """One job.finished event as a TSV line."""
    cells = [now.isoformat(timespec="milliseconds").replace("+00:00", "Z")]
    cells.extend(_cell(_lookup(event, path)) for _, path in COLUMNS if path is not None)
    return "\t".join(cells)


def _print_event(received: ReceivedEvent) -> bool:
    """Print one event: a TSV line on stdout (True) or, without metrics, as it came on stderr."""
    event = received.fields()
    if event is None or not isinstance(event.get("metrics"), dict):
        text = received.body.decode("utf-8", errors="replace")
        print(f"{received.routing_key}: {text}", file=sys.stderr, flush=True)
        return False
    print(tsv_line(event, datetime.datetime.now(datetime.UTC)), flush=True)
    return True


async def _collect(args: Any) -> None:
    url = args.url or os.environ.get("EWMS_PILOT_EVENTS_URL") or DEFAULT_EVENTS_URL
    exchange = args.exchange or os.environ.get("EWMS_PILOT_EVENTS_EXCHANGE") or DEFAULT_EXCHANGE
    try:
        subscription = await EventsSubscription.open(
            url, exchange, [args.binding], connection_name="ewms-pilot-metrics"
        )
    except QueueNotFound as exc:
        raise CommandError(
            f"{exc} (the pilots declare it when they start; check --exchange or "
            "EWMS_PILOT_EVENTS_EXCHANGE)",
            3,
        ) from None
    except QueueAccessDenied as exc:
        raise CommandError(str(exc), 4) from None
    except QueueError as exc:
        raise CommandError(str(exc), 6) from None
    loop = asyncio.get_running_loop()
    consumer = asyncio.current_task()
    assert consumer is not None
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    for signum in stop_signals:
        loop.add_signal_handler(signum, consumer.cancel)
    try:
        print(
            f"listening on exchange {exchange!r} at {subscription.connection.where} "
            f"for {args.binding!r}",
            file=sys.stderr,
            flush=True,
        )
        if args.header:
            print(header_line(), flush=True)
        printed = 0
        async for received in subscription:
            if _print_event(received):
                printed += 1
                if args.count is not None and printed >= args.count:
                    break
    except asyncio.CancelledError:
        pass  # SIGINT or SIGTERM: a normal end
    except QueueError as exc:
        raise CommandError(f"lost the subscription to exchange {exchange!r}: {exc}", 6) from None
    finally:
        for signum in stop_signals:
            loop.remove_signal_handler(signum)
        with contextlib.suppress(asyncio.CancelledError):
            await subscription.close()
