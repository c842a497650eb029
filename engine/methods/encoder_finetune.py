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
sequence head and `eval_slot_f1` (engine.metrics.slot_scores, under the task's slot rule) for a token head. When
two heads would log the same name (two sequence heads) each logs `<name>/<task>` instead; joint runs also log
`eval_loss/<task>` and `train_loss/<task>` per head next to the summed `train_loss`. Checkpoints every
`checkpoint_every` steps into `ctx.output_dir/checkpoint` (resumed on a retry); rank 0 predicts the test set.
Options pass through `EncoderFinetuneOptions.resolved`, so `preset: paper` replaces batch size, lr,
optimizer, weight decay and epochs. The heads, codec, evaluation and prediction are the head-training library's
(`engine.heads`, `engine.codec`), the loop and checkpoints the training scaffold's (`engine.training`): this
module says only what is particular to encoder fine-tuning.

Distributed: with `ctx.world_size > 1` the worker has started the process group; the model is wrapped in
DistributedDataParallel and each rank draws `batch_size` examples per step from a DistributedSampler
(so the global batch is `batch_size * world_size`). Every collective (loss averaging, dev evaluation,
checkpoint barriers) runs on all ranks; `ctx.log_metric` is called on every rank and the context keeps
rank 0's calls.

Position in training is a function of the global step alone: epoch = step // steps_per_epoch, and the
batch order of an epoch comes from the sampler's (seed, epoch) (`engine.training.sampler_epochs`). A
checkpoint therefore holds the model, optimizer, scheduler, step and every rank's RNG states, and a resumed
run continues exactly where the checkpoint was taken (bit for bit on CPU).
"""
from __future__ import annotations

from clfbench.engine.context import RunContext
from clfbench.engine.heads import HeadFit, fit_and_predict, heads_of, head_rows, load_encoder, prepare_fit
from clfbench.engine.training import require_process_group, start_training
from clfbench.engine.types import MethodOutput

LOG_PREFIX = "encoder-finetune:"
MODEL_FORMAT = 2  # in the checkpoint fingerprint: 2 = AutoModel + HeadsModel (1 was AutoModelForSequenceClassification)


def run(ctx: RunContext) -> MethodOutput | None:
    opts = ctx.options  # resolved by the worker: `preset: paper` already applied
    require_process_group(ctx, LOG_PREFIX)
    if ctx.is_main and opts.preset != "none":
        print(f"{LOG_PREFIX} preset {opts.preset}: batch_size={opts.batch_size} lr={opts.lr} "
              f"optimizer={opts.optimizer} weight_decay={opts.weight_decay} epochs={opts.epochs:g}", flush=True)
    # The tasks were checked by the worker against the catalog: one or two, sequence or token, 2+ labels each.
    heads = heads_of(ctx.tasks)
    rows = head_rows(ctx.tasks, opts.dev_fraction, ctx.seed, "encoder-finetune")
    tokenizer, model = load_encoder(ctx.model_path, heads, words=rows.words)
    fit = prepare_fit(ctx, tokenizer, model, heads, rows)
    if ctx.is_main:
        report_cut_words(fit, opts.max_length)
    training = start_training(ctx, model, fit.plan, fingerprint(ctx, fit), lr=opts.lr, weight_decay=opts.weight_decay,
                              optimizer=opts.optimizer, log_prefix=LOG_PREFIX)
    return fit_and_predict(ctx, fit, training)


def fingerprint(ctx: RunContext, fit: HeadFit) -> dict:
    """What a checkpoint must have been made with to be resumed here."""
    return {
        "format": MODEL_FORMAT, "heads": [[h.name, h.kind, h.labels] for h in fit.heads],
        "n_train": len(fit.rows.train), "n_dev": len(fit.rows.dev), "world_size": ctx.world_size,
        "batch_size": fit.batch_size, "total_steps": fit.plan.total_steps, "seed": ctx.seed,
        "optimizer": ctx.options.optimizer, "n_params": sum(p.numel() for p in fit.model.parameters()),
    }


def report_cut_words(fit: HeadFit, max_length: int) -> None:
    """Say how many training words `max_length` cuts off (they carry no label), when any."""
    if fit.rows.words:
        cut = sum(fit.codec.truncated_words(fit.rows.train))
        if cut:
            print(f"{LOG_PREFIX} max_length={max_length} cuts {cut} training words (they carry no label)", flush=True)
