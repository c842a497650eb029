"""Label-level error analysis of stored predictions, shared by `clfbench errors` and the TUI's Errors screen.

Stored predictions come back from the store as rows (storage.queries.predictions). A token task (slots)
stores space-joined tag sequences; it is scored per tag position, after MASSIVE's normalisation
(engine.metrics.normalise_tags), so its "labels" are tags. Pure Python: engine.metrics is torch-free.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from clfbench.engine import metrics

# Confusion-matrix columns that are not labels (engine.metrics names them).
OTHER_COLUMN = metrics.OTHER_COLUMN
UNPARSED_COLUMN = metrics.UNPARSED_COLUMN


def is_token_task(rows: list[dict]) -> bool:
    """Token tasks store tag sequences; a sequence label never holds a space (looking at 50 rows suffices)."""
    return any(" " in row["gold"] for row in rows[:50])


def _tags(row: dict) -> tuple[list[str], list[str]]:
    """Normalised (gold, predicted) tags of one token-task row, same length."""
    gold = metrics.normalise_tags(row["gold"].split(), len(row["gold"].split()))
    predicted = metrics.normalise_tags(
        row["predicted"].split() if row["predicted"] is not None else None, len(gold))
    return gold, predicted


@dataclass
class ErrorReport:
    """classification_report over a task's predictions (per tag for token tasks) and the rows it came from."""

    token_task: bool
    labels: list[str]  # the confusion matrix's axis, extra columns included
    accuracy: float
    per_label: dict[str, dict[str, float]]
    confusion: list[list[int]]  # rows = gold, columns = predicted, both in `labels` order
    rows: list[dict]
    report: dict  # engine.metrics.classification_report's dict, as `clfbench errors --json` prints it


def error_report(rows: list[dict]) -> ErrorReport:
    token_task = is_token_task(rows)
    if token_task:
        pairs = [_tags(row) for row in rows]
        gold = [tag for gold_tags, _ in pairs for tag in gold_tags]
        predicted = [tag for _, predicted_tags in pairs for tag in predicted_tags]
    else:
        gold = [row["gold"] for row in rows]
        predicted = [row["predicted"] for row in rows]
    # The label set is what occurs (the store keeps no label list); an out-of-set LLM answer becomes a
    # label of its own, so the matrix shows what the model actually said.
    labels = sorted(set(gold) | {p for p in predicted if p is not None})
    report = metrics.classification_report(gold, predicted, labels)
    return ErrorReport(token_task=token_task, labels=report["confusion"]["labels"], accuracy=report["accuracy"],
                       per_label=report["per_label"], confusion=report["confusion"]["matrix"], rows=rows,
                       report=report)


def _matches(predicted: str | None, column: str) -> bool:
    if column == UNPARSED_COLUMN:
        return predicted is None
    return predicted == column


def examples_for(report: ErrorReport, gold: str, predicted: str | None = None) -> list[dict]:
    """The rows behind a label or a confusion cell.

    predicted None: the misclassified examples whose gold is `gold` (for a token task: sentences with a
    `gold` tag that are not tagged exactly right). Otherwise the examples in cell (gold, predicted); for a
    token task the sentences with at least one position tagged `gold` and predicted `predicted`.
    """
    if report.token_task:
        out = []
        for row in report.rows:
            gold_tags, predicted_tags = _tags(row)
            if predicted is None:
                if gold in gold_tags and gold_tags != predicted_tags:
                    out.append(row)
            elif any(g == gold and p == predicted for g, p in zip(gold_tags, predicted_tags)):
                out.append(row)
        return out
    if predicted is None:
        return [row for row in report.rows if row["gold"] == gold and row["predicted"] != gold]
    return [row for row in report.rows if row["gold"] == gold and _matches(row["predicted"], predicted)]


def task_labels(entry: dict | None, data_dir: str | None) -> list[str] | None:
    """The label set of a run's task (its frozen entry, engine.tasks.identity): the declared labels, else those of
    its local train split; None when it cannot be known here without a download (a hub source, a run queued
    before tasks were frozen, data that is gone). Token tasks: BIO tags, as their error reports name them."""
    from clfbench.engine.tasks import load_task
    from clfbench.engine.tasks.identity import thaw_task
    from clfbench.engine.tasks.loading import data_files
    from clfbench.engine.types import ClfbenchError

    if not entry:
        return None
    try:
        task = thaw_task(entry)
        if task.labels:
            return list(task.labels)
        if data_files(task, data_dir) is None:  # on the hub: nothing is downloaded to answer a question
            return None
        return list(load_task(task, data_dir, need_train=False).labels)
    except (ClfbenchError, OSError):
        return None


def absent_label_message(label: str, task: str, report: ErrorReport, labels: list[str] | None) -> str:
    """Why `label` has no row in a run's report: valid for the task but not in the test examples this run
    scored (a test_limit subset, or a rare label), or not a label of the task at all (with the nearest one)."""
    where = f"{len(report.rows)} test example(s)"
    if labels is not None and label in labels:
        return f"label '{label}' is valid for {task}, but not in this run's test subset ({where} scored)"
    if labels is not None:
        near = difflib.get_close_matches(label, labels, n=1)
        return f"label '{label}' is not a label of {task}" + (f" (did you mean '{near[0]}'?)" if near else "")
    return f"label '{label}' does not occur in this run's {where} of {task} (its full label set is not at hand)"

