"""Read queries for the CLI and the TUI. Plain dicts out; no writes here."""
from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Float, case, func, literal_column, select

from clfbench.storage import dialect
from clfbench.storage.db import Store
from clfbench.storage.models import (EngineRow, Event, MetricPoint, PredictionRow, Result, Run, RunLogChunk,
                                     RunStatus, SchemaInfo, metric_value)

RUNS = Run.__table__
RESULTS = Result.__table__
PREDICTIONS = PredictionRow.__table__
METRICS = MetricPoint.__table__
ENGINES = EngineRow.__table__
EVENTS = Event.__table__


def list_runs(store: Store, status: str | None = None, limit: int | None = None) -> list[dict]:
    query = select(RUNS).order_by(RUNS.c.id.desc())
    if status:
        query = query.where(RUNS.c.status == status)
    if limit:
        query = query.limit(limit)
    with store.read() as connection:
        return [dict(row) for row in connection.execute(query).mappings()]


# ---- incremental run lists (the TUI's runs screen) ------------------------------------------------
# runs.change_seq is a store-wide counter that a trigger bumps on every insert or update of a run row (schema v4),
# so a live list reads only the rows changed since the highest value it has seen, not every row on every tick.
# SQLite serialises writes, so every value below the highest one a read saw belongs to a committed row: re-reading
# `change_seq > seen` misses nothing. PostgreSQL takes the value from a sequence when the statement starts, not
# when it commits, so a row can appear later with a lower value: its readers re-read from a value they saw some
# seconds earlier (change_order_is_strict tells which). Deletes bump nothing: count_runs tells a reader when rows
# went away, run_ids which.

INCREMENTAL_READ_LIMIT = 2000  # rows per changed-since read; a reader that gets this many reads on next time


def change_order_is_strict(store: Store) -> bool:
    """Whether change_seq values become visible in order (SQLite), so a reader needs no margin below them."""
    return store.is_sqlite


def max_change_seq(store: Store) -> int:
    """The highest change counter of any run (0 for an empty store): where a list's next changed-since read
    starts after it read a page."""
    with store.read() as connection:
        return int(connection.execute(select(func.coalesce(func.max(RUNS.c.change_seq), 0))).scalar_one())


def runs_page(store: Store, before_id: int | None = None, limit: int = 200) -> list[dict]:
    """Up to `limit` runs, newest first, with ids below `before_id` (None: from the newest): a list's first page,
    and the older pages it reads after it painted."""
    query = select(RUNS).order_by(RUNS.c.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(RUNS.c.id < before_id)
    with store.read() as connection:
        return [dict(row) for row in connection.execute(query).mappings()]


def runs_changed_since(store: Store, seq: int, limit: int = INCREMENTAL_READ_LIMIT) -> list[dict]:
    """Runs whose change counter is above `seq`, in counter order, at most `limit` (the index ix_runs_change_seq
    makes this cost the rows returned, not the store's size)."""
    query = select(RUNS).where(RUNS.c.change_seq > seq).order_by(RUNS.c.change_seq).limit(limit)
    with store.read() as connection:
        return [dict(row) for row in connection.execute(query).mappings()]


def count_runs(store: Store, min_id: int = 0) -> int:
    """How many runs have an id of at least `min_id`: a list compares it with the rows it holds to notice deletes."""
    with store.read() as connection:
        return int(connection.execute(select(func.count()).select_from(RUNS).where(RUNS.c.id >= min_id)).scalar_one())


def run_ids(store: Store, min_id: int = 0) -> set[int]:
    """The ids of the runs with an id of at least `min_id` (which rows a list must drop after deletes)."""
    with store.read() as connection:
        return set(connection.execute(select(RUNS.c.id).where(RUNS.c.id >= min_id)).scalars())


def headline_results(store: Store, run_ids: Collection[int]) -> dict[int, dict[str, tuple[str, float]]]:
    """{run id: {task: (metric, value)}}: each run's primary result per task (accuracy, or slot F1 for slot
    filling; see PRIMARY_METRICS), for the run list's result column. Runs without results are left out."""
    wanted = list(run_ids)
    found: dict[int, dict[str, dict[str, float]]] = {}
    with store.read() as connection:
        for start in range(0, len(wanted), 500):  # well under every backend's limit on bound parameters
            rows = connection.execute(
                select(RESULTS.c.run_id, RESULTS.c.task, RESULTS.c.metric, RESULTS.c.value)
                .where(RESULTS.c.run_id.in_(wanted[start:start + 500]), RESULTS.c.metric.in_(PRIMARY_METRICS))
            ).all()
            for run_id, task, metric, value in rows:
                found.setdefault(run_id, {}).setdefault(task, {})[metric] = value
    return {run_id: {task: next((m, values[m]) for m in PRIMARY_METRICS if m in values)
                     for task, values in sorted(tasks.items())}
            for run_id, tasks in found.items()}


def get_run(store: Store, run_id: int) -> dict | None:
    with store.read() as connection:
        row = connection.execute(select(RUNS).where(RUNS.c.id == run_id)).mappings().first()
        return dict(row) if row else None


def count_by_status(store: Store) -> dict[str, int]:
    with store.read() as connection:
        rows = connection.execute(select(RUNS.c.status, func.count()).group_by(RUNS.c.status)).all()
    return {status: count for status, count in rows}


def run_results(store: Store, run_id: int) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for one run."""
    with store.read() as connection:
        rows = connection.execute(
            select(RESULTS.c.task, RESULTS.c.metric, RESULTS.c.value).where(RESULTS.c.run_id == run_id)
        ).all()
    out: dict[str, dict[str, float]] = {}
    for task, metric, value in rows:
        out.setdefault(task, {})[metric] = value
    return out


def run_result_rules(store: Store, run_id: int) -> dict[str, dict[str, str]]:
    """{task: {metric: rule}} for one run's results that name the rule they were computed under (slot F1
    under "massive", ...); metrics without a rule are left out."""
    with store.read() as connection:
        rows = connection.execute(
            select(RESULTS.c.task, RESULTS.c.metric, RESULTS.c.rule)
            .where(RESULTS.c.run_id == run_id, RESULTS.c.rule.is_not(None))
        ).all()
    out: dict[str, dict[str, str]] = {}
    for task, metric, rule in rows:
        out.setdefault(task, {})[metric] = rule
    return out


def run_result_intervals(store: Store, run_id: int) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{task: {metric: (low, high, resamples)}} for one run's results that carry a bootstrap interval."""
    with store.read() as connection:
        rows = connection.execute(
            select(RESULTS.c.task, RESULTS.c.metric, RESULTS.c.low, RESULTS.c.high, RESULTS.c.resamples)
            .where(RESULTS.c.run_id == run_id, RESULTS.c.resamples.is_not(None))
        ).all()
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for task, metric, low, high, resamples in rows:
        out.setdefault(task, {})[metric] = (low, high, resamples)
    return out


def metric_series(store: Store, run_id: int, after_id: int = 0) -> list[dict]:
    """Metric points of a run, oldest first; `after_id` lets a live view fetch only new points."""
    with store.read() as connection:
        rows = connection.execute(
            select(METRICS).where(METRICS.c.run_id == run_id, METRICS.c.id > after_id).order_by(METRICS.c.id)
        ).mappings()
        # A NaN or infinite point reads back as that float on every backend (stored as NULL plus its name).
        return [{**row, "value": metric_value(row["value"], row["nonfinite"])} for row in rows]


def predictions(store: Store, run_id: int, task: str) -> list[dict]:
    with store.read() as connection:
        rows = connection.execute(
            select(PREDICTIONS).where(PREDICTIONS.c.run_id == run_id, PREDICTIONS.c.task == task)
            .order_by(PREDICTIONS.c.id)
        ).mappings()
        return [dict(row) for row in rows]


def predictions_for_example(store: Store, task: str, example_id: str) -> list[dict]:
    """What every run predicted for one example of a task (for 'what did the others say')."""
    with store.read() as connection:
        rows = connection.execute(
            select(PREDICTIONS, RUNS.c.model, RUNS.c.method, RUNS.c.shots)
            .join(RUNS, RUNS.c.id == PREDICTIONS.c.run_id)
            .where(PREDICTIONS.c.task == task, PREDICTIONS.c.example_id == example_id)
            .order_by(PREDICTIONS.c.run_id)
        ).mappings()
        return [dict(row) for row in rows]


def recent_events(store: Store, run_id: int | None = None, limit: int = 50) -> list[dict]:
    query = select(EVENTS).order_by(EVENTS.c.id.desc()).limit(limit)
    if run_id is not None:
        query = query.where(EVENTS.c.run_id == run_id)
    with store.read() as connection:
        return [dict(row) for row in connection.execute(query).mappings()]


def live_engines(store: Store, stale_after_s: float, now: float) -> list[dict]:
    """Engines not stopped whose lease has not ended on the database's clock: the rule that decides who owns runs
    (storage.queue), so a list never calls an engine dead while its runs are still its own, whatever the reader's
    clock says. A row written before store v4 has no lease: it is judged by its heartbeat against `now` (the
    reader's clock) and `stale_after_s`."""
    database_now = literal_column(dialect.db_now_sql(store.engine), Float)
    alive = case((ENGINES.c.lease_until.is_not(None), ENGINES.c.lease_until > database_now),
                 else_=ENGINES.c.heartbeat_at > now - stale_after_s)
    with store.read() as connection:
        rows = connection.execute(select(ENGINES).where(ENGINES.c.stopped_at.is_(None), alive)).mappings()
        return [dict(row) for row in rows]


def hosts_overview(store: Store, engines: list[dict], now: float, window_s: float = 86_400.0) -> list[dict]:
    """One row per host of `engines` (what live_engines read, passed in so a reader reads them once): host, launchers, gpu_type, gpus (its engines' GPU ids),
    busy (those held by running runs of its engines), running (its running runs), started (runs it started in the
    last `window_s` of the reader's clock) and share (its part of every host's started runs in that window).
    A run's host is the engine's host name (runs.host), so the counts survive an engine's restart."""
    with store.read() as connection:
        running = connection.execute(select(RUNS.c.engine_id, RUNS.c.gpus_assigned)
                                     .where(RUNS.c.status == RunStatus.running.value)).all()
        started = dict(connection.execute(select(RUNS.c.host, func.count()).where(RUNS.c.started_at > now - window_s)
                                          .group_by(RUNS.c.host)).all())
    total = sum(started.values())
    hosts: dict[str, dict] = {}
    for engine in sorted(engines, key=lambda e: (e["host"], e["id"])):
        host = hosts.setdefault(engine["host"], {
            "host": engine["host"], "launchers": [], "gpu_type": engine.get("gpu_type") or "", "gpus": [],
            "busy": [], "running": 0, "engine_ids": [], "started": started.get(engine["host"], 0),
            "share": started.get(engine["host"], 0) / total if total else 0.0})
        host["engine_ids"].append(engine["id"])
        host["launchers"] = sorted({*host["launchers"], engine.get("launcher") or "local"})
        host["gpus"] = sorted({*host["gpus"], *(int(g) for g in (engine["gpus"] or "").split(",") if g.strip())})
    owner = {engine_id: host for host in hosts.values() for engine_id in host["engine_ids"]}
    for engine_id, assigned in running:
        host = owner.get(engine_id)
        if host is not None:
            host["running"] += 1
            host["busy"] = sorted({*host["busy"], *(int(g) for g in (assigned or "").split(",") if g.strip())})
    return list(hosts.values())


# ---- the engine's reads --------------------------------------------------------------------------

def running_runs(store: Store) -> list[dict]:
    """Every run whose status is running, on any host (an engine adopts or ends those left by another)."""
    with store.read() as connection:
        rows = connection.execute(select(RUNS).where(RUNS.c.status == RunStatus.running.value)).mappings()
        return [dict(row) for row in rows]


def cancel_requests(store: Store, run_ids: Collection[int]) -> set[int]:
    """Those of `run_ids` that a user asked to cancel."""
    with store.read() as connection:
        return set(connection.execute(
            select(RUNS.c.id).where(RUNS.c.id.in_(list(run_ids)), RUNS.c.cancel_requested.is_(True))
        ).scalars())


# ---- results matrix ---------------------------------------------------------------------------

# Which metric a cell shows by default: accuracy for sequence tasks, slot F1 for slot filling
# (what the main paper's Table 3 reports).
PRIMARY_METRICS = ("accuracy", "slot_f1")


@dataclass
class Cell:
    """One experiment's results on one column: a value per distinct seed. Two succeeded runs of one seed (a spec
    queued twice, `--allow-duplicate`) are one measurement, not two: the cell keeps the newest (latest finished)
    and lists the other under `repeats`, so n, the mean and the std count seeds, never copies."""

    values: list[float] = field(default_factory=list)
    run_ids: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    repeats: list[int] = field(default_factory=list)  # run ids left out: their seed has a newer run here
    finished: list[float] = field(default_factory=list)  # finished_at of each kept run (which one is newest)
    # Each kept run's 95% bootstrap interval over test examples (low, high, resamples), None where not stored.
    intervals: list[tuple[float, float, int] | None] = field(default_factory=list)

    def add(self, value: float, run_id: int, seed: int, finished_at: float | None,
            interval: tuple[float, float, int] | None = None) -> None:
        finished_at = finished_at or 0.0
        if seed not in self.seeds:
            self.values.append(value)
            self.run_ids.append(run_id)
            self.seeds.append(seed)
            self.finished.append(finished_at)
            self.intervals.append(interval)
            return
        k = self.seeds.index(seed)
        if (finished_at, run_id) > (self.finished[k], self.run_ids[k]):
            self.repeats.append(self.run_ids[k])
            self.values[k], self.run_ids[k], self.finished[k] = value, run_id, finished_at
            self.intervals[k] = interval
        else:
            self.repeats.append(run_id)

    @property
    def interval(self) -> tuple[float, float, int] | None:
        """One run's bootstrap interval; None for several seeds (their spread is the std) or none stored."""
        return self.intervals[0] if len(self.intervals) == 1 else None

    @property
    def n(self) -> int:
        """Distinct seeds averaged."""
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


# A results row: (model, method, shots, variant). `variant` names the options in which runs of the same
# (model, method, shots) on the same task differ, e.g. "decision=score" (empty when they agree): runs that are
# different experiments must not be averaged as if they were seeds of one. Runs on different tasks never share
# a cell, so their differences (max_length for 20NG vs MASSIVE) do not split rows.
RowKey = tuple[str, str, int, str]


@dataclass
class Matrix:
    metric: str
    rows: list[RowKey]
    # task, "task (2)" for the second task definition/data under one name, with " (multi)" last when measured
    # inside a multi-task run
    columns: list[str]
    cells: dict[tuple[RowKey, str], Cell]
    warnings: list[str] = field(default_factory=list)  # e.g. one name used by two different tasks
    rules: dict[str, set[str]] = field(default_factory=dict)  # column -> the rules its results name
    column_tasks: dict[str, str] = field(default_factory=dict)  # column -> the task name its results carry
    # column -> rows whose cell is not significantly different from the column's best (app.compare.mark_ties;
    # empty unless asked for): the exports bold them with the best.
    ties: dict[str, set] = field(default_factory=dict)


def _option_variants(specs: dict[int, tuple[tuple[str, str, int, str], dict]],
                     ignore: Mapping[str, Collection[str]],
                     defaults: Mapping[str, Mapping[str, Any]]) -> dict[int, str]:
    """For each run, the options (of its spec) whose values differ between runs of its (model, method, shots,
    task), leaving out `ignore[method]` (options that change how a run executes, not what it computes). An
    option missing from a spec (the run predates it) counts as `defaults[method][option]`. An option at its
    default is left out of a run's label when the rest of the label still tells the run apart: a constrained
    run reads `decision=constrained`, not `decision=constrained score_end=true`, beside two score runs that
    differ in score_end."""
    by_group: dict[tuple[str, str, int, str], dict[int, dict]] = {}
    for run_id, (group, options) in specs.items():
        by_group.setdefault(group, {})[run_id] = options
    variants: dict[int, str] = {}
    for group, options in by_group.items():
        method = group[1]
        variants.update(_group_labels(options, ignore.get(method, ()), defaults.get(method, {})))
    return variants


def _as_json(value) -> str:
    # options are compared as JSON: a tuple default equals the list a spec stores
    return json.dumps(value, sort_keys=True)


def _group_labels(options: dict[int, dict], skipped: Collection[str], default: Mapping[str, Any]) -> dict[int, str]:
    """The label of each run of one group (run id -> its options): the options in which the group's runs differ,
    each at this run's value, less those at their default that the rest already tells apart."""
    def value(run_id: int, key: str):
        return options[run_id].get(key, default.get(key))

    keys = sorted({key for run_options in options.values() for key in run_options if key not in skipped})
    varying = [key for key in keys if len({_as_json(value(run_id, key)) for run_id in options}) > 1]
    full = {run_id: tuple(_as_json(value(run_id, key)) for key in varying) for run_id in options}
    distinct = set(full.values())
    counts: dict[tuple[int, ...], Counter] = {}  # shared by every variant of the group: each projection once
    labels: dict[tuple[str, ...], str] = {}
    for run_id, variant in full.items():
        if variant not in labels:
            at_default = [key in default and variant[k] == _as_json(default[key]) for k, key in enumerate(varying)]
            kept = _kept_options(variant, at_default, distinct, counts)
            labels[variant] = " ".join(f"{varying[i]}={_short(value(run_id, varying[i]))}" for i in kept)
    return {run_id: labels[variant] for run_id, variant in full.items()}


def _kept_options(variant: tuple[str, ...], at_default: list[bool], distinct: set[tuple[str, ...]],
                  counts: dict[tuple[int, ...], Counter]) -> tuple[int, ...]:
    """The positions of the varying options that name `variant`: all of them, less each one at its default (the
    last first) whose leaving out still tells the variant apart from the group's other variants."""
    kept = tuple(range(len(variant)))
    for k in reversed(range(len(variant))):
        fewer = tuple(i for i in kept if i != k)
        if at_default[k] and _tells_apart(variant, fewer, distinct, counts):
            kept = fewer
    return kept


def _tells_apart(variant: tuple[str, ...], kept: tuple[int, ...], distinct: set[tuple[str, ...]],
                 counts: dict[tuple[int, ...], Counter]) -> bool:
    """Do the options at positions `kept` alone tell `variant` apart from every other variant in `distinct`?
    `counts` caches, per `kept`, how many variants share each projection."""
    if kept not in counts:
        counts[kept] = Counter(tuple(other[i] for i in kept) for other in distinct)
    return bool(kept) and counts[kept][tuple(variant[i] for i in kept)] == 1


def _short(value) -> str:
    return "–" if value is None else value if isinstance(value, str) else json.dumps(value)


def _run_options(spec_json: str) -> dict:
    try:
        return json.loads(spec_json).get("options") or {}
    except (ValueError, AttributeError):
        return {}


def _task_identities(tasks_json: str | None) -> dict[str, str | None]:
    """Task name -> identity of one run's frozen tasks (engine.tasks.identity); empty for a run queued before
    identities were recorded (every task then counts as identity None)."""
    try:
        entries = json.loads(tasks_json) if tasks_json else []
    except ValueError:
        entries = []
    identities: dict[str, str | None] = {}
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and "name" in entry:
            identities.setdefault(entry["name"], entry.get("identity"))
    return identities


def _run_list(run_ids: list[int]) -> str:
    return ",".join(map(str, run_ids[:6])) + (",…" if len(run_ids) > 6 else "")


def _identity_labels(seen: dict[str, dict[str | None, list[int]]]) -> tuple[dict[tuple[str, str | None], str],
                                                                             list[str]]:
    """The column label of each (task name, identity): the name alone when one identity has it, else the name,
    "name (2)", ... in order of first run id; and a warning for each name that several identities share."""
    labels: dict[tuple[str, str | None], str] = {}
    warnings = []
    for name, identities in seen.items():
        names = [name if k == 0 else f"{name} ({k + 1})" for k in range(len(identities))]
        labels.update({(name, identity): label for identity, label in zip(identities, names)})
        if len(identities) > 1:
            groups = [_run_list(run_ids) + (" (queued before task identities were recorded)" if identity is None
                                           else "") for identity, run_ids in identities.items()]
            shown = ", ".join(names[:-1]) + f" and {names[-1]}"
            warnings.append(f"task '{name}' names {len(identities)} different task definitions/data: "
                            f"runs {' vs '.join(groups)}; shown as {shown}")
    return labels, warnings


def _identity_columns(rows: list) -> tuple[dict[tuple[int, str], str], list[str]]:
    """(run id, result task) -> its column: the task's label among the identities sharing its name, with
    " (multi)" when measured inside a multi-task run; and the warnings of _identity_labels."""
    identities_of: dict[int, dict[str, str | None]] = {}
    seen: dict[str, dict[str | None, list[int]]] = {}
    listed: set[tuple[str, int]] = set()  # (task, run id) already in its list: a set, not a scan of the list
    for run_id, run_task, tasks_json, result_task in rows:
        if run_id not in identities_of:
            identities_of[run_id] = _task_identities(tasks_json)
        run_ids = seen.setdefault(result_task, {}).setdefault(identities_of[run_id].get(result_task), [])
        if (result_task, run_id) not in listed:
            listed.add((result_task, run_id))
            run_ids.append(run_id)
    labels, warnings = _identity_labels(seen)
    columns = {}
    for run_id, run_task, _tasks_json, result_task in rows:
        label = labels[(result_task, identities_of[run_id].get(result_task))]
        columns[(run_id, result_task)] = f"{label} (multi)" if "+" in run_task else label
    return columns, warnings


def results_matrix(store: Store, metric: str = "auto", model: str | None = None,
                   method: str | None = None, task: str | None = None,
                   ignore: Mapping[str, Collection[str]] | None = None,
                   defaults: Mapping[str, Mapping[str, Any]] | None = None) -> Matrix:
    """Succeeded runs' results as models × tasks; seeds of the same experiment aggregate (mean ± std over
    distinct seeds: a seed run twice counts once, its newest run, see Cell).

    An experiment is (model, method, shots) plus the options in which its runs differ (see RowKey), so only
    runs that differ in nothing but the seed share a cell. A task measured inside a multi-task run ("a+b")
    gets its own column "a (multi)", so single-task and consolidated numbers sit side by side as in the main
    paper's Table 3. Columns are keyed by the task's identity (its frozen definition and data, see
    engine.tasks.identity), not its name alone: two different tasks sharing a name are shown apart as "name" and
    "name (2)", with a warning in `Matrix.warnings`. `ignore`: per method, options that never split rows (the
    CLI and the TUI pass the catalog's execution-only options, such as the prompt method's batch_size);
    `defaults`: per method, the value of an option that a run's spec lacks (the CLI and the TUI pass the
    catalog's defaults).
    """
    wanted = PRIMARY_METRICS if metric == "auto" else (metric,)
    query = (
        select(RUNS.c.id, RUNS.c.model, RUNS.c.method, RUNS.c.shots, RUNS.c.task.label("run_task"),
               RUNS.c.spec_json, RUNS.c.tasks_json, RESULTS.c.task, RESULTS.c.value, RESULTS.c.rule,
               RUNS.c.seed, RUNS.c.finished_at, RESULTS.c.low, RESULTS.c.high, RESULTS.c.resamples)
        .join(RESULTS, RESULTS.c.run_id == RUNS.c.id)
        .where(RUNS.c.status == RunStatus.succeeded.value, RESULTS.c.metric.in_(wanted))
        .order_by(RUNS.c.id)
    )
    if model:
        query = query.where(RUNS.c.model.contains(model))
    if method:
        query = query.where(RUNS.c.method.contains(method))
    if task:
        query = query.where(RESULTS.c.task.contains(task))
    with store.read() as connection:
        rows = connection.execute(query).all()
    specs = {run_id: ((run_model, run_method, shots, run_task), _run_options(spec_json))
             for run_id, run_model, run_method, shots, run_task, spec_json, *_rest in rows}
    variants = _option_variants(specs, ignore or {}, defaults or {})
    columns_of, warnings = _identity_columns([(row[0], row[4], row[6], row[7]) for row in rows])
    matrix = Matrix(metric=metric, rows=[], columns=[], cells={}, warnings=warnings)
    known_rows: set[RowKey] = set()
    for (run_id, run_model, run_method, shots, _task, _spec, _tasks, result_task, value, rule, seed, finished,
         low, high, resamples) in rows:
        row_key = (run_model, run_method, shots, variants[run_id])
        column = columns_of[(run_id, result_task)]
        if row_key not in known_rows:  # a set beside the list: a scan of matrix.rows per result was quadratic
            known_rows.add(row_key)
            matrix.rows.append(row_key)
        matrix.column_tasks[column] = result_task
        rules = matrix.rules.setdefault(column, set())
        if rule:
            rules.add(rule)
        interval = (low, high, resamples) if resamples else None
        matrix.cells.setdefault((row_key, column), Cell()).add(value, run_id, seed, finished, interval)
    matrix.columns = sorted(matrix.column_tasks)
    return matrix


# ---- TUI: results metric picker, errors run picker ---------------------------------------------

def result_metric_names(store: Store) -> list[str]:
    """Every metric some result row has, sorted (the Results screen's metric picker)."""
    with store.read() as connection:
        return list(connection.execute(select(RESULTS.c.metric).distinct().order_by(RESULTS.c.metric)).scalars())


def results_version(store: Store) -> tuple[int, int]:
    """(number of result rows, highest result id): changes whenever a run adds results or is deleted, so the
    Results screen can poll this cheaply and re-read the matrix only then."""
    with store.read() as connection:
        count, top = connection.execute(select(func.count(), func.coalesce(func.max(RESULTS.c.id), 0))
                                        .select_from(RESULTS)).one()
    return int(count), int(top)


def matrix_version(store: Store) -> tuple[int, int, int]:
    """results_version plus the number of succeeded runs: it changes whenever results_matrix could, including
    when a succeeded run is retried (its results stay stored but leave the matrix). Three index lookups, so an
    open matrix polls this and re-reads only when it moved."""
    with store.read() as connection:
        succeeded = connection.execute(select(func.count()).select_from(RUNS)
                                       .where(RUNS.c.status == RunStatus.succeeded.value)).scalar_one()
    return (*results_version(store), int(succeeded))


def runs_with_predictions(store: Store, limit: int = 500) -> list[dict]:
    """Runs that stored predictions, newest first, with the tasks they have predictions for."""
    query = (
        select(RUNS.c.id, RUNS.c.model, RUNS.c.method, RUNS.c.shots, RUNS.c.seed, RUNS.c.task.label("run_task"),
               PREDICTIONS.c.task)
        .join(PREDICTIONS, PREDICTIONS.c.run_id == RUNS.c.id)
        .group_by(RUNS.c.id, PREDICTIONS.c.task)
        .order_by(RUNS.c.id.desc(), PREDICTIONS.c.task)
    )
    runs: dict[int, dict] = {}
    with store.read() as connection:
        for run_id, model, method, shots, seed, run_task, task in connection.execute(query):
            if run_id not in runs:
                if len(runs) == limit:
                    break
                runs[run_id] = {"id": run_id, "model": model, "method": method, "shots": shots, "seed": seed,
                                "task": run_task, "tasks": []}
            runs[run_id]["tasks"].append(task)
    return list(runs.values())


def runs_with_spec_hashes(store: Store, spec_hashes: Collection[str], statuses: Collection[str]) -> list[dict]:
    """(id, status, spec_hash) of the runs in `statuses` whose spec is one of `spec_hashes` (an indexed lookup:
    queue-time duplicate checks must not read every run of a big store)."""
    if not spec_hashes:
        return []
    with store.read() as connection:
        rows = connection.execute(select(RUNS.c.id, RUNS.c.status, RUNS.c.spec_hash)
                                  .where(RUNS.c.spec_hash.in_(list(spec_hashes)), RUNS.c.status.in_(list(statuses)))
                                  .order_by(RUNS.c.id)).mappings()
        return [dict(row) for row in rows]


def log_chunks(store: Store, run_id: int, after_id: int = 0) -> list[dict]:
    """The pieces of a run's log the store holds (storage.queue.append_log), oldest first, after chunk `after_id`:
    id, attempt, text. Any host reads them, whichever host ran the run."""
    table = RunLogChunk.__table__
    with store.read() as connection:
        rows = connection.execute(select(table.c.id, table.c.attempt, table.c.text)
                                  .where(table.c.run_id == run_id, table.c.id > after_id).order_by(table.c.id))
        return [dict(row) for row in rows.mappings()]


def log_shipped_end(store: Store, run_id: int, attempt: int) -> int | None:
    """Where in its log file the stored log of this attempt ends (a byte offset), or None if none is stored: an
    engine that adopts a running worker goes on from there."""
    table = RunLogChunk.__table__
    with store.read() as connection:
        return connection.execute(select(func.max(table.c.file_end))
                                  .where(table.c.run_id == run_id, table.c.attempt == attempt)).scalar()


def store_id(store: Store) -> str:
    """The store's own id (schema v7), the same from every host whatever URL reaches the store."""
    with store.read() as connection:
        return connection.execute(select(SchemaInfo.__table__.c.store_id)).scalar() or ""


def log_complete(store: Store, run_id: int, attempt: int) -> bool:
    """Whether the engine has stored the whole log of this attempt (its empty last piece: engine.daemon.ship_log)."""
    table = RunLogChunk.__table__
    with store.read() as connection:
        return connection.execute(select(table.c.id).where(table.c.run_id == run_id, table.c.attempt == attempt,
                                                           table.c.text == "").limit(1)).first() is not None


def stored_log_state(store: Store, run_id: int) -> str:
    """"none" (the store holds none of the run's log: a run from before store v7, or not started), "whole" (every
    line of every attempt since the first) or "trimmed" (its oldest lines were dropped to bound it)."""
    from clfbench.storage.queue import LOG_DROPPED_NOTE  # queue imports this module

    table = RunLogChunk.__table__
    with store.read() as connection:
        first = connection.execute(select(table.c.text).where(table.c.run_id == run_id).order_by(table.c.id)
                                   .limit(1)).scalar()
    if first is None:
        return "none"
    return "trimmed" if first.startswith(LOG_DROPPED_NOTE) else "whole"
