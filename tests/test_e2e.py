"""End to end through the real CLI: queue → engine → torchrun worker → store → results.

Tiny random models on the shipped samples keep these fast; what is checked is what a user sees.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from clfbench.storage.db import open_store
from tests.conftest import SAMPLES

TINY = ["--method", "encoder-finetune", "--model", "tiny-bert", "--data-dir", str(SAMPLES)]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def snapshot(store, exclude_run: int) -> dict:
    """Every row of every table except what belongs to `exclude_run` (and the engine/event logs)."""
    tables = {"runs": "id", "metric_points": "run_id", "predictions": "run_id", "results": "run_id"}
    out = {}
    with store.read() as connection:
        for table, column in tables.items():
            rows = connection.execute(text(f"SELECT * FROM {table} WHERE {column} != :r ORDER BY id"),
                                      {"r": exclude_run}).all()
            out[table] = [tuple(row) for row in rows]
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_queue_run_results_errors(cli, backend, request, tmp_path, monkeypatch):
    if backend == "postgresql":  # the whole path on a real PostgreSQL server: queue, engine, worker, reads
        name = f"e2e_{tmp_path.name.lower().replace('-', '_')[-40:]}"
        url = request.getfixturevalue("postgres").create_database(name)
        cli.env["CLFBENCH_DB"] = url
        monkeypatch.setenv("CLFBENCH_DB", url)
    queued = cli.json("queue", *TINY, "--task", "massive-intent", "-o", "epochs=2", "-o", "test_limit=40",
                      "-o", "eval_every=5")
    run_id = queued[0]["id"]
    engine = cli.run("engine", "--until-idle")
    assert engine.returncode == 0
    runs = cli.json("ls")
    assert [(r["id"], r["status"]) for r in runs] == [(run_id, "succeeded")]
    run = cli.json("show", str(run_id))
    assert run["results"]["massive-intent"]["n"] == 40
    assert 0.0 <= run["results"]["massive-intent"]["accuracy"] <= 1.0
    assert run["progress_step"] == run["progress_total"] > 0
    matrix = json.loads(cli.run("results", "--format", "json").stdout)
    assert matrix["columns"] == ["massive-intent"]
    cell = matrix["rows"][0]["cells"]["massive-intent"]
    assert cell["runs"] == [run_id] and cell["mean"] == pytest.approx(run["results"]["massive-intent"]["accuracy"])
    md = cli.run("results", "--format", "md").stdout
    assert "| tiny-bert · encoder-finetune |" in md
    store = open_store()
    with store.read() as connection:
        names = {row[0] for row in connection.execute(text("SELECT DISTINCT name FROM metric_points"))}
        predictions = connection.execute(text("SELECT count(*) FROM predictions")).scalar()
    assert {"train_loss", "eval_loss", "eval_accuracy", "lr"} <= names
    assert predictions == 40
    report = cli.json("errors", str(run_id), "--task", "massive-intent")
    assert report["n"] == 40
    some_label = next(iter(report["per_label"]))
    assert "misclassified" in cli.run("errors", str(run_id), "--label", some_label).stdout
    log = cli.run("logs", str(run_id)).stdout
    assert f"run {run_id} attempt 1" in log


def test_two_process_torchrun_logs_each_loss_once(cli):
    (run,) = cli.json("queue", *TINY, "--task", "massive-intent", "--nproc", "2", "-o", "epochs=1",
                      "-o", "test_limit=20", "-o", "batch_size=8")
    cli.run("engine", "--until-idle")
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "succeeded", shown["error"]
    log = cli.run("logs", str(run["id"])).stdout
    assert "rank 0/2" in log and "rank 1/2" in log  # two real processes
    # The two ranks share the run's cores instead of each taking all of them (fewer when the host is busy).
    assert 1 <= threads_per_rank(log) <= max(1, (os.cpu_count() or 1) // 2)
    store = open_store()
    with store.read() as connection:
        duplicates = connection.execute(text(
            "SELECT step, count(*) FROM metric_points WHERE name = 'train_loss' GROUP BY step HAVING count(*) > 1"
        )).all()
        points = connection.execute(text("SELECT count(*) FROM metric_points WHERE name='train_loss'")).scalar()
    assert points > 0 and duplicates == []


def _long_run(cli, *extra: str) -> int:
    (run,) = cli.json("queue", *TINY, "--task", "massive-intent", "-o", "epochs=40", "-o", "batch_size=8",
                      "-o", "train_limit=200", "-o", "test_limit=20", "-o", "checkpoint_every=20",
                      "-o", "eval_every=0", *extra)
    return run["id"]


def _finished_neighbour(cli) -> int:
    """A run that already finished, whose rows must not change while another run is killed."""
    (run,) = cli.json("queue", *TINY, "--task", "massive-intent", "-o", "epochs=1", "-o", "test_limit=10")
    cli.run("engine", "--until-idle")
    assert cli.json("show", str(run["id"]))["status"] == "succeeded"
    return run["id"]


def _training(store, run_id: int) -> bool:
    with store.read() as connection:
        return connection.execute(
            text("SELECT count(*) FROM metric_points WHERE run_id = :r AND name = 'train_loss'"), {"r": run_id}
        ).scalar() >= 2


def _checkpointed(store, run_id: int) -> bool:
    run = store_run(store, run_id)
    return bool(run["output_dir"]) and (Path(run["output_dir"]) / "checkpoint").is_dir() and _training(store, run_id)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_sigkill_of_the_worker_requeues_and_resumes(cli):
    neighbour = _finished_neighbour(cli)
    run_id = _long_run(cli)
    store = open_store()
    before = snapshot(store, exclude_run=run_id)
    engine = cli.popen("engine", "--until-idle")
    try:
        # Kill only once a checkpoint exists, so that the retry has something to resume from.
        wait_for(lambda: _checkpointed(store, run_id), 600, "the first checkpoint")
        torchrun_pid = store_run(store, run_id)["pid"]
        workers = _children(torchrun_pid)
        assert workers, "torchrun has no worker child"
        os.kill(workers[0], signal.SIGKILL)
        engine.wait(timeout=700)  # generous: a loaded box is slow, and the pytest timeout (900 s) still ends it
    finally:
        engine.kill()
    run = store_run(store, run_id)
    assert run["status"] == "succeeded" and run["attempt"] == 2
    assert no_process_left(store, run_id, attempt=1)
    assert attempts_did_not_overlap(store, run_id)
    events = events_of(store, run_id)
    assert "requeued" in events and events.count("launched") == 2
    log = cli.run("logs", str(run_id)).stdout
    assert "resum" in log.lower()  # the second attempt continued from the checkpoint
    assert snapshot(store, exclude_run=run_id) == before
    assert neighbour in [r["id"] for r in cli.json("ls")]


def test_sigkill_of_the_engine_then_restart(cli):
    _finished_neighbour(cli)
    run_id = _long_run(cli)
    store = open_store()
    before = snapshot(store, exclude_run=run_id)
    engine = cli.popen("engine", "--until-idle")
    wait_for(lambda: _training(store, run_id), 600, "training to start")
    torchrun_pid = store_run(store, run_id)["pid"]
    workers = _children(torchrun_pid)
    engine.send_signal(signal.SIGKILL)
    engine.wait(timeout=30)
    # The run is still marked running; now torchrun and its worker die too while no engine watches.
    assert store_run(store, run_id)["status"] == "running"
    for pid in [torchrun_pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    for pid in [torchrun_pid, *workers]:
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or _is_zombie(pid), 30, "worker to die")
    restarted = cli.run("engine", "--until-idle")
    assert restarted.returncode == 0
    run = store_run(store, run_id)
    assert run["status"] == "succeeded" and run["attempt"] == 2
    assert "requeued" in events_of(store, run_id)
    assert no_process_left(store, run_id, attempt=1)
    assert attempts_did_not_overlap(store, run_id)
    assert snapshot(store, exclude_run=run_id) == before


def test_engine_restart_adopts_a_live_worker(cli):
    run_id = _long_run(cli)
    store = open_store()
    engine = cli.popen("engine", "--until-idle")
    wait_for(lambda: _training(store, run_id), 600, "training to start")
    engine.send_signal(signal.SIGKILL)
    engine.wait(timeout=30)
    restarted = cli.run("engine", "--until-idle")
    assert restarted.returncode == 0
    run = store_run(store, run_id)
    # Still the first attempt: the worker kept training and the new engine supervised it to the end.
    assert run["status"] == "succeeded" and run["attempt"] == 1
    assert "adopted" in events_of(store, run_id) or "succeeded" in events_of(store, run_id)


def test_cancel_a_running_run(cli):
    run_id = _long_run(cli, "-o", "epochs=400")
    store = open_store()
    engine = cli.popen("engine", "--until-idle")
    try:
        wait_for(lambda: _training(store, run_id), 600, "training to start")
        assert "cancel requested" in cli.run("cancel", str(run_id)).stdout
        engine.wait(timeout=60)
    finally:
        engine.kill()
    run = store_run(store, run_id)
    assert run["status"] == "cancelled"
    from clfbench.engine.daemon import run_tag, tagged_processes

    assert tagged_processes(run_tag(store.url, run_id, run["attempt"])) == []  # every rank is gone


def test_failed_run_keeps_a_truthful_one_line_error(cli, tmp_path):
    # A data folder whose test split has a label unseen in train: only the worker can find out.
    data = tmp_path / "data" / "massive_en"
    data.mkdir(parents=True)
    rows = [json.loads(line) for line in (SAMPLES / "massive_en" / "train.jsonl").read_text().splitlines()]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:50]) + "\n")
    odd = dict(rows[0], intent="no_such_intent", id="odd")
    (data / "test.jsonl").write_text(json.dumps(odd) + "\n")
    (data / "dev.jsonl").write_text(json.dumps(rows[0]) + "\n")
    result = cli.run("queue", "--method", "encoder-finetune", "--model", "tiny-bert", "--task", "massive-intent",
                     "--data-dir", str(tmp_path / "data"), check=False)
    if result.returncode != 0:  # caught at queue time: even better, and nothing was queued
        assert result.stderr.startswith("error: ") and "no_such_intent" in result.stderr
        assert cli.json("ls") == []
        return
    cli.run("engine", "--until-idle")
    (run,) = cli.json("ls")
    assert run["status"] == "failed"
    assert "no_such_intent" in run["error"].splitlines()[0]


def test_a_spec_that_skipped_the_queue_check_fails_before_loading_a_model(cli):
    """Label scoring is undefined for slot filling. `clfbench queue` refuses it; a spec that reaches the store
    another way (here written straight into it) fails in the worker with the same one-line message, before any
    model loads (the model named here does not even exist)."""
    from clfbench.engine.submit import new_runs
    from clfbench.engine.spec import RunSpec
    from clfbench.storage import queue

    refused = cli.run("queue", "--method", "prompt", "--model", "tiny-llama", "--task", "massive-slots",
                      "--data-dir", str(SAMPLES), "-o", "decision=score", check=False)
    assert refused.returncode == 1 and "not defined for token" in refused.stderr
    spec = RunSpec(method="prompt", model="no-such-model", task="massive-slots", data_dir=str(SAMPLES),
                   options={"decision": "score"})
    queue.enqueue(open_store(), new_runs([spec], priority=0))
    cli.run("engine", "--until-idle")
    (run,) = cli.json("ls")
    assert run["status"] == "failed"
    assert run["error"].splitlines()[0].startswith("invalid options for prompt: decision=score is not defined "
                                                   "for token (slot) tasks")


def no_process_left(store, run_id: int, attempt: int) -> bool:
    from clfbench.engine.daemon import run_tag, tagged_processes

    return tagged_processes(run_tag(store.url, run_id, attempt)) == []


def attempts_did_not_overlap(store, run_id: int) -> bool:
    """The first attempt wrote its last metric point before the second attempt wrote its first (or wrote none: on a
    fast box a worker killed at its first checkpoint can die before its first batch of points is flushed)."""
    with store.read() as connection:
        spans = dict(connection.execute(text(
            "SELECT attempt, max(time) FROM metric_points WHERE run_id = :r AND attempt = 1 GROUP BY attempt"
        ), {"r": run_id}).all())
        first_of_second = connection.execute(text(
            "SELECT min(time) FROM metric_points WHERE run_id = :r AND attempt = 2"), {"r": run_id}).scalar()
    return first_of_second is not None and spans.get(1, float("-inf")) < first_of_second


def store_run(store, run_id: int) -> dict:
    from clfbench.storage import queries

    return queries.get_run(store, run_id)


def threads_per_rank(log: str) -> int:
    """The CPU threads the worker says each rank uses (the engine picks them from the cores free at launch)."""
    found = re.search(r"cpu, (\d+) thread\(s\) per rank", log)
    assert found, log
    return int(found.group(1))


def events_of(store, run_id: int) -> list[str]:
    with store.read() as connection:
        return [row[0] for row in connection.execute(
            text("SELECT kind FROM events WHERE run_id = :r ORDER BY id"), {"r": run_id})]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_detached_engine_start_status_stop(cli):
    # Options after the subcommand are honoured (the natural spelling), not only before it.
    started = cli.run("engine", "start", "--max-cpu-runs", "2")
    assert "engine started (pid" in started.stdout
    try:
        status = cli.json("engine", "status")
        pid = status["engine_pid_on_this_host"]
        assert pid and Path(f"/proc/{pid}").exists()
        assert "--max-cpu-runs\x002\x00" in Path(f"/proc/{pid}/cmdline").read_text()
        # It runs in a session of its own, so closing the terminal that started it does not stop it.
        assert os.getsid(pid) == pid
        assert "already runs" in cli.run("engine", "start", check=False).stderr
        (run,) = cli.json("queue", *TINY, "--task", "massive-intent", "-o", "epochs=1", "-o", "test_limit=10")
        wait_for(lambda: cli.json("show", str(run["id"]))["status"] == "succeeded", 600,
                 "the detached engine to run it")
        # With 2 CPU slots, a run gets at most half of the host's cores (fewer when the host is busy).
        log = cli.run("logs", str(run["id"])).stdout
        assert 1 <= threads_per_rank(log) <= max(1, (os.cpu_count() or 1) // 2)
    finally:
        stopped = cli.run("engine", "stop")
    assert "stopped" in stopped.stdout
    assert cli.json("engine", "status")["engine_pid_on_this_host"] is None
