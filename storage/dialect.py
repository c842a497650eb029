"""Every piece of dialect-specific SQL and connection setup, in one place so the store ports.

SQLite (default): WAL, synchronous=NORMAL, a busy timeout, foreign keys, and write transactions opened
with BEGIN IMMEDIATE (the write lock is taken up front, so two writers wait for each other through the
busy timeout instead of failing with SQLITE_BUSY_SNAPSHOT when a read turns into a write).
PostgreSQL: row locks; the claim's subquery uses FOR UPDATE SKIP LOCKED so engines never block on
or double-claim the same row.
"""
from __future__ import annotations

import sqlite3

from sqlalchemy import event
from sqlalchemy.engine import Engine

SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def configure_engine(engine: Engine) -> None:
    """Install per-connection setup. Called once per SQLAlchemy engine."""
    if not is_sqlite(engine):
        return

    @event.listens_for(engine, "connect")
    def _sqlite_on_connect(dbapi_connection, _record):
        # Take over transaction control from Python's sqlite3 module so BEGIN IMMEDIATE is possible.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_on_begin(connection):
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def write_execution_options(engine: Engine) -> dict:
    """Execution options for a connection that is going to write."""
    return {"sqlite_begin": "IMMEDIATE"} if is_sqlite(engine) else {}


def claim_sql(engine: Engine, source: str, target: str) -> str:
    """One statement that moves the best claimable run in status `source` (queued) to status `target` (running)
    and returns its id. The statuses come from the run state machine (storage.states), never from a user.

    Parameters: host, engine_id, now, default_gpus (what a run with no GPU count asks for on this box),
    free_gpus, cpu_free (1 if a CPU slot is free), api_free (1 if an API slot is free), gpu_type (the claiming
    engine's GPU name, lower case; '' without GPUs), pins_anywhere (1: claim pinned runs whatever the host and GPU
    type, for a launcher that passes the pins on to its scheduler).
    """
    lock = "" if is_sqlite(engine) else " FOR UPDATE SKIP LOCKED"
    return f"""
        UPDATE runs
        SET status = '{target}', attempt = attempt + 1, host = :host, engine_id = :engine_id,
            started_at = :now, heartbeat_at = :now, finished_at = NULL, error = NULL, pid = NULL,
            gpus_assigned = NULL, progress_step = NULL, progress_total = NULL, job_id = NULL
        WHERE status = '{source}' AND id = (
            SELECT id FROM runs
            WHERE status = '{source}' AND (
                (launch = 'process' AND :api_free = 1)
                OR (launch = 'torchrun'
                    AND COALESCE(gpus_requested, :default_gpus) <= :free_gpus
                    AND (COALESCE(gpus_requested, :default_gpus) >= 1 OR :cpu_free = 1))
            )
            AND (:pins_anywhere = 1 OR (
                (pin_host IS NULL OR pin_host = :host)
                AND (pin_gpu_type IS NULL OR (:gpu_type <> '' AND :gpu_type LIKE '%' || LOWER(pin_gpu_type) || '%'))
            ))
            ORDER BY priority DESC, id
            LIMIT 1{lock}
        )
        RETURNING id
    """


def db_now_sql(engine: Engine) -> str:
    """An SQL expression for the database server's clock, in float seconds since the epoch.

    Engine leases are set and judged with it and never with a host's clock: two hosts' clocks may disagree by
    minutes, the database has one clock. SQLite's `unixepoch('subsec')` needs SQLite 3.42; julianday works on every
    version with millisecond resolution. On PostgreSQL, clock_timestamp() (not now(), which is the transaction's
    start) so a long transaction does not see time stand still.
    """
    if not is_sqlite(engine):
        return "extract(epoch from clock_timestamp())"
    if sqlite3.sqlite_version_info >= (3, 42, 0):  # the library pysqlite is linked against, which SQLAlchemy uses
        return "unixepoch('subsec')"
    return "((julianday('now') - 2440587.5) * 86400.0)"


def host_lock_sql(engine: Engine) -> str | None:
    """A lock held until the transaction ends, keyed by the text parameter :key (PostgreSQL: an advisory
    transaction lock), or None on SQLite, where a write transaction already excludes every other writer."""
    if is_sqlite(engine):
        return None
    return "SELECT pg_advisory_xact_lock(hashtext(:key))"
