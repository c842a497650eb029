"""The training scaffold (engine/training.py) on its own: step plans, epoch batches, the loop's logging window,
evaluation and checkpoint timing and pause accounting, the atomic folder swap, and resuming only when every rank
found the same checkpoint (2 processes over gloo). The methods' own tests run it end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from clfbench.engine import training  # noqa: E402
from clfbench.engine.context import RunContext  # noqa: E402
from clfbench.engine.training import StepPlan, Tally  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


class Recorder:
    def __init__(self):
        self.metrics: list[tuple[int, str, float]] = []
        self.progress: list[tuple[int, int]] = []

    def log_metric(self, step: int, name: str, value: float) -> None:
        self.metrics.append((step, name, value))

    def values(self, name: str) -> list[tuple[int, float]]:
        return [(s, v) for s, n, v in self.metrics if n == name]


def make_ctx(output_dir: Path, recorder: Recorder | None = None, rank: int = 0, world_size: int = 1,
             **options) -> RunContext:
    recorder = recorder or Recorder()
    opts = SimpleNamespace(**{"log_every": 1, "eval_every": 0, "checkpoint_every": 0, **options})
    return RunContext(run_id=1, attempt=1, spec=SimpleNamespace(seed=0, method="encoder-finetune"), options=opts,
                      tasks=[], model_path="",
                      output_dir=output_dir, rank=rank, world_size=world_size, local_rank=rank, device="cpu",
                      log_metric=recorder.log_metric, set_progress=lambda step, total: recorder.progress.append(
                          (step, total)))


# ------------------------------------------------------------------------------------------ step plan


def test_plan_steps():
    # 152 rows, one process, 16 per batch: 10 steps an epoch (the last batch short).
    assert training.plan_steps(152, 16, 1, 6, 0.06) == StepPlan(10, 60, 4)
    # Two processes draw 76 rows each (DistributedSampler pads an odd count up).
    assert training.plan_steps(152, 8, 2, 6, 0.0) == StepPlan(10, 60, 0)
    assert training.plan_steps(153, 8, 2, 1, 0.0).steps_per_epoch == 10  # ceil(77 / 8)
    # Micro-batches per epoch 8, 3 per step: 3 steps an epoch; half an epoch rounds up; never 0 steps.
    assert training.plan_steps(64, 4, 2, 1, 0.0, grad_accum=3).steps_per_epoch == 3
    assert training.plan_steps(64, 4, 2, 0.5, 0.0).total_steps == 4
    assert training.plan_steps(1, 32, 1, 0.01, 0.0).total_steps == 1


# --------------------------------------------------------------------------------------- epoch batches


def test_epoch_batches_depend_on_seed_and_epoch_only_and_are_made_once_an_epoch():
    made = []

    def batches_of(epoch):
        made.append(epoch)
        return [[epoch, i] for i in range(6)]

    at = training.epoch_batcher(batches_of, steps_per_epoch=3, per_step=2)
    assert at(0) == [[0, 0], [0, 1]] and at(2) == [[0, 4], [0, 5]] and at(1) == [[0, 2], [0, 3]]
    assert at(3) == [[1, 0], [1, 1]] and made == [0, 1]
    assert at(0) == [[0, 0], [0, 1]] and made == [0, 1, 0]  # a past epoch is made again, identically

    ranks = [training.sampler_epochs(11, 4, 2, rank, seed=5) for rank in (0, 1)]
    epoch0 = [r(0) for r in ranks]
    assert [len(b) for b in epoch0[0]] == [4, 2]  # 6 rows a rank (one repeated), batches of 4
    assert set(i for r in epoch0 for b in r for i in b) == set(range(11))
    again = training.sampler_epochs(11, 4, 2, 0, seed=5)
    assert again(0) == epoch0[0] and again(1) != epoch0[0]
    assert training.sampler_epochs(11, 4, 2, 0, seed=6)(0) != epoch0[0]


# ------------------------------------------------------------------------------------------------ loop


def toy_training(output_dir: Path, saved: list[int]) -> tuple[torch.nn.Linear, training.Training]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = training.make_optimizer(model, 0.1, 0.0, torch.device("cpu"))
    scheduler = training.make_scheduler(optimizer, 0, 10)
    return model, training.Training(wrapped=model, optimizer=optimizer, scheduler=scheduler, start_step=0,
                                    clip=lambda: None, save=saved.append)


def test_loop_logs_window_means_evaluates_checkpoints_and_leaves_pauses_out(tmp_path, capsys):
    recorder = Recorder()
    ctx = make_ctx(tmp_path, recorder, log_every=4, eval_every=3, checkpoint_every=4)
    saved: list[int] = []
    model, run = toy_training(tmp_path, saved)
    evaluated = []

    def gradients(step):  # two micro-batches: losses step+1 and 10*(step+1), 5 labelled tokens each
        tallies = []
        for scale in (1.0, 10.0):
            loss = model(torch.ones(1, 3)).sum() * 0 + scale * (step + 1)
            loss.backward()
            tallies.append(Tally(loss.detach(), weight=5.0, count=7.0, parts=[loss.detach() / 2]))
        return tallies

    def evaluate_dev(step):  # as the methods do: the seconds it took
        started = time.perf_counter()
        evaluated.append(step)
        time.sleep(0.3)
        return time.perf_counter() - started

    times = training.train_loop(ctx, run, StepPlan(10, 10, 0), gradients, evaluate_dev=evaluate_dev,
                                part_names=["train_loss/a"], counted="tokens", echo="toy:")
    # Points at 4, 8 and the last step 10: the window's summed loss over its summed weight.
    mean = {4: 11 * (1 + 2 + 3 + 4) / 40, 8: 11 * (5 + 6 + 7 + 8) / 40, 10: 11 * (9 + 10) / 20}
    assert recorder.values("train_loss") == [(s, pytest.approx(v)) for s, v in mean.items()]
    assert recorder.values("train_loss/a") == [(s, pytest.approx(v / 2)) for s, v in mean.items()]
    assert [s for s, _ in recorder.values("train_tokens_per_s")] == [4, 8, 10]
    assert [s for s, _ in recorder.values("lr")] == [4, 8, 10] and recorder.values("lr")[-1][1] == 0.0
    assert "toy: step 8/10 train_loss 7.1500" in capsys.readouterr().out
    # Dev every 3 steps before the last, then once at the end; checkpoints every 4 and at the last step.
    assert evaluated == [3, 6, 9, 10] and saved == [4, 8, 10]
    assert times.dev_eval_time_s >= 1.2
    assert times.train_time_s < 0.3  # the 1.2 s of dev evaluation are not training time
    assert times.counted == 10 * 2 * 7.0
    assert recorder.progress[0] == (0, 10) and recorder.progress[-1] == (10, 10)


def test_loop_goes_on_from_the_start_step_and_a_finished_run_trains_nothing(tmp_path):
    recorder = Recorder()
    saved: list[int] = []
    model, run = toy_training(tmp_path, saved)
    run.start_step = 10
    times = training.train_loop(make_ctx(tmp_path, recorder), run, StepPlan(10, 10, 0), lambda step: 1 / 0,
                                evaluate_dev=None)
    assert recorder.metrics == [] and saved == [] and times.counted == 0.0
    assert recorder.progress == [(10, 10), (10, 10)]


# ----------------------------------------------------------------------------------------- checkpoints


def test_replace_directory_swaps_whole_folders(tmp_path):
    final, tmp = tmp_path / "checkpoint", tmp_path / ".checkpoint.tmp"
    for folder, text in ((final, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / "meta.json").write_text(text)
    training.replace_directory(tmp, final)
    assert (final / "meta.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temp or .old folder left
    tmp.mkdir()
    (tmp / "meta.json").write_text("first")
    training.replace_directory(tmp, tmp_path / "fresh")  # no folder to replace yet
    assert (tmp_path / "fresh" / "meta.json").read_text() == "first"


def save_one(output_dir: Path, step: int) -> None:
    _, run = toy_training(output_dir, [])
    training.save_checkpoint(make_ctx(output_dir), run.wrapped.state_dict, run.optimizer, run.scheduler, step, 10,
                             {"setup": 1})


def test_a_checkpoint_resumes_only_the_same_setup(tmp_path, capsys):
    save_one(tmp_path, 4)
    model, _ = toy_training(tmp_path, [])
    again = training.start_training(make_ctx(tmp_path), model, StepPlan(10, 20, 0), {"setup": 1}, lr=0.1,
                                    weight_decay=0.0, log_prefix="toy:")
    assert again.start_step == 4
    assert f"toy: resuming from {tmp_path / 'checkpoint'} at step 4/20 (epoch 0)" in capsys.readouterr().out
    other = training.start_training(make_ctx(tmp_path), model, StepPlan(10, 20, 0), {"setup": 2}, lr=0.1,
                                    weight_decay=0.0, log_prefix="toy:")
    assert other.start_step == 0 and "made for another setup" in capsys.readouterr().out


def test_a_resume_removes_the_temp_folders_of_saves_killed_midway(tmp_path):
    save_one(tmp_path, 4)
    killed = tmp_path / ".checkpoint.tmp-99999"  # what a worker killed inside save_checkpoint leaves
    killed.mkdir()
    (killed / "state.pt").write_bytes(b"x" * 1000)
    model, _ = toy_training(tmp_path, [])
    again = training.start_training(make_ctx(tmp_path), model, StepPlan(10, 20, 0), {"setup": 1}, lr=0.1,
                                    weight_decay=0.0, log_prefix="toy:")
    assert again.start_step == 4
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".checkpoint")) == []


def test_a_loss_that_becomes_nan_stops_the_loop_with_one_line_after_logging_it(tmp_path):
    recorder = Recorder()
    ctx = make_ctx(tmp_path, recorder, log_every=2)
    model, run = toy_training(tmp_path, [])

    def gradients(step):  # finite for 3 steps, then NaN
        loss = model(torch.ones(1, 3)).sum() * 0 + (float("nan") if step >= 3 else 1.0)
        loss.backward()
        return [Tally(loss.detach(), weight=1.0, count=1.0)]

    with pytest.raises(training.ClfbenchError, match=r"^loss became NaN at step 4$"):
        training.train_loop(ctx, run, StepPlan(10, 10, 0), gradients, evaluate_dev=None)
    losses = recorder.values("train_loss")
    assert losses[0] == (2, 1.0) and losses[1][0] == 4 and losses[1][1] != losses[1][1]  # NaN, kept


AGREEMENT_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    from tests.test_training import make_ctx
    from clfbench.engine import training

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    found = {{}}
    for case in ("same", "differs"):
        folder = Path({out!r}, case, "shared" if case == "same" else f"rank{{rank}}")
        ctx = make_ctx(folder, rank=rank, world_size=2)
        checkpoint = training.agreed_checkpoint(ctx, {{"setup": 1}}, "toy:")
        found[case] = None if checkpoint is None else checkpoint["step"]
    Path({out!r}, f"rank{{rank}}.json").write_text(json.dumps(found))
    dist.barrier()
    dist.destroy_process_group()
""")


def test_a_run_resumes_only_when_every_rank_found_the_same_checkpoint(tmp_path):
    save_one(tmp_path / "same" / "shared", 4)
    save_one(tmp_path / "differs" / "rank0", 4)  # rank 1's folder has none (output_dir not shared)
    script = tmp_path / "agree.py"
    script.write_text(AGREEMENT_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert found == [{"same": 4, "differs": None}] * 2
    assert "toy: ranks found different checkpoints" in result.stdout
