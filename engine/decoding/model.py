"""Loading a causal LM for decoding and scoring, the weight dtype `auto` stands for, and the placement of a model
too large for one GPU across the run's GPUs.

Placement (`device_map_for`): a run with several GPUs that computes in one process (prompting, LLMEmbed's
extraction) gets accelerate's device map over them: whole decoder layers (`_no_split_modules`) spread evenly
over the GPUs, each GPU given what it has free minus the memory plan's reserve for the KV cache and one
layer's activations at the run's batch (`engine.memory_plan.inference_parts`), so that the batch still fits
beside the weights. The embeddings land on the first GPU, where the inputs go; accelerate's hooks move each
layer's inputs to its GPU and the output back. With one GPU, or on CPU, the model is moved to the device whole,
as before.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from clfbench.engine.types import ClfbenchError


def load_model(model_path: str, dtype_name: str, device: torch.device, gpus: Sequence[int] = (),
               batch_size: int = 8):
    """Tokenizer and causal LM in eval mode on `device`, or with several `gpus` (the run's: `RunContext.gpus`)
    placed across them for a batch of `batch_size` prompts; `device` is then the first GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = resolve_dtype(dtype_name, device)
    model = load_placed(AutoModelForCausalLM, model_path, dtype, device, gpus, batch_size)
    model.eval()
    return tokenizer, model


def load_placed(auto_class, model_path: str, dtype: torch.dtype, device: torch.device, gpus: Sequence[int] = (),
                batch_size: int = 8, tokens: int | None = None):
    """`auto_class.from_pretrained` in `dtype`: on `device`, or across `gpus` when there are several, leaving room
    for batches of `batch_size` × `tokens` (default: the memory plan's prompt length)."""
    placement = {}
    if len(gpus) > 1:
        placement["device_map"] = gpu_device_map(auto_class, model_path, dtype, gpus, batch_size, tokens)
    try:
        model = auto_class.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa", **placement)
    except (ValueError, ImportError):  # an architecture without SDPA support
        model = auto_class.from_pretrained(model_path, dtype=dtype, **placement)
    if not placement:
        model.to(device)
    return model


def gpu_device_map(auto_class, model_path: str, dtype: torch.dtype, gpus: Sequence[int], batch_size: int,
                   tokens: int | None = None) -> dict[str, int]:
    """The device map of `model_path` over `gpus`: the model built on the meta device (no memory), each GPU's free
    memory minus the reserve for a batch of `batch_size` prompts (`inference_reserve`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    with init_empty_weights():
        empty = auto_class.from_config(config, dtype=dtype)
    reserve = inference_reserve(config.to_dict(), dtype, len(gpus), batch_size, tokens)
    free = {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in gpus}
    return device_map_for(empty, dtype, {gpu: free[gpu] - reserve for gpu in gpus}, reserve)


def inference_reserve(config: dict, dtype: torch.dtype, gpus: int, batch: int, tokens: int | None = None) -> float:
    """Bytes each GPU keeps free beside the weights: the memory plan's inference parts other than the weights (the
    GPU's share of the KV cache, one layer's forward, the attention mask, the logits, the CUDA context)."""
    from clfbench.engine import memory_plan

    work = memory_plan.Workload(batch, tokens or memory_plan.PROMPT_TOKENS,
                                precision=str(dtype).removeprefix("torch."))
    parts = memory_plan.inference_parts(memory_plan.shape_of(config), gpus, work)
    return sum(value for name, value in parts.items() if not name.startswith("weights"))


def device_map_for(model, dtype: torch.dtype, budgets: dict[int, float], reserve: float = 0.0) -> dict[str, int]:
    """accelerate's device map of `model` (built on the meta device) over GPUs with `budgets[gpu]` bytes for
    weights each: whole decoder layers, spread evenly (each GPU gets at most an equal share plus one layer, so the
    KV cache and activations that follow the layers are shared too). One clear error when the weights do not fit."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    sizes = compute_module_sizes(model, dtype=dtype)
    # the largest piece placed whole: a decoder layer, or a leaf such as the embeddings or the LM head
    units = [name for name, module in model.named_modules()
             if type(module).__name__ in no_split or not any(True for _ in module.children())]
    total, largest = sizes[""], max(sizes[name] for name in units)
    budgets = {gpu: max(int(budget), 0) for gpu, budget in budgets.items()}
    if total + len(budgets) * largest > sum(budgets.values()):
        raise ClfbenchError(
            f"the model's {total / 1e9:,.1f} GB of {str(dtype).removeprefix('torch.')} weights do not fit "
            f"{len(budgets)} GPU(s) with {min(budgets.values()) / 1e9:,.1f} GB free for weights on the smallest "
            f"(after {reserve / 1e9:,.1f} GB kept for the KV cache and activations): give the run more GPUs "
            f"(`clfbench plan` says how many) or a smaller batch_size")
    share = total // len(budgets) + largest
    device_map = infer_auto_device_map(model, max_memory={gpu: min(budget, share) for gpu, budget in budgets.items()},
                                       no_split_module_classes=no_split, dtype=dtype)
    stray = sorted({str(where) for where in device_map.values() if where not in budgets})
    if stray:  # cannot happen after the check above, unless accelerate packs differently
        raise ClfbenchError(f"the model's layers do not fit {len(budgets)} GPU(s): accelerate placed some on "
                            f"{', '.join(stray)}")
    return device_map


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the hardware multiplies it natively -- a GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (measured here: bf16 matrix products 3-4x faster than float32 on one Zen 4 core) -- else
    float32 (emulated bf16 would be slower and less exact)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _cpu_has_native_bf16() -> bool:
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)



# transformers renamed a causal LM's KV cache argument and output from `past_key_values` to `cache` in a 5.x
# release (5.24 warns that the old name goes in 5.40), and the range pyproject.toml admits may have either name:
# these two use whichever the model has.
def cache_argument(model, cache) -> dict:
    """The keyword that passes `cache` to `model`'s forward."""
    import inspect

    names = inspect.signature(type(model).forward).parameters
    return {"cache": cache} if "cache" in names else {"past_key_values": cache}


def returned_cache(out):
    """The KV cache a forward with use_cache=True returned."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
