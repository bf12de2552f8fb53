"""When every input of ``ewms run`` is settled on RabbitMQ: an exact verdict, at once.

RabbitMQ's management API counts acks per channel and refreshes them every 5 s (a channel that
closes meanwhile takes its counts with it), so ``acked`` and ``in_flight`` can neither be trusted
nor awaited. The verdict here uses only exact facts, each read when it is needed:

- ``N``, the events ``ewms run`` published to the input queue: it counts them itself, each batch
  confirmed by RabbitMQ (publisher confirms) before it is counted.
- ``ready`` and ``consumers`` of a queue, and the messages in its dead-letter queue (``dead``):
  passive ``queue.declare`` answers, exact at the instant RabbitMQ answers. They need no
  permission, so ``ewms run`` asks over its own AMQP connection, without the WMS.
- ``succeeded``: the taskforces' ``tasks_succeeded`` counters (WatchWorkflow), summed over the
  taskforces of the tasks that consume the queue. A pilot counts a task as succeeded only after
  its outputs were published (confirmed) and its input acked, and reports it within 0.25 s.

A queue that pilots consume is **settled** when either holds:

1. **Balance**: ``ready == 0`` and ``succeeded + dead == inflow`` (the input queue's inflow is
   ``N``). Every event published to the queue is, at any instant, ready, held unacked by a
   consumer, acked, or dead-lettered, exactly one of these. Succeeded events were acked, and
   dead-lettered ones are in the dead-letter queue (a pilot's dead-letter nack copies the event
   there, confirmed, before acking it; RabbitMQ's delivery limit moves it there). Counts only
   grow, and are read after the events they count happened, so ``succeeded + dead == inflow``
   leaves nothing held or ready: every event is settled, and stays so. An event some pilot held
   when it died (kill -9, a lost connection) was never counted as succeeded: RabbitMQ requeues
   it when the connection closes, and it is counted when another pilot finishes it (or when the
   delivery limit dead-letters it). So a dead pilot delays the balance until its events are
   done again; it never makes it early. Equality, not ``>=``: a count above the inflow means a
   success was counted twice (below), and then the balance proves nothing.
2. **Drained**: ``ready == 0``, ``consumers == 0`` and every taskforce that consumes the queue
   has ended (its workers' processes are gone). Unacked messages belong to a channel, and
   RabbitMQ requeues them when the channel closes, so with no consumer and no live worker (whose
   paused consumer could still hold deliveries) nothing is held: every event is acked or dead.
   This decides what the balance cannot: a pilot killed after its ack but before its status
   went out (its success is never counted), a success counted twice, a task with several input
   queues (its counters cannot be split between them), a downstream inflow that is not exact.
   It comes only when the workers have ended (e.g. idle pilots exit after
   ``EWMS_PILOT_TIMEOUT_QUEUE_INCOMING``): no time rule, just a fact RabbitMQ reports.

Queues are decided in pipeline order: a stage acks its input only after publishing its outputs
(confirmed), so once a queue is settled, everything it will ever send downstream is already
there. A downstream queue's inflow is the ``events_published`` of the taskforces that publish to
it (split evenly over each task's output queues: a pilot publishes every output to each of
them); it is exact when the queues upstream balanced (their pilots' statuses, which count a
success only after its outputs, are all in) and none of those pilots is LOST (the WMS catches a
LOST pilot's ``tasks_succeeded`` up from its lifecycle events, but not its ``events_published``).
Otherwise only *drained* decides that queue.

The output queues are consumed by ``ewms run`` itself, which closes that loop with a **fence**:
once every pilot-consumed queue is settled and the outputs show ``ready == 0``, it closes its
output subscriptions (its acks go first, in order, on the same channel; whatever RabbitMQ had
sent it unacked goes back to the queue) and declares them again: ``ready == 0`` and
``consumers == 0`` mean every output was acked by ``ewms run``, so written. Otherwise the
subscriptions reopen and collect the rest (an output taken back is written once: its id was
seen).

What stays outside the argument (documented, none of it observed in practice):

- A success counted whose ack RabbitMQ never processed: the pilot queues its ack before counting
  the success, and a pilot killed or disconnected in the microseconds between its status going
  out and its ack reaching RabbitMQ loses the ack; the event runs again (at-least-once). Its
  input was processed (outputs published), but the balance then counts one success too many
  until the rerun ends; if another event were still unstarted in a pilot's prefetch at that
  moment, the balance would hide it.
- Something other than the workflow's pilots consuming its queues (a user with the workflow's
  credentials, a ``Receive`` through the WMS), or a re-drive while the run is going: their acks
  and moves are not in the counts.
- A pipeline whose pilot published its outputs and died before its ack, while the WMS has not
  yet marked it LOST (its TMS reports the job's end within seconds): its outputs are not in the
  downstream inflow during that window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ewms.v1 import queue_pb2, taskforce_pb2
from ewms.v1 import workflow_service_pb2 as WS
from services.cli.watch import TERMINAL
from services.events import wire
from services.events.amqp import AmqpChannel, AmqpQueueClient

# (ready messages, consumers) of a queue, from a passive declare.
Counts = Callable[[str], Awaitable[tuple[int, int]]]
Fence = Callable[[], Awaitable[None]]
# After the fence closed its subscriptions: declares until the queue has dropped the consumer.
FENCE_POLLS = 100
FENCE_POLL_SECONDS = 0.005


@dataclass(frozen=True)
class Stage:
    """A queue that pilots consume, and who feeds and drains it."""

    queue_id: str
    # Tasks that consume it.
    consumers: frozenset[str]
    # Whether each of those tasks consumes this queue alone (its counters are this queue's).
    attributable: bool
    # Tasks that publish to it, with how many output queues each publishes every output to.
    producers: Mapping[str, int]


@dataclass(frozen=True)
class Verdict:
    """One check's outcome."""

    settled: bool
    # Input events known settled (for the progress display; exact when it says settled).
    settled_inputs: int
    # When not settled and every worker of some queue has ended with events of it left: why.
    stuck: str = ""


def stages_of(
    created: WS.CreateWorkflowResponse, order: Sequence[str], outputs: Iterable[str]
) -> list[Stage]:
    """The pilot-consumed queues of ``order`` (pipeline order, input first), without the output
    queues ``ewms run`` consumes itself."""
    output_ids = set(outputs)
    stages = []
    for queue_id in order:
        if queue_id in output_ids:
            continue
        consuming = [td for td in created.task_directives if queue_id in td.input_queues]
        stages.append(
            Stage(
                queue_id=queue_id,
                consumers=frozenset(td.task_id for td in consuming),
                attributable=bool(consuming) and all(len(td.input_queues) == 1 for td in consuming),
                producers={
                    td.task_id: len(td.output_queues)
                    for td in created.task_directives
                    if queue_id in td.output_queues
                },
            )
        )
    return stages


class Settlement:
    """Decides, check by check, whether every input of a RabbitMQ run is settled (see the module
    docstring for why the verdict is exact)."""

    def __init__(self, stages: Sequence[Stage], outputs: Sequence[str], counts: Counts) -> None:
        self.stages = list(stages)
        self.outputs = list(outputs)
        self._counts = counts
        # Fences made (each closes and reopens the output subscriptions); for tests.
        self.fences = 0
        # The input queue's dead letters at the last check.
        self.input_dead = 0

    def input_stats(self, queue_id: str, published: int) -> queue_pb2.QueueStats:
        """The input queue's counters once settled, exact (RabbitMQ's own may still lag)."""
        return queue_pb2.QueueStats(
            queue_id=queue_id,
            acked=max(0, published - self.input_dead),
            dead_lettered=self.input_dead,
            published=published,
        )

    async def check(
        self,
        published: int,
        taskforces: Iterable[taskforce_pb2.Taskforce],
        fence: Fence,
        reopen: Callable[[], None],
    ) -> Verdict:
        """Whether every one of the ``published`` input events (all of them: publishing is over)
        is settled, and every output collected. ``taskforces``: the workflow's, as last watched.
        ``fence`` closes the output subscriptions; ``reopen`` lets them collect again."""
        by_task: dict[str, list[taskforce_pb2.Taskforce]] = {}
        for tf in taskforces:
            by_task.setdefault(tf.task_id, []).append(tf)
        inflow: int | None = published
        settled_inputs = 0
        for i, stage in enumerate(self.stages):
            if i > 0:
                inflow = self._inflow(stage, by_task) if inflow is not None else None
            ready, consumers = await self._counts(stage.queue_id)
            dead, _ = await self._counts(wire.dead_letter_queue(stage.queue_id))
            tfs = [tf for task in stage.consumers for tf in by_task.get(task, ())]
            succeeded = sum(tf.counters.tasks_succeeded for tf in tfs)
            if i == 0:
                self.input_dead = dead
                done = succeeded + dead if stage.attributable else published - ready
                settled_inputs = max(0, min(published, done))
            balanced = (
                stage.attributable
                and inflow is not None
                and ready == 0
                and succeeded + dead == inflow
            )
            ended = bool(tfs) and all(tf.phase in TERMINAL for tf in tfs)
            if balanced:
                continue
            if ready == 0 and consumers == 0 and ended:
                inflow = None  # drained: settled, but what it counted is not known exact
                continue
            stuck = ""
            if ended and ready > 0:
                stuck = f"{ready} event(s) of queue {stage.queue_id} are left"
            return Verdict(False, settled_inputs, stuck)
        settled_inputs = published
        if not await self._outputs_collected(fence, reopen):
            return Verdict(False, settled_inputs)
        return Verdict(True, settled_inputs)

    def _inflow(
        self, stage: Stage, by_task: Mapping[str, list[taskforce_pb2.Taskforce]]
    ) -> int | None:
        """Events published to a downstream queue, or None when the count may fall short (a
        producing pilot was LOST)."""
        total = 0
        for task, n_queues in stage.producers.items():
            for tf in by_task.get(task, ()):
                if any(
                    c.pilot_phase == taskforce_pb2.PILOT_PHASE_LOST and c.count
                    for c in tf.compound_statuses
                ):
                    return None
                total += tf.counters.events_published // max(1, n_queues)
        return total

    async def _outputs_collected(self, fence: Fence, reopen: Callable[[], None]) -> bool:
        """The fence: with nothing ready in the output queues, close the output subscriptions
        and declare the queues again; True when nothing came back and nobody consumes them."""
        for queue_id in self.outputs:
            ready, _ = await self._counts(queue_id)
            if ready:
                return False
        if not self.outputs:
            return True
        self.fences += 1
        await fence()
        for queue_id in self.outputs:
            # The channel's close-ok comes before the queue has dropped its consumer and taken
            # back what it held (measured on 3.10.8: about half the time, a declare right after
            # the close-ok still shows the consumer); both happen in one step, so the consumer's
            # going is awaited, briefly: a fact RabbitMQ reports, not a quiet period.
            for _ in range(FENCE_POLLS):
                ready, consumers = await self._counts(queue_id)
                if ready or not consumers:
                    break
                await asyncio.sleep(FENCE_POLL_SECONDS)
            if ready or consumers:
                reopen()
                return False
        return True


class PassiveCounts:
    """Passive declares on one channel of an AMQP connection, reopened when RabbitMQ closed it
    (a declare of a missing queue closes its channel)."""

    def __init__(self, client: AmqpQueueClient) -> None:
        self._client = client
        self._channel: AmqpChannel | None = None

    async def __call__(self, queue_id: str) -> tuple[int, int]:
        """(ready messages, consumers) of the queue."""
        if self._channel is None or not self._channel.is_open:
            self._channel = await self._client.connection.channel()
        return await self._channel.counts(queue_id)
