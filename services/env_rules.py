"""Which variables a user may put in a task's ``pilot_config.environment``: the rules the WMS
applies at CreateWorkflow (INVALID_ARGUMENT naming the variable) and the TMS applies again before a
start (a workflow stored before these rules, or a WMS without them, must not reach a pilot).

The pilot runs outside any sandbox with the taskforce's tokens, and its environment is inherited by
the shell that sources an HTCondor envfile, the pilot's Python, the spawner, and the sandbox tools
(bwrap, podman, apptainer) that it starts. In the original, ``pilot_config.environment`` carries the
pilot's own settings only (``EWMS_PILOT_*``, UPSTREAM.md §1.6). So the rule is an allow rule:

- a name must start with ``EWMS_PILOT_`` or ``_EWMS_PILOT_`` (the pilot reads nothing else; a
  task's own variables go in ``task_env``/``init_env``);
- of those, the ones the WMS sets for each taskforce (queues, tokens, identity) are refused too.

Names that change how programs are loaded or interpreted (``LOADER_PREFIXES``, ``LOADER_NAMES``)
get a message saying so; they fail the allow rule anyway.
"""

from __future__ import annotations

PILOT_PREFIXES = ("EWMS_PILOT_", "_EWMS_PILOT_")
# Set by the WMS (and TMS) for each taskforce or worker; a user's value would redirect the pilot.
DECIDED_PREFIXES = ("EWMS_PILOT_QUEUE_",)
DECIDED_NAMES = frozenset(
    {
        "EWMS_PILOT_TOKEN",
        "EWMS_PILOT_WMS_ADDRESS",
        "EWMS_PILOT_TASKFORCE_UUID",
        "EWMS_PILOT_WORKER_ID",
    }
)
# The dynamic loader (glibc's list of variables it ignores in setuid programs, and macOS's), and
# the interpreters and shells a pilot or its tools run: each would run code of the user's choosing
# outside the sandbox.
LOADER_PREFIXES = (
    "LD_",
    "DYLD_",
    "MALLOC_",
    "PYTHON",
    "BASH_FUNC_",
    "PERL",
    "RUBY",
    "NODE_",
    "LUA_",
    "APPTAINER",
    "SINGULARITY",
)
LOADER_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "ENV",
        "BASH_ENV",
        "IFS",
        "PS4",
        "SHELLOPTS",
        "BASHOPTS",
        "CDPATH",
        "GLOBIGNORE",
        "PROMPT_COMMAND",
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TMPDIR",
        "TZDIR",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "CLASSPATH",
        "TCLLIBPATH",
        "CONTAINERS_CONF",
        "CONTAINERS_STORAGE_CONF",
    }
)


def alters_loader(name: str) -> bool:
    """Whether ``name`` changes how the loader, an interpreter or a shell runs a program."""
    return name in LOADER_NAMES or name.startswith(LOADER_PREFIXES)


def pilot_env_problem(name: str) -> str | None:
    """Why a user may not set ``name`` in ``pilot_config.environment``, or None if they may."""
    if alters_loader(name):
        return (
            "refused: it changes how the dynamic loader, an interpreter or a shell runs the "
            "pilot and its tools, outside any sandbox; pilot_config.environment takes the pilot's "
            "EWMS_PILOT_* settings (a task's own variables go in task_env or init_env)"
        )
    if not name.startswith(PILOT_PREFIXES):
        return (
            "refused: pilot_config.environment takes the pilot's settings only, names starting "
            "with EWMS_PILOT_ or _EWMS_PILOT_ (a task's own variables go in task_env or init_env)"
        )
    if name in DECIDED_NAMES or name.startswith(DECIDED_PREFIXES):
        return "refused: set by the WMS for each taskforce (its queues, tokens and identity)"
    return None
