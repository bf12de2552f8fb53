"""Bind-mount safety: which host directories a task may see, and where, before any runtime mounts
them. The rules are the original pilot's (UPSTREAM.md §3.5), applied to normalised paths so that
``..`` and symlinks cannot route around them."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class RuntimeSetupError(Exception):
    """A runtime cannot run a task as asked; the message says what is wrong and how to fix it.

    Defined here, below runtimes.py, so the mount rules need nothing from the runtimes;
    runtimes.py re-exports it."""


class MountError(RuntimeSetupError):
    """A mount breaks a safety rule; the message names the path and the rule."""


@dataclass(frozen=True)
class Mount:
    host: Path  # directory on the host
    target: str  # where the task sees it (== str(host) for runtimes that do not map paths)
    writable: bool


# Host trees no task may see at all: kernel and machine state, other processes' sockets.
FORBIDDEN_HOST = ("/proc", "/dev", "/sys", "/run", "/boot")
# Host trees a task may read but never write: the system itself and root's home.
READ_ONLY_HOST = (
    "/etc",
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/sbin",
    "/root",
    "/var/log",
    "/var/cache",
    "/var/spool",
)
# Container paths no writable mount may land on (or above): the image's system and kernel files.
NO_WRITABLE_TARGET = (*READ_ONLY_HOST, "/proc", "/dev", "/sys")


def check_mounts(mounts: Iterable[Mount], alias: str) -> tuple[Mount, ...]:
    """The mounts with normalised paths (host: absolute, ``..`` and symlinks resolved; target:
    ``..`` resolved), or MountError for the first one that breaks a rule.

    A mount also counts as touching a protected tree when it contains it: a writable ``/var``
    would make ``/var/log`` writable, and ``/`` contains ``/proc``."""
    checked: list[Mount] = []
    seen: dict[str, Path] = {}
    for mount in mounts:
        normal = _checked(mount, alias)
        if normal.target in seen:
            raise MountError(
                f"{alias}: mounts of {seen[normal.target]} and {normal.host} both target "
                f"{normal.target}: each target may be mounted only once"
            )
        seen[normal.target] = normal.host
        checked.append(normal)
    return tuple(checked)


def normal_target(target: str) -> str:
    """An absolute container path with ``.``, ``..`` and repeated slashes resolved."""
    return "/" + posixpath.normpath(target).lstrip("/")


def _checked(mount: Mount, alias: str) -> Mount:
    given = str(mount.host)
    what = f"{alias}: {'writable' if mount.writable else 'read-only'} mount of {given}"
    if not mount.host.is_absolute():
        raise MountError(f"{what}: host paths must be absolute")
    if not mount.target.startswith("/"):
        raise MountError(f"{what} at {mount.target!r}: target paths must be absolute")
    host = mount.host.resolve()
    if str(host) != given:
        what += f" (resolves to {host})"
    target = normal_target(mount.target)

    if clash := _overlap(str(host), FORBIDDEN_HOST):
        raise MountError(f"{what}: it {clash[1]}; host paths under {clash[0]} may not be mounted")
    if mount.writable and (clash := _overlap(str(host), READ_ONLY_HOST)):
        raise MountError(
            f"{what}: it {clash[1]}; host paths under {clash[0]} may only be mounted read-only"
        )
    if target == "/":
        raise MountError(f"{what}: the target / would replace the task's whole filesystem")
    if mount.writable and (clash := _overlap(target, NO_WRITABLE_TARGET)):
        raise MountError(
            f"{what}: its target {target} {clash[1]}; writable mounts may not target "
            f"{clash[0]} or anything under it"
        )
    if not host.is_dir():
        raise MountError(f"{what}: no such directory on this host; mounts must be directories")
    return Mount(host=host, target=target, writable=mount.writable)


def _overlap(path: str, trees: tuple[str, ...]) -> tuple[str, str] | None:
    """The first of ``trees`` that ``path`` is in or contains, with how ("is under /etc",
    "contains /var/log"); None when it touches none."""
    for tree in trees:
        if _within(path, tree):
            return tree, (f"is {tree}" if path == tree else f"is under {tree}")
        if _within(tree, path):
            return tree, f"contains {tree}"
    return None


def _within(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")
