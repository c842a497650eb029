"""LS-LLaMA and LS-unLLaMA: label-supervised fine-tuning of a decoder LLM (Li et al., "Label Supervised LLaMA
Finetuning", 2023; seed paper 003).

Instead of generating a label as text, the LLM's final hidden states feed a linear label head trained with
cross-entropy; the LLM itself is adapted with LoRA (peft) and otherwise frozen. One module serves both catalog
entries, the variant comes from the run's method name:

- `ls-llama`: the decoder as it is, causal attention;
- `ls-unllama`: the same with the causal mask removed, so every token attends to every other real token of its
  text (bidirectional, like an encoder). Padding stays masked in both.

A **sequence** task pools the final hidden states of the real tokens (`pooling`: the last real token, their mean
or their max; padding never contributes) into the head. A **token** task (BIO slots) labels every word by its
first sub-word, exactly as encoder-finetune does (its `align_labels` / `word_tags` / `Codec` are reused).

Trainable: the LoRA matrices and the head, nothing else; checkpoints hold only those (a few MB instead of the
whole base model) plus optimizer, scheduler, step and RNG states, and a retried run resumes from them. The loop
is encoder-finetune's: DDP under torchrun, bf16 on GPUs, dev evaluation every `eval_every` steps (eval_loss,
eval_accuracy or eval_slot_f1), train_loss / lr / train_examples_per_s every `log_every` steps, rank 0 predicts
the test set.

A text's logits do not depend on how its batch was padded (left, right or not at all): padding is masked as
attention keys in both variants, pooling reads real tokens only, and position ids count real tokens only.
"""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from clfbench.engine.methods import encoder_finetune as ef
from clfbench.engine.methods.catalog import split_plus
from clfbench.engine.training import (autocast_for, load_checkpoint, make_optimizer, make_scheduler, save_checkpoint,
                             restore, train_loop)
from clfbench.engine.context import RunContext
from clfbench.engine.types import ClfbenchError, MethodOutput, Predicted

LOG_PREFIX = "ls-llama:"
# Method name -> whether the causal mask is removed.
BIDIRECTIONAL = {"ls-llama": False, "ls-unllama": True}
MODEL_FORMAT = 1  # in the checkpoint fingerprint: 1 = peft LoRA on AutoModel + LabelSupervisedModel head


# ------------------------------------------------------------------------------------------- model


class LabelSupervisedModel(ef.HeadsModel):
    """A (LoRA-wrapped) decoder with one linear head: encoder-finetune's `HeadsModel` with mask-aware pooling
    over the real tokens (last | mean | max) and position ids that ignore padding.

    `forward(input_ids, attention_mask)` returns [logits]: [batch, labels] for a sequence head, [batch,
    length, labels] for a token head (padding positions carry logits too; the loss and decoding ignore them).
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        # Real tokens count from 0 whatever the padding, so a left-padded text gets exactly the positions it has
        # unpadded. (Rotary attention depends only on relative positions, so for Llama this removes float noise
        # rather than an error; for a decoder with absolute positions it would be an error.) Padding positions
        # get 0: they are masked as keys, so what they compute never reaches a real token.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    def _pool(self, states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "last":
            return super()._pool(states, attention_mask)  # the last real token, left or right padding alike
        real = attention_mask.bool().unsqueeze(-1)
        # masked_fill, not a multiplication by the mask: a padding position's state is never read, even
        # if it is not finite.
        if self.pooling == "mean":
            return states.masked_fill(~real, 0.0).sum(1) / real.sum(1).clamp(min=1).to(states.dtype)
        if self.pooling == "max":
            return states.masked_fill(~real, torch.finfo(states.dtype).min).amax(1)
        raise ClfbenchError(f"{LOG_PREFIX} unknown pooling {self.pooling!r} (last, mean or max)")


def remove_causal_mask(decoder) -> None:
    """Make a transformers (>= 5.2) decoder attend bidirectionally, padding still masked.

    How it works in transformers 5.x (read in `masking_utils.create_causal_mask`, `utils.generic`'s
    `merge_with_config_defaults` and `integrations/sdpa_attention.py`):
    1. `config.is_causal = False` makes `create_causal_mask` (called by `LlamaModel.forward`) return
       `create_bidirectional_mask`: a mask that hides only the padding keys, or None when the batch has no
       padding.
    2. A None mask alone is not enough: SDPA and flash attention would then fall back to their own causal
       kernel, because `LlamaAttention.is_causal` is hard-coded True. The forward decorator therefore also
       passes `is_causal=config.is_causal` as a keyword down every layer to the attention function, which takes
       it over the module attribute. (transformers PR #43705, "Allow bi-directional attention for all
       models"; before 5.2 the flag was ignored and the model stayed causal.)
    The LS-LLaMA reference code instead replaced the whole 4D mask by zeros, which also unmasks the padding;
    here padding stays masked, and tests/test_ls_llama.py checks both properties.
    """
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__).release < (5, 2):
        raise ClfbenchError(f"ls-unllama needs transformers >= 5.2 (bidirectional attention through "
                            f"config.is_causal); this is {transformers.__version__}")
    decoder.config.is_causal = False


def load_model(model_path: str, head: ef.Head, options, bidirectional: bool, device: torch.device):
    """Tokenizer and a `LabelSupervisedModel`: the decoder frozen, LoRA adapters on `lora_target_modules`,
    a new head. The tokenizer setup (pad token, word lists for token tasks) is encoder-finetune's."""
    from peft import LoraConfig, get_peft_model

    tokenizer, plain = ef.load_model(model_path, [head], words=head.kind == "token")
    decoder = plain.encoder
    architectures = getattr(decoder.config, "architectures", None) or []
    if not any(name.endswith("ForCausalLM") for name in architectures):
        kind = getattr(decoder.config, "model_type", "unknown")
        raise ClfbenchError(f"{LOG_PREFIX} needs a decoder LLM (a causal LM); {model_path} is a {kind} model "
                            f"({', '.join(architectures) or 'no architecture'}): use encoder-finetune for encoders")
    if bidirectional:
        remove_causal_mask(decoder)
    if _use_bf16(device, options.bf16):
        decoder.to(torch.bfloat16)  # the frozen base only; peft keeps the adapters in float32
    decoder.requires_grad_(False)
    targets = list(split_plus(options.lora_target_modules))
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=targets, bias="none")
    try:
        adapted = get_peft_model(decoder, config)
    except ValueError as error:  # e.g. "Target modules {...} not found in the base model"
        raise ClfbenchError(f"{LOG_PREFIX} lora_target_modules={options.lora_target_modules}: "
                            f"{str(error).splitlines()[0]}") from None
    return tokenizer, LabelSupervisedModel(adapted, [head], pooling=options.pooling)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (LoRA matrices and the head), by name: what a checkpoint holds."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


class _TrainableOnly:
    """What `save_checkpoint` saves as "model": only the trainable parameters, not the frozen base."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.model)


def _use_bf16(device: torch.device, bf16: bool) -> bool:
    return device.type == "cuda" and bf16 and torch.cuda.is_bf16_supported()


# ------------------------------------------------------------------------------------------- entry


def run(ctx: RunContext) -> MethodOutput | None:
    (task,) = ctx.tasks  # one sequence or token task with 2+ labels: checked by the worker against the catalog
    bidirectional = BIDIRECTIONAL[ctx.method]
    opts = ctx.options
    seed = ctx.seed
    distributed = ctx.world_size > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ClfbenchError(f"{LOG_PREFIX} world_size > 1 but torch.distributed is not initialised")
    device = torch.device(ctx.device)

    head = ef.Head(task.name, task.kind, list(task.labels))
    words = 0 if task.kind == "token" else None  # the token task's words are the model input
    train_rows, dev_rows = ef.split_dev_rows(ef.align_rows([task], "train", words), ef.align_rows([task], "dev", words),
                                             opts.dev_fraction, seed)
    if not train_rows:
        raise ClfbenchError(f"{ctx.spec.method}: task {task.name} has no training examples")
    dev_rows = dev_rows[: opts.dev_limit or None]
    test_rows = ef.align_rows([task], "test", words)  # test_limit was applied when the worker loaded the task

    tokenizer, model = load_model(ctx.model_path, head, opts, bidirectional, device)
    codec = ef.Codec(tokenizer, words=words is not None, max_length=opts.max_length)
    model.to(device)
    model.train()
    autocast = autocast_for(device, opts.bf16)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if ctx.is_main:
        print(f"{LOG_PREFIX} {ctx.spec.method} ({'bidirectional' if bidirectional else 'causal'} attention), "
              f"{n_trainable:,} of {n_total:,} parameters train (LoRA r={opts.lora_r} on "
              f"{opts.lora_target_modules} + head), pooling={opts.pooling}, {len(train_rows)} train / "
              f"{len(dev_rows)} dev / {len(test_rows)} test", flush=True)

    batch_size = opts.batch_size
    steps_per_epoch = math.ceil(math.ceil(len(train_rows) / ctx.world_size) / batch_size)
    total_steps = max(1, math.ceil(opts.epochs * steps_per_epoch))
    warmup_steps = int(round(opts.warmup_ratio * total_steps))
    fingerprint = {
        "format": MODEL_FORMAT, "method": ctx.spec.method, "head": [head.name, head.kind, head.labels],
        "n_train": len(train_rows), "n_dev": len(dev_rows), "world_size": ctx.world_size, "batch_size": batch_size,
        "total_steps": total_steps, "seed": seed, "trainable_params": n_trainable,
        "lora": [opts.lora_r, opts.lora_alpha, opts.lora_dropout, opts.lora_target_modules], "pooling": opts.pooling,
    }
    checkpoint = load_checkpoint(ctx.output_dir, fingerprint, ctx.is_main)
    if distributed:  # resume only when every rank found the same step (e.g. output_dir not shared between nodes)
        found: list = [None] * ctx.world_size
        dist.all_gather_object(found, None if checkpoint is None else int(checkpoint["step"]))
        if len(set(found)) != 1:
            checkpoint = None
    if checkpoint is not None:
        missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
        if unexpected or set(missing) & set(trainable_state(model)):
            raise ClfbenchError(f"{LOG_PREFIX} checkpoint in {ctx.output_dir} does not match the model")

    wrapped = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, opts.lr, opts.weight_decay, device)
    scheduler = make_scheduler(optimizer, warmup_steps, total_steps)
    start_step = 0
    if checkpoint is not None:
        start_step = restore(checkpoint, optimizer, scheduler, ctx.rank)
        if ctx.is_main:
            print(f"{LOG_PREFIX} resuming at step {start_step}/{total_steps}", flush=True)
        del checkpoint

    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(range(len(train_rows)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    batches = ef._EpochBatches(sampler, batch_size, steps_per_epoch)
    (metric_name,) = ef.eval_metric_names([head])

    def evaluate_dev(step: int) -> float:
        started = time.perf_counter()
        (score,) = ef.evaluate(model, codec, [head], dev_rows, ctx, autocast, batch_size * 2)
        ctx.log_metric(step, "eval_loss", score["loss"])
        ctx.log_metric(step, metric_name, score["accuracy"] if head.kind == "sequence" else score["slot_f1"])
        return time.perf_counter() - started

    # ------------------------------------------------------------------------------- training loop
    def losses_of(indices):
        rows = [train_rows[i] for i in indices]
        encoding = codec.encode([row.inputs for row in rows])
        targets = ef.batch_targets([head], rows, encoding, device)
        with autocast:
            logits = wrapped(input_ids=encoding["input_ids"].to(device),
                             attention_mask=encoding["attention_mask"].to(device))
        (loss,) = ef.head_losses([head], logits, targets)
        return loss, []

    times = train_loop(
        ctx, device=device, distributed=distributed, start_step=start_step, total_steps=total_steps,
        batch_at=batches.at, losses_of=losses_of, parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer, scheduler=scheduler, opts=opts, evaluate_dev=evaluate_dev if dev_rows else None,
        save_checkpoint=lambda step: save_checkpoint(ctx, _TrainableOnly(model), optimizer, scheduler, step,
                                                        steps_per_epoch, fingerprint))
    train_time, dev_eval_time = times.train_time_s, times.dev_eval_time_s

    # ------------------------------------------------------------------------------ test prediction
    output = None
    if ctx.is_main:
        started = time.perf_counter()
        (predicted,), truncated = ef.predict(model, codec, [head], test_rows, device, autocast, batch_size * 2)
        test_time = time.perf_counter() - started
        extra = {
            "train_time_s": train_time, "eval_time_s": test_time, "dev_eval_time_s": dev_eval_time,
            "train_examples_per_s": times.examples / train_time if train_time > 0 else 0.0,
            "test_examples_per_s": len(test_rows) / test_time if test_rows and test_time > 0 else 0.0,
            "train_steps": float(total_steps), "resumed_from_step": float(start_step),
            "trainable_params": float(n_trainable),
        }
        if head.kind == "token":
            extra["truncated_words"] = float(truncated)
        predictions = {row.id: Predicted(value) for row, value in zip(test_rows, predicted)}
        output = MethodOutput(predictions={task.name: predictions}, extra_results={task.name: extra})
    if distributed:
        dist.barrier()  # the other ranks wait for rank 0's test prediction
    return output
