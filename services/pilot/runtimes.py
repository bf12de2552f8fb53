"""Task runtimes: how a task (image, argv, env, mounts) becomes one process for the pilot to spawn.

One interface, five backends:

- ``process``: the command on the host as it is; no isolation.
- ``bwrap``: bubblewrap; the host read-only, private /tmp, /dev, /proc and /run, only the task's
  writable mounts writable, no network, own pid namespace, no capabilities.
- ``podman`` / ``docker``: a container of an image that is already present locally.
- ``apptainer``: the original pilot's command line, on an unpacked sandbox directory.

A runtime checks and builds command lines; the pilot core spawns, times out and kills.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

# The errors and Mount live in mounts.py (below this module) so the mount rules need nothing from
# here; they are part of this module's interface.
from services.pilot.mounts import Mount, MountError, RuntimeSetupError, check_mounts, normal_target

__all__ = [
    "RUNTIMES",
    "ApptainerRuntime",
    "BwrapRuntime",
    "ContainerCliRuntime",
    "Launch",
    "Mount",
    "MountError",
    "ProcessRuntime",
    "Runtime",
    "RuntimeOptions",
    "RuntimeSetupError",
    "TaskSpec",
    "apptainer_build_argv",
    "make_runtime",
]

RUNTIMES = ("process", "bwrap", "podman", "docker", "apptainer")

# A runtime's own checks (image lookup, sandbox probe) must end; an image build may take long.
CHECK_TIMEOUT = 120.0
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class TaskSpec:
    alias: str  # "task" or "init" (used in error messages)
    image: str  # container image; "" for process and bwrap
    argv: list[str]  # already shlex-split, placeholders replaced with task-visible paths
    env: dict[str, str]  # the task's own variables (user env + EWMS_TASK_*), as the task sees them
    workdir: Path  # host directory, the task's cwd (for containers: mounted, cwd = its target)
    mounts: tuple[Mount, ...]  # task-io (rw), data hub (rw), external directories (ro, same path)
    workdir_target: str  # the task-visible path of workdir


@dataclass(frozen=True)
class Launch:
    argv: list[str]  # what to spawn (no shell)
    env: dict[str, str]  # the full environment of the spawned process
    cwd: Path
    container_name: str | None = None  # set when the task outlives a killed launcher


@dataclass(frozen=True)
class RuntimeOptions:
    task_network: bool = False  # EWMS_PILOT_TASK_NETWORK
    container_debug: bool = False  # EWMS_PILOT_CONTAINER_DEBUG -> apptainer --debug
    apptainer_build_workdir: Path = Path("/var/tmp")  # _EWMS_PILOT_APPTAINER_BUILD_WORKDIR
    # _EWMS_PILOT_APPTAINER_IMAGE_DIRECTORY_MUST_BE_PRESENT
    apptainer_image_must_be_present: bool = True
    docker_shm_size: str | None = None  # _EWMS_PILOT_DOCKER_SHM_SIZE
    hidden_directories: tuple[Path, ...] = ()  # EWMS_PILOT_HIDDEN_DIRECTORIES (bwrap)
    host_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


class Runtime(Protocol):
    name: str  # one of RUNTIMES
    # True for podman/docker/apptainer: mounts appear at their targets. False for process/bwrap:
    # tasks see host paths.
    maps_paths: bool

    async def prepare(self, image: str) -> str:
        """Once per image before the first run: check the runtime is usable and the image exists
        locally; return the image reference to run (apptainer: the sandbox directory).
        RuntimeSetupError otherwise."""
        ...

    def launch(self, spec: TaskSpec) -> Launch:
        """The command line; checks mounts with the safety rules (MountError) for runtimes that
        mount."""
        ...

    async def cleanup(self, launch: Launch) -> None:
        """After the launcher was killed (timeout/drain): make sure the task is gone."""
        ...


def make_runtime(name: str, options: RuntimeOptions) -> Runtime:
    """The runtime called ``name`` (one of RUNTIMES)."""
    if name == "process":
        return ProcessRuntime(options)
    if name == "bwrap":
        return BwrapRuntime(options)
    if name in ("podman", "docker"):
        return ContainerCliRuntime(name, options)
    if name == "apptainer":
        return ApptainerRuntime(options)
    raise RuntimeSetupError(f"unknown runtime {name!r}: choose one of {', '.join(RUNTIMES)}")


class ProcessRuntime:
    """The task's command on the host, in its workdir, with the host's environment plus its own."""

    name = "process"
    maps_paths = False

    def __init__(self, options: RuntimeOptions) -> None:
        self.options = options

    async def prepare(self, image: str) -> str:
        return image

    def launch(self, spec: TaskSpec) -> Launch:
        env = {**self.options.host_env, **_task_env(spec)}
        return Launch(argv=list(spec.argv), env=env, cwd=spec.workdir)

    async def cleanup(self, launch: Launch) -> None:
        return None


class BwrapRuntime:
    """The task's command on the host, inside a bubblewrap sandbox (see sandbox_flags)."""

    name = "bwrap"
    maps_paths = False

    def __init__(self, options: RuntimeOptions) -> None:
        self.options = options

    async def prepare(self, image: str) -> str:
        # The exact sandbox tasks get, without mounts: a missing namespace or mount permission shows
        # here, once, rather than as every task failing.
        probe = ["bwrap", *self.sandbox_flags(()), "--chdir", "/", "--", "true"]
        code, output = await _run(probe, self.options.host_env)
        if code != 0:
            raise RuntimeSetupError(
                f"bwrap cannot create its sandbox here (`{shlex.join(probe)}` exited {code}): "
                f"{output or 'no output'}; bubblewrap needs user namespaces (or root): check "
                "/proc/sys/user/max_user_namespaces, or choose another runtime"
            )
        return image

    def launch(self, spec: TaskSpec) -> Launch:
        mounts = _mounts_with_workdir(spec, maps_paths=False)
        argv = ["bwrap", *self.sandbox_flags(mounts)]
        # The task's variables are set inside the sandbox only: bwrap itself runs outside it, so
        # a task's PATH or LD_PRELOAD must not choose which bwrap runs or what it loads.
        for key, value in _task_env(spec).items():
            argv += ["--setenv", key, value]
        argv += ["--chdir", str(spec.workdir.resolve()), "--", *spec.argv]
        return Launch(argv=argv, env=dict(self.options.host_env), cwd=spec.workdir)

    async def cleanup(self, launch: Launch) -> None:
        # --die-with-parent: the sandbox dies with the killed bwrap.
        return None

    def sandbox_flags(self, mounts: Sequence[Mount]) -> list[str]:
        """bwrap's options for a task that may write only ``mounts`` (checked, host == target)."""
        # fmt: off
        flags = [
            "--die-with-parent",  # the task dies with bwrap when the pilot kills it
            "--new-session",  # no TIOCSTI keystrokes into the pilot's terminal
            "--unshare-pid", "--unshare-ipc",
            "--cap-drop", "ALL",  # run as root, bwrap keeps all: the task could remount / rw
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            # uid 0 needs no capability to write sysctls or the sysrq trigger: keep them read-only.
            "--ro-bind-try", "/proc/sys", "/proc/sys",
            "--ro-bind-try", "/proc/sysrq-trigger", "/proc/sysrq-trigger",
        ]
        # fmt: on
        if not self.options.task_network:
            flags.append("--unshare-net")
        # Private scratch; /run also hides the host's daemon sockets (podman, docker, dbus), which a
        # read-only mount does not stop a task from connecting to.
        for private in ("/tmp", "/var/tmp", "/run"):
            path = Path(private)
            if path.is_dir() and not path.is_symlink():
                flags += ["--tmpfs", private]
        # The sandbox runs as the pilot's uid, which may own these (a local WMS's secret).
        for hidden in self.options.hidden_directories:
            if hidden.is_dir():
                flags += ["--tmpfs", str(hidden.resolve())]
        resolv = Path("/etc/resolv.conf").resolve()
        if self.options.task_network and resolv.is_file() and resolv.is_relative_to("/run"):
            flags += ["--ro-bind", str(resolv), str(resolv)]  # systemd-resolved's, under /run
        # After the tmpfs mounts, so task directories under /tmp still appear; parents first.
        for mount in sorted(mounts, key=lambda m: len(m.host.parts)):
            flags += ["--bind" if mount.writable else "--ro-bind", str(mount.host), str(mount.host)]
        return flags


class ContainerCliRuntime:
    """``podman run`` / ``docker run`` of an image present locally; the task's variables go through
    ``--env``, so the container sees none of the host's."""

    maps_paths = True

    def __init__(self, name: str, options: RuntimeOptions) -> None:
        if name not in ("podman", "docker"):
            raise RuntimeSetupError(f"unknown container CLI {name!r}: choose podman or docker")
        self.name = name
        self.options = options

    async def prepare(self, image: str) -> str:
        if not image:
            raise RuntimeSetupError(f"{self.name}: no image given: set the task's image")
        if self.name == "podman":
            code, output = await _run(["podman", "image", "exists", image], self.options.host_env)
            missing = code == 1
        else:
            inspect = ["docker", "image", "inspect", "--format", "{{.Id}}", image]
            code, output = await _run(inspect, self.options.host_env)
            missing = code != 0 and "no such image" in output.lower()
        if missing:
            raise RuntimeSetupError(
                f"image {image} is not present locally ({self.name} runs with --pull=never): "
                f"build or pull it first, e.g. `{self.name} pull {image}`"
            )
        if code != 0:
            raise RuntimeSetupError(
                f"{self.name} cannot look up image {image} (exit {code}): {output or 'no output'}"
            )
        return image

    def launch(self, spec: TaskSpec) -> Launch:
        mounts = _mounts_with_workdir(spec, maps_paths=True)
        name = f"ewms-{secrets.token_hex(8)}"
        argv = [self.name, "run", "--rm", "--pull=never", "--name", name]
        if not self.options.task_network:
            argv.append("--network=none")
        if self.name == "docker" and self.options.docker_shm_size:
            argv.append(f"--shm-size={self.options.docker_shm_size}")
        for mount in mounts:
            argv += ["--mount", _mount_option(mount, spec.alias, self.name)]
        for key, value in _task_env(spec).items():
            argv += ["--env", f"{key}={value}"]
        argv += ["--workdir", normal_target(spec.workdir_target), spec.image, *spec.argv]
        return Launch(
            argv=argv, env=dict(self.options.host_env), cwd=spec.workdir, container_name=name
        )

    async def cleanup(self, launch: Launch) -> None:
        if launch.container_name is None:
            return
        # podman waits 10 s for SIGTERM first unless told not to; docker rm -f kills at once.
        wait = ["--time", "0"] if self.name == "podman" else []
        remove = [self.name, "rm", "-f", *wait, launch.container_name]
        code, output = await _run(remove, self.options.host_env)
        if code != 0 and "no such container" not in output.lower():
            raise RuntimeSetupError(
                f"could not remove container {launch.container_name} (exit {code}): {output}; "
                f"remove it with `{shlex.join(remove)}`"
            )


class ApptainerRuntime:
    """``apptainer run --containall --no-eval`` on an unpacked sandbox directory, as the original
    pilot did (no --writable-tmpfs: overlay pitfalls)."""

    name = "apptainer"
    maps_paths = True

    def __init__(self, options: RuntimeOptions) -> None:
        self.options = options

    async def prepare(self, image: str) -> str:
        if not image:
            raise RuntimeSetupError("apptainer: no image given: set the task's image")
        # A stat on CVMFS may wait for an automount: off the event loop.
        if await asyncio.to_thread(Path(image).is_dir):
            return image
        if self.options.apptainer_image_must_be_present:
            raise RuntimeSetupError(
                f"apptainer image {image} is not an existing directory: apptainer runs unpacked "
                "sandbox directories (e.g. on CVMFS), since SIF images cannot be mounted where "
                "there is no FUSE; give the sandbox directory, or set "
                "_EWMS_PILOT_APPTAINER_IMAGE_DIRECTORY_MUST_BE_PRESENT=false to build one here"
            )
        build = apptainer_build_argv(image, self.options.apptainer_build_workdir)
        code, output = await _run(build, self.options.host_env, time_limit=None)
        if code != 0:
            raise RuntimeSetupError(
                f"could not convert {image} to a sandbox directory (`{shlex.join(build)}` exited "
                f"{code}): {output or 'no output'}"
            )
        return build[-2].rstrip("/")

    def launch(self, spec: TaskSpec) -> Launch:
        mounts = _mounts_with_workdir(spec, maps_paths=True)
        argv = ["apptainer", *(["--debug"] if self.options.container_debug else [])]
        argv += ["run", "--containall", "--no-eval"]
        for mount in mounts:
            argv += ["--mount", _mount_option(mount, spec.alias, self.name)]
        for key, value in _task_env(spec).items():
            argv += ["--env", f"{key}={value}"]
        # Not in the original (tasks started in a temporary home): the cwd is the task's workdir.
        argv += ["--pwd", normal_target(spec.workdir_target), spec.image, *spec.argv]
        return Launch(argv=argv, env=dict(self.options.host_env), cwd=spec.workdir)

    async def cleanup(self, launch: Launch) -> None:
        # apptainer runs the task as its own child: killing it ends the task.
        return None


def apptainer_build_argv(image: str, build_workdir: Path) -> list[str]:
    """The command converting ``image`` into a sandbox directory under ``build_workdir``; names
    without "." and "://" are taken as Docker Hub images (as the original did)."""
    ref = image if ("." in image or "://" in image) else f"docker://{image}"
    sandbox = re.sub(r"[^A-Za-z0-9._-]", "_", image).lstrip(".") or "image"
    return ["apptainer", "build", "--fix-perms", "--sandbox", f"{build_workdir / sandbox}/", ref]


def _task_env(spec: TaskSpec) -> dict[str, str]:
    for key in spec.env:
        if not _ENV_NAME.match(key):
            raise RuntimeSetupError(
                f"{spec.alias}: environment variable name {key!r} is invalid: names must match "
                f"{_ENV_NAME.pattern}"
            )
    return dict(spec.env)


def _mounts_with_workdir(spec: TaskSpec, *, maps_paths: bool) -> tuple[Mount, ...]:
    """The spec's mounts, checked and normalised, plus the workdir read-only when no mount shows
    the task its cwd: for runtimes that map paths, when workdir_target is inside no mount's target;
    for the others (targets are host paths), when workdir is inside no mount."""

    def checked(mounts: Sequence[Mount]) -> tuple[Mount, ...]:
        if not maps_paths:
            mounts = [Mount(m.host, str(m.host), m.writable) for m in mounts]
        normal = check_mounts(mounts, spec.alias)
        if not maps_paths:
            normal = tuple(Mount(m.host, str(m.host), m.writable) for m in normal)
        return normal

    mounts = checked(spec.mounts)
    if maps_paths:
        cwd = PurePosixPath(normal_target(spec.workdir_target))
        if any(cwd.is_relative_to(m.target) for m in mounts):
            return mounts
    elif any(spec.workdir.resolve().is_relative_to(m.host) for m in mounts):
        return mounts
    target = spec.workdir_target if maps_paths else str(spec.workdir)
    return checked([*spec.mounts, Mount(spec.workdir, target, writable=False)])


def _mount_option(mount: Mount, alias: str, cli: str) -> str:
    """``--mount``'s value; its comma-separated syntax cannot carry a comma in a path."""
    for path in (str(mount.host), mount.target):
        if "," in path:
            raise MountError(
                f"{alias}: mount of {mount.host} at {mount.target}: {cli} --mount cannot "
                "express a path containing ','; rename the directory"
            )
    option = f"type=bind,source={mount.host},target={mount.target}"
    return option if mount.writable else f"{option},readonly"


async def _run(
    argv: list[str], env: Mapping[str, str], time_limit: float | None = CHECK_TIMEOUT
) -> tuple[int, str]:
    """A runtime's own command: its exit code and output (stderr, else stdout)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise RuntimeSetupError(
            f"{argv[0]} is not installed here (not found on PATH={env.get('PATH', '')}): "
            f"install it or choose another runtime"
        ) from None
    except OSError as exc:
        raise RuntimeSetupError(f"cannot run {argv[0]}: {exc}") from exc
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), time_limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeSetupError(
            f"`{shlex.join(argv)}` did not finish within {time_limit:.0f} s; is {argv[0]} hanging?"
        ) from None
    output = (stderr or stdout).decode(errors="replace").strip()
    return proc.returncode if proc.returncode is not None else -1, output
