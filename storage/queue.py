"""Queue operations: enqueue, claim (one atomic statement), heartbeat, finish, cancel, requeue; engine rows.

Every write to a run is guarded by the statuses it may start from, which `storage.states` gives for the
status it writes and who writes it (`WHERE status IN (...) AND attempt = :attempt`), so a late writer (a
worker from an earlier attempt, an engine that lost a race) changes nothing.
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import (Float, bindparam, cast, delete, exists, func, insert, literal, literal_column, select, text,
                        update)
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from clfbench.storage import dialect
from clfbench.storage.db import Store, StoreError, seconds_from_env
from clfbench.storage.db import now as _host_clock
from clfbench.storage.models import (EngineRow, Event, MetricPoint, PredictionRow, Result, Run, RunLogChunk,
                                     RunStatus, metric_value_columns)
from clfbench.storage.states import DELETABLE, ENDED_WITH_ERROR, Writer, allowed, kept_by, sources

RUNS = Run.__table__
EVENTS = Event.__table__
ENGINES = EngineRow.__table__
RUN_LOG = RunLogChunk.__table__

# An engine's lease lasts this long past its last renewal, on the database's clock (env CLFBENCH_ENGINE_LEASE_S).
DEFAULT_ENGINE_LEASE_S = 60.0
# An engine row without a lease (written by a clfbench before store v4) counts as leased this long past its last
# heartbeat: that heartbeat is the old engine's own clock, so the margin is generous.
LEGACY_LEASE_S = 600.0


def now() -> float:
    """This host's clock for the times the store shows (created, started, heartbeat), shifted by
    CLFBENCH_CLOCK_OFFSET_S seconds when set: a test skews one host's clock by minutes to prove that no decision
    about who owns a run reads a host's clock (leases are set and judged on the database's, `db_now`)."""
    offset = os.environ.get("CLFBENCH_CLOCK_OFFSET_S")
    return _host_clock() + (float(offset) if offset else 0.0)


def engine_lease_s() -> float:
    """CLFBENCH_ENGINE_LEASE_S (seconds > 0), default 60. A bad value is a one-line StoreError."""
    return seconds_from_env("CLFBENCH_ENGINE_LEASE_S", DEFAULT_ENGINE_LEASE_S, zero_allowed=False)


def db_now_expr(store_or_connection) -> ColumnElement:
    """The database's clock as an SQL expression (storage.dialect.db_now_sql)."""
    return literal_column(dialect.db_now_sql(store_or_connection.engine), Float)


def _lease_end():
    """When an engine's lease ends, on the database's clock; a row without one (written before store v4) is
    judged by its last heartbeat plus LEGACY_LEASE_S."""
    return func.coalesce(ENGINES.c.lease_until, ENGINES.c.heartbeat_at + LEGACY_LEASE_S)


def log_event(connection: Connection, kind: str, message: str = "", run_id: int | None = None) -> None:
    connection.execute(insert(EVENTS).values(time=now(), run_id=run_id, kind=kind, message=message))


def _guard(run_id: int, statuses: Iterable[RunStatus], attempt: int | None) -> list:
    """WHERE clauses for one run in one of `statuses` (and under `attempt`, when given)."""
    clauses = [RUNS.c.id == run_id, RUNS.c.status.in_([status.value for status in statuses])]
    if attempt is not None:
        clauses.append(RUNS.c.attempt == attempt)
    return clauses


def _move(connection: Connection, run_id: int, target: RunStatus, writer: Writer, values: dict,
          attempt: int | None = None) -> bool:
    """Set the run's status to `target` (and `values`) if `writer` may move it there from its status now.
    Returns False, having changed nothing, when it may not."""
    result = connection.execute(update(RUNS).where(*_guard(run_id, sources(target, writer), attempt))
                                .values(status=target.value, **values))
    return result.rowcount == 1


def _write_fields(connection: Connection, run_id: int, writer: Writer, values: dict,
                  attempt: int | None = None) -> bool:
    """Write `values` into the run, keeping its status, if `writer` may write in that status. Returns False,
    having changed nothing, when it may not."""
    result = connection.execute(update(RUNS).where(*_guard(run_id, kept_by(writer), attempt)).values(**values))
    return result.rowcount == 1


@dataclass(frozen=True)
class NewRun:
    """What the CLI/TUI inserts for one validated spec."""

    method: str
    model: str
    task: str
    shots: int
    seed: int
    spec_json: str
    spec_hash: str
    launch: str
    gpus_requested: int | None
    nproc: int
    code_version: str = ""
    name: str | None = None
    priority: int = 0
    tasks_json: str | None = None  # the tasks frozen at queue time (engine.tasks.identity)
    pin_host: str | None = None  # the spec's host: / gpu_type: (only such an engine claims it)
    pin_gpu_type: str | None = None


def enqueue(store: Store, runs: Iterable[NewRun]) -> list[int]:
    """Insert runs as queued, all in one transaction (a sweep is queued whole or not at all)."""
    ids = []
    with store.write() as connection:
        for run in runs:
            result = connection.execute(
                insert(RUNS).values(
                    **run.__dict__, status=RunStatus.queued.value, created_at=now()
                ).returning(RUNS.c.id)
            )
            run_id = result.scalar_one()
            ids.append(run_id)
            log_event(connection, "queued", f"{run.method} {run.model} {run.task}", run_id)
    return ids


def claim(
    store: Store,
    *,
    host: str,
    engine_id: int,
    default_gpus: int,
    free_gpus: int,
    cpu_free: bool,
    api_free: bool,
    host_id: str | None = None,
    gpu_ids: Sequence[int] | None = None,
    gpu_type: str = "",
    honour_pins: bool = True,
) -> dict | None:
    """Atomically move the best claimable queued run to running, owned by `engine_id`. Returns the run row, or None.

    Only an engine whose lease is live claims (a registered engine whose lease ran out, or that another engine
    declared lost, gets None). With `gpu_ids` (this engine's GPUs not busy with its own children) and `host_id`, the
    GPUs are counted and assigned through the store in the same transaction: those assigned to running runs of any
    engine of the same host are not free, so two engines on one host never hand out one GPU twice. `free_gpus` is
    then ignored; without `gpu_ids` it is the caller's count and nothing is assigned here.

    A run pinned to a host (`pin_host`) is claimed only by an engine whose `host` is that name; one pinned to a GPU
    type only by an engine whose `gpu_type` contains it (case-insensitive). A launcher that places runs itself (Slurm:
    pins become sbatch options) claims them whatever its own host, with `honour_pins=False`.
    """
    (source,) = sources(RunStatus.running, Writer.engine)  # one statement: one status it claims from
    with store.write() as connection:
        if not _lease_live_for_claim(connection, engine_id):
            return None
        free = None
        if gpu_ids is not None:
            free = _gpus_free_on_host(connection, host_id or host, gpu_ids)
            free_gpus = len(free)
        row = connection.execute(
            text(dialect.claim_sql(store.engine, source=source.value, target=RunStatus.running.value)),
            {
                "host": host,
                "engine_id": engine_id,
                "now": now(),
                "default_gpus": default_gpus,
                "free_gpus": free_gpus,
                "cpu_free": int(cpu_free),
                "api_free": int(api_free),
                "gpu_type": (gpu_type or "").lower(),
                "pins_anywhere": int(not honour_pins),
            },
        ).first()
        if row is None:
            return None
        if free is not None:
            _assign_gpus(connection, row[0], free, default_gpus)
        run = connection.execute(select(RUNS).where(RUNS.c.id == row[0])).mappings().one()
        log_event(connection, "claimed", f"attempt {run['attempt']} on {host}", run["id"])
        return dict(run)


def _lease_live_for_claim(connection: Connection, engine_id: int) -> bool:
    """Whether `engine_id` may claim: its lease is live and nobody declared it lost. The row is read FOR SHARE on
    PostgreSQL, so an engine declaring this one lost (reclaim_expired updates the row) waits for this claim to
    commit and then sees, and reclaims, the run it claimed. An id with no engine row (a test or a benchmark that
    claims without an engine) is not checked."""
    row = connection.execute(
        select(ENGINES.c.stopped_at, _lease_end() > db_now_expr(connection)).where(ENGINES.c.id == engine_id)
        .with_for_update(read=True)
    ).first()
    return row is None or (row[0] is None and bool(row[1]))


def _gpus_free_on_host(connection: Connection, host_id: str, gpu_ids: Sequence[int]) -> list[int]:
    """Those of `gpu_ids` that no running run of an engine of `host_id` holds. On PostgreSQL a transaction lock per
    host serialises this read with the assignment that follows (SQLite's write lock already does)."""
    lock = dialect.host_lock_sql(connection.engine)
    if lock:
        connection.execute(text(lock), {"key": f"clfbench-gpus:{host_id}"})
    held = connection.execute(
        select(RUNS.c.gpus_assigned).join(ENGINES, ENGINES.c.id == RUNS.c.engine_id)
        .where(RUNS.c.status == RunStatus.running.value, ENGINES.c.host_id == host_id,
               RUNS.c.gpus_assigned.is_not(None))
    ).scalars()
    busy = {int(gpu) for assigned in held for gpu in assigned.split(",") if gpu.strip()}
    return [gpu for gpu in gpu_ids if gpu not in busy]


def _assign_gpus(connection: Connection, run_id: int, free: list[int], default_gpus: int) -> None:
    """Record the GPUs a claimed run gets (the first of `free` it needs) in the claim's own transaction."""
    run = connection.execute(select(RUNS.c.launch, RUNS.c.gpus_requested).where(RUNS.c.id == run_id)).one()
    need = 0 if run.launch == "process" else (default_gpus if run.gpus_requested is None else run.gpus_requested)
    connection.execute(update(RUNS).where(RUNS.c.id == run_id)
                       .values(gpus_assigned=",".join(map(str, free[:need]))))


def set_launched(store: Store, run_id: int, attempt: int, *, pid: int | None, gpus_assigned: str,
                 log_path: str, output_dir: str, job_id: str | None = None) -> None:
    """Record the launch of an attempt: its process (pid), or its batch job (job_id, Slurm's), its GPUs and files."""
    with store.write() as connection:
        launch = {"pid": pid, "gpus_assigned": gpus_assigned, "log_path": log_path, "output_dir": output_dir,
                  "heartbeat_at": now(), "job_id": job_id}
        _write_fields(connection, run_id, Writer.engine, launch, attempt)
        what = f"Slurm job {job_id}" if job_id else f"pid {pid} gpus [{gpus_assigned}]"
        log_event(connection, "launched", what, run_id)


def set_scheduler_phase(store: Store, run_id: int, attempt: int, phase: str | None, *, replaces: str,
                        host: str | None = None) -> bool:
    """The engine's word on an attempt that a batch scheduler holds ("queued on Slurm (job 12: Resources)"), and the
    node it runs on once known. The phase is written only over an empty phase or one starting with `replaces` (the
    engine's own earlier word): once the worker reports its own phase, the worker's stands. Returns whether written."""
    values: dict = {"phase": phase, "phase_step": None, "phase_total": None}
    if host is not None:
        values["host"] = host
    with store.write() as connection:
        result = connection.execute(
            update(RUNS).where(*_guard(run_id, kept_by(Writer.engine), attempt),
                               RUNS.c.phase.is_(None) | RUNS.c.phase.startswith(replaces, autoescape=True))
            .values(**values))
        return result.rowcount == 1


def mark_ended(store: Store, run_id: int, attempt: int, target: RunStatus, reason: str) -> str | None:
    """End a running attempt whose job a batch scheduler ended, with the status its scheduler's state says
    (interrupted: its time limit; cancelled: cancelled outside clfbench; failed: the job failed), when its worker
    wrote no end itself. A cancel the user asked for stays `cancelled by user`. Returns the new status, or None
    if the run was not running under this attempt (nothing changed)."""
    with store.write() as connection:
        run = connection.execute(select(RUNS).where(RUNS.c.id == run_id, RUNS.c.attempt == attempt)).mappings().first()
        if run is None:
            return None
        if run["cancel_requested"]:
            target, reason = RunStatus.cancelled, "cancelled by user"
        values = {"finished_at": now(), "error": reason, "attempt_note": f"attempt {attempt}: {reason}",
                  "phase": None, "phase_step": None, "phase_total": None}
        if not _move(connection, run_id, target, Writer.engine, values, attempt):
            return None
        log_event(connection, target.value, reason, run_id)
        return target.value


def heartbeat(store: Store, run_id: int, attempt: int, progress: tuple[int, int] | None = None,
              phase: tuple[str, int | None, int | None] | None = None) -> bool:
    """Record that the run is alive, with its training progress (step, total) and its phase (name, step, total)
    when given. Returns False if the run is no longer ours (cancelled, re-claimed)."""
    values: dict = {"heartbeat_at": now()}
    if progress is not None:
        values["progress_step"], values["progress_total"] = progress
    if phase is not None:
        values["phase"], values["phase_step"], values["phase_total"] = phase
    with store.write() as connection:
        return _write_fields(connection, run_id, Writer.worker, values, attempt)


def add_metric_points(store: Store, run_id: int, attempt: int, points: list[tuple[int, str, float, float]]) -> bool:
    """Insert a batch of (step, name, value, time) points in one transaction (one executemany), fenced by (run,
    attempt) in the statement that writes: each INSERT ... SELECT ... WHERE EXISTS writes its row only while the
    run is `running` under `attempt`, so a worker whose run was cancelled or re-claimed writes nothing. Returns
    whether the batch was written, whole (an empty batch of a run that is still ours counts as written). A NaN or
    infinite value is stored as NULL plus its name in `nonfinite` (storage.models.metric_value_columns).

    On SQLite that statement is the only check: the write transaction excludes every other writer, so the fence
    sees one state for the whole batch, and its row count (sqlite3 sums an executemany's) is the answer. PostgreSQL
    gives no row count for an executemany, and each row's EXISTS would see a requeue committed mid-batch: there the
    run's row is read FOR SHARE first (a requeue or claim waits until the batch commits), which also answers."""
    rows = []
    for step, name, value, t in points:
        stored, nonfinite = metric_value_columns(float(value))
        rows.append({"step": step, "name": name, "value": stored, "nonfinite": nonfinite, "time": t})
    if not rows:
        with store.read() as connection:
            return connection.execute(select(RUNS.c.id).where(*_running_under(run_id, attempt))).first() is not None
    with store.write() as connection:
        if not store.is_sqlite and connection.execute(select(RUNS.c.id).where(*_running_under(run_id, attempt))
                                                      .with_for_update(read=True)).first() is None:
            return False
        written = connection.execute(_fenced_point_insert(run_id, attempt), rows).rowcount
        return written == len(rows) if store.is_sqlite else True


def _running_under(run_id: int, attempt: int) -> list:
    return [RUNS.c.id == run_id, RUNS.c.attempt == attempt, RUNS.c.status == RunStatus.running.value]


def _fenced_point_insert(run_id: int, attempt: int):
    """INSERT INTO metric_points (...) SELECT :run, :attempt, :step, ... WHERE EXISTS (the run is running under
    :attempt): the fence is in the very statement that writes, executed once per point (executemany)."""
    points = MetricPoint.__table__
    per_point = ["step", "name", "value", "nonfinite", "time"]
    values = [literal(run_id, points.c.run_id.type), literal(attempt, points.c.attempt.type)]
    # CAST: PostgreSQL cannot infer a parameter's type in a SELECT list (a NULL value would arrive as text).
    values += [cast(bindparam(column, type_=points.c[column].type), points.c[column].type) for column in per_point]
    fence = exists().where(*_running_under(run_id, attempt))
    return insert(points).from_select(["run_id", "attempt", *per_point], select(*values).where(fence))


def finish_succeeded(
    store: Store,
    run_id: int,
    attempt: int,
    predictions: list[dict],
    results: list[dict],
) -> bool:
    """Write predictions, results and the succeeded status in ONE transaction.

    Earlier attempts' predictions/results are replaced. If the run is no longer running under this
    attempt (cancelled, re-claimed), nothing at all is written and False is returned.
    """
    try:
        with store.write() as connection:
            values = {"finished_at": now(), "error": None, "heartbeat_at": now()}
            if not _move(connection, run_id, RunStatus.succeeded, Writer.worker, values, attempt):
                raise _NotOurs
            _replace_outputs(connection, run_id, attempt, predictions, results)
        return True
    except _NotOurs:
        return False


class _NotOurs(Exception):
    """Raised inside a write transaction to roll it back whole when the run is no longer ours."""


def _replace_outputs(connection: Connection, run_id: int, attempt: int, predictions: list[dict],
                 results: list[dict]) -> None:
    connection.execute(delete(PredictionRow.__table__).where(PredictionRow.__table__.c.run_id == run_id))
    connection.execute(delete(Result.__table__).where(Result.__table__.c.run_id == run_id))
    if predictions:
        connection.execute(insert(PredictionRow.__table__), [{"run_id": run_id, **p} for p in predictions])
    if results:
        # "rule" is optional per row (slot metrics name theirs); one executemany needs the same keys in every row.
        connection.execute(insert(Result.__table__), [{"run_id": run_id, "rule": None, "low": None, "high": None,
                                                       "resamples": None, **r} for r in results])
    log_event(connection, "succeeded", f"attempt {attempt}", run_id)


def finish_failed(store: Store, run_id: int, attempt: int, error: str, writer: Writer = Writer.worker) -> bool:
    """The method raised (or, writer=engine, its worker could not be launched): failed, no automatic retry (the
    same spec would fail the same way). Returns False, having changed nothing, if the run was not running
    under this attempt."""
    with store.write() as connection:
        failed = _move(connection, run_id, RunStatus.failed, writer, {"finished_at": now(), "error": error}, attempt)
        if failed:
            log_event(connection, "failed", error.splitlines()[0][:500] if error else "", run_id)
        return failed


def mark_ended_without_result(store: Store, run_id: int, attempt: int, reason: str) -> str | None:
    """The worker process is gone but the run is still `running`: decide its truthful state.

    Cancel requested → cancelled. Otherwise → interrupted, and requeued while automatic retries are left.
    Returns the new status, or None if the run was not running under this attempt (nothing changed).
    """
    with store.write() as connection:
        run = connection.execute(
            select(RUNS).where(RUNS.c.id == run_id, RUNS.c.attempt == attempt)
        ).mappings().first()
        if run is None:
            return None
        target, values, kind = _end_without_result(run, reason)
        if not _move(connection, run_id, target, Writer.engine, values, attempt):
            return None
        log_event(connection, kind, reason, run_id)
        return target.value


def _end_without_result(run: Mapping, reason: str) -> tuple[RunStatus, dict, str]:
    """(status, other values, event kind) for a run whose process is gone without writing its end."""
    if run["cancel_requested"]:
        return RunStatus.cancelled, {"finished_at": now(), "error": "cancelled by user"}, "cancelled"
    limit = run["max_interruptions"]
    # The reason why this attempt ended, kept in attempt_note (the next attempt appends how it resumed), and the
    # phase cleared: a queued run is doing nothing, whatever its last worker was doing.
    ended = {"attempt_note": f"attempt {run['attempt']}: {reason}", "phase": None, "phase_step": None,
             "phase_total": None}
    if run["interruptions"] < limit:
        retry = run["interruptions"] + 1
        values = {"interruptions": retry, "error": f"{reason}; requeued (retry {retry} of {limit})",
                  "pid": None, "gpus_assigned": None, **ended}
        return RunStatus.queued, values, "requeued"
    error = f"{reason}; no retries left ({limit})"
    return RunStatus.interrupted, {"finished_at": now(), "error": error, **ended}, "interrupted"


def set_attempt_note(store: Store, run_id: int, attempt: int, note: str) -> bool:
    """Append `note` ("attempt 2 resumed from step 300") to the run's attempt_note, after the reason the last
    attempt ended. Fenced like every worker write: only while the run is running under `attempt`, so a worker
    whose run was cancelled or re-claimed writes nothing. Returns whether it was written."""
    with store.write() as connection:
        row = connection.execute(select(RUNS.c.attempt_note).where(*_running_under(run_id, attempt))).first()
        if row is None:
            return False
        earlier = (row[0] or "").strip()
        if note in earlier:  # said already (a method that builds its training twice)
            return True
        return _write_fields(connection, run_id, Writer.worker,
                             {"attempt_note": f"{earlier}; {note}" if earlier else note}, attempt)


def request_cancel(store: Store, run_id: int) -> str:
    """Cancel a run: a queued run is cancelled at once; a running one is flagged for its engine.

    Returns what happened: 'cancelled', 'requested', or the run's status when there was nothing to do.
    """
    with store.write() as connection:
        run = connection.execute(select(RUNS.c.status).where(RUNS.c.id == run_id)).first()
        if run is None:
            raise KeyError(run_id)
        status = run[0]
        if allowed(status, RunStatus.cancelled, Writer.user):  # not started: nothing to stop
            _move(connection, run_id, RunStatus.cancelled, Writer.user,
                  {"finished_at": now(), "error": "cancelled by user"})
            log_event(connection, "cancelled", "before it started", run_id)
            return "cancelled"
        if allowed(status, status, Writer.user):  # running: the one field a user writes is the request
            _write_fields(connection, run_id, Writer.user, {"cancel_requested": True})
            log_event(connection, "cancel_requested", "", run_id)
            return "requested"
        return status


def requeue(store: Store, run_id: int) -> bool:
    """Put a finished (failed/cancelled/interrupted/succeeded) run back in the queue; retries reset."""
    with store.write() as connection:
        fresh = {"cancel_requested": False, "interruptions": 0, "error": None, "finished_at": None, "pid": None,
                 "gpus_assigned": None, "progress_step": None, "progress_total": None, "phase": None,
                 "phase_step": None, "phase_total": None, "attempt_note": "retried by user"}
        requeued = _move(connection, run_id, RunStatus.queued, Writer.user, fresh)
        if requeued:
            log_event(connection, "requeued", "by user", run_id)
        return requeued


def delete_run(store: Store, run_id: int) -> bool:
    """Delete a run that is not running, with everything it wrote."""
    with store.write() as connection:
        status = connection.execute(select(RUNS.c.status).where(RUNS.c.id == run_id)).scalar()
        if status is None or RunStatus(status) not in DELETABLE:
            return False
        for table in (MetricPoint.__table__, PredictionRow.__table__, Result.__table__, RUN_LOG):
            connection.execute(delete(table).where(table.c.run_id == run_id))
        connection.execute(delete(RUNS).where(RUNS.c.id == run_id))
        log_event(connection, "deleted", "", run_id)
        return True


# The log the store keeps per run (env CLFBENCH_LOG_KEEP_BYTES): the newest bytes, whole chunks of whole lines.
# 1 MB holds a long fine-tune's every loss line and any traceback; the file on the running host keeps the rest.
DEFAULT_LOG_KEEP_BYTES = 1_000_000
LOG_DROPPED_NOTE = "[clfbench: earlier lines of this log were dropped from the store to bound it; " \
    "`clfbench logs` on the host that ran it shows the whole file]\n"


def log_keep_bytes() -> int:
    raw = os.environ.get("CLFBENCH_LOG_KEEP_BYTES", "").strip()
    if not raw:
        return DEFAULT_LOG_KEEP_BYTES
    if not raw.isdigit() or int(raw) < 1000:
        raise StoreError(f"CLFBENCH_LOG_KEEP_BYTES must be a whole number of bytes >= 1000, not {raw!r}")
    return int(raw)


def append_log(store: Store, run_id: int, attempt: int, chunk: str, file_end: int, after_a_gap: bool = False) -> None:
    """Store the next piece of a run's log (whole lines, read from the log file up to byte `file_end`), then drop
    the oldest pieces while the run's stored log is over log_keep_bytes(), never the newest one: the tail a user
    needs (the traceback, the last losses) stays whole. The oldest piece kept starts with LOG_DROPPED_NOTE.
    `after_a_gap`: the engine skipped lines before this piece (the log grew faster than it ships); the pieces
    before the gap go, so that the stored log is always one unbroken tail of the file, under the note."""
    keep = log_keep_bytes()
    with store.write() as connection:
        if connection.execute(select(RUNS.c.id).where(RUNS.c.id == run_id)).first() is None:
            return  # deleted meanwhile
        if after_a_gap:
            connection.execute(delete(RUN_LOG).where(RUN_LOG.c.run_id == run_id))
            chunk = LOG_DROPPED_NOTE + chunk
        connection.execute(insert(RUN_LOG).values(run_id=run_id, attempt=attempt, time=now(), text=chunk,
                                                  file_end=file_end))
        sizes = connection.execute(select(RUN_LOG.c.id, func.length(RUN_LOG.c.text)).where(RUN_LOG.c.run_id == run_id)
                                   .order_by(RUN_LOG.c.id.desc())).all()
        total, kept = 0, []  # newest first; the newest piece with text is kept whatever its size
        for chunk_id, size in sizes:
            if total + size > keep and total > 0:
                break
            total += size
            kept.append(chunk_id)
        if len(kept) == len(sizes):
            return
        connection.execute(delete(RUN_LOG).where(RUN_LOG.c.run_id == run_id, RUN_LOG.c.id < kept[-1]))
        oldest = connection.execute(select(RUN_LOG.c.text).where(RUN_LOG.c.id == kept[-1])).scalar_one()
        if not oldest.startswith(LOG_DROPPED_NOTE):
            connection.execute(update(RUN_LOG).where(RUN_LOG.c.id == kept[-1])
                               .values(text=LOG_DROPPED_NOTE + oldest))


def log_event_standalone(store: Store, kind: str, message: str = "", run_id: int | None = None) -> None:
    with store.write() as connection:
        log_event(connection, kind, message, run_id)


def append_error_detail(store: Store, run_id: int, attempt: int, detail: str) -> None:
    """Append detail (the log tail) to the error of the run's given attempt, if that attempt ended with an error
    (failed, interrupted, or requeued after an interruption); touches nothing else."""
    with store.write() as connection:
        row = connection.execute(select(RUNS.c.error).where(*_guard(run_id, ENDED_WITH_ERROR, attempt))).first()
        if row is None:
            return
        error = (row[0] or "").rstrip()
        connection.execute(update(RUNS).where(*_guard(run_id, ENDED_WITH_ERROR, attempt))
                           .values(error=f"{error}\n{detail}" if error else detail))


# ---- engines ------------------------------------------------------------------------------------

def register_engine(store: Store, host: str, pid: int, gpus: list[int], *, host_id: str | None = None,
                    identity: str | None = None, gpu_type: str = "", launcher: str = "local") -> int:
    """Record an engine that starts on this store, with its lease (engine_lease_s, on the database's clock);
    returns its id. `identity` (a uuid per engine process) defaults to a new one, `host_id` to `host`; `launcher`:
    "local" or "slurm"."""
    gpu_list = ",".join(map(str, gpus))
    with store.write() as connection:
        engine_id = connection.execute(
            insert(ENGINES).values(host=host, pid=pid, started_at=now(), heartbeat_at=now(), gpus=gpu_list,
                                   identity=identity or str(uuid.uuid4()), host_id=host_id or host,
                                   gpu_type=gpu_type, launcher=launcher,
                                   lease_until=db_now_expr(connection) + engine_lease_s())
            .returning(ENGINES.c.id)
        ).scalar_one()
        log_event(connection, "engine_started", f"{host} pid {pid} gpus [{gpu_list}]"
                  + (f" launcher {launcher}" if launcher != "local" else ""))
    return engine_id


def engine_heartbeat(store: Store, engine_id: int) -> bool:
    """Renew the engine's lease on the database's clock. Returns False when the engine was declared lost (its lease
    had run out and another engine took its runs, reclaim_expired) or stopped: its runs are no longer its, and it
    must stop their workers and claim nothing more. A lease that ran out unnoticed (nobody reclaimed) is renewed:
    no other engine acted on it."""
    with store.write() as connection:
        renewed = connection.execute(
            update(ENGINES).where(ENGINES.c.id == engine_id, ENGINES.c.stopped_at.is_(None))
            .values(heartbeat_at=now(), lease_until=db_now_expr(connection) + engine_lease_s())
        )
        return renewed.rowcount == 1


def unregister_engine(store: Store, engine_id: int, pid: int) -> None:
    """A clean stop. The lease is left to run out, not ended: the workers the engine leaves running stay owned until
    then, and the next engine of this host takes them over at once (take_over_engine)."""
    with store.write() as connection:
        connection.execute(update(ENGINES).where(ENGINES.c.id == engine_id).values(stopped_at=now()))
        log_event(connection, "engine_stopped", f"pid {pid}")


def take_over_engine(store: Store, identity: str, engine_id: int) -> list[int]:
    """Engine `engine_id` holds this host's engine lock for the store, which the engine `identity` held before it:
    that engine is dead (the OS drops the lock only with its process). In one transaction: end its lease and move
    its running runs to `engine_id`, so no other host reclaims them meanwhile; the new engine then adopts those
    whose workers live and ends the others. Returns the ids of the runs taken over."""
    with store.write() as connection:
        old = connection.execute(select(ENGINES.c.id, ENGINES.c.pid).where(ENGINES.c.identity == identity,
                                                                           ENGINES.c.id != engine_id)).first()
        if old is None:
            return []
        connection.execute(update(ENGINES).where(ENGINES.c.id == old.id)
                           .values(stopped_at=func.coalesce(ENGINES.c.stopped_at, now()),
                                   lease_until=db_now_expr(connection)))
        taken = list(connection.execute(
            update(RUNS).where(RUNS.c.engine_id == old.id, RUNS.c.status == RunStatus.running.value)
            .values(engine_id=engine_id).returning(RUNS.c.id)
        ).scalars())
        if taken:
            log_event(connection, "engine_taken_over", f"pid {old.pid}: runs {', '.join(map(str, taken))}")
        return taken


def adopt_run(store: Store, run_id: int, attempt: int, old_engine_id: int | None, engine_id: int) -> bool:
    """Make `engine_id` the owner of a running attempt whose worker lives on its host (its previous engine is gone).
    Fenced by the attempt and the previous owner: False, and nothing changed, if the run moved on meanwhile."""
    with store.write() as connection:
        moved = connection.execute(
            update(RUNS).where(*_running_under(run_id, attempt), RUNS.c.engine_id.is_not_distinct_from(old_engine_id))
            .values(engine_id=engine_id)
        ).rowcount == 1
        if moved:
            log_event(connection, "adopted", f"attempt {attempt} by engine {engine_id}", run_id)
        return moved


def runs_to_check_on_host(store: Store, engine_id: int, host_id: str) -> list[dict]:
    """Running runs whose workers this engine must look for on its own host: those it owns (it supervises them
    unless it took them over) and those of other engines of `host_id` whose lease has run out (on the database's
    clock). A run of another engine of this host whose lease is live is not this engine's to judge."""
    expired = _lease_end() <= db_now_expr(store)
    with store.read() as connection:
        rows = connection.execute(
            select(RUNS).join(ENGINES, ENGINES.c.id == RUNS.c.engine_id)
            .where(RUNS.c.status == RunStatus.running.value,
                   (RUNS.c.engine_id == engine_id) | ((ENGINES.c.host_id == host_id) & expired))
        ).mappings()
        return [dict(row) for row in rows]


def reclaim_expired(store: Store, engine_id: int) -> list[tuple[int, str]]:
    """Runs left `running` by engines whose lease ran out, judged on the database's clock only, in ONE transaction:
    those engines are declared lost (their next renewal fails, engine_heartbeat), and each of their runs (and each
    running run whose engine row is gone) ends through the state machine like a run whose worker vanished: queued
    again while retries are left, else interrupted; the reason goes to its error and attempt_note. A run whose
    engine holds a live lease is never touched, whatever its worker's heartbeat says (a worker may take minutes to
    write its first one). `engine_id` is the caller, never judged. Returns (run id, new status) per run moved."""
    with store.write() as connection:
        clock = connection.execute(select(db_now_expr(connection))).scalar_one()
        lost = connection.execute(
            update(ENGINES).where(ENGINES.c.id != engine_id, ENGINES.c.stopped_at.is_(None), _lease_end() <= clock)
            .values(stopped_at=now()).returning(ENGINES.c.host, ENGINES.c.pid)
        ).all()
        for host, pid in lost:
            log_event(connection, "engine_lost", f"{host} pid {pid}: its lease ran out")
        owners = connection.execute(
            select(RUNS, ENGINES.c.host.label("engine_host"), ENGINES.c.pid.label("engine_pid"),
                   _lease_end().label("lease_end"))
            .select_from(RUNS.outerjoin(ENGINES, ENGINES.c.id == RUNS.c.engine_id))
            .where(RUNS.c.status == RunStatus.running.value, RUNS.c.engine_id.is_distinct_from(engine_id))
        ).mappings().all()
        moved = []
        for run in owners:
            if run["engine_pid"] is not None and run["lease_end"] > clock:
                continue  # its engine's lease is live: its run
            reason = _lease_lost_reason(run, clock)
            target, values, kind = _end_without_result(run, reason)
            values.setdefault("attempt_note", f"attempt {run['attempt']}: {reason}")
            if _move(connection, run["id"], target, Writer.engine, values, run["attempt"]):
                log_event(connection, kind, reason, run["id"])
                moved.append((run["id"], target.value))
        return moved


def _lease_lost_reason(run: Mapping, clock: float) -> str:
    if run["engine_pid"] is None:
        return "its engine is not in the store"
    return (f"engine {run['engine_host']} pid {run['engine_pid']} lost its lease "
            f"({clock - run['lease_end']:.0f} s ago on the database's clock)")


def replace_result_values(store: Store, run_id: int, rows: list[dict]) -> bool:
    """Set the value, rule and interval of some of a succeeded run's results ({"task", "metric", "value", "rule",
    and optionally "low", "high", "resamples"}), adding the rows it lacks, in one transaction (`clfbench
    rescore`); False, and nothing written, if the run is not succeeded (a running run's worker would write its
    own results over them)."""
    table = Result.__table__
    with store.write() as connection:
        status = connection.execute(select(Run.__table__.c.status).where(Run.__table__.c.id == run_id)).scalar()
        if status != RunStatus.succeeded.value:
            return False
        for row in rows:
            where = (table.c.run_id == run_id) & (table.c.task == row["task"]) & (table.c.metric == row["metric"])
            values = {"value": row["value"], "rule": row.get("rule"),
                      **{key: row[key] for key in ("low", "high", "resamples") if key in row}}
            if connection.execute(update(table).where(where).values(**values)).rowcount == 0:
                connection.execute(insert(table).values(run_id=run_id, task=row["task"], metric=row["metric"],
                                                        **values))
        log_event(connection, "rescored", f"{len(rows)} result(s)", run_id)
    return True
