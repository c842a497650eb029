"""Rows -> examples, and the label set: every row checked (columns, ids, empty labels, BIO tags), and every gold
label of every split inside the task's label set. Each example keeps where it came from, so an error names the
file and line of the row at fault."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from clfbench.engine.tasks.definitions import TaskDef, bio_labels, one_line_error
from clfbench.engine.tasks.functions import LABEL_TRANSFORMS
from clfbench.engine.tasks.rows import Table
from clfbench.engine.types import Example


@dataclass
class Gold:
    """One example plus where it came from (for error messages about its labels)."""

    example: Example
    at: str


def _need_column(table: Table, col: str, role: str) -> None:
    if col not in table.columns:
        raise one_line_error(f"unknown column '{col}' ({role}) in {table.where} "
                             f"(columns: {', '.join(table.columns) or 'none'})")


def _scalar(value: Any, col: str, table: Table, i: int) -> str:
    if value is None:
        raise one_line_error(f"missing value for column '{col}' at {table.at(i)}")
    if isinstance(value, (list, dict, tuple)):
        raise one_line_error(f"column '{col}' at {table.at(i)} holds a {type(value).__name__}, expected text")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise one_line_error(f"{table.where} {table.unit} {table.lines[i]}: "
                                 f"column '{col}' is not valid UTF-8") from None
    return value if isinstance(value, str) else str(value)


def _sequence(value: Any, col: str, table: Table, i: int) -> list[str]:
    if value is None:
        raise one_line_error(f"missing value for column '{col}' at {table.at(i)}")
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [_scalar(v, col, table, i) for v in value]
    raise one_line_error(f"column '{col}' at {table.at(i)} holds a {type(value).__name__}, "
                         "expected a list or a string")


def _check_columns(task: TaskDef, table: Table) -> None:
    """The columns the task reads are in the table (a token task may read the text, the tokens, or both)."""
    if task.kind == "sequence":
        _need_column(table, task.text_column, "text_column")
        _need_column(table, task.label_column, "label_column")
        return
    if task.text_column:
        _need_column(table, task.text_column, "text_column")
    if task.tokens_column:
        _need_column(table, task.tokens_column, "tokens_column")
    _need_column(table, task.tags_column, "tags_column")


def _sequence_example(task: TaskDef, ex_id: str, row: dict, table: Table, i: int,
                      transform: Callable[[str], str] | None) -> Example:
    text = _scalar(row.get(task.text_column), task.text_column, table, i)
    label = _scalar(row.get(task.label_column), task.label_column, table, i).strip()
    if not label:
        raise one_line_error(f"empty label in column '{task.label_column}' at {table.at(i)}")
    if transform is not None:
        label = transform(label)
    return Example(id=ex_id, text=text, label=label)


def _check_bio(tags: list[str], table: Table, i: int) -> None:
    for t in tags:
        if not (t == "O" or (t[:2] in ("B-", "I-") and len(t) > 2)):
            raise one_line_error(f"tag '{t}' at {table.at(i)} is not a BIO tag (O, B-type, I-type)")


def _token_example(task: TaskDef, ex_id: str, row: dict, table: Table, i: int) -> Example:
    """Tokens from their column, else the text split on white space; the text, else the tokens joined."""
    text = _scalar(row.get(task.text_column), task.text_column, table, i) if task.text_column else None
    if task.tokens_column:
        tokens = _sequence(row.get(task.tokens_column), task.tokens_column, table, i)
    else:
        tokens = text.split()
    tags = _sequence(row.get(task.tags_column), task.tags_column, table, i)
    if len(tokens) != len(tags):
        raise one_line_error(f"tokens/tags length mismatch at {table.at(i)}: {len(tokens)} tokens, {len(tags)} tags")
    if text is None:
        text = " ".join(tokens)
    elif task.tokens_column and text.split() != tokens:
        raise one_line_error(f"tokens do not match the whitespace split of the text at {table.at(i)} "
                             f"(set text_column: null to use the tokens joined by spaces)")
    _check_bio(tags, table, i)
    return Example(id=ex_id, text=text, tokens=tuple(tokens), tags=tuple(tags))


def examples_of(task: TaskDef, split: str, tables: list[Table], start: int = 0) -> list[Gold]:
    """The split's examples in file order. Ids come from an ``id`` column, else ``<split>-<n>`` (counted over
    the split's tables from ``start``); an id used twice is an error that names both rows."""
    out: list[Gold] = []
    seen: dict[str, str] = {}
    transform = LABEL_TRANSFORMS[task.label_transform] if task.label_transform else None
    n = start
    for table in tables:
        if not table.rows:
            continue
        _check_columns(task, table)
        has_id = "id" in table.columns
        for i, row in enumerate(table.rows):
            n += 1
            ex_id = _scalar(row.get("id"), "id", table, i) if has_id else f"{split}-{n}"
            if ex_id in seen:
                raise one_line_error(f"duplicate id '{ex_id}' at {table.at(i)} (also at {seen[ex_id]})")
            seen[ex_id] = table.at(i)
            if task.kind == "sequence":
                ex = _sequence_example(task, ex_id, row, table, i, transform)
            else:
                ex = _token_example(task, ex_id, row, table, i)
            out.append(Gold(ex, table.at(i)))
    return out


def _golds(ex: Example) -> list[str]:
    return [ex.label] if ex.label is not None else list(ex.tags or ())


def _check_declared(task: TaskDef, splits: dict[str, list[Gold]]) -> None:
    allowed = set(task.labels or ())
    what = "label" if task.kind == "sequence" else "tag"
    for golds in splits.values():
        for g in golds:
            for lab in _golds(g.example):
                if lab not in allowed:
                    raise one_line_error(f"{what} '{lab}' at {g.at} is not in the declared labels of task {task.name}")


def _sequence_labels(splits: dict[str, list[Gold]], train_where: str) -> list[str]:
    """The sorted labels of train; a dev or test label that train never has is an error."""
    labels = sorted({g.example.label for g in splits.get("train") or []})
    known = set(labels)
    for split in ("dev", "test"):
        for g in splits.get(split, []):
            if g.example.label not in known:
                raise one_line_error(f"{split} label '{g.example.label}' at {g.at} never occurs in train "
                                     f"({train_where}); declare labels: in the task to allow it")
    return labels


def _token_labels(splits: dict[str, list[Gold]], train_where: str) -> list[str]:
    """The BIO tags of the slot types of train; a dev or test tag of another slot type is an error."""
    types = {t[2:] for g in splits.get("train") or [] for t in g.example.tags if t != "O"}
    for split in ("dev", "test"):
        for g in splits.get(split, []):
            for t in g.example.tags:
                if t != "O" and t[2:] not in types:
                    raise one_line_error(f"{split} tag '{t}' at {g.at} has a slot type never seen in train "
                                         f"({train_where}); declare labels: in the task to allow it")
    return bio_labels(types)


def label_set(task: TaskDef, splits: dict[str, list[Gold]], train_where: str) -> list[str]:
    """The declared labels (every gold label must be one), else the labels train gives."""
    if task.labels is not None:
        _check_declared(task, splits)
        return list(task.labels)
    if task.kind == "sequence":
        return _sequence_labels(splits, train_where)
    return _token_labels(splits, train_where)
