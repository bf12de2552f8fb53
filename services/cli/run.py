"""``ewms run`` (the main job), ``ewms up``, ``ewms watch`` and ``ewms tms serve``.

``ewms run WORKFLOW.json --in events.jsonl --out results.jsonl`` submits the workflow, publishes
the events to its public input queue, writes every output event as it arrives (acking it only
after the line is written), and finishes the workflow once every input is settled. Without
``--wms`` it runs an embedded WMS and a local TMS in this process. Completion is event-driven:
each output and each WatchWorkflow change triggers a check of the queues' counters in pipeline
order (a stage acks its input only after publishing its outputs, so when a queue is settled its
outputs are already counted downstream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf import json_format

from ewms.v1 import event_service_pb2 as ES
from ewms.v1 import queue_pb2, taskforce_pb2, workflow_service_pb2_grpc
from ewms.v1 import workflow_service_pb2 as WS
from services.cli.connection import resolve_token
from services.cli.events import event_json, read_lines
from services.cli.workflows import UsageError, read_request
from services.config import ClientSettings, WmsSettings
from services.events.amqp import AmqpQueueClient
from services.events.client import QueueClient
from services.events.grpc_client import GrpcQueueClient, channel_options
from services.logs import configure_logging
from services.pilot.config import amqp_url
from services.tms.pilot_env import broker_address as _broker_address

Phase = taskforce_pb2.TaskforcePhase
TERMINAL = (Phase.TASKFORCE_PHASE_CONDOR_COMPLETE, Phase.TASKFORCE_PHASE_CANCELLED)
OUTPUT_PREFETCH = 256
FINISH_TIMEOUT = 120.0
MAX_LISTED_DEAD_LETTERS = 20
CHECK_INTERVAL = 0.05
EXIT_WMS_UNREACHABLE = 6  # as every client command (services/cli/__init__.py)
RECHECK_FIRST = 0.25
RECHECK_MAX = 2.0
# RabbitMQ drops the counts a channel made since the management plugin last collected them
# (every 5 s) when the channel closes, so `acked` can stay short of what was acked. Queues seen
# with nothing ready and nothing in flight at every check for this long (two full refreshes of
# the in-flight counter) are settled whatever `acked` says.
QUIET_SETTLED = 12.0


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``run``, ``up``, ``watch`` and ``tms serve``."""
    p = sub.add_parser(
        "run",
        parents=[common],
        help="run a workflow over a file of events and write its outputs (the main job)",
    )
    p.add_argument("workflow", help="workflow request JSON (the original EWMS's format)")
    p.add_argument("--in", dest="infile", required=True, help="input events, one per line")
    p.add_argument(
        "--out", dest="outfile", required=True, help="where output events go ('-': stdout)"
    )
    p.add_argument("--text", action="store_true", help="events are text lines, not JSON values")
    p.add_argument("--in-queue", help="alias of the queue the events go to (if several are public)")
    p.add_argument("--workers", type=int, help="local TMS: workers at once (default: CPUs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    p.set_defaults(run=run_command, needs_wms=False)

    p = sub.add_parser(
        "up", parents=[common], help="run an embedded WMS and a local TMS until Ctrl-C"
    )
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0: any)")
    p.add_argument("--workers", type=int, help="local TMS: workers at once (default: CPUs)")
    p.set_defaults(run=up_command, needs_wms=False)

    p = sub.add_parser("watch", parents=[common], help="show a workflow's live status")
    p.add_argument("workflow_id")
    p.set_defaults(run=watch_command, needs_wms=False)

    tms = sub.add_parser("tms", help="run a TMS").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = tms.add_parser("serve", parents=[common], help="serve one cluster location until stopped")
    p.add_argument("--location", required=True, help="the cluster location this TMS serves")
    p.add_argument("--scheduler", choices=("local", "htcondor"), default="local")
    p.add_argument("--state-dir", type=Path, help="local: job log and worker directories")
    p.add_argument("--slots", type=int, help="local: workers at once (default: CPUs)")
    p.add_argument(
        "--job-event-log-dir", type=Path, help="htcondor: JOB_EVENT_LOG_DIR (envfiles, logs)"
    )
    p.set_defaults(run=tms_command, needs_wms=False)


# --- ewms tms serve ---


def tms_command(args: Any) -> int:
    from services.tms.client import TmsClient, TmsError
    from services.tms.pilot_env import PilotEnvError, parse_defaults
    from services.tms.scheduler import Scheduler

    settings = ClientSettings.from_env()
    address = args.wms or settings.wms_address
    data_dir = args.data_dir or settings.data_dir
    token = resolve_token(args.token, settings, address, data_dir)
    configure_logging(os.environ.get("EWMS_LOG_LEVEL", "INFO"))
    try:
        defaults = parse_defaults(os.environ.get("EWMS_TMS_PILOT_ENV", ""))
    except PilotEnvError as exc:
        raise UsageError(str(exc)) from None
    scheduler: Scheduler
    files: Any = None
    if args.scheduler == "local":
        from services.tms.local import LocalScheduler

        state_dir = args.state_dir or data_dir / f"tms-{args.location}"
        scheduler = LocalScheduler(state_dir, slots=args.slots or os.cpu_count() or 1)
    else:
        from services.tms.htcondor import HTCondorScheduler

        jel_dir = args.job_event_log_dir or Path(os.environ.get("JOB_EVENT_LOG_DIR", ""))
        if not str(jel_dir) or str(jel_dir) == ".":
            raise UsageError("--job-event-log-dir (or JOB_EVENT_LOG_DIR) is required for htcondor")
        from services.tms.files import FileManager

        condor = HTCondorScheduler(jel_dir)
        scheduler = condor
        # As the original: old job event logs and taskforce directories are archived, then
        # deleted (a pass once connected, then hourly).
        files = FileManager(jel_dir, condor.job_event_log_in_use)
    client = TmsClient(address, token, args.location, scheduler, pilot_env_defaults=defaults)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, client.stop)

        async def archive() -> None:
            # After the welcome: only then does the scheduler know which logs are in use.
            await client.connected.wait()
            await files.run()

        housekeeping = asyncio.create_task(archive()) if files is not None else None
        try:
            await client.run()
        finally:
            if housekeeping is not None:
                housekeeping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await housekeeping
            await scheduler.close()

    try:
        asyncio.run(serve())
    except TmsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# --- ewms up ---


def up_command(args: Any) -> int:
    from services.local_stack import start_local_stack

    settings = WmsSettings.from_env()
    data_dir = args.data_dir or settings.data_dir
    configure_logging(settings.log_level)

    async def up() -> None:
        stack = await start_local_stack(
            data_dir, settings=settings, slots=args.workers, port=args.port
        )
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        print(
            f"ewms up: WMS at {stack.address}, data in {data_dir}, local TMS with "
            f"{args.workers or os.cpu_count()} worker slot(s); Ctrl-C stops",
            file=sys.stderr,
        )
        await stopping.wait()
        await stack.stop()

    asyncio.run(up())
    return 0


# --- ewms watch ---


def watch_command(args: Any) -> int:
    settings = ClientSettings.from_env()
    address = args.wms or settings.wms_address
    token = resolve_token(args.token, settings, address, args.data_dir or settings.data_dir)

    async def watch() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            view = WorkflowView()
            async for msg in stub.WatchWorkflow(
                WS.WatchWorkflowRequest(workflow_id=args.workflow_id), metadata=metadata
            ):
                if args.json:
                    print(
                        json.dumps(
                            json_format.MessageToDict(msg, preserving_proto_field_name=True)
                        ),
                        flush=True,
                    )
                    continue
                view.apply(msg)
                print(view.describe(time.strftime("%H:%M:%S")), flush=True)

    try:
        asyncio.run(watch())
    except KeyboardInterrupt:
        return 130
    return 0


@dataclass
class WorkflowView:
    """A workflow as a watch stream made it so far."""

    workflow: Any = None
    taskforces: dict[str, taskforce_pb2.Taskforce] = field(default_factory=dict)
    stats: dict[str, queue_pb2.QueueStats] = field(default_factory=dict)

    def apply(self, msg: WS.WatchWorkflowResponse) -> None:
        if msg.HasField("workflow"):
            self.workflow = msg.workflow
        for tf in msg.taskforces:
            self.taskforces[tf.taskforce_uuid] = tf
        for s in msg.queue_stats:
            self.stats[s.queue_id] = s

    def workers(self, state: int) -> int:
        return sum(
            c.count
            for tf in self.taskforces.values()
            for c in tf.compound_statuses
            if c.job_state == state
        )

    def tasks_failed(self) -> int:
        return sum(tf.counters.tasks_failed for tf in self.taskforces.values())

    def all_terminal(self) -> bool:
        return bool(self.taskforces) and all(
            tf.phase in TERMINAL for tf in self.taskforces.values()
        )

    def describe(self, stamp: str) -> str:
        lines = []
        wf = self.workflow
        state = "active"
        if wf is not None and wf.deactivated:
            state = "finished" if wf.deactivated == 2 else "aborted"
        lines.append(f"[{stamp}] {wf.workflow_id if wf is not None else '?'} ({state})")
        for tf in self.taskforces.values():
            phase = Phase.Name(tf.phase).removeprefix("TASKFORCE_PHASE_").lower().replace("_", "-")
            compound = ", ".join(
                f"{taskforce_pb2.JobState.Name(c.job_state).removeprefix('JOB_STATE_')}"
                f"{': ' + c.hold_reason if c.hold_reason else ''}"
                f"/{taskforce_pb2.PilotPhase.Name(c.pilot_phase).removeprefix('PILOT_PHASE_')}"
                f"={c.count}"
                for c in tf.compound_statuses
            )
            c = tf.counters
            lines.append(
                f"  {tf.taskforce_uuid} {phase:<16} ok {c.tasks_succeeded} failed "
                f"{c.tasks_failed} | {compound or 'no workers yet'}"
            )
            for error, n in tf.top_task_errors.items():
                lines.append(f"    error x{n}: {error.splitlines()[0][:100] if error else ''}")
        for s in self.stats.values():
            lines.append(
                f"  queue {s.queue_id}: ready {s.ready} in flight {s.in_flight} acked {s.acked} "
                f"dead {s.dead_lettered}"
            )
        return "\n".join(lines)


# --- ewms run ---


def run_command(args: Any) -> int:
    request = read_request(args.workflow)
    lines = read_lines(args.infile, text=args.text)
    settings = ClientSettings.from_env()
    if not args.wms:
        configure_logging(os.environ.get("EWMS_LOG_LEVEL", "WARNING"))
    try:
        return asyncio.run(_until_signalled(_run(args, request, lines, settings)))
    except KeyboardInterrupt:
        return 130


async def _until_signalled(work: Coroutine[Any, Any, int]) -> int:
    """Run ``work``; the first SIGINT or SIGTERM cancels it (``ewms run`` then aborts its
    workflow and stops its workers) and gives 128 + the signal's number. Later signals are
    ignored, so that the clean-up runs to its end."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    received: list[int] = []

    def on_signal(sig: int) -> None:
        if not received:
            received.append(sig)
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await task
    except asyncio.CancelledError:
        if received:
            return 128 + received[0]
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(
    args: Any, request: WS.CreateWorkflowRequest, lines: list[Any], settings: ClientSettings
) -> int:
    stack = None
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.wms:
        address = args.wms
        token = resolve_token(args.token, settings, address, args.data_dir or settings.data_dir)
    else:
        from services.local_stack import start_local_stack

        if args.data_dir:
            data_dir = args.data_dir
        else:
            tmp = tempfile.TemporaryDirectory(prefix="ewms-run-")
            data_dir = Path(tmp.name)
        stack = await start_local_stack(data_dir, slots=args.workers)
        address, token = stack.address, stack.token
    run = WorkflowRun(address, token, args, lines)
    try:
        return await run.execute(request)
    finally:
        if stack is not None:
            if tmp is not None and run.workflow_id:
                # The data directory goes away with the run: so do its broker queues and user
                # (with RabbitMQ they would outlive it).
                with contextlib.suppress(Exception):
                    await stack.wms.queues.delete_now(run.workflow_id)
            await stack.stop()
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.cleanup()


class WorkflowRun:
    """One ``ewms run``: submit, publish, collect, finish."""

    def __init__(self, address: str, token: str, args: Any, lines: list[Any]) -> None:
        self.address = address
        self.token = token
        self.args = args
        self.lines = lines
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.view = WorkflowView()
        self.outputs_written = 0
        self.seen: set[str] = set()
        self.settled_inputs = 0
        self.quiet_since: float | None = None
        self.done = asyncio.Event()
        self.check_wanted = asyncio.Event()
        self.failure = ""
        self.progress = bool(sys.stderr.isatty() and not args.no_progress)
        self.last_draw = 0.0
        self.workflow_id = ""
        self.lost = False

    async def execute(self, request: WS.CreateWorkflowRequest) -> int:
        channel = grpc.aio.insecure_channel(self.address, options=channel_options())
        try:
            self.workflows = workflow_service_pb2_grpc.WorkflowServiceStub(channel)
            self.queues = GrpcQueueClient(channel, self.token)
            created = await self.workflows.CreateWorkflow(request, metadata=self.metadata)
            self.workflow_id = created.workflow.workflow_id
            self._plan(created)
            self.events: QueueClient = self.queues
            if (
                self.input.backend == queue_pb2.QUEUE_BACKEND_RABBITMQ
                and self.input.credentials.password
            ):
                # Events and outputs straight to and from RabbitMQ with the workflow's
                # credentials, as pilots do, rather than through the WMS.
                self.events = await AmqpQueueClient.connect(
                    amqp_url(_broker_address(self.input), self.input.credentials.password),
                    max_attempts={q.queue_id: q.max_attempts for q in created.queues},
                    connection_name=f"ewms run {self.workflow_id}",
                    io_thread=False,
                )
            out = sys.stdout if self.args.outfile == "-" else open(self.args.outfile, "w")  # noqa: SIM115, ASYNC230
            try:
                return await self._drive(out)
            finally:
                if out is not sys.stdout:
                    out.close()
                if self.events is not self.queues:
                    await self.events.close()
        finally:
            await channel.close()

    def _plan(self, created: WS.CreateWorkflowResponse) -> None:
        """Which queue takes the events, which give outputs, and the pipeline order."""
        consumed = {q for td in created.task_directives for q in td.input_queues}
        produced = {q for td in created.task_directives for q in td.output_queues}
        by_alias = {q.alias: q for q in created.queues}
        public = [q for q in created.queues if q.public]
        if self.args.in_queue:
            if self.args.in_queue not in by_alias:
                raise UsageError(
                    f"--in-queue {self.args.in_queue!r}: the workflow has no such queue"
                )
            entry = by_alias[self.args.in_queue]
        else:
            entries = [q for q in public if q.queue_id in consumed and q.queue_id not in produced]
            if len(entries) != 1:
                names = ", ".join(q.alias for q in entries) or "none"
                raise UsageError(
                    f"the workflow needs exactly one public input queue for --in (found: {names}); "
                    "name it with --in-queue"
                )
            entry = entries[0]
        self.input = entry
        self.outputs = [q for q in public if q.queue_id in produced and q.queue_id not in consumed]
        # Pipeline order: the input, then each task's outputs after its inputs.
        order = [entry.queue_id]
        frontier = [entry.queue_id]
        while frontier:
            nxt = []
            for td in created.task_directives:
                if any(q in frontier for q in td.input_queues):
                    for q in td.output_queues:
                        if q not in order:
                            order.append(q)
                            nxt.append(q)
            frontier = nxt
        output_ids = {q.queue_id for q in self.outputs}
        self.internal = [q for q in order if q not in output_ids]

    async def _drive(self, out: IO[str]) -> int:
        events = [
            queue_pb2.Event(
                payload=line.payload,
                content_type="text/plain; charset=utf-8" if self.args.text else "application/json",
            )
            for line in self.lines
        ]
        tasks = [asyncio.create_task(self._collect(q.queue_id, out)) for q in self.outputs]
        tasks.append(asyncio.create_task(self._watch()))
        tasks.append(asyncio.create_task(self._checker()))
        for task in tasks:
            task.add_done_callback(self._ended)
        interrupted = False
        try:
            await self.events.publish(self.input.queue_id, events)
            self.check_wanted.set()
            self._draw()
            await self.done.wait()
        except asyncio.CancelledError:
            interrupted = True
            raise
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            if self.progress:
                self._draw(force=True)
                print(file=sys.stderr)
            with contextlib.suppress(grpc.aio.AioRpcError):
                if interrupted or self.failure:
                    await self.workflows.AbortWorkflow(
                        WS.AbortWorkflowRequest(workflow_id=self.workflow_id),
                        metadata=self.metadata,
                    )
                else:
                    await self.workflows.FinishWorkflow(
                        WS.FinishWorkflowRequest(workflow_id=self.workflow_id),
                        metadata=self.metadata,
                    )
            if interrupted:
                print(
                    f"{self.workflow_id}: interrupted after {self.outputs_written} output(s); "
                    "the workflow was aborted",
                    file=sys.stderr,
                )
            elif not self.lost:
                await self._wait_stopped()
        if self.lost:
            print(
                f"{self.workflow_id}: {len(events)} event(s) in, {self.outputs_written} output(s) "
                f"written\nerror: {self.failure}",
                file=sys.stderr,
            )
            return EXIT_WMS_UNREACHABLE
        dead = await self._dead_letters()
        summary = (
            f"{self.workflow_id}: {len(events)} event(s) in, {self.outputs_written} output(s) "
            f"written, {sum(len(d) for d in dead.values())} dead-lettered"
        )
        print(summary, file=sys.stderr)
        if self.failure:
            print(f"error: {self.failure}", file=sys.stderr)
        if dead:
            print("dead-lettered events:", file=sys.stderr)
            for queue_id, letters in dead.items():
                for d in letters[:MAX_LISTED_DEAD_LETTERS]:
                    error = d.last_error.strip().splitlines()[-1] if d.last_error.strip() else ""
                    print(f"  {queue_id} {d.event.event_id}: {error[:200]}", file=sys.stderr)
                if len(letters) > MAX_LISTED_DEAD_LETTERS:
                    print(
                        f"  ... and {len(letters) - MAX_LISTED_DEAD_LETTERS} more in {queue_id}",
                        file=sys.stderr,
                    )
        return 1 if dead or self.failure else 0

    async def _collect(self, queue_id: str, out: IO[str]) -> None:
        sub = await self.events.subscribe(queue_id, OUTPUT_PREFETCH)
        async with sub:
            async for delivery in sub:
                event = delivery.event
                if event.event_id not in self.seen:
                    self.seen.add(event.event_id)
                    out.write(self._line(event))
                    out.flush()
                    self.outputs_written += 1
                await sub.ack(delivery)
                self.check_wanted.set()
                self._draw()

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A collector, the watch or the checker ended: by a failure (e.g. the WMS went away),
        the run ends with that error rather than wait for what can no longer come."""
        if task.cancelled() or self.done.is_set():
            return
        exc = task.exception()
        if exc is None:
            self.check_wanted.set()  # the watch ended: the workflow is done, one way or another
            return
        if isinstance(exc, grpc.aio.AioRpcError):
            text = f"{exc.code().name}: {exc.details()}"
        else:
            text = str(exc) or type(exc).__name__
        self.failure = f"lost the WMS at {self.address} ({text})"
        self.lost = True
        self.done.set()

    def _line(self, event: queue_pb2.Event) -> str:
        """An output event as a line of --out: with --text its text; else its JSON value (a
        task's output file that is JSON counts as JSON whatever its extension), a JSON string of
        other text, or base64 of other bytes."""
        if not self.args.text:
            try:
                value = json.loads(event.payload)
            except ValueError:
                value = event_json(event)["payload"]
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n"
        value = event_json(event)["payload"]
        return str(value).removesuffix("\n") + "\n"

    async def _watch(self) -> None:
        async for msg in self.workflows.WatchWorkflow(
            WS.WatchWorkflowRequest(workflow_id=self.workflow_id), metadata=self.metadata
        ):
            self.view.apply(msg)
            self.check_wanted.set()
            self._draw()

    async def _checker(self) -> None:
        # Checks follow outputs and watch changes. Some counters lag (RabbitMQ's management
        # statistics are refreshed every 5 s), so an unsettled check is also repeated after a
        # growing pause while nothing else happens.
        # Checks are at most CHECK_INTERVAL apart: outputs come by the thousand, and each check
        # costs a call per queue.
        pause = RECHECK_FIRST
        last = 0.0
        while True:
            try:
                await asyncio.wait_for(self.check_wanted.wait(), pause)
                pause = RECHECK_FIRST
            except TimeoutError:
                pause = min(pause * 2, RECHECK_MAX)
            wait = last + CHECK_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.check_wanted.clear()
            last = time.monotonic()
            if await self._settled():
                self.done.set()
                return
            # Workers gone, queues quiet: the counts may only lag, so QUIET_SETTLED decides.
            if self.view.all_terminal() and self.quiet_since is None:
                self.failure = (
                    "every worker has ended but "
                    f"{len(self.lines) - self.settled_inputs} input event(s) are not done"
                )
                self.done.set()
                return

    async def _settled(self) -> bool:
        """Whether every queue, in pipeline order, has nothing ready or in flight and every
        event it got is acked or dead-lettered (or, since `acked` may fall short on RabbitMQ,
        nothing was ready or in flight at any check for QUIET_SETTLED); the outputs all
        written."""
        counted = True
        for i, queue_id in enumerate([*self.internal, *(q.queue_id for q in self.outputs)]):
            s = await self.queues.stats(queue_id)
            if s.ready or s.in_flight:
                self.quiet_since = None
                return False
            settled = s.acked + s.dead_lettered
            if i == 0:
                self.settled_inputs = int(settled)
                counted = settled >= len(self.lines)
            counted = counted and settled >= s.published
        if counted:
            return True
        now = time.monotonic()
        if self.quiet_since is None:
            self.quiet_since = now
        if now - self.quiet_since < QUIET_SETTLED:
            return False
        print(
            f"\nnote: nothing ready or in flight for {QUIET_SETTLED:g} s, but the queues count "
            f"{self.settled_inputs} of {len(self.lines)} input event(s) settled (RabbitMQ loses "
            "the counts of a channel closed within seconds of its acks); taken as done",
            file=sys.stderr,
        )
        return True

    async def _wait_stopped(self) -> None:
        """After finishing: until every taskforce is terminal (its workers gone)."""

        async def until_terminal() -> None:
            view = WorkflowView()
            async for msg in self.workflows.WatchWorkflow(
                WS.WatchWorkflowRequest(workflow_id=self.workflow_id), metadata=self.metadata
            ):
                view.apply(msg)
                if view.all_terminal():
                    return

        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
            await asyncio.wait_for(until_terminal(), FINISH_TIMEOUT)

    async def _dead_letters(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for queue_id in self.internal:
            letters: list[Any] = []
            token = ""
            while True:
                page = await self.queues.stub.ListDeadLetters(
                    ES.ListDeadLettersRequest(queue_id=queue_id, page_size=1000, page_token=token),
                    metadata=self.metadata,
                )
                letters.extend(page.dead_letters)
                token = page.next_page_token
                if not token:
                    break
            if letters:
                out[queue_id] = letters
        return out

    def _draw(self, *, force: bool = False) -> None:
        if not self.progress:
            return
        now = time.monotonic()
        if now - self.last_draw < 0.1 and not force:
            return
        self.last_draw = now
        total = len(self.lines)
        done = max(self.settled_inputs, min(self.outputs_written, total))
        width = 30
        filled = int(width * done / total) if total else width
        bar = "#" * filled + "." * (width - filled)
        running = self.view.workers(taskforce_pb2.JOB_STATE_RUNNING)
        failed = self.view.tasks_failed()
        sys.stderr.write(
            f"\r[{bar}] {done}/{total} events · {self.outputs_written} outputs · "
            f"{running} worker(s) running · {failed} failure(s) "
        )
        sys.stderr.flush()
