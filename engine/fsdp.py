"""FullyShardedDataParallel through accelerate: the other way to build an `engine.training.Training`, for a model
whose weights + gradients + Adam state do not fit one GPU (`llm-finetune`'s `strategy=fsdp`; CUDA only).

Each decoder layer's parameters, gradients and Adam state are sharded over the GPUs. Checkpoints are accelerate's
`save_state` (the full state dict gathered on rank 0, the scheduler registered with it) plus a meta.json with the
step and the fingerprint, swapped in atomically like every checkpoint (`training.replace_directory`); a run
resumes from one only when its fingerprint matches and every rank found the same step. Mixed precision is
accelerate's (bf16 where supported), with fp32 master weights.

accelerate is imported only here and only when a run asks for FSDP.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from clfbench.engine.context import RunContext
from clfbench.engine.training import (CHECKPOINT_DIR, MAX_GRAD_NORM, StepPlan, Training, announce_resume,
                                      make_scheduler, ranks_agree, replace_directory)
from clfbench.engine.types import ClfbenchError


def _accelerator(model: nn.Module, bf16: bool, log_prefix: str):
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    layers = list(getattr(model, "_no_split_modules", None) or [])
    if not layers:
        raise ClfbenchError(f"{log_prefix} strategy=fsdp needs the model's decoder layer class "
                            f"({type(model).__name__} names none in _no_split_modules); use strategy=ddp")
    plugin = FullyShardedDataParallelPlugin(
        auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=layers,
        state_dict_type="FULL_STATE_DICT", use_orig_params=True,
        activation_checkpointing=False)  # HF gradient checkpointing already recomputes the layers
    bf16 = bf16 and torch.cuda.is_bf16_supported()
    return Accelerator(fsdp_plugin=plugin, mixed_precision="bf16" if bf16 else "no")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases and norms by name, read before sharding: the sharded flat parameters keep the names only."""
    return {name for name, p in model.named_parameters() if p.ndim < 2 or "norm" in name.lower()}


def _optimizer(wrapped: nn.Module, no_decay_names: set[str], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW without weight decay on `no_decay_names` (the wrapped module holds the model as its attribute
    `model`, hence the prefix)."""
    decay, no_decay = [], []
    for name, param in wrapped.named_parameters():
        clean = name.replace("_fsdp_wrapped_module.", "").removeprefix("model.")
        (no_decay if clean in no_decay_names else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def _resume(ctx: RunContext, accelerator, fingerprint: dict, log_prefix: str) -> int:
    """The step of this run's checkpoint, its state loaded (collective), or 0."""
    folder = Path(ctx.output_dir) / CHECKPOINT_DIR
    meta = folder / "meta.json"
    try:
        saved = json.loads(meta.read_text()) if meta.is_file() else None
    except (OSError, ValueError):
        saved = None
    if saved and saved.get("fingerprint") != fingerprint:
        if ctx.is_main:
            print(f"{log_prefix} ignoring checkpoint {folder}: made for another setup", flush=True)
        saved = None
    if not ranks_agree(int(saved["step"]) if saved else None, ctx) or not saved:
        return 0
    accelerator.load_state(str(folder))
    return int(saved["step"])


def _save(ctx: RunContext, accelerator, step: int, fingerprint: dict) -> None:
    """accelerate's state (collective) into a temp folder, then meta.json and the atomic swap on rank 0."""
    output_dir = Path(ctx.output_dir)
    tmp = output_dir / f".{CHECKPOINT_DIR}.tmp"
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # collective
    if ctx.is_main:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint,
                                                   "saved_at": time.time()}, indent=2) + "\n")
        replace_directory(tmp, output_dir / CHECKPOINT_DIR)
    accelerator.wait_for_everyone()


def fsdp_training(ctx: RunContext, module: nn.Module, model: nn.Module, plan: StepPlan, fingerprint: dict, *,
                  lr: float, weight_decay: float, bf16: bool, log_prefix: str) -> Training:
    """A `Training` of `module` (which holds `model`, a transformers model, as `module.model`) sharded with FSDP,
    resumed from this run's checkpoint when there is one for this setup. Its `full_state()` gathers the full
    weights on rank 0 (collective; keys as in `module.state_dict()`)."""
    accelerator = _accelerator(model, bf16, log_prefix)
    no_decay_names = _no_decay_names(model)
    wrapped = accelerator.prepare(module)
    optimizer = accelerator.prepare(_optimizer(wrapped, no_decay_names, lr, weight_decay))
    scheduler = make_scheduler(optimizer.optimizer, plan.warmup_steps, plan.total_steps)
    accelerator.register_for_checkpointing(scheduler)
    start_step = _resume(ctx, accelerator, fingerprint, log_prefix)
    if start_step:
        announce_resume(ctx, log_prefix, start_step, plan)
    return Training(
        wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, start_step=start_step,
        clip=lambda: accelerator.clip_grad_norm_(wrapped.parameters(), MAX_GRAD_NORM),
        save=lambda step: _save(ctx, accelerator, step, fingerprint), backward=accelerator.backward,
        full_state=lambda: accelerator.get_state_dict(wrapped))
