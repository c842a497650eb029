"""The store failing under running training (issue 16 item 1): a real PostgreSQL server restarted twice and stopped
for 30 s, a full disk under a SQLite store, a NaN loss on PostgreSQL. Every run goes through the real command
line and engine (`clfbench engine --until-idle`) with a tiny random encoder on the CPU."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from clfbench.engine.training import TEST_STEP_DELAY_ENV
from clfbench.storage import queries
from clfbench.storage.db import StoreError, open_store
from clfbench.storage.outage import StoreUnreachable, is_outage, outage_window_s, retrying
from tests.conftest import ROOT, SAMPLES
from tests.pg_server import pg_server  # noqa: F401  (the fixture)
from tests.test_store_faults import _encoder_with_nan_weights


def _queue(cli, url: str, model: str, epochs: int, *extra: str) -> int:
    """A tiny-BERT run of 4 steps per epoch, one train_loss point per step."""
    (run,) = cli.json("--db", url, "queue", "--method", "encoder-finetune", "--model", model, "--data-dir",
                      str(SAMPLES), "--task", "massive-intent", "-o", "train_limit=32", "-o", "batch_size=8",
                      "-o", f"epochs={epochs}", "-o", "log_every=1", "-o", "eval_every=0", "-o", "test_limit=8",
                      "--allow-duplicate", *extra)
    return run["id"]


def _engine(cli, url: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clfbench.app.cli", "--db", url, "engine", "--until-idle", *args],
                            cwd=ROOT, env=env or cli.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _runs(url: str, ids: list[int]) -> dict[int, dict] | None:
    """The runs as the store has them now, or None while the store is unreachable."""
    store = None
    try:
        store = open_store(url)
        return {run_id: queries.get_run(store, run_id) for run_id in ids}
    except Exception as error:
        if is_outage(error):
            return None
        raise
    finally:
        if store is not None:
            store.engine.dispose()


def _wait(url: str, ids: list[int], done, timeout_s: float = 180) -> dict[int, dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = _runs(url, ids)
        if runs is not None and done(runs):
            return runs
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting; runs now: {_runs(url, ids)}")


def _steps(url: str, run_id: int, name: str = "train_loss") -> list[tuple[int, int]]:
    """(attempt, step) of every point of one series, in the order the store received them (points that waited
    out an outage must arrive in the order they were logged)."""
    store = open_store(url)
    try:
        with store.read() as connection:
            return [tuple(row) for row in connection.execute(
                text("SELECT attempt, step FROM metric_points WHERE run_id = :r AND name = :n ORDER BY id"),
                {"r": run_id, "n": name})]
    finally:
        store.engine.dispose()


def _progress(runs: dict[int, dict]) -> dict[int, int]:
    return {run_id: run["progress_step"] or 0 for run_id, run in runs.items()}


def _finish(engine: subprocess.Popen, timeout_s: float = 240) -> str:
    try:
        output, _ = engine.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        engine.kill()
        output, _ = engine.communicate()
        raise AssertionError(f"the engine did not finish:\n{output[-3000:]}")
    assert engine.returncode == 0, output[-3000:]
    return output


STEPS = 500  # at >= 0.1 s a step (the test's step delay), at least 50 s of training however fast the machine:
# the two restarts and the start of the 30 s stop land inside it (about 10-20 s after step 5 here)
STEP_DELAY_S = "0.1"


def test_training_rides_out_two_postgresql_restarts_and_a_30_s_stop(cli, pg_server, tiny_bert):  # noqa: F811
    url = pg_server.url
    ids = [_queue(cli, url, tiny_bert, STEPS // 4, "--seed", str(seed)) for seed in (1, 2)]
    engine = _engine(cli, url, "--max-cpu-runs", "2", env={**cli.env, TEST_STEP_DELAY_ENV: STEP_DELAY_S})
    try:
        seen = _progress(_wait(url, ids, lambda runs: all((r["progress_step"] or 0) >= 5 for r in runs.values())))
        for _ in range(2):  # each restart, then proof that training went on and reached the store
            pg_server.restart()
            seen = _progress(_wait(url, ids, lambda runs, before=seen: all(
                (runs[i]["progress_step"] or 0) >= before[i] + 5 or runs[i]["status"] != "running" for i in ids)))
        at_stop = _runs(url, ids)
        pg_server.stop()
        stopped = time.monotonic()
        time.sleep(30)
        pg_server.start()
        outage_s = time.monotonic() - stopped
        output = _finish(engine)
    finally:
        if engine.poll() is None:
            engine.kill()
    assert all(run["status"] == "running" for run in at_stop.values()), {  # the stop hit training
        run_id: (run["status"], run["progress_step"]) for run_id, run in at_stop.items()}
    runs = _runs(url, ids)
    for run_id, run in runs.items():
        assert (run["status"], run["attempt"], run["progress_step"]) == ("succeeded", 1, STEPS), run
        # Every step's point, once, of attempt 1: nothing lost in the outage, nothing trained twice.
        assert _steps(url, run_id) == [(1, step) for step in range(1, STEPS + 1)]
        log = Path(run["log_path"]).read_text()
        assert "store unreachable" in log and "store reachable again" in log, log[-3000:]
    assert "store unreachable" in output and "store reachable again" in output, output[-3000:]
    print(f"outage {outage_s:.1f} s; progress at the stop: {_progress(at_stop)}")


def _mount_tmpfs(folder: Path, size: str) -> None:
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (the full disk) needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def _fill(folder: Path) -> Path:
    """Write a file until the disk is full."""
    filler = folder / "filler"
    try:
        handle = open(filler, "wb", buffering=0)  # unbuffered: closing it has nothing left to write on a full disk
    except OSError:  # already full (the store's WAL took the last of it): the ballast is what frees space
        return filler
    with handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def test_a_full_disk_under_sqlite_ends_the_attempt_interrupted_and_the_run_resumes_after_space_is_freed(
        cli, tmp_path, tiny_bert):
    disk = tmp_path / "disk"  # the store alone; the run's folder (log, checkpoint, spill file) is elsewhere
    _mount_tmpfs(disk, "16m")
    try:
        # Freed with the filler: space comes back even when the store itself filled the disk before the filler.
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * 512 * 1024)
        url = f"sqlite:///{disk / 'store.db'}"
        run_id = _queue(cli, url, tiny_bert, 600, "-o", "checkpoint_every=50")  # 2,400 steps
        env = dict(cli.env, CLFBENCH_STORE_OUTAGE_S="3")  # give up on training after 3 s without the store
        engine = _engine(cli, url, env=env)
        try:
            # On its points (written every 0.5 s), not its heartbeat's progress (every 5 s): on an idle box the tiny
            # model trains ~190 steps/s and was done before a heartbeat said step 60.
            deadline = time.monotonic() + 180
            while not any(step >= 60 for _, step in _steps(url, run_id)) and time.monotonic() < deadline:
                time.sleep(0.1)
            filler = _fill(disk)
            log_path = Path(_runs(url, [run_id])[run_id]["log_path"])
            deadline = time.monotonic() + 60
            while "stopped: the store was unreachable" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.3)
            stopped_line = [line for line in log_path.read_text().splitlines() if "stopped: the store" in line]
            assert len(stopped_line) == 1, log_path.read_text()[-3000:]
            assert "database or disk is full" in stopped_line[0] and "CLFBENCH_STORE_OUTAGE_S=3" in stopped_line[0]
            filler.unlink(missing_ok=True)  # space again: the worker writes what it holds, exits, the next
            ballast.unlink()                # attempt resumes
            _finish(engine)
        finally:
            if engine.poll() is None:
                engine.kill()
        run = _runs(url, [run_id])[run_id]
        assert (run["status"], run["attempt"]) == ("succeeded", 2), run
        # The retry says why and how: the reason attempt 1 ended, then where attempt 2 resumed.
        assert run["attempt_note"].startswith("attempt 1: worker stopped: the store was unreachable for longer "
                                              "than CLFBENCH_STORE_OUTAGE_S; attempt 2 resumed from step "), run
        store = open_store(url)
        with store.read() as connection:
            assert connection.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        store.engine.dispose()
        points = _steps(url, run_id)
        first = [step for attempt, step in points if attempt == 1]
        second = [step for attempt, step in points if attempt == 2]
        # Attempt 1's points: every step it trained, once, in order (written after space was freed, none half-written).
        assert first == list(range(1, len(first) + 1)) and len(first) >= 60
        # Attempt 2 resumed from a checkpoint of attempt 1 (not from zero) and trained to the end: no step missing.
        resumed_at = int(log_path.read_text().split("resuming from", 1)[1].split(" at step ", 1)[1].split("/")[0])
        assert 0 < resumed_at <= len(first) and resumed_at % 50 == 0
        assert second == list(range(resumed_at + 1, 2401))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_nan_loss_on_postgresql_fails_the_run_with_one_line_and_keeps_its_points(
        cli, pg_server, tmp_path):  # noqa: F811
    url = pg_server.url
    model = _encoder_with_nan_weights(tmp_path / "nan-bert")
    (run,) = cli.json("--db", url, "queue", "--method", "encoder-finetune", "--model", model, "--data-dir",
                      str(SAMPLES), "--task", "massive-intent", "-o", "log_every=2", "-o", "train_limit=64",
                      "-o", "batch_size=8", "-o", "test_limit=8", "-o", "eval_every=0", "-o", "checkpoint_every=0")
    _finish(_engine(cli, url))
    shown = cli.json("--db", url, "show", str(run["id"]))
    assert shown["status"] == "failed"
    assert shown["error"].splitlines()[0] == "loss became NaN at step 2"
    store = open_store(url)
    points = queries.metric_series(store, run["id"])
    store.engine.dispose()
    losses = [(p["step"], p["value"]) for p in points if p["name"] == "train_loss"]
    assert len(losses) == 1 and losses[0][0] == 2 and math.isnan(losses[0][1])
    assert {p["name"] for p in points} >= {"train_loss", "lr"}


def _write_past_a_full_disk(store) -> None:
    """A write that needs a new page of a store whose connection may not grow it: SQLite's own "database or disk
    is full", without filling a disk."""
    with store.engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA max_page_count = 1")  # below the file's size: no page may be added
        connection.exec_driver_sql("INSERT INTO events (time, kind, message) VALUES (0, 'x', hex(randomblob(9000)))")


def _read_a_missing_table(store) -> None:
    with store.read() as connection:
        connection.execute(text("SELECT * FROM no_such_table"))


def test_an_outage_is_retried_for_the_window_and_other_errors_are_not(tmp_path, monkeypatch):
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    with pytest.raises(Exception) as full:
        _write_past_a_full_disk(store)
    assert is_outage(full.value)
    with pytest.raises(Exception) as missing:
        _read_a_missing_table(store)
    assert not is_outage(missing.value)  # sqlite3 calls this an OperationalError too: a bug, not an outage
    calls = []
    began = time.monotonic()
    with pytest.raises(StoreUnreachable, match=r"while writing \(database or disk is full; limit "
                                               r"CLFBENCH_STORE_OUTAGE_S=1\)"):
        retrying(lambda: calls.append(1) or _write_past_a_full_disk(store), "writing", window_s=1, log=print)
    assert 1 <= time.monotonic() - began < 3 and len(calls) >= 3  # backoff from 0.2 s, until the window ends
    with pytest.raises(Exception) as raised:
        retrying(lambda: calls.append(2) or _read_a_missing_table(store), "reading", window_s=60)
    assert not isinstance(raised.value, StoreUnreachable) and calls.count(2) == 1  # raised at once
    monkeypatch.setenv("CLFBENCH_STORE_OUTAGE_S", "soon")
    with pytest.raises(StoreError, match="CLFBENCH_STORE_OUTAGE_S must be a number of seconds >= 0, not 'soon'"):
        outage_window_s()


def test_log_metric_never_waits_for_the_store_and_points_that_waited_on_disk_arrive_in_order(tmp_path):
    from clfbench.engine.recorder import Recorder
    from clfbench.storage import queue

    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    run_id = queue.enqueue(store, [queue.NewRun(method="encoder-finetune", model="tiny-bert", task="massive-intent",
                                                shots=0, seed=0, spec_json="{}", spec_hash="h", launch="torchrun",
                                                gpus_requested=None, nproc=1)])[0]
    attempt = queue.claim(store, host="h", engine_id=1, default_gpus=0, free_gpus=0, cpu_free=True,
                          api_free=True)["attempt"]
    recorder = Recorder(store, run_id, attempt, enabled=True, flush_every=20, flush_s=0.05, heartbeat_s=0.2,
                        spill_dir=tmp_path, max_buffered=50)
    recorder.start_heartbeat()
    blocker = store.engine.raw_connection()  # another process's long write: SQLite's write lock held for 3 s
    blocker.execute("BEGIN IMMEDIATE")
    began = time.monotonic()
    for step in range(1, 1001):
        recorder.log_metric(step, "train_loss", 1.0 / step)
    logging_took = time.monotonic() - began
    spilled = list(tmp_path.glob("metrics-spill-*.jsonl"))
    time.sleep(max(0.0, 3 - (time.monotonic() - began)))
    blocker.rollback()
    blocker.close()
    recorder.close()
    assert logging_took < 1.0  # 1,000 points while the store could not take one: the training thread never waited
    assert spilled and not list(tmp_path.glob("metrics-spill-*.jsonl"))  # past 50 in memory: to disk, and back
    assert _steps(f"sqlite:///{tmp_path / 'store.db'}", run_id) == [(attempt, step) for step in range(1, 1001)]
