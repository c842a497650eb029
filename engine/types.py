"""Plain data types shared by tasks, methods, metrics and the worker.

No torch here: the CLI imports this module at queue time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

# A task either labels a whole text ("sequence") or each whitespace token of it ("token", BIO tags).
TaskKind = Literal["sequence", "token"]

# Why an LLM output could not be turned into a label. "ok" for every prediction that parsed.
ParseStatus = Literal[
    "ok", "empty", "not_in_label_set", "invalid_json", "wrong_length", "truncated", "missing_field"
]


class ClfbenchError(Exception):
    """A user-facing error: its message is one line that names what is wrong."""


@dataclass(frozen=True)
class Example:
    """One labelled example. For sequence tasks `label` is set; for token tasks `tokens` and `tags`."""

    id: str
    text: str
    label: str | None = None
    tokens: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None


@dataclass
class TaskData:
    """A task with its examples loaded, ready for a method.

    `labels` is the ordered label set: class names for sequence tasks, BIO tag names (with "O" first)
    for token tasks. Every gold label/tag of every split is in it (the loader checks).
    """

    name: str
    kind: TaskKind
    labels: list[str]
    train: list[Example]
    test: list[Example]
    dev: list[Example] = field(default_factory=list)
    # Short human description of the label field (used by prompts), e.g. "news category".
    description: str = ""


@dataclass
class Prediction:
    """What a method predicted for one test example of one task.

    For token tasks `gold` and `predicted` are lists of tags; the worker stores them space-joined.
    """

    example_id: str
    text: str
    gold: str | list[str]
    predicted: str | list[str] | None
    raw_output: str | None = None
    parse_status: ParseStatus = "ok"


@dataclass
class MethodOutput:
    """What a method returns to the worker (on rank 0; other ranks may return None).

    `predictions[task_name]` holds one Prediction per test example of that task.
    `extra_results[task_name]` holds method-specific numbers (throughput, times) stored as result rows.
    """

    predictions: dict[str, list[Prediction]]
    extra_results: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class RunContext:
    """Everything a method needs to run, built by the worker. Methods are plain `run(ctx) -> MethodOutput`.

    `log_metric` and `set_progress` are safe to call on every rank: only rank 0 writes to the store,
    in batches.
    """

    run_id: int
    attempt: int
    spec: "object"  # engine.spec.RunSpec (kept loose here to avoid an import cycle)
    options: "object"  # the method's validated options model (engine.methods.catalog)
    tasks: list[TaskData]
    model_path: str  # a local folder, or a hub id on machines with internet
    output_dir: Path  # per-run folder for checkpoints and caches; survives retries
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cuda:N" or "cpu"
    log_metric: Callable[[int, str, float], None]
    set_progress: Callable[[int, int], None]

    @property
    def is_main(self) -> bool:
        return self.rank == 0
