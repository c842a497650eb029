"""The `clfbench` command line (Typer).

Import rule: this module and everything it imports at module level stay free of torch, transformers,
datasets and method modules (tests/test_boundaries.py checks it), so commands answer instantly.
Every user error is one line on stderr, `error: ...`, and exit code 1; nothing is half-written.
"""
from __future__ import annotations

# Ctrl-C is one line from the first moment on: app/__init__.py installs the handler before this module is read.
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from clfbench.app import render
from clfbench.engine.methods.catalog import METHODS, execution_options, option_defaults, option_fields
from clfbench.engine.runlog import LauncherNoise
from clfbench.engine.spec import parse_spec
from clfbench.engine.submit import (build_specs, new_runs, parse_option_pairs, refuse_duplicates,
                                     validate_for_queue)
from clfbench.engine.tasks.identity import frozen_tasks, task_for_user
from clfbench.engine.types import ClfbenchError
from clfbench.storage import queries, queue
from clfbench.storage.db import Store, StoreError, open_store, store_failure
from clfbench.storage.models import TERMINAL_STATUSES, RunStatus

app = typer.Typer(
    name="clfbench",
    help="Queue, run and compare text-classification experiments: encoders, prompted and fine-tuned LLMs.",
    no_args_is_help=True,
    add_completion=False,
)
engine_app = typer.Typer(help="Start, stop or inspect the engine that runs queued experiments.")
app.add_typer(engine_app, name="engine")
# Piped output (grep, a file) is not wrapped at rich's 80-column default: each run stays on one line.
console = Console() if sys.stdout.isatty() else Console(width=int(os.environ.get("COLUMNS") or 200))


class State:
    db: str | None = None


state = State()


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def store() -> Store:
    try:
        return open_store(state.db)
    except StoreError as error:
        fail(str(error))


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.callback()
def main_options(
    db: Optional[str] = typer.Option(None, "--db", help="store URL (default: CLFBENCH_DB, else SQLite in CLFBENCH_HOME)"),
) -> None:
    state.db = db


# ---- queue -------------------------------------------------------------------------------------

def refuse_what_cannot_fit(specs, gpu_memory: float | None) -> None:
    """A run on GPUs whose model's shapes are at hand must fit them (engine.memory_plan), else nothing of the sweep
    is queued; the one line says what would fit. CPU runs and hub models without a local config are not planned."""
    from clfbench.engine import memory_plan

    gpu_specs = [spec for spec in specs if spec.gpus]
    if not gpu_specs:
        return
    memory = gpu_memory or memory_plan.local_gpu_memory_gb() or memory_plan.DEFAULT_GPU_GB
    for spec in gpu_specs:
        try:
            plan, shape = memory_plan.plan_spec(spec, memory)
        except ClfbenchError:
            continue  # no shapes at hand to plan from: the worker finds out
        if not plan.fits:
            fail(memory_plan.refusal(spec, plan, shape) + "; nothing queued (`clfbench plan` shows the parts)")


def spec_flags(method, model, task, shots, seed, gpus, nproc, threads, data_dir, name, host, gpu_type) -> dict:
    """The spec fields of queue's command line, which plan takes as well (build_specs merges them over a file)."""
    return {"method": method, "model": model, "task": task, "shots": shots, "seed": seed, "gpus": gpus,
            "nproc": nproc, "threads": threads, "data_dir": data_dir, "name": name, "host": host,
            "gpu_type": gpu_type}


@app.command("queue")
def queue_command(
    spec_file: Optional[Path] = typer.Argument(None, help="YAML spec file; lists in it expand to a sweep"),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="method (see `clfbench methods`)"),
    model: list[str] = typer.Option([], "--model", help="model alias, hub id or folder; repeat to sweep"),
    task: list[str] = typer.Option([], "--task", "-t", help="task ('a+b' = multi-task); repeat to sweep"),
    shots: list[int] = typer.Option([], "--shots", help="in-context examples; repeat to sweep"),
    seed: list[int] = typer.Option([], "--seed", help="seed; repeat to sweep"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs per run (default: 1 on a GPU box, else CPU)"),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="processes per run on CPU (torchrun)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads per run (default: the cores free at "
                                                                 "launch)"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="dataset folder (else CLFBENCH_DATA, else the hub)"),
    option: list[str] = typer.Option([], "--option", "-o", help="method option KEY=VALUE (a,b sweeps)"),
    name: Optional[str] = typer.Option(None, "--name", help="label shown in lists"),
    priority: int = typer.Option(0, "--priority", help="higher runs first"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and show the runs, queue nothing"),
    as_json: bool = typer.Option(False, "--json", help="print the queued runs as JSON"),
    allow_duplicate: bool = typer.Option(False, "--allow-duplicate",
                                         help="queue a spec even when a queued, running or succeeded run has it"),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="GB per GPU to plan a GPU run for "
                                                                          "(default: this host's, else 80)"),
    host: Optional[str] = typer.Option(None, "--host", help="run only on this host (`clfbench engine status` "
                                                            "lists them)"),
    gpu_type: Optional[str] = typer.Option(None, "--gpu-type", help="run only on GPUs whose name contains this "
                                                                    "(e.g. H100)"),
) -> None:
    """Validate a spec (file and/or flags) and queue its runs; a sweep is queued whole or not at all. A spec
    identical to a queued, running or succeeded run is refused (exit 1) unless --allow-duplicate."""
    flags = spec_flags(method, model, task, shots, seed, gpus, nproc, threads, data_dir, name, host, gpu_type)
    try:
        specs = build_specs(spec_file, flags, parse_option_pairs(option))
    except ClfbenchError as error:
        fail(str(error))
    if dry_run:
        if as_json:
            print_json([json.loads(s.canonical_json()) for s in specs])
        else:
            for s in specs:
                typer.echo(f"would queue: {s.method} {s.model} {s.task} shots={s.shots} seed={s.seed}")
        return
    refuse_what_cannot_fit(specs, gpu_memory)
    run_store = store()
    if not allow_duplicate:  # a command line cannot ask, so it refuses and says how to force it
        try:
            refuse_duplicates(run_store, specs)
        except ClfbenchError as error:
            fail(str(error))
    ids = queue.enqueue(run_store, new_runs(specs, priority))
    if as_json:
        print_json([{"id": i, **json.loads(spec.canonical_json())} for i, spec in zip(ids, specs)])
    else:
        typer.echo(f"queued {len(ids)} run(s): {', '.join(map(str, ids))}")


# ---- lists and details ----------------------------------------------------------------------------

@app.command("ls")
def list_command(
    status: Optional[str] = typer.Option(None, "--status", help="only runs with this status"),
    limit: int = typer.Option(50, "--limit", help="most recent N runs (0: all)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List runs, newest first."""
    statuses = [s.value for s in RunStatus]
    if status is not None and status not in statuses:
        fail(f"unknown status '{status}' (choose from {', '.join(statuses)})")
    s = store()
    runs = queries.list_runs(s, status=status, limit=limit or None)
    if as_json:
        print_json(runs)
        return
    now = time.time()
    mark_dead_engines(s, runs, now)
    columns = ["id", "status", "method", "model", "task"]
    # Columns that say nothing for these runs (all zero-shot, all seed 0, no GPUs) are left out,
    # so the list fits 80 columns.
    columns += [c for c, used in (("shots", any(r["shots"] for r in runs)), ("seed", any(r["seed"] for r in runs)),
                                  ("gpus", any(r["gpus_assigned"] for r in runs))) if used]
    columns += ["progress", "age", "time"]
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1))
    for column in columns:
        wraps = column in ("method", "model", "task")  # long names wrap instead of losing their ends
        table.add_column(column, overflow="fold" if wraps else "ellipsis", no_wrap=not wraps)
    for r in runs:
        values = {"id": str(r["id"]), "status": r["status"], "method": r["method"], "model": r["model"],
                  "task": r["task"], "shots": str(r["shots"]), "seed": str(r["seed"]),
                  "gpus": r["gpus_assigned"] or "", "progress": render.progress_with_eta(r, now),
                  "age": render.age(r["created_at"], now),
                  "time": render.duration(r["started_at"], r["finished_at"], now)}
        table.add_row(*(values[c] for c in columns))
    console.print(table)


def mark_dead_engines(s: Store, runs: list[dict], now: float) -> None:
    """Set `engine_alive` on the running runs: whether the engine that claimed each still beats (the progress
    column says `engine gone` instead of a time left that no process is working towards)."""
    if not any(r["status"] == RunStatus.running.value for r in runs):
        return
    alive = {engine["id"] for engine in queries.live_engines(s, stale_after_s=render.STALE_AFTER_S, now=now)}
    for r in runs:
        if r["status"] == RunStatus.running.value and r.get("engine_id") is not None:
            r["engine_alive"] = r["engine_id"] in alive


def get_run_or_fail(s: Store, run_id: int) -> dict:
    run = queries.get_run(s, run_id)
    if run is None:
        fail(f"no run {run_id}")
    return run


@app.command("show")
def show_command(run_id: int = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one run: its spec, state, error and results."""
    s = store()
    run = get_run_or_fail(s, run_id)
    results = queries.run_results(s, run_id)
    rules = queries.run_result_rules(s, run_id)
    intervals = queries.run_result_intervals(s, run_id)
    tasks = frozen_tasks(run.pop("tasks_json"))
    if as_json:
        print_json({**run, "spec": json.loads(run["spec_json"]), "tasks": tasks, "results": results,
                    "result_rules": rules,
                    "result_intervals": {task: {metric: {"low": low, "high": high, "resamples": resamples}
                                                for metric, (low, high, resamples) in named.items()}
                                         for task, named in intervals.items()}})
        return
    for key in ("id", "name", "status", "method", "model", "task", "shots", "seed", "attempt", "host", "pid",
                "gpus_assigned", "code_version", "spec_hash", "log_path", "output_dir"):
        if run[key] not in (None, ""):
            typer.echo(f"{key:>14}: {run[key]}")
    now = time.time()
    mark_dead_engines(s, [run], now)
    typer.echo(f"{'progress':>14}: {render.progress_with_eta(run, now) or render.progress_text(run) or '–'}")
    if run["status"] == RunStatus.running.value and run.get("phase"):
        typer.echo(f"{'phase':>14}: {run['phase']}" + (f" {run['phase_step'] or 0}/{run['phase_total']}"
                                                       if run.get("phase_total") else ""))
    if run.get("attempt_note"):
        typer.echo(f"{'retries':>14}: {run['attempt_note']}")
    typer.echo(f"{'time':>14}: {render.duration(run['started_at'], run['finished_at'])}")
    typer.echo(f"{'spec':>14}: {run['spec_json']}")
    for line in frozen_task_lines(tasks):
        typer.echo(line)
    if run["error"]:
        typer.echo(f"{'error':>14}: {run['error']}")
    for task, values in results.items():
        named, ends = rules.get(task, {}), intervals.get(task, {})
        typer.echo(f"results {task}: " + ", ".join(
            f"{k}={v:.4g}" + (f" [{ends[k][0]:.4g}, {ends[k][1]:.4g}]" if k in ends else "")
            + (f" ({named[k]})" if k in named else "") for k, v in sorted(values.items())))
    if intervals:
        typer.echo(f"{'':>14}  [low, high]: 95% bootstrap interval over the test examples "
                   f"({next(iter(next(iter(intervals.values())).values()))[2]:,} resamples)")


def file_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def frozen_task_lines(entries: list[dict]) -> list[str]:
    """Per task frozen at queue time: where its definition came from, and each data file with its short sha256
    and size (or the hub dataset); nothing for a run queued before tasks were frozen."""
    lines = []
    for entry in entries:
        source = entry["source"] + (f" (sha256 {entry['yaml_sha256'][:12]})" if entry.get("yaml_sha256") else "")
        lines.append(f"{'task':>14}: {entry['name']} · {source} · identity {entry['identity']}")
        for split, items in entry["data"].items():
            for item in items:
                where = (f"{item['path']}  sha256 {item['sha256'][:12]}  {file_size(item['bytes'])}" if "path" in item
                         else f"hub {item['hub']}" + (f" ({item['config']})" if item.get("config") else "")
                         + f" [{item.get('split')}] revision {item.get('revision') or 'latest (not pinned)'}")
                lines.append(f"{split:>16}: {where}")
    return lines


@app.command("logs")
def logs_command(
    run_id: int = typer.Argument(...),
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the run ends"),
    raw: bool = typer.Option(False, "--raw", help="every line, torchrun's own tracebacks included"),
) -> None:
    """Print a run's log (stdout and stderr of every rank, every attempt; torchrun's own tracebacks left out), from
    any host: the copy its engines keep in the store, or its log file where that holds more (render.log_source)."""
    s = store()
    run = get_run_or_fail(s, run_id)
    noise = LauncherNoise()
    shown = (lambda text: text) if raw else noise.feed
    local = render.log_source(s, run)
    if local is not None:
        follow_log_file(s, run_id, Path(local), follow, shown)
    elif not follow_stored_log(s, run_id, follow, shown):
        where = f" (its file {run['log_path']} is on {run['host']})" if run["log_path"] else ""
        fail(f"run {run_id} has no log yet (status {run['status']}){where}")
    if not raw:
        sys.stdout.write(noise.finish())


STORED_LOG_WAIT_S = 30.0  # logs -f: how long after a run's end to wait for its engine to store the log's end


def follow_log_file(s, run_id: int, path: Path, follow: bool, shown) -> None:
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read()
            if chunk:
                sys.stdout.write(shown(chunk.decode("utf-8", errors="replace")))
                sys.stdout.flush()
            if not follow:
                break
            if queries.get_run(s, run_id)["status"] in TERMINAL_STATUSES:
                rest = handle.read()
                if rest:
                    sys.stdout.write(shown(rest.decode("utf-8", errors="replace")))
                break
            time.sleep(0.5)


def follow_stored_log(s, run_id: int, follow: bool, shown) -> bool:
    """Print the run's log as the store holds it and, with `follow`, what its engine adds until the run has ended
    and its engine has stored the last attempt's log whole (the worker may record the end first); an engine that
    is gone stores no more, so that wait is bounded. False when the store holds none of it."""
    last_id, printed, ended_at = 0, False, None
    while True:
        run = queries.get_run(s, run_id)  # read before the chunks: none is missed
        whole = queries.log_complete(s, run_id, run["attempt"])
        chunks = queries.log_chunks(s, run_id, after_id=last_id)
        for chunk in chunks:
            sys.stdout.write(shown(chunk["text"]))
        if chunks:
            sys.stdout.flush()
            last_id, printed = chunks[-1]["id"], True
        if run["status"] in TERMINAL_STATUSES and ended_at is None:
            ended_at = time.monotonic()
        if not follow or whole or (ended_at is not None and time.monotonic() - ended_at > STORED_LOG_WAIT_S):
            return printed
        time.sleep(0.5)


@app.command("cancel")
def cancel_command(run_ids: list[int] = typer.Argument(..., help="run ids")) -> None:
    """Cancel runs: queued ones at once; running ones are stopped by their engine (SIGTERM, then SIGKILL)."""
    s = store()
    for run_id in run_ids:
        try:
            outcome = queue.request_cancel(s, run_id)
        except KeyError:
            fail(f"no run {run_id}")
        messages = {"cancelled": "cancelled", "requested": "cancel requested (its engine stops it)"}
        typer.echo(f"run {run_id}: {messages.get(outcome, f'nothing to cancel (status {outcome})')}")


@app.command("retry")
def retry_command(run_ids: list[int] = typer.Argument(..., help="run ids")) -> None:
    """Put finished runs (failed, cancelled, interrupted, succeeded) back in the queue."""
    s = store()
    refused = 0
    for run_id in run_ids:
        run = get_run_or_fail(s, run_id)
        if queue.requeue(s, run_id):
            typer.echo(f"run {run_id}: queued again")
        else:
            typer.echo(f"run {run_id}: not retried (status {run['status']})")
            refused += 1
    if refused:  # a script must see that not every run it named was retried
        raise typer.Exit(1)


@app.command("rm")
def remove_command(run_ids: list[int] = typer.Argument(..., help="run ids"),
                   yes: bool = typer.Option(False, "--yes", "-y", help="do not ask")) -> None:
    """Delete runs that are not running, with their metrics, predictions and results."""
    s = store()
    for run_id in run_ids:
        get_run_or_fail(s, run_id)
    if not yes and not typer.confirm(f"delete {len(run_ids)} run(s) and everything they recorded?"):
        raise typer.Exit(1)
    from clfbench.engine.daemon import delete_run

    refused = 0
    for run_id in run_ids:
        deleted, left = delete_run(s.url, s, run_id)
        typer.echo(f"run {run_id}: {'deleted' if deleted else 'not deleted (running)'}")
        if left:
            typer.echo(f"warning: run {run_id}: {left}", err=True)
        refused += not deleted
    if refused:  # a script must see that not every run it named was deleted
        raise typer.Exit(1)


@app.command("results")
def results_command(
    metric: str = typer.Option("auto", "--metric", help="auto (accuracy / slot F1), or any result metric"),
    model: Optional[str] = typer.Option(None, "--model", help="only models containing this text"),
    method: Optional[str] = typer.Option(None, "--method", help="only methods containing this text"),
    task: Optional[str] = typer.Option(None, "--task", help="only tasks containing this text"),
    fmt: str = typer.Option("table", "--format", "-f", help="table, md, csv, latex or json"),
    as_json: bool = typer.Option(False, "--json", help="same as --format json"),
    fraction: bool = typer.Option(False, "--fraction", help="accuracy, F1 and rates as fractions (0.775), not "
                                                            "percent (77.5), in every format"),
    significance: bool = typer.Option(False, "--significance", "-s",
                                      help="bold also the cells not significantly worse than their column's best "
                                           "(paired tests on the shared test examples, Holm-corrected)"),
    alpha: float = typer.Option(0.05, "--alpha", help="significance level for --significance"),
) -> None:
    """The results matrix: model × method × shots rows, task columns, mean ± std over distinct seeds and their
    number n (in %), the same numbers in every format; a one-seed cell's ± is half its 95% bootstrap interval."""
    fmt = "json" if as_json else fmt
    if fmt not in render.FORMATS:
        fail(f"unknown format '{fmt}' (choose from {', '.join(render.FORMATS)})")
    if not 0 < alpha < 1:
        fail(f"--alpha must be between 0 and 1, got {alpha}")
    s = store()
    matrix = queries.results_matrix(s, metric=metric, model=model, method=method, task=task,
                                    ignore=execution_options(), defaults=option_defaults())
    notes = []
    if significance and matrix.rows:
        from clfbench.app.compare import mark_ties

        matrix = render.applicable_cells(matrix)
        notes.append(mark_ties(s, matrix, render.best_per_column(matrix), alpha))
    if fmt != "table":
        typer.echo(render.render_matrix(matrix, fmt, fraction=fraction, extra_notes=notes))
        for warning in matrix.warnings:  # on stderr: a csv/latex/json body stays a clean file
            typer.echo(f"warning: {warning}", err=True)
        return
    if not matrix.rows:
        typer.echo(render.NO_RESULTS)
        return
    best = render.best_per_column(matrix)
    percent = render.is_percent_metric(metric) and not fraction
    show_n = render.shared_n(matrix) is None  # else the cells note says n once
    table = Table(title=f"metric: {metric}{' (%)' if percent else ''}", header_style="bold")
    table.add_column("model · method · shots")
    for column in matrix.columns:
        table.add_column(column, justify="right")
    for row in matrix.rows:
        cells = []
        for column in matrix.columns:
            text = render.cell_text(matrix, row, column, percent, show_n)
            cells.append(f"[bold green]{text}[/]" if render.is_marked(matrix, best, row, column) else text)
        table.add_row(render.row_label(row), *cells)
    console.print(table)
    console.print(render.cells_note(matrix, percent), style="dim", markup=False, highlight=False)
    for note in render.rule_notes(matrix) + notes:
        console.print(note, style="yellow" if note.startswith("warning:") else "dim", markup=False, highlight=False)
    for warning in matrix.warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)


@app.command("errors")
def errors_command(
    run_id: int = typer.Argument(...),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="task of the run (default: its first)"),
    label: Optional[str] = typer.Option(None, "--label", "-l", help="gold label whose misclassified examples to list"),
    limit: int = typer.Option(20, "--limit", help="examples to show (0: all)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per-label precision/recall/F1 of a run's task, or the misclassified examples of one label."""
    from clfbench.app.error_analysis import error_report, examples_for

    s = store()
    run = get_run_or_fail(s, run_id)
    # Predictions are stored under the task's name; a user may give it as a name or as its YAML path.
    task = task_for_user(frozen_tasks(run["tasks_json"]), run["task"].split("+"), task)
    rows = queries.predictions(s, run_id, task)
    if not rows:
        fail(f"run {run_id} has no predictions for task '{task}' (tasks: {run['task']}, status {run['status']})")
    analysis = error_report(rows)
    report = analysis.report
    if label is None:
        if as_json:
            print_json(report)
            return
        table = Table(title=f"run {run_id} · {task} · accuracy {report['accuracy']:.1%}"
                      + (" (per tag)" if analysis.token_task else ""), header_style="bold")
        for column in ("label", "precision", "recall", "f1", "support"):
            table.add_column(column, justify="left" if column == "label" else "right")
        for name, values in sorted(report["per_label"].items(), key=lambda item: item[1]["f1"]):
            table.add_row(name, f"{values['precision']:.3f}", f"{values['recall']:.3f}", f"{values['f1']:.3f}",
                          str(values["support"]))
        console.print(table)
        return
    if label not in analysis.per_label:
        from clfbench.app.error_analysis import absent_label_message, task_labels

        entry = next((e for e in frozen_tasks(run["tasks_json"]) if e.get("name") == task), None)
        data_dir = json.loads(run["spec_json"] or "{}").get("data_dir")
        fail(f"run {run_id}: " + absent_label_message(label, task, analysis, task_labels(entry, data_dir)))
    wrong = examples_for(analysis, label)
    shown = wrong[:limit] if limit else wrong
    if as_json:
        print_json(shown)
        return
    typer.echo(f"{len(wrong)} misclassified example(s) with gold '{label}' in run {run_id} task {task}:")
    for r in shown:
        typer.echo(f"- [{r['example_id']}] {r['text'][:200]!r}")
        typer.echo(f"    gold: {r['gold']}   predicted: {r['predicted']}   parse: {r['parse_status']}")
        if r["raw_output"]:
            typer.echo(f"    raw output: {r['raw_output'][:200]!r}")


@app.command("plot")
def plot_command(
    task: str = typer.Option(..., "--task", "-t", help="the results column to plot (as `clfbench results` names it)"),
    x: str = typer.Option("wall_time_s", "--x", help="the cost axis: wall_time_s, gpu_seconds, peak_rss_gb, "
                                                     "test_examples_per_s, cost_usd, ... (any result metric)"),
    y: str = typer.Option("auto", "--y", help="the quality axis: auto (accuracy / slot F1), or any result metric"),
    model: Optional[str] = typer.Option(None, "--model", help="only models containing this text"),
    method: Optional[str] = typer.Option(None, "--method", help="only methods containing this text"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write an SVG here instead of drawing"),
) -> None:
    """Quality against cost on one task, one point per results row, the Pareto front marked: in the terminal, or
    as SVG (-o plot.svg) for a paper."""
    from clfbench.app.plot import points_of, quality_name, svg_plot, terminal_plot

    s = store()
    matrices = [queries.results_matrix(s, metric=metric, model=model, method=method,
                                       ignore=execution_options(), defaults=option_defaults()) for metric in (y, x)]
    quality, cost = matrices
    if task not in quality.columns:
        fail(f"no results column '{task}' for {y}" + (f" (columns: {', '.join(quality.columns)})"
                                                      if quality.columns else " (no results yet)"))
    points = points_of(quality, cost, task)
    if not points:
        fail(f"no row has both {y} and {x} on {task}; `clfbench results --metric {x}` shows which runs record {x}")
    y_name = quality_name(s, quality, task)
    if output is None:
        typer.echo(terminal_plot(points, x, y_name, width=min(console.width, 100)))
        return
    try:
        output.write_text(svg_plot(points, x, y_name, title=f"{task}: {y_name} against {x}"))
    except OSError as error:
        fail(f"cannot write {output}: {error.strerror or error}")
    front = sum(p.on_front for p in points)
    typer.echo(f"wrote {output}: {len(points)} points, {front} on the Pareto front")


@app.command("report")
def report_command(
    output: Path = typer.Option(..., "--output", "-o", help="report.md (plots as SVG files beside it) or report.html"),
    model: Optional[str] = typer.Option(None, "--model", help="only models containing this text"),
    method: Optional[str] = typer.Option(None, "--method", help="only methods containing this text"),
    task: Optional[str] = typer.Option(None, "--task", help="only tasks containing this text"),
    runs: Optional[str] = typer.Option(None, "--runs", help="runs to detail, e.g. 3,5 (default: each column's best)"),
    alpha: float = typer.Option(0.05, "--alpha", help="significance level of the matrix's marks"),
) -> None:
    """A report for a paper or a pull request: the matrix with intervals and significance marks, quality against
    cost with the Pareto front, and the chosen runs' specs, code versions, per-label scores and confusions."""
    from clfbench.app.report import COST_AXES, build_report, write_html, write_markdown

    if output.suffix not in (".md", ".html"):
        fail(f"--output must end in .md or .html, got {output.name}")
    if not 0 < alpha < 1:
        fail(f"--alpha must be between 0 and 1, got {alpha}")
    if not output.parent.is_dir():
        fail(f"cannot write {output}: {output.parent} is not a folder")
    s = store()
    filters = dict(model=model, method=method, task=task, ignore=execution_options(), defaults=option_defaults())
    quality = queries.results_matrix(s, **filters)
    if not quality.rows:
        fail("no results to report" + (" with these filters" if model or method or task else ""))
    chosen = _report_runs(s, runs, quality)
    costs = {axis: queries.results_matrix(s, metric=axis, **filters) for axis in COST_AXES}
    blocks = build_report(s, quality, costs, chosen, alpha)
    try:
        written = (write_html if output.suffix == ".html" else write_markdown)(blocks, output)
    except OSError as error:
        fail(f"cannot write {output}: {error.strerror or error}")
    typer.echo(f"wrote {', '.join(str(path) for path in written)} (runs detailed: "
               f"{', '.join(map(str, chosen))})")


def _report_runs(s: Store, runs: Optional[str], quality) -> list[int]:
    """The runs a report details: those given, else each column's best run."""
    if not runs:
        return sorted({quality.cells[(row, column)].run_ids[0]
                       for column, row in render.best_per_column(quality).items()})
    try:
        chosen = [int(part) for part in runs.split(",") if part.strip()]
    except ValueError:
        fail(f"--runs takes run ids separated by commas, e.g. 3,5; got '{runs}'")
    for run_id in chosen:
        get_run_or_fail(s, run_id)
    return chosen


@app.command("compare")
def compare_command(
    run_a: int = typer.Argument(..., help="run id"),
    run_b: int = typer.Argument(..., help="run id"),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="one task both runs have (default: every one)"),
    alpha: float = typer.Option(0.05, "--alpha", help="significance level of the verdict"),
    resamples: int = typer.Option(1000, "--resamples", help="bootstrap resamples (paired over the examples)"),
    examples: int = typer.Option(5, "--examples", help="examples to list that only one run got right, per side"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Is run A really better than run B? Paired tests on the test examples both answered: McNemar's exact test
    for accuracy, the paired bootstrap for F1, with the difference's 95% interval and the p-value."""
    from clfbench.app.compare import compare_task, shared_tasks

    if not 0 < alpha < 1:
        fail(f"--alpha must be between 0 and 1, got {alpha}")
    if resamples < 100:
        fail(f"--resamples must be at least 100 (a p-value from fewer is too coarse), got {resamples}")
    s = store()
    first, second = get_run_or_fail(s, run_a), get_run_or_fail(s, run_b)
    for run in (first, second):
        if run["status"] != RunStatus.succeeded.value:
            fail(f"run {run['id']} is {run['status']}: only succeeded runs have predictions to compare")
    tasks = shared_tasks(first, second)
    if task is not None:
        tasks = [t for t in tasks if t == task]
    if not tasks:
        fail(f"runs {run_a} and {run_b} have no task in common" + (f" named '{task}'" if task else "")
             + f" (run {run_a}: {first['task']}; run {run_b}: {second['task']})")
    try:
        comparisons = [compare_task(s, first, second, name, resamples, examples=examples) for name in tasks]
    except ClfbenchError as error:
        fail(str(error))
    if as_json:
        import dataclasses

        print_json({"a": run_a, "b": run_b, "alpha": alpha, "tasks": [dataclasses.asdict(c) for c in comparisons]})
        return
    names = {run["id"]: render.run_label(run["model"], run["method"], run["shots"]) + f" · {run['task']}"
             for run in (first, second)}
    typer.echo(f"A = run {run_a} ({names[run_a]})\nB = run {run_b} ({names[run_b]})")
    for comparison in comparisons:
        _print_comparison(comparison, alpha)


def _print_comparison(c, alpha: float) -> None:
    from clfbench.app.compare import METRIC_COLUMNS, metric_rows, shared_note, verdict

    typer.echo("")
    typer.echo(shared_note(c))
    table = Table(header_style="bold", box=None, pad_edge=False)
    for column in METRIC_COLUMNS:
        table.add_column(column, justify="left" if column in ("metric", "test") else "right")
    for row in metric_rows(c):
        table.add_row(*row)
    console.print(table)
    agreement = c.agreement
    typer.echo(f"agreement ({'every tag right' if c.kind == 'token' else 'label right'}): both "
               f"{agreement['both right']:,} · only A {agreement['only a right']:,} · only B "
               f"{agreement['only b right']:,} · both wrong {agreement['both wrong']:,}")
    for m in c.metrics:
        typer.echo(verdict(m.metric, m.difference, alpha))
    if c.labels_note:
        typer.echo(f"note: {c.labels_note}")
    if c.per_label:
        typer.echo("per-label F1, largest differences first: " + "; ".join(
            f"{label} {fa * 100:.0f} vs {fb * 100:.0f} (n={n})" for label, fa, fb, n in c.per_label[:8]))
    _print_disagreements(c.disagreements)


def _print_disagreements(disagreements: list[dict]) -> None:
    for side in ("a", "b"):
        listed = [d for d in disagreements if d["right"] == side]
        if listed:
            typer.echo(f"only {side.upper()} right, e.g.:")
        for d in listed:
            typer.echo(f"- [{d['example_id']}] {d['text'][:120]!r}")
            typer.echo(f"    gold: {d['gold']}   A: {d['a']}   B: {d['b']}")
            for who in ("a", "b"):
                raw = d[f"{who}_raw"]
                if raw and raw != d[who]:
                    typer.echo(f"    {who.upper()} raw: {raw[:120]!r}")


@app.command("plan")
def plan_command(
    spec_file: Optional[Path] = typer.Argument(None, help="YAML spec file (as for queue)"),
    # queue's flags, so that a queue command line plans as it is (those that do not size memory are accepted)
    method: Optional[str] = typer.Option(None, "--method", "-m"),
    model: list[str] = typer.Option([], "--model", help="repeat to plan a sweep"),
    task: list[str] = typer.Option([], "--task", "-t"),
    shots: list[int] = typer.Option([], "--shots"),
    seed: list[int] = typer.Option([], "--seed"),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs per run (default 1)"),
    nproc: Optional[int] = typer.Option(None, "--nproc"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir"),
    option: list[str] = typer.Option([], "--option", "-o", help="method option KEY=VALUE"),
    name: Optional[str] = typer.Option(None, "--name"),
    priority: int = typer.Option(0, "--priority"),
    host: Optional[str] = typer.Option(None, "--host"),
    gpu_type: Optional[str] = typer.Option(None, "--gpu-type"),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="GB per GPU (default: this host's "
                                                                          "smallest GPU, else 80)"),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="tokens per example (prompting assumes 4,096; "
                                                                "fine-tuning: its max_length)"),
) -> None:
    """Will a run fit? GPU memory per GPU from the model's config.json alone (weights, optimizer state,
    activations, KV cache); exit 0 when every run fits, else 1 with one error line that says what would fit."""
    from clfbench.engine import memory_plan

    flags = spec_flags(method, model, task, shots, seed, gpus, nproc, threads, data_dir, name, host, gpu_type)
    del priority  # accepted so that a queue command line plans unchanged; it does not size memory
    try:
        specs = build_specs(spec_file, flags, parse_option_pairs(option))
        memory = gpu_memory or memory_plan.local_gpu_memory_gb() or memory_plan.DEFAULT_GPU_GB
        plans = [(spec, *memory_plan.plan_spec(spec, memory, tokens)) for spec in specs]
    except ClfbenchError as error:
        fail(str(error))
    for spec, plan, shape in plans:
        typer.echo(f"{spec.method} · {spec.model} ({memory_plan.parameter_count(shape) / 1e9:.2f}B parameters) "
                   f"· {spec.task}")
        typer.echo("\n".join(memory_plan.plan_lines(plan)))
    refused = [(spec, plan, shape) for spec, plan, shape in plans if not plan.fits]
    if refused:
        fail(memory_plan.refusal(*refused[0], tokens) + (f" (and {len(refused) - 1} more)" if len(refused) > 1
                                                         else ""))


@app.command("calibration")
def calibration_command(
    run_id: int = typer.Argument(...),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="task of the run (default: its first)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="also write the reliability diagram as SVG"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """How far a run's confidence can be trusted: expected calibration error (15 equal-width bins, with its 95%
    bootstrap interval) and the reliability diagram, from the probabilities the method gave its answers."""
    from clfbench.app.calibration import calibration, diagram_lines, reliability_svg, summary_line

    s = store()
    run = get_run_or_fail(s, run_id)
    task = task_for_user(frozen_tasks(run["tasks_json"]), run["task"].split("+"), task)
    if not queries.predictions(s, run_id, task):
        fail(f"run {run_id} has no predictions for task '{task}' (tasks: {run['task']}, status {run['status']})")
    result = calibration(s, run_id, task)
    if result is None:
        fail(f"run {run_id} ({run['method']}) stored no confidences for '{task}': calibration needs the "
             f"probability of each answer (encoder heads, ls-llama, llmembed, tfidf; runs since schema v6)")
    if as_json:
        import dataclasses

        print_json(dataclasses.asdict(result))
    else:
        typer.echo(summary_line(result))
        typer.echo("\n".join(diagram_lines(result)))
    if output is not None:
        try:
            title = f"run {run_id} · {render.run_label(run['model'], run['method'], run['shots'])} · {task}"
            output.write_text(reliability_svg(result, title))
        except OSError as error:
            fail(f"cannot write {output}: {error.strerror or error}")
        if not as_json:
            typer.echo(f"wrote {output}")


@app.command("rescore")
def rescore_command(
    run_ids: list[int] = typer.Argument(None, help="run ids (default: every succeeded run)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would change, write nothing"),
) -> None:
    """Recompute stored runs' slot F1 and exact match under their task's slot rule, from their predictions, and
    add the 95% bootstrap intervals that results stored before them lack.

    Runs scored before slot rules existed were scored under "conlleval"; built-in massive-slots now uses
    MASSIVE's official rule. Nothing is trained again; only the rule-dependent results change.
    """
    from clfbench.engine.rescore import rescore_run

    s = store()
    if not run_ids:
        run_ids = [r["id"] for r in queries.list_runs(s, status="succeeded")]
    changed = failed = 0
    for run_id in sorted(run_ids):
        try:
            changes = rescore_run(s, run_id, write=not dry_run)
        except ClfbenchError as error:  # one run that cannot be rescored does not stop the others
            typer.echo(f"run {run_id}: {error}", err=True)
            failed += 1
            continue
        for c in changes:
            if c.interval is not None:
                low, high, resamples = c.interval
                typer.echo(f"run {run_id} {c.task} {c.metric}: {c.value:.4f}, 95% interval [{low:.4f}, {high:.4f}] "
                           f"added ({resamples} bootstrap resamples)")
                continue
            before = "–" if c.old_value is None else f"{c.old_value:.4f} ({c.old_rule or 'no rule'})"
            typer.echo(f"run {run_id} {c.task} {c.metric}: {before} -> {c.value:.4f} ({c.rule})")
        changed += bool(changes)
    verb = "would change" if dry_run else "changed"
    typer.echo(f"{verb} {changed} of {len(run_ids)} run(s)" + (f"; {failed} could not be rescored" if failed else ""))
    if failed:
        raise typer.Exit(1)


@app.command("tasks")
def tasks_command(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the tasks: built-in ones and your own (YAML files in CLFBENCH_HOME/tasks); a file there that cannot
    be used is skipped and named with its error (on stderr; in --json, under "broken")."""
    from clfbench.engine.tasks import broken_definitions, list_tasks

    try:
        tasks = list_tasks()
        broken = broken_definitions()
    except ClfbenchError as error:
        fail(str(error))
    if as_json:
        print_json({"tasks": [{"name": t.name, "kind": t.kind, "dataset": t.dataset, "description": t.description,
                               "source": t.source_summary()} for t in tasks],
                    "broken": [{"path": str(b.path), "name": b.name, "dataset": b.is_dataset, "error": b.error}
                               for b in broken]})
        return
    table = Table(box=None, header_style="bold")
    for column in ("task", "kind", "labels are", "source"):
        table.add_column(column)
    for t in tasks:
        table.add_row(t.name, t.kind, t.description, t.source_summary())
    console.print(table)
    for b in broken:  # skipped, not fatal: the other tasks stay usable
        typer.echo(f"skipped (broken): {b.error}", err=True)


@app.command("models")
def models_command(as_json: bool = typer.Option(False, "--json")) -> None:
    """List model aliases and whether their weights are available locally."""
    from clfbench.engine.models import list_models

    models = list_models()
    if as_json:
        print_json(models)
        return
    # Fits 80 columns: the short fields whole, the description cut to what is left. Hub ids and where each model
    # loads from are in --json. The install command of a model missing here follows the table, split with shell
    # line continuations (a command cut or wrapped by a table would not paste).
    import textwrap

    header = ("alias", "kind", "params", "offline", "description")
    rows = [(m["alias"], m["kind"], m["params"], "yes" if m["available"] else "no", m["description"]) for m in models]
    widths = [max(len(text) for text in column) for column in zip(header, *rows)]
    room = max(20, console.width - sum(widths[:-1]) - 2 * (len(widths) - 1))  # 2 spaces between columns
    for row in [header] + rows:
        description = row[-1] if len(row[-1]) <= room else row[-1][:room - 1] + "…"
        typer.echo("  ".join(text.ljust(width) for text, width in zip(row[:-1], widths)) + "  " + description)
    for m in models:
        if not m["available"] and m["install"]:
            lines = textwrap.wrap(m["install"], 72, break_long_words=False, break_on_hyphens=False)
            typer.echo(f"{m['alias']} is not available offline; to install it:\n  " + " \\\n    ".join(lines))
    typer.echo("(clfbench models --json: hub ids, where each model loads from, install commands)")


@app.command("methods")
def methods_command(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the methods with their options and defaults."""
    data = [
        {"name": m.name, "summary": m.summary, "paper": m.paper, "task_kinds": list(m.task_kinds),
         "max_tasks": m.max_tasks, "launch": m.launch, "options": option_fields(m.options)}
        for m in METHODS.values()
    ]
    if as_json:
        print_json(data)
        return
    for m in data:
        typer.echo(f"{m['name']}: {m['summary']} [{m['paper']}]")
        for field in m["options"]:
            typer.echo(f"    {field['name']} = {field['default']!r}  ({field['type']}) {field['description']}")


# ---- engine -------------------------------------------------------------------------------------

def engine_status_data(s: Store) -> dict:
    from clfbench.engine.daemon import engine_lock_holder

    pid = engine_lock_holder(s.url)
    counts = queries.count_by_status(s)
    engines = queries.live_engines(s, stale_after_s=30, now=time.time())
    hosts = queries.hosts_overview(s, engines, now=time.time())
    return {"store": s.describe(), "engine_pid_on_this_host": pid, "live_engines": engines, "hosts": hosts,
            "queued": counts.get(RunStatus.queued.value, 0), "running": counts.get(RunStatus.running.value, 0)}


@engine_app.callback(invoke_without_command=True)
def engine_command(
    ctx: typer.Context,
    foreground: bool = typer.Option(False, "--foreground", help="run in this terminal instead of detaching"),
    until_idle: bool = typer.Option(False, "--until-idle", help="run in the foreground and exit when nothing is left"),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPU indices to use, e.g. 0,1 ('none': CPU only)"),
    max_cpu_runs: int = typer.Option(1, "--max-cpu-runs", help="CPU runs at once (when they do not use GPUs)"),
    launcher: str = typer.Option("local", "--launcher", help="local: run workers here; slurm: submit each run as a "
                                                             "Slurm job (docs/slurm.md)"),
    max_jobs: int = typer.Option(16, "--max-jobs", help="slurm: jobs submitted and unfinished at once"),
) -> None:
    """Run the engine. Without a subcommand: start it detached (or --foreground / --until-idle)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"gpus": gpus, "max_cpu_runs": max_cpu_runs, "launcher": launcher, "max_jobs": max_jobs}
        return
    if not (foreground or until_idle):
        start_engine(gpus, max_cpu_runs, launcher, max_jobs)
        return
    from clfbench.engine.daemon import EngineConfig
    from clfbench.engine.gpus import discover_gpus

    s = store()
    try:
        engine_class = launcher_engine(launcher)
        found = [] if launcher == "slurm" else discover_gpus(gpus)  # a Slurm job's GPUs are Slurm's
        typer.echo(f"engine: store {s.describe()}, "
                   + (f"launcher slurm, up to {max_jobs} job(s)" if launcher == "slurm" else
                      f"GPUs [{','.join(map(str, found))}]{' (CPU only)' if not found else ''}"), err=True)
        engine_with_progress(s, EngineConfig(url=s.url, gpus=found, until_idle=until_idle,
                                             max_cpu_runs=max_cpu_runs, launcher=launcher, max_jobs=max_jobs),
                             engine_class)
    except ClfbenchError as error:
        fail(str(error))


def launcher_engine(launcher: str):
    """The engine class of `--launcher` (engine.daemon.Engine, or engine.slurm.SlurmEngine where sbatch works);
    a launcher that is unknown, or cannot work on this host, is a one-line ClfbenchError."""
    from clfbench.engine.daemon import LAUNCHER_MODULES, Engine

    if launcher not in LAUNCHER_MODULES:
        raise ClfbenchError(f"unknown launcher '{launcher}' (choose from {', '.join(LAUNCHER_MODULES)})")
    if launcher == "local":
        return Engine
    from clfbench.engine.slurm import SlurmEngine, check_slurm_commands

    check_slurm_commands()
    return SlurmEngine


def engine_with_progress(s: Store, config, engine_class=None) -> None:
    """Run the engine in this process with a progress bar per run on stdout (plain lines when not a terminal)."""
    from clfbench.app.progress import RunWatcher
    from clfbench.engine.daemon import run_engine

    watcher = RunWatcher(store=s, console=console)
    config.on_tick = watcher.tick
    watcher.start()
    try:
        run_engine(config, engine_class)
    finally:
        watcher.stop()


def start_engine(gpus: Optional[str], max_cpu_runs: int, launcher: str = "local", max_jobs: int = 16) -> None:
    from clfbench.engine.daemon import start_detached
    from clfbench.storage.paths import engine_log_path

    s = store()
    try:
        launcher_engine(launcher)  # refused here in one line, not in the detached engine's log
        pid = start_detached(s.url, gpus, max_cpu_runs, launcher, max_jobs)
    except ClfbenchError as error:
        fail(str(error))
    typer.echo(f"engine started (pid {pid}); log: {engine_log_path(s.url)}")


@engine_app.command("start")
def engine_start(
    ctx: typer.Context,
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPU indices to use, e.g. 0,1 ('none': CPU only)"),
    max_cpu_runs: Optional[int] = typer.Option(None, "--max-cpu-runs", help="CPU runs at once"),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="local or slurm (docs/slurm.md)"),
    max_jobs: Optional[int] = typer.Option(None, "--max-jobs", help="slurm: jobs submitted and unfinished at once"),
) -> None:
    """Start the engine detached: runs go on after you log out."""
    # The options are accepted on either side of `start` (`engine --gpus 0 start` or `engine start --gpus 0`).
    options = ctx.obj or {}
    start_engine(gpus if gpus is not None else options.get("gpus"),
                 max_cpu_runs if max_cpu_runs is not None else options.get("max_cpu_runs", 1),
                 launcher if launcher is not None else options.get("launcher", "local"),
                 max_jobs if max_jobs is not None else options.get("max_jobs", 16))


@engine_app.command("stop")
def engine_stop() -> None:
    """Stop this host's engine for the store. Running workers finish on their own; the next engine adopts them."""
    from clfbench.engine.daemon import stop_engine

    pid = stop_engine(store().url)
    typer.echo(f"engine (pid {pid}) stopped" if pid else "no engine runs for this store on this host")


@engine_app.command("status")
def engine_status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Every host with a live engine on this store (GPUs busy and free, running runs, its share of the last day's
    runs), whether this host runs one, and how long the queue is."""
    data = engine_status_data(store())
    if as_json:
        print_json(data)
        return
    pid = data["engine_pid_on_this_host"]
    typer.echo(f"store: {data['store']}")
    typer.echo(f"engine on this host: {'running (pid %s)' % pid if pid else 'not running'}")
    if data["hosts"]:
        table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 1))
        for column in ("host", "engines", "gpus", "busy", "free", "running", "share 24h", "gpu type"):
            table.add_column(column, no_wrap=True)
        for h in data["hosts"]:
            engines = f"{len(h['engine_ids'])} {'/'.join(h['launchers'])}"
            free = [g for g in h["gpus"] if g not in h["busy"]]
            table.add_row(h["host"], engines, str(len(h["gpus"])) if h["gpus"] else "cpu", str(len(h["busy"])),
                          ",".join(map(str, free)) or "-", str(h["running"]), f"{100 * h['share']:.0f}%",
                          h["gpu_type"] or "-")
        console.print(table)
    else:
        typer.echo("no live engine on any host")
    typer.echo(f"queued: {data['queued']}  running: {data['running']}")


# ---- tui ----------------------------------------------------------------------------------------

@app.command("tui")
def tui_command(
    engine: bool = typer.Option(True, "--engine/--no-engine",
                                help="start the engine (detached) when none runs for the store"),
) -> None:
    """The terminal UI: queue, watch and compare runs (works over SSH and in tmux; ? lists the keys)."""
    from clfbench.app.tui.app import ClfbenchApp

    try:
        tui = ClfbenchApp(db=state.db, start_engine=engine)
    except StoreError as error:
        fail(str(error))
    tui.run()


# ---- demo ---------------------------------------------------------------------------------------

DEMO_RUNS = [
    # A small real benchmark on the shipped samples: MiniLM fine-tuned on MASSIVE intent and 20NG 7-class.
    {"method": "encoder-finetune", "model": "minilm", "task": "massive-intent",
     "options": {"epochs": 8, "lr": 1e-4, "batch_size": 16, "eval_every": 100, "max_length": 64}},
    {"method": "encoder-finetune", "model": "minilm", "task": "20ng-7class",
     "options": {"epochs": 4, "lr": 1e-4, "batch_size": 16, "eval_every": 50, "max_length": 128}},
]


@app.command("demo")
def demo_command(
    run: bool = typer.Option(True, "--run/--no-run", help="run the engine until the demo runs finish"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="use this data folder instead of the samples"),
) -> None:
    """Queue a small real benchmark (MiniLM on samples of MASSIVE and 20NG), run it, print the results."""
    from clfbench.engine.tasks import sample_data_dir

    folder = str(Path(data_dir).resolve()) if data_dir else str(sample_data_dir())
    try:
        specs = [parse_spec({**one, "data_dir": folder, "name": "demo"}) for one in DEMO_RUNS]
        for spec in specs:
            validate_for_queue(spec)
    except ClfbenchError as error:
        fail(str(error))
    s = store()
    ids = queue.enqueue(s, new_runs(specs, priority=0))
    typer.echo(f"queued demo runs {', '.join(map(str, ids))} on {folder}")
    if not run:
        return
    from clfbench.app.progress import RunWatcher
    from clfbench.engine.daemon import EngineConfig, engine_lock_holder
    from clfbench.engine.gpus import discover_gpus

    started = time.time()
    if engine_lock_holder(s.url):
        typer.echo("an engine already runs for this store; waiting for it to finish the demo runs", err=True)
        watcher = RunWatcher(store=s, console=console)
        watcher.start()
        try:
            while any(queries.get_run(s, i)["status"] not in TERMINAL_STATUSES for i in ids):
                time.sleep(1)
                watcher.tick()
        finally:
            watcher.stop()
    else:
        try:
            engine_with_progress(s, EngineConfig(url=s.url, gpus=discover_gpus(None), until_idle=True))
        except ClfbenchError as error:
            fail(str(error))
    typer.echo(f"demo finished in {time.time() - started:.0f} s")
    for i in ids:
        r = queries.get_run(s, i)
        line = f"run {i}: {r['status']} {r['model']} {r['task']}"
        if r["error"]:
            line += f" — {r['error'].splitlines()[0]}"
        typer.echo(line)
    results_command(metric="auto", model=None, method=None, task=None, fmt="table", as_json=False)


def main() -> None:
    """The command line. A store failure anywhere (a read-only file, a full disk, a lost server) and Ctrl-C are one
    line and a non-zero exit, not a traceback; any other exception is a bug and keeps its traceback."""
    try:
        app()
    except Exception as error:
        line = store_failure(error)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
