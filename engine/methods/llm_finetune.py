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
- `share_prefix` (default; not under FSDP or gradient checkpointing, see `training_sequences`): the prompt text
  every example shares (system prompt, instruction, label list, shots:
  450 of MASSIVE intent's ~475 tokens for SmolLM2) runs once per micro-batch with gradients, and its keys/values
  are expanded to every row, whose own part (document, prompt tail, answer) follows with explicit positions and a
  4-D attention mask. The same maths as whole sequences (tested), ~8x fewer tokens on MASSIVE. Logits are
  computed only for the columns that hold answer tokens (`logits_to_keep`);
- micro-batches are grouped by length (`engine.training.length_grouped_epochs`): a seeded shuffle per epoch,
  sorted by length inside windows of 50 batches, cut into batches whose order is shuffled again; with several
  ranks a global batch of batch_size * world_size similar-length rows is dealt round-robin, so every rank has the
  same number of micro-batches;
- dev: the tasks' dev split (or `dev_fraction` of train held out, seeded; `dev_limit` keeps the first N) gives
  `eval_loss` every `eval_every` steps and at the end; `train_loss`, `lr`, `train_tokens_per_s` (tokens
  computed: a shared prefix counts once per micro-batch) every `log_every`;
- the optimizer-step loop is `engine.training.train_loop`; this module's per-step function runs the step's
  micro-batches (`micro_batch`) and counts their labelled and computed tokens;
- checkpoints every `checkpoint_every` steps into ctx.output_dir/checkpoint (model, optimizer, scheduler, step and
  every rank's RNG; `engine.training.save_checkpoint`, atomic) and an interrupted run resumes from it: the batch
  order of an epoch depends on (seed, epoch) only, so the step says where to go on;
- after training, rank 0 predicts the test set with `engine.decoding.decide` on the trained in-memory model
  (`decision`: generate | constrained | score, `score_norm`), the other ranks return None. Under FSDP every rank
  first frees its shards and optimizer state, and rank 0 loads the gathered full weights into a model placed across
  all the run's GPUs (`unsharded_model`): a 70B model's 140 GB of bf16 weights fit no single 80-GB GPU.

`strategy`: `ddp` (DistributedDataParallel over gloo on CPU, NCCL on GPUs; `engine.training.start_training`) or
`fsdp` (PyTorch's FSDP2 `fully_shard`, `engine.fsdp`, for a model whose weights + gradients + Adam state do not fit
one GPU: every decoder layer is sharded over the processes, on GPUs over NCCL and on CPU over gloo; `offload` keeps
the shards and the optimizer in CPU memory; checkpoints are sharded). fp32 master weights; bf16 on GPUs that
support it (autocast under DDP, FSDP2's mixed-precision policy under FSDP). `preset: paper` and `global_batch` /
`max_steps`: `step_settings`.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clfbench.engine.context import RunContext
from clfbench.engine.decoding import SENTINEL, DecisionSettings, Decoder, decide, load_model
from clfbench.engine.decoding.decoder import prefix_token_ids
from clfbench.engine.decoding.model import cache_argument, returned_cache
from clfbench.engine.dev_split import split_dev_rows
from clfbench.engine.fsdp import fsdp_training
from clfbench.engine.prompting.chat import ChatFormat
from clfbench.engine.methods.catalog import paper_steps
from clfbench.engine.prompting.library import Item, PromptBuilder, load_prompt_set, paired_items
from clfbench.engine.training import (CONVERTING, EVALUATING, LoopTimes, StepPlan, Tally, Training, all_ranks_sum,
                                      autocast_for, epoch_batcher, gradient_sync, length_grouped_epochs, plan_steps,
                                      report_examples, require_process_group, start_training, train_loop)
from clfbench.engine.types import ClfbenchError, MethodOutput

LOG = "llm-finetune:"
IGNORE_INDEX = -100  # cross-entropy skips these positions: the prompt and the padding
SORT_WINDOW = 50  # batches per length-sorted window (more: less padding, less randomness)
SHUFFLE_KEY = "clfbench-llm-finetune"  # with the seed and the epoch it seeds an epoch's batch order
FORMAT = 1  # in the checkpoint fingerprint


# ------------------------------------------------------------------------------------------------ entry


def run(ctx: RunContext) -> MethodOutput | None:
    opts = ctx.options
    device = torch.device(ctx.device)
    require_process_group(ctx, LOG)
    prompt = load_prompt_set(opts.prompt_set).select(ctx.tasks, ctx.shots)

    started = time.perf_counter()
    tokenizer, model = load_model(ctx.model_path, "float32", device)  # fp32 master weights; bf16 by autocast
    chat = ChatFormat(tokenizer, opts.chat_format, getattr(model, "generation_config", None))
    builder = PromptBuilder.create(prompt, ctx.tasks, ctx.shots, ctx.seed, opts.max_text_chars, chat.forbidden)
    decoder = Decoder(model, chat, device)
    load_time = time.perf_counter() - started

    data = training_sequences(ctx, decoder, builder, prompt.describe())
    loss_model = prepare_model(model, decoder, opts)
    n_params = sum(p.numel() for p in model.parameters())
    grad_accum, max_steps = step_settings(ctx, n_params)
    plan = plan_steps(len(data.train), opts.batch_size, ctx.world_size, opts.epochs, opts.warmup_ratio,
                      grad_accum, max_steps)
    fingerprint = {
        "format": FORMAT, "prompt": prompt.describe(), "shots": ctx.shots, "n_train": len(data.train),
        "n_dev": len(data.dev), "world_size": ctx.world_size, "batch_size": opts.batch_size,
        "grad_accum": grad_accum, "total_steps": plan.total_steps, "seed": ctx.seed, "strategy": opts.strategy,
        "n_params": n_params,
    }
    training = start(ctx, loss_model, plan, fingerprint)
    times = train(ctx, training, model, plan, data, decoder.pad_id)
    results = {
        "train_time_s": times.train_time_s, "dev_eval_time_s": times.dev_eval_time_s, "load_time_s": load_time,
        "train_tokens_per_s": times.counted / times.train_time_s if times.train_time_s > 0 else 0.0,
        "train_examples": float(len(data.train)), "train_steps": float(plan.total_steps),
        "resumed_from_step": float(training.start_step), "shots": float(ctx.shots),
    }
    if training.full_state is not None:  # FSDP
        state = training.full_state()  # collective: the full weights on rank 0's CPU
        # The sharded weights, gradients and Adam state go before the full model comes: at 70B they do not fit
        # beside it. These are the last references (the Training's closures hold the module and optimizer).
        del training, loss_model, model, decoder
        model = unsharded_model(ctx, state)
    if not ctx.is_main:
        return None
    return predict(ctx, model, chat, builder, results)


def step_settings(ctx: RunContext, n_params: int) -> tuple[int, int | None]:
    """(micro-batches per optimizer step, optimizer steps or None for `epochs`): `global_batch` over all processes
    sets the first, `preset: paper` the second by the model's size when `max_steps` is not given."""
    opts = ctx.options
    grad_accum = opts.grad_accum
    if opts.global_batch:
        grad_accum = max(1, math.ceil(opts.global_batch / (opts.batch_size * ctx.world_size)))
    max_steps = opts.max_steps or (paper_steps(n_params) if opts.preset == "paper" else None)
    if ctx.is_main and (opts.global_batch or max_steps):
        print(f"{LOG} {opts.batch_size} x {ctx.world_size} process(es) x {grad_accum} micro-batches per step"
              + (f", {max_steps:,} steps" if max_steps else ""), flush=True)
    return grad_accum, max_steps


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
                 what: str, verbose: bool, report: Callable[[int], None] = lambda done: None) -> list[Encoded]:
    """Every item's sequence. One longer than `max_length` is an error, or with `cut_long` its document is cut
    (the longest prefix of it that fits, by bisection over characters). `report(items done)` after each item."""
    out, too_long, cut = [], [], 0
    for done, item in enumerate(items):
        report(done)
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
    """The tokens of the prompt text before the document, by the prompt method's own rule (`prefix_token_ids`)."""
    return prefix_token_ids(chat, chat.text(builder.render(SENTINEL)).partition(SENTINEL)[0])


@dataclass
class Sequences:
    """The run's training and dev sequences, and the shared prompt prefix they start with ([]: not shared)."""

    train: list[Encoded]
    dev: list[Encoded]
    prefix: list[int]


def training_sequences(ctx: RunContext, decoder: Decoder, builder: PromptBuilder, description: str) -> Sequences:
    """Train and dev (the tasks' dev split, or `dev_fraction` of train held out; `dev_limit` keeps the first N)
    encoded; a dev sequence that is too long is always cut, a training one only with `cut_long`."""
    opts = ctx.options
    train_items, dev_items = split_dev_rows(paired_items(builder.tasks, "train"), paired_items(builder.tasks, "dev"),
                                            opts.dev_fraction, ctx.seed)
    if opts.dev_limit:
        dev_items = dev_items[: opts.dev_limit]
    if not train_items:
        raise ClfbenchError(f"llm-finetune: task {'+'.join(t.name for t in builder.tasks)} has no training examples")
    convert = report_examples(ctx, CONVERTING, len(train_items) + len(dev_items))  # examples into sequences
    train = encode_items(decoder, builder, train_items, opts.max_length, opts.cut_long, "training", ctx.is_main,
                         convert)
    dev = encode_items(decoder, builder, dev_items, opts.max_length, True, "dev", ctx.is_main,
                       lambda done: convert(len(train_items) + done))
    # Whole sequences under gradient checkpointing (HF drops the KV cache there) and under FSDP: the prefix's
    # keys/values reach a layer's weights in backward without passing through that layer's output, where FSDP2
    # hooks the all-gather that backward needs (tried: "storage of size 0").
    share = opts.share_prefix and not opts.gradient_checkpointing and opts.strategy != "fsdp"
    prefix = shared_prefix_ids(decoder.chat, builder) if share else []
    if ctx.is_main:
        answer_tokens = sum(len(s.ids) - s.n_prompt for s in train) / len(train)
        print(f"{LOG} {description}, {ctx.shots} shots, {len(train)} train / {len(dev)} dev / "
              f"{len(builder.items)} test examples; {sum(len(s.ids) for s in train) / len(train):.0f} tokens per "
              f"sequence, {answer_tokens:.1f} of them labelled; shared prefix {len(prefix)} tokens", flush=True)
    return Sequences(train=train, dev=dev, prefix=prefix)


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
                    for layer in returned_cache(out).layers]
            cache = DynamicCache(ddp_cache_data=data, config=self.model.config)
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=self._mask(allowed),
                         use_cache=cache is not None, logits_to_keep=keep, **cache_argument(self.model, cache))
        targets = labels[:, keep + 1]
        return F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")


def _inputs(batch: Batch, device: torch.device) -> dict:
    out = {"input_ids": batch.input_ids, "positions": batch.positions, "allowed": batch.allowed,
           "labels": batch.labels, "keep": batch.keep, "prefix": batch.prefix}
    return {k: (v.to(device) if v is not None else None) for k, v in out.items()}


# ------------------------------------------------------------------------------------------- training


def prepare_model(model: nn.Module, decoder: Decoder, opts) -> AnswerLoss:
    """The model in training mode (gradient checkpointing when asked, no KV cache) inside its answer loss."""
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return AnswerLoss(model, decoder)


def start(ctx: RunContext, loss_model: AnswerLoss, plan: StepPlan, fingerprint: dict) -> Training:
    """Every weight trains, under DDP or FSDP (`strategy`), resumed from this run's checkpoint if there is one."""
    opts = ctx.options
    if opts.strategy == "fsdp":
        return fsdp_training(ctx, loss_model, loss_model.model, plan, fingerprint, lr=opts.lr,
                             weight_decay=opts.weight_decay, bf16=opts.bf16, offload=opts.offload, log_prefix=LOG)
    return start_training(ctx, loss_model.model, plan, fingerprint, lr=opts.lr, weight_decay=opts.weight_decay,
                          log_prefix=LOG, module=loss_model)


def micro_batch(training: Training, batch: Batch, scale: float, last: bool, autocast, device: torch.device
                ) -> torch.Tensor:
    """Forward and backward of one collated micro-batch, its summed loss scaled by `scale` (gradients synchronised
    on the step's last one); the summed loss, detached."""
    with gradient_sync(training, last):
        with autocast:
            summed = training.wrapped(**_inputs(batch, device))
        training.backward(summed * scale)
    return summed.detach()


def computed_tokens(batch: Batch, rows: list[Encoded]) -> int:
    """The tokens a micro-batch ran through the model: a shared prefix counts once."""
    shared = batch.prefix.shape[1] if batch.prefix is not None else 0
    return shared + sum(len(s.ids) - shared for s in rows)


def train(ctx: RunContext, training: Training, model: nn.Module, plan: StepPlan, data: Sequences, pad_id: int
          ) -> LoopTimes:
    """`train_loop` over length-grouped micro-batches, `grad_accum` per step; the loss of a step is the mean over
    its labelled tokens on all ranks (each rank counts its own first, the counts are summed)."""
    opts, device = ctx.options, torch.device(ctx.device)
    lengths = [len(s.ids) for s in data.train]
    batches = epoch_batcher(length_grouped_epochs(lengths, opts.batch_size, ctx.world_size, ctx.rank,
                                                  f"{SHUFFLE_KEY}:{ctx.seed}", SORT_WINDOW),
                            plan.steps_per_epoch, per_step=opts.grad_accum)
    autocast = autocast_for(device, opts.bf16)
    # Under FSDP accelerate's mixed precision casts the training forward; DDP autocasts it here.
    train_autocast = contextlib.nullcontext() if training.full_state is not None else autocast

    def gradients(step: int) -> list[Tally]:
        micro = [[data.train[i] for i in batch] for batch in batches(step)]
        scale = ctx.world_size / max(all_ranks_sum(float(sum(s.n_labels for rows in micro for s in rows)), ctx), 1.0)
        tallies = []
        for k, rows in enumerate(micro):
            batch = collate(rows, data.prefix, pad_id)
            summed = micro_batch(training, batch, scale, k == len(micro) - 1, train_autocast, device)
            tallies.append(Tally(summed, weight=sum(s.n_labels for s in rows), count=computed_tokens(batch, rows)))
        return tallies

    def evaluate_dev(step: int) -> float:
        began = time.perf_counter()
        loss = dev_loss(ctx, training, model, data, pad_id, autocast)
        ctx.log_metric(step, "eval_loss", loss)
        if ctx.is_main:
            print(f"{LOG} dev at step {step}: eval_loss {loss:.4f} ({len(data.dev)} sequences, "
                  f"{time.perf_counter() - began:.1f} s)", flush=True)
        return time.perf_counter() - began

    return train_loop(ctx, training, plan, gradients, evaluate_dev=evaluate_dev if data.dev else None,
                      counted="tokens", echo=LOG)


@torch.no_grad()
def dev_loss(ctx: RunContext, training: Training, model: nn.Module, data: Sequences, pad_id: int, autocast) -> float:
    """Token-mean loss on dev; each rank scores its share, the sums are combined (all ranks call)."""
    device, batch_size = torch.device(ctx.device), ctx.options.batch_size
    shard = sorted(data.dev[ctx.rank::ctx.world_size], key=lambda s: len(s.ids))
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    report = report_examples(ctx, EVALUATING, len(data.dev), ranks=ctx.world_size)
    ctx.set_phase(EVALUATING, 0, len(data.dev))
    was_training = model.training
    model.eval()
    # Every rank runs the same number of batches: under FSDP each forward is collective (all-gathers), so a rank
    # whose share ran out runs one of its rows again and does not count it.
    batches = math.ceil(math.ceil(len(data.dev) / ctx.world_size) / batch_size)
    try:
        for start_at in range(0, batches * batch_size, batch_size):
            rows = shard[start_at:start_at + batch_size]
            counted = 1.0 if rows else 0.0
            with autocast:
                summed = training.wrapped(**_inputs(collate(rows or (shard or data.dev)[:1], data.prefix, pad_id),
                                                    device))
            totals += torch.tensor([float(summed) * counted, sum(s.n_labels for s in rows)], dtype=torch.float64,
                                   device=device)
            report(start_at + len(rows))
    finally:
        model.train(was_training)
    if ctx.distributed:
        torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


# ------------------------------------------------------------------------------------------ prediction


def unsharded_model(ctx: RunContext, state: dict) -> nn.Module | None:
    """After FSDP training, the model rank 0 predicts with: the trained full weights (`state`, gathered onto rank
    0's CPU) in a model placed like the prompt method's, across all the run's GPUs when it has several (a 70B
    model does not fit one 80-GB GPU), in bf16 where the GPU supports it. Every rank must call, after dropping its
    references to the sharded model and optimizer: each frees that memory, and rank 0 builds the model only once
    every rank has (the placement reads each GPU's free memory). Other ranks get None."""
    gc.collect()  # the FSDP module's hooks make reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the freed blocks back, so that free memory is what the placement sees
    dist.barrier()
    if not ctx.is_main:
        return None
    device = torch.device(ctx.device)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    _, full = load_model(ctx.model_path, "bfloat16" if bf16 else "float32", device, gpus=ctx.gpus,
                         batch_size=ctx.options.eval_batch_size)
    full.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return full


def predict(ctx: RunContext, model: nn.Module, chat: ChatFormat, builder: PromptBuilder,
            results: dict[str, float]) -> MethodOutput:
    """The test set decided with `engine.decoding.decide`, as the prompt method decides; `results` join every
    task's result rows."""
    opts, device = ctx.options, torch.device(ctx.device)
    model.eval()
    model.config.use_cache = True
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    settings = DecisionSettings(
        decision=opts.decision, score_norm=opts.score_norm, score_end=opts.score_end,
        content_free=opts.content_free, max_new_tokens=opts.max_new_tokens, batch_size=opts.eval_batch_size)
    with torch.no_grad(), autocast_for(device, opts.bf16):
        output = decide(ctx, Decoder(model, chat, device), builder, settings)
    for extra in output.extra_results.values():
        extra.update(results)
    return output
