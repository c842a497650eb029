"""The store failing or fed bad numbers: NaN/inf metric points, a diverged loss, refused option values (issue 16)."""
from __future__ import annotations

import math

import pytest
from sqlalchemy import text

from clfbench.app.tui.detail import DetailScreen
from clfbench.storage import queries, queue
from clfbench.storage.db import open_store
from tests.conftest import SAMPLES
from tests.test_tui import SUCCEEDED_ENCODER, make_app, run_app, seeded, select_run, settle  # noqa: F401


def test_the_detail_charts_a_loss_that_became_nan_without_crashing(seeded):  # noqa: F811
    store = open_store(seeded)
    attempt = queries.get_run(store, SUCCEEDED_ENCODER)["attempt"]
    # Metric points are written only while their run runs under their attempt (add_metric_points is fenced): the
    # seeded run is put back to running for the write, as its worker was, then finished again.
    with store.write() as connection:
        connection.execute(text("UPDATE runs SET status = 'running' WHERE id = :r"), {"r": SUCCEEDED_ENCODER})
    assert queue.add_metric_points(store, SUCCEEDED_ENCODER, attempt, [(1000, "train_loss", float("nan"), 1.0),
                                                                       (1001, "train_loss", float("inf"), 2.0)])
    with store.write() as connection:
        connection.execute(text("UPDATE runs SET status = 'succeeded' WHERE id = :r"), {"r": SUCCEEDED_ENCODER})

    async def scenario(pilot):
        await select_run(pilot, SUCCEEDED_ENCODER)
        await pilot.press("enter")
        await settle(pilot)
        screen = pilot.app.screen
        assert isinstance(screen, DetailScreen)
        assert math.isnan(screen.points["train_loss"][-2][1])
        assert "train_loss (not finite at step 1000)" in screen.query_one("#loss-plot").render().plain

    run_app(make_app(seeded), scenario)


def _encoder_with_nan_weights(folder) -> str:
    """A tiny BERT whose embedding LayerNorm weights are NaN: every forward gives NaN, so the first loss is NaN."""
    torch = pytest.importorskip("torch")
    from transformers import BertModel

    from clfbench.engine.tiny_models import build_tiny_encoder

    build_tiny_encoder(folder)
    model = BertModel.from_pretrained(folder)
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    return str(folder)


def test_a_run_whose_loss_becomes_nan_fails_with_one_line_and_keeps_its_points(cli, tmp_path):
    model = _encoder_with_nan_weights(tmp_path / "nan-bert")
    (run,) = cli.json("queue", "--method", "encoder-finetune", "--model", model, "--data-dir", str(SAMPLES),
                      "--task", "massive-intent", "-o", "log_every=2", "-o", "train_limit=64", "-o", "batch_size=8",
                      "-o", "test_limit=8", "-o", "eval_every=0", "-o", "checkpoint_every=0")
    assert cli.run("engine", "--until-idle").returncode == 0
    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "failed"
    assert shown["error"].splitlines()[0] == "loss became NaN at step 2"
    points = queries.metric_series(open_store(), run["id"])
    losses = [(p["step"], p["value"]) for p in points if p["name"] == "train_loss"]
    assert len(losses) == 1 and losses[0][0] == 2 and math.isnan(losses[0][1])
    assert {p["name"] for p in points} >= {"train_loss", "lr"}


def _cli_main_with_connection_pragma(monkeypatch, capsys, pragma: str, *args: str) -> tuple[int, str]:
    """The real command line's main() on a store whose connections run `pragma` (how a test makes SQLite's own
    "disk is full" or "read-only" happen without a full disk or another user)."""
    import sys

    from sqlalchemy import event

    from clfbench.app import cli
    from clfbench.storage import dialect

    configure = dialect.configure_engine

    def configure_with_pragma(engine):
        configure(engine)

        @event.listens_for(engine, "connect")
        def _pragma(dbapi_connection, _record):
            dbapi_connection.execute(pragma)

    monkeypatch.setattr(dialect, "configure_engine", configure_with_pragma)
    monkeypatch.setattr(sys, "argv", ["clfbench", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("pragma, words", [
    ("PRAGMA max_page_count = 1", ["store failed", "database or disk is full", "free space"]),
    ("PRAGMA query_only = 1", ["store failed", "readonly database", "read-only"]),
])
def test_a_full_disk_or_a_read_only_store_is_one_line_and_a_non_zero_exit(home, tmp_path, monkeypatch, capsys,
                                                                          pragma, words):
    store = open_store()  # a current store, made before the fault
    queue.enqueue(store, [queue.NewRun(method="tfidf", model="none", task="massive-intent", shots=0, seed=0,
                                       spec_json="{}", spec_hash="h", launch="process", gpus_requested=None,
                                       nproc=1)])
    sweep = tmp_path / "sweep.yaml"  # 300 runs: more than the store's free pages hold
    sweep.write_text(f"method: tfidf\nmodel: none\ntask: massive-intent\ndata_dir: {SAMPLES}\n"
                     f"seed: {list(range(300))}\n")
    code, err = _cli_main_with_connection_pragma(monkeypatch, capsys, pragma, "queue", str(sweep))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(word in lines[0] for word in words), lines[0]
    assert len(queries.list_runs(store)) == 1  # nothing half-written
