"""The tfidf method (TF-IDF + logistic regression, the classical baseline): it learns the shipped samples, is
deterministic, runs through the real CLI and engine without torch, and refuses slot tasks at queue time."""
from __future__ import annotations

from collections import Counter

import pytest

from clfbench.engine import metrics
from clfbench.engine.methods import tfidf
from clfbench.engine.tasks import get_task, load_task
from tests.conftest import SAMPLES, method_context, run_method


def sample_task(name: str):
    return load_task(get_task(name), data_dir=SAMPLES, seed=0)


def majority_accuracy(task) -> float:
    """Accuracy on test of always answering the most frequent training label."""
    majority = Counter(e.label for e in task.train).most_common(1)[0][0]
    return sum(e.label == majority for e in task.test) / len(task.test)


@pytest.mark.parametrize("name", ["massive-intent", "20ng-7class"])
def test_beats_the_majority_class_by_far_with_labels_of_the_task(name):
    task = sample_task(name)
    points, progress = [], []
    ctx = method_context("tfidf", "tfidf", [task], log_metric=lambda *p: points.append(p),
                         set_progress=lambda *p: progress.append(p))
    output = run_method(tfidf, ctx)
    rows = output.predictions[name]
    assert [row.example_id for row in rows] == [e.id for e in task.test]
    assert {row.predicted for row in rows} <= set(task.labels)
    accuracy = sum(row.predicted == row.gold for row in rows) / len(rows)
    assert accuracy >= majority_accuracy(task) + 0.3, (accuracy, majority_accuracy(task))
    # Each answer carries the logistic regression's probability for it (at least 1/labels: it is the largest),
    # so the worker stores an ECE.
    assert all(1 / len(task.labels) <= row.confidence <= 1 for row in rows)
    assert 0 <= metrics.task_results("sequence", rows, task.labels)["ece"] < 0.5
    extra = output.extra_results[name]
    assert extra["features"] > 1000 and extra["fit_time_s"] > 0
    assert progress[-1][0] == progress[-1][1] > 0
    if task.dev:  # MASSIVE: dev accuracy is reported and logged, never used to choose
        assert 0.3 < extra["dev_accuracy"] <= 1 and [name for _, name, _ in points] == ["eval_accuracy"]
    else:  # 20NG has no dev split
        assert "dev_accuracy" not in extra and points == []


def test_same_seed_same_predictions_and_the_options_reach_the_model():
    task = load_task(get_task("massive-intent"), data_dir=SAMPLES, train_limit=300, seed=3)

    def predicted(**options):
        output = run_method(tfidf, method_context("tfidf", "tfidf", [task], seed=3, train_limit=300, **options))
        return [row.predicted for row in output.predictions["massive-intent"]], output.extra_results["massive-intent"]

    first, first_extra = predicted()
    again, again_extra = predicted()
    assert first == again and first_extra["features"] == again_extra["features"]
    unigrams, unigram_extra = predicted(max_ngram=1, C=0.01)
    assert unigram_extra["features"] < first_extra["features"] and unigrams != first


# ------------------------------------------------------------------------------------------- CLI + engine

# Put on PYTHONPATH for the engine, this makes `import torch` fail in torchrun's workers (which have LOCAL_RANK),
# and says so in the run's log, while the engine and torchrun itself import what they like.
NO_TORCH_IN_WORKERS = '''
import os, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            print(f"blocked: import {name} in a worker", file=sys.stderr, flush=True)
            raise ModuleNotFoundError(f"no torch in this worker: {name}")
        return None

if "LOCAL_RANK" in os.environ:
    sys.meta_path.insert(0, NoTorch())
'''


def test_queue_and_run_through_the_cli_beside_another_method_without_torch(cli, tmp_path):
    cli.env["OMP_NUM_THREADS"] = "1"
    data = ["--task", "massive-intent", "--data-dir", str(SAMPLES)]
    (other,) = cli.json("queue", "--method", "encoder-finetune", "--model", "tiny-bert", *data,
                        "-o", "epochs=1", "-o", "train_limit=40", "-o", "test_limit=10")
    assert cli.run("engine", "--until-idle").returncode == 0  # with torch, as an encoder needs it
    other_shown = cli.json("show", str(other["id"]))
    assert other_shown["status"] == "succeeded", other_shown

    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TORCH_IN_WORKERS)
    cli.env["PYTHONPATH"] = f"{blocker}:{cli.env['PYTHONPATH']}" if cli.env.get("PYTHONPATH") else str(blocker)
    (run,) = cli.json("queue", "--method", "tfidf", "--model", "tfidf", *data)
    assert cli.run("engine", "--until-idle").returncode == 0

    shown = cli.json("show", str(run["id"]))
    assert shown["status"] == "succeeded", shown
    results = shown["results"]["massive-intent"]
    assert results["n"] == 200 and results["accuracy"] > 0.5 and 0 < results["dev_accuracy"] <= 1
    log = cli.run("logs", str(run["id"])).stdout
    assert "tfidf: logistic regression (C=10, lbfgs) fitted" in log
    assert "blocked: import torch" not in log and "thread(s) per rank" not in log

    md = cli.run("results", "--format", "md").stdout
    assert "| tfidf · tfidf |" in md and "| tiny-bert · encoder-finetune |" in md


def test_queue_refuses_a_token_task_in_one_line(cli):
    refused = cli.run("queue", "--method", "tfidf", "--model", "tfidf", "--task", "massive-slots",
                      "--data-dir", str(SAMPLES), check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().count("\n") == 0
    assert "method tfidf handles sequence tasks; massive-slots is a token task" in refused.stderr
    assert cli.json("ls") == []
