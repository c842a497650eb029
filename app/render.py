"""Turning store query results into text: the results matrix in table/md/csv/latex/json, and a run's state
(status colours, progress, time left, age, duration) as run lists show it.

The CLI and the TUI both use these functions, so a file exported from the TUI has the numbers
`clfbench results` prints, and `clfbench ls` and the runs screen write a run's progress the same way.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time

from rich.text import Text

from clfbench.engine.methods.catalog import METHODS
from clfbench.engine.metrics import SLOT_RULES
from clfbench.storage.models import RunStatus
from clfbench.storage.queries import Matrix

FORMATS = ("table", "md", "csv", "latex", "json")


def log_source(store, run: dict) -> str | None:
    """Where to read a run's log: None for the copy its engines keep in the store, else the path of its log file.

    The store's copy holds every attempt, whichever host ran it, so it is read whenever it is whole. Where the store
    has none (a run from before store v7), the file is read if it is here. When the store's copy was trimmed (a long
    log), the file is read where this host holds the whole of it: the run's last attempt ran here, or its folder is
    in the shared CLFBENCH_ARTIFACTS place (a path of another host may exist here too, holding only what this host
    once ran of the run)."""
    import os

    from clfbench.engine.daemon import host_label
    from clfbench.storage.paths import artifacts_place
    from clfbench.storage.queries import stored_log_state

    path = run.get("log_path")
    if not path or not os.path.exists(path):
        return None
    state = stored_log_state(store, run["id"])
    if state != "trimmed":  # "none": the file, whatever host wrote it, is all there is
        return path if state == "none" else None
    shared = artifacts_place()
    if run.get("host") in (None, host_label()) or (shared and "://" not in shared and _under(path, shared)):
        return path
    return None


def _under(path: str, folder: str) -> bool:
    import os

    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


# How the TUI colours a run status (`clfbench ls` prints statuses plain).
STATUS_STYLES = {
    RunStatus.queued.value: "cyan", RunStatus.running.value: "bold yellow", RunStatus.succeeded.value: "green",
    RunStatus.failed.value: "bold red", RunStatus.cancelled.value: "magenta", RunStatus.interrupted.value: "red",
}


def row_label(row: tuple[str, str, int, str]) -> str:
    model, method, shots, variant = row
    return f"{model} · {method}" + (f" · {shots}-shot" if shots else "") + (f" · {variant}" if variant else "")


def run_label(model: str, method: str, shots: int) -> str:
    """One run's model · method · shots, as the results rows name it (without option variants)."""
    return row_label((model, method, shots, ""))


def metric_applies(metric: str, method: str) -> bool:
    """Whether a method's value of this metric means something. A parse failure rate does only for methods
    that parse generated text (the catalog's parses_output): an encoder's stored 0.0 is shown blank, never as
    the best rate. A method this version does not know keeps its number."""
    if metric != "parse_failure_rate":
        return True
    info = METHODS.get(method)
    return info is None or info.parses_output


def applicable_cells(matrix: Matrix) -> Matrix:
    """The matrix without the cells whose metric does not apply to their row's method (rows stay, blank)."""
    cells = {key: cell for key, cell in matrix.cells.items() if metric_applies(matrix.metric, key[0][1])}
    if len(cells) == len(matrix.cells):
        return matrix
    return dataclasses.replace(matrix, cells=cells)


def cell_text(matrix: Matrix, row, column, percent: bool = True, show_n: bool = False) -> str:
    """`77.5 ± 3.5`: the mean ± std over seeds (percent: the value × 100); one seed with a stored interval:
    `82.4 ±1.4`, half the width of its 95% bootstrap interval over test examples (the exports give the interval's
    ends too); one seed without one: the value alone. ` (n=2)` when `show_n` (the exports show n in each cell only
    when the cells' seed counts differ, see shared_n); `–` for no value."""
    cell = matrix.cells.get((row, column))
    if cell is None or not cell.values or not metric_applies(matrix.metric, row[1]):
        return "–"
    scale = 100.0 if percent else 1.0
    # A percent metric given as a fraction (--fraction) keeps the digits its percent shows: 77.5 -> 0.775.
    digits = 3 if not percent and is_percent_metric(matrix.metric) else 1
    text = f"{cell.mean * scale:.{digits}f}"
    if len(cell.values) > 1:
        text += f" ± {cell.std * scale:.{digits}f}"
    elif _interval(cell) is not None:
        low, high, _resamples = _interval(cell)
        text += f" ±{(high - low) / 2 * scale:.{digits}f}"
    return text + (f" (n={len(cell.values)})" if show_n else "")


def _interval(cell) -> tuple[float, float, int] | None:
    """A one-seed cell's bootstrap interval (getattr: the TUI's tests build cells of their own)."""
    return getattr(cell, "interval", None)


NO_RESULTS = "no results yet (runs appear here when they succeed)"


def shown_cells(matrix: Matrix) -> list:
    """The cells that hold a value whose metric applies to their row's method (the ones every format prints)."""
    return [cell for (row, _column), cell in matrix.cells.items()
            if cell.values and metric_applies(matrix.metric, row[1])]


def shared_n(matrix: Matrix) -> int | None:
    """How many seeds every shown cell averages; None when the cells differ (each cell then says its n)."""
    counts = {len(cell.values) for cell in shown_cells(matrix)}
    return counts.pop() if len(counts) == 1 else None


def cells_note(matrix: Matrix, percent: bool) -> str:
    """The line every format prints under its table: what a cell holds (metric, unit) and over how many seeds,
    and the runs left out because their seed was already in their cell (storage.queries.Cell)."""
    what = "accuracy / slot F1" if matrix.metric == "auto" else matrix.metric
    unit = " (%)" if percent else " (fraction)" if is_percent_metric(matrix.metric) else ""
    n = shared_n(matrix)
    seeds = ("one seed each" if n == 1 else f"mean ± std over {n} seeds each" if n
             else "mean ± std over the n seeds each cell names")
    note = f"cells: {what}{unit}, {seeds}"
    resamples = sorted({_interval(cell)[2] for cell in shown_cells(matrix) if _interval(cell) is not None})
    if resamples:
        counts = "/".join(f"{count:,}" for count in resamples)
        note += (f"; a one-seed cell's ± is half its 95% bootstrap interval over test examples ({counts} "
                 f"resamples)")
    repeats = sorted(run_id for cell in shown_cells(matrix) for run_id in getattr(cell, "repeats", []))
    if repeats:
        runs = f"runs {', '.join(map(str, repeats))}" if len(repeats) > 1 else f"run {repeats[0]}"
        note += f"; a seed run twice counts once (its newest run): {runs} left out"
    return note


def lower_is_better(metric: str) -> bool:
    """Failure rates, calibration error, losses, times and costs (GPU-seconds, memory, dollars) are best when
    smallest."""
    return metric in ("parse_failure_rate", "ece") or "loss" in metric or metric.endswith(("_time_s", "_gb", "_usd")) \
        or metric == "gpu_seconds"


def best_per_column(matrix: Matrix) -> dict[str, tuple]:
    """The best row of each column (the first one on a tie)."""
    sign = -1.0 if lower_is_better(matrix.metric) else 1.0
    best = {}
    for column in matrix.columns:
        scored = [(sign * matrix.cells[(r, column)].mean, -i, r) for i, r in enumerate(matrix.rows)
                  if (r, column) in matrix.cells and metric_applies(matrix.metric, r[1])]
        scored = [item for item in scored if not math.isnan(item[0])]
        if scored:
            best[column] = max(scored)[2]
    return best


def is_marked(matrix: Matrix, best: dict[str, tuple], row, column: str) -> bool:
    """Bold: the column's best, and (when significance was asked for) the cells not significantly worse."""
    return best.get(column) == row or row in matrix.ties.get(column, ())


def is_percent_metric(metric: str) -> bool:
    return metric in ("auto", "accuracy", "macro_f1", "slot_f1", "slot_precision", "slot_recall",
                      "exact_match", "parse_failure_rate", "token_accuracy", "ece")


def rule_notes(matrix: Matrix) -> list[str]:
    """The footnote of a matrix: one line per slot rule its shown results were computed under (which columns, and
    what the rule reads as a span), so an exported slot F1 never travels without its definition; and a warning
    for a column whose results were computed under different rules."""
    columns_of: dict[str, list[str]] = {}
    for column in matrix.columns:
        for rule in sorted(matrix.rules.get(column, ())):
            columns_of.setdefault(rule, []).append(column)
    notes = [f"slot rule '{rule}' ({', '.join(columns)}): {SLOT_RULES.get(rule, 'a rule this version does not know')}"
             for rule, columns in columns_of.items()]
    mixed = [column for column in matrix.columns if len(matrix.rules.get(column, ())) > 1]
    if mixed:
        notes.append(f"warning: {', '.join(mixed)} mix results computed under different slot rules; "
                     f"`clfbench rescore` recomputes stored runs under their task's rule")
    return notes


def _matrix_json(matrix: Matrix, notes: list[str], percent: bool) -> str:
    """mean and std as stored ("unit": fraction for the percent metrics, so a program gets full precision), n
    distinct seeds, and "text": the cell exactly as md, LaTeX and the table print it."""
    def one(r, c) -> dict:
        cell = matrix.cells[(r, c)]
        interval = _interval(cell)
        return {"mean": cell.mean, "std": cell.std, "n": len(cell.values), "runs": cell.run_ids,
                "seeds": getattr(cell, "seeds", []), "repeats": getattr(cell, "repeats", []),
                "low": interval[0] if interval else None, "high": interval[1] if interval else None,
                "resamples": interval[2] if interval else None, "text": cell_text(matrix, r, c, percent),
                "bold": is_marked(matrix, best, r, c)}

    best = best_per_column(matrix)
    rows = [{"model": r[0], "method": r[1], "shots": r[2], "variant": r[3],
             "cells": {c: one(r, c) for c in matrix.columns if (r, c) in matrix.cells}}
            for r in matrix.rows]
    unit = "fraction" if is_percent_metric(matrix.metric) else "as stored"
    return json.dumps({"metric": matrix.metric, "unit": unit, "text_unit": "%" if percent else unit,
                       "columns": matrix.columns, "rows": rows, "warnings": matrix.warnings,
                       "rules": {c: sorted(matrix.rules.get(c, ())) for c in matrix.columns}, "notes": notes,
                       "cells_note": cells_note(matrix, percent)},
                      indent=2)


def _csv_number(value: float) -> str:
    return f"{value:.6g}"


def _matrix_csv(matrix: Matrix, notes: list[str], percent: bool) -> str:
    """Five columns per task: the mean, its std and n (distinct seeds), and a one-seed cell's 95% bootstrap
    interval (low, high), in percent like every other format (fractions with --fraction); the cells note and the
    rule notes follow as "#" lines (pandas reads them away with comment="#", a spreadsheet shows them)."""
    scale = 100.0 if percent else 1.0
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["model", "method", "shots", "variant"] + [
        name for c in matrix.columns for name in (c, f"{c} std", f"{c} n", f"{c} low", f"{c} high")])
    for r in matrix.rows:
        values: list[str] = []
        for c in matrix.columns:
            cell = matrix.cells.get((r, c))
            if cell is None or not cell.values:
                values += ["", "", "", "", ""]
                continue
            std = _csv_number(cell.std * scale) if len(cell.values) > 1 else ""  # one seed: no std, as in md
            interval = _interval(cell)
            ends = [_csv_number(interval[0] * scale), _csv_number(interval[1] * scale)] if interval else ["", ""]
            values += [_csv_number(cell.mean * scale), std, str(len(cell.values)), *ends]
        writer.writerow(list(r) + values)
    return out.getvalue() + "".join(f"# {note}\n" for note in [cells_note(matrix, percent)] + notes)


def _matrix_body(matrix: Matrix, percent: bool) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of cell texts (row label first) that md and LaTeX lay out; a cell names its n
    when the cells' seed counts differ (otherwise the cells note says it once)."""
    show_n = shared_n(matrix) is None
    header = ["model · method · shots"] + matrix.columns
    return header, [[row_label(r)] + [cell_text(matrix, r, c, percent, show_n) for c in matrix.columns]
                    for r in matrix.rows]


def _matrix_md(matrix: Matrix, notes: list[str], percent: bool) -> str:
    header, body = _matrix_body(matrix, percent)
    best = best_per_column(matrix)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, cells in zip(matrix.rows, body):
        marked = [cells[0]] + [f"**{v}**" if is_marked(matrix, best, r, c) else v
                               for c, v in zip(matrix.columns, cells[1:])]
        lines.append("| " + " | ".join(marked) + " |")
    lines += ["", cells_note(matrix, percent)]  # a paragraph of its own; the rule notes keep their line breaks
    return "\n".join(lines + ([""] + [f"{note}  " for note in notes] if notes else []))


def _latex_escape(text: str) -> str:
    return text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")


def _matrix_latex(matrix: Matrix, notes: list[str], percent: bool) -> str:
    header, body = _matrix_body(matrix, percent)
    best = best_per_column(matrix)
    esc = _latex_escape
    lines = ["\\begin{tabular}{l" + "r" * len(matrix.columns) + "}", "\\toprule",
             " & ".join(esc(h) for h in header).replace("·", "/") + " \\\\", "\\midrule"]
    for r, cells in zip(matrix.rows, body):
        marked = [esc(cells[0]).replace("·", "/")] + [
            f"\\textbf{{{esc(v)}}}" if is_marked(matrix, best, r, c) else esc(v)
            for c, v in zip(matrix.columns, cells[1:])
        ]
        lines.append(" & ".join(marked).replace("±", "$\\pm$") + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "",
              "{\\footnotesize " + esc(cells_note(matrix, percent)).replace("±", "$\\pm$") + "}"]
    if notes:
        lines += ["", "{\\footnotesize " + " \\\\ ".join(esc(note) for note in notes) + "}"]
    return "\n".join(lines)


_MATRIX_FORMATS = {"json": _matrix_json, "csv": _matrix_csv, "md": _matrix_md, "latex": _matrix_latex}


# An empty matrix in each export format: a line that says so in the format's own comment syntax (md: the text
# itself), never a table skeleton that reads as a table of no rows; json keeps its shape, the line in "notes".
_EMPTY = {"md": "{}", "csv": "# {}", "latex": "% {}"}


def render_matrix(matrix: Matrix, fmt: str, fraction: bool = False, extra_notes: list[str] = ()) -> str:
    """The matrix as md, csv, latex or json. Every format gives the same numbers: percent for the percent metrics
    (fractions when `fraction`), mean ± std over distinct seeds and n (csv: columns of their own; md, LaTeX:
    n in a cells note, or in each cell when the cells' seed counts differ; json: fields, with the stored values
    too). Each carries the cells note and the slot rules' footnote (`rule_notes`) in its own way: text under
    the md table, `#` lines after the csv rows, a small paragraph after the LaTeX table, "notes" in json."""
    if fmt not in _MATRIX_FORMATS:
        raise ValueError(f"unknown format {fmt}")
    matrix = applicable_cells(matrix)  # blank in every format, as in the table (json: no cell, csv: empty)
    percent = is_percent_metric(matrix.metric) and not fraction
    if not matrix.rows and fmt in _EMPTY:
        return _EMPTY[fmt].format(NO_RESULTS)
    notes = rule_notes(matrix) + list(extra_notes) if matrix.rows else [NO_RESULTS]
    return _MATRIX_FORMATS[fmt](matrix, notes, percent)


def age(seconds_since_epoch: float | None, now: float | None = None) -> str:
    if not seconds_since_epoch:
        return "–"
    delta = max(0, (now or time.time()) - seconds_since_epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{int(delta // size)}{unit}"
    return f"{int(delta)}s"


def duration(start: float | None, end: float | None, now: float | None = None) -> str:
    if not start:
        return "–"
    seconds = (end or now or time.time()) - start
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def status_text(status: str) -> Text:
    """A run status in its colour (no colour for a status this version does not know)."""
    return Text(status, style=STATUS_STYLES.get(status, ""))


def clock(seconds: float) -> str:
    """A time left, short: `4m05`, `2h07`, and whole days from 48 hours on (`3d`)."""
    minutes, secs = divmod(int(max(0, seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours >= 48:
        return f"{hours // 24}d"
    return f"{hours}h{minutes:02d}" if hours else f"{minutes}m{secs:02d}"


def progress_text(run: dict) -> str:
    """`step/total` (`12/47`); empty while the run has not said how many steps it has."""
    if not run["progress_total"]:
        return ""
    return f"{run['progress_step']}/{run['progress_total']}"


# ---- a running run's phase, its time left, and whether its engine is gone -------------------------------

# The phases workers report (engine.context.PHASES), as the run list names them in a few columns.
PHASE_SHORT = {"loading model": "loading", "converting": "converting", "training": "train",
               "evaluating on dev": "eval", "testing": "test", "writing results": "writing"}
# A running run whose worker has not written a heartbeat for this long has no live engine: a live engine ends
# such a run itself (the engine's own rule, engine.daemon.STALE_AFTER_S; workers beat every 5 s).
STALE_AFTER_S = 180.0
# A time left longer than this comes from too few steps (or a stopped clock), not from a rate: never shown.
MAX_ETA_S = 7 * 86400.0
# Per run: the phase seen last (attempt, name, first seen at, its step then) and the last measured rate of each
# phase, so a screen that refreshes (the TUI, the live bars) times a phase by its own steps. Bounded below.
_SEEN: dict[int, tuple[int, str, float, int]] = {}
_RATES: dict[int, dict[str, float]] = {}


def engine_gone(run: dict, now: float) -> bool:
    """A `running` run that nothing runs any more: its engine is known dead (`engine_alive` False, set by callers
    that read the engines), or its worker's heartbeat is older than STALE_AFTER_S."""
    if run.get("status") != RunStatus.running:
        return False
    if run.get("engine_alive") is False:
        return True
    beat = run.get("heartbeat_at") or run.get("started_at")
    return beat is not None and now - beat > STALE_AFTER_S


def phase_text(run: dict) -> str:
    """The phase and its progress: `train 12/47`, `eval 120/400`, `converting 0/100`, `loading`; empty when the
    run has not said (a worker older than phases)."""
    phase = run.get("phase")
    if not phase:
        return ""
    short = PHASE_SHORT.get(phase, phase)
    step, total = run.get("phase_step"), run.get("phase_total")
    if phase == "training" and not total:
        step, total = run.get("progress_step"), run.get("progress_total")
    return f"{short} {step or 0}/{total}" if total else short


def _observe(run: dict, now: float) -> float | None:
    """This phase's rate in steps per second, from what this process saw of it (None: not measured yet), or the
    rate the same phase had the last time (a dev evaluation runs over the same dev set each time)."""
    run_id, phase, step = run.get("id"), run.get("phase"), run.get("phase_step") or 0
    if phase == "training" and not run.get("phase_total"):
        step = run.get("progress_step") or 0
    if len(_SEEN) > 5000:  # a long session over many runs: forget, rather than grow
        _SEEN.clear()
        _RATES.clear()
    seen = _SEEN.get(run_id)
    mark = (run.get("attempt") or 0, phase)
    if seen is None or seen[:2] != mark or step < seen[3]:
        _SEEN[run_id] = (*mark, now, step)
        return _RATES.get(run_id, {}).get(phase)
    if step > seen[3] and now > seen[2]:
        _RATES.setdefault(run_id, {})[phase] = (step - seen[3]) / (now - seen[2])
    return _RATES.get(run_id, {}).get(phase)


def resumed_step(run: dict) -> int:
    """The step this attempt resumed from, as its worker noted it (`attempt 2 resumed from step 300`); 0 if none."""
    note, attempt = run.get("attempt_note") or "", run.get("attempt")
    marker = f"attempt {attempt} resumed from step "
    if attempt and marker in note:
        digits = note.split(marker, 1)[1].split(";", 1)[0].strip()
        return int(digits) if digits.isdigit() else 0
    return 0


def _training_left(run: dict, now: float, rate: float | None) -> float | None:
    """Seconds of training left: at the measured rate, else at this attempt's average since it started (steps
    since its resume over the time since its start)."""
    step, total = run.get("progress_step") or 0, run.get("progress_total") or 0
    if total and step >= total:
        return 0.0
    if not total:
        return None
    if rate:
        return (total - step) / rate
    done, started = step - resumed_step(run), run.get("started_at")
    if done <= 0 or started is None:
        return None
    return (now - started) / done * (total - step)


def eta_seconds(run: dict, now: float) -> float | None:
    """The time left of a running run, None when unknown. In an evaluation the rest of the evaluation at its rate
    plus the training left (training goes on after it); in training the training left; in testing (and
    converting) the rest of the phase at its rate. A phase's rate needs two looks at it (a refreshing screen);
    a single look (`clfbench ls`) knows training's, from the attempt's average."""
    phase = run.get("phase")
    rate = _observe(run, now) if phase else None
    if not phase or phase == "training":
        return _training_left(run, now, rate if phase else None)
    step, total = run.get("phase_step") or 0, run.get("phase_total") or 0
    if phase == "testing" and not rate and total and run.get("progress_total") == total:
        return _training_left(run, now, None)  # a prompted run: its progress is the test examples
    if not total or not rate:
        return None
    left = (total - step) / rate
    if phase == "evaluating on dev":
        training = _training_left(run, now, _RATES.get(run.get("id"), {}).get("training"))
        return None if training is None else left + training
    return left


def progress_with_eta(run: dict, now: float) -> str:
    """What a run list shows of a run's progress. Running: its phase and progress with the time left
    (`train 12/47 ~3m20`, `eval 120/400 ~1m10`, `loading`), or `engine gone` for a run nothing runs any more;
    queued after an interruption: why (`retry: attempt 1: worker killed by SIGKILL`); otherwise `step/total`.
    A time left past MAX_ETA_S is not shown."""
    status = run.get("status")
    if status == RunStatus.queued and run.get("attempt_note") and (run.get("attempt") or 0) > 0:
        return f"retry: {run['attempt_note']}"
    if status != RunStatus.running:
        return progress_text(run)
    if engine_gone(run, now):
        return " ".join(part for part in ("engine gone", progress_text(run)) if part)
    text = phase_text(run) or progress_text(run)
    eta = eta_seconds(run, now)
    if text and eta is not None and 0 < eta <= MAX_ETA_S:
        text += f" ~{clock(eta)}"
    return text
