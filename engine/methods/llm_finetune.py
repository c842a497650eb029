"""Generative full fine-tuning of a causal LM as a classifier (Zhao et al., sections 5.3 and 5.5).

`run(ctx)` trains every weight of a decoder LLM on the `prompt` method's prompts and predicts with its decisions:

- a training sequence is the chat prompt exactly as `prompt` feeds it (`PromptBuilder.render` -> `ChatFormat.text`
  -> `ChatFormat.encode`, zero- or `spec.shots`-shot), then the target answer (`PromptBuilder.target`: the label,
  the slot list, or for two tasks "a+b" the consolidated JSON answer), then the model's stop token. The answer is
  tokenised after the prompt the way constrained decoding tokenises it (`Decoder.joint_split`). Only the answer
  tokens and the stop token carry labels; every prompt position and every pad is IGNORE_INDEX (`encode_item`);
- the loss is the mean cross-entropy over the labelled tokens of an optimizer step, exact across micro-batches
  (`grad_accum`) and processes: each rank counts its step's labelled tokens first, the counts are summed, and each
  micro-batch's summed loss is scaled by world_size / global tokens (DDP then averages over ranks);
- `share_prefix` (default): the prompt text every example shares (system prompt, instruction, label list, shots:
  450 of MASSIVE intent's ~475 tokens for SmolLM2) runs once per micro-batch with gradients, and its keys/values
  are expanded to every row, whose own part (document, prompt tail, answer) follows with explicit positions and a
  4-D attention mask. The same maths as whole sequences (tested), ~8x fewer tokens on MASSIVE. Logits are
  computed only for the columns that hold answer tokens (`logits_to_keep`);
- micro-batches are grouped by length: a seeded shuffle per epoch, sorted by length inside windows of 50 batches,
  cut into batches whose order is shuffled again; with several ranks a global batch of batch_size * world_size
  similar-length rows is dealt round-robin, so every rank has the same number of micro-batches;
- dev: the tasks' dev split (or `dev_fraction` of train held out, seeded; `dev_limit` keeps the first N) gives
  `eval_loss` every `eval_every` steps and at the end; `train_loss`, `lr`, `train_tokens_per_s` (tokens
  computed: a shared prefix counts once per micro-batch) every `log_every`;
- checkpoints every `checkpoint_every` steps into ctx.output_dir/checkpoint (model, optimizer, scheduler, step and
  every rank's RNG; `engine.methods.encoder_finetune.save_checkpoint`, atomic) and an interrupted run resumes
  from it: the batch order of an epoch depends on (seed, epoch) only, so the step says where to go on;
- after training, rank 0 predicts the test set with `engine.decoding.decide` on the trained in-memory model
  (`decision`: generate | constrained | score, `score_norm`), the other ranks return None.

`strategy`: `ddp` (DistributedDataParallel over gloo on CPU, NCCL on GPUs) or `fsdp` (FullyShardedDataParallel
through accelerate, for a model whose weights + gradients + Adam state do not fit one GPU: decoder layers are
sharded over the GPUs; CUDA only, refused on CPU). bf16 autocast on GPUs that support it, fp32 master weights.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clfbench.engine.dev_split import split_dev_rows
from clfbench.engine.decoding import SENTINEL, DecisionSettings, Decoder, decide, load_model
from clfbench.engine.prompting.chat import ChatFormat
from clfbench.engine.prompting.library import Item, PromptBuilder, load_prompt_set, paired_items
from clfbench.engine.training import (CHECKPOINT_DIR, MAX_GRAD_NORM, autocast_for, load_checkpoint, make_optimizer,
                             make_scheduler, restore, save_checkpoint)
from clfbench.engine.context import RunContext
from clfbench.engine.types import ClfbenchError, MethodOutput

LOG = "llm-finetune:"
IGNORE_INDEX = -100  # cross-entropy skips these positions: the prompt and the padding
SORT_WINDOW = 50  # batches per length-sorted window (more: less padding, less randomness)
FORMAT = 1  # in the checkpoint fingerprint


# ------------------------------------------------------------------------------------------------ entry


def run(ctx: RunContext) -> MethodOutput | None:
    opts = ctx.options
    device = torch.device(ctx.device)
    if opts.strategy == "fsdp" and device.type != "cuda":
        raise ClfbenchError("llm-finetune: strategy=fsdp needs CUDA GPUs (FSDP shards the model over NCCL); "
                            "on CPU use strategy=ddp")
    distributed = ctx.world_size > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ClfbenchError("llm-finetune: world_size > 1 but torch.distributed is not initialised")
    shots, seed = ctx.shots, ctx.seed
    prompt = load_prompt_set(opts.prompt_set).select(ctx.tasks, shots)

    started = time.perf_counter()
    tokenizer, model = load_model(ctx.model_path, "float32", device)  # fp32 master weights; bf16 by autocast
    chat = ChatFormat(tokenizer, opts.chat_format, getattr(model, "generation_config", None))
    builder = PromptBuilder.create(prompt, ctx.tasks, shots, seed, opts.max_text_chars, chat.forbidden)
    decoder = Decoder(model, chat, device)
    load_time = time.perf_counter() - started

    train_items, dev_items = split_dev_rows(paired_items(builder.tasks, "train"), paired_items(builder.tasks, "dev"),
                                            opts.dev_fraction, seed)
    if opts.dev_limit:
        dev_items = dev_items[: opts.dev_limit]
    if not train_items:
        raise ClfbenchError(f"llm-finetune: task {'+'.join(t.name for t in builder.tasks)} has no training examples")
    train = encode_items(decoder, builder, train_items, opts.max_length, opts.cut_long, "training", ctx.is_main)
    dev = encode_items(decoder, builder, dev_items, opts.max_length, True, "dev", ctx.is_main)
    share = opts.share_prefix and not opts.gradient_checkpointing  # HF drops the KV cache under checkpointing
    prefix = shared_prefix_ids(chat, builder) if share else []
    if ctx.is_main:
        answer_tokens = sum(len(s.ids) - s.n_prompt for s in train) / len(train)
        print(f"{LOG} {prompt.describe()}, {shots} shots, {len(train)} train / {len(dev)} dev / "
              f"{len(builder.items)} test examples; {sum(len(s.ids) for s in train) / len(train):.0f} tokens per "
              f"sequence, {answer_tokens:.1f} of them labelled; shared prefix {len(prefix)} tokens", flush=True)

    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    loss_model = AnswerLoss(model, decoder)

    global_batch = opts.batch_size * ctx.world_size
    micro_per_epoch = math.ceil(math.ceil(len(train) / ctx.world_size) * ctx.world_size / global_batch)
    steps_per_epoch = math.ceil(micro_per_epoch / opts.grad_accum)
    total_steps = max(1, math.ceil(opts.epochs * steps_per_epoch))
    warmup_steps = int(round(opts.warmup_ratio * total_steps))
    fingerprint = {
        "format": FORMAT, "prompt": prompt.describe(), "shots": shots, "n_train": len(train), "n_dev": len(dev),
        "world_size": ctx.world_size, "batch_size": opts.batch_size, "grad_accum": opts.grad_accum,
        "total_steps": total_steps, "seed": seed, "strategy": opts.strategy,
        "n_params": sum(p.numel() for p in model.parameters()),
    }

    trainer = (FsdpTrainer if opts.strategy == "fsdp" else DdpTrainer)(ctx, loss_model, opts, device)
    trainer.setup(warmup_steps, total_steps)
    start_step = trainer.resume(fingerprint, steps_per_epoch)
    if start_step and ctx.is_main:
        print(f"{LOG} resuming from {ctx.output_dir / CHECKPOINT_DIR} at step {start_step}/{total_steps} "
              f"(epoch {start_step // steps_per_epoch})", flush=True)
    schedule = BatchSchedule([len(s.ids) for s in train], opts.batch_size, ctx.world_size, ctx.rank, seed,
                             opts.grad_accum)

    def evaluate_dev(step: int) -> float:
        began = time.perf_counter()
        ctx.log_metric(step, "eval_loss", trainer.evaluate(dev, prefix, opts.batch_size))
        return time.perf_counter() - began

    # --------------------------------------------------------------------------------------- training loop
    step = start_step
    ctx.set_progress(step, total_steps)
    loop_started, paused, dev_time = time.perf_counter(), 0.0, 0.0
    # summed loss, labelled tokens, tokens computed (a shared prefix counts once per micro-batch, as it runs)
    window = torch.zeros(3, dtype=torch.float64, device=device)
    window_started, window_paused = time.perf_counter(), 0.0
    tokens_seen = 0
    while step < total_steps:
        micro = [[train[i] for i in batch] for batch in schedule.step_batches(step, steps_per_epoch)]
        labelled = torch.tensor([float(sum(s.n_labels for batch in micro for s in batch))], dtype=torch.float64,
                                device=device)
        if distributed:
            dist.all_reduce(labelled)
        scale = ctx.world_size / max(float(labelled.item()), 1.0)
        for k, batch in enumerate(micro):
            inputs = collate(batch, prefix, decoder.pad_id)
            summed = trainer.backward(inputs, scale, last=k == len(micro) - 1)
            shared = inputs.prefix.shape[1] if inputs.prefix is not None else 0
            computed = shared + sum(len(s.ids) - shared for s in batch)
            window += torch.tensor([summed, sum(s.n_labels for s in batch), computed],
                                   dtype=torch.float64, device=device)
            tokens_seen += computed
        trainer.optimizer_step()
        step += 1

        if step % opts.log_every == 0 or step == total_steps:
            totals = window.clone()
            if distributed:
                dist.all_reduce(totals)
            elapsed = max(time.perf_counter() - window_started - window_paused, 1e-9)
            ctx.log_metric(step, "train_loss", float(totals[0] / totals[1].clamp(min=1)))
            ctx.log_metric(step, "lr", trainer.lr())
            ctx.log_metric(step, "train_tokens_per_s", float(totals[2]) / elapsed)
            ctx.set_progress(step, total_steps)
            if ctx.is_main:
                print(f"{LOG} step {step}/{total_steps} train_loss {float(totals[0] / totals[1].clamp(min=1)):.4f} "
                      f"({float(totals[2]) / elapsed:.0f} tokens/s)", flush=True)
            window.zero_()
            window_started, window_paused = time.perf_counter(), 0.0
        if dev and opts.eval_every and step % opts.eval_every == 0 and step < total_steps:
            spent = evaluate_dev(step)
            dev_time, paused, window_paused = dev_time + spent, paused + spent, window_paused + spent
        if opts.checkpoint_every and (step % opts.checkpoint_every == 0 or step == total_steps):
            began = time.perf_counter()
            trainer.save(step, steps_per_epoch, fingerprint)
            spent = time.perf_counter() - began
            paused, window_paused = paused + spent, window_paused + spent
    train_time = time.perf_counter() - loop_started - paused
    ctx.set_progress(total_steps, total_steps)
    if dev:
        dev_time += evaluate_dev(total_steps)
    global_tokens = torch.tensor([float(tokens_seen)], dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(global_tokens)

    # ------------------------------------------------------------------------------------ test prediction
    predict_model = trainer.model_for_prediction()  # FSDP: collective (gathers the full weights on rank 0)
    if not ctx.is_main:
        return None
    predict_model.eval()
    predict_model.config.use_cache = True
    if opts.gradient_checkpointing:
        predict_model.gradient_checkpointing_disable()
    settings = DecisionSettings(
        decision=opts.decision, score_norm=opts.score_norm, score_end=opts.score_end,
        content_free=opts.content_free, max_new_tokens=opts.max_new_tokens, batch_size=opts.eval_batch_size)
    with torch.no_grad(), trainer.autocast:
        output = decide(ctx, Decoder(predict_model, chat, device), builder, settings)
    trained_tokens = float(global_tokens.item())
    for extra in output.extra_results.values():
        extra.update({
            "train_time_s": train_time, "dev_eval_time_s": dev_time, "load_time_s": load_time,
            "train_tokens_per_s": trained_tokens / train_time if train_time > 0 else 0.0,
            "train_examples": float(len(train)), "train_steps": float(total_steps),
            "resumed_from_step": float(start_step), "shots": float(shots),
        })
    return output


# ------------------------------------------------------------------------------------------ sequences


@dataclass(frozen=True)
class Encoded:
    """One training sequence: the prompt's tokens, then the answer's, then the stop token."""

    ids: list[int]
    n_prompt: int  # the first n_prompt tokens are the prompt: they carry no label

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.n_prompt + self.ids[self.n_prompt:]

    @property
    def n_labels(self) -> int:
        return len(self.ids) - self.n_prompt


def encode_item(decoder: Decoder, builder: PromptBuilder, item: Item, text: str | None = None) -> Encoded:
    """The training sequence of one item (its document replaced by `text` when given). The prompt tokens are
    exactly what the prompt method feeds; the answer is tokenised after them as constrained decoding does."""
    chat = decoder.chat
    prompt_text = chat.text(builder.render(item.text if text is None else text))
    prompt_ids = chat.encode(prompt_text)
    answer = builder.target(item)
    k, answer_ids = decoder.joint_split(prompt_text, prompt_ids, answer)
    if k != len(prompt_ids):  # the answer would merge with the prompt's last token: keep the prompt as is
        answer_ids = chat.encode_plain(answer)
    return Encoded(ids=prompt_ids + list(answer_ids) + [chat.stop_id], n_prompt=len(prompt_ids))


def encode_items(decoder: Decoder, builder: PromptBuilder, items: list[Item], max_length: int, cut_long: bool,
                 what: str, verbose: bool) -> list[Encoded]:
    """Every item's sequence. One longer than `max_length` is an error, or with `cut_long` its document is cut
    (the longest prefix of it that fits, by bisection over characters)."""
    out, too_long, cut = [], [], 0
    for item in items:
        encoded = encode_item(decoder, builder, item)
        if len(encoded.ids) > max_length:
            if not cut_long:
                too_long.append(len(encoded.ids))
                continue
            low, high = 0, len(item.text)  # low chars fit (an empty document must fit), high do not
            if len(encode_item(decoder, builder, item, "").ids) > max_length:
                raise ClfbenchError(f"llm-finetune: the prompt alone (no document) is longer than max_length="
                                    f"{max_length} tokens; raise max_length or use fewer shots")
            while high - low > 1:
                middle = (low + high) // 2
                if len(encode_item(decoder, builder, item, item.text[:middle]).ids) <= max_length:
                    low = middle
                else:
                    high = middle
            encoded = encode_item(decoder, builder, item, item.text[:low])
            cut += 1
        out.append(encoded)
    if too_long:
        raise ClfbenchError(f"llm-finetune: {len(too_long)} of {len(items)} {what} sequences are longer than "
                            f"max_length={max_length} tokens (longest {max(too_long)}); raise max_length, cut "
                            f"documents with -o max_text_chars=N, or let them be cut with -o cut_long=true")
    if cut and verbose:
        print(f"{LOG} cut the documents of {cut} {what} sequences to fit max_length={max_length}", flush=True)
    return out


def shared_prefix_ids(chat: ChatFormat, builder: PromptBuilder) -> list[int]:
    """The tokens of the prompt text before the document, without the last one (it could merge with the
    document's first characters): the same rule as the prompt method's KV cache."""
    text = chat.text(builder.render(SENTINEL)).partition(SENTINEL)[0]
    ids = chat.encode(text)[:-1] if text else []
    return ids if len(ids) >= 2 else []


@dataclass
class Batch:
    """A collated micro-batch: rows behind an optional shared prefix, their own parts right-padded."""

    prefix: torch.Tensor | None  # [1, P] or None
    input_ids: torch.Tensor  # [B, C]
    positions: torch.Tensor  # [B, C]
    allowed: torch.Tensor  # [B, C, P + C] bool: query q of row b may attend key k
    labels: torch.Tensor  # [B, C], IGNORE_INDEX on the prompt and the padding
    keep: torch.Tensor  # [K] the columns whose logits predict a label (column c predicts token c + 1)


def collate(rows: list[Encoded], prefix: list[int], pad_id: int) -> Batch:
    """Share `prefix` when every row starts with it (and goes on after it), else feed the rows whole."""
    P = len(prefix)
    if not P or not all(len(r.ids) > P and r.ids[:P] == prefix for r in rows):
        P = 0
    chains = [r.ids[P:] for r in rows]
    labels = [r.labels[P:] for r in rows]
    B, C = len(rows), max(len(c) for c in chains)
    input_ids = torch.full((B, C), pad_id, dtype=torch.long)
    label_ids = torch.full((B, C), IGNORE_INDEX, dtype=torch.long)
    valid = torch.zeros((B, C), dtype=torch.bool)
    for b, (chain, label) in enumerate(zip(chains, labels)):
        input_ids[b, : len(chain)] = torch.tensor(chain)
        label_ids[b, : len(label)] = torch.tensor(label)
        valid[b, : len(chain)] = True
    positions = (P + torch.arange(C))[None].expand(B, C).contiguous()
    causal = torch.ones((C, C), dtype=torch.bool).tril()[None] & valid[:, None, :]
    causal |= torch.eye(C, dtype=torch.bool)[None]  # a pad query sees itself: no row of the mask is empty
    allowed = torch.cat([torch.ones((B, C, P), dtype=torch.bool), causal], dim=2)
    labelled = (label_ids != IGNORE_INDEX).nonzero()
    first = int(labelled[:, 1].min()) if len(labelled) else C - 1
    keep = torch.arange(max(first - 1, 0), C - 1)
    return Batch(prefix=torch.tensor([prefix]) if P else None, input_ids=input_ids, positions=positions,
                 allowed=allowed, labels=label_ids, keep=keep)


class BatchSchedule:
    """Which rows each rank trains on at each optimizer step, as a function of (seed, epoch, step) only."""

    def __init__(self, lengths: list[int], batch_size: int, world_size: int, rank: int, seed: int, grad_accum: int):
        self.lengths, self.batch_size, self.world_size, self.rank = lengths, batch_size, world_size, rank
        self.seed, self.grad_accum = seed, grad_accum
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of one epoch, similar lengths together, in a seeded random order."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = random.Random(f"clfbench-llm-finetune:{self.seed}:{epoch}")
            order = list(range(len(self.lengths)))
            rng.shuffle(order)
            order += order[: (-len(order)) % self.world_size]  # every rank gets a row of every global batch
            size = self.batch_size * self.world_size
            batches = []
            for start in range(0, len(order), size * SORT_WINDOW):
                window = sorted(order[start:start + size * SORT_WINDOW], key=lambda i: self.lengths[i])
                batches += [window[s:s + size] for s in range(0, len(window), size)]
            rng.shuffle(batches)
            self._epoch = (epoch, [batch[self.rank::self.world_size] for batch in batches])
        return self._epoch[1]

    def step_batches(self, step: int, steps_per_epoch: int) -> list[list[int]]:
        epoch, position = divmod(step, steps_per_epoch)
        return self.epoch_batches(epoch)[position * self.grad_accum:(position + 1) * self.grad_accum]


# ---------------------------------------------------------------------------------------------- model


class AnswerLoss(nn.Module):
    """The causal LM and its answer-only loss in ONE forward, so that DDP and FSDP see one forward per backward
    even when the shared prefix takes a model call of its own. Returns the SUMMED cross-entropy."""

    def __init__(self, model: nn.Module, decoder: Decoder):
        super().__init__()
        self.model = model
        self._mask = decoder._mask  # bool for SDPA, additive float otherwise (not a submodule)
        self.pad_id = decoder.pad_id

    def forward(self, input_ids, positions, allowed, labels, keep, prefix=None) -> torch.Tensor:
        from transformers import DynamicCache

        cache = None
        if prefix is not None:
            out = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1)
            B = input_ids.shape[0]
            data = [(layer.keys.expand(B, -1, -1, -1), layer.values.expand(B, -1, -1, -1))
                    for layer in out.past_key_values.layers]
            cache = DynamicCache(ddp_cache_data=data, config=self.model.config)
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=self._mask(allowed),
                         past_key_values=cache, use_cache=cache is not None, logits_to_keep=keep)
        targets = labels[:, keep + 1]
        return F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")


def _inputs(batch: Batch, device: torch.device) -> dict:
    out = {"input_ids": batch.input_ids, "positions": batch.positions, "allowed": batch.allowed,
           "labels": batch.labels, "keep": batch.keep, "prefix": batch.prefix}
    return {k: (v.to(device) if v is not None else None) for k, v in out.items()}


class DdpTrainer:
    """One full copy of the model per process (DistributedDataParallel when there are several)."""

    def __init__(self, ctx: RunContext, loss_model: AnswerLoss, opts, device: torch.device):
        self.ctx, self.loss_model, self.opts, self.device = ctx, loss_model, opts, device
        self.model = loss_model.model
        self.model.to(device)
        self.autocast = autocast_for(device, opts.bf16)
        self.wrapped: nn.Module = loss_model

    def setup(self, warmup_steps: int, total_steps: int) -> None:
        self.optimizer = make_optimizer(self.model, self.opts.lr, self.opts.weight_decay, self.device, "adamw")
        self.scheduler = make_scheduler(self.optimizer, warmup_steps, total_steps)

    def resume(self, fingerprint: dict, steps_per_epoch: int) -> int:
        checkpoint = load_checkpoint(self.ctx.output_dir, fingerprint, self.ctx.is_main)
        if self.ctx.world_size > 1:
            # Every rank must start at the same step (e.g. an output_dir not shared between nodes), else none resumes.
            found = float(checkpoint["step"]) if checkpoint is not None else -1.0
            extremes = torch.tensor([found, -found], dtype=torch.float64, device=self.device)
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
            if float(extremes[0]) != -float(extremes[1]):
                checkpoint = None
        step = 0
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            step = restore(checkpoint, self.optimizer, self.scheduler, self.ctx.rank)
        if self.ctx.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(
                self.loss_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return step

    def backward(self, batch: Batch, scale: float, last: bool) -> float:
        """Forward and backward of one micro-batch (gradients synchronised on the step's last one)."""
        sync = self.wrapped.no_sync() if self.ctx.world_size > 1 and not last else contextlib.nullcontext()
        with sync:
            with self.autocast:
                summed = self.wrapped(**_inputs(batch, self.device))
            (summed * scale).backward()
        return float(summed.detach())

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @torch.no_grad()
    def evaluate(self, rows: list[Encoded], prefix: list[int], batch_size: int) -> float:
        """Token-mean loss on `rows`; each rank scores its share, the sums are combined (all ranks call)."""
        shard = sorted(rows[self.ctx.rank::self.ctx.world_size], key=lambda s: len(s.ids))
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(shard), batch_size):
                batch = shard[start:start + batch_size]
                with self.autocast:
                    summed = self.wrapped(**_inputs(collate(batch, prefix, self.loss_model.pad_id), self.device))
                totals += torch.tensor([float(summed), sum(s.n_labels for s in batch)], dtype=torch.float64,
                                       device=self.device)
        finally:
            self.model.train(was_training)
        if self.ctx.world_size > 1:
            dist.all_reduce(totals)
        return float(totals[0] / totals[1].clamp(min=1))

    def save(self, step: int, steps_per_epoch: int, fingerprint: dict) -> None:
        save_checkpoint(self.ctx, self.model.state_dict, self.optimizer, self.scheduler, step, steps_per_epoch, fingerprint)

    def model_for_prediction(self) -> nn.Module:
        return self.model


class FsdpTrainer(DdpTrainer):
    """FullyShardedDataParallel through accelerate: each decoder layer's parameters, gradients and Adam state are
    sharded over the GPUs. Checkpoints are accelerate's `save_state` (full state dict gathered on rank 0, the
    scheduler registered with it) plus a meta.json with the step and the fingerprint; the test set is predicted
    on rank 0 with a full copy of the trained weights in bf16."""

    def __init__(self, ctx: RunContext, loss_model: AnswerLoss, opts, device: torch.device):
        from accelerate import Accelerator, FullyShardedDataParallelPlugin

        self.ctx, self.loss_model, self.opts, self.device = ctx, loss_model, opts, device
        self.model = loss_model.model
        layers = list(getattr(self.model, "_no_split_modules", None) or [])
        if not layers:
            raise ClfbenchError(f"llm-finetune: strategy=fsdp needs the model's decoder layer class "
                                f"({type(self.model).__name__} names none in _no_split_modules); use strategy=ddp")
        plugin = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=layers,
            state_dict_type="FULL_STATE_DICT", use_orig_params=True,
            activation_checkpointing=False)  # HF gradient checkpointing already recomputes the layers
        bf16 = opts.bf16 and torch.cuda.is_bf16_supported()
        self.accelerator = Accelerator(fsdp_plugin=plugin, mixed_precision="bf16" if bf16 else "no")
        self.autocast = autocast_for(device, opts.bf16)  # for prediction on the gathered copy
        # Weight decay by the original names and shapes: sharded flat parameters keep the names only.
        self._no_decay = {name for name, p in self.model.named_parameters() if p.ndim < 2 or "norm" in name.lower()}
        self.wrapped = self.accelerator.prepare(loss_model)

    def setup(self, warmup_steps: int, total_steps: int) -> None:
        decay, no_decay = [], []
        for name, param in self.wrapped.named_parameters():
            clean = name.replace("_fsdp_wrapped_module.", "").removeprefix("model.")
            (no_decay if clean in self._no_decay else decay).append(param)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.opts.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.opts.lr)
        self.optimizer = self.accelerator.prepare(optimizer)
        self.scheduler = make_scheduler(self.optimizer.optimizer, warmup_steps, total_steps)
        self.accelerator.register_for_checkpointing(self.scheduler)

    def resume(self, fingerprint: dict, steps_per_epoch: int) -> int:
        folder = Path(self.ctx.output_dir) / CHECKPOINT_DIR
        meta = folder / "meta.json"
        try:
            saved = json.loads(meta.read_text()) if meta.is_file() else None
        except (OSError, ValueError):
            saved = None
        if not saved or saved.get("fingerprint") != fingerprint:
            if saved and self.ctx.is_main:
                print(f"{LOG} ignoring checkpoint {folder}: made for another setup", flush=True)
            return 0
        self.accelerator.load_state(str(folder))
        return int(saved["step"])

    def backward(self, batch: Batch, scale: float, last: bool) -> float:
        sync = self.wrapped.no_sync() if not last else contextlib.nullcontext()
        with sync:
            summed = self.wrapped(**_inputs(batch, self.device))
            self.accelerator.backward(summed * scale)
        return float(summed.detach())

    def optimizer_step(self) -> None:
        self.accelerator.clip_grad_norm_(self.wrapped.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, step: int, steps_per_epoch: int, fingerprint: dict) -> None:
        output_dir = Path(self.ctx.output_dir)
        tmp, final, old = (output_dir / f".{CHECKPOINT_DIR}.tmp", output_dir / CHECKPOINT_DIR,
                           output_dir / f".{CHECKPOINT_DIR}.old")
        if self.ctx.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))  # collective
        if self.ctx.is_main:
            (tmp / "meta.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint,
                                                       "saved_at": time.time()}, indent=2) + "\n")
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def model_for_prediction(self) -> nn.Module:
        state = self.accelerator.get_state_dict(self.wrapped)  # collective; the full weights on rank 0
        if not self.ctx.is_main:
            return self.model
        _, model = load_model(self.ctx.model_path, "bfloat16" if torch.cuda.is_bf16_supported() else "float32",
                              self.device)
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
        return model
