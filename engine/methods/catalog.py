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
    """Fine-tune an encoder with a classification head (AutoModelForSequenceClassification)."""

    epochs: float = Field(3.0, gt=0, description="passes over the training set")
    batch_size: int = Field(32, ge=1, description="examples per optimizer step, per process")
    lr: float = Field(5e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="fraction of steps with linear warm-up")
    max_length: int = Field(128, ge=8, description="tokens kept per text (longer texts are cut)")
    eval_every: int = Field(200, ge=0, description="optimizer steps between evaluations on dev (0: only at the end)")
    checkpoint_every: int = Field(500, ge=0, description="optimizer steps between checkpoints (0: none)")
    log_every: int = Field(10, ge=1, description="optimizer steps between train-loss points")
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples (after a seeded shuffle)")
    test_limit: int | None = Field(None, ge=1, description="evaluate only the first N test examples (a fixed subset)")
    dev_fraction: float = Field(0.05, ge=0, lt=0.5, description="share of train held out for eval when the task has no dev split")
    bf16: bool = Field(True, description="bf16 autocast on GPUs that support it (ignored on CPU)")


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
        summary="Encoder (BERT/RoBERTa-style) fine-tuning with a linear sequence-classification head",
        paper="seed 002 (Zhao et al.), section 5.4",
        module="engine.methods.encoder_finetune",
        options=EncoderFinetuneOptions,
        task_kinds=("sequence",),
        max_tasks=1,
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
