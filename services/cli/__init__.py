"""The ``ewms`` command line.

Exit codes: 0 success; 1 unexpected error; 2 bad input (usage, unreadable or invalid request);
3 not found; 4 not authenticated or not allowed; 5 failed precondition (e.g. already deactivated);
6 WMS unreachable or too slow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from services.cli import events, pilot, run, serve, tokens, workflows
from services.cli.connection import Connection, resolve_token
from services.config import ClientSettings, ConfigError
from services.errors import field_violations

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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--wms", help="WMS address (default EWMS_WMS_ADDRESS or localhost:50051)")
    common.add_argument("--token", default="", help="bearer token (default EWMS_TOKEN)")
    common.add_argument(
        "--data-dir", type=Path, help="WMS data directory (default EWMS_DATA_DIR or user data dir)"
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser = argparse.ArgumentParser(
        prog="ewms", description="Event Workflow Management System: workflows of event-driven tasks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_commands(sub, common)
    workflows.add_commands(sub, common)
    events.add_commands(sub, common)
    tokens.add_commands(sub, common)
    pilot.add_commands(sub, common)
    run.add_commands(sub, common)
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
    except events.CommandError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        for line in exc.details:
            print(f"  {line}", file=sys.stderr)
        return exc.exit_code
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        return _report_rpc_error(exc, args)
    except KeyboardInterrupt:
        return 130
    return 0


def _report_rpc_error(exc: grpc.RpcError, args: argparse.Namespace) -> int:
    code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
    details: str = exc.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach the WMS at {args.wms or ClientSettings.from_env().wms_address}"
    print(f"error: {code.name}: {details}", file=sys.stderr)
    for field, description in field_violations(exc):
        print(f"  {field}: {description}", file=sys.stderr)
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
