"""Prompt sets (`prompts/<set>/prompts.yaml` + template files) and building one run's prompts. Torch-free.

`load_prompt_set("paper")` reads and checks every template of a set once (placeholders, files, label lists);
`PromptSet.select(tasks, shots)` finds the prompt for a run's task(s); `PromptBuilder` renders it for each test
example: the label lists, the few-shot examples (drawn once per run from train with the run's seed, so every
example of a run sees the same shots and the text before the document is shared), and the document itself.

An entry with `description:` (the generic fallbacks) also writes what its task says about itself: `{{Subject}}`
is the entry's `plain` wording ("it") unless the task gives a `description:` other than the default "label",
then its `described` wording with `{{Description}}` filled in ("its sentiment"); `{{Label_Meanings}}` is empty
unless the task gives `label_descriptions:`, then a line break, "The labels mean:" and one "- label: meaning"
line per described label, in label-set order. A task that gives neither gets the text the entry had before.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

import yaml

from clfbench.engine.prompting.outputs import OutputSpec, output_spec, slot_types, target_text
from clfbench.engine.prompting.parse import Parsed
from clfbench.engine.prompting.render import Template, TemplateError, parse_template
from clfbench.engine.types import PLAIN_DESCRIPTION, ClfbenchError, Example, Predicted, TaskData
from clfbench.prompts import PROMPTS_DIR

ShotKey = Literal["zero", "five"]
LabelStyle = Literal["python", "json"]
EXAMPLES_VAR = "Examples"
TARGET_VAR = "Target"
SUBJECT_VAR = "Subject"  # what is classified: "it", or "its <description>" (entries with `description:`)
MEANINGS_VAR = "Label_Meanings"  # "" or the "- label: meaning" lines (entries with `description:`)
DESCRIPTION_VAR = "Description"  # inside `description.described`: the task's description
EXAMPLE_SEPARATOR = "\n\n"


def shot_key(shots: int) -> ShotKey:
    """shots: 0 uses the zero-shot prompt, any other number the five-shot one (with that many examples)."""
    if shots < 0:
        raise ClfbenchError(f"shots must be >= 0, got {shots}")
    return "zero" if shots == 0 else "five"


def label_list(labels: Sequence[str], style: LabelStyle) -> str:
    """A label list as the paper writes it: a Python list (``['a', 'b']``) or a JSON list (``["a", "b"]``)."""
    if style == "json":
        return json.dumps(list(labels), ensure_ascii=False)
    return repr([str(label) for label in labels])


@dataclass(frozen=True)
class LabelVar:
    task: str  # a task name, or "*" (the run's single task) in fallbacks
    style: LabelStyle


@dataclass(frozen=True)
class DescriptionVar:
    """How an entry writes its task's `description:` ({{Subject}}) and label meanings ({{Label_Meanings}})."""

    task: str  # a task name, or "*" in fallbacks
    plain: str  # {{Subject}} when the task gives no description
    described: Template  # {{Subject}} when it does, with {{Description}}


@dataclass(frozen=True)
class PromptDef:
    """One prompt of a set: a template file for a task (or task pair) and a shot setting."""

    set_name: str
    version: int
    tasks: tuple[str, ...]  # the task names it is for ("*" in fallbacks); field order for multi-task
    kind: str | None  # fallbacks: the task kind they serve
    shots: ShotKey
    path: Path
    listing: int | None
    adapted_from: int | None
    text_var: str
    label_vars: dict[str, LabelVar]
    fields: dict[str, str]  # multi-task: JSON field -> task
    template: Template
    example: Template | None
    description: DescriptionVar | None = None

    @property
    def key(self) -> str:
        return "+".join(self.tasks)

    def describe(self) -> str:
        origin = f"listing {self.listing}" if self.listing else (
            f"adapted from listing {self.adapted_from}" if self.adapted_from else "not from the paper")
        return f"{self.set_name} v{self.version} {self.path.name} ({origin})"

    def resolved(self, task: str) -> "PromptDef":
        """A fallback with "*" replaced by the run's task name."""
        if self.tasks != ("*",):
            return self
        label_vars = {k: LabelVar(task if v.task == "*" else v.task, v.style) for k, v in self.label_vars.items()}
        description = self.description
        if description is not None and description.task == "*":
            description = dataclasses.replace(description, task=task)
        return dataclasses.replace(self, tasks=(task,), label_vars=label_vars, description=description)


_ENTRY_KEYS = {"task", "kind", "shots", "file", "listing", "adapted_from", "text", "labels", "fields", "example",
               "description"}


def _entry(raw: dict, folder: Path, set_name: str, version: int, where: str) -> PromptDef:
    """One entry of `prompts.yaml`, checked: every problem is a one-line error that says where it is."""
    if not isinstance(raw, dict):
        raise ClfbenchError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - _ENTRY_KEYS
    if unknown:
        raise ClfbenchError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    shots = raw.get("shots")
    if shots not in ("zero", "five"):
        raise ClfbenchError(f"{where}: shots must be 'zero' or 'five', got {shots!r}")
    path = folder / str(raw.get("file", ""))
    if not raw.get("file") or not path.is_file():
        raise ClfbenchError(f"{where}: template file not found: {path}")
    text_var = raw.get("text")
    if not isinstance(text_var, str):
        raise ClfbenchError(f"{where}: 'text' must name the document's placeholder")
    label_vars = _label_vars(raw, where)
    fields = {str(k): str(v) for k, v in (raw.get("fields") or {}).items()}
    tasks = _entry_tasks(raw, fields, where)
    description = _description_var(raw, where)
    described_vars = {SUBJECT_VAR, MEANINGS_VAR} if description is not None else set()
    template = _template(path, text_var, {*label_vars, *described_vars}, shots, where)
    example = _example_template(raw, text_var, where) if shots == "five" else None
    return PromptDef(set_name=set_name, version=version, tasks=tasks, kind=raw.get("kind"), shots=shots, path=path,
                     listing=raw.get("listing"), adapted_from=raw.get("adapted_from"), text_var=text_var,
                     label_vars=label_vars, fields=fields, template=template, example=example,
                     description=description)


def _description_var(raw: dict, where: str) -> DescriptionVar | None:
    """The entry's `description: {task, plain, described}`, or None."""
    spec = raw.get("description")
    if spec is None:
        return None
    if not isinstance(spec, dict) or not spec.get("task") or not isinstance(spec.get("plain"), str) \
            or not isinstance(spec.get("described"), str):
        raise ClfbenchError(f"{where}: description needs task:, plain: (the wording without a task description) "
                            f"and described: (the wording with {{{{{DESCRIPTION_VAR}}}}})")
    described = parse_template(spec["described"], allowed={DESCRIPTION_VAR}, where=f"{where}: description.described")
    return DescriptionVar(str(spec["task"]), spec["plain"], described)


def _label_vars(raw: dict, where: str) -> dict[str, LabelVar]:
    label_vars = {}
    for name, spec in (raw.get("labels") or {}).items():
        if not isinstance(spec, dict) or spec.get("style") not in ("python", "json") or not spec.get("task"):
            raise ClfbenchError(f"{where}: labels.{name} needs task: and style: python|json")
        label_vars[name] = LabelVar(str(spec["task"]), spec["style"])
    return label_vars


def _entry_tasks(raw: dict, fields: dict[str, str], where: str) -> tuple[str, ...]:
    """The tasks an entry is for: ("*",) for a fallback (it has `kind:`), else its `task:` split at "+"; a
    multi-task prompt's in the order of its JSON fields."""
    if "kind" in raw:
        return ("*",)
    tasks = tuple(part.strip() for part in str(raw.get("task", "")).split("+") if part.strip())
    if not tasks:
        raise ClfbenchError(f"{where}: needs task: (or kind: for a fallback)")
    if len(tasks) > 1:
        if set(fields.values()) != set(tasks) or len(fields) != len(tasks):
            raise ClfbenchError(f"{where}: fields must map one JSON field to each of {', '.join(tasks)}")
        tasks = tuple(fields.values())  # field order
    return tasks


def _template(path: Path, text_var: str, value_vars: set[str], shots: str, where: str) -> Template:
    """The template file: it may use only the document, its label lists (and description placeholders) and
    (five-shot) the examples, must use each of them, and the document exactly once."""
    needed = {text_var, *value_vars} | ({EXAMPLES_VAR} if shots == "five" else set())
    template = parse_template(path.read_text(encoding="utf-8"), allowed=needed, where=str(path))
    missing = needed - set(template.names)
    if missing:
        raise ClfbenchError(f"{where}: {path.name} never uses {', '.join('{{' + m + '}}' for m in sorted(missing))}")
    if sum(1 for kind, name in template.pieces if kind == "var" and name == text_var) != 1:
        raise ClfbenchError(f"{where}: {{{{{text_var}}}}} must appear exactly once in {path.name}")
    return template


def _example_template(raw: dict, text_var: str, where: str) -> Template:
    """How a five-shot prompt writes one example: the document and its target."""
    if not isinstance(raw.get("example"), str):
        raise ClfbenchError(f"{where}: a five-shot prompt needs example: (how one example is written)")
    return parse_template(raw["example"], allowed={text_var, TARGET_VAR}, where=f"{where} example")


@dataclass(frozen=True)
class PromptSet:
    name: str
    version: int
    folder: Path
    prompts: tuple[PromptDef, ...]
    fallbacks: tuple[PromptDef, ...] = ()

    def select(self, tasks: Sequence[TaskData], shots: int) -> PromptDef:
        """The prompt for these tasks (any order for a multi-task run) and shot count."""
        key = shot_key(shots)
        names = {t.name for t in tasks}
        for prompt in self.prompts:
            if set(prompt.tasks) == names and prompt.shots == key:
                return prompt
        if len(tasks) == 1:
            for prompt in self.fallbacks:
                if prompt.kind == tasks[0].kind and prompt.shots == key:
                    return prompt.resolved(tasks[0].name)
        known = sorted({p.key for p in self.prompts})
        raise ClfbenchError(f"prompt set '{self.name}' has no {key}-shot prompt for {'+'.join(t.name for t in tasks)}"
                            f" (it has: {', '.join(known)}; single tasks of other names use its fallbacks)")


@lru_cache(maxsize=8)
def load_prompt_set(name: str = "paper", root: str | None = None) -> PromptSet:
    """Read and check `prompts/<name>/prompts.yaml` and every template it names."""
    folder = Path(root) if root else PROMPTS_DIR / name
    path = folder / "prompts.yaml"
    if not path.is_file():
        raise ClfbenchError(f"unknown prompt set '{name}': {path} not found")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list):
        raise ClfbenchError(f"{path}: expected 'prompts:' with a list of entries")
    version = int(data.get("version", 0))
    prompts = tuple(_entry(e, folder, name, version, f"{path} prompts[{i}]") for i, e in enumerate(data["prompts"]))
    fallbacks = tuple(_entry(e, folder, name, version, f"{path} fallbacks[{i}]")
                      for i, e in enumerate(data.get("fallbacks") or []))
    seen = set()
    for p in prompts:
        key = (frozenset(p.tasks), p.shots)
        if key in seen:
            raise ClfbenchError(f"{path}: two {p.shots}-shot prompts for {p.key}")
        seen.add(key)
    return PromptSet(name=name, version=version, folder=folder, prompts=prompts, fallbacks=fallbacks)


# ---------------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Item:
    """One test example across the run's tasks (a multi-task run pairs the tasks' examples by id)."""

    id: str
    text: str
    by_task: dict[str, Example]
    n_words: int | None  # whitespace words, when a token task is in the run


def paired_items(tasks: Sequence[TaskData], split: str) -> list[Item]:
    """The examples of `split` of every task paired by id, in the first task's order (a test example missing from
    another task is an error; a training example missing from one is left out)."""
    first = tasks[0]
    others = [{ex.id: ex for ex in getattr(t, split)} for t in tasks[1:]]
    token_task = next((t.name for t in tasks if t.kind == "token"), None)
    items = []
    for ex in getattr(first, split):
        by_task = {first.name: ex}
        for task, index in zip(tasks[1:], others):
            if ex.id not in index:
                if split == "test":
                    raise ClfbenchError(f"multi-task prompting needs the same test examples in every task: "
                                        f"{ex.id!r} of {first.name} is not in {task.name}")
                break
            by_task[task.name] = index[ex.id]
        if len(by_task) != len(tasks):
            continue
        n_words = None
        if token_task is not None:
            tokens = by_task[token_task].tokens
            n_words = len(tokens) if tokens is not None else len(ex.text.split())
        items.append(Item(id=ex.id, text=ex.text, by_task=by_task, n_words=n_words))
    return items


def neutralise(text: str, forbidden: Sequence[str]) -> str:
    """Break every occurrence of a special-token string (e.g. ``<|im_end|>``) in a document with a zero-width
    space after its first character, so text from the data can never become a control token of the model."""
    for token in forbidden:
        if token and token in text:
            text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


@dataclass
class PromptBuilder:
    """Renders one run's prompt for each test example. Construct with `PromptBuilder.create`."""

    prompt: PromptDef
    tasks: list[TaskData]
    spec: OutputSpec
    shots: list[Item]
    base_values: dict[str, str]
    items: list[Item]
    max_text_chars: int | None = None
    forbidden: tuple[str, ...] = ()
    neutralised: int = field(default=0)

    @classmethod
    def create(cls, prompt: PromptDef, tasks: Sequence[TaskData], shots: int, seed: int,
               max_text_chars: int | None = None, forbidden: Sequence[str] = ()) -> "PromptBuilder":
        by_name = {t.name: t for t in tasks}
        ordered = [by_name[name] for name in prompt.tasks]  # field order for multi-task prompts
        spec = output_spec(ordered, prompt.fields or None)
        builder = cls(prompt=prompt, tasks=ordered, spec=spec, shots=[], base_values={},
                      items=paired_items(ordered, "test"), max_text_chars=max_text_chars, forbidden=tuple(forbidden))
        values = {}
        for var, label_var in prompt.label_vars.items():
            task = by_name.get(label_var.task)
            if task is None:
                raise ClfbenchError(f"{prompt.describe()}: {{{{{var}}}}} lists the labels of {label_var.task}, "
                                    f"which is not a task of this run")
            labels = slot_types(task.labels) if task.kind == "token" else task.labels
            values[var] = label_list(labels, label_var.style)
        if prompt.description is not None:
            values.update(description_values(prompt.description, by_name, prompt))
        if prompt.shots == "five":
            builder.shots = draw_shots(paired_items(ordered, "train"), shots, seed)
            if len(builder.shots) < shots:
                raise ClfbenchError(f"{shots}-shot prompting needs {shots} training examples; "
                                    f"{'+'.join(prompt.tasks)} has {len(builder.shots)}")
            values[EXAMPLES_VAR] = EXAMPLE_SEPARATOR.join(builder.example_text(item) for item in builder.shots)
        builder.base_values = values
        return builder

    def document(self, text: str) -> str:
        if self.max_text_chars is not None:
            text = text[: self.max_text_chars]
        clean = neutralise(text, self.forbidden)
        if clean != text:
            self.neutralised += 1
        return clean

    def example_text(self, item: Item) -> str:
        assert self.prompt.example is not None
        return self.prompt.example.render({self.prompt.text_var: self.document(item.text),
                                           TARGET_VAR: target_text(self.spec, item.by_task)})

    def render(self, text: str) -> str:
        """The prompt (the `[INST] ... [/INST]` text) for one document."""
        return self.prompt.template.render({**self.base_values, self.prompt.text_var: self.document(text)})

    def shared_prefix(self) -> str:
        """The prompt text before the document: the same for every example of the run."""
        before, _ = self.prompt.template.split_at(self.prompt.text_var, self.base_values)
        return before

    def target(self, item: Item) -> str:
        return target_text(self.spec, item.by_task)

    def predicted(self, answers: Sequence[tuple[str | None, dict[str, Parsed]]]) -> dict[str, dict[str, Predicted]]:
        """Per task, each test item's answer (raw output, parsed per task) keyed by the task's example id: what a
        method returns. A consolidated prompt's one raw output is every task's raw output."""
        out: dict[str, dict[str, Predicted]] = {t.name: {} for t in self.tasks}
        for item, (raw, parsed) in zip(self.items, answers):
            for task in self.tasks:
                result = parsed[task.name]
                out[task.name][item.by_task[task.name].id] = Predicted(
                    value=result.value, raw_output=raw, parse_status=result.status)
        return out


def description_values(spec: DescriptionVar, by_name: dict[str, TaskData], prompt: PromptDef) -> dict[str, str]:
    """{{Subject}} and {{Label_Meanings}} for the task `spec` names (see the module docstring)."""
    task = by_name.get(spec.task)
    if task is None:
        raise ClfbenchError(f"{prompt.describe()}: description: names {spec.task}, which is not a task of this run")
    described = task.description not in ("", PLAIN_DESCRIPTION)
    subject = spec.described.render({DESCRIPTION_VAR: task.description}) if described else spec.plain
    labels = slot_types(task.labels) if task.kind == "token" else task.labels
    meanings = [f"- {label}: {' '.join(task.label_descriptions[label].split())}"  # one line each
                for label in labels if label in task.label_descriptions]
    return {SUBJECT_VAR: subject, MEANINGS_VAR: "\nThe labels mean:\n" + "\n".join(meanings) if meanings else ""}


def draw_shots(pool: list[Item], shots: int, seed: int) -> list[Item]:
    """`shots` training examples drawn with `seed` (deterministic for a given train list; not label-balanced)."""
    if shots <= 0 or not pool:
        return []
    rng = random.Random(f"clfbench-shots:{seed}")
    return [pool[i] for i in sorted(rng.sample(range(len(pool)), min(shots, len(pool))))]


__all__ = ["Item", "PromptBuilder", "paired_items", "PromptDef", "PromptSet", "TemplateError", "draw_shots",
           "label_list", "load_prompt_set", "neutralise", "shot_key"]
