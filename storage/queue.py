"""Queue operations: enqueue, claim (one atomic statement), heartbeat, finish, cancel, requeue; engine rows.

Every write to a run is guarded by the statuses it may start from, which `storage.states` gives for the
status it writes and who writes it (`WHERE status IN (...) AND attempt = :attempt`), so a late writer (a
worker from an earlier attempt, an engine that lost a race) changes nothing.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import bindparam, cast, delete, exists, insert, literal, select, text, update
from sqlalchemy.engine import Connection

from clfbench.storage import dialect
from clfbench.storage.db import Store, now
from clfbench.storage.models import (EngineRow, Event, MetricPoint, PredictionRow, Result, Run, RunStatus,
                                     metric_value_columns)
from clfbench.storage.states import DELETABLE, ENDED_WITH_ERROR, Writer, allowed, kept_by, sources

RUNS = Run.__table__
EVENTS = Event.__table__
ENGINES = EngineRow.__table__


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
) -> dict | None:
    """Atomically move the best claimable queued run to running. Returns the run row, or None."""
    (source,) = sources(RunStatus.running, Writer.engine)  # one statement: one status it claims from
    with store.write() as connection:
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
            },
        ).first()
        if row is None:
            return None
        run = connection.execute(select(RUNS).where(RUNS.c.id == row[0])).mappings().one()
        log_event(connection, "claimed", f"attempt {run['attempt']} on {host}", run["id"])
        return dict(run)


def set_launched(store: Store, run_id: int, attempt: int, *, pid: int, gpus_assigned: str,
                 log_path: str, output_dir: str) -> None:
    with store.write() as connection:
        launch = {"pid": pid, "gpus_assigned": gpus_assigned, "log_path": log_path, "output_dir": output_dir,
                  "heartbeat_at": now()}
        _write_fields(connection, run_id, Writer.engine, launch, attempt)
        log_event(connection, "launched", f"pid {pid} gpus [{gpus_assigned}]", run_id)


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
    attempt): each INSERT ... SELECT writes its row only while the run is `running` under `attempt`, so a worker
    whose run was cancelled or re-claimed writes nothing. Returns whether the batch was written (an empty batch
    of a run that is still ours counts as written). A NaN or infinite value is stored as NULL plus its name in
    `nonfinite` (storage.models.metric_value_columns)."""
    rows = []
    for step, name, value, t in points:
        stored, nonfinite = metric_value_columns(float(value))
        rows.append({"step": step, "name": name, "value": stored, "nonfinite": nonfinite, "time": t})
    with store.write() as connection:
        # The run's row is read first (FOR SHARE on PostgreSQL: a requeue/claim waits until this batch commits;
        # SQLite's write transaction already excludes every other writer), so a batch is written whole or not at
        # all, and the answer is known without a backend's executemany rowcount.
        ours = connection.execute(select(RUNS.c.id).where(*_running_under(run_id, attempt))
                                  .with_for_update(read=True)).first() is not None
        if ours and rows:
            connection.execute(_fenced_point_insert(run_id, attempt), rows)
        return ours


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
        connection.execute(insert(Result.__table__), [{"run_id": run_id, "rule": None, **r} for r in results])
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
        for table in (MetricPoint.__table__, PredictionRow.__table__, Result.__table__):
            connection.execute(delete(table).where(table.c.run_id == run_id))
        connection.execute(delete(RUNS).where(RUNS.c.id == run_id))
        log_event(connection, "deleted", "", run_id)
        return True


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

def register_engine(store: Store, host: str, pid: int, gpus: list[int]) -> int:
    """Record an engine that starts on this store; returns its id."""
    gpu_list = ",".join(map(str, gpus))
    with store.write() as connection:
        engine_id = connection.execute(
            insert(ENGINES).values(host=host, pid=pid, started_at=now(), heartbeat_at=now(), gpus=gpu_list)
            .returning(ENGINES.c.id)
        ).scalar_one()
        log_event(connection, "engine_started", f"{host} pid {pid} gpus [{gpu_list}]")
    return engine_id


def engine_heartbeat(store: Store, engine_id: int) -> None:
    with store.write() as connection:
        connection.execute(update(ENGINES).where(ENGINES.c.id == engine_id).values(heartbeat_at=now()))


def unregister_engine(store: Store, engine_id: int, pid: int) -> None:
    with store.write() as connection:
        connection.execute(update(ENGINES).where(ENGINES.c.id == engine_id).values(stopped_at=now()))
        log_event(connection, "engine_stopped", f"pid {pid}")


def replace_result_values(store: Store, run_id: int, rows: list[dict]) -> bool:
    """Set the value and rule of some of a succeeded run's results ({"task", "metric", "value", "rule"}), adding
    the rows it lacks, in one transaction (`clfbench rescore`); False, and nothing written, if the run is not
    succeeded (a running run's worker would write its own results over them)."""
    table = Result.__table__
    with store.write() as connection:
        status = connection.execute(select(Run.__table__.c.status).where(Run.__table__.c.id == run_id)).scalar()
        if status != RunStatus.succeeded.value:
            return False
        for row in rows:
            where = (table.c.run_id == run_id) & (table.c.task == row["task"]) & (table.c.metric == row["metric"])
            values = {"value": row["value"], "rule": row.get("rule")}
            if connection.execute(update(table).where(where).values(**values)).rowcount == 0:
                connection.execute(insert(table).values(run_id=run_id, task=row["task"], metric=row["metric"],
                                                        **values))
        log_event(connection, "rescored", f"{len(rows)} result(s)", run_id)
    return True
