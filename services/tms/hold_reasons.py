"""HTCondor's hold reason codes, and a held job's hold reason as the TMS reports it.

The table is HTCondor's own ("Hold Reason Codes" in the HTCondor manual: each ``HoldReasonCode``,
its ``NumHoldsByReason`` label, what it means and what its ``HoldReasonSubCode`` carries), worded as
the original TMS words it (UPSTREAM.md §2.4): the manual's sentence without its final period.
``htcondor2`` has no enum of them. Codes 2 and 28-31 (Globus, glexec, privsep) are no longer in
HTCondor's table and render as unknown codes.

A held worker's ``hold_reason`` is the original's compound-status key without its ``"HELD: "`` (the
job state travels apart; ``ewms watch`` prints ``HELD: <hold_reason>``), then the JOB_HELD event's
own ``HoldReason`` text::

    <what the code means>[: subcode <n> (<what it means>)][: <the event's HoldReason>]

    Memory usage exceeds a memory limit: Error from slot1@ep: Job has gone over cgroup memory ...
    An error occurred while transferring job input files: subcode 2 (ENOENT): Transfer input ...
    User error in the EC2 universe: Public key file not defined

Subcode 0 means none: HTCondor writes ``Code 34 Subcode 0`` for a hold without one, and the original
renders that event ``"HELD: Memory usage exceeds a memory limit"``.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Mapping
from dataclasses import dataclass, field

# The WMS refuses a longer hold reason (services.wms.control.tms.MAX_ERROR_CHARS); the event's own
# text (a transfer error's can run to kilobytes) is cut to fit.
MAX_HOLD_REASON_CHARS = 4096
# HTCondor >= 24 marks code 34 (JobOutOfResources) with the resource that ran out.
SUBCODE_MEMORY = 102
SUBCODE_DISK = 104
MEMORY_LIMIT = "Memory usage exceeds a memory limit"


class Subcode(enum.Enum):
    """What a code's HoldReasonSubCode carries, as the manual's table says."""

    NOTHING = enum.auto()  # nothing documented: shown as a bare number
    ERRNO = enum.auto()  # a Unix errno
    TRANSFER = enum.auto()  # an errno, or from a file-transfer plug-in: 62 (ETIME) or exit << 8
    USER = enum.auto()  # whatever the user's hold expression provided


@dataclass(frozen=True)
class HoldCode:
    """One row of HTCondor's hold reason table. ``named`` are subcodes with a message of their own,
    which replaces ``message``."""

    label: str
    message: str
    subcode: Subcode = Subcode.NOTHING
    named: Mapping[int, str] = field(default_factory=dict)


def _each(message: str, rows: Mapping[int, str]) -> dict[int, str]:
    # The manual lists the EC2 codes' subcodes as rows under the code's own message.
    return {n: f"{message}: {row}" for n, row in rows.items()}


_EC2_USER = "User error in the EC2 universe"
_EC2_INTERNAL = "Internal error in the EC2 universe"
_EC2_ADMIN = "Administrator error in the EC2 universe"
_EC2_CONNECTION = "Connection problem in the EC2 universe"
_EC2_SERVER = "Server error in the EC2 universe"
_EC2_LOST = "Instance potentially lost due to an error in the EC2 universe"

HOLD_CODES: Mapping[int, HoldCode] = {
    0: HoldCode("Unspecified", "Unspecified hold reason"),
    1: HoldCode("UserRequest", "The user put the job on hold with condor_hold"),
    3: HoldCode(
        "JobPolicy",
        "The PERIODIC_HOLD expression evaluated to True. Or, ON_EXIT_HOLD was true",
        Subcode.USER,
    ),
    4: HoldCode("CorruptedCredential", "The credentials for the job are invalid"),
    5: HoldCode("JobPolicyUndefined", "A job policy expression evaluated to Undefined"),
    6: HoldCode(
        "FailedToCreateProcess",
        "The condor_starter failed to start the executable",
        Subcode.ERRNO,
    ),
    7: HoldCode(
        "UnableToOpenOutput",
        "The standard output file for the job could not be opened",
        Subcode.ERRNO,
    ),
    8: HoldCode(
        "UnableToOpenInput",
        "The standard input file for the job could not be opened",
        Subcode.ERRNO,
    ),
    9: HoldCode(
        "UnableToOpenOutputStream",
        "The standard output stream for the job could not be opened",
        Subcode.ERRNO,
    ),
    10: HoldCode(
        "UnableToOpenInputStream",
        "The standard input stream for the job could not be opened",
        Subcode.ERRNO,
    ),
    11: HoldCode(
        "InvalidTransferAck",
        "An internal HTCondor protocol error was encountered when transferring files",
    ),
    12: HoldCode(
        "TransferOutputError",
        "An error occurred while transferring job output files or self-checkpoint files",
        Subcode.TRANSFER,
    ),
    13: HoldCode(
        "TransferInputError",
        "An error occurred while transferring job input files",
        Subcode.TRANSFER,
    ),
    14: HoldCode(
        "IwdError", "The initial working directory of the job cannot be accessed", Subcode.ERRNO
    ),
    15: HoldCode("SubmittedOnHold", "The user requested the job be submitted on hold"),
    16: HoldCode("SpoolingInput", "Input files are being spooled"),
    17: HoldCode(
        "JobShadowMismatch",
        "A standard universe job is not compatible with the condor_shadow version available on "
        "the submitting machine",
    ),
    18: HoldCode(
        "InvalidTransferGoAhead",
        "An internal HTCondor protocol error was encountered when transferring files",
    ),
    19: HoldCode(
        "HookPrepareJobFailure",
        "<Keyword>_HOOK_PREPARE_JOB was defined but could not be executed or returned failure",
    ),
    20: HoldCode(
        "MissedDeferredExecutionTime",
        "The job missed its deferred execution time and therefore failed to run",
    ),
    21: HoldCode(
        "StartdHeldJob",
        "The job was put on hold because WANT_HOLD in the machine policy was true",
    ),
    22: HoldCode("UnableToInitUserLog", "Unable to initialize job event log"),
    23: HoldCode("FailedToAccessUserAccount", "Failed to access user account"),
    24: HoldCode("NoCompatibleShadow", "No compatible shadow"),
    25: HoldCode("InvalidCronSettings", "Invalid cron settings"),
    26: HoldCode("SystemPolicy", "SYSTEM_PERIODIC_HOLD evaluated to true"),
    27: HoldCode("SystemPolicyUndefined", "The system periodic job policy evaluated to undefined"),
    32: HoldCode(
        "MaxTransferInputSizeExceeded",
        "The maximum total input file transfer size was exceeded. (See MAX_TRANSFER_INPUT_MB)",
    ),
    33: HoldCode(
        "MaxTransferOutputSizeExceeded",
        "The maximum total output file transfer size was exceeded. (See MAX_TRANSFER_OUTPUT_MB)",
    ),
    # The original's (and HTCondor < 24's) wording: 34 meant memory only. HTCondor >= 24 calls it
    # "Job resource usage exceeded the provisioned limit" and names the resource in the subcode.
    34: HoldCode(
        "JobOutOfResources",
        MEMORY_LIMIT,
        named={SUBCODE_MEMORY: MEMORY_LIMIT, SUBCODE_DISK: "Disk usage exceeds a disk limit"},
    ),
    35: HoldCode("InvalidDockerImage", "Specified Docker image was invalid"),
    36: HoldCode("FailedToCheckpoint", "Job failed when sent the checkpoint signal it requested"),
    37: HoldCode(
        "EC2UserError",
        _EC2_USER,
        named=_each(
            _EC2_USER,
            {
                1: "Public key file not defined",
                2: "Private key file not defined",
                4: "Grid resource string missing EC2 service URL",
                9: "Failed to authenticate",
                10: "Can't use existing SSH keypair with the given server's type",
                20: "You, or somebody like you, cancelled this request",
            },
        ),
    ),
    38: HoldCode(
        "EC2InternalError",
        _EC2_INTERNAL,
        named=_each(
            _EC2_INTERNAL,
            {
                3: "Grid resource type not EC2",
                5: "Grid resource type not set",
                7: "Grid job ID is not for EC2",
                21: "Unexpected remote job status",
            },
        ),
    ),
    39: HoldCode("EC2AdminError", _EC2_ADMIN, named=_each(_EC2_ADMIN, {6: "EC2_GAHP not defined"})),
    40: HoldCode(
        "EC2ConnectionProblem",
        _EC2_CONNECTION,
        named=_each(
            _EC2_CONNECTION,
            {
                11: "while creating an SSH keypair",
                12: "while starting an on-demand instance",
                17: "while requesting a spot instance",
            },
        ),
    ),
    41: HoldCode(
        "EC2ServerError",
        _EC2_SERVER,
        named=_each(
            _EC2_SERVER,
            {
                13: "Abnormal instance termination reason",
                14: "Unrecognized instance termination reason",
                22: "Resource was down for too long",
            },
        ),
    ),
    42: HoldCode(
        "EC2InstancePotentiallyLost",
        _EC2_LOST,
        named=_each(
            _EC2_LOST,
            {
                15: "Connection error while terminating an instance",
                16: "Failed to terminate instance too many times",
                17: "Connection error while terminating a spot request",
                18: "Failed to terminated a spot request too many times",
                19: "Spot instance request purged before instance ID acquired",
            },
        ),
    ),
    43: HoldCode("PreScriptFailed", "Pre script failed"),
    44: HoldCode("PostScriptFailed", "Post script failed"),
    45: HoldCode(
        "SingularityTestFailed", "Test of singularity runtime failed before launching a job"
    ),
    46: HoldCode("JobDurationExceeded", "The job's allowed duration was exceeded"),
    47: HoldCode("JobExecuteExceeded", "The job's allowed execution time was exceeded"),
    48: HoldCode(
        "HookShadowPrepareJobFailure",
        "Prepare job shadow hook failed when it was executed; status code indicated job should "
        "be held",
    ),
}

_PLUGIN_TIMED_OUT = 62  # ETIME, from a file-transfer plug-in that timed out


def _errno(n: int) -> str:
    return errno.errorcode.get(n, "errno")


def _subcode_text(kind: Subcode, n: int) -> str:
    if kind is Subcode.ERRNO:
        return f"subcode {n} ({_errno(n)})"
    if kind is Subcode.TRANSFER:
        if n == _PLUGIN_TIMED_OUT:
            return f"subcode {n} ({_errno(n)}: plug-in timed out)"
        if n >= 256 and n % 256 == 0:
            return f"subcode {n} (plug-in exit code {n >> 8})"
        return f"subcode {n} ({_errno(n)})"
    if kind is Subcode.USER:
        return f"subcode {n} (user provided)"
    return f"subcode {n}"


def hold_message(code: int, subcode: int = 0) -> str:
    """What a hold code and subcode mean: the code's message, or its subcode's own message, or the
    code's message then ``: subcode <n> (<what it means>)``. Subcode 0 is none."""
    row = HOLD_CODES.get(code)
    if row is None:
        return f"Hold reason code {code}" + (f": subcode {subcode}" if subcode else "")
    if subcode in row.named:
        return row.named[subcode]
    if not subcode:
        return row.message
    return f"{row.message}: {_subcode_text(row.subcode, subcode)}"


def hold_reason_text(code: int, subcode: int = 0, reason: str = "") -> str:
    """A held job's hold reason: ``hold_message``, then ``: `` and the JOB_HELD event's own text
    when it has one, cut to MAX_HOLD_REASON_CHARS."""
    text = hold_message(code, subcode)
    reason = reason.strip()
    if reason:
        text = f"{text}: {reason}"
    if len(text) > MAX_HOLD_REASON_CHARS:
        text = text[: MAX_HOLD_REASON_CHARS - 1] + "…"
    return text
