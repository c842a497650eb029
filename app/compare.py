"""Two runs on the same test examples: is the difference real? (`clfbench compare A B`.)

Paired, because both runs answered the same examples: McNemar's exact test on the examples exactly one of them
gets right (accuracy; for a token task, an utterance with every tag right), and the paired bootstrap (engine.stats)
for F1-type metrics, with the difference's 95% interval. Only the examples both runs answered are compared; when
their test sets differ (another test_limit), that is said, with how many each has alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from clfbench.engine import metrics, stats
from clfbench.engine.tasks.identity import frozen_tasks
from clfbench.engine.rescore import as_predictions
from clfbench.engine.types import ClfbenchError
from clfbench.storage import queries
from clfbench.storage.db import Store
from clfbench.storage.queries import Matrix

# Metrics compared per task kind; the first one's per-example rightness is McNemar's.
COMPARED = {"sequence": ("accuracy", "macro_f1"), "token": ("slot_f1", "exact_tags", "token_accuracy")}


@dataclass
class MetricComparison:
    metric: str
    value_a: float
    value_b: float
    difference: stats.Difference


@dataclass
class TaskComparison:
    task: str
    kind: str
    shared: int
    only_a: int  # examples only run A answered (its test set is larger)
    only_b: int
    agreement: dict[str, int]  # both right, only a right, only b right, both wrong
    metrics: list[MetricComparison]
    per_label: list[tuple[str, float, float, int]] = field(default_factory=list)  # label, F1 a, F1 b, support
    disagreements: list[dict] = field(default_factory=list)  # examples exactly one run got right
    rule: str | None = None
    labels_note: str | None = None


def _rows_by_id(store: Store, run_id: int, task: str) -> dict[str, dict]:
    return {row["example_id"]: row for row in queries.predictions(store, run_id, task)}


def _task_labels(run: dict, task: str) -> list[str] | None:
    from clfbench.app.error_analysis import task_labels

    entry = next((e for e in frozen_tasks(run.get("tasks_json")) if e.get("name") == task), None)
    return task_labels(entry, json.loads(run["spec_json"] or "{}").get("data_dir"))


def _right_flags(kind: str, rows: list[dict], rule: str) -> list[bool]:
    """Per example, whether a run got it right: the label, or (token task) every tag as the rule reads them."""
    if kind == "sequence":
        return [row["predicted"] is not None and row["predicted"] == row["gold"] for row in rows]
    gold, predicted = metrics.rule_sequences([metrics.as_tags(r["gold"]) or [] for r in rows],
                                             [metrics.as_tags(r["predicted"]) for r in rows], rule)
    return [g == p for g, p in zip(gold, predicted)]


def compare_task(store: Store, run_a: dict, run_b: dict, task: str, resamples: int = stats.RESAMPLES,
                 seed: int = stats.BOOTSTRAP_SEED, examples: int = 5) -> TaskComparison:
    """Runs A and B on one task, over the examples both answered (in A's order)."""
    a, b, only_a, only_b = _paired_rows(store, run_a["id"], run_b["id"], task)
    kind = "token" if "slot_f1" in queries.run_results(store, run_a["id"]).get(task, {}) else "sequence"
    rule = queries.run_result_rules(store, run_a["id"]).get(task, {}).get("slot_f1") or metrics.DEFAULT_SLOT_RULE
    right_a, right_b = _right_flags(kind, a, rule), _right_flags(kind, b, rule)
    comparison = TaskComparison(task=task, kind=kind, shared=len(a), only_a=only_a, only_b=only_b,
                                agreement=_agreement(right_a, right_b), metrics=[],
                                rule=rule if kind == "token" else None)
    if kind == "sequence":
        labels = _task_labels(run_a, task)
        if labels is None:  # not at hand without a download: the labels that gold or either run's answers name
            comparison.labels_note = "the task's label set is not at hand here: macro-F1 over the labels seen"
            labels = sorted({r["gold"] for r in a} | {r["predicted"] for r in a + b if r["predicted"] is not None})
        counts_a, counts_b = _sequence_counts(a, labels), _sequence_counts(b, labels)
        comparison.per_label = _per_label(a, b, labels)
    else:
        counts_a, counts_b = _token_counts(a, rule, right_a), _token_counts(b, rule, right_b)
    comparison.metrics = _metric_comparisons(kind, counts_a, counts_b, comparison.agreement, resamples, seed)
    comparison.disagreements = _disagreements(a, b, right_a, right_b, examples)
    return comparison


def _paired_rows(store: Store, run_a: int, run_b: int, task: str) -> tuple[list[dict], list[dict], int, int]:
    """Both runs' prediction rows for the examples both answered (A's order), and how many each has alone."""
    rows_a, rows_b = _rows_by_id(store, run_a, task), _rows_by_id(store, run_b, task)
    if not rows_a or not rows_b:
        raise ClfbenchError(f"run {run_a if not rows_a else run_b} has no stored predictions for task '{task}'")
    shared = [example_id for example_id in rows_a if example_id in rows_b]
    if not shared:
        raise ClfbenchError(f"runs {run_a} and {run_b} share no test example of {task}: nothing to pair")
    a, b = [rows_a[i] for i in shared], [rows_b[i] for i in shared]
    if any(x["gold"] != y["gold"] for x, y in zip(a, b)):
        raise ClfbenchError(f"runs {run_a} and {run_b} give different gold answers for the same examples of "
                            f"{task}: they are not the same task's data")
    return a, b, len(rows_a) - len(shared), len(rows_b) - len(shared)


def _agreement(right_a: list[bool], right_b: list[bool]) -> dict[str, int]:
    """McNemar's 2×2 table: both right, only A right, only B right, both wrong."""
    pairs = list(zip(right_a, right_b))
    return {"both right": sum(x and y for x, y in pairs), "only a right": sum(x and not y for x, y in pairs),
            "only b right": sum(y and not x for x, y in pairs), "both wrong": sum(not (x or y) for x, y in pairs)}


def _metric_comparisons(kind: str, counts_a: dict[str, stats.Counts], counts_b: dict[str, stats.Counts],
                        agreement: dict[str, int], resamples: int, seed: int) -> list[MetricComparison]:
    """Each compared metric's difference; the share of examples right is tested with McNemar's exact test (its
    interval still from the paired bootstrap), F1-type metrics with the paired bootstrap."""
    mcnemar_metric = "accuracy" if kind == "sequence" else "exact_tags"
    compared = []
    for metric in COMPARED[kind]:
        difference = stats.paired_bootstrap(counts_a[metric], counts_b[metric], resamples, seed)
        if metric == mcnemar_metric:
            p_value = stats.mcnemar_exact(agreement["only a right"], agreement["only b right"])
            difference = stats.Difference(difference.value, difference.low, difference.high, p_value,
                                          "McNemar exact")
        compared.append(MetricComparison(metric, counts_a[metric].value(), counts_b[metric].value(), difference))
    return compared


def _disagreements(a: list[dict], b: list[dict], right_a: list[bool], right_b: list[bool],
                   examples: int) -> list[dict]:
    """Up to `examples` examples only A got right, then up to as many only B got right, with both raw outputs."""
    listed = {"a": [], "b": []}
    for x, y, ra, rb in zip(a, b, right_a, right_b):
        side = "a" if ra and not rb else "b" if rb and not ra else None
        if side and len(listed[side]) < examples:
            listed[side].append({"example_id": x["example_id"], "text": x["text"], "gold": x["gold"],
                                 "a": x["predicted"], "b": y["predicted"], "a_raw": x["raw_output"],
                                 "b_raw": y["raw_output"], "right": side})
    return listed["a"] + listed["b"]


def _sequence_counts(rows: list[dict], labels: list[str]) -> dict[str, stats.Counts]:
    gold, predicted = [r["gold"] for r in rows], [r["predicted"] for r in rows]
    return {"accuracy": stats.accuracy_counts(gold, predicted),
            "macro_f1": stats.macro_f1_counts(gold, predicted, sorted(set(labels) | set(gold)))}


def _token_counts(rows: list[dict], rule: str, right: list[bool]) -> dict[str, stats.Counts]:
    gold_tags = [metrics.as_tags(r["gold"]) or [] for r in rows]
    predicted_tags = [metrics.as_tags(r["predicted"]) for r in rows]
    return {"slot_f1": stats.slot_counts(gold_tags, predicted_tags, rule)["slot_f1"],
            "exact_tags": stats.share_counts(right),
            "token_accuracy": stats.token_accuracy_counts(gold_tags, predicted_tags)}


def _per_label(a: list[dict], b: list[dict], labels: list[str]) -> list[tuple[str, float, float, int]]:
    """Per gold label: F1 of each run on the shared examples, largest difference first."""
    gold = [r["gold"] for r in a]
    labels = sorted(set(labels) | set(gold))
    report_a = metrics.per_label_report(gold, [r["predicted"] for r in a], labels)
    report_b = metrics.per_label_report(gold, [r["predicted"] for r in b], labels)
    rows = [(label, report_a[label]["f1"], report_b[label]["f1"], int(report_a[label]["support"]))
            for label in labels if report_a[label]["support"]]
    return sorted(rows, key=lambda row: (-abs(row[1] - row[2]), row[0]))


def metric_rows(comparison: TaskComparison) -> list[tuple[str, ...]]:
    """The metrics table as the CLI and the TUI print it: metric, A, B, A − B, its 95% interval, p, test (points)."""
    return [(m.metric, f"{m.value_a * 100:.1f}", f"{m.value_b * 100:.1f}", f"{m.difference.value * 100:+.1f}",
             f"[{m.difference.low * 100:+.1f}, {m.difference.high * 100:+.1f}]", f"{m.difference.p_value:.3g}",
             m.difference.test) for m in comparison.metrics]


METRIC_COLUMNS = ("metric", "A", "B", "A − B", "95% interval", "p", "test")


def verdict(metric: str, difference: stats.Difference, alpha: float) -> str:
    """One line a reader can quote: which run is better and by how much, or that the test found no difference."""
    if difference.p_value < alpha:
        return (f"{metric}: {'A' if difference.value > 0 else 'B'} is better by {abs(difference.value) * 100:.1f} "
                f"points (p = {difference.p_value:.3g} < {alpha:g})")
    return f"{metric}: no significant difference at {alpha:g} (p = {difference.p_value:.3g})"


def shared_note(comparison: TaskComparison) -> str:
    """How many examples were paired, and that the rest were left out when the test sets differ."""
    note = f"{comparison.task}: {comparison.shared:,} test examples both answered"
    if comparison.only_a or comparison.only_b:
        note += (f"; the test sets differ (A alone has {comparison.only_a:,}, B alone {comparison.only_b:,}): "
                 f"compared on the shared examples only")
    return note + (f"; spans read under the '{comparison.rule}' rule" if comparison.rule else "")


def shared_tasks(run_a: dict, run_b: dict) -> list[str]:
    tasks_b = run_b["task"].split("+")
    return [task for task in run_a["task"].split("+") if task in tasks_b]


# ---- significance marks in the results matrix -------------------------------------------------

def cell_p_value(store: Store, run_ids: list[int], best_ids: list[int], task: str, metric: str,
                 read: dict[int, dict[str, dict]] | None = None) -> float | None:
    """Two-sided p of a cell (its runs, one per seed) against the column's best cell on `task`'s examples that
    every run of both answered: McNemar's exact test for the accuracy of two one-run cells, the paired bootstrap
    for their other shares of examples, and the two-level bootstrap over examples and seeds when either cell has
    several seeds. None for a metric that is no share of examples (a loss, a time) or predictions these tests
    cannot pair. `read`: prediction rows already read, by run (mark_ties reads the best cell's once per column)."""
    paired = _rows_on_shared_examples(store, [*run_ids, *best_ids], task, read)
    if paired is None:
        return None
    kind = "token" if "slot_f1" in queries.run_results(store, best_ids[0]).get(task, {}) else "sequence"
    rule = queries.run_result_rules(store, best_ids[0]).get(task, {}).get("slot_f1") or metrics.DEFAULT_SLOT_RULE
    if metric == "accuracy" and kind == "sequence" and len(paired) == 2:
        agreement = _agreement(*(_right_flags(kind, side, rule) for side in paired))
        return stats.mcnemar_exact(agreement["only a right"], agreement["only b right"])
    labels = _labels_seen(paired)
    counts = [stats.task_counts(kind, as_predictions(side, kind == "token"), labels, rule).get(metric)
              for side in paired]
    if any(c is None for c in counts):
        return None
    if len(paired) == 2:
        return stats.paired_bootstrap(counts[0], counts[1]).p_value
    return stats.seeds_bootstrap(counts[:len(run_ids)], counts[len(run_ids):]).p_value


def _rows_on_shared_examples(store: Store, run_ids: list[int], task: str,
                             read: dict[int, dict[str, dict]] | None = None) -> list[list[dict]] | None:
    """Each run's prediction rows on the examples every one of them answered (the last run's order); None when
    they share none or disagree on a gold answer (not the same task's data)."""
    read = {} if read is None else read
    rows = [read[run_id] if run_id in read else read.setdefault(run_id, _rows_by_id(store, run_id, task))
            for run_id in run_ids]
    shared = [example_id for example_id in rows[-1] if all(example_id in r for r in rows)]
    if not shared or any(len({r[i]["gold"] for r in rows}) != 1 for i in shared):
        return None
    return [[r[i] for i in shared] for r in rows]


def _labels_seen(paired: list[list[dict]]) -> list[str]:
    """The labels the gold answers or any run's answers name (macro-F1's labels when the task's are not at hand)."""
    seen = {row["gold"] for row in paired[0]}
    seen |= {row["predicted"] for side in paired for row in side if row["predicted"] is not None}
    return sorted(seen)


def mark_ties(store: Store, matrix: Matrix, best: dict[str, tuple], alpha: float = 0.05) -> str:
    """Fill `matrix.ties`: per column, the cells not significantly different from the column's best cell (paired
    on the shared test examples, over seeds too where a cell has several, Holm-corrected over the column's
    comparisons, at `alpha`), so that bold means "not shown worse than the best". Returns the note that says so,
    naming what was not tested."""
    untested = 0
    for column, best_row in best.items():
        best_cell = matrix.cells[(best_row, column)]
        others = [row for row in matrix.rows if row != best_row and (row, column) in matrix.cells]
        metric = matrix.metric
        if metric == "auto":
            kind_token = "slot_f1" in queries.run_results(store, best_cell.run_ids[0]).get(
                matrix.column_tasks[column], {})
            metric = "slot_f1" if kind_token else "accuracy"
        tested, p_values, read = [], [], {}
        for row in others:
            p_value = cell_p_value(store, list(matrix.cells[(row, column)].run_ids), list(best_cell.run_ids),
                                   matrix.column_tasks[column], metric, read)
            if p_value is None:
                untested += 1
                continue
            tested.append(row)
            p_values.append(p_value)
        matrix.ties[column] = {row for row, p in zip(tested, stats.holm(p_values)) if p >= alpha}
    note = (f"bold: each column's best and the cells not significantly different from it (paired on the shared "
            f"test examples: McNemar exact for accuracy, paired bootstrap otherwise, over examples and seeds "
            f"for cells of several seeds; Holm-corrected over the column; alpha {alpha:g})")
    return note + (f"; {untested} cell(s) without stored predictions to pair not tested" if untested else "")
