"""``ewms workflow|task|taskforce|queue ...``: the WorkflowService from the command line."""

from __future__ import annotations

import argparse
import json
import signal
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf import timestamp_pb2

from ewms.v1 import queue_pb2, taskforce_pb2, workflow_pb2, workflow_service_pb2
from services.cli import workflow_json
from services.cli.connection import Connection
from services.cli.options import positive_int
from services.cli.render import (
    enum_label,
    print_fields,
    print_json,
    print_table,
    when,
)

WS = workflow_service_pb2
WORKFLOW_STATES = {
    enum_label(name, "WORKFLOW_STATE_"): number
    for name, number in WS.WorkflowState.items()
    if number
}
PHASES = {
    enum_label(name, "TASKFORCE_PHASE_"): number
    for name, number in taskforce_pb2.TaskforcePhase.items()
    if number
}


def job_exit_label(status: taskforce_pb2.CompoundStatus) -> str:
    """How the workers of a compound status ended: ``SIGKILL``, ``exit 0``; ``-`` if unknown."""
    if not status.HasField("job_exit"):
        return "-"
    number = status.job_exit.signal
    if not number:
        return f"exit {status.job_exit.exit_code}"
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


class CommandError(Exception):
    """A failure with its own exit code and, optionally, detail lines shown under the message."""

    def __init__(self, message: str, exit_code: int, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.details = list(details)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the workflow, task, taskforce and queue command groups."""
    wf = sub.add_parser("workflow", help="submit, inspect and stop workflows").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = wf.add_parser("submit", parents=[common], help="submit a workflow request (JSON file)")
    p.add_argument("file", help="the request JSON, as for the original EWMS ('-' for stdin)")
    p.set_defaults(run=submit)
    p = wf.add_parser("get", parents=[common], help="show a workflow")
    p.add_argument("workflow_id")
    p.set_defaults(run=get_workflow)
    p = wf.add_parser("list", parents=[common], help="list workflows, oldest first")
    p.add_argument("--state", choices=sorted(WORKFLOW_STATES))
    p.add_argument("--owner", help="only this owner's workflows (admins)")
    p.add_argument("--created-after", type=_timestamp, metavar="ISO8601")
    p.add_argument("--created-before", type=_timestamp, metavar="ISO8601")
    _add_limit(p)
    p.set_defaults(run=list_workflows)
    for action, verb in (("abort", "abort"), ("finish", "finish")):
        p = wf.add_parser(
            action, parents=[common], help=f"{verb} a workflow and stop its taskforces"
        )
        p.add_argument("workflow_id")
        p.set_defaults(run=deactivate_workflow, kind=action)

    task = sub.add_parser("task", help="inspect tasks and add workers").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = task.add_parser("get", parents=[common], help="show a task directive")
    p.add_argument("task_id")
    p.set_defaults(run=get_task)
    p = task.add_parser("list", parents=[common], help="list task directives")
    p.add_argument("--workflow", default="")
    _add_limit(p)
    p.set_defaults(run=list_tasks)
    p = task.add_parser("add-workers", parents=[common], help="add a taskforce of more workers")
    p.add_argument("task_id")
    p.add_argument("--location", required=True, help="cluster location name or alias")
    p.add_argument("--n-workers", type=int, required=True)
    p.set_defaults(run=add_workers)

    tf = sub.add_parser("taskforce", help="inspect taskforces").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = tf.add_parser("get", parents=[common], help="show a taskforce")
    p.add_argument("taskforce_uuid")
    p.set_defaults(run=get_taskforce)
    p = tf.add_parser("list", parents=[common], help="list taskforces, oldest first")
    p.add_argument("--workflow", default="")
    p.add_argument("--task", default="")
    p.add_argument("--location", default="")
    p.add_argument("--phase", choices=sorted(PHASES))
    _add_limit(p)
    p.set_defaults(run=list_taskforces)

    q = sub.add_parser("queue", help="inspect a workflow's queues").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = q.add_parser("list", parents=[common], help="list a workflow's queues")
    p.add_argument("workflow_id")
    p.set_defaults(run=list_queues)


def _add_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit", type=positive_int, default=100, help="at most this many (default 100)"
    )
    p.add_argument("--all", action="store_true", help="every match, page after page")


def _timestamp(text: str) -> timestamp_pb2.Timestamp:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def _pages(fetch: Callable[[str, int], tuple[list[Any], str]], args: Any) -> Iterator[Any]:
    """Items across pages, up to --limit unless --all."""
    limit = None if args.all else args.limit
    token, count = "", 0
    while True:
        size = 1000 if limit is None else min(1000, max(limit - count, 1))
        items, token = fetch(token, size)
        for item in items:
            if limit is not None and count >= limit:
                return
            count += 1
            yield item
        if not token:
            return


def read_request(path: str) -> WS.CreateWorkflowRequest:
    """Parse a workflow request file (the original EWMS's JSON); UsageError saying what is wrong."""
    try:
        text = Path("/dev/stdin").read_text() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{path} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    try:
        return workflow_json.parse(data, WS.CreateWorkflowRequest())
    except workflow_json.JsonProblems as exc:
        n = len(exc.problems)
        # main() prints "error: " before the first line; the indented lines list the problems.
        lines = [f"{path}: {n} problem{'' if n == 1 else 's'} in the workflow request"]
        lines += [f"  {problem}" for problem in exc.problems]
        raise UsageError("\n".join(lines)) from None


def submit(conn: Connection, args: Any) -> None:
    """ewms workflow submit FILE."""
    resp = conn.call(conn.workflows.CreateWorkflow, read_request(args.file))
    if args.json:
        print_json(resp)
        return
    print(f"created {resp.workflow.workflow_id}")
    _taskforce_table(resp.taskforces)
    print()
    _queue_table(resp.queues)


def get_workflow(conn: Connection, args: Any) -> None:
    """ewms workflow get ID."""
    wf = conn.call(conn.workflows.GetWorkflow, WS.GetWorkflowRequest(workflow_id=args.workflow_id))
    if args.json:
        print_json(wf)
        return
    print_fields(
        [
            ("workflow_id", wf.workflow_id),
            ("owner", wf.owner),
            ("priority", wf.priority),
            ("state", _state(wf)),
            ("created", when(wf.timestamp)),
            ("deactivated", when(wf.deactivated_ts)),
            ("public queues", ", ".join(wf.public_queue_aliases) or "-"),
        ]
    )


def list_workflows(conn: Connection, args: Any) -> None:
    """ewms workflow list."""
    base = WS.ListWorkflowsRequest(
        state=WORKFLOW_STATES.get(args.state or "", WS.WORKFLOW_STATE_UNSPECIFIED),
        owner=args.owner or "",
    )
    if args.created_after:
        base.created_after.CopyFrom(args.created_after)
    if args.created_before:
        base.created_before.CopyFrom(args.created_before)

    def fetch(token: str, size: int) -> tuple[list[Any], str]:
        req = WS.ListWorkflowsRequest()
        req.CopyFrom(base)
        req.page_token, req.page_size = token, size
        resp = conn.call(conn.workflows.ListWorkflows, req)
        return list(resp.workflows), resp.next_page_token

    workflows = list(_pages(fetch, args))
    if args.json:
        print_json(workflows)
        return
    print_table(
        ["WORKFLOW", "OWNER", "PRIORITY", "STATE", "CREATED"],
        [(w.workflow_id, w.owner, w.priority, _state(w), when(w.timestamp)) for w in workflows],
    )


def deactivate_workflow(conn: Connection, args: Any) -> None:
    """ewms workflow abort|finish ID."""
    if args.kind == "abort":
        resp = conn.call(
            conn.workflows.AbortWorkflow, WS.AbortWorkflowRequest(workflow_id=args.workflow_id)
        )
    else:
        resp = conn.call(
            conn.workflows.FinishWorkflow, WS.FinishWorkflowRequest(workflow_id=args.workflow_id)
        )
    if args.json:
        print_json(resp)
        return
    print(f"{resp.workflow_id} {_state(resp.workflow)}: {resp.n_taskforces} taskforce(s) stopped")


def get_task(conn: Connection, args: Any) -> None:
    """ewms task get ID."""
    td = conn.call(
        conn.workflows.GetTaskDirective, WS.GetTaskDirectiveRequest(task_id=args.task_id)
    )
    if args.json:
        print_json(td)
        return
    print_fields(
        [
            ("task_id", td.task_id),
            ("workflow_id", td.workflow_id),
            ("cluster_locations", ", ".join(td.cluster_locations)),
            ("task_image", td.task_image or "- (command on the worker)"),
            ("task_args", td.task_args),
            ("init_image", td.init_image or "-"),
            ("input_queues", ", ".join(td.input_queues) or "-"),
            ("output_queues", ", ".join(td.output_queues) or "-"),
            ("created", when(td.timestamp)),
        ]
    )


def list_tasks(conn: Connection, args: Any) -> None:
    """ewms task list."""

    def fetch(token: str, size: int) -> tuple[list[Any], str]:
        resp = conn.call(
            conn.workflows.ListTaskDirectives,
            WS.ListTaskDirectivesRequest(
                workflow_id=args.workflow, page_size=size, page_token=token
            ),
        )
        return list(resp.task_directives), resp.next_page_token

    tasks = list(_pages(fetch, args))
    if args.json:
        print_json(tasks)
        return
    print_table(
        ["TASK", "WORKFLOW", "IMAGE", "ARGS"],
        [(t.task_id, t.workflow_id, t.task_image or "-", t.task_args) for t in tasks],
    )


def add_workers(conn: Connection, args: Any) -> None:
    """ewms task add-workers ID --location L --n-workers N."""
    tf = conn.call(
        conn.workflows.AddWorkers,
        WS.AddWorkersRequest(
            task_id=args.task_id, cluster_location=args.location, n_workers=args.n_workers
        ),
    )
    if args.json:
        print_json(tf)
        return
    _taskforce_table([tf])


def get_taskforce(conn: Connection, args: Any) -> None:
    """ewms taskforce get UUID."""
    tf = conn.call(
        conn.workflows.GetTaskforce, WS.GetTaskforceRequest(taskforce_uuid=args.taskforce_uuid)
    )
    if args.json:
        print_json(tf)
        return
    print_fields(
        [
            ("taskforce_uuid", tf.taskforce_uuid),
            ("task_id", tf.task_id),
            ("workflow_id", tf.workflow_id),
            ("cluster_location", tf.cluster_location),
            ("phase", _phase(tf.phase)),
            ("priority", tf.priority),
            ("n_workers", tf.n_workers),
            ("cluster_id", tf.cluster_id or "-"),
            ("created", when(tf.timestamp)),
        ]
    )
    c = tf.counters
    print("\nworkers:")
    print_table(
        ["JOB_STATE", "JOB_EXIT", "HOLD_REASON", "PILOT_PHASE", "COUNT"],
        [
            (
                enum_label(taskforce_pb2.JobState.Name(s.job_state), "JOB_STATE_"),
                job_exit_label(s),
                s.hold_reason or "-",
                enum_label(taskforce_pb2.PilotPhase.Name(s.pilot_phase), "PILOT_PHASE_"),
                s.count,
            )
            for s in tf.compound_statuses
        ],
    )
    print("\ncounters:")
    print_fields([(name, getattr(c, name)) for name in c.DESCRIPTOR.fields_by_name])
    print("\ntop task errors (workers whose last error it is):")
    print_table(
        ["WORKERS", "ERROR"],
        sorted(((n, error) for error, n in tf.top_task_errors.items()), reverse=True),
    )
    print("\nphase changes:")
    print_table(
        ["WHEN", "TARGET", "OK", "BY", "CONTEXT"],
        [
            (
                when(c.timestamp),
                _phase(c.target_phase),
                c.was_successful,
                c.source_entity,
                c.context,
            )
            for c in tf.phase_change_log
        ],
    )


def list_taskforces(conn: Connection, args: Any) -> None:
    """ewms taskforce list."""

    def fetch(token: str, size: int) -> tuple[list[Any], str]:
        resp = conn.call(
            conn.workflows.ListTaskforces,
            WS.ListTaskforcesRequest(
                workflow_id=args.workflow,
                task_id=args.task,
                cluster_location=args.location,
                phase=PHASES.get(args.phase or "", taskforce_pb2.TASKFORCE_PHASE_UNSPECIFIED),
                page_size=size,
                page_token=token,
            ),
        )
        return list(resp.taskforces), resp.next_page_token

    taskforces = list(_pages(fetch, args))
    if args.json:
        print_json(taskforces)
        return
    _taskforce_table(taskforces)


def list_queues(conn: Connection, args: Any) -> None:
    """ewms queue list WORKFLOW_ID."""
    resp = conn.call(conn.workflows.ListQueues, WS.ListQueuesRequest(workflow_id=args.workflow_id))
    if args.json:
        print_json(list(resp.queues))
        return
    _queue_table(resp.queues)


def _taskforce_table(taskforces: Any) -> None:
    print_table(
        ["TASKFORCE", "TASK", "LOCATION", "PHASE", "WORKERS", "PRIORITY"],
        [
            (
                t.taskforce_uuid,
                t.task_id,
                t.cluster_location,
                _phase(t.phase),
                t.n_workers,
                t.priority,
            )
            for t in taskforces
        ],
    )


def _queue_table(queues: Any) -> None:
    print_table(
        ["QUEUE", "ALIAS", "PUBLIC", "BACKEND", "MAX_ATTEMPTS"],
        [
            (q.queue_id, q.alias, "yes" if q.public else "no", _backend(q.backend), q.max_attempts)
            for q in queues
        ],
    )


def _state(wf: workflow_pb2.Workflow) -> str:
    if not wf.deactivated:
        return "active"
    return enum_label(workflow_pb2.Deactivation.Name(wf.deactivated), "DEACTIVATION_")


def _phase(phase: taskforce_pb2.TaskforcePhase.ValueType) -> str:
    return enum_label(taskforce_pb2.TaskforcePhase.Name(phase), "TASKFORCE_PHASE_")


def _backend(backend: queue_pb2.QueueBackend.ValueType) -> str:
    return enum_label(queue_pb2.QueueBackend.Name(backend), "QUEUE_BACKEND_")
