"""``ewms run`` (the main job): run a workflow over a file of events on this machine.

``ewms run WORKFLOW.json --in events.jsonl --out results.jsonl`` checks its input (the request,
every event line, --out) before anything starts, submits the workflow, publishes the events to its
public input queue, writes every output event as it arrives (acking it only after the line is
written), and finishes the workflow once every input is settled. Without ``--wms`` it runs an
embedded WMS and a local TMS in this process. Completion is event-driven: each output and each
WatchWorkflow change triggers a check of the queues' counters in pipeline order (a stage acks its
input only after publishing its outputs, so when a queue is settled its outputs are already
counted downstream): the embedded broker's exact counters, or on RabbitMQ the exact verdict of
services/cli/settlement.py (no management statistics, no quiet period). When it fails it says
why (services/cli/run_report.py) and keeps its directory, pilot logs included.

Its memory does not grow with the number of events. The input is streamed
(services/cli/input_file.py: checked in a first pass, read again while publishing). Publishing is
flow-controlled: one Publish call at a time (the WMS answers once the batch is durably stored),
and at most MAX_UNSETTLED events or MAX_UNSETTLED_BYTES of payload published and not yet settled
(outputs not yet collected count too), so the broker's queues stay bounded too. Nothing is kept
per event: each input event's id names its line (``EV-<run nonce>-<line>``), so a dead letter is
traced to its input line from its id alone, and the ids of the outputs written are kept on disk
(services/cli/seen_outputs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc

from ewms.v1 import event_service_pb2 as ES
from ewms.v1 import queue_pb2, taskforce_pb2, workflow_service_pb2_grpc
from ewms.v1 import workflow_service_pb2 as WS
from services.cli import run_report
from services.cli.connection import resolve_token
from services.cli.events import event_json
from services.cli.input_file import InputChanged, InputFile
from services.cli.options import Parents, positive_int
from services.cli.output_file import OutputError, OutputFile
from services.cli.run_progress import MODES, Progress, Snapshot, resolve_mode
from services.cli.seen_outputs import SeenOutputs
from services.cli.settlement import PassiveCounts, Settlement, stages_of
from services.cli.watch import WorkflowView
from services.cli.workflows import CommandError, UsageError, read_request
from services.config import ClientSettings
from services.errors import CannotServe
from services.events.amqp import AmqpQueueClient
from services.events.client import EventTooLarge, QueueClient, QueueError
from services.events.grpc_client import GrpcQueueClient, channel_options
from services.logs import configure_logging
from services.pilot.config import amqp_url
from services.tms.pilot_env import broker_address as _broker_address

OUTPUT_PREFETCH = 256  # at most; fewer for big events (OUTPUT_BUFFER_BYTES)
OUTPUT_BUFFER_BYTES = 8 * 1024 * 1024
PUBLISH_BATCH = 1000  # events per Publish call
PUBLISH_BATCH_BYTES = 1024 * 1024
MAX_UNSETTLED = 10_000  # events published and not yet settled (the embedded broker's memory)
MAX_UNSETTLED_BYTES = 16 * 1024 * 1024
MONITOR_INTERVAL = 0.1  # input queue stats at most this often while they are wanted
MONITOR_IDLE = 1.0  # and at least this often
FINISH_TIMEOUT = 120.0
CHECK_INTERVAL = 0.05
EXIT_WMS_UNREACHABLE = 6  # as every client command (services/cli/__init__.py)
RECHECK_FIRST = 0.25
RECHECK_MAX = 2.0


def add_commands(sub: Any, parents: Parents) -> None:
    """Register ``run``."""
    p = sub.add_parser(
        "run",
        help="run a workflow over a file of events and write its outputs (the main job)",
        description="Run a workflow over a file of events: an embedded WMS and a local TMS in "
        "this process (unless --wms), one event per line of --in, every output event as a line "
        "of --out. Exit 0 done; 1 dead letters, failed workers or an output write error; 2 bad "
        "input (nothing is started); 6 the WMS or the queue broker unreachable; 130/143 "
        "interrupted.",
    )
    p.add_argument("workflow", help="workflow request JSON (the original EWMS's format)")
    p.add_argument("--in", dest="infile", required=True, help="input events, one per line")
    p.add_argument(
        "--out",
        dest="outfile",
        required=True,
        help="where output events go, one per line ('-': stdout); an existing file is replaced "
        "once the first output arrives (or the run ends with none)",
    )
    p.add_argument("--text", action="store_true", help="events are text lines, not JSON values")
    p.add_argument("--in-queue", help="alias of the queue the events go to (if several are public)")
    p.add_argument(
        "--workers",
        type=positive_int,
        help="the embedded local TMS's workers at once (default: the CPUs); not with --wms",
    )
    p.add_argument(
        "--progress",
        choices=MODES,
        default="auto",
        help="bar: a progress bar with the rate and an ETA; json: one JSON object a second on "
        'stderr (with a "progress" key: "running", then "final"); none; auto (the '
        "default): a bar on a terminal, else none",
    )
    p.add_argument("--no-progress", action="store_true", help="the same as --progress none")
    p.add_argument(
        "--wms",
        metavar="ADDRESS",
        help="use the running WMS at ADDRESS and its TMSs instead of an embedded one "
        "(EWMS_WMS_ADDRESS is not read: without --wms a run is self-contained)",
    )
    p.add_argument(
        "--token",
        default="",
        help="with --wms: bearer token (default EWMS_TOKEN, else the local admin token)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="without --wms: the embedded WMS's data directory, kept (default: a new directory "
        "in $TMPDIR, deleted after a successful run, kept after a failed one); with --wms: where "
        "the local admin token is found (default EWMS_DATA_DIR or the user data dir)",
    )
    p.set_defaults(run=run_command, needs_wms=False)


def run_command(args: Any) -> int:
    """Check every input, then run; returns the exit code."""
    request = read_request(args.workflow)
    settings = ClientSettings.from_env()
    if args.wms and args.workers:
        raise UsageError(
            "--workers sizes the embedded local TMS; with --wms the WMS's TMSs run the workers "
            "(use the workflow's n_workers)"
        )
    in_alias = input_alias(request, args.in_queue)
    out = OutputFile(args.outfile)
    out.check()
    started = time.monotonic()
    source = InputFile(args.infile, text=args.text, max_event_bytes=settings.max_event_bytes)
    source.check()  # every line, before anything starts; keeps none of them
    if not args.wms:
        configure_logging(os.environ.get("EWMS_LOG_LEVEL", "WARNING"))
    try:
        return asyncio.run(
            _until_signalled(_run(args, request, source, settings, in_alias, out, started))
        )
    except KeyboardInterrupt:
        return 130
    except CannotServe as exc:  # its embedded WMS could not start
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        source.close()


def input_alias(request: WS.CreateWorkflowRequest, in_queue: str | None) -> str:
    """The alias of the queue the events go to: --in-queue, else the one public queue that a task
    consumes and none produces; UsageError before anything is started."""
    consumed = {a for t in request.tasks for a in t.input_queue_aliases}
    produced = {a for t in request.tasks for a in t.output_queue_aliases}
    if in_queue:
        if in_queue not in consumed | produced | set(request.public_queue_aliases):
            raise UsageError(f"--in-queue {in_queue!r}: the workflow has no such queue")
        return in_queue
    entries = [a for a in request.public_queue_aliases if a in consumed and a not in produced]
    if len(entries) != 1:
        names = ", ".join(entries) or "none"
        raise UsageError(
            f"the workflow needs exactly one public input queue for --in (found: {names}); "
            "name it with --in-queue"
        )
    return entries[0]


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
    args: Any,
    request: WS.CreateWorkflowRequest,
    source: InputFile,
    settings: ClientSettings,
    in_alias: str,
    out: OutputFile,
    started: float,
) -> int:
    stack = None
    run_dir: Path | None = None
    throwaway = False
    if args.wms:
        address = args.wms
        token = resolve_token(args.token, settings, address, args.data_dir or settings.data_dir)
    else:
        from services.local_stack import start_local_stack

        if args.data_dir:
            run_dir = args.data_dir
        else:
            run_dir = Path(tempfile.mkdtemp(prefix="ewms-run-"))
            throwaway = True
        try:
            # Two runs at once never collide: any free HTTP port unless EWMS_HTTP_PORT says.
            http_port = None if os.environ.get("EWMS_HTTP_PORT", "").strip() else 0
            stack = await start_local_stack(run_dir, slots=args.workers, http_port=http_port)
        except BaseException:
            if throwaway:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        address, token = stack.address, stack.token
    run = WorkflowRun(address, token, args, source, in_alias, out, run_dir, started)
    code = 1
    try:
        code = await run.execute(request)
        return code
    finally:
        if stack is not None:
            if throwaway and run.workflow_id:
                # The run's broker queues and user go with it (with RabbitMQ they would outlive
                # it); its directory stays when it failed, for the pilot logs.
                with contextlib.suppress(Exception):
                    await stack.wms.queues.delete_now(run.workflow_id)
            await stack.stop()
        if run_dir is not None:
            if throwaway and code == 0:
                shutil.rmtree(run_dir, ignore_errors=True)
            elif code != 0 and run.workflow_id:
                print(f"run directory kept: {run_dir}", file=sys.stderr)
                print(
                    f"  pilot logs: {run_dir}/tms-local/ewms-taskforce-*/cluster-*/*.err",
                    file=sys.stderr,
                )
            elif throwaway:
                shutil.rmtree(run_dir, ignore_errors=True)


class WorkflowRun:
    """One ``ewms run``: submit, publish, collect, finish, report."""

    def __init__(
        self,
        address: str,
        token: str,
        args: Any,
        source: InputFile,
        in_alias: str,
        out: OutputFile,
        run_dir: Path | None,
        started: float | None = None,
    ) -> None:
        self.address = address
        self.token = token
        self.args = args
        self.source = source
        self.n_events = source.n_events
        self.in_alias = in_alias
        self.out = out
        self.run_dir = run_dir
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.view = WorkflowView()
        self.outputs_written = 0
        # Input event ids name their line: EV-<nonce>-<line> (nothing kept per event).
        self.id_prefix = f"EV-{secrets.token_hex(8)}-"
        self.n_published = 0
        # (events published, payload bytes published) after each Publish call, while unsettled.
        self.publish_marks: deque[tuple[int, int]] = deque()
        self.bytes_published = 0
        self.bytes_settled = 0
        self.input_stats: queue_pb2.QueueStats | None = None
        self.settled_inputs = 0
        self.done_inputs = 0  # settled and not dead-lettered, by the input queue's counters
        self.output_backlog = 0  # outputs ready or in flight to this process (while publishing)
        self.unsettled_inputs = self.n_events
        self.published = asyncio.Event()
        # On RabbitMQ: the exact completion verdict (services/cli/settlement.py), and the output
        # subscriptions its fence closes (collecting while `outputs_open` is set).
        self.settlement: Settlement | None = None
        self.exact_input: queue_pb2.QueueStats | None = None  # its counters once settled
        self.output_subs: dict[str, Any] = {}
        self.outputs_open = asyncio.Event()
        self.outputs_open.set()
        self.done = asyncio.Event()
        self.check_wanted = asyncio.Event()
        self.failure = ""
        mode = resolve_mode(getattr(args, "progress", "auto"), args.no_progress, sys.stderr)
        self.meter = Progress(mode, time.monotonic() if started is None else started)
        self.progress = mode != "none"
        self.stats_wanted = asyncio.Event()
        self.final_shown = False
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
            try:
                return await self._drive()
            finally:
                if self.events is not self.queues:
                    await self.events.close()
        finally:
            self._final()  # also after an interruption or an error
            await channel.close()

    def _plan(self, created: WS.CreateWorkflowResponse) -> None:
        """Which queue takes the events, which give outputs, and the pipeline order."""
        consumed = {q for td in created.task_directives for q in td.input_queues}
        produced = {q for td in created.task_directives for q in td.output_queues}
        self.alias_of = {q.queue_id: q.alias for q in created.queues}
        entry = next(q for q in created.queues if q.alias == self.in_alias)
        self.input = entry
        self.outputs = [q for q in created.queues if q.public and q.queue_id in produced - consumed]
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
        self.created, self.order = created, order

    async def _drive(self) -> int:
        self.seen = SeenOutputs(self.run_dir)
        self.room = asyncio.Event()
        tasks = [asyncio.create_task(self._collect(q.queue_id)) for q in self.outputs]
        tasks.append(asyncio.create_task(self._watch()))
        tasks.append(asyncio.create_task(self._checker()))
        tasks.append(asyncio.create_task(self._monitor()))
        for task in tasks:
            task.add_done_callback(self._ended)
        interrupted = False
        try:
            if await self._publish_until_done():
                self.published.set()
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
            self.seen.close()
            if self.meter.bar:
                self._draw(force=True)
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
            self._final()
            print(
                f"{self.workflow_id}: {self.n_events} event(s) in, {self.outputs_written} "
                f"output(s) written\nerror: {self.failure}",
                file=sys.stderr,
            )
            return EXIT_WMS_UNREACHABLE
        return await self._report()

    async def _publish_until_done(self) -> bool:
        """Publish every event, unless the run ends first (the WMS lost, every worker gone);
        True when all are published. CommandError when publishing fails (the workflow is then
        aborted)."""
        publisher = asyncio.create_task(self._publish_all())
        ended = asyncio.create_task(self.done.wait())
        try:
            await asyncio.wait({publisher, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (publisher, ended):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t
        if publisher.cancelled():
            return False
        exc = publisher.exception()
        if isinstance(exc, (QueueError, InputChanged)):
            self.failure = f"publishing the events failed: {exc}"
            raise CommandError(
                f"{self.workflow_id}: {self.failure}; the workflow was aborted",
                2 if isinstance(exc, EventTooLarge) else 1,
            ) from None
        if exc is not None:
            raise exc
        return not self.done.is_set()

    async def _publish_all(self) -> None:
        """Read and publish the events in batches, each when the window has room for it."""
        content_type = "text/plain; charset=utf-8" if self.args.text else "application/json"
        batch: list[queue_pb2.Event] = []
        nbytes = 0
        for line in self.source.events():
            batch.append(
                queue_pb2.Event(
                    event_id=f"{self.id_prefix}{line.number}",
                    payload=line.payload,
                    content_type=content_type,
                )
            )
            nbytes += len(line.payload)
            if len(batch) >= PUBLISH_BATCH or nbytes >= PUBLISH_BATCH_BYTES:
                await self._publish_batch(batch, nbytes)
                batch, nbytes = [], 0
        if batch:
            await self._publish_batch(batch, nbytes)

    async def _publish_batch(self, batch: list[queue_pb2.Event], nbytes: int) -> None:
        await self._room_for(len(batch), nbytes)
        # One call at a time: it returns once the WMS (or RabbitMQ) stored the batch durably,
        # which paces the reading to what the broker takes.
        await self.events.publish(self.input.queue_id, batch)
        self.n_published += len(batch)
        self.bytes_published += nbytes
        self.publish_marks.append((self.n_published, self.bytes_published))
        self._draw()

    async def _room_for(self, n: int, nbytes: int) -> None:
        """Until publishing ``n`` more events of ``nbytes`` keeps the unsettled ones (and the
        outputs not yet collected) within MAX_UNSETTLED and MAX_UNSETTLED_BYTES (or nothing is
        unsettled: a batch always goes).
        When every worker has ended meanwhile, the run ends (nothing would settle)."""
        while True:
            # Settlement is counted, not tracked per event: the input queue hands events out in
            # order, so the first `settled_inputs` published are taken as the settled ones.
            while self.publish_marks and self.publish_marks[0][0] <= self.settled_inputs:
                _, self.bytes_settled = self.publish_marks.popleft()
            # Outputs waiting for this process count too: they are the same events, further on.
            backlog = self.output_backlog
            average = self.source.n_bytes // max(1, self.n_events)
            unsettled = self.n_published - self.settled_inputs + backlog
            unsettled_bytes = self.bytes_published - self.bytes_settled + backlog * average
            if unsettled <= 0 or (
                unsettled + n <= MAX_UNSETTLED and unsettled_bytes + nbytes <= MAX_UNSETTLED_BYTES
            ):
                return
            if self.view.all_terminal():
                self.failure = (
                    f"every worker has ended but {unsettled} input event(s) are not done "
                    f"({self.n_events - self.n_published} not yet published)"
                )
                self.done.set()
                await asyncio.Future()  # cancelled by _publish_until_done
            self.room.clear()
            self.stats_wanted.set()
            await self.room.wait()

    async def _monitor(self) -> None:
        """The input queue's counters: how many published events are settled (the publishing
        window, the progress) and dead-lettered. Read when the publisher waits for room (at most
        every MONITOR_INTERVAL) and otherwise every MONITOR_IDLE."""
        last = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stats_wanted.wait(), MONITOR_IDLE)
            wait = last + MONITOR_INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.stats_wanted.clear()
            last = time.monotonic()
            published = self.n_published
            s = await self.queues.stats(self.input.queue_id)
            self.input_stats = s
            # Of the events published before this call, those neither waiting nor running are
            # settled (`acked` may lag on RabbitMQ; `ready` may too, which lets the window
            # overshoot, never stall).
            unsettled = int(s.ready + s.in_flight)
            settled = min(int(max(s.acked + s.dead_lettered, published - unsettled)), published)
            self.settled_inputs = max(self.settled_inputs, settled)
            self.done_inputs = max(self.done_inputs, settled - int(s.dead_lettered))
            if not self.published.is_set():
                # While publishing: the outputs not yet collected (the flow control's share).
                backlog = 0
                for q in self.outputs:
                    o = await self.queues.stats(q.queue_id)
                    backlog += int(o.ready + o.in_flight)
                self.output_backlog = backlog
            self.room.set()
            self._draw()

    async def _report(self) -> int:
        """Close --out, print the summary and, when anything failed, why; the exit code."""
        if not self.failure:
            # A settled run's results replace the old ones, even when there are none.
            try:
                self.out.open()
                self.out.close()
            except OutputError as exc:
                self.failure = str(exc)
        else:
            with contextlib.suppress(OutputError):
                self.out.close()
        outcome = run_report.RunOutcome(
            workflow_id=self.workflow_id,
            infile=self.source.name,
            n_events=self.n_events,
            outputs_written=self.outputs_written,
            taskforces=list(self.view.taskforces.values()),
            line_of=self.line_of,
        )
        with contextlib.suppress(grpc.aio.AioRpcError):
            s = outcome.input_stats = self.exact_input or await self.queues.stats(
                self.input.queue_id
            )
            # As the summary counts them.
            self.input_stats = s
            unsettled = int(s.ready + s.in_flight)
            self.settled_inputs = max(self.settled_inputs, self.n_published - unsettled)
            self.done_inputs = self.n_published - unsettled - int(s.dead_lettered)
        with contextlib.suppress(grpc.aio.AioRpcError):
            outcome.dead_letters = await self._dead_letters()
        self._final()
        print(run_report.summary(outcome), file=sys.stderr)
        if self.failure:
            print(f"error: {self.failure}", file=sys.stderr)
        failed = bool(outcome.n_dead or self.failure)
        if failed:
            errors = run_report.task_errors(outcome)
            if errors:
                print("task errors:", file=sys.stderr)
                for line in errors:
                    print(line, file=sys.stderr)
        if outcome.dead_letters:
            print("dead-lettered events:", file=sys.stderr)
            for line in run_report.dead_letter_list(outcome):
                print(line, file=sys.stderr)
            rerun = self._write_rerun_file(outcome)
            if rerun is not None:
                print(
                    f"their input lines are in {rerun}: fix the task, then run just them with "
                    f"--in {rerun}",
                    file=sys.stderr,
                )
        return 1 if failed else 0

    def _write_rerun_file(self, outcome: run_report.RunOutcome) -> Path | None:
        """The input lines of the dead-lettered events, as a file to run again."""
        numbers = set(outcome.dead_lines())
        if self.run_dir is None or not numbers:
            return None
        path = self.run_dir / ("dead-lettered.txt" if self.args.text else "dead-lettered.jsonl")
        try:
            with path.open("wb") as f:
                for payload in self.source.payloads(numbers):
                    f.write(payload + b"\n")
        except (OSError, UsageError):
            return None
        return path

    def line_of(self, event_id: str) -> int | None:
        """The input line an input event was published from (its id names it), else None."""
        if event_id.startswith(self.id_prefix):
            with contextlib.suppress(ValueError):
                return int(event_id[len(self.id_prefix) :])
        return None

    def _output_prefetch(self) -> int:
        """OUTPUT_PREFETCH, fewer when events are big (outputs taken as big as the inputs), so
        that the deliveries held stay near OUTPUT_BUFFER_BYTES."""
        average = self.source.n_bytes // max(1, self.n_events)
        return max(4, min(OUTPUT_PREFETCH, OUTPUT_BUFFER_BYTES // max(1, average)))

    async def _collect(self, queue_id: str) -> None:
        while True:
            await self.outputs_open.wait()
            await self._collect_once(queue_id)

    async def _collect_once(self, queue_id: str) -> None:
        """One subscription to an output queue, until it ends (or a settlement fence closed
        it: what it still brings goes back to the queue and comes again)."""
        sub = await self.events.subscribe(queue_id, self._output_prefetch())
        self.output_subs[queue_id] = sub
        async with sub:
            async for delivery in sub:
                if not self.outputs_open.is_set():
                    return
                event = delivery.event
                if self.seen.add(event.event_id):  # else a redelivery of one written
                    self.out.write(self._line(event))
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
        if isinstance(exc, OutputError):
            self.failure = f"{exc}; the workflow was aborted"
        else:
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
        # Checks follow outputs and watch changes, and are repeated after a growing pause while
        # nothing else happens (a worker's end, a queue dropping a consumer). Checks are at most
        # CHECK_INTERVAL apart: outputs come by the thousand, and each check costs a call or two
        # per queue.
        await self.published.wait()
        if isinstance(self.events, AmqpQueueClient):
            stages = stages_of(self.created, self.order, [q.queue_id for q in self.outputs])
            self.settlement = Settlement(
                stages, [q.queue_id for q in self.outputs], PassiveCounts(self.events)
            )
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
            if self.settlement is not None:
                settled, stuck = await self._settled_exactly(self.settlement)
            else:
                settled, stuck = await self._settled(), self.view.all_terminal()
            if settled:
                self.done.set()
                return
            if stuck:
                self.failure = (
                    f"every worker has ended but {self.unsettled_inputs} input event(s) are not "
                    "done"
                )
                self.done.set()
                return

    async def _settled_exactly(self, settlement: Settlement) -> tuple[bool, bool]:
        """RabbitMQ: (settled, every worker ended with events left), exactly."""
        verdict = await settlement.check(
            self.n_published, self.view.taskforces.values(), self._fence, self.outputs_open.set
        )
        self.settled_inputs = max(self.settled_inputs, verdict.settled_inputs)
        self.unsettled_inputs = self.n_published - verdict.settled_inputs
        if verdict.settled:
            # RabbitMQ's own counters (management API) may lag the verdict by seconds.
            self.exact_input = settlement.input_stats(self.input.queue_id, self.n_published)
        return verdict.settled, bool(verdict.stuck)

    async def _fence(self) -> None:
        """Close the output subscriptions (acks first); the collectors wait for a reopen."""
        self.outputs_open.clear()
        for sub in list(self.output_subs.values()):
            await sub.close()

    async def _settled(self) -> bool:
        """The embedded broker (its counters are exact): whether every queue, in pipeline
        order, has nothing ready or in flight and every event it got is acked or dead-lettered;
        the outputs all written. Counts the settled inputs on the way."""
        for i, queue_id in enumerate([*self.internal, *(q.queue_id for q in self.outputs)]):
            s = await self.queues.stats(queue_id)
            settled = s.acked + s.dead_lettered
            if i == 0:
                self.unsettled_inputs = int(s.ready + s.in_flight)
                self.settled_inputs = int(max(settled, self.n_events - self.unsettled_inputs))
            if s.ready or s.in_flight or settled < s.published:
                return False
        return True

    async def _wait_stopped(self) -> None:
        """After finishing: until every taskforce is terminal (its workers gone); the view then
        holds the taskforces' final counters and errors."""

        async def until_terminal() -> None:
            view = WorkflowView()
            async for msg in self.workflows.WatchWorkflow(
                WS.WatchWorkflowRequest(workflow_id=self.workflow_id), metadata=self.metadata
            ):
                view.apply(msg)
                self.view = view
                if view.all_terminal():
                    return

        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
            await asyncio.wait_for(until_terminal(), FINISH_TIMEOUT)

    async def _dead_letters(self) -> dict[str, list[queue_pb2.DeadLetter]]:
        """Every queue's dead letters, by its alias, in pipeline order."""
        out: dict[str, list[queue_pb2.DeadLetter]] = {}
        for queue_id in self.internal:
            letters: list[queue_pb2.DeadLetter] = []
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
                out[self.alias_of.get(queue_id, queue_id)] = letters
        return out

    def _snapshot(self) -> Snapshot:
        total = self.n_events
        stats = self.input_stats
        return Snapshot(
            published=self.n_published,
            total=total,
            settled=max(self.settled_inputs, min(self.outputs_written, total)),
            done=self.done_inputs,
            dead_lettered=int(stats.dead_lettered) if stats is not None else 0,
            failed=self.view.tasks_failed(),
            outputs=self.outputs_written,
            workers=self.view.workers(taskforce_pb2.JOB_STATE_RUNNING),
        )

    def _draw(self, *, force: bool = False) -> None:
        """The progress bar (at most 10 a second) or JSON line (one a second); ``force``: the
        bar's last drawing, ended by a newline."""
        if self.progress and (force or self.meter.due(time.monotonic())):
            self.meter.report(self._snapshot(), final=force and self.meter.bar)

    def _final(self) -> None:
        """The last JSON progress line (once), when the counts are final."""
        if self.meter.json and not self.final_shown:
            self.final_shown = True
            self.meter.report(self._snapshot(), final=True)
