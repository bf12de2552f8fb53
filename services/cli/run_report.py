"""What ``ewms run`` prints when it ends: the counts from the input queue's own counters, and when
something failed, why: each distinct task error with how many events it dead-lettered and the end
of a failing task's stderr, the workers' last and fatal errors, and every dead letter with the
input line it came from."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ewms.v1 import queue_pb2, taskforce_pb2
from services.pilot.failures import first_line

MAX_LISTED_DEAD_LETTERS = 20
MAX_ERROR_GROUPS = 10
MAX_LINE = 200


@dataclass
class RunOutcome:
    """Everything the report says, gathered once the run has ended."""

    workflow_id: str
    infile: str
    n_events: int
    outputs_written: int
    # The input queue's counters after the run (None when they could not be read).
    input_stats: queue_pb2.QueueStats | None = None
    taskforces: list[taskforce_pb2.Taskforce] = field(default_factory=list)
    # Dead letters by the label (alias) of their queue, in pipeline order.
    dead_letters: dict[str, list[queue_pb2.DeadLetter]] = field(default_factory=dict)
    # The input line number an event id was published from (None: not an input event).
    line_of: Callable[[str], int | None] = field(default=lambda _event_id: None)

    @property
    def n_dead(self) -> int:
        return sum(len(letters) for letters in self.dead_letters.values())

    def origin(self, event: queue_pb2.Event) -> str:
        """``events.jsonl:17`` for an event published from that line (or produced from it)."""
        line = self.line_of(event.event_id) or self.line_of(event.provenance.input_event_id)
        return f"{self.infile}:{line}" if line else ""

    def dead_lines(self) -> list[int]:
        """The input lines whose events (or their products) were dead-lettered, in order."""
        found = set()
        for letters in self.dead_letters.values():
            for d in letters:
                line = self.line_of(d.event.event_id) or self.line_of(
                    d.event.provenance.input_event_id
                )
                if line:
                    found.add(line)
        return sorted(found)


def _cut(text: str) -> str:
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"


def summary_of(error: str) -> str:
    """An error's summary as the pilot reports it (so it matches ``top_task_errors`` keys); the
    rest of the text is the end of the task's stderr."""
    return first_line(error).strip() or "(no error text)"


def _rest(error: str) -> list[str]:
    lines = [ln.rstrip() for ln in error.strip().splitlines()]
    return [ln for ln in lines[1:] if ln.strip()]


def summary(o: RunOutcome) -> str:
    """One line: the inputs settled by the input queue's counters, outputs, failed runs."""
    failed = sum(tf.counters.tasks_failed for tf in o.taskforces)
    head = f"{o.workflow_id}: {o.n_events} event(s) in"
    if o.input_stats is not None:
        s = o.input_stats
        unsettled = s.ready + s.in_flight
        done = max(0, o.n_events - s.dead_lettered - unsettled)
        head += f": {done} done, {s.dead_lettered} dead-lettered, {unsettled} not settled"
    return (
        f"{head}; {o.outputs_written} output(s) written; {failed} failed task run(s)"
        if failed
        else f"{head}; {o.outputs_written} output(s) written"
    )


def task_errors(o: RunOutcome) -> list[str]:
    """Each distinct error of the dead letters (count, and the end of one failing task's stderr),
    then the workers' last errors not among them, and how many workers stopped on a fatal one."""
    groups: dict[str, list[queue_pb2.DeadLetter]] = {}
    for letters in o.dead_letters.values():
        for d in letters:
            groups.setdefault(summary_of(d.last_error), []).append(d)
    out: list[str] = []
    ranked = sorted(groups.items(), key=lambda item: -len(item[1]))
    for error, letters in ranked[:MAX_ERROR_GROUPS]:
        out.append(f"  {len(letters)} event(s) dead-lettered: {_cut(error)}")
        example = letters[-1]
        tail = _rest(example.last_error)
        if tail:
            where = o.origin(example.event) or example.event.event_id
            out.append(f"    ({where}, attempt {example.event.attempt})")
            out.extend(f"    {_cut(line)}" for line in tail)
    if len(ranked) > MAX_ERROR_GROUPS:
        out.append(f"  ... and {len(ranked) - MAX_ERROR_GROUPS} more distinct error(s)")
    workers: Counter[str] = Counter()
    for tf in o.taskforces:
        for error, n in tf.top_task_errors.items():
            workers[summary_of(error)] += n
    for error, n in workers.most_common():
        if error not in groups:
            out.append(f"  last error of {n} worker(s): {_cut(error)}")
    fatal = _count(o.taskforces, taskforce_pb2.PILOT_PHASE_FATAL_ERROR)
    if fatal:
        out.append(
            f"  {fatal} worker(s) stopped on a fatal error (their last errors are above; "
            "the pilot logs say more)"
        )
    return out


def _count(taskforces: Iterable[taskforce_pb2.Taskforce], phase: int) -> int:
    return sum(c.count for tf in taskforces for c in tf.compound_statuses if c.pilot_phase == phase)


def dead_letter_list(o: RunOutcome) -> list[str]:
    """One line per dead letter (at most MAX_LISTED_DEAD_LETTERS a queue): where it came from,
    its id, its queue and attempts, and its error's summary."""
    out: list[str] = []
    for label, letters in o.dead_letters.items():
        for d in letters[:MAX_LISTED_DEAD_LETTERS]:
            where = o.origin(d.event)
            out.append(
                f"  {where + ' ' if where else ''}{d.event.event_id} ({label}, attempt "
                f"{d.event.attempt}): {_cut(summary_of(d.last_error))}"
            )
        if len(letters) > MAX_LISTED_DEAD_LETTERS:
            out.append(f"  ... and {len(letters) - MAX_LISTED_DEAD_LETTERS} more in {label}")
    return out
