"""Options shared by several commands, and the parser that reports a bad one in one line.

Client commands (those that call a running WMS) take ``--wms``, ``--token``, ``--data-dir`` and
``--json``; server commands take only what they use, so their help lists nothing they ignore.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the command, plus where to find help
    (argparse's default reprints the whole usage, which buries the message)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def positive_int(text: str) -> int:
    """An argument that must be an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@dataclass(frozen=True)
class Parents:
    """Parent parsers by what a command does with the WMS."""

    # Calls a running WMS and prints its answers (tables, or JSON with --json).
    client: argparse.ArgumentParser
    # Calls a running WMS but prints no answers of its own (tms serve).
    connect: argparse.ArgumentParser
    # Only reads or writes a WMS data directory (wms serve, up, token create).
    data_dir: argparse.ArgumentParser


WMS_HELP = "WMS address (default EWMS_WMS_ADDRESS or localhost:50051)"
TOKEN_HELP = (
    "bearer token (default EWMS_TOKEN; for a WMS on this machine, the admin token in its data "
    "directory)"
)
DATA_DIR_HELP = "WMS data directory (default EWMS_DATA_DIR or the user data dir)"


def parents() -> Parents:
    """The parent parsers commands are built from."""
    data_dir = argparse.ArgumentParser(add_help=False)
    data_dir.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)

    connect = argparse.ArgumentParser(add_help=False)
    connect.add_argument("--wms", help=WMS_HELP)
    connect.add_argument("--token", default="", help=TOKEN_HELP)
    connect.add_argument(
        "--data-dir",
        type=Path,
        help="the local WMS's data directory, where its admin token is found "
        "(default EWMS_DATA_DIR or the user data dir)",
    )

    client = argparse.ArgumentParser(add_help=False, parents=[connect])
    client.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return Parents(client=client, connect=connect, data_dir=data_dir)
