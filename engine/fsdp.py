"""PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`): the other way to build an `engine.training.Training`,
for a model whose weights + gradients + Adam state do not fit one device (`llm-finetune`'s `strategy=fsdp`).

- Sharding: every decoder layer (the classes the model names in `_no_split_modules`) is its own FSDP unit, then the
  root module (embeddings, final norm, LM head: one unit, so tied embeddings stay one parameter). Each rank holds
  1/world_size of every parameter, its gradient and its Adam state; a layer's full weights exist only while it
  computes (all-gathered before, freed after: `reshard_after_forward`).
- Devices: NCCL on GPUs, gloo on CPU (FSDP2 runs there too, which is how the test suite checks it against DDP).
- Mixed precision on GPUs that compute bf16: parameters are all-gathered in bf16 for the forward and backward,
  gradients are reduced in fp32 onto fp32 master shards (`MixedPrecisionPolicy`); on CPU everything stays fp32.
- `offload`: the sharded parameters, gradients and Adam state live in (pinned) CPU memory and the optimizer steps
  there (`CPUOffloadPolicy`): what a 70B full fine-tune needs on 8 x 80 GB.
- Gradient accumulation: gradients are reduce-scattered on a step's last micro-batch only
  (`set_requires_gradient_sync`, the FSDP2 counterpart of DDP's `no_sync`).
- Checkpoints are sharded: every rank writes its own shards with `torch.distributed.checkpoint` (no rank ever holds
  the full state, which for 70B would not fit), rank 0 adds the step, the schedule, every rank's RNG and the
  fingerprint; the folder is swapped in atomically like every checkpoint (`training.replace_directory`). A run
  resumes only from a checkpoint of the same setup that every rank found at the same step.
- `full_state()` gathers the full weights onto rank 0's CPU (collective) for prediction, which
  `llm_finetune.unsharded_model` places across the run's GPUs once every rank has freed its shards.

A single process (`--nproc 1`) gets a one-rank process group of its own, so the same code runs (nothing is
sharded then, but offload and the checkpoint format stay those of FSDP).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from clfbench.engine.artifacts import fetch_checkpoint, mirror_checkpoint
from clfbench.engine.context import RunContext
from clfbench.engine.training import (CHECKPOINT_DIR, MAX_GRAD_NORM, StepPlan, Training, announce_resume,
                                      make_optimizer, make_scheduler, ranks_agree, replace_directory,
                                      rng_state, set_rng_state)
from clfbench.engine.types import ClfbenchError

EXTRA_FILE = "clfbench.pt"  # rank 0's part of a checkpoint: step, schedule, RNG of every rank, fingerprint


def _ensure_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group even for one rank: a private one-rank group when the worker started none."""
    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)


def _layer_modules(model: nn.Module, log_prefix: str) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ClfbenchError(f"{log_prefix} strategy=fsdp needs the model's decoder layer class "
                            f"({type(model).__name__} names none in _no_split_modules); use strategy=ddp")
    return layers


def shard(module: nn.Module, model: nn.Module, device: torch.device, *, bf16: bool, offload: bool,
          log_prefix: str) -> nn.Module:
    """`module` (which holds `model`) sharded in place over every rank: one FSDP unit per decoder layer, the rest
    in the root's unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    on_gpu_bf16 = device.type == "cuda" and bf16 and torch.cuda.is_bf16_supported()
    precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if on_gpu_bf16
                 else MixedPrecisionPolicy())
    placement = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for layer in _layer_modules(model, log_prefix):
        fully_shard(layer, mesh=mesh, mp_policy=precision, offload_policy=placement)
    fully_shard(module, mesh=mesh, mp_policy=precision, offload_policy=placement)
    return module


def _state_options(full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def _resume(ctx: RunContext, module: nn.Module, optimizer, scheduler, fingerprint: dict, log_prefix: str) -> int:
    """The step of this run's checkpoint with its state loaded (collective), or 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    output_dir = Path(ctx.output_dir)
    fetch_checkpoint(output_dir, log_prefix if ctx.is_main else "")  # from CLFBENCH_ARTIFACTS' URL, if it has one
    # `.checkpoint.old` is the whole previous checkpoint when a save died between its two renames.
    folder = next((f for f in (output_dir / CHECKPOINT_DIR, output_dir / f".{CHECKPOINT_DIR}.old")
                   if (f / EXTRA_FILE).is_file()), output_dir / CHECKPOINT_DIR)
    try:
        extra = torch.load(folder / EXTRA_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError):
        extra = None
    if extra is not None and extra.get("fingerprint") != fingerprint:
        if ctx.is_main:
            print(f"{log_prefix} ignoring checkpoint {folder}: made for another setup", flush=True)
        extra = None
    if not ranks_agree(int(extra["step"]) if extra else None, ctx) or not extra:
        return 0
    model_state, optim_state = get_state_dict(module, optimizer, options=_state_options())
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(folder))  # each rank reads its own shards, in place
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_state_options())
    scheduler.load_state_dict(extra["scheduler"])
    rngs = extra["rng"]
    set_rng_state(rngs[ctx.rank] if ctx.rank < len(rngs) else rngs[0])
    return int(extra["step"])


def _save(ctx: RunContext, module: nn.Module, optimizer, scheduler, step: int, fingerprint: dict) -> None:
    """Every rank's shards into a temp folder (collective), then rank 0's part and the atomic swap."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    output_dir = Path(ctx.output_dir)
    tmp = output_dir / f".{CHECKPOINT_DIR}.tmp"
    if ctx.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(module, optimizer, options=_state_options())
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    if ctx.is_main:
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rngs, "fingerprint": fingerprint},
                   tmp / EXTRA_FILE)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint,
                                                   "saved_at": time.time(), "sharded": True}, indent=2) + "\n")
        replace_directory(tmp, output_dir / CHECKPOINT_DIR)
        # One node's ranks share this folder; on several nodes each would hold its own shards (see docs).
        mirror_checkpoint(output_dir / CHECKPOINT_DIR, step, "checkpoint:")
    dist.barrier()


def _full_state(module: nn.Module) -> dict:
    """The full weights on rank 0's CPU, keys as in `module.state_dict()` (collective; other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_state_options(full=True))


def fsdp_training(ctx: RunContext, module: nn.Module, model: nn.Module, plan: StepPlan, fingerprint: dict, *,
                  lr: float, weight_decay: float, bf16: bool, offload: bool, log_prefix: str) -> Training:
    """A `Training` of `module` (which holds `model`, a transformers model) sharded with FSDP2, resumed from this
    run's checkpoint when there is one for this setup. Its `full_state()` gathers the full weights on rank 0."""
    device = torch.device(ctx.device)
    _ensure_process_group(device)
    shard(module, model, device, bf16=bf16, offload=offload, log_prefix=log_prefix)
    # FSDP2 keeps parameter names, so the usual no-decay groups apply; with offload the step runs on the CPU.
    optimizer = make_optimizer(model, lr, weight_decay, torch.device("cpu") if offload else device)
    scheduler = make_scheduler(optimizer, plan.warmup_steps, plan.total_steps)
    start_step = _resume(ctx, module, optimizer, scheduler, fingerprint, log_prefix)
    if start_step:
        announce_resume(ctx, log_prefix, start_step, plan)
    trainable = [p for p in module.parameters() if p.requires_grad]
    return Training(
        wrapped=module, optimizer=optimizer, scheduler=scheduler, start_step=start_step,
        clip=lambda: torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM),  # DTensor gradients: a global norm
        save=lambda step: _save(ctx, module, optimizer, scheduler, step, fingerprint),
        full_state=lambda: _full_state(module))
