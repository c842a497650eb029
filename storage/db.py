"""Opening a store: where it lives, connection setup, schema versioning with ordered migrations.

The default store is SQLite at $CLFBENCH_HOME/clfbench.db (CLFBENCH_HOME defaults to ~/.clfbench).
`--db URL` or CLFBENCH_DB overrides it with any SQLAlchemy URL (e.g. postgresql+psycopg://...).
"""
from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlmodel import SQLModel

from clfbench.storage import dialect, paths
from clfbench.storage import models  # noqa: F401  (registers the tables on SQLModel.metadata)


class StoreError(Exception):
    """A one-line, user-facing problem with the store."""


def default_url() -> str:
    return f"sqlite:///{paths.default_store_file()}"


def resolve_url(explicit: str | None = None) -> str:
    """--db, else CLFBENCH_DB, else the SQLite file in the clfbench home."""
    return explicit or os.environ.get("CLFBENCH_DB") or default_url()


def _prepare_sqlite_file(url: str) -> None:
    """Create the database file with mode 0600 (runs may hold private data) in an existing folder.

    The default home is created (mode 0700); any other missing folder is an error, not a surprise mkdir.
    """
    database = make_url(url).database
    if not database or database == ":memory:":
        return
    path = Path(database).expanduser()
    folder = path.parent
    if not folder.exists():
        if folder.resolve() == paths.home().resolve():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            raise StoreError(f"store directory {folder} does not exist")
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


# Ordered migrations: MIGRATIONS[i] brings a store from version i to i + 1. Never edit a released one;
# append a new function (ALTER TABLE ...) and the version follows.
def _migration_1_initial(connection: Connection) -> None:
    SQLModel.metadata.create_all(connection)


def _add_column(connection: Connection, table: str, column: str, sql_type: str) -> None:
    """ALTER TABLE ... ADD COLUMN, skipped when the column is there: migration 1 creates the tables from today's
    models, so a store made fresh already has every column a later migration adds."""
    if column not in {c["name"] for c in inspect(connection).get_columns(table)}:
        connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))


def _migration_2_task_identity(connection: Connection) -> None:
    """Runs keep their tasks frozen at queue time (runs.tasks_json); results name their metric's rule, and the
    slot rows stored before say the rule they were computed under (`clfbench rescore` recomputes them under
    their task's rule, e.g. built-in massive-slots' official one)."""
    _add_column(connection, "runs", "tasks_json", "TEXT")
    _add_column(connection, "results", "rule", "TEXT")
    # Before version 2 every slot score was computed one way, seqeval's default mode on the tags as predicted and
    # exact match on those tags: what "conlleval" computes. The names are written out, not imported from
    # engine.metrics: a migration must do the same thing forever, whatever later code calls its metrics.
    connection.execute(text("UPDATE results SET rule = 'conlleval' WHERE rule IS NULL AND metric IN "
                            "('slot_f1', 'slot_precision', 'slot_recall', 'exact_match')"))


def _migration_3_nonfinite_metrics(connection: Connection) -> None:
    """metric_points.value becomes nullable and metric_points.nonfinite says 'nan', 'inf' or '-inf' where the value
    is not a finite number: SQLite stores a NaN as NULL (the NOT NULL column refused it and the batch was lost)
    while PostgreSQL stores NaN itself, so every backend now stores NULL plus the word, and reads get the float
    back (storage.queries.metric_series)."""
    _add_column(connection, "metric_points", "nonfinite", "VARCHAR")
    value = next(c for c in inspect(connection).get_columns("metric_points") if c["name"] == "value")
    if value["nullable"]:  # a store made fresh from today's models
        return
    if connection.dialect.name != "sqlite":
        connection.execute(text("ALTER TABLE metric_points ALTER COLUMN value DROP NOT NULL"))
        return
    # SQLite cannot drop NOT NULL in place: rebuild the table (nothing references metric_points), written out
    # here rather than taken from the model so the migration does the same thing forever.
    connection.execute(text("DROP INDEX IF EXISTS ix_metric_points_run_name_step"))
    connection.execute(text("ALTER TABLE metric_points RENAME TO metric_points_v2"))
    connection.execute(text(
        "CREATE TABLE metric_points (id INTEGER NOT NULL, run_id INTEGER NOT NULL, attempt INTEGER NOT NULL, "
        "step INTEGER NOT NULL, name VARCHAR NOT NULL, value FLOAT, time FLOAT NOT NULL, nonfinite VARCHAR, "
        "PRIMARY KEY (id), FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE)"))
    connection.execute(text("INSERT INTO metric_points (id, run_id, attempt, step, name, value, time, nonfinite) "
                            "SELECT id, run_id, attempt, step, name, value, time, nonfinite FROM metric_points_v2"))
    connection.execute(text("DROP TABLE metric_points_v2"))
    connection.execute(text("CREATE INDEX ix_metric_points_run_name_step ON metric_points (run_id, name, step)"))


def _migration_4_phases_changes_leases(connection: Connection) -> None:
    """Runs say their phase and the reason their last attempt ended; every insert or update of a run bumps a
    store-wide change counter (a trigger, so no write path can forget it) that lists read incrementally; engines
    get an identity, a host identity and a lease on the database's clock."""
    for column, sql_type in (("phase", "VARCHAR"), ("phase_step", "INTEGER"), ("phase_total", "INTEGER"),
                             ("attempt_note", "VARCHAR"), ("change_seq", "INTEGER")):
        _add_column(connection, "runs", column, sql_type)
    for column, sql_type in (("identity", "VARCHAR"), ("host_id", "VARCHAR"), ("lease_until", "FLOAT")):
        _add_column(connection, "engines", column, sql_type)
    connection.execute(text("CREATE INDEX IF NOT EXISTS ix_runs_change_seq ON runs (change_seq)"))
    if connection.dialect.name == "sqlite":
        # Writes are serialised by the write lock, so MAX + 1 (an index lookup) is a strict order. The WHEN clause
        # keeps the trigger's own UPDATE from firing it again.
        for when, action in (("INSERT", ""), ("UPDATE", "WHEN NEW.change_seq IS OLD.change_seq ")):
            connection.execute(text(
                f"CREATE TRIGGER IF NOT EXISTS runs_change_seq_{when.lower()} AFTER {when} ON runs {action}"
                "BEGIN UPDATE runs SET change_seq = (SELECT COALESCE(MAX(change_seq), 0) + 1 FROM runs) "
                "WHERE id = NEW.id; END"))
    else:
        # A sequence orders by start, not by commit: readers re-read a margin below the last value they saw.
        connection.execute(text("CREATE SEQUENCE IF NOT EXISTS runs_change_seq"))
        connection.execute(text(
            "CREATE OR REPLACE FUNCTION runs_bump_change_seq() RETURNS trigger AS $$ "
            "BEGIN NEW.change_seq := nextval('runs_change_seq'); RETURN NEW; END $$ LANGUAGE plpgsql"))
        connection.execute(text("DROP TRIGGER IF EXISTS runs_change_seq ON runs"))
        connection.execute(text("CREATE TRIGGER runs_change_seq BEFORE INSERT OR UPDATE ON runs "
                                "FOR EACH ROW EXECUTE FUNCTION runs_bump_change_seq()"))
    connection.execute(text("UPDATE runs SET change_seq = id WHERE change_seq IS NULL"))


def _migration_5_result_intervals(connection: Connection) -> None:
    """A result carries its 95% bootstrap interval over test examples and the number of resamples behind it (NULL
    for results stored before: `clfbench rescore` computes them from the run's stored predictions)."""
    for column, sql_type in (("low", "FLOAT"), ("high", "FLOAT"), ("resamples", "INTEGER")):
        _add_column(connection, "results", column, sql_type)


def _migration_6_prediction_confidence(connection: Connection) -> None:
    """A prediction carries the probability the method gave its answer, where it has one (calibration: ECE and the
    reliability diagram); NULL for predictions stored before and for methods without probabilities."""
    _add_column(connection, "predictions", "confidence", "FLOAT")


def _migration_7_hosts_logs_jobs(connection: Connection) -> None:
    """Several hosts on one store: runs may be pinned to a host or a GPU type and remember their batch job's id
    (Slurm); engines say their GPUs' type and their launcher; run logs live in the store (run_log), so any host
    shows any run's log. The table is written out here, not taken from the model, so the migration stays the same."""
    for column, sql_type in (("pin_host", "VARCHAR"), ("pin_gpu_type", "VARCHAR"), ("job_id", "VARCHAR")):
        _add_column(connection, "runs", column, sql_type)
    for column, sql_type in (("gpu_type", "VARCHAR"), ("launcher", "VARCHAR")):
        _add_column(connection, "engines", column, sql_type)
    # The store's own id, whatever URL reaches it (hosts may name the server differently): run folders in a shared
    # artifact place are named by it (storage.paths.run_dir). `migrate` sets it.
    _add_column(connection, "schema_info", "store_id", "VARCHAR")
    key = "SERIAL" if connection.dialect.name == "postgresql" else "INTEGER"
    connection.execute(text(
        f"CREATE TABLE IF NOT EXISTS run_log (id {key} NOT NULL, run_id INTEGER NOT NULL, attempt INTEGER NOT NULL, "
        "time FLOAT NOT NULL, text VARCHAR NOT NULL, file_end INTEGER NOT NULL, PRIMARY KEY (id), "
        "FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE)"))
    connection.execute(text("CREATE INDEX IF NOT EXISTS ix_run_log_run_id ON run_log (run_id, id)"))


MIGRATIONS: list[Callable[[Connection], None]] = [_migration_1_initial, _migration_2_task_identity,
                                                  _migration_3_nonfinite_metrics, _migration_4_phases_changes_leases,
                                                  _migration_5_result_intervals, _migration_6_prediction_confidence,
                                                  _migration_7_hosts_logs_jobs]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class Store:
    url: str
    engine: Engine

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite): commits on success, rolls back on error."""
        with self.engine.connect() as connection:
            connection = connection.execution_options(**dialect.write_execution_options(self.engine))
            with connection.begin():
                yield connection

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            with connection.begin():
                yield connection

    @property
    def is_sqlite(self) -> bool:
        return dialect.is_sqlite(self.engine)

    def describe(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def label(self) -> str:
        """A short name for the store: the file name of a SQLite store, else the URL without password."""
        url = make_url(self.url)
        if url.get_backend_name() == "sqlite" and url.database:
            return Path(url.database).name
        return self.describe()


def _schema_version(connection: Connection) -> int:
    if not inspect(connection).has_table("schema_info"):
        # A store with tables but no version table was not made by clfbench.
        if inspect(connection).get_table_names():
            raise StoreError("the database has tables but no clfbench schema version; refusing to touch it")
        return 0
    row = connection.execute(text("SELECT version FROM schema_info WHERE id = 1")).first()
    return int(row[0]) if row else 0


def _refuse_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(f"store schema v{version} is newer than this clfbench (v{SCHEMA_VERSION}); upgrade clfbench")


def migrate(store: Store) -> None:
    """Bring the schema to SCHEMA_VERSION; refuse a store written by a newer clfbench.

    The version is read first in a plain read transaction: opening a current store (every command, the TUI, each
    worker) must not take SQLite's write lock, or a reader waits behind every ingest batch and fails with
    "database is locked" behind a long one. Only a store that is behind opens a write transaction, and reads the
    version again inside it: two processes that both saw it behind migrate once, the second finds it current."""
    with store.read() as connection:
        version = _schema_version(connection)
    _refuse_newer(version)
    if version == SCHEMA_VERSION:
        return
    with store.write() as connection:
        version = _schema_version(connection)
        _refuse_newer(version)
        for index in range(version, SCHEMA_VERSION):
            MIGRATIONS[index](connection)
        if version != SCHEMA_VERSION:
            # The store's id (v7) survives every later migration; a store gets one when it first reaches v7.
            store_id = connection.execute(text("SELECT store_id FROM schema_info WHERE id = 1")).scalar()
            connection.execute(text("DELETE FROM schema_info"))
            connection.execute(text("INSERT INTO schema_info (id, version, store_id) VALUES (1, :v, :sid)"),
                               {"v": SCHEMA_VERSION, "sid": store_id or uuid.uuid4().hex})


def _create_engine(url: str) -> Engine:
    """The SQLAlchemy engine for `url`; a driver that SQLAlchemy does not know or that is not installed is a one-line
    StoreError naming it (create_engine imports the driver, so this is where it fails)."""
    parsed = make_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            return create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        return create_engine(url, pool_pre_ping=True)
    except NoSuchModuleError:
        raise StoreError(f"no database driver '{parsed.drivername}' for {parsed.render_as_string(hide_password=True)} "
                         f"(SQLAlchemy knows no such dialect or driver)") from None
    except ImportError as error:
        raise StoreError(f"the database driver for {parsed.drivername}:// is not installed: {error} "
                         f"(pip install the package that provides it)") from None


def store_failure(error: BaseException) -> str | None:
    """One line for an error the database raised through SQLAlchemy (a read-only file, a full disk, a lost server),
    or None for any other exception (a bug keeps its traceback). The command line prints it instead of a
    traceback; the driver's own message is kept, it names the problem."""
    if isinstance(error, DBAPIError) and error.orig is not None:
        message = str(error.orig)
    elif isinstance(error, SQLAlchemyError):
        message = str(error)
    else:
        return None
    lines = message.strip().splitlines()
    first = lines[0] if lines else type(error).__name__
    hint = {"attempt to write a readonly database": " (the store file or its folder is read-only)",
            "database or disk is full": " (free space where the store lives; finished runs are kept)"}
    return f"store failed: {first}{hint.get(first, '')}"


def open_store(url: str | None = None, create: bool = True) -> Store:
    """Open (and migrate) the store. Raises StoreError with one line on any problem."""
    url = resolve_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"not a database URL: {url}") from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if not create and database and not Path(database).exists():
            raise StoreError(f"no store at {database}")
        _prepare_sqlite_file(url)
    engine = _create_engine(url)
    dialect.configure_engine(engine)
    store = Store(url=url, engine=engine)
    try:
        migrate(store)
    except StoreError:
        engine.dispose()
        raise
    except Exception as error:  # a driver error: say which store and why, in one line
        engine.dispose()
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StoreError(f"cannot open store {store.describe()}: {first_line}") from None
    return store


def now() -> float:
    return time.time()


def seconds_from_env(name: str, default: float, zero_allowed: bool) -> float:
    """A duration setting from the environment (finite seconds, > 0 or >= 0); unset: `default`. A bad value is a
    one-line StoreError naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 <= value if zero_allowed else 0 < value) or value == float("inf"):
        raise StoreError(f"{name} must be a number of seconds {'>=' if zero_allowed else '>'} 0, not {raw!r}")
    return value
