"""Directories and files only their owner may open: the WMS's data directory and what it holds (the
database, with event payloads and broker credentials; the signing secret; the admin token) and a
local TMS's state directory (pilot credentials in its job log, event payloads in its workers').

Modes are set explicitly, never left to the umask (users commonly have 022). What is found looser
(a data directory from an older version, a file someone chmod-ed) is tightened, with a warning
naming it; what cannot be (another user owns it) is a :class:`NotPrivateError`.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import structlog

from services.config import ConfigError

log = structlog.get_logger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


class NotPrivateError(ConfigError):
    """A directory or file that must be private cannot be made so."""


def private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 (missing parents get the usual modes), or tighten it to
    0700 if it exists looser. Returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, PRIVATE_DIR)
    except FileExistsError:
        tighten(path, PRIVATE_DIR)
    else:
        _chmod(path, PRIVATE_DIR)  # the umask may have taken bits from the owner, too
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600, or tighten it to 0600 if it exists looser. Returns
    ``path``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
    except FileExistsError:
        tighten(path, PRIVATE_FILE)
        return path
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return path


def write_private(path: Path, content: str) -> None:
    """Replace ``path`` with ``content``, mode 0600, atomically (never readable by others, even
    briefly)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    with os.fdopen(fd, "w") as fh:
        fh.write(content)
    os.replace(tmp, path)


def tighten(path: Path, mode: int) -> bool:
    """Take from ``path`` (if it exists) every permission bit outside ``mode`` -- group's and
    others', for 0600 and 0700 -- with a warning naming it; the owner's own bits stay as they are.
    Returns whether it changed anything."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise NotPrivateError(f"cannot check the permissions of {path}: {exc.strerror}") from None
    old = stat.S_IMODE(st.st_mode)
    if not old & ~mode:
        return False
    new = old & mode
    _chmod(path, new, st)
    log.warning(
        "permissions tightened", path=str(path), old_mode=f"{old:04o}", new_mode=f"{new:04o}"
    )
    return True


def _chmod(path: Path, mode: int, st: os.stat_result | None = None) -> None:
    try:
        os.chmod(path, mode)
    except OSError as exc:
        if st is not None and st.st_uid != os.geteuid():
            why = f"it is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
        else:
            why = exc.strerror or str(exc)
        found = f"{stat.S_IMODE(st.st_mode):04o} -> " if st is not None else ""
        raise NotPrivateError(
            f"cannot make {path} private ({found}{mode:04o}): {why}; "
            "change its owner or mode, or use another directory"
        ) from None
