"""The ``ewms`` command line.

Exit codes: 0 success; 1 unexpected error; 2 bad input (usage, unreadable or invalid request);
3 not found; 4 not authenticated or not allowed; 5 failed precondition (e.g. already deactivated);
6 WMS unreachable or too slow.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Sequence

import grpc

from services.cli import events, options, pilot, run, serve, tokens, watch, workflows
from services.cli.connection import Connection, resolve_token
from services.config import ClientSettings, ConfigError
from services.errors import field_violations
from services.events.client import QueueError

BROKER_HINT = (
    "EWMS_QUEUE_BACKEND=rabbitmq needs RabbitMQ at EWMS_RABBITMQ_URL with its management plugin "
    "at EWMS_RABBITMQ_MANAGEMENT_URL ('rabbitmq-plugins enable rabbitmq_management'); or leave "
    "EWMS_QUEUE_BACKEND unset for the embedded queues"
)
EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 2,
    grpc.StatusCode.OUT_OF_RANGE: 2,
    grpc.StatusCode.NOT_FOUND: 3,
    grpc.StatusCode.UNAUTHENTICATED: 4,
    grpc.StatusCode.PERMISSION_DENIED: 4,
    grpc.StatusCode.FAILED_PRECONDITION: 5,
    grpc.StatusCode.UNAVAILABLE: 6,
    grpc.StatusCode.DEADLINE_EXCEEDED: 6,
}


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parents = options.parents()
    parser = options.Parser(
        prog="ewms", description="Event Workflow Management System: workflows of event-driven tasks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_commands(sub, parents)
    workflows.add_commands(sub, parents.client)
    events.add_commands(sub, parents.client)
    tokens.add_commands(sub, parents)
    pilot.add_commands(sub)
    run.add_commands(sub, parents)
    watch.add_commands(sub, parents)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if not getattr(args, "needs_wms", True):
            # Commands without a WMS connection may return their own exit code.
            return int(args.run(args) or 0)
        settings = ClientSettings.from_env()
        address = args.wms or settings.wms_address
        data_dir = args.data_dir or settings.data_dir
        conn = Connection(address, resolve_token(args.token, settings, address, data_dir))
        try:
            args.run(conn, args)
        finally:
            conn.close()
    except workflows.UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except workflows.CommandError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        for line in exc.details:
            print(f"  {line}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        return _report_rpc_error(exc, args)
    except QueueError as exc:
        # Only servers started here reach a broker themselves (ewms run, up, wms serve).
        print(f"error: {exc}", file=sys.stderr)
        print(f"  hint: {BROKER_HINT}", file=sys.stderr)
        return EXIT_CODES[grpc.StatusCode.UNAVAILABLE]
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): nothing more to say, as other Unix tools.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- Python's own flush at exit
        return 141
    except Exception:
        traceback.print_exc()
        print(
            "error: an unexpected failure (the traceback above): a bug in ewms. Please report "
            "it with the command you ran and the lines above.",
            file=sys.stderr,
        )
        return 1
    return 0


def _report_rpc_error(exc: grpc.RpcError, args: argparse.Namespace) -> int:
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    details: str = exc.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach the WMS at {args.wms or ClientSettings.from_env().wms_address}"
    print(f"error: {code.name}: {details}", file=sys.stderr)
    for field, description in field_violations(exc):
        violation = f"{field}: {description}"
        if violation not in details:  # a lone violation is often the message itself
            print(f"  {violation}", file=sys.stderr)
    if code == grpc.StatusCode.UNAUTHENTICATED and not (
        args.token or ClientSettings.from_env().token
    ):
        print(
            "  hint: set EWMS_TOKEN or --token (for a WMS on this machine the CLI uses the admin "
            "token in its data directory)",
            file=sys.stderr,
        )
    return EXIT_CODES.get(code, 1)


if __name__ == "__main__":
    sys.exit(main())
