"""The catalog of methods: names, descriptions, options with defaults, how each is launched.

This is the single source for `clfbench methods`, spec validation at queue time, the TUI's new-run form
and the docs. It imports no torch: the method implementations live in their own modules
(`module` below) and only the worker imports them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MethodOptions(BaseModel):
    """Base for every method's options: frozen, and an unknown key is an error that names it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
    epochs: float = Field(3.0, gt=0, description="passes over the training set")
    batch_size: int = Field(32, ge=1, description="examples per optimizer step, per process")
    lr: float = Field(5e-5, gt=0, description="peak learning rate")
    optimizer: Literal["adamw", "adam"] = Field(
        "adamw", description="adamw: decoupled weight decay; adam: plain Adam (weight_decay as L2, if any)")
    weight_decay: float = Field(0.01, ge=0, description="weight decay (not on biases and norms)")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="fraction of steps with linear warm-up (then linear decay)")
    max_length: int = Field(128, ge=8, description="tokens kept per text (longer texts are cut; cut words are tagged O)")
    eval_every: int = Field(200, ge=0, description="optimizer steps between evaluations on dev (0: only at the end)")
    checkpoint_every: int = Field(500, ge=0, description="optimizer steps between checkpoints (0: none)")
    log_every: int = Field(10, ge=1, description="optimizer steps between train-loss points")
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples (after a seeded shuffle)")
    test_limit: int | None = Field(None, ge=1, description="evaluate only the first N test examples (a fixed subset)")
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
    chat_format: Literal["template", "raw"] = Field(
        "template", description="the tokenizer's chat template, or the paper's [INST] ... [/INST] text as is")
    max_new_tokens: int | None = Field(
        None, ge=1, description="generate: token limit per answer (empty: 48 for a label, 16 per word + 64 for "
                                "slots or JSON)")
    batch_size: int = Field(8, ge=1, description="examples decoded or scored together")
    test_limit: int | None = Field(None, ge=1, description="evaluate only the first N test examples (a fixed subset)")
    train_limit: int | None = Field(None, ge=1, description="draw few-shot examples from the first N training "
                                                            "examples only (after a seeded shuffle)")
    prompt_set: str = Field("paper", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                            description="folder of prompts/ with prompts.yaml (the paper's: 'paper')")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model weights; auto: bfloat16 on a GPU that supports it, else float32")
    reuse_prefix: bool = Field(
        True, description="compute the prompt text shared by all examples (instruction, labels, shots) once and "
                          "reuse its KV cache")
    max_text_chars: int | None = Field(None, ge=1, description="cut each document (and few-shot example) to N characters")

    def check_task_kinds(self, kinds: list[str]) -> None:
        """Queue-time check with the run's task kinds: scoring is defined for sequence tasks only."""
        if self.decision == "score" and "token" in kinds:
            raise ValueError("decision=score is not defined for token (slot) tasks: there is no closed list of "
                             "answers to score; use decision=constrained or generate")


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


METHODS: dict[str, MethodInfo] = {
    "encoder-finetune": MethodInfo(
        name="encoder-finetune",
        summary="Encoder (BERT/RoBERTa-style) fine-tuning: a linear head per task (sequence or BIO token), "
                "one task or two trained jointly on a shared encoder",
        paper="seed 002 (Zhao et al.), section 5.4",
        module="engine.methods.encoder_finetune",
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
        module="engine.methods.prompt",
        options=PromptOptions,
        task_kinds=("sequence", "token"),
        max_tasks=2,
        launch="torchrun",
    ),
}


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
            }
        )
    return fields
