"""Encoder fine-tuning: `AutoModelForSequenceClassification` + AdamW + linear warm-up/decay.

`run(ctx)` trains on the one sequence task of `ctx.tasks`, evaluates on dev every `eval_every` steps
(dev = the task's dev split, or `dev_fraction` of train held out with the run's seed), checkpoints every
`checkpoint_every` steps into `ctx.output_dir/checkpoint` (and resumes from it on a retry), and predicts
the test set on rank 0. Plain functions, no Trainer.

Distributed: with `ctx.world_size > 1` the worker has started the process group; the model is wrapped in
DistributedDataParallel and each rank draws `batch_size` examples per step from a DistributedSampler
(so the global batch is `batch_size * world_size`). Every collective (loss averaging, dev evaluation,
checkpoint barriers) runs on all ranks; `ctx.log_metric` is called on every rank and the context keeps
rank 0's calls.

Position in training is a function of the global step alone: epoch = step // steps_per_epoch, and the
batch order of an epoch comes from the sampler's (seed, epoch). A checkpoint therefore holds the
model, optimizer, scheduler, step and every rank's RNG states, and a resumed run continues exactly where
the checkpoint was taken (bit for bit on CPU).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.types import ClfbenchError, Example, MethodOutput, Prediction, RunContext, TaskData

CHECKPOINT_DIR = "checkpoint"
MAX_GRAD_NORM = 1.0
LOG_PREFIX = "encoder-finetune:"


# ------------------------------------------------------------------------------------------ entry


def run(ctx: RunContext) -> MethodOutput | None:
    opts = ctx.options
    task = _the_task(ctx)
    seed = int(getattr(ctx.spec, "seed", 0) or 0)
    distributed = ctx.world_size > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ClfbenchError("encoder-finetune: world_size > 1 but torch.distributed is not initialised")
    device = torch.device(ctx.device)

    train, dev = split_dev(task, opts.dev_fraction, seed)
    if not train:
        raise ClfbenchError(f"encoder-finetune: task {task.name} has no training examples")
    # ctx.tasks is final (the loader applied train_limit/test_limit); this cut is a no-op then.
    test = list(task.test[: opts.test_limit]) if opts.test_limit else list(task.test)
    label2id = {label: i for i, label in enumerate(task.labels)}

    tokenizer, model = load_model(ctx.model_path, task.labels)
    model.to(device)
    model.train()
    autocast = _autocast(device, opts.bf16)

    batch_size = opts.batch_size
    per_rank = math.ceil(len(train) / ctx.world_size)  # DistributedSampler pads every rank to this
    steps_per_epoch = math.ceil(per_rank / batch_size)
    total_steps = max(1, math.ceil(opts.epochs * steps_per_epoch))
    warmup_steps = int(round(opts.warmup_ratio * total_steps))

    fingerprint = {
        "labels": list(task.labels), "n_train": len(train), "n_dev": len(dev), "world_size": ctx.world_size,
        "batch_size": batch_size, "total_steps": total_steps, "seed": seed,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    checkpoint = load_checkpoint(ctx.output_dir, fingerprint, ctx.is_main)
    if distributed:
        # Every rank must start at the same step (e.g. an output_dir not shared between nodes): else none resumes.
        found = float(checkpoint["step"]) if checkpoint is not None else -1.0
        extremes = torch.tensor([found, -found], dtype=torch.float64, device=device)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        if float(extremes[0]) != -float(extremes[1]):
            if ctx.is_main:
                print(f"{LOG_PREFIX} ranks found different checkpoints in {ctx.output_dir}; starting afresh",
                      flush=True)
            checkpoint = None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])

    wrapped = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, opts.lr, opts.weight_decay, device)
    scheduler = make_scheduler(optimizer, warmup_steps, total_steps)
    start_step = 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_step = int(checkpoint["step"])
        rng = checkpoint["rng"]
        _set_rng_state(rng[ctx.rank] if ctx.rank < len(rng) else rng[0])
        if ctx.is_main:
            print(f"{LOG_PREFIX} resuming from {ctx.output_dir / CHECKPOINT_DIR} at step {start_step}/{total_steps} "
                  f"(epoch {start_step // steps_per_epoch})", flush=True)
        del checkpoint

    from torch.utils.data.distributed import DistributedSampler

    # Explicit replicas/rank: the same sampler serves one process (no process group needed) and DDP.
    sampler = DistributedSampler(range(len(train)), num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=True, seed=seed, drop_last=False)

    batches = _EpochBatches(sampler, batch_size, steps_per_epoch)

    def evaluate_dev(step: int) -> float:
        started = time.perf_counter()
        loss, accuracy = evaluate(model, tokenizer, dev, label2id, ctx, opts.max_length, autocast, batch_size * 2)
        ctx.log_metric(step, "eval_loss", loss)
        ctx.log_metric(step, "eval_accuracy", accuracy)
        return time.perf_counter() - started

    # ------------------------------------------------------------------------------- training loop
    step = start_step
    ctx.set_progress(step, total_steps)
    loop_started = time.perf_counter()
    paused = 0.0  # dev evaluation and checkpoint time, not training
    dev_eval_time = 0.0
    examples_seen = 0  # this rank, this attempt
    window_loss = torch.zeros((), dtype=torch.float64, device=device)
    window_steps = window_examples = 0
    window_started, window_paused = time.perf_counter(), 0.0

    while step < total_steps:
        examples = [train[i] for i in batches.at(step)]
        inputs = encode(tokenizer, [ex.text for ex in examples], opts.max_length, device)
        labels = torch.tensor([label2id[ex.label] for ex in examples], device=device)
        with autocast:
            logits = wrapped(**inputs).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        examples_seen += len(examples)
        window_loss += loss.detach().double()
        window_steps += 1
        window_examples += len(examples)

        if step % opts.log_every == 0 or step == total_steps:
            totals = torch.tensor([window_loss.item(), window_steps, window_examples], dtype=torch.float64,
                                  device=device)
            if distributed:
                dist.all_reduce(totals)  # sums over ranks: global mean loss, global examples
            elapsed = max(time.perf_counter() - window_started - window_paused, 1e-9)
            ctx.log_metric(step, "train_loss", float(totals[0] / totals[1]))
            ctx.log_metric(step, "lr", float(scheduler.get_last_lr()[0]))
            ctx.log_metric(step, "train_examples_per_s", float(totals[2]) / elapsed)
            ctx.set_progress(step, total_steps)
            window_loss.zero_()
            window_steps = window_examples = 0
            window_started, window_paused = time.perf_counter(), 0.0

        if dev and opts.eval_every and step % opts.eval_every == 0 and step < total_steps:
            spent = evaluate_dev(step)
            dev_eval_time += spent
            paused += spent
            window_paused += spent

        if opts.checkpoint_every and (step % opts.checkpoint_every == 0 or step == total_steps):
            started = time.perf_counter()
            save_checkpoint(ctx, model, optimizer, scheduler, step, steps_per_epoch, fingerprint)
            spent = time.perf_counter() - started
            paused += spent
            window_paused += spent

    train_time = time.perf_counter() - loop_started - paused
    ctx.set_progress(total_steps, total_steps)

    if dev:
        dev_eval_time += evaluate_dev(total_steps)

    # ------------------------------------------------------------------------------ test prediction
    global_examples = torch.tensor([examples_seen], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(global_examples)
    output = None
    if ctx.is_main:
        started = time.perf_counter()
        predicted = predict(model, tokenizer, [ex.text for ex in test], task.labels, opts.max_length, device,
                            autocast, batch_size * 2)
        test_time = time.perf_counter() - started
        predictions = [
            Prediction(example_id=ex.id, text=ex.text, gold=ex.label, predicted=label)
            for ex, label in zip(test, predicted)
        ]
        trained = float(global_examples.item())
        output = MethodOutput(
            predictions={task.name: predictions},
            extra_results={task.name: {
                "train_time_s": train_time,
                "eval_time_s": test_time,
                "dev_eval_time_s": dev_eval_time,
                "train_examples_per_s": trained / train_time if trained and train_time > 0 else 0.0,
                "test_examples_per_s": len(test) / test_time if test and test_time > 0 else 0.0,
                "train_steps": float(total_steps),
                "resumed_from_step": float(start_step),
            }},
        )
    if distributed:
        dist.barrier()  # the other ranks wait for rank 0's test prediction
    return output


# -------------------------------------------------------------------------------------------- data


class _EpochBatches:
    """This rank's batches (lists of train indices) for any global step: the order of an epoch depends only
    on (seed, epoch), so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, sampler, batch_size: int, steps_per_epoch: int):
        self.sampler, self.batch_size, self.steps_per_epoch = sampler, batch_size, steps_per_epoch
        self.epoch: int | None = None
        self.batches: list[list[int]] = []

    def at(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            self.batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            self.epoch = epoch
        return self.batches[position]


def _the_task(ctx: RunContext) -> TaskData:
    if len(ctx.tasks) != 1:
        raise ClfbenchError(f"encoder-finetune takes exactly one task, got {len(ctx.tasks)}")
    task = ctx.tasks[0]
    if task.kind != "sequence":
        raise ClfbenchError(f"encoder-finetune needs a sequence task; {task.name} is a {task.kind} task")
    if len(task.labels) < 2:
        raise ClfbenchError(f"encoder-finetune: task {task.name} has fewer than two labels")
    return task


def split_dev(task: TaskData, dev_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, dev): the task's dev split when it has one, else `dev_fraction` of train held out (seeded)."""
    if task.dev:
        return list(task.train), list(task.dev)
    n_dev = int(round(len(task.train) * dev_fraction))
    if dev_fraction > 0 and n_dev == 0 and len(task.train) >= 10:
        n_dev = 1
    if n_dev == 0:
        return list(task.train), []
    held_out = set(random.Random(seed).sample(range(len(task.train)), n_dev))
    train = [ex for i, ex in enumerate(task.train) if i not in held_out]
    dev = [ex for i, ex in enumerate(task.train) if i in held_out]
    return train, dev


def encode(tokenizer, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenise one batch, padded to its longest text (dynamic padding), cut at `max_length`."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {key: value.to(device) for key, value in batch.items()}


# ------------------------------------------------------------------------------------------- model


def load_model(model_path: str, labels: list[str]):
    """Tokenizer and sequence-classification model with a new head for `labels` (fp32 weights)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:  # decoder-style tokenizers
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.sep_token
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        dtype=torch.float32,
    )
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW; no weight decay on biases and normalisation weights (every parameter with fewer than 2 dims)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, **extra)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to the peak lr over `warmup_steps`, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16 and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------- evaluate, predict


def _length_sorted_batches(tokenizer, texts: list[str], max_length: int, batch_size: int) -> list[list[int]]:
    """Indices of `texts` in batches of similar length (less padding); order restored by the caller."""
    if not texts:
        return []
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def evaluate(model, tokenizer, dev: list[Example], label2id: dict[str, int], ctx: RunContext, max_length: int,
             autocast, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) on dev. Each rank scores its share; the sums are all-reduced (all ranks call)."""
    device = torch.device(ctx.device)
    shard = dev[ctx.rank::ctx.world_size]
    texts = [ex.text for ex in shard]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    was_training = model.training
    model.eval()
    for batch in _length_sorted_batches(tokenizer, texts, max_length, batch_size):
        inputs = encode(tokenizer, [texts[i] for i in batch], max_length, device)
        labels = torch.tensor([label2id[shard[i].label] for i in batch], device=device)
        with autocast:
            logits = model(**inputs).logits.float()
        totals[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        totals[1] += (logits.argmax(-1) == labels).sum().double()
        totals[2] += len(batch)
    model.train(was_training)
    if ctx.world_size > 1:
        dist.all_reduce(totals)
    count = max(float(totals[2]), 1.0)
    return float(totals[0]) / count, float(totals[1]) / count


@torch.no_grad()
def predict(model, tokenizer, texts: list[str], labels: list[str], max_length: int, device: torch.device,
            autocast, batch_size: int) -> list[str]:
    """The predicted label of every text, in order."""
    was_training = model.training
    model.eval()
    out: list[str | None] = [None] * len(texts)
    for batch in _length_sorted_batches(tokenizer, texts, max_length, batch_size):
        inputs = encode(tokenizer, [texts[i] for i in batch], max_length, device)
        with autocast:
            ids = model(**inputs).logits.argmax(-1).tolist()
        for i, label_id in zip(batch, ids):
            out[i] = labels[label_id]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.train(was_training)
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ checkpoints


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
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
                print(f"{LOG_PREFIX} ignoring unreadable checkpoint {path}: {error}", flush=True)
            continue
        if state.get("fingerprint") != fingerprint:
            if verbose:
                print(f"{LOG_PREFIX} ignoring checkpoint {path}: made for another setup "
                      f"({state.get('fingerprint')} != {fingerprint})", flush=True)
            continue
        return state
    return None
