"""Honest progress (issue 15 item 5): workers report their phase with its progress, retries say why they happened
and how they began, the ETA adds an evaluation's rest, and a run whose engine is gone says so."""
from __future__ import annotations

import dataclasses
import time

import pytest
from typer.testing import CliRunner

from clfbench.app import render
from clfbench.app.cli import app
from clfbench.engine.context import PHASES
from clfbench.storage import queries, queue
from clfbench.storage.db import open_store


def _new_run() -> queue.NewRun:
    return queue.NewRun(method="encoder-finetune", model="tiny-bert", task="massive-intent", shots=0, seed=0,
                        spec_json="{}", spec_hash="phases", launch="torchrun", gpus_requested=None, nproc=1)


def _claim(store, engine_id: int = 1) -> dict:
    return queue.claim(store, host="host-a", engine_id=engine_id, default_gpus=0, free_gpus=0, cpu_free=True,
                       api_free=True)


def _running(**fields) -> dict:
    run = {"id": 7, "status": "running", "attempt": 1, "started_at": 1000.0, "heartbeat_at": 1000.0,
           "progress_step": None, "progress_total": None, "phase": None, "phase_step": None, "phase_total": None,
           "attempt_note": None}
    return {**run, **fields}


def test_every_phase_has_a_short_name_in_the_run_list():
    assert set(render.PHASE_SHORT) == set(PHASES)


def test_the_list_shows_the_phase_and_its_progress():
    now = 1010.0
    assert render.progress_with_eta(_running(id=1, phase="loading model"), now) == "loading"
    assert render.progress_with_eta(_running(id=2, phase="converting", phase_step=0, phase_total=100), now) \
        == "converting 0/100"
    # Training: the time left at this attempt's average rate (10 s for 10 steps: 37 left, 37 s).
    text = render.progress_with_eta(_running(id=3, phase="training", phase_step=10, phase_total=47, progress_step=10,
                                             progress_total=47), now)
    assert text == "train 10/47 ~0m37"


def test_an_evaluation_is_timed_by_its_own_rate_plus_the_training_left():
    run = _running(id=11, started_at=0.0, phase="training", phase_step=10, phase_total=47, progress_step=10,
                   progress_total=47)
    # A screen that refreshes sees training at 1 step/s ...
    for t, step in ((100.0, 10), (110.0, 20)):
        render.progress_with_eta({**run, "heartbeat_at": t, "phase_step": step, "progress_step": step}, t)
    # ... then a dev evaluation over 400 examples at 10 examples/s, the training frozen at step 20.
    evaluating = {**run, "phase": "evaluating on dev", "phase_total": 400, "progress_step": 20}
    assert render.progress_with_eta({**evaluating, "heartbeat_at": 111.0, "phase_step": 0}, 111.0) == "eval 0/400"
    text = render.progress_with_eta({**evaluating, "heartbeat_at": 123.0, "phase_step": 120}, 123.0)
    # 280 examples left at 10/s (28 s) + 27 training steps left at 1/s (27 s): not the 27 s of training alone.
    assert text == "eval 120/400 ~0m55"


def test_a_run_whose_engine_is_gone_shows_no_time_left():
    stale = _running(id=21, started_at=0.0, heartbeat_at=0.0, phase="training", phase_step=12, phase_total=47,
                     progress_step=12, progress_total=47)
    days_later = 2346 * 86400.0
    assert render.progress_with_eta(stale, days_later) == "engine gone 12/47"
    fresh = {**stale, "heartbeat_at": days_later - 2}
    assert render.progress_with_eta({**fresh, "engine_alive": False}, days_later) == "engine gone 12/47"
    assert "engine gone" not in render.progress_with_eta(fresh, days_later)


def test_an_absurd_time_left_is_not_shown():
    # One step in a day of loading: 1000 steps left would be "~1000d".
    run = _running(id=31, started_at=0.0, heartbeat_at=86400.0, phase="training", phase_step=1, phase_total=1001,
                   progress_step=1, progress_total=1001)
    assert render.progress_with_eta(run, 86400.0) == "train 1/1001"


@pytest.fixture
def store(home):
    return open_store()


def test_a_retry_says_why_and_how_it_began_in_the_list_and_in_show(store):
    run_id = queue.enqueue(store, [_new_run()])[0]
    first = _claim(store)
    assert queue.heartbeat(store, run_id, first["attempt"], (12, 47), ("evaluating on dev", 30, 400))
    assert queue.mark_ended_without_result(store, run_id, first["attempt"], "worker killed by signal SIGKILL") \
        == "queued"
    run = queries.get_run(store, run_id)
    assert run["attempt_note"] == "attempt 1: worker killed by signal SIGKILL"
    assert run["phase"] is None  # a queued run does nothing, whatever its last worker did
    assert render.progress_with_eta(run, time.time()) == "retry: attempt 1: worker killed by signal SIGKILL"

    second = _claim(store, queue.register_engine(store, "host-a", 1, []))["attempt"]
    assert queue.set_attempt_note(store, run_id, second, "attempt 2 resumed from step 8")
    assert not queue.set_attempt_note(store, run_id, first["attempt"], "attempt 1 started over")  # fenced
    note = "attempt 1: worker killed by signal SIGKILL; attempt 2 resumed from step 8"
    assert queries.get_run(store, run_id)["attempt_note"] == note
    assert queue.heartbeat(store, run_id, second, (9, 47), ("training", 9, 47))

    shown = CliRunner().invoke(app, ["show", str(run_id)])
    assert shown.exit_code == 0, shown.output
    assert f"retries: {note}" in shown.output and "phase: training 9/47" in shown.output
    listed = CliRunner().invoke(app, ["ls"], env={"COLUMNS": "200"})
    assert "train 9/47" in listed.output

    assert queue.finish_failed(store, run_id, second, "boom")
    assert queue.requeue(store, run_id)
    assert queries.get_run(store, run_id)["attempt_note"] == "retried by user"


def test_ls_marks_a_run_whose_engine_stopped(store):
    run_id = queue.enqueue(store, [_new_run()])[0]
    engine_id = queue.register_engine(store, "host-a", 1, [])
    claimed = _claim(store, engine_id)
    queue.heartbeat(store, run_id, claimed["attempt"], (3, 47), ("training", 3, 47))
    assert "engine gone" not in CliRunner().invoke(app, ["ls"], env={"COLUMNS": "200"}).output
    queue.unregister_engine(store, engine_id, 1)  # the engine stopped; its run was left `running`
    listed = CliRunner().invoke(app, ["ls"], env={"COLUMNS": "200"}).output
    assert "engine gone 3/47" in listed and "~" not in listed


# ---- the worker side: a real tiny model through the training scaffold ---------------------------------------

torch = pytest.importorskip("torch")


def _phase_recorder():
    seen: list[tuple] = []
    notes: list[str] = []
    return seen, notes, (lambda name, step=None, total=None: seen.append((name, step, total))), notes.append


def test_encoder_finetune_reports_training_evaluation_and_testing(tiny_bert, tmp_path, one_torch_thread):
    from tests.test_encoder_finetune import Recorder, make_ctx, synthetic_task

    from clfbench.engine.methods import encoder_finetune

    seen, notes, set_phase, note = _phase_recorder()
    ctx = dataclasses.replace(make_ctx(tiny_bert, tmp_path, Recorder(), task=synthetic_task(dev=40), epochs=1,
                                       eval_every=5, batch_size=16), set_phase=set_phase, note_attempt=note)
    encoder_finetune.run(ctx)
    names = [name for name, _, _ in seen]
    assert names[0] == "training" and names[-1] == "testing"
    evaluations = [(step, total) for name, step, total in seen if name == "evaluating on dev" and total]
    assert evaluations and evaluations[-1] == (40, 40)  # examples of the dev set, to the last one
    assert ("training", 9, 10) in seen  # 160 train / 16 = 10 steps
    assert seen[-1] == ("testing", 60, 60)
    assert notes == []  # a first attempt says nothing about how it began


def test_a_retry_notes_the_step_it_resumed_from(tiny_bert, tmp_path, one_torch_thread):
    from tests.test_encoder_finetune import Recorder, make_ctx

    from clfbench.engine.methods import encoder_finetune

    options = dict(checkpoint_every=8, log_every=1, eval_every=20)
    with pytest.raises(RuntimeError, match="simulated crash"):
        encoder_finetune.run(make_ctx(tiny_bert, tmp_path, Recorder(crash_at_step=13), **options))
    seen, notes, set_phase, note = _phase_recorder()
    retry = dataclasses.replace(make_ctx(tiny_bert, tmp_path, Recorder(), **options), attempt=2, set_phase=set_phase,
                                note_attempt=note)
    encoder_finetune.run(retry)
    assert notes == ["attempt 2 resumed from step 8"]
    fresh = tmp_path / "fresh"
    _, notes, set_phase, note = _phase_recorder()
    encoder_finetune.run(dataclasses.replace(make_ctx(tiny_bert, fresh, Recorder(), epochs=1), attempt=3,
                                             note_attempt=note))
    assert notes == ["attempt 3 started over"]


def test_the_live_bars_follow_the_phase_and_say_when_the_engine_is_gone():
    from clfbench.app import progress

    run = {**_running(id=41, heartbeat_at=time.time(), phase="evaluating on dev", phase_step=120, phase_total=400,
                      progress_step=47, progress_total=47), "method": "encoder-finetune", "model": "minilm",
           "task": "massive-intent"}
    fields = progress.progress_fields(run, progress.Samples())
    assert fields["status"] == "running" and fields["steps"] == "eval 120/400"
    assert progress.bar_position(run) == (120, 400)  # the bar fills with the evaluation, not the finished training
    gone = progress.progress_fields({**run, "heartbeat_at": time.time() - 3600}, progress.Samples())
    assert gone["status"] == "engine gone" and gone["eta"] == ""


def test_a_resumed_attempt_is_timed_by_the_steps_it_made_itself():
    # Attempt 2 resumed from step 300 and made 10 steps in its 100 s: 90 left take 900 s, not the 29 s that
    # 310 steps in 100 s would promise.
    run = _running(id=51, attempt=2, started_at=0.0, heartbeat_at=100.0, phase="training", phase_step=310,
                   phase_total=400, progress_step=310, progress_total=400,
                   attempt_note="attempt 1: worker killed by signal SIGKILL; attempt 2 resumed from step 300")
    assert render.progress_with_eta(run, 100.0) == "train 310/400 ~15m00"
