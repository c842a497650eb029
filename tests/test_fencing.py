"""Fencing by attempt (issue 16 item 2): once a run is re-claimed, the earlier attempt's worker writes nothing
more, and its Recorder stops the training thread at its next call."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from clfbench.engine.recorder import Recorder, RunNotOurs
from clfbench.storage import queue
from clfbench.storage.db import open_store


def _new_run() -> queue.NewRun:
    return queue.NewRun(method="encoder-finetune", model="tiny-bert", task="massive-intent", shots=0, seed=0,
                        spec_json="{}", spec_hash="fence", launch="torchrun", gpus_requested=None, nproc=1)


def _claim(store) -> dict:
    return queue.claim(store, host="host-a", engine_id=1, default_gpus=0, free_gpus=0, cpu_free=True,
                       api_free=True)


def _reclaim(store, run_id: int) -> int:
    """What an engine that judged the run dead does: back to queued, then claimed again. Returns the new attempt."""
    with store.write() as connection:
        connection.execute(text("UPDATE runs SET status = 'queued' WHERE id = :id"), {"id": run_id})
    run = _claim(store)
    assert run["id"] == run_id
    return run["attempt"]


def _points(store, run_id: int, attempt: int) -> int:
    with store.read() as connection:
        return connection.execute(text("SELECT COUNT(*) FROM metric_points WHERE run_id = :r AND attempt = :a"),
                                  {"r": run_id, "a": attempt}).scalar_one()


def _eventually(check, timeout_s: float = 10) -> bool:
    """Points are written by the Recorder's writer thread, not by log_metric: wait for it."""
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


@pytest.fixture
def store(tmp_path):
    return open_store(f"sqlite:///{tmp_path / 'store.db'}")


def test_points_of_a_superseded_attempt_are_refused_and_the_new_attempts_are_written(store):
    run_id = queue.enqueue(store, [_new_run()])[0]
    first = _claim(store)["attempt"]
    assert queue.add_metric_points(store, run_id, first, [(1, "train_loss", 0.9, time.time())]) is True
    second = _reclaim(store, run_id)
    assert second == first + 1
    stale = [(step, "train_loss", 0.5, time.time()) for step in range(2, 10)]
    assert queue.add_metric_points(store, run_id, first, stale) is False
    assert _points(store, run_id, first) == 1
    fresh = [(step, "train_loss", 0.4, time.time()) for step in range(1, 6)]
    assert queue.add_metric_points(store, run_id, second, fresh) is True
    assert _points(store, run_id, second) == 5
    assert queue.heartbeat(store, run_id, first) is False
    assert queue.finish_failed(store, run_id, first, "stale") is False
    assert queue.finish_succeeded(store, run_id, first, [], []) is False


def test_points_of_a_cancelled_run_are_refused(store):
    run_id = queue.enqueue(store, [_new_run()])[0]
    attempt = _claim(store)["attempt"]
    with store.write() as connection:
        connection.execute(text("UPDATE runs SET status = 'cancelled' WHERE id = :id"), {"id": run_id})
    assert queue.add_metric_points(store, run_id, attempt, [(1, "train_loss", 0.9, time.time())]) is False
    assert _points(store, run_id, attempt) == 0


def test_a_refused_heartbeat_makes_the_next_log_metric_raise_and_nothing_more_is_written(store):
    run_id = queue.enqueue(store, [_new_run()])[0]
    first = _claim(store)["attempt"]
    recorder = Recorder(store, run_id, first, enabled=True, flush_every=2, flush_s=60, heartbeat_s=0.05)
    recorder.start_heartbeat()
    for step in range(4):
        recorder.log_metric(step, "train_loss", 1.0)
    assert _eventually(lambda: _points(store, run_id, first) == 4)
    recorder.log_metric(4, "train_loss", 1.0)  # buffered, not yet flushed
    _reclaim(store, run_id)
    deadline = time.monotonic() + 10
    while not recorder.not_ours and time.monotonic() < deadline:
        time.sleep(0.02)
    assert recorder.not_ours
    with pytest.raises(RunNotOurs, match=f"run {run_id} attempt {first} is no longer ours"):
        recorder.log_metric(5, "train_loss", 1.0)
    with pytest.raises(RunNotOurs):
        recorder.set_progress(6, 10)
    recorder.close()
    assert _points(store, run_id, first) == 4  # the buffered point was dropped, not written


def test_a_refused_flush_raises_on_the_training_thread_at_its_next_call(store):
    run_id = queue.enqueue(store, [_new_run()])[0]
    first = _claim(store)["attempt"]
    recorder = Recorder(store, run_id, first, enabled=True, flush_every=1, flush_s=60, heartbeat_s=60)
    recorder.start_heartbeat()
    recorder.log_metric(0, "train_loss", 1.0)
    assert _eventually(lambda: _points(store, run_id, first) == 1)
    second = _reclaim(store, run_id)
    recorder.log_metric(1, "train_loss", 1.0)  # due at once: the writer thread's flush is refused
    assert _eventually(lambda: recorder.not_ours)
    with pytest.raises(RunNotOurs):
        recorder.log_metric(2, "train_loss", 1.0)
    recorder.close()
    assert (_points(store, run_id, first), _points(store, run_id, second)) == (1, 0)
