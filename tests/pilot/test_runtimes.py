"""The pilot's task runtimes (services/pilot/runtimes.py) and bind-mount safety rules
(services/pilot/mounts.py).

Tasks run for real: on the host, in bubblewrap, in podman containers of a busybox image built in
this session. Where this machine cannot run them (docker without a daemon, apptainer), the command
lines are checked. A missing bwrap or unusable podman skips its tests with the reason, or fails
them when CI is set (as .ci/run does)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.pilot.mounts import check_mounts
from services.pilot.runtimes import (
    RUNTIMES,
    Launch,
    Mount,
    MountError,
    Runtime,
    RuntimeOptions,
    RuntimeSetupError,
    TaskSpec,
    apptainer_build_argv,
    make_runtime,
)

TASK_IO = "/ewms-pilot-data/task-io"
DATA_HUB = "/ewms-pilot-data/data-hub"
RUN_WITHIN = 30.0


def ci_requires_everything() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(problem: str | None, what: str) -> None:
    """Skip the calling test when ``problem`` is set -- or fail it when CI is set (the pattern of
    tests.conftest.require_rabbitmq)."""
    if problem is None:
        return
    if ci_requires_everything():
        pytest.fail(f"{what} required (CI is set) but unusable: {problem}")
    pytest.skip(f"needs {what}: {problem}")


@dataclass(frozen=True)
class Dirs:
    """A task's host directories, as the pilot lays them out, plus one it must not touch."""

    task_io: Path
    hub: Path
    external: Path  # an EWMS_PILOT_EXTERNAL_DIRECTORIES entry, holding readme.txt
    sibling: Path  # beside the task's directory, not mounted


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    made = Dirs(
        task_io=tmp_path / "ewms-pilot-data" / "msg-1" / "task-io",
        hub=tmp_path / "ewms-pilot-data" / "data-hub",
        external=tmp_path / "cvmfs" / "software",
        sibling=tmp_path / "ewms-pilot-data" / "msg-2",
    )
    for path in (made.task_io, made.hub, made.external, made.sibling):
        path.mkdir(parents=True)
    (made.external / "readme.txt").write_text("external data\n")
    return made


def task(
    dirs: Dirs,
    argv: list[str],
    *,
    maps_paths: bool = False,
    image: str = "",
    env: dict[str, str] | None = None,
    mounts: tuple[Mount, ...] | None = None,
) -> TaskSpec:
    """A task spec as the pilot core builds it: task-io and data hub writable, the external
    directory read-only at its own path; cwd = the task-io directory."""
    if mounts is None:
        mounts = (
            Mount(dirs.task_io, TASK_IO if maps_paths else str(dirs.task_io), writable=True),
            Mount(dirs.hub, DATA_HUB if maps_paths else str(dirs.hub), writable=True),
            Mount(dirs.external, str(dirs.external), writable=False),
        )
    return TaskSpec(
        alias="task",
        image=image,
        argv=argv,
        env=env or {},
        workdir=dirs.task_io,
        mounts=mounts,
        workdir_target=TASK_IO if maps_paths else str(dirs.task_io),
    )


def sh(script: str, *args: str) -> list[str]:
    """argv running ``script`` in sh with ``args`` as $1, $2, ..."""
    return ["sh", "-c", script, "sh", *args]


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


async def run(launch: Launch) -> Result:
    """Spawn the launch as the pilot does and wait for it (failing the test after RUN_WITHIN)."""
    proc = await asyncio.create_subprocess_exec(
        *launch.argv,
        env=launch.env,
        cwd=launch.cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_WITHIN)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{launch.argv} did not finish within {RUN_WITHIN}s") from None
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def probe_name() -> str:
    return f"ewms-probe-{secrets.token_hex(6)}"


# -- process ------------------------------------------------------------------------------------


async def test_process_task_runs_in_its_workdir(dirs: Dirs) -> None:
    runtime = make_runtime("process", RuntimeOptions())
    result = await run(runtime.launch(task(dirs, ["pwd"])))
    assert (result.code, result.out.strip()) == (0, str(dirs.task_io))


async def test_process_task_env_is_the_host_env_overridden_by_the_task_env(dirs: Dirs) -> None:
    host_env = {**os.environ, "ONLY_ON_HOST": "host", "BOTH": "host"}
    runtime = make_runtime("process", RuntimeOptions(host_env=host_env))
    spec = task(dirs, sh('echo "$ONLY_ON_HOST $BOTH"'), env={"BOTH": "task"})
    result = await run(runtime.launch(spec))
    assert (result.code, result.out.strip()) == (0, "host task")


def test_process_runtime_checks_no_mounts(dirs: Dirs) -> None:
    # It sees the whole host anyway; a writable /etc in the spec changes nothing.
    runtime = make_runtime("process", RuntimeOptions())
    spec = task(dirs, ["true"], mounts=(Mount(Path("/etc"), "/etc", writable=True),))
    assert runtime.launch(spec).argv == ["true"]


# -- bwrap --------------------------------------------------------------------------------------


async def bwrap_runtime(task_network: bool = False) -> Runtime:
    """A bwrap runtime that passed its own check (else the test is skipped, or fails in CI)."""
    if shutil.which("bwrap") is None:
        require("bwrap is not installed (apt-get install bubblewrap)", "bubblewrap")
    runtime = make_runtime("bwrap", RuntimeOptions(task_network=task_network))
    try:
        await runtime.prepare("")
    except RuntimeSetupError as exc:
        require(str(exc), "bubblewrap")
    return runtime


@pytest.fixture
async def bwrap() -> Runtime:
    return await bwrap_runtime()


async def test_bwrap_task_writes_its_task_dir_and_the_data_hub(bwrap: Runtime, dirs: Dirs) -> None:
    argv = sh(
        'echo out > "$1/outfile" && echo shared > "$2/hub-file"',
        *map(str, (dirs.task_io, dirs.hub)),
    )
    result = await run(bwrap.launch(task(dirs, argv)))
    assert result.code == 0, result.err
    assert (dirs.task_io / "outfile").read_text() == "out\n"
    assert (dirs.hub / "hub-file").read_text() == "shared\n"


async def test_bwrap_task_runs_in_its_workdir_with_its_env(bwrap: Runtime, dirs: Dirs) -> None:
    spec = task(dirs, sh('pwd; echo "$GREETING"'), env={"GREETING": "hello world"})
    result = await run(bwrap.launch(spec))
    assert (result.code, result.out) == (0, f"{dirs.task_io}\nhello world\n")


async def test_bwrap_task_cannot_write_the_root_filesystem(bwrap: Runtime, dirs: Dirs) -> None:
    target = Path("/") / probe_name()
    result = await run(bwrap.launch(task(dirs, sh('echo x > "$1"', str(target)))))
    assert result.code != 0
    assert "Read-only file system" in result.err
    assert not target.exists()


async def test_bwrap_task_cannot_write_home(bwrap: Runtime, dirs: Dirs) -> None:
    target = Path.home() / probe_name()
    result = await run(bwrap.launch(task(dirs, sh('echo x > "$1"', str(target)))))
    assert result.code != 0
    assert not target.exists()


async def test_bwrap_task_writes_to_tmp_do_not_reach_the_hosts_tmp(
    bwrap: Runtime, dirs: Dirs
) -> None:
    target = Path("/tmp") / probe_name()
    result = await run(bwrap.launch(task(dirs, sh('echo x > "$1" && cat "$1"', str(target)))))
    assert (result.code, result.out) == (0, "x\n")  # its own /tmp is writable
    assert not target.exists()


async def test_bwrap_task_does_not_see_the_hosts_tmp(bwrap: Runtime, dirs: Dirs) -> None:
    host_file = Path("/tmp") / probe_name()
    host_file.write_text("host\n")
    try:
        result = await run(bwrap.launch(task(dirs, sh('test -e "$1"', str(host_file)))))
    finally:
        host_file.unlink()
    assert result.code == 1


async def test_bwrap_task_cannot_write_beside_its_task_dir(bwrap: Runtime, dirs: Dirs) -> None:
    target = dirs.sibling / "stolen"
    result = await run(bwrap.launch(task(dirs, sh('echo x > "$1"', str(target)))))
    assert result.code != 0
    assert not target.exists()


async def test_bwrap_external_directory_is_readable_not_writable(
    bwrap: Runtime, dirs: Dirs
) -> None:
    argv = sh('cat "$1/readme.txt"; echo x > "$1/new"', str(dirs.external))
    result = await run(bwrap.launch(task(dirs, argv)))
    assert result.out == "external data\n"
    assert result.code != 0
    assert "Read-only file system" in result.err
    assert not (dirs.external / "new").exists()


async def test_bwrap_workdir_outside_the_mounts_is_visible_read_only(
    bwrap: Runtime, dirs: Dirs
) -> None:
    spec = task(dirs, sh("pwd; echo x > here"), mounts=())
    result = await run(bwrap.launch(spec))
    assert result.out == f"{dirs.task_io}\n"
    assert result.code != 0
    assert not (dirs.task_io / "here").exists()


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A TCP server on 127.0.0.1: its port, and an event set when someone connects."""
    connected = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connected
    finally:
        server.close()
        await server.wait_closed()


def connect_argv(port: int) -> list[str]:
    return ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"]


async def test_bwrap_task_cannot_connect_to_the_hosts_loopback(
    bwrap: Runtime, dirs: Dirs, listener: tuple[int, asyncio.Event]
) -> None:
    port, connected = listener
    result = await run(bwrap.launch(task(dirs, connect_argv(port))))
    assert result.code != 0
    assert "Connection refused" in result.err  # its own, empty loopback
    assert not connected.is_set()


async def test_bwrap_task_network_option_lets_it_connect(
    dirs: Dirs, listener: tuple[int, asyncio.Event]
) -> None:
    runtime = await bwrap_runtime(task_network=True)
    port, connected = listener
    result = await run(runtime.launch(task(dirs, connect_argv(port))))
    assert result.code == 0, result.err
    await asyncio.wait_for(connected.wait(), RUN_WITHIN)


async def test_bwrap_task_cannot_see_host_processes(bwrap: Runtime, dirs: Dirs) -> None:
    result = await run(bwrap.launch(task(dirs, sh('test -e "/proc/$1"', str(os.getpid())))))
    assert result.code == 1


async def test_bwrap_task_cannot_change_kernel_settings(bwrap: Runtime, dirs: Dirs) -> None:
    argv = sh("cat /proc/sys/vm/swappiness > /proc/sys/vm/swappiness")  # same value: harmless
    result = await run(bwrap.launch(task(dirs, argv)))
    assert result.code != 0
    assert "Read-only file system" in result.err or "Permission denied" in result.err


async def test_bwrap_task_cannot_remount_the_root_writable(bwrap: Runtime, dirs: Dirs) -> None:
    argv = sh('mount -o remount,rw,bind / && echo x > "/$1"', probe_name())
    result = await run(bwrap.launch(task(dirs, argv)))
    assert result.code != 0
    assert "mount" in result.err


async def test_bwrap_task_does_not_see_the_hosts_run_directory(bwrap: Runtime, dirs: Dirs) -> None:
    # /run holds daemons' sockets (podman, docker, dbus); a read-only mount does not stop connect().
    if not os.access("/run", os.W_OK):
        pytest.skip("needs a writable /run to place a file there")
    host_file = Path("/run") / probe_name()
    host_file.write_text("host\n")
    try:
        result = await run(bwrap.launch(task(dirs, sh('test -e "$1"', str(host_file)))))
    finally:
        host_file.unlink()
    assert result.code == 1


async def test_bwrap_task_dies_with_its_killed_launcher(bwrap: Runtime, dirs: Dirs) -> None:
    launch = bwrap.launch(task(dirs, sh("echo started; exec sleep 600")))
    proc = await asyncio.create_subprocess_exec(
        *launch.argv, env=launch.env, cwd=launch.cwd, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), RUN_WITHIN) == b"started\n"
    proc.kill()
    # The pipe reaches EOF only when the sleeping task, which holds it too, is gone.
    assert await asyncio.wait_for(proc.stdout.read(), RUN_WITHIN) == b""
    await proc.wait()  # (asyncio's wait also waits for the pipes to close)


async def test_bwrap_prepare_reports_a_missing_bwrap(tmp_path: Path) -> None:
    runtime = make_runtime("bwrap", RuntimeOptions(host_env={"PATH": str(tmp_path)}))
    with pytest.raises(RuntimeSetupError, match="bwrap is not installed"):
        await runtime.prepare("")


# -- podman -------------------------------------------------------------------------------------

BUSYBOX = Path("/bin/busybox")  # from busybox-static: the image's only binary, needs no libc


def podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=60)


def build_busybox_image(workdir: Path, tag: str) -> str | None:
    """Import a busybox-only image as ``tag``; why it cannot be used (None if it can)."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman runc)"
    if not BUSYBOX.is_file():
        return f"{BUSYBOX} is missing (apt-get install busybox-static)"
    rootfs = workdir / "rootfs"
    for sub in ("bin", "tmp", "etc", "proc", "sys", "dev"):
        (rootfs / sub).mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    archive = workdir / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(rootfs, arcname=".")
    imported = podman("import", str(archive), tag)
    if imported.returncode != 0:
        return f"podman import failed: {imported.stderr.strip()}"
    trial = podman("run", "--rm", "--pull=never", "--network=none", tag, "true")
    if trial.returncode != 0:
        return f"podman cannot run containers here: {trial.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local busybox image, unique to this session (sessions may run side by side)."""
    tag = f"localhost/ewms-test-busybox:{secrets.token_hex(4)}"
    problem = build_busybox_image(tmp_path_factory.mktemp("busybox-image"), tag)
    try:
        require(problem, "podman")
        yield tag
    finally:
        if shutil.which("podman"):
            podman("rmi", "-f", tag)


@pytest.fixture
def podman_runtime(busybox_image: str) -> Runtime:
    return make_runtime("podman", RuntimeOptions())


async def test_podman_task_reads_infile_and_writes_outfile_through_mounts(
    podman_runtime: Runtime, busybox_image: str, dirs: Dirs
) -> None:
    (dirs.task_io / "infile").write_text("event payload\n")
    argv = sh('tr a-z A-Z < "$1" > "$2"', f"{TASK_IO}/infile", f"{TASK_IO}/outfile")
    spec = task(dirs, argv, maps_paths=True, image=busybox_image)
    result = await run(podman_runtime.launch(spec))
    assert result.code == 0, result.err
    assert (dirs.task_io / "outfile").read_text() == "EVENT PAYLOAD\n"


async def test_podman_task_sees_its_env_and_none_of_the_hosts(
    busybox_image: str, dirs: Dirs
) -> None:
    runtime = make_runtime("podman", RuntimeOptions(host_env={**os.environ, "HOST_ONLY": "secret"}))
    argv = sh('echo "$GREETING|${HOST_ONLY:-unset}"')
    spec = task(dirs, argv, maps_paths=True, image=busybox_image, env={"GREETING": "hello world"})
    result = await run(runtime.launch(spec))
    assert (result.code, result.out) == (0, "hello world|unset\n"), result.err


async def test_podman_task_runs_in_its_workdir_target(
    podman_runtime: Runtime, busybox_image: str, dirs: Dirs
) -> None:
    spec = task(dirs, ["pwd"], maps_paths=True, image=busybox_image)
    result = await run(podman_runtime.launch(spec))
    assert (result.code, result.out) == (0, f"{TASK_IO}\n"), result.err


async def test_podman_external_directory_is_read_only(
    podman_runtime: Runtime, busybox_image: str, dirs: Dirs
) -> None:
    argv = sh('cat "$1/readme.txt"; echo x > "$1/new"', str(dirs.external))
    spec = task(dirs, argv, maps_paths=True, image=busybox_image)
    result = await run(podman_runtime.launch(spec))
    assert result.out == "external data\n"
    assert result.code != 0
    assert not (dirs.external / "new").exists()


async def test_podman_task_has_no_network_by_default(
    podman_runtime: Runtime, busybox_image: str, dirs: Dirs
) -> None:
    spec = task(dirs, ["cat", "/proc/net/dev"], maps_paths=True, image=busybox_image)
    result = await run(podman_runtime.launch(spec))
    assert result.code == 0, result.err
    interfaces = [line.split(":")[0].strip() for line in result.out.splitlines()[2:]]
    assert interfaces == ["lo"]


async def test_podman_run_leaves_no_container(
    podman_runtime: Runtime, busybox_image: str, dirs: Dirs
) -> None:
    launch = podman_runtime.launch(task(dirs, ["true"], maps_paths=True, image=busybox_image))
    assert (await run(launch)).code == 0
    assert launch.container_name is not None
    assert podman("container", "exists", launch.container_name).returncode == 1


async def test_podman_prepare_accepts_a_local_image(
    podman_runtime: Runtime, busybox_image: str
) -> None:
    assert await podman_runtime.prepare(busybox_image) == busybox_image


async def test_podman_prepare_rejects_a_missing_image(podman_runtime: Runtime) -> None:
    absent = f"localhost/ewms-test-absent:{secrets.token_hex(4)}"
    with pytest.raises(RuntimeSetupError, match=f"image {absent} is not present locally"):
        await podman_runtime.prepare(absent)


async def test_podman_cleanup_removes_a_still_running_container(
    podman_runtime: Runtime, busybox_image: str, dirs: Dirs
) -> None:
    spec = task(dirs, ["sleep", "600"], maps_paths=True, image=busybox_image)
    launch = podman_runtime.launch(spec)
    assert launch.container_name is not None
    launcher = await asyncio.create_subprocess_exec(*launch.argv, env=launch.env, cwd=launch.cwd)
    try:
        deadline = time.monotonic() + RUN_WITHIN
        while (
            podman(
                "inspect", "--format", "{{.State.Running}}", launch.container_name
            ).stdout.strip()
            != "true"
        ):
            assert time.monotonic() < deadline, "the container never started"
            await asyncio.sleep(0.05)
    finally:
        launcher.kill()
        await launcher.wait()
    # The killed launcher leaves the container running: that is what cleanup is for.
    assert podman("container", "exists", launch.container_name).returncode == 0
    await podman_runtime.cleanup(launch)
    assert podman("container", "exists", launch.container_name).returncode == 1


# -- docker (no daemon here: command lines and prepare's errors) --------------------------------


def test_docker_command_line(dirs: Dirs) -> None:
    options = RuntimeOptions(docker_shm_size="2g", host_env={"PATH": "/usr/bin", "HOME": "/h"})
    runtime = make_runtime("docker", options)
    spec = task(
        dirs,
        ["python", "run.py", f"{TASK_IO}/in"],
        maps_paths=True,
        image="img:1",
        env={"A": "1 2"},
    )
    launch = runtime.launch(spec)
    assert launch.container_name is not None and launch.container_name.startswith("ewms-")
    assert launch.argv == [
        "docker", "run", "--rm", "--pull=never", "--name", launch.container_name,
        "--network=none", "--shm-size=2g",
        "--mount", f"type=bind,source={dirs.task_io},target={TASK_IO}",
        "--mount", f"type=bind,source={dirs.hub},target={DATA_HUB}",
        "--mount", f"type=bind,source={dirs.external},target={dirs.external},readonly",
        "--env", "A=1 2",
        "--workdir", TASK_IO,
        "img:1", "python", "run.py", f"{TASK_IO}/in",
    ]  # fmt: skip
    assert launch.env == {"PATH": "/usr/bin", "HOME": "/h"}  # task variables go through --env


def test_container_task_network_option_drops_network_none(dirs: Dirs) -> None:
    runtime = make_runtime("podman", RuntimeOptions(task_network=True))
    launch = runtime.launch(task(dirs, ["true"], maps_paths=True, image="img"))
    assert not any(arg.startswith("--network") for arg in launch.argv)


def test_container_names_are_unique(dirs: Dirs) -> None:
    runtime = make_runtime("docker", RuntimeOptions())
    spec = task(dirs, ["true"], maps_paths=True, image="img")
    assert runtime.launch(spec).container_name != runtime.launch(spec).container_name


async def test_docker_prepare_reports_a_missing_cli(tmp_path: Path) -> None:
    runtime = make_runtime("docker", RuntimeOptions(host_env={"PATH": str(tmp_path)}))
    with pytest.raises(RuntimeSetupError, match="docker is not installed"):
        await runtime.prepare("img:1")


async def test_docker_prepare_reports_an_unreachable_daemon() -> None:
    if shutil.which("docker") is None:
        pytest.skip("needs the docker CLI (without a daemon is fine)")
    host_env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/ewms-test-docker.sock"}
    runtime = make_runtime("docker", RuntimeOptions(host_env=host_env))
    with pytest.raises(RuntimeSetupError, match="docker cannot look up image img:1") as caught:
        await runtime.prepare("img:1")
    assert "nonexistent/ewms-test-docker.sock" in str(caught.value)


# -- apptainer (not installable here: command lines) --------------------------------------------


def test_apptainer_command_line(dirs: Dirs) -> None:
    runtime = make_runtime("apptainer", RuntimeOptions(host_env={"PATH": "/usr/bin"}))
    spec = task(dirs, ["python", "run.py"], maps_paths=True, image="/cvmfs/img", env={"A": "1"})
    launch = runtime.launch(spec)
    assert launch.argv == [
        "apptainer", "run", "--containall", "--no-eval",
        "--mount", f"type=bind,source={dirs.task_io},target={TASK_IO}",
        "--mount", f"type=bind,source={dirs.hub},target={DATA_HUB}",
        "--mount", f"type=bind,source={dirs.external},target={dirs.external},readonly",
        "--env", "A=1",
        "--pwd", TASK_IO,
        "/cvmfs/img", "python", "run.py",
    ]  # fmt: skip
    assert (launch.env, launch.container_name) == ({"PATH": "/usr/bin"}, None)


def test_apptainer_debug_option_comes_before_run(dirs: Dirs) -> None:
    runtime = make_runtime("apptainer", RuntimeOptions(container_debug=True))
    launch = runtime.launch(task(dirs, ["true"], maps_paths=True, image="/cvmfs/img"))
    assert launch.argv[:3] == ["apptainer", "--debug", "run"]


def test_apptainer_build_argv() -> None:
    argv = apptainer_build_argv("ghcr.io/org/task:1.2", Path("/var/tmp"))
    assert argv == [
        "apptainer", "build", "--fix-perms", "--sandbox",
        "/var/tmp/ghcr.io_org_task_1.2/", "ghcr.io/org/task:1.2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("image", "ref"),
    [
        ("alpine", "docker://alpine"),
        ("org/task:latest", "docker://org/task:latest"),
        ("docker://alpine", "docker://alpine"),
        ("oras://host/x", "oras://host/x"),
        ("ghcr.io/org/task", "ghcr.io/org/task"),
        ("task.sif", "task.sif"),
    ],
)
def test_apptainer_build_ref_gets_docker_prefix_without_dot_or_scheme(image: str, ref: str) -> None:
    assert apptainer_build_argv(image, Path("/w"))[-1] == ref


async def test_apptainer_prepare_uses_an_existing_sandbox_directory(tmp_path: Path) -> None:
    runtime = make_runtime("apptainer", RuntimeOptions())
    assert await runtime.prepare(str(tmp_path)) == str(tmp_path)


async def test_apptainer_prepare_refuses_a_non_directory_when_it_must_be_present(
    tmp_path: Path,
) -> None:
    runtime = make_runtime("apptainer", RuntimeOptions(apptainer_image_must_be_present=True))
    with pytest.raises(RuntimeSetupError, match="unpacked sandbox directories"):
        await runtime.prepare(str(tmp_path / "task.sif"))


async def test_apptainer_prepare_needs_apptainer_to_build(tmp_path: Path) -> None:
    options = RuntimeOptions(
        apptainer_image_must_be_present=False, host_env={"PATH": str(tmp_path)}
    )
    with pytest.raises(RuntimeSetupError, match="apptainer is not installed"):
        await make_runtime("apptainer", options).prepare("alpine")


# -- all runtimes -------------------------------------------------------------------------------


def test_runtimes_say_whether_they_map_paths() -> None:
    maps = {name: make_runtime(name, RuntimeOptions()).maps_paths for name in RUNTIMES}
    assert maps == {
        "process": False,
        "bwrap": False,
        "podman": True,
        "docker": True,
        "apptainer": True,
    }


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(RuntimeSetupError, match="unknown runtime 'lxc': choose one of process"):
        make_runtime("lxc", RuntimeOptions())


@pytest.mark.parametrize("name", RUNTIMES)
def test_invalid_env_names_are_refused(name: str, dirs: Dirs) -> None:
    runtime = make_runtime(name, RuntimeOptions())
    spec = task(dirs, ["true"], maps_paths=runtime.maps_paths, image="img", env={"A=B": "1"})
    with pytest.raises(RuntimeSetupError, match="environment variable name 'A=B' is invalid"):
        runtime.launch(spec)


@pytest.mark.parametrize("name", ["bwrap", "podman", "docker", "apptainer"])
def test_mounting_runtimes_refuse_unsafe_mounts(name: str, dirs: Dirs) -> None:
    runtime = make_runtime(name, RuntimeOptions())
    mounts = (Mount(Path("/etc"), "/etc", writable=True),)
    spec = task(dirs, ["true"], maps_paths=runtime.maps_paths, image="img", mounts=mounts)
    with pytest.raises(MountError, match="may only be mounted read-only"):
        runtime.launch(spec)


@pytest.mark.parametrize("name", ["podman", "docker", "apptainer"])
def test_container_mounts_refuse_commas_in_paths(name: str, tmp_path: Path, dirs: Dirs) -> None:
    odd = tmp_path / "a,b"
    odd.mkdir()
    runtime = make_runtime(name, RuntimeOptions())
    mounts = (Mount(odd, "/data", writable=False),)
    spec = task(dirs, ["true"], maps_paths=True, image="img", mounts=mounts)
    with pytest.raises(MountError, match="cannot express a path containing ','"):
        runtime.launch(spec)


# -- bind-mount safety --------------------------------------------------------------------------

# (host, target, writable, refusal) -- host "TMP" is a fresh directory; refusal None = allowed.
MOUNT_RULES = [
    ("TMP", "/ewms-pilot-data/task-io", True, None),
    ("TMP", "/data/../scratch", True, None),
    ("/etc", "/etc", False, None),
    ("/usr/share", "/usr/share", False, None),
    ("/var", "/var", False, None),
    ("/var/lib", "/data", True, None),  # /var is not forbidden (/var/lib/condor/execute)
    ("/var/cache", "/cache", False, None),
    ("TMP", "/etc/task.d", False, None),
    ("/proc/self", "/p", False, "it is under /proc; host paths under /proc may not be mounted"),
    ("/dev/shm", "/shm", False, "it is under /dev; host paths under /dev may not be mounted"),
    ("/sys", "/sys", False, "it is /sys; host paths under /sys may not be mounted"),
    ("/run", "/run", False, "it is /run; host paths under /run may not be mounted"),
    ("/var/run", "/x", False, "(resolves to /run): it is /run; host paths under /run"),
    ("/boot", "/boot", False, "it is /boot; host paths under /boot may not be mounted"),
    ("/", "/host", False, "it contains /proc; host paths under /proc may not be mounted"),
    ("/etc", "/etc", True, "it is /etc; host paths under /etc may only be mounted read-only"),
    ("/usr/lib", "/l", True, "it is under /usr; host paths under /usr may only be mounted"),
    ("/root", "/r", True, "it is /root; host paths under /root may only be mounted read-only"),
    ("/var/log", "/l", True, "it is /var/log; host paths under /var/log may only be mounted"),
    ("/var/spool", "/s", True, "it is /var/spool; host paths under /var/spool may only be"),
    ("/var", "/v", True, "it contains /var/log; host paths under /var/log may only be mounted"),
    ("/tmp/../etc", "/e", True, "(resolves to /etc): it is /etc; host paths under /etc"),
    ("TMP", "/etc", True, "its target /etc is /etc; writable mounts may not target /etc"),
    ("TMP", "/usr/local/x", True, "its target /usr/local/x is under /usr; writable mounts"),
    ("TMP", "/proc", True, "its target /proc is /proc; writable mounts may not target /proc"),
    ("TMP", "/dev/x", True, "its target /dev/x is under /dev; writable mounts may not target"),
    ("TMP", "/x/../../sys", True, "its target /sys is /sys; writable mounts may not target /sys"),
    ("TMP", "/", True, "the target / would replace the task's whole filesystem"),
    ("TMP", "/", False, "the target / would replace the task's whole filesystem"),
    ("data", "/data", False, "mount of data: host paths must be absolute"),
    ("TMP", "data", False, "at 'data': target paths must be absolute"),
    ("TMP/missing", "/m", False, "no such directory on this host"),
]


@pytest.mark.parametrize(("host", "target", "writable", "refusal"), MOUNT_RULES)
def test_mount_safety_rules(
    host: str, target: str, writable: bool, refusal: str | None, tmp_path: Path
) -> None:
    mount = Mount(Path(host.replace("TMP", str(tmp_path))), target, writable)
    if refusal is None:
        (checked,) = check_mounts([mount], "task")
        assert checked.host == mount.host.resolve()
        return
    with pytest.raises(MountError) as caught:
        check_mounts([mount], "task")
    message = str(caught.value)
    assert refusal in message
    assert message.startswith(f"task: {'writable' if writable else 'read-only'} mount of ")


def test_mount_paths_are_normalised(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (checked,) = check_mounts([Mount(tmp_path / "link", "/a/./b/../c//", True)], "task")
    assert (checked.host, checked.target) == (tmp_path / "real", "/a/c")


def test_a_symlink_cannot_route_around_the_rules(tmp_path: Path) -> None:
    (tmp_path / "etc").symlink_to("/etc")
    with pytest.raises(MountError, match=r"resolves to /etc\): it is /etc"):
        check_mounts([Mount(tmp_path / "etc", "/data", writable=True)], "task")


def test_duplicate_targets_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mounts = [Mount(tmp_path / "a", "/data", False), Mount(tmp_path / "b", "/data/", False)]
    with pytest.raises(MountError, match="both target /data: each target may be mounted only once"):
        check_mounts(mounts, "init")
