"""The training scaffold every fine-tuning method stands on (`encoder-finetune`, `ls-llama`, `ls-unllama`,
`llm-finetune`): plain functions, one loop.

- `plan_steps`: steps per epoch, total and warm-up steps from the rows, batch size, processes and grad_accum;
- `start_training`: load the checkpoint of an earlier attempt when every rank found the same one, wrap the model
  for DDP, make the optimizer and schedule and put their state back (`engine.fsdp` builds the same `Training`
  under FSDP);
- epoch batches: the order of an epoch is a function of (seed, epoch) only (`sampler_epochs`,
  `length_grouped_epochs`, served per step by `epoch_batcher`), so a checkpoint needs only the step (plus model,
  optimizer, scheduler and RNG) to go on exactly;
- `train_loop`: the ONE optimizer-step loop. A method gives it a per-step function that computes the gradients
  of one step (one batch, or several micro-batches) and returns what it counted (`Tally`); the loop owns the
  optimizer step, progress, the logging window, dev evaluation, checkpoints and the pause accounting:
  - `train_loss` (and each head's part, for joint heads) is the summed loss over the summed weight since the last
    point, both summed over ranks first, so a 2-process run logs one global value per point (rank 0 writes it);
  - `train_examples_per_s` / `train_tokens_per_s` and the returned training time leave out dev evaluation and
    checkpoint writing;
  - a checkpoint is written every `checkpoint_every` steps and at the last step, after that step's evaluation;
- checkpoints: `save_checkpoint` writes a folder and swaps it in atomically (`replace_directory`), `load_checkpoint`
  reads it back only for the same setup (its fingerprint), `restore` puts optimizer, schedule and RNG back.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from clfbench.engine.artifacts import fetch_checkpoint, mirror_checkpoint
from clfbench.engine.context import CONVERTING, EVALUATING, TESTING, TRAINING, RunContext  # noqa: F401 (re-exported)
from clfbench.engine.types import ClfbenchError

MAX_GRAD_NORM = 1.0
CHECKPOINT_DIR = "checkpoint"  # under the run's output_dir
LOG = "checkpoint:"
RESUME_LINE = "resuming from {folder} at step {step}/{total} (epoch {epoch})"


# ------------------------------------------------------------------------------------------ step plan


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(n_rows: int, batch_size: int, world_size: int, epochs: float, warmup_ratio: float,
               grad_accum: int = 1, max_steps: int | None = None) -> StepPlan:
    """Every rank draws `batch_size` rows per micro-batch from its share of the rows (padded to ceil(n / world
    size), as DistributedSampler does), `grad_accum` micro-batches per optimizer step; `max_steps` (when given)
    replaces `epochs`: the epochs go on, reshuffled, until that many steps."""
    micro_batches = math.ceil(math.ceil(n_rows / world_size) / batch_size)
    steps_per_epoch = math.ceil(micro_batches / grad_accum)
    total_steps = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    return StepPlan(steps_per_epoch, total_steps, int(round(warmup_ratio * total_steps)))


def require_process_group(ctx: RunContext, log_prefix: str) -> None:
    if ctx.distributed and not (dist.is_available() and dist.is_initialized()):
        raise ClfbenchError(f"{log_prefix} world_size > 1 but torch.distributed is not initialised")


# --------------------------------------------------------------------------------------- epoch batches


def sampler_epochs(n_rows: int, batch_size: int, world_size: int, rank: int, seed: int
                   ) -> Callable[[int], list[list[int]]]:
    """epoch -> this rank's batches of row indices: DistributedSampler's seeded shuffle of that epoch, cut into
    batches. Explicit replicas and rank: the same sampler serves one process (no process group needed) and DDP."""
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(range(n_rows), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)

    def batches_of(epoch: int) -> list[list[int]]:
        sampler.set_epoch(epoch)
        order = list(sampler)
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    return batches_of


def length_grouped_epochs(lengths: Sequence[int], batch_size: int, world_size: int, rank: int, key: str,
                          window: int = 50) -> Callable[[int], list[list[int]]]:
    """epoch -> this rank's micro-batches, similar lengths together (less padding), in a random order seeded by
    (key, epoch): a seeded shuffle, sorted by length inside windows of `window` global batches, cut into global
    batches of batch_size * world_size whose order is shuffled again and whose rows are dealt round-robin, so
    every rank has the same number of micro-batches."""

    def batches_of(epoch: int) -> list[list[int]]:
        rng = random.Random(f"{key}:{epoch}")
        order = list(range(len(lengths)))
        rng.shuffle(order)
        order += order[: (-len(order)) % world_size]  # every rank gets a row of every global batch
        size = batch_size * world_size
        batches = []
        for start in range(0, len(order), size * window):
            chunk = sorted(order[start:start + size * window], key=lambda i: lengths[i])
            batches += [chunk[s:s + size] for s in range(0, len(chunk), size)]
        rng.shuffle(batches)
        return [batch[rank::world_size] for batch in batches]

    return batches_of


def epoch_batcher(batches_of: Callable[[int], list[list[int]]], steps_per_epoch: int, per_step: int = 1
                  ) -> Callable[[int], list[list[int]]]:
    """step -> the `per_step` (micro-)batches of that optimizer step; an epoch's batches are made once."""
    made: dict[int, list[list[int]]] = {}

    def at(step: int) -> list[list[int]]:
        epoch, position = divmod(step, steps_per_epoch)
        if epoch not in made:
            made.clear()
            made[epoch] = batches_of(epoch)
        return made[epoch][position * per_step:(position + 1) * per_step]

    return at


# ------------------------------------------------------------------------------------ training set-up


@dataclass
class Training:
    """What the loop steps: the module whose forward gives the loss (DDP- or FSDP-wrapped when there are several
    processes), its optimizer and schedule, the step to go on from, and how this wrapping clips gradients,
    back-propagates and writes a checkpoint. `full_state` (FSDP only) gathers the full weights on rank 0."""

    wrapped: torch.nn.Module
    optimizer: Any
    scheduler: Any
    start_step: int
    clip: Callable[[], object]
    save: Callable[[int], None]
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    full_state: Callable[[], dict] | None = None


def ranks_agree(step: int | None, ctx: RunContext) -> bool:
    """Whether every rank found a checkpoint at the same step (None: none found). A run resumes only then: an
    output_dir not shared between nodes must not let half the ranks start over."""
    if not ctx.distributed:
        return True
    found = float(step) if step is not None else -1.0
    extremes = torch.tensor([found, -found], dtype=torch.float64, device=torch.device(ctx.device))
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # max == -min: all the same
    return float(extremes[0]) == -float(extremes[1])


def agreed_checkpoint(ctx: RunContext, fingerprint: dict, log_prefix: str) -> dict | None:
    """The checkpoint of an earlier attempt of this run (see `load_checkpoint`), if every rank found the same."""
    checkpoint = load_checkpoint(ctx.output_dir, fingerprint, ctx.is_main)
    if ranks_agree(None if checkpoint is None else int(checkpoint["step"]), ctx):
        return checkpoint
    if ctx.is_main:
        print(f"{log_prefix} ranks found different checkpoints in {ctx.output_dir}; starting afresh", flush=True)
    return None


def announce_resume(ctx: RunContext, log_prefix: str, step: int, plan: StepPlan, line: str = RESUME_LINE) -> None:
    if ctx.is_main:
        text = line.format(folder=Path(ctx.output_dir) / CHECKPOINT_DIR, step=step, total=plan.total_steps,
                           epoch=step // plan.steps_per_epoch)
        print(f"{log_prefix} {text}", flush=True)


def wrap_ddp(module: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
    """DistributedDataParallel around `module` when there are several processes, else `module` itself."""
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(ctx.device)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def start_training(ctx: RunContext, model: torch.nn.Module, plan: StepPlan, fingerprint: dict, *, lr: float,
                   weight_decay: float, log_prefix: str, optimizer: str = "adamw",
                   module: torch.nn.Module | None = None, load_weights: Callable[[dict], object] | None = None,
                   model_state: Callable[[], dict] | None = None, resume_line: str = RESUME_LINE) -> Training:
    """A `Training` of `model`'s trainable parameters under DDP (`module`, default `model`, is what is wrapped
    and computes the loss), resumed from this run's checkpoint when every rank found the same one.
    `load_weights` / `model_state`: how a checkpoint's "model" is put back and made (default: the whole
    `model.load_state_dict` / `model.state_dict`; LoRA methods keep only what trains)."""
    checkpoint = agreed_checkpoint(ctx, fingerprint, log_prefix)
    if checkpoint is not None:
        (load_weights or model.load_state_dict)(checkpoint["model"])
    wrapped = wrap_ddp(module or model, ctx)
    made = make_optimizer(model, lr, weight_decay, torch.device(ctx.device), optimizer)
    scheduler = make_scheduler(made, plan.warmup_steps, plan.total_steps)
    start_step = 0
    if checkpoint is not None:
        start_step = restore(checkpoint, made, scheduler, ctx.rank)
        announce_resume(ctx, log_prefix, start_step, plan, resume_line)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = model_state or model.state_dict
    return Training(
        wrapped=wrapped, optimizer=made, scheduler=scheduler, start_step=start_step,
        clip=lambda: torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM),
        save=lambda step: save_checkpoint(ctx, state, made, scheduler, step, plan.steps_per_epoch, fingerprint))


def gradient_sync(training: Training, last: bool):
    """Gradients are reduced across ranks on a step's last micro-batch only (DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync`; a single process has nothing to synchronise)."""
    wrapped = training.wrapped
    if last:
        return contextlib.nullcontext()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        return _fsdp_no_sync(wrapped)
    return wrapped.no_sync() if hasattr(wrapped, "no_sync") else contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(wrapped):
    wrapped.set_requires_gradient_sync(False)  # recursive: every FSDP unit keeps its unsharded gradient
    try:
        yield
    finally:
        wrapped.set_requires_gradient_sync(True)


def optimizer_step(training: Training) -> None:
    training.clip()
    training.optimizer.step()
    training.scheduler.step()
    training.optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ loop


@dataclass
class Tally:
    """What one (micro-)batch of a step counted: its loss and, for joint heads, each head's part (tensors, summed
    on the device), the weight they are summed over (1 for a batch-mean loss, labelled tokens for a summed one),
    and the examples or tokens it computed (for throughput)."""

    loss: torch.Tensor
    weight: float
    count: float
    parts: Sequence[torch.Tensor] = ()


@dataclass
class LoopTimes:
    train_time_s: float  # training only: dev evaluation and checkpoints left out
    dev_eval_time_s: float
    counted: float  # examples (or tokens) the per-step function counted in this attempt, all ranks together


@dataclass
class _Window:
    """The tallies since the last logged point and the time they took (pauses left out)."""

    losses: torch.Tensor  # loss, then the parts: on the device, so no host sync per step
    weight: float = 0.0
    count: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    paused: float = 0.0

    @classmethod
    def empty(cls, parts: int, device: torch.device) -> "_Window":
        return cls(torch.zeros(1 + parts, dtype=torch.float64, device=device))

    def add(self, tally: Tally) -> None:
        self.losses += torch.stack([tally.loss, *tally.parts]).double()
        self.weight += tally.weight
        self.count += tally.count


def _log_window(ctx: RunContext, training: Training, window: _Window, step: int, total: int,
                part_names: Sequence[str], counted: str, echo: str | None) -> None:
    totals = torch.cat([window.losses, torch.tensor([window.weight, window.count], dtype=torch.float64,
                                                    device=window.losses.device)])
    if ctx.distributed:
        dist.all_reduce(totals)  # sums over ranks: the global mean loss and throughput
    *losses, weight, count = totals.tolist()
    elapsed = max(time.perf_counter() - window.started - window.paused, 1e-9)
    loss = losses[0] / max(weight, 1.0)
    ctx.log_metric(step, "train_loss", loss)
    for name, part in zip(part_names, losses[1:]):
        ctx.log_metric(step, name, part / max(weight, 1.0))
    ctx.log_metric(step, "lr", float(training.scheduler.get_last_lr()[0]))
    ctx.log_metric(step, f"train_{counted}_per_s", count / elapsed)
    ctx.set_progress(step, total)
    if echo and ctx.is_main:
        print(f"{echo} step {step}/{total} train_loss {loss:.4f} ({count / elapsed:.0f} {counted}/s)", flush=True)
    stop_if_loss_not_finite(loss, step)  # every rank holds the same summed loss, so every rank stops here


def stop_if_loss_not_finite(loss: float, step: int) -> None:
    """A NaN or infinite training loss ends the run `failed` with one line, its points up to this step kept (the
    caller logs them first; the worker flushes them before it writes the failure): the weights are NaN from here
    on, so training further would only spend hours. `step` is the point that showed it: the loss is checked where
    it is logged (every `log_every` steps), not per step, which would cost a device-to-host sync each step."""
    if not math.isfinite(loss):
        raise ClfbenchError(f"loss became {'NaN' if math.isnan(loss) else f'{loss}'} at step {step}")


def _pause(ctx: RunContext, training: Training, evaluate_dev: Callable[[int], float] | None, step: int,
           total: int) -> tuple[float, float]:
    """Dev evaluation and checkpoint due after `step`: (seconds both took, seconds of dev evaluation)."""
    opts = ctx.options
    evaluated = 0.0
    if evaluate_dev is not None and opts.eval_every and step % opts.eval_every == 0 and step < total:
        ctx.set_phase(EVALUATING)  # the evaluation's own batches say how far it is (`report_examples`)
        evaluated = evaluate_dev(step)
    saving = 0.0
    if opts.checkpoint_every and (step % opts.checkpoint_every == 0 or step == total):
        started = time.perf_counter()
        training.save(step)
        saving = time.perf_counter() - started
    return evaluated + saving, evaluated


def train_loop(ctx: RunContext, training: Training, plan: StepPlan, gradients: Callable[[int], Sequence[Tally]], *,
               evaluate_dev: Callable[[int], float] | None, part_names: Sequence[str] = (),
               counted: str = "examples", echo: str | None = None) -> LoopTimes:
    """Run optimizer steps `training.start_step + 1 .. plan.total_steps`.

    `gradients(step)`: back-propagates the loss of that step's batch (or micro-batches) and returns one `Tally`
    per batch; the loop then clips, steps the optimizer and the schedule. `part_names`: one logged train-loss
    series per tally part. `evaluate_dev(step)` logs dev metrics and returns the seconds it took (None: no dev
    set). `counted` names the throughput metric (`train_<counted>_per_s`); `echo` (default: the method's name)
    prefixes the log line rank 0 prints per logged point. `ctx.options` supplies `log_every`, `eval_every` and
    `checkpoint_every`.
    """
    device = torch.device(ctx.device)
    echo = echo or f"{ctx.method}:"  # every method's training shows in `clfbench logs -f`
    step, total = training.start_step, plan.total_steps
    ctx.set_progress(step, total)
    note_resume(ctx, step)
    loop_started, paused, dev_eval_time, seen = time.perf_counter(), 0.0, 0.0, 0.0  # seen: this rank, attempt
    window = _Window.empty(len(part_names), device)
    step_delay = float(os.environ.get(TEST_STEP_DELAY_ENV) or 0)
    while step < total:
        ctx.set_phase(TRAINING, step, total)  # only stores a tuple: the heartbeat thread writes it
        for tally in gradients(step):
            window.add(tally)
            seen += tally.count
        optimizer_step(training)
        step += 1
        if step_delay:
            time.sleep(step_delay)
        if step % ctx.options.log_every == 0 or step == total:
            _log_window(ctx, training, window, step, total, part_names, counted, echo)
            window = _Window.empty(len(part_names), device)
        spent, evaluated = _pause(ctx, training, evaluate_dev, step, total)
        paused, dev_eval_time, window.paused = paused + spent, dev_eval_time + evaluated, window.paused + spent

    train_time = time.perf_counter() - loop_started - paused
    ctx.set_progress(total, total)
    if evaluate_dev is not None:
        ctx.set_phase(EVALUATING)
        dev_eval_time += evaluate_dev(total)
    return LoopTimes(train_time_s=train_time, dev_eval_time_s=dev_eval_time, counted=all_ranks_sum(seen, ctx))


def note_resume(ctx: RunContext, start_step: int) -> None:
    """A retry says how it began, after the reason its previous attempt ended (the run list and `clfbench show`
    print both): from a checkpoint's step, or over from the start."""
    if ctx.attempt > 1 and ctx.is_main:
        ctx.note_attempt(f"attempt {ctx.attempt} resumed from step {start_step}" if start_step
                         else f"attempt {ctx.attempt} started over")


# Tests only: seconds to sleep after each batch of a dev evaluation, so that a test in a real terminal can watch
# the phase on a tiny model (tests/test_tui_tmux.py). Never set in real use.
TEST_EVAL_DELAY_ENV = "CLFBENCH_TEST_EVAL_DELAY_S"
# Tests only: seconds to sleep after each optimizer step, so that a tiny model's training lasts long enough for a
# store outage to land in it however fast the machine is (tests/test_store_outage.py). Never set in real use.
TEST_STEP_DELAY_ENV = "CLFBENCH_TEST_STEP_DELAY_S"


def report_examples(ctx: RunContext, phase: str, total: int, ranks: int = 1) -> Callable[[int], None]:
    """done -> the run's phase with `done` of `total` examples. `ranks`: how many ranks share the examples
    equally (dev evaluation): rank 0, the one that writes, counts its share times the ranks."""
    delay = float(os.environ.get(TEST_EVAL_DELAY_ENV) or 0) if phase == EVALUATING else 0.0

    def report(done: int) -> None:
        ctx.set_phase(phase, min(total, done * ranks), total)
        if delay:
            time.sleep(delay)

    return report


def all_ranks_sum(value: float, ctx: RunContext) -> float:
    total = torch.tensor([value], dtype=torch.float64, device=torch.device(ctx.device))
    if ctx.distributed:
        dist.all_reduce(total)
    return float(total.item())


# ------------------------------------------------------------------------------ optimizer, schedule


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                   kind: str = "adamw"):
    """AdamW (or plain Adam); no weight decay on biases and normalisation weights (parameters with < 2 dims)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    optimizer_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[kind]
    return optimizer_class(groups, lr=lr, **extra)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to the peak lr over `warmup_steps`, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast on a GPU that supports it (when asked), else nothing."""
    if device.type == "cuda" and bf16 and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------ checkpoints


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def replace_directory(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` in the place of `final` by renames: a reader finds the old folder or the
    new one, whole. A crash between the two renames leaves `.<final>.old`, which `load_checkpoint` reads."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(ctx: RunContext, model_state: Callable[[], dict], optimizer, scheduler, step: int,
                    steps_per_epoch: int, fingerprint: dict) -> None:
    """Write `output_dir/checkpoint` atomically on rank 0 (temp folder + rename); all ranks must call.
    `model_state()`: the weights to keep (e.g. `model.state_dict`)."""
    rng = [rng_state()]
    if ctx.world_size > 1:
        rng = [None] * ctx.world_size
        dist.all_gather_object(rng, rng_state())
    if ctx.is_main:
        output_dir = Path(ctx.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / f".{CHECKPOINT_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        epoch, position = divmod(step, steps_per_epoch)
        torch.save({
            "model": model_state(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step, "epoch": epoch, "position": position,
            "rng": rng,
            "fingerprint": fingerprint,
        }, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(
            {"step": step, "epoch": epoch, "position_in_epoch": position, "saved_at": time.time(),
             "fingerprint": fingerprint}, indent=2) + "\n")
        replace_directory(tmp, output_dir / CHECKPOINT_DIR)
        mirror_checkpoint(output_dir / CHECKPOINT_DIR, step, LOG)  # where CLFBENCH_ARTIFACTS is a URL
    if ctx.world_size > 1:
        dist.barrier()


def restore(checkpoint: dict, optimizer, scheduler, rank: int) -> int:
    """Put a loaded checkpoint's optimizer, schedule and this rank's random state back; the step to go on from.
    (The model's weights are the caller's: each method loads them its own way, e.g. only LoRA and the head.)"""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    rng = checkpoint["rng"]
    set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    return int(checkpoint["step"])


def remove_unfinished_checkpoints(output_dir: Path) -> None:
    """Delete the `.checkpoint.tmp-<pid>` folders of saves an earlier attempt did not finish (killed mid-save): each
    is as big as a checkpoint, and nothing ever reads one. Called when a run starts, before any save of its own."""
    for folder in output_dir.glob(f".{CHECKPOINT_DIR}.tmp-*"):
        shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(output_dir: Path, fingerprint: dict, verbose: bool) -> dict | None:
    """The checkpoint left by an earlier attempt of this run, or None (missing, unreadable, other setup)."""
    output_dir = Path(output_dir)
    remove_unfinished_checkpoints(output_dir)
    fetch_checkpoint(output_dir, LOG if verbose else "")  # from CLFBENCH_ARTIFACTS' URL, on a host without it
    for folder in (output_dir / CHECKPOINT_DIR, output_dir / f".{CHECKPOINT_DIR}.old"):
        path = folder / "state.pt"
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a torn file cannot happen (atomic rename), an old format can
            if verbose:
                print(f"{LOG} ignoring unreadable checkpoint {path}: {error}", flush=True)
            continue
        if state.get("fingerprint") != fingerprint:
            if verbose:
                print(f"{LOG} ignoring checkpoint {path}: made for another setup "
                      f"({state.get('fingerprint')} != {fingerprint})", flush=True)
            continue
        return state
    return None
