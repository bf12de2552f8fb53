"""``ewms token create``: mint a token with the local WMS's signing secret."""

from __future__ import annotations

import argparse
import re
from typing import Any

from services.auth import SCOPES, Role, TokenAuthority, load_or_create_secret
from services.cli.options import Parents
from services.cli.workflows import UsageError
from services.config import default_data_dir

_DURATION = re.compile(r"^(\d+)([smhdw]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> int:
    """``3600``, ``90m``, ``12h``, ``30d``, ``2w`` → seconds."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"not a duration such as 3600, 90m, 12h or 30d: {text!r}")
    return int(match.group(1)) * _SECONDS[match.group(2)]


def add_commands(sub: Any, parents: Parents) -> None:
    """Register ``token create``."""
    tok = sub.add_parser("token", help="mint tokens (on the WMS's machine)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = tok.add_parser(
        "create",
        parents=[parents.data_dir],
        help="mint a token signed with the WMS's secret in its data directory",
    )
    p.add_argument("--role", required=True, choices=[r.value for r in Role])
    p.add_argument("--subject", required=True, help="who the token is for (e.g. a user name)")
    p.add_argument("--ttl", type=duration, default=duration("30d"), help="lifetime (default 30d)")
    p.add_argument(
        "--scope",
        default="",
        help="required for tms tokens (their cluster location, or * for every location) and "
        "pilot tokens (their taskforce)",
    )
    p.set_defaults(run=create_token, needs_wms=False)


def create_token(args: Any) -> None:
    """Print a new token."""
    data_dir = args.data_dir or default_data_dir()
    role = Role(args.role)
    if role in SCOPES and not args.scope:
        # The WMS refuses such a token: it would name no location or taskforce to act for.
        raise UsageError(f"--scope is required for a {role.value} token: its {SCOPES[role]}")
    authority = TokenAuthority(load_or_create_secret(data_dir))
    print(authority.mint(args.subject, role, args.ttl, scope=args.scope))
