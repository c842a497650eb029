"""Turn a generated answer into labels, recording why when it cannot be done. Torch-free.

Every function returns a `Parsed(value, status)`; `status` is "ok" or the reason for a failure
(`engine.types.ParseStatus`):

- ``empty``            nothing but whitespace (after the lenient clean-up below);
- ``not_in_label_set`` a label (or slot) that is not one of the task's, after the clean-up;
- ``invalid_json``     a multi-task answer without a JSON object that can be read;
- ``missing_field``    the JSON object lacks the task's field (``task1``/``task2``);
- ``wrong_length``     a slot list whose length is not the number of words (the tags are still returned and are
                       scored as MASSIVE's official evaluation does: cut, or padded with "O"; the status counts it);
- ``truncated``        generation stopped at ``max_new_tokens`` without the stop token and what came out does
                       not parse (an answer that parses in spite of the cut is accepted).

What is accepted, exactly (and nothing looser: no substring or fuzzy matching):

Label (one sequence task). The first non-empty line of the answer; then leading/trailing whitespace removed; a
leading answer word with a colon (``Label:``, ``Output:``, ``Slots:``, case-insensitive) removed; one pair of
matching surrounding quotes or backticks (``'x'``, ``"x"``, `` `x` ``) removed; one trailing ``.`` removed. The
rest must equal a label, ignoring case (an exact-case match wins if two labels differ only in case).

Slots (one token task). The first ``[...]`` list in the answer, read as JSON or as a Python literal (so
``['Other', 'time']`` works), else the first non-empty line split on commas and/or whitespace. Each element is
cleaned like a label, then must be ``Other`` or ``O`` (outside), a slot type, or ``B-``/``I-`` + a slot type
(all ignoring case). Types become BIO tags (a run of one type is one span).

JSON (a multi-task answer). The first ``{`` starts the object, read as JSON, else as a Python literal (single
quotes); field names ignore case. Each field's value is read like a label (a string) or like slots (a list, or a
string holding one); each task gets its own status.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Sequence

from clfbench.engine.prompting.outputs import OTHER, OUTSIDE, OutputSpec, bio_from_types
from clfbench.engine.types import ParseStatus

ANSWER_WORDS = ("label", "labels", "output", "slots", "answer")
_ANSWER_PREFIX = re.compile(r"^(?:%s)\s*:\s*" % "|".join(ANSWER_WORDS), re.IGNORECASE)
_QUOTES = ("'", '"', "`")
MAX_LITERAL_CHARS = 20_000  # ast.literal_eval on huge inputs is slow; an answer is never that long


@dataclass(frozen=True)
class Parsed:
    value: str | list[str] | None
    status: ParseStatus = "ok"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _first_line(text: str) -> tuple[str, bool]:
    """(first non-empty line, whether a line break follows it, i.e. the line is complete)."""
    stripped = text.lstrip()
    line, sep, _ = stripped.partition("\n")
    return line, bool(sep)


def clean(item: str) -> str:
    """The lenient clean-up of one label (see the module docstring)."""
    item = item.strip()
    item = _ANSWER_PREFIX.sub("", item, count=1).strip()
    if len(item) >= 2 and item[0] == item[-1] and item[0] in _QUOTES:
        item = item[1:-1].strip()
    if item.endswith("."):
        item = item[:-1].rstrip()
    return item


def _match(item: str, labels: Sequence[str]) -> str | None:
    if item in labels:
        return item
    lowered = item.lower()
    for label in labels:
        if label.lower() == lowered:
            return label
    return None


def parse_label(raw: str | None, labels: Sequence[str], truncated: bool = False) -> Parsed:
    """One label of a sequence task from a generated answer."""
    if raw is None or not raw.strip():
        return Parsed(None, "truncated" if truncated and raw else "empty")
    line, complete = _first_line(raw)
    item = clean(line)
    if not item:
        return Parsed(None, "empty")
    label = _match(item, labels)
    if label is not None:
        return Parsed(label, "ok")
    return Parsed(None, "truncated" if truncated and not complete else "not_in_label_set")


def _read_literal(text: str, start: int, close: str):
    """A JSON value starting at `start`, else a Python literal up to the last `close` bracket; None if neither."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
        return value
    except ValueError:
        pass
    end = text.rfind(close)
    while end > start:
        chunk = text[start : end + 1]
        if len(chunk) > MAX_LITERAL_CHARS:
            return None
        try:
            return ast.literal_eval(chunk)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            end = text.rfind(close, start, end)
    return None


def _slot_items(raw: str) -> tuple[list | None, bool]:
    """(the slot elements found, whether the answer was a readable list)."""
    start = raw.find("[")
    if start >= 0:
        value = _read_literal(raw, start, "]")
        if isinstance(value, list):
            return value, True
        return None, False
    line, _ = _first_line(raw)
    line = _ANSWER_PREFIX.sub("", line.strip(), count=1)
    return [part for part in re.split(r"[,\s]+", line) if part], True


def _slot_tag(item, types: Sequence[str]) -> str | None:
    """One element -> a slot type, "Other", or a BIO tag; None when it is not one."""
    if not isinstance(item, str):
        return None
    item = clean(item)
    if item.lower() in (OTHER.lower(), OUTSIDE.lower()):
        return OTHER
    if len(item) > 2 and item[:2].upper() in ("B-", "I-"):
        slot = _match(item[2:], types)
        return None if slot is None else item[:2].upper() + slot
    return _match(item, types)


def slots_from_items(items: list, types: Sequence[str], n_words: int) -> Parsed:
    tags = []
    for item in items:
        tag = _slot_tag(item, types)
        if tag is None:
            return Parsed(None, "not_in_label_set")
        tags.append(tag)
    bio = bio_from_types(tags)
    return Parsed(bio, "ok" if len(bio) == n_words else "wrong_length")


def parse_slots(raw: str | None, types: Sequence[str], n_words: int, truncated: bool = False) -> Parsed:
    """BIO tags for the words of one example from a generated slot list."""
    if raw is None or not raw.strip():
        return Parsed(None, "truncated" if truncated and raw else "empty")
    items, readable = _slot_items(raw)
    if not readable or items is None:
        return Parsed(None, "truncated" if truncated else "not_in_label_set")
    if not items and n_words:
        return Parsed([], "truncated" if truncated else "wrong_length")
    parsed = slots_from_items(items, types, n_words)
    if truncated and parsed.status != "ok" and raw.find("]", raw.find("[")) < 0:
        return Parsed(None, "truncated")
    return parsed


def parse_json_answer(raw: str | None, spec: OutputSpec, n_words: int | None = None,
                      truncated: bool = False) -> dict[str, Parsed]:
    """Per task of a multi-task spec: its value from a JSON answer ``{"task1": ..., "task2": ...}``."""
    def all_fail(status: ParseStatus) -> dict[str, Parsed]:
        return {f.task: Parsed(None, status) for f in spec.fields}

    if raw is None or not raw.strip():
        return all_fail("truncated" if truncated and raw else "empty")
    start = raw.find("{")
    obj = _read_literal(raw, start, "}") if start >= 0 else None
    if not isinstance(obj, dict):
        return all_fail("truncated" if truncated else "invalid_json")
    keys = {str(k).lower(): v for k, v in obj.items()}
    out: dict[str, Parsed] = {}
    for f in spec.fields:
        name = (f.json_field or "").lower()
        if name not in keys:
            out[f.task] = Parsed(None, "missing_field")
            continue
        value = keys[name]
        if f.kind == "token":
            choices = [c for c in f.choices if c != OTHER]
            if isinstance(value, list):
                out[f.task] = slots_from_items(value, choices, n_words or 0)
            elif isinstance(value, str):
                out[f.task] = parse_slots(value, choices, n_words or 0)
            else:
                out[f.task] = Parsed(None, "not_in_label_set")
        else:
            if isinstance(value, str):
                parsed = parse_label(value, f.choices)
                out[f.task] = parsed
            else:
                out[f.task] = Parsed(None, "not_in_label_set")
    return out


def parse_answer(raw: str | None, spec: OutputSpec, n_words: int | None = None,
                 truncated: bool = False) -> dict[str, Parsed]:
    """Dispatch on the spec: {task name: Parsed} for every task of the run."""
    if spec.multi:
        return parse_json_answer(raw, spec, n_words, truncated)
    f = spec.fields[0]
    if f.kind == "token":
        types = [c for c in f.choices if c != OTHER]
        return {f.task: parse_slots(raw, types, n_words or 0, truncated)}
    return {f.task: parse_label(raw, f.choices, truncated)}
