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
first sub-word, exactly as encoder-finetune does (both are built from the head-training library,
`engine.heads` and `engine.codec`).

Trainable: the LoRA matrices and the head, nothing else; checkpoints hold only those (a few MB instead of the
whole base model) plus optimizer, scheduler, step and RNG states, and a retried run resumes from them. The
training is the library's (`engine.heads.fit_and_predict` on `engine.training`'s loop), as for encoder-finetune:
DDP under torchrun, bf16 on GPUs, dev evaluation every `eval_every` steps (eval_loss, eval_accuracy or
eval_slot_f1), train_loss / lr / train_examples_per_s every `log_every` steps, rank 0 predicts the test set.

A text's logits do not depend on how its batch was padded (left, right or not at all): padding is masked as
attention keys in both variants, pooling reads real tokens only, and position ids count real tokens only.
"""
from __future__ import annotations

from pathlib import Path

import torch

from clfbench.engine.context import RunContext
from clfbench.engine.heads import Head, HeadFit, HeadsModel, fit_and_predict, head_rows, load_encoder, prepare_fit
from clfbench.engine.methods.catalog import split_plus
from clfbench.engine.training import require_process_group, start_training
from clfbench.engine.types import ClfbenchError, MethodOutput

LOG_PREFIX = "ls-llama:"
# Method name -> whether the causal mask is removed.
BIDIRECTIONAL = {"ls-llama": False, "ls-unllama": True}
MODEL_FORMAT = 1  # in the checkpoint fingerprint: 1 = peft LoRA on AutoModel + LabelSupervisedModel head


# ------------------------------------------------------------------------------------------- model


class LabelSupervisedModel(HeadsModel):
    """A (LoRA-wrapped) decoder with one linear head: the library's `HeadsModel` with mask-aware pooling
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


def load_model(model_path: str, head: Head, options, bidirectional: bool, device: torch.device):
    """Tokenizer and a `LabelSupervisedModel`: the decoder frozen, LoRA adapters on `lora_target_modules`,
    a new head. The tokenizer setup (pad token, word lists for token tasks) is the library's."""
    from peft import LoraConfig, get_peft_model

    # The library's encoder loader: its fresh head goes unused, but making it draws from the RNG like before,
    # so the LoRA and head initialisation (and a run's numbers) stay what they were.
    tokenizer, plain = load_encoder(model_path, [head], words=head.kind == "token")
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


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor], output_dir: Path) -> None:
    """Put a checkpoint's trainable parameters back (the frozen base came from the model files)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) & set(trainable_state(model)):
        raise ClfbenchError(f"{LOG_PREFIX} checkpoint in {output_dir} does not match the model")


def _use_bf16(device: torch.device, bf16: bool) -> bool:
    return device.type == "cuda" and bf16 and torch.cuda.is_bf16_supported()


# ------------------------------------------------------------------------------------------- entry


def run(ctx: RunContext) -> MethodOutput | None:
    (task,) = ctx.tasks  # one sequence or token task with 2+ labels: checked by the worker against the catalog
    bidirectional = BIDIRECTIONAL[ctx.method]
    opts = ctx.options
    require_process_group(ctx, LOG_PREFIX)
    head = Head(task.name, task.kind, list(task.labels))
    rows = head_rows([task], opts.dev_fraction, ctx.seed, ctx.method, dev_limit=opts.dev_limit)
    tokenizer, model = load_model(ctx.model_path, head, opts, bidirectional, torch.device(ctx.device))
    fit = prepare_fit(ctx, tokenizer, model, [head], rows)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if ctx.is_main:
        print(f"{LOG_PREFIX} {ctx.method} ({'bidirectional' if bidirectional else 'causal'} attention), "
              f"{n_trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters train (LoRA "
              f"r={opts.lora_r} on {opts.lora_target_modules} + head), pooling={opts.pooling}, {len(rows.train)} "
              f"train / {len(rows.dev)} dev / {len(rows.test)} test", flush=True)
    training = start_training(
        ctx, model, fit.plan, fingerprint(ctx, fit, n_trainable), lr=opts.lr, weight_decay=opts.weight_decay,
        log_prefix=LOG_PREFIX, load_weights=lambda state: load_trainable(model, state, ctx.output_dir),
        model_state=lambda: trainable_state(model), resume_line="resuming at step {step}/{total}")
    return fit_and_predict(ctx, fit, training, extra={"trainable_params": float(n_trainable)})


def fingerprint(ctx: RunContext, fit: HeadFit, n_trainable: int) -> dict:
    """What a checkpoint must have been made with to be resumed here."""
    opts, (head,) = ctx.options, fit.heads
    return {
        "format": MODEL_FORMAT, "method": ctx.method, "head": [head.name, head.kind, head.labels],
        "n_train": len(fit.rows.train), "n_dev": len(fit.rows.dev), "world_size": ctx.world_size,
        "batch_size": fit.batch_size, "total_steps": fit.plan.total_steps, "seed": ctx.seed,
        "trainable_params": n_trainable,
        "lora": [opts.lora_r, opts.lora_alpha, opts.lora_dropout, opts.lora_target_modules], "pooling": opts.pooling,
    }
