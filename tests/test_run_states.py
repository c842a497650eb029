"""The run state machine: every write the queue functions make is a step of the table in storage.states, by the
writer the table names, and every step the table names is one some queue function makes. A step that is not in
the table changes nothing in a real store."""
from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from clfbench.storage import queries, queue
from clfbench.storage.db import open_store
from clfbench.storage.models import TERMINAL_STATUSES, RunStatus
from clfbench.storage.states import DELETABLE, ENDED_WITH_ERROR, TRANSITIONS, Writer, allowed

PREDICTION = {"task": "t", "example_id": "1", "text": "x", "gold": "a", "predicted": "a"}
RESULT = {"task": "t", "metric": "accuracy", "value": 1.0}


def new_run() -> queue.NewRun:
    return queue.NewRun(method="encoder-finetune", model="tiny-bert", task="t", shots=0, seed=0, spec_json="{}",
                        spec_hash="h", launch="torchrun", gpus_requested=None, nproc=1)


def claim(store) -> dict | None:
    return queue.claim(store, host="h", engine_id=1, default_gpus=0, free_gpus=0, cpu_free=True, api_free=True)


def _running(store, run_id: int, cancel: bool = False, retries_spent: int = 0) -> None:
    for _ in range(retries_spent):
        queue.mark_ended_without_result(store, run_id, claim(store)["attempt"], "gone")
    claim(store)
    if cancel:
        queue.request_cancel(store, run_id)


def _ended(store, run_id: int, how: str) -> None:
    _running(store, run_id, cancel=how == "cancelled", retries_spent=2 if how == "interrupted" else 0)
    attempt = queries.get_run(store, run_id)["attempt"]
    if how == "succeeded":
        queue.finish_succeeded(store, run_id, attempt, [PREDICTION], [RESULT])
    elif how == "failed":
        queue.finish_failed(store, run_id, attempt, "boom")
    else:
        queue.mark_ended_without_result(store, run_id, attempt, "gone")


# Every situation a run can be in, each reached through the queue functions themselves.
SITUATIONS: dict[str, Callable] = {
    "queued": lambda store, run_id: None,
    "running": _running,
    "running, cancel requested": lambda store, run_id: _running(store, run_id, cancel=True),
    "running, no retries left": lambda store, run_id: _running(store, run_id, retries_spent=2),
    "succeeded": lambda store, run_id: _ended(store, run_id, "succeeded"),
    "failed": lambda store, run_id: _ended(store, run_id, "failed"),
    "cancelled": lambda store, run_id: _ended(store, run_id, "cancelled"),
    "interrupted": lambda store, run_id: _ended(store, run_id, "interrupted"),
}

# Every queue function that writes a run, with who calls it; `attempt` is the run's attempt now.
OPERATIONS: dict[str, tuple[Writer, Callable]] = {
    "claim": (Writer.engine, lambda store, run_id, attempt: claim(store)),
    "set_launched": (Writer.engine, lambda store, run_id, attempt: queue.set_launched(
        store, run_id, attempt, pid=123, gpus_assigned="", log_path="log", output_dir="out")),
    "heartbeat": (Writer.worker, lambda store, run_id, attempt: queue.heartbeat(store, run_id, attempt, (1, 9))),
    "finish_succeeded": (Writer.worker, lambda store, run_id, attempt: queue.finish_succeeded(
        store, run_id, attempt, [PREDICTION], [RESULT])),
    "finish_failed": (Writer.worker, lambda store, run_id, attempt: queue.finish_failed(
        store, run_id, attempt, "boom")),
    "finish_failed by the engine": (Writer.engine, lambda store, run_id, attempt: queue.finish_failed(
        store, run_id, attempt, "could not launch", writer=Writer.engine)),
    "mark_ended_without_result": (Writer.engine, lambda store, run_id, attempt: queue.mark_ended_without_result(
        store, run_id, attempt, "gone")),
    "request_cancel": (Writer.user, lambda store, run_id, attempt: queue.request_cancel(store, run_id)),
    "requeue": (Writer.user, lambda store, run_id, attempt: queue.requeue(store, run_id)),
}


STORE_NUMBERS = itertools.count()


def _apply(folder, situation: str, operation: str, attempt_offset: int = 0) -> tuple[dict, dict, list]:
    """(run before, run after, its predictions after) for one operation on one run in one situation, in a
    store of its own."""
    store = open_store(f"sqlite:///{folder}/{next(STORE_NUMBERS)}.db")
    try:
        (run_id,) = queue.enqueue(store, [new_run()])
        SITUATIONS[situation](store, run_id)
        before = queries.get_run(store, run_id)
        OPERATIONS[operation][1](store, run_id, before["attempt"] + attempt_offset)
        return before, queries.get_run(store, run_id), queries.predictions(store, run_id, "t")
    finally:
        store.engine.dispose()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLFBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CLFBENCH_DB", raising=False)
    (tmp_path / "stores").mkdir()
    return tmp_path / "stores"


def test_every_write_is_a_step_of_the_table_and_every_step_is_written(home):
    """Exhaustive: every operation in every situation. What changed a run is in the table with the operation's
    writer; what the table does not allow changed nothing; and each step of the table is made by some operation."""
    made = set()
    for situation in SITUATIONS:
        for operation, (writer, _call) in OPERATIONS.items():
            before, after, _predictions = _apply(home, situation, operation)
            step = (before["status"], after["status"])
            if after != before:
                assert allowed(*step, writer), f"{operation} by the {writer.value} in '{situation}' made {step}"
                made.add((RunStatus(step[0]), RunStatus(step[1]), writer))
    in_table = {(source, target, writer) for source, targets in TRANSITIONS.items()
                for target, writers in targets.items() for writer in writers}
    assert made == in_table


@pytest.mark.parametrize("operation", [name for name in OPERATIONS if name not in ("claim", "request_cancel",
                                                                                    "requeue")])
def test_a_writer_of_another_attempt_changes_nothing(home, operation):
    for situation in ("running", "running, cancel requested", "running, no retries left"):
        before, after, predictions = _apply(home, situation, operation, attempt_offset=-1)
        assert after == before and predictions == []


def test_a_worker_finishing_a_cancelled_run_changes_nothing(home):
    before, after, predictions = _apply(home, "cancelled", "finish_succeeded")
    assert not allowed(RunStatus.cancelled, RunStatus.succeeded, Writer.worker)
    assert after == before and after["status"] == "cancelled" and predictions == []


def test_a_user_retrying_a_running_run_changes_nothing(home):
    before, after, _predictions = _apply(home, "running", "requeue")
    assert not allowed(RunStatus.running, RunStatus.queued, Writer.user)
    assert after == before and after["status"] == "running"


def test_who_writes_what():
    """The rules of docs/ARCHITECTURE.md, read off the table."""
    def targets(writer: Writer) -> set[RunStatus]:
        return {target for source, steps in TRANSITIONS.items() for target, writers in steps.items()
                if writer in writers and target != source}

    assert targets(Writer.worker) == {RunStatus.succeeded, RunStatus.failed}
    assert targets(Writer.engine) == {RunStatus.running, RunStatus.failed, RunStatus.cancelled, RunStatus.queued,
                                      RunStatus.interrupted}
    assert targets(Writer.user) == {RunStatus.cancelled, RunStatus.queued}
    assert all(set(TRANSITIONS[finished]) == {RunStatus.queued} for finished in TERMINAL_STATUSES)
    assert set(TRANSITIONS) == set(RunStatus)  # every status has its row, so none is a dead end by omission
    assert set(ENDED_WITH_ERROR) == {RunStatus.failed, RunStatus.interrupted, RunStatus.queued}
    assert set(DELETABLE) == set(RunStatus) - {RunStatus.running}


@pytest.mark.parametrize("situation", list(SITUATIONS))
def test_the_log_tail_lands_only_on_an_attempt_that_ended_with_an_error(home, situation):
    store = open_store(f"sqlite:///{home}/tail.db")
    (run_id,) = queue.enqueue(store, [new_run()])
    SITUATIONS[situation](store, run_id)
    before = queries.get_run(store, run_id)
    queue.append_error_detail(store, run_id, before["attempt"], "--- log tail ---")
    after = queries.get_run(store, run_id)
    if RunStatus(before["status"]) in ENDED_WITH_ERROR:
        error = f"{before['error']}\n--- log tail ---" if before["error"] else "--- log tail ---"
        # change_seq (the store's change counter) moves with any write of the row
        assert after == {**before, "error": error, "change_seq": after["change_seq"]}
        assert after["change_seq"] > before["change_seq"]
    else:
        assert after == before
    assert queue.delete_run(store, run_id) == (RunStatus(before["status"]) in DELETABLE)
    store.engine.dispose()
