"""The head-training library: linear heads on a pretrained encoder (or a LoRA-adapted decoder), trained with
cross-entropy. `encoder-finetune` and `ls-llama` / `ls-unllama` are built from it; neither imports the other.

- `Head`, `HeadsModel`: one linear head per task on the dropout'd last hidden states: a **sequence** head on
  the pooled state ([CLS], or the last real token for causal-LM checkpoints), a **token** head on every token
  state (a word's tag is read at its first sub-word, `engine.codec`);
- `batch_targets`, `head_losses`, `batch_losses`: each head's mean cross-entropy (over examples, or over
  labelled words), summed over the heads of a joint run;
- `evaluate` (dev: loss, accuracy or slot F1, every rank scoring its share) and `predict` (test, rank 0);
- the run pieces both methods share: `head_rows` (paired rows, a dev slice held out when the tasks have none),
  `prepare_fit`, and `fit_and_predict` (the training loop of `engine.training` with dev evaluation, then the
  test predictions and result rows).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clfbench.engine.codec import IGNORE_INDEX, Codec, Row, align_labels, align_rows, cut_words, word_tags
from clfbench.engine.context import RunContext
from clfbench.engine.dev_split import split_dev_rows
from clfbench.engine.metrics import DEFAULT_SLOT_RULE, slot_scores
from clfbench.engine.training import (EVALUATING, TESTING, LoopTimes, StepPlan, Tally, Training, autocast_for,
                                      epoch_batcher, plan_steps, report_examples, sampler_epochs, train_loop)
from clfbench.engine.types import ClfbenchError, MethodOutput, Predicted, TaskData


# ------------------------------------------------------------------------------------------- heads


@dataclass(frozen=True)
class Head:
    """One task's head: its name, kind ("sequence" | "token"), ordered label set, and (token) the slot rule its
    dev slot F1 is read under: the same rule as the task's test results, so early stopping picks by that number."""

    name: str
    kind: str
    labels: list[str]
    slot_rule: str | None = None

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}


def heads_of(tasks: list[TaskData]) -> list[Head]:
    return [Head(task.name, task.kind, list(task.labels), task.slot_metric) for task in tasks]


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


def load_tokenizer(model_path: str, words: bool):
    """The model's tokenizer, with a pad token. `words`: it must take word lists (a fast tokenizer with
    `word_ids()`; byte-level BPE ones are reloaded with `add_prefix_space`)."""
    from transformers import AutoTokenizer

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
    return tokenizer


def load_encoder(model_path: str, heads: list[Head], words: bool = False):
    """Tokenizer (`load_tokenizer`) and a `HeadsModel` with new heads (fp32 weights)."""
    from transformers import AutoModel

    tokenizer = load_tokenizer(model_path, words)
    encoder = AutoModel.from_pretrained(model_path, dtype=torch.float32)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # BERT-style pooler: unused here (and an unused parameter would upset DDP)
    architectures = getattr(encoder.config, "architectures", None) or []
    pooling = "last" if any(name.endswith("ForCausalLM") for name in architectures) else "first"
    return tokenizer, HeadsModel(encoder, heads, pooling)


# ------------------------------------------------------------------------------------------ losses


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


def batch_losses(model: nn.Module, codec: Codec, heads: list[Head], rows: list[Row], device: torch.device, autocast
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss to minimise on `rows` and, for joint heads, its parts (one per head; empty for one head)."""
    encoding = codec.encode([row.inputs for row in rows])
    targets = batch_targets(heads, rows, encoding, device)
    inputs = {key: value.to(device) for key, value in encoding.items()}
    with autocast:
        logits = model(**inputs)
    losses = head_losses(heads, logits, targets)
    if len(heads) == 1:
        return losses[0], []
    return torch.stack(losses).sum(), losses  # equally weighted heads


def eval_metric_names(heads: list[Head]) -> list[str]:
    """The dev metric each head logs: eval_accuracy / eval_slot_f1, or `<name>/<task>` if two heads share it."""
    base = ["eval_accuracy" if head.kind == "sequence" else "eval_slot_f1" for head in heads]
    return [name if base.count(name) == 1 else f"{name}/{head.name}" for name, head in zip(base, heads)]


# ------------------------------------------------------------------------------- evaluate, predict


def _forward_batches(model, codec: Codec, rows: list[Row], device: torch.device, autocast, batch_size: int,
                     report: Callable[[int], None] | None = None
                     ) -> Iterator[tuple[list[int], object, list[torch.Tensor]]]:
    """(row indices, encoding, logits per head) for length-sorted batches of `rows`, in eval mode, no grad;
    `report(rows done)` after each batch (the run's phase progress)."""
    was_training = model.training
    model.eval()
    done = 0
    try:
        for batch in codec.length_sorted_batches(rows, batch_size):
            encoding = codec.encode([rows[i].inputs for i in batch])
            with torch.no_grad(), autocast:
                logits = model(**{key: value.to(device) for key, value in encoding.items()})
            yield batch, encoding, [head_logits.float() for head_logits in logits]
            done += len(batch)
            if report is not None:
                report(done)
    finally:
        model.train(was_training)


def _decode(head: Head, logits: torch.Tensor, encoding, batch_rows: list[Row]) -> list[str | list[str]]:
    ids = logits.argmax(-1).tolist()
    if head.kind == "sequence":
        return [head.labels[i] for i in ids]
    return [word_tags(encoding.word_ids(b), len(row.inputs), [head.labels[i] for i in ids[b]])
            for b, row in enumerate(batch_rows)]


def _gather_tags(tags: list[tuple[list, list]], ctx: RunContext, n_heads: int) -> list[tuple[list, list]]:
    """Every rank's (gold, predicted) tag lists per head, concatenated in rank order (all ranks call)."""
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, tags)
    return [([g for part in gathered for g in part[k][0]], [p for part in gathered for p in part[k][1]])
            for k in range(n_heads)]


def evaluate(model, codec: Codec, heads: list[Head], dev: list[Row], ctx: RunContext, autocast,
             batch_size: int) -> list[dict[str, float]]:
    """Per head on dev: {"loss"} (its mean cross-entropy) and {"accuracy"} (sequence) or {"slot_f1"} (token,
    over words, cut-off words as "O"). Each rank scores its share and the parts are combined: all ranks call."""
    device = torch.device(ctx.device)
    shard = dev[ctx.rank::ctx.world_size]
    totals = torch.zeros(len(heads), 3, dtype=torch.float64, device=device)  # loss sum, loss count, correct
    tags: list[tuple[list[list[str]], list[list[str]]]] = [([], []) for _ in heads]  # (gold, predicted)
    report = report_examples(ctx, EVALUATING, len(dev), ranks=ctx.world_size)
    ctx.set_phase(EVALUATING, 0, len(dev))  # the list shows "eval 0/N" at once, not a bare "eval"
    for batch, encoding, logits in _forward_batches(model, codec, shard, device, autocast, batch_size, report):
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
            tags = _gather_tags(tags, ctx, len(heads))
    n = max(float(len(dev)), 1.0)
    scores = []
    for k, head in enumerate(heads):
        score = {"loss": float(totals[k, 0]) / max(float(totals[k, 1]), 1.0)}
        if head.kind == "sequence":
            score["accuracy"] = float(totals[k, 2]) / n
        else:
            score["slot_f1"] = slot_scores(tags[k][0], tags[k][1], head.slot_rule or DEFAULT_SLOT_RULE)["slot_f1"]
        scores.append(score)
    return scores


def predict(model, codec: Codec, heads: list[Head], rows: list[Row], device: torch.device, autocast,
            batch_size: int, report: Callable[[int], None] | None = None
            ) -> tuple[list[list[str | list[str]]], int, list[list[float | None]]]:
    """Per head, the prediction for every row in order (a label, or one tag per word); how many words max_length
    cut off (predicted "O"); and per head the softmax probability of each predicted label (sequence heads; None
    for tags), which calibration reads. `report(rows done)` after each batch."""
    out: list[list] = [[None] * len(rows) for _ in heads]
    confidences: list[list[float | None]] = [[None] * len(rows) for _ in heads]
    truncated = 0
    for batch, encoding, logits in _forward_batches(model, codec, rows, device, autocast, batch_size, report):
        batch_rows = [rows[i] for i in batch]
        for k, head in enumerate(heads):
            for i, value in zip(batch, _decode(head, logits[k], encoding, batch_rows)):
                out[k][i] = value
            if head.kind == "sequence":  # float32 softmax: bf16 logits would round the probabilities
                for i, p in zip(batch, torch.softmax(logits[k].float(), -1).max(-1).values.tolist()):
                    confidences[k][i] = p
        if codec.words:
            lengths = encoding["attention_mask"].sum(-1).tolist()
            truncated += sum(cut_words(encoding.word_ids(b), len(row.inputs), lengths[b], codec.max_length)
                             for b, row in enumerate(batch_rows))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, truncated, confidences


# ------------------------------------------------------------------------------- a head-training run


@dataclass
class HeadRows:
    train: list[Row]
    dev: list[Row]
    test: list[Row]
    words: bool  # a head labels words: the inputs are word lists


def head_rows(tasks: list[TaskData], dev_fraction: float, seed: int, method: str, dev_limit: int | None = None
              ) -> HeadRows:
    """The tasks' rows per split, paired by id; dev is the tasks' dev split or `dev_fraction` of train held out
    (the same rows for every task), cut to `dev_limit`. When a task is a token task its words are the input."""
    word_source = next((k for k, task in enumerate(tasks) if task.kind == "token"), None)
    train, dev = split_dev_rows(align_rows(tasks, "train", word_source, method=method),
                                align_rows(tasks, "dev", word_source, method=method), dev_fraction, seed)
    if not train:  # the tasks have training examples, but none that pairs up across them
        raise ClfbenchError(f"{method}: task {'+'.join(task.name for task in tasks)} has no training examples")
    test = align_rows(tasks, "test", word_source, method=method)  # test_limit: applied by the worker
    return HeadRows(train=train, dev=dev[: dev_limit or None], test=test, words=word_source is not None)


@dataclass
class HeadFit:
    """What training, dev evaluation and prediction of a head model read."""

    model: nn.Module  # unwrapped: evaluation and prediction run on rank-local copies
    codec: Codec
    heads: list[Head]
    rows: HeadRows
    plan: StepPlan
    batch_size: int  # per process; evaluation and prediction use twice as many
    autocast: object


def prepare_fit(ctx: RunContext, tokenizer, model: nn.Module, heads: list[Head], rows: HeadRows) -> HeadFit:
    """Move `model` to the run's device in training mode; the codec, step plan and autocast from the options
    (`max_length`, `batch_size`, `epochs`, `warmup_ratio`, `bf16`)."""
    opts = ctx.options
    device = torch.device(ctx.device)
    codec = Codec(tokenizer, words=rows.words, max_length=opts.max_length)
    model.to(device)
    model.train()
    plan = plan_steps(len(rows.train), opts.batch_size, ctx.world_size, opts.epochs, opts.warmup_ratio)
    return HeadFit(model=model, codec=codec, heads=heads, rows=rows, plan=plan, batch_size=opts.batch_size,
                   autocast=autocast_for(device, opts.bf16))


def _log_dev_scores(ctx: RunContext, fit: HeadFit, step: int) -> float:
    """Log eval_loss (summed over heads) and each head's metric; the seconds it took."""
    started = time.perf_counter()
    scores = evaluate(fit.model, fit.codec, fit.heads, fit.rows.dev, ctx, fit.autocast, fit.batch_size * 2)
    loss = sum(score["loss"] for score in scores)
    ctx.log_metric(step, "eval_loss", loss)
    joint = len(fit.heads) > 1
    shown = [f"eval_loss {loss:.4f}"]
    for head, score, name in zip(fit.heads, scores, eval_metric_names(fit.heads)):
        if joint:
            ctx.log_metric(step, f"eval_loss/{head.name}", score["loss"])
        value = score["accuracy"] if head.kind == "sequence" else score["slot_f1"]
        ctx.log_metric(step, name, value)
        shown.append(f"{name} {value:.4f}")
    spent = time.perf_counter() - started
    if ctx.is_main:  # what `clfbench logs -f` shows of the dev evaluation
        print(f"{ctx.method}: dev at step {step}: {', '.join(shown)} ({len(fit.rows.dev)} examples, {spent:.1f} s)",
              flush=True)
    return spent


def train_heads(ctx: RunContext, fit: HeadFit, training: Training) -> LoopTimes:
    """`train_loop` over this rank's sampler batches: one batch per step, its loss the heads' summed mean
    cross-entropies (joint runs log each head's part as `train_loss/<task>`)."""
    device = torch.device(ctx.device)
    batches = epoch_batcher(sampler_epochs(len(fit.rows.train), fit.batch_size, ctx.world_size, ctx.rank, ctx.seed),
                            fit.plan.steps_per_epoch)

    def gradients(step: int) -> list[Tally]:
        (indices,) = batches(step)
        rows = [fit.rows.train[i] for i in indices]
        loss, parts = batch_losses(training.wrapped, fit.codec, fit.heads, rows, device, fit.autocast)
        loss.backward()
        return [Tally(loss.detach(), weight=1.0, count=len(indices), parts=[part.detach() for part in parts])]

    joint = len(fit.heads) > 1
    return train_loop(ctx, training, fit.plan, gradients,
                      evaluate_dev=(lambda step: _log_dev_scores(ctx, fit, step)) if fit.rows.dev else None,
                      part_names=[f"train_loss/{head.name}" for head in fit.heads] if joint else [])


def _test_output(ctx: RunContext, fit: HeadFit, training: Training, times: LoopTimes, extra: dict[str, float]
                 ) -> MethodOutput:
    device, test = torch.device(ctx.device), fit.rows.test
    ctx.set_phase(TESTING, 0, len(test))
    started = time.perf_counter()
    predicted, truncated, confidences = predict(fit.model, fit.codec, fit.heads, test, device, fit.autocast,
                                                fit.batch_size * 2,
                                   report_examples(ctx, TESTING, len(test)))
    test_time = time.perf_counter() - started
    train_time = times.train_time_s
    common = {
        "train_time_s": train_time,
        "eval_time_s": test_time,
        "dev_eval_time_s": times.dev_eval_time_s,
        "train_examples_per_s": times.counted / train_time if times.counted and train_time > 0 else 0.0,
        "test_examples_per_s": len(test) / test_time if test and test_time > 0 else 0.0,
        "train_steps": float(fit.plan.total_steps),
        "resumed_from_step": float(training.start_step),
        **extra,
    }
    predictions: dict[str, dict[str, Predicted]] = {}
    results: dict[str, dict[str, float]] = {}
    for k, head in enumerate(fit.heads):
        predictions[head.name] = {row.id: Predicted(value, confidence=confidence)
                                  for row, value, confidence in zip(test, predicted[k], confidences[k])}
        results[head.name] = dict(common)
        if head.kind == "token":
            results[head.name]["truncated_words"] = float(truncated)
    return MethodOutput(predictions=predictions, extra_results=results)


def fit_and_predict(ctx: RunContext, fit: HeadFit, training: Training, extra: dict[str, float] | None = None
                    ) -> MethodOutput | None:
    """Train (`train_heads`), then rank 0 predicts the test rows; `extra` joins every task's result rows."""
    times = train_heads(ctx, fit, training)
    output = _test_output(ctx, fit, training, times, extra or {}) if ctx.is_main else None
    if ctx.distributed:
        dist.barrier()  # the other ranks wait for rank 0's test prediction
    return output
