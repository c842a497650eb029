"""How much GPU memory a run needs, from the model's config.json alone (no weights, no torch): `clfbench plan`.

The paper's LLM rows are 7B–70B models on one 8-GPU box. Whether a run fits is arithmetic on the model's shapes,
so it is answered before anything is launched. Per GPU, in bytes:

- weights: every parameter counted from the shapes (embeddings, attention with its key/value heads, the MLP,
  norms, an untied output head), 2 bytes each in bf16 for inference and the frozen base of LoRA runs;
- full fine-tuning (AdamW with fp32 master weights and bf16 autocast): 16 bytes per parameter (weights 4,
  gradients 4, the two moments 8), on every GPU under DDP and divided by the GPUs under FSDP (full sharding),
  which also holds two gathered layers in bf16 at a time;
- activations kept for backward: per layer and token about 8·hidden + 4·intermediate bf16 values (norm inputs,
  q/k/v, attention output, the gated MLP's four tensors; flash attention keeps no tokens² scores), only the layer
  inputs (hidden) when gradient checkpointing recomputes the rest, plus the output logits (bf16 logits, their
  fp32 copy for the loss and its gradient: 10 bytes per token and vocabulary entry);
- inference: the KV cache (keys and values of every layer's key/value heads, bf16) of the whole batch, the
  widest moment of one layer's forward (the gated MLP's three intermediates beside two residual-width tensors)
  and the last position's logits;
- 1 GB per GPU for the CUDA context and the allocator's slack.

These are estimates of the dominant terms, not a simulation of the allocator: they say which runs cannot fit and
how many GPUs one needs. Prompt lengths are not known before the prompts are built (they depend on the task's
texts and shots), so a prompting plan assumes `tokens` per example (4,096 unless given).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clfbench.engine.types import ClfbenchError

GB = 1e9
CUDA_OVERHEAD = 1.0 * GB
PROMPT_TOKENS = 4096  # assumed prompt + answer tokens per example when planning a prompting run
CONFIGS = Path(__file__).resolve().parent / "model_defs" / "configs"


@dataclass(frozen=True)
class Shape:
    """The shapes of a transformer that decide its memory."""

    decoder: bool
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    positions: int  # learned position embeddings (BERT-style encoders); 0 with rotary positions
    type_vocab: int = 0


def shape_of(config: dict) -> Shape:
    """A Shape from a Hugging Face config.json (Llama/Mistral/Qwen2-style decoders, BERT-style encoders)."""
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        decoder = any("CausalLM" in a for a in config.get("architectures") or []) or bool(config.get("is_decoder"))
        return Shape(decoder=decoder, layers=int(config["num_hidden_layers"]), hidden=hidden,
                     intermediate=int(config["intermediate_size"]), heads=heads,
                     kv_heads=int(config.get("num_key_value_heads") or heads),
                     head_dim=int(config.get("head_dim") or hidden // heads), vocab=int(config["vocab_size"]),
                     tied=bool(config.get("tie_word_embeddings", not decoder)),
                     positions=0 if decoder else int(config.get("max_position_embeddings", 0)),
                     type_vocab=0 if decoder else int(config.get("type_vocab_size", 0)))
    except (KeyError, TypeError, ValueError) as error:
        raise ClfbenchError(f"config.json lacks a shape the plan needs: {error}") from None


def layer_parameters(shape: Shape) -> int:
    """One transformer layer: attention (q and o full width, k and v per key/value head), the MLP, the norms."""
    attention_width = shape.heads * shape.head_dim
    kv_width = shape.kv_heads * shape.head_dim
    if shape.decoder:  # Llama-style: no biases, a gated MLP (gate, up, down), two RMSNorms
        return (2 * shape.hidden * attention_width + 2 * shape.hidden * kv_width
                + 3 * shape.hidden * shape.intermediate + 2 * shape.hidden)
    # BERT-style: biases everywhere, a two-matrix MLP, two LayerNorms (weight and bias)
    return (4 * (shape.hidden * shape.hidden + shape.hidden) + 2 * shape.hidden * shape.intermediate
            + shape.intermediate + shape.hidden + 4 * shape.hidden)


def parameter_count(shape: Shape) -> int:
    embeddings = (shape.vocab + shape.positions + shape.type_vocab) * shape.hidden
    if shape.decoder:
        head = 0 if shape.tied else shape.vocab * shape.hidden
        return embeddings + shape.layers * layer_parameters(shape) + shape.hidden + head
    pooler = shape.hidden * shape.hidden + shape.hidden
    return embeddings + 2 * shape.hidden + shape.layers * layer_parameters(shape) + pooler


@dataclass
class Plan:
    what: str  # the run in words
    gpus: int
    gpu_memory_gb: float
    parts: dict[str, float]  # bytes per GPU by part

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory_gb * GB


def _activation_bytes_per_token(shape: Shape) -> float:
    """bf16 values a layer keeps per token for backward (see the module docstring)."""
    return 2.0 * (8 * shape.hidden + 4 * shape.intermediate)


def finetune_parts(shape: Shape, gpus: int, batch: int, tokens: int, strategy: str = "ddp",
                   checkpointing: bool = False, lora: bool = False) -> dict[str, float]:
    """Per-GPU bytes of one training process: weights and optimizer state, activations, logits."""
    params = parameter_count(shape)
    tokens_in_flight = batch * tokens
    if lora:  # a frozen bf16 base; the adapters and the head are small enough to leave out
        parts = {"frozen weights (bf16)": 2.0 * params}
    elif strategy == "fsdp":
        parts = {"weights, gradients, AdamW (fp32, sharded)": 16.0 * params / gpus,
                 "two gathered layers (bf16)": 2 * 2.0 * layer_parameters(shape)}
    else:
        parts = {"weights, gradients, AdamW (fp32)": 16.0 * params}
    per_layer = _activation_bytes_per_token(shape) * tokens_in_flight
    if checkpointing:
        parts["activations (checkpointed)"] = shape.layers * 2.0 * shape.hidden * tokens_in_flight + per_layer
    else:
        parts["activations"] = shape.layers * per_layer
    if shape.decoder and not lora:  # the LM head's logits over every position (a label head's are tiny)
        parts["logits and their gradient"] = 10.0 * tokens_in_flight * shape.vocab
    parts["CUDA context and slack"] = CUDA_OVERHEAD
    return parts


def inference_parts(shape: Shape, gpus: int, batch: int, tokens: int) -> dict[str, float]:
    """Per-GPU bytes of prompting: bf16 weights split over the GPUs, the batch's KV cache, one layer's work."""
    kv_cache = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2.0 * batch * tokens
    return {"weights (bf16)": 2.0 * parameter_count(shape) / gpus,
            "KV cache (bf16)": kv_cache / gpus,
            # the widest moment of a layer's forward: the gated MLP's three intermediates beside the residual stream
            "activations (one layer)": 2.0 * (2 * shape.hidden + 3 * shape.intermediate) * batch * tokens,
            "last-position logits (fp32)": 4.0 * batch * shape.vocab,
            "CUDA context and slack": CUDA_OVERHEAD}


def read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise ClfbenchError(f"cannot read {path}: {error.strerror}") from None
    except ValueError:
        raise ClfbenchError(f"{path} is not valid JSON") from None


def method_plan(method: str, shape: Shape, options: dict, gpus: int, tokens: int | None) -> tuple[dict, str]:
    """(per-GPU parts, what was assumed) for a method and its options."""
    batch = int(options.get("batch_size") or 8)
    if method in ("prompt",):
        length = tokens or PROMPT_TOKENS
        return inference_parts(shape, gpus, batch, length), f"batch {batch}, {length:,} tokens per example"
    if method == "llmembed":
        batch, length = int(options.get("extract_batch_size") or 32), int(options.get("max_length") or 128)
        return inference_parts(shape, gpus, batch, tokens or length), f"extraction batch {batch}, " \
                                                                      f"{tokens or length:,} tokens"
    length = tokens or int(options.get("max_length") or 512)
    strategy = str(options.get("strategy") or "ddp")
    checkpointing = bool(options.get("gradient_checkpointing", False))
    lora = method in ("ls-llama", "ls-unllama")
    parts = finetune_parts(shape, gpus, batch, length, strategy, checkpointing, lora)
    how = f"micro-batch {batch} per GPU, {length:,} tokens" + ("" if lora else f", strategy {strategy}") + \
        (", gradient checkpointing" if checkpointing else "")
    return parts, how


def plan_run(method: str, shape: Shape, options: dict, gpus: int, gpu_memory_gb: float,
             tokens: int | None = None) -> Plan:
    parts, how = method_plan(method, shape, options, gpus, tokens)
    return Plan(what=how, gpus=gpus, gpu_memory_gb=gpu_memory_gb, parts=parts)


def fewest_gpus(method: str, shape: Shape, options: dict, gpu_memory_gb: float, tokens: int | None = None,
                most: int = 64) -> int | None:
    """The fewest GPUs (up to `most`) on which the run fits as specified; None when none do."""
    for gpus in range(1, most + 1):
        if plan_run(method, shape, options, gpus, gpu_memory_gb, tokens).fits:
            return gpus
    return None


def what_would_fit(method: str, shape: Shape, options: dict, gpus: int, gpu_memory_gb: float,
                   tokens: int | None = None) -> str:
    """The changes that would make a run fit, in the order a user would try them."""
    advice = []
    enough = fewest_gpus(method, shape, options, gpu_memory_gb, tokens)
    if enough is not None and enough > gpus:
        advice.append(f"{enough} GPUs of {gpu_memory_gb:g} GB")
    if method == "llm-finetune":
        if options.get("strategy", "ddp") != "fsdp":
            sharded = fewest_gpus(method, shape, {**options, "strategy": "fsdp"}, gpu_memory_gb, tokens)
            if sharded is not None and sharded <= max(gpus, 8):
                advice.append(f"-o strategy=fsdp on {sharded} GPUs")
        if not options.get("gradient_checkpointing") and plan_run(
                method, shape, {**options, "gradient_checkpointing": True}, gpus, gpu_memory_gb, tokens).fits:
            advice.append("-o gradient_checkpointing=true")
    if int(options.get("batch_size") or 8) > 1 and plan_run(method, shape, {**options, "batch_size": 1}, gpus,
                                                            gpu_memory_gb, tokens).fits:
        advice.append("-o batch_size=1")
    return " or ".join(advice) if advice else "no setting on GPUs of this size (a larger GPU, or a smaller model)"


def gb(value: float) -> str:
    return f"{value / GB:,.1f} GB"


def plan_lines(plan: Plan) -> list[str]:
    width = max(len(name) for name in plan.parts)
    lines = [f"per GPU, on {plan.gpus} × {plan.gpu_memory_gb:g} GB ({plan.what}):"]
    lines += [f"  {name:<{width}}  {gb(value):>12}" for name, value in plan.parts.items()]
    verdict = "fits" if plan.fits else f"does not fit in {plan.gpu_memory_gb:g} GB"
    lines.append(f"  {'total':<{width}}  {gb(plan.total):>12}  {verdict}")
    return lines


def shipped_config(name: str) -> Path | None:
    """The config.json shipped for an alias without local weights (its public shapes), if any."""
    path = CONFIGS / f"{name}.json"
    return path if path.is_file() else None




def model_config(model: str) -> Path:
    """The config.json that sizes `model`: the shapes shipped for its alias, else its local folder's."""
    from clfbench.engine.models import find_alias

    alias = find_alias(model)
    shipped = shipped_config(alias.name) if alias is not None else None
    if shipped is not None:
        return shipped
    folder = Path(model).expanduser()
    if (folder / "config.json").is_file():
        return folder / "config.json"
    shipped_names = ", ".join(sorted(path.stem for path in CONFIGS.glob("*.json")))
    raise ClfbenchError(f"no config.json at hand for '{model}' to plan from: give a local model folder "
                        f"(or an alias with shipped shapes: {shipped_names})")


def local_gpu_memory_gb() -> float | None:
    """The smallest GPU's memory on this host (nvidia-smi; no torch at queue time), None without one."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        sizes = [float(line) / 1024 for line in out.split() if line.strip()]  # MiB
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(sizes) if sizes else None


DEFAULT_GPU_GB = 80.0  # an A100/H100 80GB, the paper's GPU, where no GPU is at hand to ask


def spec_options(spec) -> dict:
    return spec.options.model_dump() if hasattr(spec.options, "model_dump") else dict(spec.options or {})


def plan_spec(spec, gpu_memory_gb: float, tokens: int | None = None) -> tuple[Plan, Shape]:
    """A queued spec's plan on its GPUs (1 when it names none) of `gpu_memory_gb` each."""
    shape = shape_of(read_config(model_config(spec.model)))
    options = spec_options(spec)
    return plan_run(spec.method, shape, options, spec.gpus or 1, gpu_memory_gb, tokens), shape


def refusal(spec, plan: Plan, shape: Shape, tokens: int | None = None) -> str:
    """The one line that says a run cannot fit, and what would."""
    options = spec_options(spec)
    fix = what_would_fit(spec.method, shape, options, plan.gpus, plan.gpu_memory_gb, tokens)
    return (f"{spec.method} with {spec.model} needs {gb(plan.total)} per GPU on {plan.gpus} × "
            f"{plan.gpu_memory_gb:g} GB ({plan.what}); it would fit with {fix}")
