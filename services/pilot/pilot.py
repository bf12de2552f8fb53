"""The pilot: consume events, run the task once per event, publish its outputs, ack the input.

Read top to bottom: :meth:`Pilot.run` prepares the runtime, runs the init task, subscribes, then
takes one delivery per free slot (``EWMS_PILOT_MAX_CONCURRENT_TASKS``) until it is told to drain,
has been idle too long, or -- only with ``EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR`` -- a task
failed. :meth:`Pilot._handle` is one event's whole path: task directory, infile, run, outputs
published to every output queue (confirmed), then the input acked -- or, on any failure, nacked
with the error text so the queue counts the attempt (and dead-letters it at ``max_attempts``).
The pilot's status carries only the error's first line (:attr:`TaskError.summary`).
A WMS or broker out of reach fails nothing: publishing and the intake wait it out
(:mod:`services.pilot.queue_link`), and the idle clock stops meanwhile; only an outage longer
than ``EWMS_PILOT_OUTAGE_TOLERANCE`` ends the pilot, with exit 1 and no task counted as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from ewms.v1 import pilot_service_pb2, queue_pb2, taskforce_pb2
from services.events.client import EventTooLarge, QueueClosed, QueueError
from services.pilot import task_io
from services.pilot.chirp import Chirper
from services.pilot.config import PilotSettings
from services.pilot.failures import (
    ContainerRunError,
    OutputPublishError,
    OutputTooLargeError,
    PilotStopped,
    TaskError,
    WorkflowEndedError,
    first_line,
)
from services.pilot.prefetch import AdaptivePrefetch
from services.pilot.queue_link import Intake, QueueUnreachable, Received, flush_at, queue_links
from services.pilot.runner import RunResult, run
from services.pilot.runtimes import Launch, Mount, Runtime, RuntimeSetupError, TaskSpec
from services.pilot.spawner import Spawner, Withdrawn
from services.pilot.status import StatusReporter

log = structlog.get_logger(__name__)

Phase = taskforce_pb2.PilotPhase
# How much of a task's stdout/stderr is copied into the pilot's log.
DUMP_BYTES = 16 * 1024


class EventsSink(Protocol):
    """Where lifecycle events go besides the WMS (the hyperflow-style exchange)."""

    def emit(self, type: str, job: str | None = None, **fields: Any) -> None:
        """Publish one monitoring event; never blocks, never raises."""
        ...

    async def close(self) -> None:
        """Flush and close."""
        ...


class NoEvents:
    """No monitoring exchange configured."""

    def emit(self, type: str, job: str | None = None, **fields: Any) -> None:
        """Nothing to do."""

    async def close(self) -> None:
        """Nothing to do."""


NOT_STARTED = "the pilot stopped before starting this event"


class NotStarted(Exception):
    """The pilot began draining before this event's task could start."""


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _ts() -> Timestamp:
    now = time.time_ns()
    return Timestamp(seconds=now // 1_000_000_000, nanos=now % 1_000_000_000)


@dataclass
class Outcome:
    """How the pilot ended."""

    exit_code: int
    phase: int
    reason: str


@dataclass
class _Run:
    """Timings of one task run, for the monitoring events."""

    slot: int
    timestamps: dict[str, float] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    result: RunResult | None = None
    # Whether its event is counted as received (once its task started, or failed to start).
    counted: bool = False

    def mark(self, name: str) -> float:
        now = time.time()
        self.timestamps[name] = now
        return now


class Pilot:
    """One pilot process's work. Create, then ``await run()``; returns the exit code."""

    def __init__(
        self,
        settings: PilotSettings,
        runtime: Runtime,
        *,
        reporter: StatusReporter | None = None,
        sink: EventsSink | None = None,
        chirper: Chirper | None = None,
    ) -> None:
        self.s = settings
        self.runtime = runtime
        self.reporter = reporter
        self.sink: EventsSink = sink or NoEvents()
        self._monitored = sink is not None  # else the monitoring events are not even built
        self.chirper = chirper
        self.counters = taskforce_pb2.TaskCounters()
        if reporter is not None:
            reporter.counters = self.counters  # the same object: read when a status is sent
        self.last_error = ""
        self._phase: int = Phase.PILOT_PHASE_STARTED
        self._inputs, self._outputs = queue_links(settings)
        # Every event being handled; at most EWMS_PILOT_MAX_CONCURRENT_TASKS hold a slot (their
        # process runs). A slot frees when the process exits, so publishing and acking overlap
        # the next task.
        self._tasks: dict[asyncio.Task[None], Received] = {}
        self._task_words = shlex.split(settings.task_args)
        self._wakeup: asyncio.Future[None] | None = None
        self._spawner: Spawner | None = None  # started by run()
        self._task_cpu = 0.0  # CPU seconds of the task runs, summed
        self._dirs = task_io.TaskDirs(
            settings.data_dir, settings.infile_ext, settings.outfile_ext, runtime.maps_paths
        )
        self._drain = asyncio.Event()  # stop taking events, let in-flight ones finish
        self._stop = asyncio.Event()  # stop now: cancel in-flight tasks
        self._drain_reason = ""
        self._drained_by_signal = False
        # Why the pilot ends with a fatal error: a task's (with the stop-on-error setting), the
        # task directory's, the input queue's, or an outage longer than the tolerance.
        self._fatal: Exception | None = None
        self._task_image = settings.task_image
        self._first_received: float | None = None
        self._intake: Intake | None = None
        # Follows the tasks' length unless EWMS_PILOT_PREFETCH fixes it (prefetch.py).
        self._adaptive = (
            AdaptivePrefetch(settings.max_concurrent_tasks, settings.prefetch)
            if settings.prefetch_adaptive
            else None
        )
        self._last_done = 0.0
        self._init_image = settings.init_image

    # -- control -------------------------------------------------------------------------------

    def drain(self, reason: str) -> None:
        """Take no new events; in-flight tasks get ``EWMS_PILOT_DRAIN_GRACE`` to finish.
        A second signal stops at once; a signal after the WMS's drain (the TMS removing the
        cluster of a finished workflow) does not: the tasks still get their grace."""
        by_signal = reason.startswith("SIG")
        if by_signal and self._drained_by_signal:
            self.stop(f"{reason} again")
            return
        self._drained_by_signal = self._drained_by_signal or by_signal
        log.info("draining", reason=reason)
        self._drain_reason = self._drain_reason or reason
        self._drain.set()
        self._poke()

    def stop(self, reason: str) -> None:
        """Stop now: in-flight tasks are killed and their events nacked."""
        log.info("stopping", reason=reason)
        self._drain_reason = self._drain_reason or reason
        self._drain.set()
        self._stop.set()
        self._poke()

    def _give_up(self, error: QueueUnreachable) -> None:
        """The WMS or broker stayed away longer than the outage tolerance: stop now and exit 1.
        Nothing in flight can be published or settled, so nothing waits for it; the inputs go
        back to their queues with the lost subscriptions."""
        if self._fatal is None:
            log.error("giving up", error=str(error))
            self._fatal = error
        self.stop(str(error))

    @property
    def _gave_up(self) -> bool:
        return isinstance(self._fatal, QueueUnreachable)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT (HTCondor eviction, condor_rm, Ctrl-C) drain the pilot."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain, sig.name)

    def _set_phase(self, phase: int) -> None:
        self._phase = phase
        log.info("phase", phase=Phase.Name(phase))  # type: ignore[arg-type]
        if self.reporter:
            self.reporter.set_phase(phase)
        if self.chirper:
            self.chirper.phase(phase)

    def _changed(self) -> None:
        if self.reporter:
            self.reporter.last_error = self.last_error
            self.reporter.changed()
        if self.chirper:
            self.chirper.counters(self.counters)

    # -- the whole life ------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until drained, idle, or failed; returns the process exit code."""
        if self.chirper:
            self.chirper.started()
        outcome = await self._run()
        spawner_cpu = await self._spawner.close() if self._spawner is not None else 0.0
        if outcome.phase == Phase.PILOT_PHASE_FATAL_ERROR:
            self.last_error = self.last_error or first_line(outcome.reason)
            self._changed()
            if self.chirper:
                self.chirper.error(outcome.reason)
        self._set_phase(outcome.phase)
        log.info(
            "pilot finished",
            reason=outcome.reason,
            events=self.counters.events_received,
            succeeded=self.counters.tasks_succeeded,
            failed=self.counters.tasks_failed,
            published=self.counters.events_published,
            tasking_seconds=round(self._tasking_seconds(), 6),
            # CPU of the pilot (all its threads), of its spawner process, and of its tasks.
            cpu_seconds=round(_cpu_seconds(resource.RUSAGE_SELF), 3),
            spawner_cpu_seconds=round(max(0.0, spawner_cpu - self._task_cpu), 3),
            task_cpu_seconds=round(self._task_cpu, 3),
        )
        if outcome.phase == Phase.PILOT_PHASE_FATAL_ERROR and self.s.quarantine_time:
            # Blackhole protection: a broken worker must not grab and fail events quickly.
            log.warning("quarantine before exiting", seconds=self.s.quarantine_time)
            await self._sleep_unless_stopped(self.s.quarantine_time)
        self._dirs.close()
        await self.sink.close()
        if self.chirper:
            await self.chirper.close()
        if self.reporter:
            await self.reporter.close()
        return outcome.exit_code

    def _tasking_seconds(self) -> float:
        """From the first event received to the last task done."""
        if self._first_received is None:
            return 0.0
        return max(0.0, self._last_done - self._first_received)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _run(self) -> Outcome:
        try:
            self._spawner = Spawner.start(self.s.max_concurrent_tasks)
        except OSError as exc:
            return Outcome(1, Phase.PILOT_PHASE_FATAL_ERROR, f"cannot start the spawner: {exc}")
        try:
            if self._task_image:
                self._task_image = await self.runtime.prepare(self._task_image)
            if self._init_image:
                self._init_image = await self.runtime.prepare(self._init_image)
        except RuntimeSetupError as exc:
            return Outcome(1, Phase.PILOT_PHASE_FATAL_ERROR, f"runtime {self.runtime.name}: {exc}")
        if self.s.init_args or self.s.init_image:
            self._set_phase(Phase.PILOT_PHASE_RUNNING_INIT)
            try:
                await self._run_init()
            except TaskError as exc:
                self.last_error = exc.summary
                return Outcome(1, Phase.PILOT_PHASE_FATAL_ERROR, str(exc))
            if self._drain.is_set():
                return Outcome(0, Phase.PILOT_PHASE_DONE, self._drain_reason)
        try:
            intake = self._intake = Intake(self._inputs, self.s.prefetch)
            await intake.open()
        except (QueueError, QueueUnreachable) as exc:
            return Outcome(1, Phase.PILOT_PHASE_FATAL_ERROR, f"cannot subscribe: {exc}")
        self._set_phase(Phase.PILOT_PHASE_AWAITING_FIRST_EVENT)
        try:
            outcome = await self._consume(intake)
        finally:
            await self._finish(intake)
        return outcome

    async def _run_init(self) -> None:
        paths = task_io.make_init_dir(self.s.data_dir, self.runtime.maps_paths)
        replacements = {ph: paths.hub_seen for ph in task_io.PLACEHOLDERS["data_hub"]}
        spec = TaskSpec(
            alias="init",
            image=self._init_image,
            argv=task_io.build_argv(self.s.init_args, replacements),
            env={**self.s.init_env, "EWMS_TASK_DATA_HUB_DIR": paths.hub_seen},
            workdir=paths.hub,
            mounts=(Mount(paths.hub, paths.hub_seen, True), *self._external_mounts()),
            workdir_target=paths.hub_seen,
        )
        launch = self.runtime.launch(spec)
        log.info("init task", argv=launch.argv)
        assert self._spawner is not None
        try:
            await run(
                launch,
                paths.stdout,
                paths.stderr,
                alias="init",
                time_limit=self.s.init_timeout,
                kill_grace=self.s.kill_grace,
                spawner=self._spawner,
            )
        except TaskError:
            self._dump(paths.stdout, paths.stderr, "init")
            log.error("init task failed; its files are kept", directory=str(paths.root))
            raise
        finally:
            if launch.container_name:
                await self.runtime.cleanup(launch)
        if self.s.dump_task_output:
            self._dump(paths.stdout, paths.stderr, "init")
        task_io.remove(paths.root)

    async def _pause_intake(self) -> None:
        if self._intake is not None:
            await self._intake.pause()

    def _external_mounts(self) -> list[Mount]:
        return [Mount(p, str(p), False) for p in self.s.external_directories]

    # -- intake --------------------------------------------------------------------------------

    async def _consume(self, intake: Intake) -> Outcome:
        """Take deliveries as they arrive, until drained, idle, or failed. Every delivery is taken
        at once (prefetch bounds them) and staged in; the slots bound how many tasks run. One
        future wakes this loop, whatever happened (a delivery, a task done, a drain, a lost
        queue)."""
        loop = asyncio.get_running_loop()
        received_any = False
        idle_since = time.monotonic()
        intake.on_change = self._poke
        intake.failed.add_done_callback(lambda _f: self._poke())
        try:
            while not self._drain.is_set():
                if intake.failed.done():
                    failure = intake.failed.result()
                    if isinstance(failure.cause, QueueUnreachable):
                        self._give_up(failure.cause)
                    else:
                        self._fatal = self._fatal or failure
                        self.drain("input queue lost")
                    break
                while not intake.ready.empty():
                    item = intake.ready.get_nowait()
                    if not received_any:
                        received_any = True
                        self._first_received = time.monotonic()
                        self._set_phase(Phase.PILOT_PHASE_TASKING)
                    self._start(item)
                timer = None
                # While an input queue cannot be read the pilot is not idle: it waits for the
                # queue (up to the outage tolerance), and its idle time starts once it is back.
                if not self._tasks and intake.connected:
                    idle_since = max(idle_since, self._last_done, intake.connected_at)
                    limit = self.s.idle_timeout if received_any else self.s.first_event_timeout
                    timeout = idle_since + limit - time.monotonic()
                    if timeout <= 0:
                        what = "an event" if not received_any else "another event"
                        return Outcome(0, Phase.PILOT_PHASE_DONE, f"waited {limit:g}s for {what}")
                    timer = loop.call_later(timeout, self._poke)
                self._wakeup = loop.create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
                    if timer is not None:
                        timer.cancel()
        finally:
            intake.on_change = None
        return await self._wind_down(intake)

    def _poke(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _start(self, item: Received) -> None:
        name = f"task-{item.delivery.event.event_id}"
        task = asyncio.create_task(self._handle(item), name=name)
        self._tasks[task] = item

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.pop(t, None)
            self._last_done = time.monotonic()
            self._poke()

        task.add_done_callback(done)

    async def _wind_down(self, intake: Intake) -> Outcome:
        """Stop taking events: nack what was received but not started; let in-flight tasks finish
        (within the drain grace when draining on request); report how the pilot ends."""
        stopping_for_error = self._fatal is not None
        self._set_phase(Phase.PILOT_PHASE_DRAINING)
        # Paused first, so the nacks below return events to other pilots, not to this one.
        await intake.pause()
        # Tasks waiting for a slot do not start (their events go back); a task the spawner has
        # started runs on within the grace, even if its start has not reached this loop yet.
        # Handles still staging in see the drain before they queue their task.
        if self._spawner is not None:
            self._spawner.drop_queued()
        await self._return_untaken(intake)
        loop = asyncio.get_running_loop()
        # After a task error the original waits for in-flight tasks; a drain request bounds it.
        deadline = None if stopping_for_error else loop.time() + self.s.drain_grace
        stop = asyncio.create_task(self._stop.wait())
        try:
            while self._tasks and not self._stop.is_set():
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                await asyncio.wait(
                    set(self._tasks) | {stop},
                    timeout=remaining,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            stop.cancel()
        if self._tasks:
            log.warning("killing tasks still running", count=len(self._tasks))
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._fatal is not None:
            return Outcome(1, Phase.PILOT_PHASE_FATAL_ERROR, str(self._fatal))
        return Outcome(0, Phase.PILOT_PHASE_DONE, self._drain_reason or "done")

    async def _return_untaken(self, intake: Intake) -> None:
        """Nack what was received but never taken, so other pilots get it."""
        for item in intake.take_ready():
            await self._nack(item, NOT_STARTED, dead_letter=False)

    async def _finish(self, intake: Intake) -> None:
        await self._return_untaken(intake)
        await intake.close()
        await self._inputs.close()
        if self._outputs is not self._inputs:
            await self._outputs.close()

    # -- one event -----------------------------------------------------------------------------

    async def _handle(self, item: Received) -> None:
        """One event: stage in at once (so it is ready when a slot frees), run the task when a
        slot is free, free the slot, then publish the outputs and ack while the next task runs."""
        staged: list[task_io.StagedIn] = []
        try:
            await self._handle_event(item, staged)
        finally:
            for each in staged:
                each.close()

    async def _handle_event(self, item: Received, staged_out: list[task_io.StagedIn]) -> None:
        event = item.delivery.event
        job = event.event_id
        r = _Run(-1)
        r.mark("job.started")
        if self._monitored:
            # Its slot ("thread") is known once it runs: job.finished carries it.
            self.sink.emit(
                "job.started",
                job,
                thread=None,
                event_id=job,
                queue=item.queue_id,
                attempt=event.attempt,
            )
        paths = None
        try:
            self._stage("stage_in", r, job)
            # A reused directory: a rename and a write in place, cheap enough for the event loop
            # unless the payload is large.
            staged = self._dirs.take(event)
            staged_out.append(staged)
            paths = staged.paths
            if staged.bytes_in > task_io.INLINE_WRITE_BYTES:
                await asyncio.to_thread(staged.write_infile)
            else:
                staged.write_infile()
            r.bytes_in = staged.bytes_in
            self._stage("stage_in", r, job, finished=True, bytes=r.bytes_in)
            launch = self._launch(paths)
            if self._drain.is_set():
                raise NotStarted()
            # No await from here until the task is queued in the spawner: a drain either comes
            # before the check above or finds the task queued (and drops it, or lets it run).

            def started(slot: int) -> None:
                r.slot = slot
                # Counted, and STARTED reported, when the task runs (not when its event arrives
                # and waits for a slot): an event returned untouched by a drain was never
                # started here, and the WMS's task stream shows the run from its real start.
                r.counted = True
                self.counters.events_received += 1
                self._changed()
                self._lifecycle(event, pilot_service_pb2.TASK_EVENT_KIND_STARTED)
                self._stage("execution", r, job)

            # Queued in the spawner, which starts it the moment one of its slots frees (no round
            # trip through this loop), so publishing and acking overlap the next task.
            out_fd, err_fd = staged.stdout_fd, staged.stderr_fd
            staged.stdout_fd = staged.stderr_fd = -1  # the runner closes them
            r.result = await self._execute(launch, paths, out_fd, err_fd, started)
            self._stage(
                "execution",
                r,
                job,
                finished=True,
                executable=self._executable(),
                exit_status=r.result.exit_code,
            )

            self._stage("stage_out", r, job)
            outputs, r.bytes_out = task_io.read_outputs(
                paths, self.s.outfile_ext, self.s.max_event_bytes, event
            )
            await self._publish(outputs)
            self._stage("stage_out", r, job, finished=True, bytes=r.bytes_out)
        except (asyncio.CancelledError, NotStarted, Withdrawn) as exc:
            if "execution.started" not in r.timestamps or self._gave_up:
                # Never ran, or stopped by an outage: back to the queue for another pilot, not
                # counted as a failure.
                await self._nack(item, NOT_STARTED, dead_letter=False)
                if paths is not None:
                    self._dirs.recycle(paths)
            else:
                stopped = PilotStopped("the pilot stopped before the task finished")
                await self._nack(item, str(stopped), dead_letter=False)
                self.counters.tasks_failed += 1
                self._failed(item, r, stopped, paths)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        except QueueUnreachable as exc:
            # The outputs could not be published through a whole outage: the pilot's failure,
            # not the task's. The input is not acked, so it runs again elsewhere.
            self._give_up(exc)
            if paths is not None:
                self._dirs.recycle(paths)
            return
        except TaskError as exc:
            if isinstance(exc, ContainerRunError) and r.result is None:
                r.result = exc.result
            if isinstance(exc, WorkflowEndedError):
                self.drain("the workflow was deactivated")
            elif self.s.stop_listening_on_task_error and not exc.matches(self.s.okay_errors):
                self._fatal = self._fatal or exc
                self.drain("a task failed (EWMS_PILOT_STOP_LISTENING_ON_TASK_ERROR)")
            if self._drain.is_set():
                # Else the nack would hand the event straight back to this pilot.
                await self._pause_intake()
            # The event carries the whole text; the status only its first line, so that the WMS
            # counts pilots failing the same way together.
            await self._nack(item, str(exc), dead_letter=exc.dead_letter)
            self.counters.tasks_failed += 1
            self.last_error = exc.summary
            self._failed(item, r, exc, paths)
            return
        except OSError as exc:
            # The task directory could not be made or read: this worker's disk, not the event.
            error = TaskError(f"task files: {exc}")
            await self._nack(item, str(error), dead_letter=False)
            self.counters.tasks_failed += 1
            self.last_error = error.summary
            self._failed(item, r, error, paths)
            self._fatal = self._fatal or error
            self.drain("the task directory failed")
            return
        await self._ack(item)
        self.counters.tasks_succeeded += 1
        if self._adaptive is not None and r.result is not None:
            await self._adapt_prefetch(r.result.wall_seconds)
        self._changed()
        self._lifecycle(event, pilot_service_pb2.TASK_EVENT_KIND_FINISHED, r)
        if self._monitored:
            self.sink.emit(
                "job.finished",
                job,
                executable=self._executable(),
                exit_status=0,
                thread=r.slot,
                metrics=self._metrics(r),
                error=None,
            )
        if paths is not None:
            if self.s.dump_task_output:
                self._dump(paths.stdout, paths.stderr, job)
            if self.s.keep_all_task_files:
                self._dirs.keep(paths, event)
            else:
                self._dirs.recycle(paths)

    def _executable(self) -> str:
        return self._task_image or (self._task_words[0] if self._task_words else "")

    def _launch(self, paths: task_io.TaskPaths) -> Launch:
        """The task's command line and environment for this run (ContainerRunError if the runtime
        cannot build them)."""
        mounts = (
            Mount(paths.task_io, paths.task_io_seen, True),
            Mount(paths.hub, paths.hub_seen, True),
            *self._external_mounts(),
        )
        spec = TaskSpec(
            alias="task",
            image=self._task_image,
            argv=task_io.build_argv(self._task_words, paths.replacements()),
            env={**self.s.task_env, **paths.task_env()},
            workdir=paths.task_io,
            mounts=mounts,
            workdir_target=paths.task_io_seen,
        )
        try:
            return self.runtime.launch(spec)
        except RuntimeSetupError as exc:
            raise ContainerRunError(f"task: {exc}") from None

    async def _execute(
        self,
        launch: Launch,
        paths: task_io.TaskPaths,
        stdout_fd: int,
        stderr_fd: int,
        on_start: Callable[[int], None],
    ) -> RunResult:
        assert self._spawner is not None
        result = None
        try:
            result = await run(
                launch,
                stdout_fd,
                stderr_fd,
                stderr_path=paths.stderr,
                alias="task",
                time_limit=self.s.task_timeout,
                kill_grace=self.s.kill_grace,
                spawner=self._spawner,
                on_start=on_start,
            )
            return result
        except TaskError as exc:
            result = exc.result
            raise
        finally:
            if result is not None:
                self._task_cpu += result.cpu_user + result.cpu_system
            if launch.container_name:
                await asyncio.shield(self.runtime.cleanup(launch))

    async def _publish(self, outputs: list[queue_pb2.Event]) -> None:
        """Publish every output to every output queue; returns once all are confirmed."""
        queues = self.s.outgoing.queues
        if not outputs:
            return
        if not queues:
            log.warning("task outputs dropped: the pilot has no output queue", count=len(outputs))
            return
        for event in outputs:
            event.provenance.worker_id = self.s.worker_id
            if self.s.taskforce_uuid:
                event.provenance.taskforce_uuid = self.s.taskforce_uuid
        try:
            if len(queues) == 1:
                await self._outputs.publish(queues[0], outputs)
            else:
                await asyncio.gather(*(self._outputs.publish(q, outputs) for q in queues))
        except EventTooLarge as exc:
            raise OutputTooLargeError(str(exc)) from None
        except QueueClosed as exc:
            raise WorkflowEndedError(f"the outputs cannot be published: {exc}") from None
        except QueueError as exc:
            raise OutputPublishError(f"publishing the outputs failed: {exc}") from None
        self.counters.events_published += len(outputs) * len(queues)

    async def _adapt_prefetch(self, wall_seconds: float) -> None:
        """Hold more deliveries while tasks are short, fewer when they grow (prefetch.py)."""
        assert self._adaptive is not None
        prefetch = self._adaptive.observe(wall_seconds)
        if prefetch is None or self._intake is None or self._drain.is_set():
            return
        log.info("prefetch changed to follow the tasks' length", prefetch=prefetch)
        self._outputs.set_flush_at(flush_at(prefetch, self.s.max_concurrent_tasks))
        await self._intake.set_prefetch(prefetch)

    async def _ack(self, item: Received) -> None:
        try:
            await item.subscription.ack(item.delivery)
        except QueueError as exc:
            # The outputs are out; the input comes back and will run again (at-least-once).
            log.warning(
                "ack failed after the outputs were published: the event will be redelivered "
                "and its outputs may be duplicated",
                event_id=item.delivery.event.event_id,
                error=str(exc),
            )

    async def _nack(self, item: Received, error: str, *, dead_letter: bool) -> None:
        try:
            await asyncio.shield(
                item.subscription.nack(item.delivery, error, dead_letter=dead_letter)
            )
        except QueueError as exc:
            log.warning(
                "nack failed: the event returns to its queue when the subscription ends",
                event_id=item.delivery.event.event_id,
                error=str(exc),
            )

    # -- reporting -----------------------------------------------------------------------------

    def _stage(
        self, stage: str, r: _Run, job: str, *, finished: bool = False, **fields: Any
    ) -> None:
        key = f"{stage}.{'finished' if finished else 'started'}"
        now = r.mark(key)
        if finished:
            fields["time"] = now - r.timestamps[f"{stage}.started"]
            r.durations[stage] = fields["time"]
        if self._monitored:
            self.sink.emit(f"job.{key}", job, **fields)

    def _metrics(self, r: _Run) -> dict[str, Any]:
        res = r.result
        return {
            "executor": self.s.worker_id,
            "thread": r.slot,
            "timestamps": dict(r.timestamps),
            "stage_in": r.durations.get("stage_in"),
            "execution": r.durations.get("execution"),
            "stage_out": r.durations.get("stage_out"),
            "input_size": r.bytes_in,
            "output_size": r.bytes_out,
            "cpu_user": res.cpu_user if res else None,
            "cpu_system": res.cpu_system if res else None,
            "max_rss_bytes": res.max_rss_bytes if res else None,
        }

    def _lifecycle(
        self,
        event: queue_pb2.Event,
        kind: pilot_service_pb2.TaskEventKind.ValueType,
        r: _Run | None = None,
        error: str = "",
    ) -> None:
        if not self.reporter:
            return
        msg = pilot_service_pb2.TaskLifecycleEvent(
            event_id=event.event_id,
            kind=kind,
            error=error,
            timestamp=_ts(),  # type: ignore[arg-type]
        )
        if r is not None:
            res = r.result
            msg.metrics.CopyFrom(
                pilot_service_pb2.TaskMetrics(
                    wall_seconds=res.wall_seconds if res else 0.0,
                    cpu_seconds=(res.cpu_user + res.cpu_system) if res else 0.0,
                    max_rss_bytes=res.max_rss_bytes if res else 0,
                    exit_code=res.exit_code if res else 0,
                    bytes_in=r.bytes_in,
                    bytes_out=r.bytes_out,
                )
            )
        self.reporter.task_event(msg)

    def _failed(
        self, item: Received, r: _Run, error: TaskError, paths: task_io.TaskPaths | None
    ) -> None:
        event = item.delivery.event
        if paths is not None:
            paths = self._dirs.keep(paths, event)  # for the user to look into
        if not r.counted:  # it failed before its task could start
            r.counted = True
            self.counters.events_received += 1
        self._changed()
        self._lifecycle(event, pilot_service_pb2.TASK_EVENT_KIND_FAILED, r, str(error))
        exit_status = r.result.exit_code if r.result else -1
        self.sink.emit(
            "job.finished",
            event.event_id,
            executable=self._executable(),
            exit_status=exit_status,
            thread=r.slot,
            metrics=self._metrics(r),
            error=str(error),
        )
        log.warning(
            "task failed",
            event_id=event.event_id,
            attempt=event.attempt,
            error=str(error),
            kind=type(error).__name__,
            directory=str(paths.root) if paths else None,
        )
        if paths is not None:
            self._dump(paths.stdout, paths.stderr, event.event_id)

    def _dump(self, stdout: Any, stderr: Any, what: str) -> None:
        for name, path in (("stdout", stdout), ("stderr", stderr)):
            try:
                with open(path, "rb") as f:
                    f.seek(0, 2)
                    size = f.tell()
                    f.seek(max(0, size - DUMP_BYTES))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            if text:
                log.info(f"task {name}", task=what, truncated=size > DUMP_BYTES, text=text)
