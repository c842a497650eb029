"""Recomputing a stored run's slot scores under its task's slot rule, from its stored predictions (`clfbench
rescore`).

Why: slot F1 and exact match depend on how spans are read (engine.metrics.SLOT_RULES), and that rule belongs to
the task. Runs scored before the rule existed were all scored under "conlleval" (the store's migration 2 says so
on their rows); built-in massive-slots now declares MASSIVE's official rule. Rescoring brings such runs to their
task's rule without training again, from exactly the predictions they stored. Only the rule-dependent metrics
change (slot_f1, slot_precision, slot_recall, exact_match); accuracy and the rest do not depend on it.

It also gives results stored before schema v5 their 95% bootstrap interval (engine.stats), from the same stored
predictions, where those reproduce the stored value.

A task's rule is read from the run's frozen definition (runs.tasks_json), else from the task as defined today
(built-in or user YAML) for runs queued before definitions were frozen. Torch-free: the CLI imports this.
"""
from __future__ import annotations

from dataclasses import dataclass

from clfbench.engine import metrics, stats
from clfbench.engine.tasks import get_task
from clfbench.engine.tasks.definitions import TaskDef
from clfbench.engine.tasks.identity import frozen_tasks, thaw_task
from clfbench.engine.types import ClfbenchError, Prediction
from clfbench.storage import queries
from clfbench.storage.db import Store
from clfbench.storage.queue import replace_result_values


@dataclass(frozen=True)
class Change:
    task: str
    metric: str
    old_value: float | None
    old_rule: str | None
    value: float
    rule: str | None
    interval: tuple[float, float, int] | None = None  # set when only a missing interval was added


def _task_definitions(run: dict) -> list[TaskDef]:
    """The run's frozen task definitions, else (runs queued before they were frozen) the tasks as defined today."""
    entries = frozen_tasks(run.get("tasks_json"))
    if entries:
        return [thaw_task(entry) for entry in entries]
    return [get_task(part.strip()) for part in run["task"].split("+") if part.strip()]


def _task_kinds_and_rules(run: dict) -> dict[str, tuple[str, str | None]]:
    """Stored task name -> (kind, slot rule or None) for each task of the run."""
    return {task.name: (task.kind, task.slot_rule) for task in _task_definitions(run)}


def as_predictions(rows: list[dict], token: bool) -> list[Prediction]:
    """Stored prediction rows as Predictions: a token task's gold and predicted tags are stored joined by spaces."""
    def tags(value: str | None):
        return value.split() if token and value is not None else value

    return [Prediction(example_id=row["example_id"], text=row["text"], gold=tags(row["gold"]),
                       predicted=tags(row["predicted"]), raw_output=row["raw_output"],
                       parse_status=row["parse_status"], confidence=row.get("confidence")) for row in rows]


def rescored_rows(store: Store, run: dict) -> list[dict]:
    """The rule-dependent result rows of a run recomputed under each token task's rule: slot scores per token
    task, and exact match when the run pairs one sequence task with one token task over the same examples."""
    tasks = _task_kinds_and_rules(run)
    token = [name for name, (kind, _rule) in tasks.items() if kind == "token"]
    sequence = [name for name, (kind, _rule) in tasks.items() if kind == "sequence"]
    rows = []
    for name in token:
        rule = tasks[name][1] or metrics.DEFAULT_SLOT_RULE
        stored = as_predictions(queries.predictions(store, run["id"], name), token=True)
        if not stored:
            continue
        scores = metrics.slot_scores([p.gold for p in stored], [p.predicted for p in stored], rule)
        counts = stats.slot_counts([p.gold for p in stored], [p.predicted for p in stored], rule)
        rows += [{"task": name, "metric": metric, "value": scores[metric], "rule": rule,
                  **_interval_columns(stats.bootstrap_interval(counts[metric]))}
                 for metric in ("slot_f1", "slot_precision", "slot_recall")]
        if len(token) == 1 and len(sequence) == 1:
            intents = as_predictions(queries.predictions(store, run["id"], sequence[0]), token=False)
            joint = stats.exact_match_counts(intents, stored, rule)
            if joint is not None:
                rows.append({"task": name, "metric": "exact_match", "value": joint.value(), "rule": rule,
                             **_interval_columns(stats.bootstrap_interval(joint))})
    return rows


def _interval_columns(interval: stats.Interval) -> dict:
    return {"low": interval.low, "high": interval.high, "resamples": interval.resamples}


def _labels_for_scores(task: TaskDef, stored: list[Prediction]) -> list[str]:
    """The label set macro-F1 averages over: the task's declared labels, else (labels read from data at load)
    the gold labels and the predicted ones. A stored value these do not reproduce gets no interval."""
    if task.labels:
        return list(task.labels)
    return sorted({p.gold for p in stored} | {p.predicted for p in stored if p.predicted is not None})


def interval_rows(store: Store, run: dict, skip: set[tuple[str, str]] = frozenset()) -> list[dict]:
    """Bootstrap intervals for a run's results that have none (stored before schema v5), from its stored
    predictions: a row {task, metric, value, rule, low, high, resamples} per result whose value the predictions
    reproduce (to 1e-9); a result they do not reproduce is left without (its interval would not be its own)."""
    stored_values = queries.run_results(store, run["id"])
    stored_rules = queries.run_result_rules(store, run["id"])
    have = queries.run_result_intervals(store, run["id"])
    definitions = _task_definitions(run)
    by_name = {task.name: task for task in definitions}
    rows = []
    for name, values in stored_values.items():
        task = by_name.get(name)
        wanted = [m for m in values if m not in have.get(name, {}) and (name, m) not in skip]
        if task is None or not wanted:
            continue
        stored = as_predictions(queries.predictions(store, run["id"], name), token=task.kind == "token")
        if not stored:
            continue
        try:
            counts = stats.task_counts(task.kind, stored, _labels_for_scores(task, stored),
                                       stored_rules.get(name, {}).get("slot_f1") or task.slot_rule)
        except ClfbenchError:  # predictions these functions refuse: the results keep no interval, as before
            continue
        if "exact_match" in wanted:
            rows += _joint_interval_row(store, run, definitions, name, stored, values["exact_match"],
                                        stored_rules.get(name, {}).get("exact_match"))
        for metric in wanted:
            if metric in counts and abs(counts[metric].value() - values[metric]) <= 1e-9:
                rows.append({"task": name, "metric": metric, "value": values[metric],
                             "rule": stored_rules.get(name, {}).get(metric),
                             **_interval_columns(stats.bootstrap_interval(counts[metric]))})
    return rows


def _joint_interval_row(store: Store, run: dict, definitions: list[TaskDef], name: str, stored: list[Prediction],
                        value: float, rule: str | None) -> list[dict]:
    sequence = [task.name for task in definitions if task.kind == "sequence"]
    if len(sequence) != 1:
        return []
    intents = as_predictions(queries.predictions(store, run["id"], sequence[0]), token=False)
    joint = stats.exact_match_counts(intents, stored, rule or metrics.DEFAULT_SLOT_RULE)
    if joint is None or abs(joint.value() - value) > 1e-9:
        return []
    return [{"task": name, "metric": "exact_match", "value": value, "rule": rule,
             **_interval_columns(stats.bootstrap_interval(joint))}]


def rescore_run(store: Store, run_id: int, write: bool = True) -> list[Change]:
    """Recompute one succeeded run's slot scores under its tasks' rules; the rows whose value or rule changes
    (written in one transaction unless `write` is false). A run that has no token task changes nothing."""
    run = queries.get_run(store, run_id)
    if run is None:
        raise ClfbenchError(f"no run {run_id}")
    if run["status"] != "succeeded":
        raise ClfbenchError(f"run {run_id} is {run['status']}: only succeeded runs have results to rescore")
    old = queries.run_results(store, run_id)
    old_rules = queries.run_result_rules(store, run_id)
    old_intervals = queries.run_result_intervals(store, run_id)
    changes, rows = [], []
    rescored = rescored_rows(store, run)
    for row in rescored:
        before = old.get(row["task"], {}).get(row["metric"])
        before_rule = old_rules.get(row["task"], {}).get(row["metric"])
        if before is None or before != row["value"] or before_rule != row["rule"]:
            changes.append(Change(row["task"], row["metric"], before, before_rule, row["value"], row["rule"]))
            rows.append(row)
        elif row["metric"] not in old_intervals.get(row["task"], {}):
            changes.append(Change(row["task"], row["metric"], before, before_rule, row["value"], row["rule"],
                                  interval=(row["low"], row["high"], row["resamples"])))
            rows.append(row)
    for row in interval_rows(store, run, skip={(r["task"], r["metric"]) for r in rescored}):
        changes.append(Change(row["task"], row["metric"], row["value"], row["rule"], row["value"], row["rule"],
                              interval=(row["low"], row["high"], row["resamples"])))
        rows.append(row)
    if write and rows and not replace_result_values(store, run_id, rows):
        raise ClfbenchError(f"run {run_id} changed status while it was rescored; nothing written")
    return changes
