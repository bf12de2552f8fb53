"""``ewms wms serve``: run the WMS until interrupted."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from typing import Any

from services.config import WmsSettings
from services.logs import configure_logging
from services.wms import serve


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``wms serve``."""
    wms = sub.add_parser("wms", help="run the WMS").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = wms.add_parser("serve", parents=[common], help="serve the WMS's gRPC API until stopped")
    p.add_argument("--port", type=int, help="gRPC port (default EWMS_GRPC_PORT or 50051; 0: any)")
    p.add_argument("--host", help="address to bind (default EWMS_GRPC_HOST or 127.0.0.1)")
    p.set_defaults(run=run_wms, needs_wms=False)


def run_wms(args: Any) -> None:
    """Serve with settings from the environment, overridden by flags."""
    settings = WmsSettings.from_env()
    if args.port is not None:
        settings = replace(settings, grpc_port=args.port)
    if args.host:
        settings = replace(settings, grpc_host=args.host)
    if args.data_dir:
        settings = replace(settings, data_dir=args.data_dir)
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))
