"""What the training methods share: the optimizer-step loop of the head-training methods (`encoder-finetune`,
`ls-llama`, `ls-unllama`), and the optimizer, schedule, autocast and checkpoint helpers that `llm-finetune` uses too.

One loop, so that logging, pause accounting and checkpoint timing cannot drift apart between methods:

- `train_loss` (and each head's part, for joint heads) is the mean over the steps since the last point, summed
  over ranks first, so a 2-process run logs one global value per point (rank 0 writes it);
- `train_examples_per_s` and the returned training time leave out dev evaluation and checkpoint writing;
- a checkpoint is written every `checkpoint_every` steps and at the last step, after that step's evaluation.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from clfbench.engine.context import RunContext

MAX_GRAD_NORM = 1.0
CHECKPOINT_DIR = "checkpoint"  # under the run's output_dir
LOG = "checkpoint:"


@dataclass
class LoopTimes:
    train_time_s: float  # training only: dev evaluation and checkpoints left out
    dev_eval_time_s: float
    examples: float  # training examples seen in this attempt, all ranks together


def train_loop(ctx: RunContext, *, device: torch.device, distributed: bool, start_step: int, total_steps: int,
               batch_at: Callable[[int], Sequence[int]],
               losses_of: Callable[[Sequence[int]], tuple[torch.Tensor, list[torch.Tensor]]],
               parameters: list[torch.nn.Parameter], optimizer, scheduler, opts,
               evaluate_dev: Callable[[int], float] | None, save_checkpoint: Callable[[int], None],
               part_names: Sequence[str] = ()) -> LoopTimes:
    """Run optimizer steps `start_step + 1 .. total_steps`.

    `batch_at(step)`: the training-row indices of that step's batch. `losses_of(indices)`: the loss to minimise
    and its parts, one per name in `part_names` (logged as extra train-loss series; empty for one head).
    `evaluate_dev(step)` returns the seconds it took (None: no dev set). `opts` supplies `log_every`,
    `eval_every` and `checkpoint_every`.
    """
    step = start_step
    ctx.set_progress(step, total_steps)
    loop_started = time.perf_counter()
    paused = dev_eval_time = 0.0
    examples_seen = 0  # this rank, this attempt
    parts = len(part_names)
    window = torch.zeros(1 + parts + 2, dtype=torch.float64, device=device)  # loss, parts, steps, examples
    window_started, window_paused = time.perf_counter(), 0.0

    while step < total_steps:
        indices = batch_at(step)
        loss, part_losses = losses_of(indices)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        examples_seen += len(indices)
        # Accumulated on the device: no host sync per step.
        window[: 1 + parts] += torch.stack([loss.detach(), *(p.detach() for p in part_losses)]).double()
        window[-2] += 1
        window[-1] += len(indices)

        if step % opts.log_every == 0 or step == total_steps:
            totals = window.clone()
            if distributed:
                dist.all_reduce(totals)  # sums over ranks: the global mean loss and examples
            values = totals.tolist()
            steps_sum, examples_sum = values[-2], values[-1]
            elapsed = max(time.perf_counter() - window_started - window_paused, 1e-9)
            ctx.log_metric(step, "train_loss", values[0] / steps_sum)
            for k, name in enumerate(part_names):
                ctx.log_metric(step, name, values[1 + k] / steps_sum)
            ctx.log_metric(step, "lr", float(scheduler.get_last_lr()[0]))
            ctx.log_metric(step, "train_examples_per_s", examples_sum / elapsed)
            ctx.set_progress(step, total_steps)
            window.zero_()
            window_started, window_paused = time.perf_counter(), 0.0

        spent = 0.0
        if evaluate_dev is not None and opts.eval_every and step % opts.eval_every == 0 and step < total_steps:
            evaluated = evaluate_dev(step)
            dev_eval_time += evaluated
            spent += evaluated
        if opts.checkpoint_every and (step % opts.checkpoint_every == 0 or step == total_steps):
            started = time.perf_counter()
            save_checkpoint(step)
            spent += time.perf_counter() - started
        paused += spent
        window_paused += spent

    train_time = time.perf_counter() - loop_started - paused
    ctx.set_progress(total_steps, total_steps)
    if evaluate_dev is not None:
        dev_eval_time += evaluate_dev(total_steps)
    seen = torch.tensor([examples_seen], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(seen)
    return LoopTimes(train_time_s=train_time, dev_eval_time_s=dev_eval_time, examples=float(seen.item()))


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


def _rng_state() -> dict:
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


def save_checkpoint(ctx: RunContext, model, optimizer, scheduler, step: int, steps_per_epoch: int,
                    fingerprint: dict) -> None:
    """Write `output_dir/checkpoint` atomically on rank 0 (temp folder + rename); all ranks must call."""
    rng = [_rng_state()]
    if ctx.world_size > 1:
        rng = [None] * ctx.world_size
        dist.all_gather_object(rng, _rng_state())
    if ctx.is_main:
        output_dir = Path(ctx.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / f".{CHECKPOINT_DIR}.tmp-{os.getpid()}"
        final, old = output_dir / CHECKPOINT_DIR, output_dir / f".{CHECKPOINT_DIR}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        epoch, position = divmod(step, steps_per_epoch)
        torch.save({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step, "epoch": epoch, "position": position,
            "rng": rng,
            "fingerprint": fingerprint,
        }, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(
            {"step": step, "epoch": epoch, "position_in_epoch": position, "saved_at": time.time(),
             "fingerprint": fingerprint}, indent=2) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)  # a crash right here leaves .checkpoint.old, which load_checkpoint reads
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
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


def load_checkpoint(output_dir: Path, fingerprint: dict, verbose: bool) -> dict | None:
    """The checkpoint left by an earlier attempt of this run, or None (missing, unreadable, other setup)."""
    output_dir = Path(output_dir)
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
