"""The persistent contract: SQLModel tables for runs, metric points, predictions, results, events, engines.

Times are float seconds since the epoch (UTC): portable across SQLite and PostgreSQL, cheap to compare,
and easy to freeze in tests.
"""
from __future__ import annotations

import math
from enum import Enum

from sqlalchemy import Index, UniqueConstraint
from sqlmodel import Field, SQLModel


class RunStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"  # the method raised: retrying the same spec would fail the same way
    cancelled = "cancelled"  # a user asked
    interrupted = "interrupted"  # the worker or its engine died; requeued while retries are left


TERMINAL_STATUSES = (RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled, RunStatus.interrupted)


class Run(SQLModel, table=True):
    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_status_priority", "status", "priority", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str | None = None
    # Denormalised from the spec so lists and the results matrix need no JSON parsing.
    method: str = Field(index=True)
    model: str
    task: str  # "a" or "a+b" for one multi-task run
    shots: int = 0
    seed: int = 0
    spec_json: str
    spec_hash: str = Field(index=True)
    # The run's tasks frozen at queue time (engine.tasks.identity): definition, source, data files and their
    # sha256, identity. NULL for runs queued before schema v2.
    tasks_json: str | None = None
    code_version: str = ""
    status: str = Field(default=RunStatus.queued.value)
    priority: int = 0
    launch: str = "torchrun"  # "torchrun" or "process" (API-only: no GPU, no torchrun)
    gpus_requested: int | None = None  # None: 1 on a GPU box, CPU otherwise
    nproc: int = 1
    gpus_assigned: str | None = None  # e.g. "0,1"
    attempt: int = 0  # how many times an engine has claimed it
    interruptions: int = 0  # automatic requeues so far (bounded by max_interruptions)
    max_interruptions: int = 2
    host: str | None = None
    engine_id: int | None = None
    pid: int | None = None  # process-group leader (torchrun or the worker)
    heartbeat_at: float | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    error: str | None = None
    log_path: str | None = None
    output_dir: str | None = None
    progress_step: int | None = None
    progress_total: int | None = None
    # Schema v4. What the worker is doing now ("loading model", "converting", "training", "evaluating on dev",
    # "testing", "writing results") and its progress within that phase; progress_step/total stay the training
    # steps, so the ETA can add evaluation to training.
    phase: str | None = None
    phase_step: int | None = None
    phase_total: int | None = None
    # Why the last attempt ended or the run was requeued ("worker killed by SIGKILL; attempt 2 resumed from step
    # 300"), shown in the list and the detail.
    attempt_note: str | None = None
    # A store-wide counter bumped by a trigger on every insert or update of a row (schema v4), so a list reads
    # only the rows changed since the version it last saw instead of every row on every tick.
    change_seq: int | None = Field(default=None, index=True)
    # Schema v7. Pins set at queue time (the spec's `host:` and `gpu_type:`): only an engine on that host, or one
    # whose GPUs' name contains gpu_type, claims the run. job_id: the batch scheduler's id of the attempt's job
    # (Slurm's), where a launcher other than the local one runs it; NULL for local runs.
    pin_host: str | None = None
    pin_gpu_type: str | None = None
    job_id: str | None = None


class MetricPoint(SQLModel, table=True):
    __tablename__ = "metric_points"
    __table_args__ = (Index("ix_metric_points_run_name_step", "run_id", "name", "step"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", ondelete="CASCADE")
    attempt: int = 1
    step: int
    name: str
    value: float | None  # None where `nonfinite` names the value (every backend stores a NaN the same way)
    time: float
    nonfinite: str | None = None  # "nan", "inf" or "-inf"; None for a finite value (schema v3)


def metric_value_columns(value: float) -> tuple[float | None, str | None]:
    """(value, nonfinite) as metric_points stores them: NaN and the infinities as NULL plus their name."""
    if math.isfinite(value):
        return value, None
    return None, "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def metric_value(value: float | None, nonfinite: str | None) -> float:
    """The float a stored point stands for (the inverse of metric_value_columns)."""
    return float(nonfinite) if nonfinite else (float("nan") if value is None else value)


class PredictionRow(SQLModel, table=True):
    __tablename__ = "predictions"
    __table_args__ = (Index("ix_predictions_run_task", "run_id", "task"),
                      Index("ix_predictions_task_example", "task", "example_id"))

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", ondelete="CASCADE")
    task: str
    example_id: str
    text: str
    gold: str  # token tasks: tags joined by spaces
    predicted: str | None  # None: the output could not be parsed
    raw_output: str | None = None
    parse_status: str = "ok"
    confidence: float | None = None  # the probability the method gave its answer, where it has one


class Result(SQLModel, table=True):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("run_id", "task", "metric"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", ondelete="CASCADE", index=True)
    task: str
    metric: str
    value: float
    rule: str | None = None  # the rule the metric was computed under (e.g. slot F1's "massive"); NULL: none named
    # Schema v5: the 95% percentile bootstrap interval over test examples (engine.stats) and its resample count;
    # NULL where none was computed (results stored before v5, metrics that are no share of examples: n, times).
    low: float | None = None
    high: float | None = None
    resamples: int | None = None


class Event(SQLModel, table=True):
    __tablename__ = "events"

    id: int | None = Field(default=None, primary_key=True)
    time: float
    run_id: int | None = Field(default=None, index=True)
    kind: str  # claimed, launched, finished, cancelled, interrupted, requeued, engine_started, ...
    message: str = ""


class EngineRow(SQLModel, table=True):
    """One row per engine process that ever ran on this store (host + pid), for status and reconciliation."""

    __tablename__ = "engines"

    id: int | None = Field(default=None, primary_key=True)
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    stopped_at: float | None = None
    gpus: str = ""  # GPUs it manages, e.g. "0,1"; "" on a CPU box
    # Schema v4. identity: a uuid per engine process; host_id: the host's identity (hostname + machine id + boot
    # id, so cloned images and reboots differ); lease_until: the lease's end on the database's clock, renewed by
    # the engine's heartbeat. A run is reclaimable only when its engine's lease has expired.
    identity: str | None = None
    host_id: str | None = None
    lease_until: float | None = None
    # Schema v7. gpu_type: the name of its GPUs as the driver reports it ("NVIDIA H100 80GB HBM3"; "" without);
    # launcher: "local" (runs its workers itself) or "slurm" (submits each run as a job).
    gpu_type: str | None = None
    launcher: str | None = None


class RunLogChunk(SQLModel, table=True):
    """A run's log as its engine read it from the log file, in order (schema v7), so every host can show it: the
    engine appends what the file grew by, in whole lines, and keeps the newest `storage.queue.log_keep_bytes()` per run
    (older chunks are dropped and the oldest kept one says so). The file on the running host keeps every line."""

    __tablename__ = "run_log"
    __table_args__ = (Index("ix_run_log_run_id", "run_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = Field(foreign_key="runs.id", ondelete="CASCADE")
    attempt: int
    time: float
    text: str
    file_end: int  # the byte offset in the log file on the running host where this chunk ends


class SchemaInfo(SQLModel, table=True):
    """The schema version of this store (a table, not PRAGMA user_version, so PostgreSQL works the same)."""

    __tablename__ = "schema_info"

    id: int = Field(default=1, primary_key=True)
    version: int
    store_id: str | None = None  # schema v7: a uuid naming the store whatever URL reaches it
