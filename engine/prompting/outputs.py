"""What a prompted model must produce, as text and as a grammar. Torch-free.

One `OutputSpec` per run says what comes after `[/INST]`:

- one sequence task: the label, e.g. ``alarm_set``;
- one token task: a JSON list with one slot type per whitespace word, ``"Other"`` for a word outside every slot,
  e.g. ``["Other", "Other", "time", "time"]`` (MASSIVE's own format; BIO tags are rebuilt from runs of the same
  type, as MASSIVE's official evaluation does);
- a consolidated multi-task prompt: a JSON object with the paper's field names, e.g.
  ``{"task1": "alarm_set", "task2": ["Other", "time"]}``.

`target_text` writes the canonical answer of an example (few-shot examples, and the training target of
generative fine-tuning later); `constraint_parts` describes the same text as fixed pieces and choices, which
constrained decoding turns into token prefix trees. Both produce exactly the same strings, so a constrained
output always parses.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence, Union

from clfbench.engine.types import ClfbenchError, Example, TaskData

OTHER = "Other"  # MASSIVE's (and the paper's) name for a word outside every slot
OUTSIDE = "O"


def slot_types(bio_labels: Sequence[str]) -> list[str]:
    """The slot types of a BIO label set, in label-set order: ["O", "B-date", "I-date", ...] -> ["date", ...]."""
    types: list[str] = []
    for label in bio_labels:
        if label.startswith(("B-", "I-")) and label[2:] not in types:
            types.append(label[2:])
    return types


def types_from_bio(tags: Sequence[str]) -> list[str]:
    """BIO tags -> one slot type per word ("Other" for "O"). Two adjacent spans of one type become one run."""
    return [OTHER if tag in (OUTSIDE, OTHER) else tag[2:] if tag.startswith(("B-", "I-")) else tag for tag in tags]


def bio_from_types(types: Sequence[str]) -> list[str]:
    """One slot type per word -> BIO: a run of the same type is one span (B- then I-); "Other" -> "O".

    Elements already written as B-x / I-x are kept as they are.
    """
    tags: list[str] = []
    previous: str | None = None
    for item in types:
        if item in (OTHER, OUTSIDE):
            tags.append(OUTSIDE)
            previous = None
        elif item.startswith(("B-", "I-")):
            tags.append(item)
            previous = item[2:]
        else:
            tags.append(("I-" if previous == item else "B-") + item)
            previous = item
    return tags


@dataclass(frozen=True)
class FieldSpec:
    """One task's part of the answer. `choices` are the labels (sequence) or the slot types plus "Other" (token)."""

    task: str
    kind: str  # "sequence" | "token"
    choices: tuple[str, ...]
    json_field: str | None = None  # "task1"/"task2" in a multi-task answer, None for a single task


@dataclass(frozen=True)
class OutputSpec:
    fields: tuple[FieldSpec, ...]

    @property
    def multi(self) -> bool:
        return len(self.fields) > 1

    @property
    def has_token_task(self) -> bool:
        return any(f.kind == "token" for f in self.fields)

    def field_for(self, task: str) -> FieldSpec:
        return next(f for f in self.fields if f.task == task)


def output_spec(tasks: Sequence[TaskData], json_fields: dict[str, str] | None = None) -> OutputSpec:
    """The answer format for these tasks; `json_fields` (field name -> task) for a multi-task prompt."""
    by_name = {t.name: t for t in tasks}
    if len(tasks) == 1 and not json_fields:
        order: list[tuple[str | None, str]] = [(None, tasks[0].name)]
    else:
        if not json_fields or set(json_fields.values()) != set(by_name):
            raise ClfbenchError(f"multi-task prompt: fields {json_fields} do not name the tasks {sorted(by_name)}")
        order = list(json_fields.items())
    fields = []
    for json_field, name in order:
        task = by_name[name]
        if task.kind == "token":
            choices = tuple(slot_types(task.labels)) + (OTHER,)
        else:
            choices = tuple(task.labels)
        fields.append(FieldSpec(task=name, kind=task.kind, choices=choices, json_field=json_field))
    return OutputSpec(fields=tuple(fields))


def answer_token_limit(spec: OutputSpec, n_words: int | None) -> int:
    """How many tokens an answer may take when the run sets no limit: 48 for a label; for slots or a multi-task
    JSON object, 64 plus 16 per word of the document. The `prompt` and `openai` methods both use it."""
    return 64 + 16 * (n_words or 0) if spec.has_token_task or spec.multi else 48


def _json_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def target_text(spec: OutputSpec, by_task: dict[str, Example]) -> str:
    """The canonical answer for one example (all tasks of the spec)."""

    def value(f: FieldSpec) -> str:
        example = by_task[f.task]
        if f.kind == "token":
            return "[" + ", ".join(_json_str(t) for t in types_from_bio(example.tags or ())) + "]"
        return example.label if f.json_field is None else _json_str(example.label)

    if not spec.multi:
        return value(spec.fields[0])
    return "{" + ", ".join(f"{_json_str(f.json_field)}: {value(f)}" for f in spec.fields) + "}"


# ------------------------------------------------------------------------------------------- the grammar


@dataclass(frozen=True)
class Fixed:
    text: str


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]
    task: str = ""  # which task this choice answers (the parser does not need it; tests and traces do)


Part = Union[Fixed, Choice]


def constraint_parts(spec: OutputSpec, n_words: int | None = None) -> list[Part]:
    """The answer as fixed text and choices; the concatenation of one option per choice is a canonical answer.

    `n_words` (the example's whitespace word count) is needed when the spec has a token task.
    """
    parts: list[Part] = []

    def value(f: FieldSpec) -> None:
        if f.kind == "token":
            if n_words is None:
                raise ClfbenchError("constrained decoding of slots needs the word count of the example")
            quoted = tuple(_json_str(c)[1:-1] for c in f.choices)
            if n_words == 0:
                parts.append(Fixed("[]"))
                return
            parts.append(Fixed('["'))
            for i in range(n_words):
                if i:
                    parts.append(Fixed('", "'))
                parts.append(Choice(quoted, f.task))
            parts.append(Fixed('"]'))
        elif f.json_field is None:
            parts.append(Choice(tuple(f.choices), f.task))
        else:
            parts.append(Fixed('"'))
            parts.append(Choice(tuple(_json_str(c)[1:-1] for c in f.choices), f.task))
            parts.append(Fixed('"'))

    if not spec.multi:
        value(spec.fields[0])
    else:
        parts.append(Fixed("{"))
        for i, f in enumerate(spec.fields):
            parts.append(Fixed((", " if i else "") + _json_str(f.json_field) + ": "))
            value(f)
        parts.append(Fixed("}"))
    merged: list[Part] = []
    for part in parts:
        if isinstance(part, Fixed) and merged and isinstance(merged[-1], Fixed):
            merged[-1] = Fixed(merged[-1].text + part.text)
        elif not (isinstance(part, Fixed) and part.text == ""):
            merged.append(part)
    return merged


@dataclass(frozen=True)
class Group:
    """A step of constrained decoding or scoring: pick one of `options`.

    Each option is one choice's option followed by the fixed text up to the next choice (the first group also
    starts with the fixed text before the first choice). The fixed text after an option ends it (a closing quote,
    or the stop token the decoder adds after the last group), so no option is a prefix of another one: "time"
    and "time_zone" become 'time", "' and 'time_zone", "'.
    """

    options: tuple[str, ...]
    task: str = ""


def groups(parts: Sequence[Part]) -> list[Group]:
    """`constraint_parts` as groups (see `Group`); a spec with no choice at all is one group of one option."""
    out: list[Group] = []
    lead = ""
    for part in parts:
        if isinstance(part, Fixed):
            if out:
                out[-1] = Group(tuple(option + part.text for option in out[-1].options), out[-1].task)
            else:
                lead += part.text
        else:
            out.append(Group(tuple(lead + option for option in part.options), part.task))
            lead = ""
    if not out:
        out.append(Group((lead,)))
    return out
