"""Plain data types shared by tasks, methods, metrics and the worker; the user-facing error; a check of names.

No torch here: the CLI imports this module at queue time.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

# A task either labels a whole text ("sequence") or each whitespace token of it ("token", BIO tags).
TaskKind = Literal["sequence", "token"]

# A task's `description:` when none is given: the generic prompts then keep their plain wording ("classify it").
PLAIN_DESCRIPTION = "label"

# Why an LLM output could not be turned into a label. "ok" for every prediction that parsed.
ParseStatus = Literal[
    "ok", "empty", "not_in_label_set", "invalid_json", "wrong_length", "truncated", "missing_field"
]


class ClfbenchError(Exception):
    """A user-facing error: its message is one line that names what is wrong."""


def check_known(value: str, known: Collection[str], what: str) -> str:
    """`value` when it is one of `known`, else ValueError "unknown <what> '<value>' (known: <sorted names>)".

    For pydantic validators of names (methods, task functions): pydantic turns the ValueError into a field error,
    and the spec and task loaders turn that into their one-line messages."""
    if value not in known:
        raise ValueError(f"unknown {what} '{value}' (known: {', '.join(sorted(known))})")
    return value


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
    # Short human description of the label field (used by the generic prompts), e.g. "news category";
    # PLAIN_DESCRIPTION or "" when the task gives none.
    description: str = ""
    # What each label means (slot types for a token task), for the generic prompts; may name only some labels.
    label_descriptions: dict[str, str] = field(default_factory=dict)
    # Token tasks: the rule slot F1 and exact match are computed under ("massive", "conlleval", "strict").
    slot_metric: str | None = None


@dataclass
class Predicted:
    """What a method predicted for one test example of one task: a label (sequence) or one tag per word (token),
    and for LLMs the raw output and whether it parsed. None: no usable answer (a parse failure)."""

    value: str | list[str] | None
    raw_output: str | None = None
    parse_status: ParseStatus = "ok"
    # The probability the method gave its answer (a sequence label), where it has one: a classifier head's softmax,
    # tf-idf's logistic regression. None where there is none (generated text); calibration reads it.
    confidence: float | None = None


@dataclass
class Prediction:
    """One stored prediction row: the worker joins a method's `Predicted` with the example's gold and text.

    For token tasks `gold` and `predicted` are lists of tags; the worker stores them space-joined.
    """

    example_id: str
    text: str
    gold: str | list[str]
    predicted: str | list[str] | None
    raw_output: str | None = None
    parse_status: ParseStatus = "ok"
    confidence: float | None = None  # Predicted.confidence


@dataclass
class MethodOutput:
    """What a method returns to the worker (on rank 0; other ranks may return None).

    `predictions[task_name][example_id]` holds one `Predicted` per test example of that task (the worker checks
    that none is missing and joins the gold labels and texts). `extra_results[task_name]` holds method-specific
    numbers (throughput, times) stored as result rows.
    """

    predictions: dict[str, dict[str, Predicted]]
    extra_results: dict[str, dict[str, float]] = field(default_factory=dict)


# A worker's exit codes that mean more than success or failure; the engine names them when it ends an attempt
# (engine.daemon.describe_exit), so the run's error says why and not just a number.
EXIT_NOT_OURS = 3  # the store refused a write: the run was cancelled or re-claimed, another attempt owns it
EXIT_STORE_UNREACHABLE = 4  # the store stayed unreachable past CLFBENCH_STORE_OUTAGE_S; points kept, resumable
