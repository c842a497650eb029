"""The run state machine: which status a run may go to from which, and who may write each step.

Every guard in `storage.queue` asks this table which statuses it may start from, so a late or wrong writer
(a worker whose run was cancelled meanwhile, a user retrying a run that is still running) changes nothing.

Who writes what, and why:
- the worker writes `succeeded` or `failed`: it knows;
- the engine writes what a worker cannot say about itself: the claim, `cancelled` after it killed the process
  group on request, `queued` or `interrupted` when the process vanished (requeued while retries are left), and
  `failed` when the launch itself failed;
- the user cancels a queued run at once, asks for a running one to be cancelled (a flag its engine acts on),
  and retries a finished run.

A step from a status to itself is a write that keeps the status: it changes only the run's other fields.
"""
from __future__ import annotations

from enum import Enum

from clfbench.storage.models import TERMINAL_STATUSES, RunStatus


class Writer(str, Enum):
    worker = "worker"  # the run's own process (rank 0)
    engine = "engine"  # the engine that claimed and supervises it
    user = "user"  # the CLI or the TUI


# status -> next status -> who may write that step. Nothing else is allowed.
TRANSITIONS: dict[RunStatus, dict[RunStatus, frozenset[Writer]]] = {
    RunStatus.queued: {
        RunStatus.running: frozenset({Writer.engine}),  # the claim
        RunStatus.cancelled: frozenset({Writer.user}),  # cancelled before it started
    },
    RunStatus.running: {
        # engine: the launch (pid, GPUs, log); worker: heartbeat and progress; user: the cancel request
        RunStatus.running: frozenset({Writer.engine, Writer.worker, Writer.user}),
        RunStatus.succeeded: frozenset({Writer.worker}),
        # the method raised; the engine could not launch the worker
        RunStatus.failed: frozenset({Writer.worker, Writer.engine}),
        RunStatus.cancelled: frozenset({Writer.engine}),  # its process ended after a cancel request
        RunStatus.queued: frozenset({Writer.engine}),  # its process vanished, automatic retries left
        RunStatus.interrupted: frozenset({Writer.engine}),  # its process vanished, no retries left
    },
    # a user's retry puts a finished run back in the queue
    **{finished: {RunStatus.queued: frozenset({Writer.user})} for finished in TERMINAL_STATUSES},
}


def allowed(source: str, target: str, writer: Writer) -> bool:
    """May `writer` move a run in status `source` to status `target` (the same status: write its fields)?"""
    return writer in TRANSITIONS.get(RunStatus(source), {}).get(RunStatus(target), frozenset())


def sources(target: RunStatus, writer: Writer) -> tuple[RunStatus, ...]:
    """The statuses, other than `target` itself, from which `writer` may move a run to `target`."""
    return tuple(source for source in TRANSITIONS if source != target and allowed(source, target, writer))


def kept_by(writer: Writer) -> tuple[RunStatus, ...]:
    """The statuses in which `writer` may write a run's other fields and leave its status as it is."""
    return tuple(status for status in TRANSITIONS if allowed(status, status, writer))


# What the end of a running attempt leaves with an error that its log tail explains: every outcome except
# succeeded (no error) and cancelled (the user knows why).
ENDED_WITH_ERROR = tuple(status for status in TRANSITIONS[RunStatus.running]
                         if status not in (RunStatus.running, RunStatus.succeeded, RunStatus.cancelled))

# A run may be deleted only where no worker writes to it any more: a live worker would go on writing
# metric points and results for a run that is gone.
DELETABLE = tuple(status for status in RunStatus
                  if not any(Writer.worker in writers for writers in TRANSITIONS.get(status, {}).values()))
