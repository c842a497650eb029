"""The store: file safety, schema versioning, and queue operations that never lose or double-hand a run."""
from __future__ import annotations

import json
import math
import multiprocessing
import sqlite3
import stat
import time

import pytest
from sqlalchemy import text

from clfbench.storage import queries, queue
from clfbench.storage.db import SCHEMA_VERSION, StoreError, open_store


def new_run(**overrides) -> queue.NewRun:
    values = dict(method="encoder-finetune", model="tiny-bert", task="massive-intent", shots=0, seed=0,
                  spec_json="{}", spec_hash="h", launch="torchrun", gpus_requested=None, nproc=1)
    values.update(overrides)
    return queue.NewRun(**values)


@pytest.fixture
def sqlite_store(tmp_path, monkeypatch):
    """The default store: SQLite in the home (the tests of SQLite's own behaviour)."""
    monkeypatch.setenv("CLFBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CLFBENCH_DB", raising=False)
    return open_store()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path, monkeypatch):
    """The queue and the results queries on both backends: the default SQLite store, and a database of a real
    PostgreSQL server (the claim's FOR UPDATE SKIP LOCKED, the change counter's sequence, the dialect's SQL)."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_store")
    monkeypatch.setenv("CLFBENCH_HOME", str(tmp_path / "home"))
    server = request.getfixturevalue("postgres")
    return open_store(server.create_database(f"store_{tmp_path.name.lower().replace('-', '_')[-40:]}"))


def claim_cpu(s, host="h", engine_id=1):
    return queue.claim(s, host=host, engine_id=engine_id, default_gpus=0, free_gpus=0, cpu_free=True, api_free=True)


def test_default_store_is_private_wal_sqlite(sqlite_store, tmp_path):
    store = sqlite_store
    path = tmp_path / "home" / "clfbench.db"
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with store.read() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_missing_store_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(StoreError, match="store directory .*missing.* does not exist"):
        open_store(f"sqlite:///{tmp_path}/missing/x.db")
    assert not (tmp_path / "missing").exists()


def test_newer_schema_is_refused_and_left_alone(store):
    with store.write() as connection:
        connection.execute(text("UPDATE schema_info SET version = :v"), {"v": SCHEMA_VERSION + 1})
    queue.enqueue(store, [new_run()])  # write something to check it survives
    with pytest.raises(StoreError, match=f"schema v{SCHEMA_VERSION + 1} is newer"):
        open_store(store.url)
    with store.read() as connection:
        assert connection.execute(text("SELECT count(*) FROM runs")).scalar() == 1
        assert connection.execute(text("SELECT version FROM schema_info")).scalar() == SCHEMA_VERSION + 1


def test_foreign_database_is_refused(tmp_path):
    import sqlite3

    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE stuff (x)").connection.commit()
    with pytest.raises(StoreError, match="no clfbench schema version"):
        open_store(f"sqlite:///{path}")


def test_claim_order_priority_then_age(store):
    low, high, low2 = queue.enqueue(store, [new_run(), new_run(priority=5), new_run()])
    assert [claim_cpu(store)["id"] for _ in range(3)] == [high, low, low2]
    assert claim_cpu(store) is None


def test_claim_respects_gpu_fit_and_cpu_slot(store):
    two_gpus, cpu_only, default = queue.enqueue(
        store, [new_run(gpus_requested=2), new_run(gpus_requested=0), new_run(gpus_requested=None)]
    )
    # A GPU box with one free GPU and its CPU slot busy: only the default run (1 GPU) fits.
    run = queue.claim(store, host="h", engine_id=1, default_gpus=1, free_gpus=1, cpu_free=False, api_free=True)
    assert run["id"] == default
    run = queue.claim(store, host="h", engine_id=1, default_gpus=1, free_gpus=1, cpu_free=True, api_free=True)
    assert run["id"] == cpu_only
    assert queue.claim(store, host="h", engine_id=1, default_gpus=1, free_gpus=1, cpu_free=True, api_free=True) is None
    run = queue.claim(store, host="h", engine_id=1, default_gpus=1, free_gpus=2, cpu_free=True, api_free=True)
    assert run["id"] == two_gpus


def _claim_all(url: str, worker: int, results, ready, go) -> None:
    s = open_store(url)
    claimed = []
    ready.release()
    go.wait()  # start together, so the claims really race
    while True:
        run = queue.claim(s, host=f"host{worker}", engine_id=worker, default_gpus=0, free_gpus=0,
                          cpu_free=True, api_free=True)
        if run is None:
            break
        claimed.append(run["id"])
        # A real engine launches what it claimed before it claims again. Without this pause one process
        # could drain all 200 runs before the other three are scheduled on a 2-core machine (seen in CI).
        time.sleep(0.01)
    results.put((worker, claimed))


def test_four_processes_claim_200_runs_each_exactly_once(store):
    ids = queue.enqueue(store, [new_run(seed=i) for i in range(200)])
    context = multiprocessing.get_context("spawn")
    results, ready, go = context.Queue(), context.Semaphore(0), context.Event()
    processes = [context.Process(target=_claim_all, args=(store.url, w, results, ready, go)) for w in range(4)]
    for p in processes:
        p.start()
    for _ in processes:
        assert ready.acquire(timeout=60)
    go.set()
    claimed = dict(results.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=30)
        assert p.exitcode == 0
    every_claim = [run_id for worker_ids in claimed.values() for run_id in worker_ids]
    assert sorted(every_claim) == sorted(ids)  # each run once: none lost, none twice
    assert sum(1 for worker_ids in claimed.values() if worker_ids) >= 2  # they really competed
    runs = queries.list_runs(store)
    assert all(r["status"] == "running" and r["attempt"] == 1 for r in runs)
    owner = {run_id: w for w, worker_ids in claimed.items() for run_id in worker_ids}
    assert all(r["host"] == f"host{owner[r['id']]}" for r in runs)


def test_finish_is_atomic_and_guarded_by_attempt(store):
    (run_id,) = queue.enqueue(store, [new_run()])
    run = claim_cpu(store)
    prediction = dict(task="t", example_id="1", text="x", gold="a", predicted="b")
    # A writer from another attempt changes nothing.
    assert not queue.finish_succeeded(store, run_id, run["attempt"] + 1, [prediction], [])
    assert queries.predictions(store, run_id, "t") == []
    assert queries.get_run(store, run_id)["status"] == "running"
    # A failure inside the transaction leaves no partial predictions behind.
    bad_result = dict(task="t", metric="accuracy", value=None)  # NOT NULL violation
    with pytest.raises(Exception):
        queue.finish_succeeded(store, run_id, run["attempt"], [prediction], [bad_result])
    assert queries.predictions(store, run_id, "t") == []
    assert queries.get_run(store, run_id)["status"] == "running"
    assert queue.finish_succeeded(store, run_id, run["attempt"], [prediction],
                                  [dict(task="t", metric="accuracy", value=0.0)])
    assert queries.get_run(store, run_id)["status"] == "succeeded"
    assert len(queries.predictions(store, run_id, "t")) == 1


def test_dead_worker_is_requeued_until_the_retry_limit(store):
    (run_id,) = queue.enqueue(store, [new_run()])
    statuses = []
    for _ in range(3):
        run = claim_cpu(store)
        statuses.append(queue.mark_ended_without_result(store, run_id, run["attempt"], "worker killed by signal SIGKILL"))
    assert statuses == ["queued", "queued", "interrupted"]
    final = queries.get_run(store, run_id)
    assert final["attempt"] == 3 and "no retries left" in final["error"]
    assert queue.requeue(store, run_id)  # a user retry resets the budget
    assert queries.get_run(store, run_id)["interruptions"] == 0


def test_cancel_queued_at_once_and_running_by_request(store):
    queued_id, running_id = queue.enqueue(store, [new_run(priority=-1), new_run(priority=1)])
    run = claim_cpu(store)
    assert run["id"] == running_id
    assert queue.request_cancel(store, queued_id) == "cancelled"
    assert queue.request_cancel(store, running_id) == "requested"
    assert queries.get_run(store, running_id)["status"] == "running"
    assert queue.mark_ended_without_result(store, running_id, run["attempt"], "worker killed by signal SIGTERM") == "cancelled"
    assert queue.request_cancel(store, running_id) == "cancelled"  # nothing to do: reports its status
    with pytest.raises(KeyError):
        queue.request_cancel(store, 999)


def test_delete_refuses_running_runs(store):
    done_id, running_id = queue.enqueue(store, [new_run(priority=-1), new_run(priority=1)])
    claim_cpu(store)
    queue.request_cancel(store, done_id)
    queue.add_metric_points(store, done_id, 1, [(1, "train_loss", 1.0, 0.0)])
    assert not queue.delete_run(store, running_id)
    assert queue.delete_run(store, done_id)
    assert queries.get_run(store, done_id) is None
    assert queries.metric_series(store, done_id) == []


def test_results_matrix_aggregates_seeds_and_separates_multi_task(store):
    ids = queue.enqueue(store, [new_run(seed=0), new_run(seed=1), new_run(task="massive-intent+massive-slots")])
    values = {ids[0]: 0.8, ids[1]: 0.9, ids[2]: 0.7}
    for _ in ids:
        run = claim_cpu(store)
        results = [dict(task="massive-intent", metric="accuracy", value=values[run["id"]])]
        if "+" in run["task"]:
            results.append(dict(task="massive-slots", metric="slot_f1", value=0.6))
        queue.finish_succeeded(store, run["id"], run["attempt"], [], results)
    matrix = queries.results_matrix(store)
    row = ("tiny-bert", "encoder-finetune", 0, "")
    assert matrix.rows == [row]
    assert matrix.columns == ["massive-intent", "massive-intent (multi)", "massive-slots (multi)"]
    cell = matrix.cells[(row, "massive-intent")]
    assert cell.mean == pytest.approx(0.85) and cell.std == pytest.approx(0.0707, abs=1e-3)
    assert matrix.cells[(row, "massive-slots (multi)")].mean == pytest.approx(0.6)


def test_results_matrix_keeps_runs_with_different_options_apart(store):
    """Runs that differ in an option are different experiments: one row each, named by the differing option;
    runs that differ only in the seed share a row."""
    def spec(decision: str, seed: int) -> str:
        return json.dumps({"options": {"decision": decision, "batch_size": 8}, "seed": seed})

    runs = [new_run(method="prompt", seed=s, spec_json=spec(d, s)) for d, s in
            (("score", 0), ("score", 1), ("constrained", 0))]
    ids = queue.enqueue(store, runs)
    values = dict(zip(ids, (0.2, 0.3, 0.05)))
    for _ in ids:
        run = claim_cpu(store)
        queue.finish_succeeded(store, run["id"], run["attempt"], [],
                               [dict(task="massive-intent", metric="accuracy", value=values[run["id"]])])
    matrix = queries.results_matrix(store)
    score = ("tiny-bert", "prompt", 0, "decision=score")
    constrained = ("tiny-bert", "prompt", 0, "decision=constrained")
    assert matrix.rows == [score, constrained]
    assert matrix.cells[(score, "massive-intent")].values == [0.2, 0.3]
    assert matrix.cells[(constrained, "massive-intent")].values == [0.05]
    # A run on another task with other options never shares a cell with these: it joins the plain row.
    (other,) = queue.enqueue(store, [new_run(method="prompt", task="massive-slots",
                                             spec_json=json.dumps({"options": {"decision": "generate"}}))])
    run = claim_cpu(store)
    queue.finish_succeeded(store, run["id"], run["attempt"], [], [dict(task="massive-slots", metric="slot_f1", value=0.1)])
    matrix = queries.results_matrix(store)
    assert ("tiny-bert", "prompt", 0, "") in matrix.rows and len(matrix.rows) == 3


def test_results_matrix_ignores_options_that_only_change_execution(store):
    """Runs that differ only in how they ran (the prompt method's batch_size) are one experiment when the
    caller passes the catalog's execution-only options, as `clfbench results` and the TUI do."""
    from clfbench.engine.methods.catalog import execution_options

    def spec(decision: str, batch_size: int) -> str:
        return json.dumps({"options": {"decision": decision, "batch_size": batch_size}, "seed": 0})

    # seeds 0 and 1 of the score experiment (one seed run twice would count once)
    runs = [new_run(method="prompt", spec_json=spec(d, b), seed=k)
            for k, (d, b) in enumerate((("score", 8), ("score", 16), ("generate", 16)))]
    ids = queue.enqueue(store, runs)
    for _ in ids:
        run = claim_cpu(store)
        queue.finish_succeeded(store, run["id"], run["attempt"], [],
                               [dict(task="massive-intent", metric="accuracy", value=0.1)])
    assert "batch_size" in execution_options()["prompt"] and "batch_size" not in execution_options()["encoder-finetune"]
    assert len(queries.results_matrix(store).rows) == 3  # without: batch_size splits the score runs
    matrix = queries.results_matrix(store, ignore=execution_options())
    score = ("tiny-bert", "prompt", 0, "decision=score")
    assert matrix.rows == [score, ("tiny-bert", "prompt", 0, "decision=generate")]
    assert len(matrix.cells[(score, "massive-intent")].values) == 2


def test_an_option_added_later_does_not_split_old_runs_from_new_ones_at_its_default(store):
    """A run stored before `score_end` existed ran with what is now its default: the matrix puts it in one row
    with a new run that has score_end=true, and apart from one with score_end=false. A run's label leaves out
    an option at its default when the rest tells the run apart."""
    from clfbench.engine.methods.catalog import execution_options, option_defaults

    def spec(options: dict) -> str:
        return json.dumps({"options": {"decision": "score", **options}, "seed": 0})

    specs = [spec({}), spec({"score_end": True}), spec({"score_end": False})]
    specs.append(json.dumps({"options": {"decision": "constrained"}, "seed": 0}))
    ids = queue.enqueue(store, [new_run(method="prompt", spec_json=s, seed=k) for k, s in enumerate(specs)])
    for _ in ids:
        run = claim_cpu(store)
        queue.finish_succeeded(store, run["id"], run["attempt"], [],
                               [dict(task="massive-intent", metric="accuracy", value=0.1)])
    assert option_defaults()["prompt"]["score_end"] is True
    matrix = queries.results_matrix(store, ignore=execution_options(), defaults=option_defaults())
    with_end = ("tiny-bert", "prompt", 0, "decision=score score_end=true")
    without = ("tiny-bert", "prompt", 0, "decision=score score_end=false")
    # the constrained run's score_end is its default, and decision alone tells it apart: left out of its label
    constrained = ("tiny-bert", "prompt", 0, "decision=constrained")
    assert matrix.rows == [with_end, without, constrained]
    assert len(matrix.cells[(with_end, "massive-intent")].values) == 2


def test_a_version_1_store_migrates_in_place_keeping_its_runs_and_results(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    store = open_store(url)
    run_id, = queue.enqueue(store, [new_run(task="massive-intent")])
    run = claim_cpu(store)
    queue.finish_succeeded(store, run["id"], run["attempt"],
                           [dict(task="massive-intent", example_id="1", text="wake me up", gold="alarm_set",
                                 predicted="alarm_set")],
                           [dict(task="massive-intent", metric="accuracy", value=0.75)])
    store.engine.dispose()
    with sqlite3.connect(tmp_path / "old.db") as connection:  # the store as schema v1 left it
        connection.execute("ALTER TABLE runs DROP COLUMN tasks_json")
        connection.execute("ALTER TABLE results DROP COLUMN rule")
        for column in ("low", "high", "resamples"):
            connection.execute(f"ALTER TABLE results DROP COLUMN {column}")
        connection.execute("ALTER TABLE predictions DROP COLUMN confidence")
        for table, column in (("runs", "pin_host"), ("runs", "pin_gpu_type"), ("runs", "job_id"),
                              ("engines", "gpu_type"), ("engines", "launcher")):
            connection.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        connection.execute("DROP TABLE run_log")
        _make_metric_points_version_2(connection)
        connection.execute("UPDATE schema_info SET version = 1")
    with sqlite3.connect(tmp_path / "old.db") as connection:
        assert "tasks_json" not in {row[1] for row in connection.execute("PRAGMA table_info(runs)")}

    migrated = open_store(url)
    with migrated.read() as connection:
        assert connection.execute(text("SELECT version FROM schema_info")).scalar() == SCHEMA_VERSION == 7
    assert queries.get_run(migrated, run_id)["tasks_json"] is None
    assert queries.get_run(migrated, run_id)["pin_host"] is None  # v7: pins, job ids, logs in the store
    with migrated.read() as connection:
        assert connection.execute(text("SELECT COUNT(*) FROM run_log")).scalar() == 0
    assert queries.get_run(migrated, run_id)["status"] == "succeeded"
    assert queries.run_results(migrated, run_id) == {"massive-intent": {"accuracy": 0.75}}
    assert queries.run_result_rules(migrated, run_id) == {}
    assert [(p["predicted"], p["confidence"]) for p in queries.predictions(migrated, run_id, "massive-intent")] == \
        [("alarm_set", None)]  # stored before confidences: calibration says it has none
    # A run from before the migration and one after it, side by side: new rows carry the new columns.
    later, = queue.enqueue(migrated, [new_run(task="massive-slots", tasks_json="[]")])
    run = claim_cpu(migrated)
    queue.finish_succeeded(migrated, run["id"], run["attempt"],
                           [dict(task="massive-slots", example_id="1", text="wake me up", gold="O O",
                                 predicted="O O", confidence=0.875)],
                           [dict(task="massive-slots", metric="slot_f1", value=0.5, rule="massive"),
                            dict(task="massive-slots", metric="n", value=10.0)])
    assert queries.run_result_rules(migrated, later) == {"massive-slots": {"slot_f1": "massive"}}
    assert queries.predictions(migrated, later, "massive-slots")[0]["confidence"] == 0.875


def _identity_run(store, task: str, identity: str | None, value: float, run_task: str | None = None,
                  seed: int = 0) -> int:
    entries = None if identity is None else json.dumps([{"name": name, "identity": identity}
                                                        for name in (run_task or task).split("+")])
    run_id, = queue.enqueue(store, [new_run(task=run_task or task, tasks_json=entries, seed=seed)])
    run = claim_cpu(store)
    queue.finish_succeeded(store, run["id"], run["attempt"], [],
                           [dict(task=task, metric="slot_f1", value=value, rule="conlleval")])
    return run_id


def test_results_matrix_keeps_tasks_that_share_a_name_apart(store):
    old = _identity_run(store, "mytask", None, 0.1)  # queued before identities were recorded
    first = _identity_run(store, "mytask", "aaa", 0.2)
    seed = _identity_run(store, "mytask", "aaa", 0.4, seed=1)
    other = _identity_run(store, "mytask", "bbb", 0.9)
    multi = _identity_run(store, "mytask", "bbb", 0.5, run_task="mytask+intents")
    matrix = queries.results_matrix(store)
    row = ("tiny-bert", "encoder-finetune", 0, "")
    assert matrix.columns == ["mytask", "mytask (2)", "mytask (3)", "mytask (3) (multi)"]
    assert {column: cell.run_ids for (_, column), cell in matrix.cells.items()} == {
        "mytask": [old], "mytask (2)": [first, seed], "mytask (3)": [other], "mytask (3) (multi)": [multi]}
    assert matrix.cells[(row, "mytask (2)")].mean == pytest.approx(0.3)
    assert matrix.warnings == [
        f"task 'mytask' names 3 different task definitions/data: runs {old} (queued before task identities were "
        f"recorded) vs {first},{seed} vs {other},{multi}; shown as mytask, mytask (2) and mytask (3)"]
    assert matrix.column_tasks == {column: "mytask" for column in matrix.columns}
    assert matrix.rules == {column: {"conlleval"} for column in matrix.columns}


def _make_metric_points_version_2(connection) -> None:
    """metric_points as schema v1 and v2 made it: value NOT NULL, no nonfinite column."""
    connection.execute("DROP TABLE metric_points")
    connection.execute("CREATE TABLE metric_points (id INTEGER NOT NULL, run_id INTEGER NOT NULL, attempt INTEGER "
                       "NOT NULL, step INTEGER NOT NULL, name VARCHAR NOT NULL, value FLOAT NOT NULL, time FLOAT "
                       "NOT NULL, PRIMARY KEY (id), FOREIGN KEY(run_id) REFERENCES runs (id) ON DELETE CASCADE)")
    connection.execute("CREATE INDEX ix_metric_points_run_name_step ON metric_points (run_id, name, step)")


NONFINITE = [(1, "train_loss", 2.5, 1.0), (2, "train_loss", float("nan"), 2.0), (3, "lr", float("inf"), 3.0),
             (4, "lr", float("-inf"), 4.0)]


def _assert_nonfinite_points_read_back(store, run_id) -> None:
    values = [(p["step"], p["name"], p["value"]) for p in queries.metric_series(store, run_id)]
    assert values[0] == (1, "train_loss", 2.5)
    assert values[1][:2] == (2, "train_loss") and math.isnan(values[1][2])
    assert values[2:] == [(3, "lr", float("inf")), (4, "lr", float("-inf"))]


def test_nan_and_infinite_metric_points_are_stored_and_read_back(store):
    run_id, = queue.enqueue(store, [new_run()])
    run = claim_cpu(store)
    queue.add_metric_points(store, run_id, run["attempt"], NONFINITE)
    _assert_nonfinite_points_read_back(store, run_id)


def test_a_version_2_store_migrates_metric_points_to_take_nan_keeping_its_points(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    store = open_store(url)
    run_id, = queue.enqueue(store, [new_run()])
    run = claim_cpu(store)
    store.engine.dispose()
    with sqlite3.connect(tmp_path / "old.db") as connection:
        _make_metric_points_version_2(connection)
        connection.execute("INSERT INTO metric_points (run_id, attempt, step, name, value, time) "
                            "VALUES (?, 1, 1, 'train_loss', 2.5, 1.0)", (run_id,))
        connection.execute("UPDATE schema_info SET version = 2")
    migrated = open_store(url)
    queue.add_metric_points(migrated, run_id, run["attempt"], NONFINITE[1:])
    _assert_nonfinite_points_read_back(migrated, run_id)
    with sqlite3.connect(tmp_path / "old.db") as connection:
        assert connection.execute("SELECT version FROM schema_info").fetchone()[0] == SCHEMA_VERSION
        indexes = {row[1] for row in connection.execute("PRAGMA index_list(metric_points)")}
        assert "ix_metric_points_run_name_step" in indexes


def test_opening_a_current_store_takes_no_write_lock(sqlite_store):
    store = sqlite_store
    """Another connection holds SQLite's write lock; opening the store and reading it neither waits nor fails."""
    holder = sqlite3.connect(store.engine.url.database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        opened = open_store(store.url)
        assert queries.list_runs(opened) == []
        assert time.monotonic() - started < 2  # the busy timeout is 30 s: no wait for the lock at all
    finally:
        holder.execute("ROLLBACK")
        holder.close()
