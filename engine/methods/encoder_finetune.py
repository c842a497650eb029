"""Encoder fine-tuning with a linear head per task on one shared encoder (`AutoModel` + `HeadsModel`).

`run(ctx)` trains on the one or two tasks of `ctx.tasks`:

- a **sequence** task gets a linear head on the dropout'd first-token ([CLS]) state (the last real token's
  state for causal-LM checkpoints, whose first token sees nothing else);
- a **token** task (BIO tags over whitespace tokens) gets a linear head on every token state. The words are
  tokenised with `is_split_into_words=True`; only the FIRST sub-word of each word carries the word's tag
  (the other sub-words and the special tokens are -100, ignored), and a word's predicted tag is read from its
  first sub-word. Words cut off by `max_length` are predicted "O" and counted (`truncated_words`);
- **two tasks** ("a+b", from one dataset) train jointly on one shared encoder, one head each, with the loss
  the plain sum of the heads' losses (each the mean cross-entropy of its head: over examples for a sequence
  head, over labelled words for a token head). Their examples are paired by `Example.id` in every split; an
  id that one task has and the other lacks is an error that names it. When any head is a token head, every
  head reads the same word-split encoding of the utterance.

Dev evaluation every `eval_every` steps (dev = the tasks' dev split, or `dev_fraction` of train held out with
the run's seed, the same rows for every task) logs `eval_loss` (the summed objective), `eval_accuracy` for a
sequence head and `eval_slot_f1` (engine.metrics.slot_scores, MASSIVE's official rule) for a token head. When
two heads would log the same name (two sequence heads) each logs `<name>/<task>` instead; joint runs also log
`eval_loss/<task>` and `train_loss/<task>` per head next to the summed `train_loss`. Checkpoints every
`checkpoint_every` steps into `ctx.output_dir/checkpoint` (resumed on a retry); rank 0 predicts the test set.
Options pass through `EncoderFinetuneOptions.resolved`, so `preset: paper` replaces batch size, lr,
optimizer, weight decay and epochs. Plain functions, no Trainer.

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

import math
import random
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clfbench.engine.metrics import slot_scores
from clfbench.engine.training import (CHECKPOINT_DIR, autocast_for, load_checkpoint, make_optimizer, make_scheduler,
                             restore, save_checkpoint, train_loop)
from clfbench.engine.context import RunContext
from clfbench.engine.types import ClfbenchError, Example, MethodOutput, Predicted, TaskData

LOG_PREFIX = "encoder-finetune:"
IGNORE_INDEX = -100  # cross-entropy skips these positions (special tokens, non-first sub-words, padding)
MODEL_FORMAT = 2  # in the checkpoint fingerprint: 2 = AutoModel + HeadsModel (1 was AutoModelForSequenceClassification)
OUTSIDE = "O"


# ------------------------------------------------------------------------------------------ entry


def run(ctx: RunContext) -> MethodOutput | None:
    tasks = ctx.tasks  # checked by the worker against the catalog: one or two, sequence or token, 2+ labels each
    opts = ctx.options  # resolved by the worker: `preset: paper` already applied
    seed = ctx.seed
    distributed = ctx.world_size > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ClfbenchError("encoder-finetune: world_size > 1 but torch.distributed is not initialised")
    device = torch.device(ctx.device)
    if ctx.is_main and opts.preset != "none":
        print(f"{LOG_PREFIX} preset {opts.preset}: batch_size={opts.batch_size} lr={opts.lr} "
              f"optimizer={opts.optimizer} weight_decay={opts.weight_decay} epochs={opts.epochs:g}", flush=True)

    heads = [Head(task.name, task.kind, list(task.labels)) for task in tasks]
    word_source = next((k for k, task in enumerate(tasks) if task.kind == "token"), None)
    train_rows, dev_rows = split_dev_rows(align_rows(tasks, "train", word_source),
                                          align_rows(tasks, "dev", word_source), opts.dev_fraction, seed)
    if not train_rows:  # the tasks have training examples, but none that pairs up across them
        raise ClfbenchError(f"encoder-finetune: task {'+'.join(h.name for h in heads)} has no training examples")
    test_rows = align_rows(tasks, "test", word_source)  # test_limit was applied when the worker loaded the tasks

    tokenizer, model = load_model(ctx.model_path, heads, words=word_source is not None)
    codec = Codec(tokenizer, words=word_source is not None, max_length=opts.max_length)
    model.to(device)
    model.train()
    autocast = autocast_for(device, opts.bf16)
    if ctx.is_main and word_source is not None:
        cut = sum(codec.truncated_words(train_rows))
        if cut:
            print(f"{LOG_PREFIX} max_length={opts.max_length} cuts {cut} training words (they carry no label)",
                  flush=True)

    batch_size = opts.batch_size
    per_rank = math.ceil(len(train_rows) / ctx.world_size)  # DistributedSampler pads every rank to this
    steps_per_epoch = math.ceil(per_rank / batch_size)
    total_steps = max(1, math.ceil(opts.epochs * steps_per_epoch))
    warmup_steps = int(round(opts.warmup_ratio * total_steps))

    fingerprint = {
        "format": MODEL_FORMAT, "heads": [[h.name, h.kind, h.labels] for h in heads],
        "n_train": len(train_rows), "n_dev": len(dev_rows), "world_size": ctx.world_size,
        "batch_size": batch_size, "total_steps": total_steps, "seed": seed, "optimizer": opts.optimizer,
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
    optimizer = make_optimizer(model, opts.lr, opts.weight_decay, device, opts.optimizer)
    scheduler = make_scheduler(optimizer, warmup_steps, total_steps)
    start_step = 0
    if checkpoint is not None:
        start_step = restore(checkpoint, optimizer, scheduler, ctx.rank)
        if ctx.is_main:
            print(f"{LOG_PREFIX} resuming from {ctx.output_dir / CHECKPOINT_DIR} at step {start_step}/{total_steps} "
                  f"(epoch {start_step // steps_per_epoch})", flush=True)
        del checkpoint

    from torch.utils.data.distributed import DistributedSampler

    # Explicit replicas/rank: the same sampler serves one process (no process group needed) and DDP.
    sampler = DistributedSampler(range(len(train_rows)), num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=True, seed=seed, drop_last=False)

    batches = _EpochBatches(sampler, batch_size, steps_per_epoch)
    joint = len(heads) > 1
    metric_names = eval_metric_names(heads)

    def evaluate_dev(step: int) -> float:
        started = time.perf_counter()
        scores = evaluate(model, codec, heads, dev_rows, ctx, autocast, batch_size * 2)
        ctx.log_metric(step, "eval_loss", sum(score["loss"] for score in scores))
        for head, score, name in zip(heads, scores, metric_names):
            if joint:
                ctx.log_metric(step, f"eval_loss/{head.name}", score["loss"])
            ctx.log_metric(step, name, score["accuracy"] if head.kind == "sequence" else score["slot_f1"])
        return time.perf_counter() - started

    # ------------------------------------------------------------------------------- training loop
    def losses_of(indices):
        rows = [train_rows[i] for i in indices]
        encoding = codec.encode([row.inputs for row in rows])
        targets = batch_targets(heads, rows, encoding, device)
        inputs = {key: value.to(device) for key, value in encoding.items()}
        with autocast:
            logits = wrapped(**inputs)
        losses = head_losses(heads, logits, targets)
        if not joint:
            return losses[0], []
        return torch.stack(losses).sum(), losses  # equally weighted heads

    times = train_loop(
        ctx, device=device, distributed=distributed, start_step=start_step, total_steps=total_steps,
        batch_at=batches.at, losses_of=losses_of, parameters=list(model.parameters()), optimizer=optimizer,
        scheduler=scheduler, opts=opts, evaluate_dev=evaluate_dev if dev_rows else None,
        save_checkpoint=lambda step: save_checkpoint(ctx, model, optimizer, scheduler, step, steps_per_epoch,
                                                     fingerprint),
        part_names=[f"train_loss/{head.name}" for head in heads] if joint else [])
    train_time, dev_eval_time = times.train_time_s, times.dev_eval_time_s

    # ------------------------------------------------------------------------------ test prediction
    output = None
    if ctx.is_main:
        started = time.perf_counter()
        predicted, truncated = predict(model, codec, heads, test_rows, device, autocast, batch_size * 2)
        test_time = time.perf_counter() - started
        trained = times.examples
        common = {
            "train_time_s": train_time,
            "eval_time_s": test_time,
            "dev_eval_time_s": dev_eval_time,
            "train_examples_per_s": trained / train_time if trained and train_time > 0 else 0.0,
            "test_examples_per_s": len(test_rows) / test_time if test_rows and test_time > 0 else 0.0,
            "train_steps": float(total_steps),
            "resumed_from_step": float(start_step),
        }
        predictions: dict[str, dict[str, Predicted]] = {}
        extra: dict[str, dict[str, float]] = {}
        for k, head in enumerate(heads):
            predictions[head.name] = {row.examples[k].id: Predicted(value) for row, value in zip(test_rows, predicted[k])}
            extra[head.name] = dict(common)
            if head.kind == "token":
                extra[head.name]["truncated_words"] = float(truncated)
        output = MethodOutput(predictions=predictions, extra_results=extra)
    if distributed:
        dist.barrier()  # the other ranks wait for rank 0's test prediction
    return output


# -------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Head:
    """One task's head: its name, kind ("sequence" | "token") and ordered label set."""

    name: str
    kind: str
    labels: list[str]

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


@dataclass(frozen=True)
class Row:
    """One utterance with its example of every task (same order as the run's tasks) and the model input:
    the text, or the words (a tuple) when the run has a token head."""

    id: str
    inputs: str | tuple[str, ...]
    examples: tuple[Example, ...]


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


def _words(example: Example) -> list[str]:
    return list(example.tokens) if example.tokens is not None else example.text.split()


def align_rows(tasks: list[TaskData], split: str, word_source: int | None = None) -> list[Row]:
    """The examples of `split` of every task paired by id, in the first task's order.

    Joint tasks come from one dataset, so every id is in every task and the utterances agree word for word;
    otherwise a ClfbenchError names the first id without a partner (or whose words differ). `word_source`:
    the index of the task whose words are the model input (a token task), None for the text.
    """
    lists = [list(getattr(task, split)) for task in tasks]
    others = [{ex.id: ex for ex in examples} for examples in lists[1:]]
    rows = []
    for first in lists[0]:
        group = [first]
        for task, by_id in zip(tasks[1:], others):
            partner = by_id.get(first.id)
            if partner is None:
                raise ClfbenchError(
                    f"encoder-finetune: {split} example id {first.id!r} of {tasks[0].name} is not in {task.name}; "
                    f"joint tasks must have the same examples (one dataset)")
            if _words(partner) != _words(first):
                raise ClfbenchError(f"encoder-finetune: {split} example id {first.id!r} has different text in "
                                    f"{tasks[0].name} and {task.name}")
            group.append(partner)
        inputs = first.text if word_source is None else tuple(_words(group[word_source]))
        rows.append(Row(id=first.id, inputs=inputs, examples=tuple(group)))
    known = {ex.id for ex in lists[0]}
    for task, examples in zip(tasks[1:], lists[1:]):
        for ex in examples:
            if ex.id not in known:
                raise ClfbenchError(
                    f"encoder-finetune: {split} example id {ex.id!r} of {task.name} is not in {tasks[0].name}; "
                    f"joint tasks must have the same examples (one dataset)")
    return rows


def _held_out(n: int, dev_fraction: float, seed: int) -> set[int]:
    n_dev = int(round(n * dev_fraction))
    if dev_fraction > 0 and n_dev == 0 and n >= 10:
        n_dev = 1
    return set(random.Random(seed).sample(range(n), n_dev)) if n_dev else set()


def split_dev(task: TaskData, dev_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, dev): the task's dev split when it has one, else `dev_fraction` of train held out (seeded)."""
    if task.dev:
        return list(task.train), list(task.dev)
    held_out = _held_out(len(task.train), dev_fraction, seed)
    if not held_out:
        return list(task.train), []
    train = [ex for i, ex in enumerate(task.train) if i not in held_out]
    dev = [ex for i, ex in enumerate(task.train) if i in held_out]
    return train, dev


def split_dev_rows(train: list[Row], dev: list[Row], dev_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """`split_dev` over paired rows: the same rows are held out for every task of a joint run."""
    if dev:
        return train, dev
    held_out = _held_out(len(train), dev_fraction, seed)
    return ([row for i, row in enumerate(train) if i not in held_out],
            [row for i, row in enumerate(train) if i in held_out])


class Codec:
    """Tokenises model inputs: texts, or word lists (`is_split_into_words=True`) when the run has a token
    head. Batches are padded to their longest input (dynamic padding) and cut at `max_length`."""

    def __init__(self, tokenizer, words: bool, max_length: int):
        self.tokenizer, self.words, self.max_length = tokenizer, words, max_length

    def encode(self, inputs: Sequence[str | tuple[str, ...]], padding: bool = True, tensors: bool = True):
        batch = [list(item) for item in inputs] if self.words else list(inputs)
        return self.tokenizer(batch, is_split_into_words=self.words, padding=padding, truncation=True,
                              max_length=self.max_length, return_tensors="pt" if tensors else None)

    def length_sorted_batches(self, rows: list[Row], batch_size: int) -> list[list[int]]:
        """Indices of `rows` in batches of similar length (less padding); order restored by the caller."""
        if not rows:
            return []
        lengths = [len(ids) for ids in self.encode([r.inputs for r in rows], padding=False, tensors=False)["input_ids"]]
        order = sorted(range(len(rows)), key=lambda i: lengths[i])
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    def truncated_words(self, rows: list[Row]) -> list[int]:
        """Per row, how many of its words `max_length` cuts off entirely (0 without a token head)."""
        if not self.words or not rows:
            return [0] * len(rows)
        encoding = self.encode([r.inputs for r in rows], padding=False, tensors=False)
        return [_cut_words(encoding.word_ids(b), len(row.inputs), len(encoding["input_ids"][b]), self.max_length)
                for b, row in enumerate(rows)]


def first_subword_positions(word_ids: Sequence[int | None]) -> dict[int, int]:
    """{word index: position of its first sub-word} from a fast tokenizer's `word_ids()`."""
    first: dict[int, int] = {}
    for position, word in enumerate(word_ids):
        if word is not None and word not in first:
            first[word] = position
    return first


def align_labels(word_ids: Sequence[int | None], tags: Sequence[str], label2id: dict[str, int]) -> list[int]:
    """Token-level targets: the word's tag id on its first sub-word, IGNORE_INDEX everywhere else (special
    tokens, later sub-words, padding, and nothing for words cut off by truncation)."""
    labels = [IGNORE_INDEX] * len(word_ids)
    for word, position in first_subword_positions(word_ids).items():
        labels[position] = label2id[tags[word]]
    return labels


def word_tags(word_ids: Sequence[int | None], n_words: int, position_tags: Sequence[str]) -> list[str]:
    """One tag per word, read at its first sub-word; a word with no sub-word left (cut off) gets "O"."""
    first = first_subword_positions(word_ids)
    return [position_tags[first[w]] if w in first else OUTSIDE for w in range(n_words)]


def _cut_words(word_ids: Sequence[int | None], n_words: int, length: int, max_length: int) -> int:
    """Words after the last one that kept a sub-word, when the encoding was cut at max_length."""
    if length < max_length:
        return 0
    present = [w for w in word_ids if w is not None]
    return n_words - (max(present) + 1 if present else 0)


def batch_targets(heads: list[Head], rows: list[Row], encoding, device: torch.device) -> list[torch.Tensor]:
    """One target tensor per head: label ids [batch] (sequence) or token label ids [batch, length] (token)."""
    targets = []
    for k, head in enumerate(heads):
        label2id = head.label2id
        if head.kind == "sequence":
            targets.append(torch.tensor([label2id[row.examples[k].label] for row in rows], device=device))
        else:
            targets.append(torch.tensor(
                [align_labels(encoding.word_ids(b), row.examples[k].tags, label2id) for b, row in enumerate(rows)],
                dtype=torch.long, device=device))
    return targets


def head_losses(heads: list[Head], logits: list[torch.Tensor], targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each head's mean cross-entropy: over examples (sequence) or over labelled positions (token)."""
    losses = []
    for head, head_logits, target in zip(heads, logits, targets):
        if head.kind == "sequence":
            losses.append(F.cross_entropy(head_logits.float(), target))
        else:
            summed = F.cross_entropy(head_logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum")
            # A batch without a labelled word (all cut off) contributes 0, not NaN, and keeps the graph whole.
            losses.append(summed / (target != IGNORE_INDEX).sum().clamp(min=1))
    return losses


def eval_metric_names(heads: list[Head]) -> list[str]:
    """The dev metric each head logs: eval_accuracy / eval_slot_f1, or `<name>/<task>` if two heads share it."""
    base = ["eval_accuracy" if head.kind == "sequence" else "eval_slot_f1" for head in heads]
    return [name if base.count(name) == 1 else f"{name}/{head.name}" for name, head in zip(base, heads)]


# ------------------------------------------------------------------------------------------- model


class HeadsModel(nn.Module):
    """A pretrained encoder (`AutoModel`) with one linear head per task. `forward` returns one logits tensor
    per head: [batch, labels] for a sequence head (on the pooled state), [batch, length, labels] for a
    token head (on every token state). Both read the dropout'd last hidden states."""

    def __init__(self, encoder: nn.Module, heads: list[Head], pooling: str = "first"):
        super().__init__()
        config = encoder.config
        dropout = getattr(config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(config, "hidden_dropout_prob", 0.1)
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.kinds = [head.kind for head in heads]
        self.pooling = pooling
        self.heads = nn.ModuleList(nn.Linear(config.hidden_size, len(head.labels)) for head in heads)
        std = getattr(config, "initializer_range", 0.02)
        for layer in self.heads:
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, **inputs) -> list[torch.Tensor]:
        states = self.dropout(self.encoder(**inputs).last_hidden_state)
        pooled = None
        out = []
        for kind, head in zip(self.kinds, self.heads):
            if kind == "token":
                out.append(head(states))
            else:
                if pooled is None:
                    pooled = self._pool(states, inputs.get("attention_mask"))
                out.append(head(pooled))
        return out

    def _pool(self, states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "first" or attention_mask is None:
            return states[:, 0]
        # "last": the last real token (left or right padding alike), for causal LMs.
        positions = torch.arange(states.shape[1], device=states.device)
        last = (attention_mask.to(positions.dtype) * positions).argmax(-1)
        return states[torch.arange(states.shape[0], device=states.device), last]


def load_model(model_path: str, heads: list[Head], words: bool = False):
    """Tokenizer and a `HeadsModel` with new heads (fp32 weights). `words`: the tokenizer must take word
    lists (a fast tokenizer with `word_ids()`; byte-level BPE ones are reloaded with `add_prefix_space`)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if words:
        if not getattr(tokenizer, "is_fast", False):
            raise ClfbenchError(f"encoder-finetune: token tasks need a fast tokenizer (word_ids); {model_path} "
                                f"has {type(tokenizer).__name__}")
        try:
            tokenizer([["a", "b"]], is_split_into_words=True)
        except Exception:  # e.g. RoBERTa/GPT-2 BPE: pre-split words need add_prefix_space=True
            tokenizer = AutoTokenizer.from_pretrained(model_path, add_prefix_space=True)
    if tokenizer.pad_token is None:  # decoder-style tokenizers
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.sep_token
    encoder = AutoModel.from_pretrained(model_path, dtype=torch.float32)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # BERT-style pooler: unused here (and an unused parameter would upset DDP)
    architectures = getattr(encoder.config, "architectures", None) or []
    pooling = "last" if any(name.endswith("ForCausalLM") for name in architectures) else "first"
    return tokenizer, HeadsModel(encoder, heads, pooling)


# ------------------------------------------------------------------------------- evaluate, predict


def _forward_batches(model, codec: Codec, rows: list[Row], device: torch.device, autocast, batch_size: int
                     ) -> Iterator[tuple[list[int], object, list[torch.Tensor]]]:
    """(row indices, encoding, logits per head) for length-sorted batches of `rows`, in eval mode, no grad."""
    was_training = model.training
    model.eval()
    try:
        for batch in codec.length_sorted_batches(rows, batch_size):
            encoding = codec.encode([rows[i].inputs for i in batch])
            with torch.no_grad(), autocast:
                logits = model(**{key: value.to(device) for key, value in encoding.items()})
            yield batch, encoding, [head_logits.float() for head_logits in logits]
    finally:
        model.train(was_training)


def _decode(head: Head, logits: torch.Tensor, encoding, batch_rows: list[Row]) -> list[str | list[str]]:
    ids = logits.argmax(-1).tolist()
    if head.kind == "sequence":
        return [head.labels[i] for i in ids]
    return [word_tags(encoding.word_ids(b), len(row.inputs), [head.labels[i] for i in ids[b]])
            for b, row in enumerate(batch_rows)]


def evaluate(model, codec: Codec, heads: list[Head], dev: list[Row], ctx: RunContext, autocast,
             batch_size: int) -> list[dict[str, float]]:
    """Per head on dev: {"loss"} (its mean cross-entropy) and {"accuracy"} (sequence) or {"slot_f1"} (token,
    over words, cut-off words as "O"). Each rank scores its share and the parts are combined: all ranks call."""
    device = torch.device(ctx.device)
    shard = dev[ctx.rank::ctx.world_size]
    totals = torch.zeros(len(heads), 3, dtype=torch.float64, device=device)  # loss sum, loss count, correct
    tags: list[tuple[list[list[str]], list[list[str]]]] = [([], []) for _ in heads]  # (gold, predicted)
    for batch, encoding, logits in _forward_batches(model, codec, shard, device, autocast, batch_size):
        batch_rows = [shard[i] for i in batch]
        targets = batch_targets(heads, batch_rows, encoding, device)
        for k, head in enumerate(heads):
            flat_logits = logits[k] if head.kind == "sequence" else logits[k].flatten(0, 1)
            flat_target = targets[k].flatten()
            totals[k, 0] += F.cross_entropy(flat_logits, flat_target, ignore_index=IGNORE_INDEX,
                                            reduction="sum").double()
            totals[k, 1] += (flat_target != IGNORE_INDEX).sum().double()
            decoded = _decode(head, logits[k], encoding, batch_rows)
            if head.kind == "sequence":
                totals[k, 2] += sum(p == row.examples[k].label for p, row in zip(decoded, batch_rows))
            else:
                tags[k][0].extend(list(row.examples[k].tags) for row in batch_rows)
                tags[k][1].extend(decoded)
    if ctx.world_size > 1:
        dist.all_reduce(totals)
        if any(head.kind == "token" for head in heads):
            gathered: list = [None] * ctx.world_size
            dist.all_gather_object(gathered, tags)
            tags = [([g for part in gathered for g in part[k][0]], [p for part in gathered for p in part[k][1]])
                    for k in range(len(heads))]
    n = max(float(len(dev)), 1.0)
    scores = []
    for k, head in enumerate(heads):
        score = {"loss": float(totals[k, 0]) / max(float(totals[k, 1]), 1.0)}
        if head.kind == "sequence":
            score["accuracy"] = float(totals[k, 2]) / n
        else:
            score["slot_f1"] = slot_scores(tags[k][0], tags[k][1])["slot_f1"]
        scores.append(score)
    return scores


def predict(model, codec: Codec, heads: list[Head], rows: list[Row], device: torch.device, autocast,
            batch_size: int) -> tuple[list[list[str | list[str]]], int]:
    """Per head, the prediction for every row in order (a label, or one tag per word); and how many words
    max_length cut off (predicted "O")."""
    out: list[list] = [[None] * len(rows) for _ in heads]
    truncated = 0
    for batch, encoding, logits in _forward_batches(model, codec, rows, device, autocast, batch_size):
        batch_rows = [rows[i] for i in batch]
        for k, head in enumerate(heads):
            for i, value in zip(batch, _decode(head, logits[k], encoding, batch_rows)):
                out[k][i] = value
        if codec.words:
            lengths = encoding["attention_mask"].sum(-1).tolist()
            truncated += sum(_cut_words(encoding.word_ids(b), len(row.inputs), lengths[b], codec.max_length)
                             for b, row in enumerate(batch_rows))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, truncated


# ------------------------------------------------------------------------------------ checkpoints


