"""Recomputing a stored run's slot scores under its task's slot rule, from its stored predictions (`clfbench
rescore`).

Why: slot F1 and exact match depend on how spans are read (engine.metrics.SLOT_RULES), and that rule belongs to
the task. Runs scored before the rule existed were all scored under "conlleval" (the store's migration 2 says so
on their rows); built-in massive-slots now declares MASSIVE's official rule. Rescoring brings such runs to their
task's rule without training again, from exactly the predictions they stored. Only the rule-dependent metrics
change (slot_f1, slot_precision, slot_recall, exact_match); accuracy and the rest do not depend on it.

A task's rule is read from the run's frozen definition (runs.tasks_json), else from the task as defined today
(built-in or user YAML) for runs queued before definitions were frozen. Torch-free: the CLI imports this.
"""
from __future__ import annotations

from dataclasses import dataclass

from clfbench.engine import metrics
from clfbench.engine.tasks import get_task
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
    rule: str


def _task_kinds_and_rules(run: dict) -> dict[str, tuple[str, str | None]]:
    """Stored task name -> (kind, slot rule or None) for each task of the run."""
    entries = frozen_tasks(run.get("tasks_json"))
    if entries:
        definitions = [thaw_task(entry) for entry in entries]
    else:
        definitions = [get_task(part.strip()) for part in run["task"].split("+") if part.strip()]
    return {task.name: (task.kind, task.slot_rule) for task in definitions}


def _as_predictions(rows: list[dict], token: bool) -> list[Prediction]:
    """Stored prediction rows as Predictions: a token task's gold and predicted tags are stored joined by spaces."""
    def tags(value: str | None):
        return value.split() if token and value is not None else value

    return [Prediction(example_id=row["example_id"], text=row["text"], gold=tags(row["gold"]),
                       predicted=tags(row["predicted"]), raw_output=row["raw_output"],
                       parse_status=row["parse_status"]) for row in rows]


def rescored_rows(store: Store, run: dict) -> list[dict]:
    """The rule-dependent result rows of a run recomputed under each token task's rule: slot scores per token
    task, and exact match when the run pairs one sequence task with one token task over the same examples."""
    tasks = _task_kinds_and_rules(run)
    token = [name for name, (kind, _rule) in tasks.items() if kind == "token"]
    sequence = [name for name, (kind, _rule) in tasks.items() if kind == "sequence"]
    rows = []
    for name in token:
        rule = tasks[name][1] or metrics.DEFAULT_SLOT_RULE
        stored = _as_predictions(queries.predictions(store, run["id"], name), token=True)
        if not stored:
            continue
        scores = metrics.slot_scores([p.gold for p in stored], [p.predicted for p in stored], rule)
        rows += [{"task": name, "metric": metric, "value": scores[metric], "rule": rule}
                 for metric in ("slot_f1", "slot_precision", "slot_recall")]
        if len(token) == 1 and len(sequence) == 1:
            intents = _as_predictions(queries.predictions(store, run["id"], sequence[0]), token=False)
            value = metrics.joint_exact_match(intents, stored, rule)
            if value is not None:
                rows.append({"task": name, "metric": "exact_match", "value": value, "rule": rule})
    return rows


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
    changes = []
    for row in rescored_rows(store, run):
        before = old.get(row["task"], {}).get(row["metric"])
        before_rule = old_rules.get(row["task"], {}).get(row["metric"])
        if before is None or before != row["value"] or before_rule != row["rule"]:
            changes.append(Change(row["task"], row["metric"], before, before_rule, row["value"], row["rule"]))
    if write and changes:
        rows = [{"task": c.task, "metric": c.metric, "value": c.value, "rule": c.rule} for c in changes]
        if not replace_result_values(store, run_id, rows):
            raise ClfbenchError(f"run {run_id} changed status while it was rescored; nothing written")
    return changes
