"""Loading a causal LM for decoding and scoring, and the weight dtype `auto` stands for."""
from __future__ import annotations

import torch


def load_model(model_path: str, dtype_name: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = resolve_dtype(dtype_name, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
    except (ValueError, ImportError):  # an architecture without SDPA support
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.to(device)
    model.eval()
    return tokenizer, model


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
