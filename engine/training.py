"""The optimizer-step loop that the head-training methods share (`encoder-finetune`, `ls-llama`, `ls-unllama`).

One loop, so that logging, pause accounting and checkpoint timing cannot drift apart between methods:

- `train_loss` (and each head's part, for joint heads) is the mean over the steps since the last point, summed
  over ranks first, so a 2-process run logs one global value per point (rank 0 writes it);
- `train_examples_per_s` and the returned training time leave out dev evaluation and checkpoint writing;
- a checkpoint is written every `checkpoint_every` steps and at the last step, after that step's evaluation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from engine.types import RunContext

MAX_GRAD_NORM = 1.0


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
