"""How much GPU memory a run needs, from the model's config.json alone (no weights, no torch): `clfbench plan`.

The paper's LLM rows are 7B-70B models on one 8-GPU box. Whether a run fits is arithmetic on the model's shapes,
so it is answered before anything is launched. The plan counts the bytes of live tensors at the moment of the
peak, what `torch.cuda.max_memory_allocated` reports; bench/plan_vs_measured.py checks it against the same count
on CPU (torch's allocator events) for SmolLM2-135M and MiniLM. Per GPU:

- weights: every parameter counted from the shapes. Inference holds them in the run's dtype (bf16 on GPUs).
  Full fine-tuning keeps fp32 master weights (4 bytes), AdamW's two fp32 moments (8) and fp32 gradients (4); bf16
  autocast on GPUs adds the bf16 copy of each weight a matrix product makes, which autograd keeps for backward
  (2 bytes a parameter, freed layer by layer in backward, so counted with the activations). Under DDP with
  several processes the gradients are also copied into DDP's buckets (another 4 bytes). `strategy=fsdp` divides
  weights, gradients and moments by the GPUs; the gathered layers (bf16) and the root unit (embeddings, norm, LM
  head: kept gathered from forward to backward) come on top, with the gradients of a gathered layer; `offload`
  moves the shards to the host, leaving only the gathered parts on the GPU;
- the peak of a training step is in backward, where the activations kept for it are freed layer by layer while
  the gradients appear: it is max(activations + the output head's gradient, every gradient), not their sum (the
  head's gradient, vocab x hidden, is the first one made and lives to the end);
- activations kept for backward, per layer and token (Llama-style, counted from the operations' saved tensors):
  each RMSNorm its fp32 input and normalised value (it computes in fp32) and its output in the compute dtype;
  attention q and k after rotary, v, the attention output and its reshaped copy (3 x attention width + 2 x
  key/value width); the gated MLP gate, its activation, up and their product (4 x intermediate). With gradient
  checkpointing only each layer's input is kept, and one layer is recomputed at a time. BERT-style encoders:
  q/k/v, attention output and copy, two LayerNorms with their inputs, GELU input and output, dropout masks; and
  where attention dropout runs on CPU the math kernel keeps the attention probabilities (heads x tokens per
  token; GPU kernels fuse dropout and keep none);
- llm-finetune's logits: only the answer columns are computed (`logits_to_keep`): their fp32 log-softmax, its
  gradient and the logits in the compute dtype, per answer token and vocabulary entry. A shared prompt prefix
  (`share_prefix`) is computed once per micro-batch: its tokens count once, not once per row;
- inference: the KV cache (keys and values of every layer's key/value heads) of the whole batch, the widest
  moment of one layer's forward (the MLP's intermediates beside the residual stream), the batch's attention mask
  (a bool mask and its additive copy, rows x tokens^2) and the last position's logits;
- 1 GB per GPU for the CUDA context and the allocator's slack (not counted on CPU).

These are estimates of the dominant terms, not a simulation of the allocator: they say which runs cannot fit and
how many GPUs one needs. Prompt lengths are not known before the prompts are built (they depend on the task's
texts and shots), so a prompting plan assumes `tokens` per example (4,096 unless given); a fine-tuning plan
assumes rows of max_length tokens with no shared prefix and 64 answer tokens (the worst case: real batches share
their prompt's prefix and MASSIVE's answers are a few tokens).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clfbench.engine.types import ClfbenchError

GB = 1e9
CUDA_OVERHEAD = 1.0 * GB
CUDA_CONTEXT = "CUDA context and slack"
PROMPT_TOKENS = 4096  # assumed prompt + answer tokens per example when planning a prompting run
ANSWER_TOKENS = 64  # assumed labelled tokens per training row (answer + stop token) when planning a fine-tune
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
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


@dataclass(frozen=True)
class Workload:
    """What one process computes at once: `batch` rows of `tokens` each (prompt + answer, or prompt + new
    tokens), `shared_prefix` of them the same in every row and computed once, `answer_tokens` per row with logits
    (training), in `precision` (inference: the weights' dtype; training: the compute dtype, bf16 by autocast on
    GPUs, fp32 on CPU), on a GPU or not (no CUDA context, no fused optimizer on CPU)."""

    batch: int
    tokens: int
    answer_tokens: int = ANSWER_TOKENS
    shared_prefix: int = 0
    precision: str = "bfloat16"
    on_gpu: bool = True

    @property
    def value_bytes(self) -> int:
        return DTYPE_BYTES.get(self.precision, 4)

    @property
    def computed_tokens(self) -> int:
        """Tokens that go through the layers: a shared prefix once, then every row's own part."""
        shared = min(self.shared_prefix, self.tokens)
        return shared + self.batch * (self.tokens - shared)


def _norm_bytes(shape: Shape, value_bytes: int) -> float:
    """What a norm keeps for backward, per token: its fp32 input and normalised value (RMSNorm and LayerNorm
    compute in fp32 under autocast too) and its output in the compute dtype, read by the next matrix product."""
    return 2 * 4.0 * shape.hidden + value_bytes * shape.hidden


def _decoder_layer_bytes(shape: Shape, value_bytes: int) -> float:
    """A Llama-style layer's saved tensors per token: two RMSNorms; q and k after rotary, v, the attention output
    and its reshaped copy (what o_proj reads); the gated MLP's gate, silu(gate), up and their product."""
    attention = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    return 2 * _norm_bytes(shape, value_bytes) + value_bytes * (3 * attention + 2 * kv + 4 * shape.intermediate)


def _encoder_layer_bytes(shape: Shape, value_bytes: int, tokens: int, on_gpu: bool) -> float:
    """A BERT-style layer's saved tensors per token: its input, q, k, v, the attention output and its reshaped copy,
    the attention projection's output (to its dropout), two LayerNorms, the GELU's input and output, two dropout
    masks (1 byte a value). On CPU attention dropout runs in the math kernel, which keeps the softmax, its mask and
    the dropped probabilities (heads x tokens a token); GPU kernels fuse the dropout and keep none."""
    hidden = shape.hidden
    kept = value_bytes * (7 * hidden + 2 * shape.intermediate) + 2 * _norm_bytes(shape, value_bytes) + 2 * hidden
    if not on_gpu:
        kept += (2 * value_bytes + 1) * shape.heads * tokens
    return kept


def activation_bytes(shape: Shape, work: Workload, checkpointing: bool = False, residual_bytes: int = 4) -> float:
    """Bytes every layer of one process keeps for backward (see the module docstring). `residual_bytes`: the
    residual stream's dtype, what checkpointing keeps of each layer (fp32 from fp32 embeddings, also under
    autocast; bf16 under FSDP's bf16 parameters)."""
    if shape.decoder:
        per_layer = _decoder_layer_bytes(shape, work.value_bytes) * work.computed_tokens
    else:
        per_layer = _encoder_layer_bytes(shape, work.value_bytes, work.tokens, work.on_gpu) * work.computed_tokens
    if checkpointing:  # each layer's input, and one layer recomputed at a time
        return shape.layers * residual_bytes * shape.hidden * work.computed_tokens + per_layer
    return shape.layers * per_layer


def logits_bytes(shape: Shape, work: Workload) -> float:
    """llm-finetune's answer columns: logits in the compute dtype, their fp32 log-softmax and its fp32 gradient,
    and the logits' gradient in the compute dtype; a label head's logits are tiny."""
    if not shape.decoder:
        return 0.0
    columns = work.batch * min(work.answer_tokens, work.tokens)
    return (2 * work.value_bytes + 2 * 4.0) * columns * shape.vocab


def head_parameters(shape: Shape) -> int:
    """The output head's (or, tied, the embedding's) parameters: the first gradient backward makes."""
    return shape.vocab * shape.hidden if shape.decoder else 0


def _largest_parameter(shape: Shape) -> int:
    return max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate)


def finetune_parts(shape: Shape, gpus: int, work: Workload, strategy: str = "ddp", checkpointing: bool = False,
                   lora: bool = False, offload: bool = False) -> dict[str, float]:
    """Per-GPU bytes of one training process at its peak, in backward (see the module docstring)."""
    params = parameter_count(shape)
    autocast = work.on_gpu and work.value_bytes == 2
    residual = 2 if autocast and strategy == "fsdp" else 4
    activations = activation_bytes(shape, work, checkpointing, residual) + logits_bytes(shape, work)
    if lora:  # a frozen base in the compute dtype; the adapters and the head are small enough to leave out
        return {f"frozen weights ({work.precision})": work.value_bytes * params, "activations": activations,
                **_context(work)}
    if autocast and strategy != "fsdp":  # autocast's bf16 weight copies, kept for backward like activations
        activations += 2.0 * (params - (0 if shape.tied else head_parameters(shape)))
    if strategy == "fsdp":
        parts = _fsdp_parts(shape, gpus, params, offload)
        parts["activations and logits"] = activations
        return {**parts, **_context(work)}
    parts = {"weights and AdamW moments (fp32)": 12.0 * params}
    if gpus > 1:
        parts["DDP gradient buckets (fp32)"] = 4.0 * params
    # Backward frees each layer's activations as it makes the layer's gradients: the peak is the larger moment.
    gradients = 4.0 * params
    if not work.on_gpu:  # the unfused AdamW of CPU makes two temporaries the size of each parameter in turn
        gradients += 2 * 4.0 * _largest_parameter(shape)
    early = activations + 4.0 * head_parameters(shape)
    if early >= gradients:
        parts["activations, logits and the head's gradient"] = early
    else:
        parts["gradients (fp32)"] = gradients
    return {**parts, **_context(work)}


def _fsdp_parts(shape: Shape, gpus: int, params: int, offload: bool) -> dict[str, float]:
    """FSDP2 (full sharding, bf16 parameters for compute): the shards, and what is gathered at once."""
    root = parameter_count(shape) - shape.layers * layer_parameters(shape)
    parts = {} if offload else {"weights, gradients, AdamW (fp32, sharded)": 16.0 * params / gpus}
    # two layers gathered (the one computing and the next, prefetched) and one layer's unsharded gradients; the
    # root unit (embeddings, final norm, LM head) stays gathered from forward to backward, with its gradients
    parts["gathered layers and root (bf16)"] = (2 * 2.0 + 2.0) * layer_parameters(shape) + (2.0 + 2.0) * root
    return parts


def _context(work: Workload) -> dict[str, float]:
    return {CUDA_CONTEXT: CUDA_OVERHEAD} if work.on_gpu else {}


def inference_parts(shape: Shape, gpus: int, work: Workload) -> dict[str, float]:
    """Per-GPU bytes of prompting: weights split over the GPUs, the batch's KV cache, one layer's forward."""
    size = work.value_bytes
    kv_cache = 2 * shape.layers * shape.kv_heads * shape.head_dim * size * work.batch * work.tokens
    attention = shape.heads * shape.head_dim
    # the widest moment of a layer's forward: the residual stream and the norm's output beside the MLP's three
    # intermediates (silu(gate), up, their product) or attention's q, its rotary temporaries and output
    widest = size * (2 * shape.hidden + max(3 * shape.intermediate, 4 * attention)) * work.batch * work.tokens
    return {f"weights ({work.precision})": size * parameter_count(shape) / gpus,
            f"KV cache ({work.precision})": kv_cache / gpus,
            "activations (one layer)": widest,
            "attention mask": (1 + size) * work.batch * work.tokens ** 2,
            "last-position logits (fp32)": 4.0 * work.batch * shape.vocab,
            **_context(work)}


def read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as error:
        raise ClfbenchError(f"cannot read {path}: {error.strerror}") from None
    except ValueError:
        raise ClfbenchError(f"{path} is not valid JSON") from None


def method_parts(method: str, shape: Shape, options: dict, gpus: int, work: Workload) -> dict[str, float]:
    """Per-GPU bytes of `method` with its options for one process's workload."""
    if method in ("prompt", "llmembed"):
        return inference_parts(shape, gpus, work)
    strategy = str(options.get("strategy") or "ddp")
    return finetune_parts(shape, gpus, work, strategy, bool(options.get("gradient_checkpointing", False)),
                          lora=method in ("ls-llama", "ls-unllama"), offload=bool(options.get("offload", False)))


def method_workload(method: str, options: dict, tokens: int | None) -> tuple[Workload, str]:
    """The workload a run's options describe, on GPUs (bf16), and the assumptions in words."""
    if method == "prompt":
        batch, length = int(options.get("batch_size") or 8), tokens or PROMPT_TOKENS
        return Workload(batch, length), f"batch {batch}, {length:,} tokens per example"
    if method == "llmembed":
        batch, length = int(options.get("extract_batch_size") or 32), tokens or int(options.get("max_length") or 128)
        return Workload(batch, length), f"extraction batch {batch}, {length:,} tokens"
    batch, length = int(options.get("batch_size") or 8), tokens or int(options.get("max_length") or 512)
    precision = "bfloat16" if options.get("bf16", True) else "float32"
    how = f"micro-batch {batch} per GPU, {length:,} tokens"
    if method == "llm-finetune":
        how += f", strategy {options.get('strategy') or 'ddp'}" + (", offload" if options.get("offload") else "")
    if options.get("gradient_checkpointing"):
        how += ", gradient checkpointing"
    return Workload(batch, length, precision=precision), how


def fsdp_host_bytes(shape: Shape, offload: bool) -> float:
    """Host memory of an FSDP fine-tune at its peak, after training: rank 0 gathers the full fp32 weights onto its
    CPU to predict with (`llm_finetune.unsharded_model`) while every rank still holds its shards, which with
    `offload` are in host memory too (fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter)."""
    return (4.0 + (16.0 if offload else 0.0)) * parameter_count(shape)


def plan_run(method: str, shape: Shape, options: dict, gpus: int, gpu_memory_gb: float,
             tokens: int | None = None) -> Plan:
    work, how = method_workload(method, options, tokens)
    if method == "llm-finetune" and str(options.get("strategy") or "ddp") == "fsdp":  # not GPU memory: the host's
        offload = bool(options.get("offload"))
        how += (f"; {fsdp_host_bytes(shape, offload) / GB:,.0f} GB of host memory: "
                + ("the offloaded shards and " if offload else "") + "the fp32 weights gathered to predict")
    return Plan(what=how, gpus=gpus, gpu_memory_gb=gpu_memory_gb,
                parts=method_parts(method, shape, options, gpus, work))


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
        if not options.get("offload"):
            offloaded = {**options, "strategy": "fsdp", "offload": True}
            if plan_run(method, shape, offloaded, max(gpus, 1), gpu_memory_gb, tokens).fits:
                advice.append(f"-o strategy=fsdp -o offload=true on {max(gpus, 1)} GPUs")
    if int(options.get("batch_size") or 8) > 1 and plan_run(method, shape, {**options, "batch_size": 1}, gpus,
                                                            gpu_memory_gb, tokens).fits:
        advice.append("-o batch_size=1")
    if not advice:  # no one change is enough: the fewest changes, taken together in that order, that are
        advice = _combined_changes(method, shape, options, gpus, gpu_memory_gb, tokens)
    return " or ".join(advice) if advice else "no setting on GPUs of this size (a larger GPU, or a smaller model)"


def _combined_changes(method: str, shape: Shape, options: dict, gpus: int, gpu_memory_gb: float,
                      tokens: int | None) -> list[str]:
    changes = [("strategy", "fsdp"), ("gradient_checkpointing", True), ("offload", True), ("batch_size", 1)]
    if method != "llm-finetune":
        changes = [("batch_size", 1)]
    changed, flags = dict(options), []
    for key, value in changes:
        if changed.get(key) == value:
            continue
        changed[key] = value
        flags.append(f"-o {key}={str(value).lower()}")
        if plan_run(method, shape, changed, gpus, gpu_memory_gb, tokens).fits:
            return [" ".join(flags) + f" on {gpus} GPUs"]
    return []


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
    """The options the run will use: after its preset (llm-finetune's `preset: paper` sets 16,384 tokens)."""
    options = spec.options
    if hasattr(options, "resolved"):
        try:
            options = options.resolved(spec.task_names)
        except ValueError:  # the queue's own check reports a preset that does not know the tasks
            pass
    return options.model_dump() if hasattr(options, "model_dump") else dict(options or {})


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
