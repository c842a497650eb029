"""A report to attach to a paper or a pull request (`clfbench report -o report.md` or `.html`): the results matrix
with intervals and significance marks, a quality-against-cost plot per task with its Pareto front, and for the
chosen runs their exact specs, code versions, per-label scores and most frequent confusions.

The report is a list of blocks (heading, paragraph, table, svg) written out by one small writer per format, so
the Markdown and the HTML say the same thing.
"""
from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from clfbench.app import render
from clfbench.app.compare import mark_ties
from clfbench.app.error_analysis import error_report
from clfbench.app.plot import points_of, quality_name, svg_plot
from clfbench.storage import queries
from clfbench.storage.db import Store
from clfbench.storage.queries import Matrix

COST_AXES = ("test_examples_per_s", "wall_time_s")  # the plot's x: the first one the runs of a column record


@dataclass
class Block:
    kind: str  # "heading", "text", "table", "svg", "code"
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)  # a table's rows, the header first
    name: str = ""  # an svg's file name beside a Markdown report


def build_report(store: Store, quality: Matrix, costs: dict[str, Matrix], run_ids: list[int],
                 alpha: float) -> list[Block]:
    """The blocks of a report on `quality` (already filtered), plots against the first cost each column has."""
    blocks = [Block("heading", "clfbench report"),
              Block("text", f"Store {store.label()}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
                            f"Local paths in specs are shortened to their last two parts (a report is shared); "
                            f"`clfbench show N` prints them whole.")]
    matrix = render.applicable_cells(quality)
    best = render.best_per_column(matrix)
    ties_note = mark_ties(store, matrix, best, alpha) if matrix.rows else ""
    header = ["model · method · shots"] + matrix.columns
    show_n = render.shared_n(matrix) is None
    body = [[render.row_label(r)] + [(f"**{text}**" if render.is_marked(matrix, best, r, c) else text)
                                     for c in matrix.columns
                                     for text in [render.cell_text(matrix, r, c, True, show_n)]]
            for r in matrix.rows]
    blocks += [Block("heading", "Results"), Block("table", rows=[header] + body),
               Block("text", render.cells_note(matrix, True))]
    blocks += [Block("text", note) for note in render.rule_notes(matrix) + ([ties_note] if ties_note else [])]
    blocks += _plots(store, quality, costs)
    for run_id in run_ids:
        blocks += _run_blocks(store, run_id)
    return blocks


def _plots(store: Store, quality: Matrix, costs: dict[str, Matrix]) -> list[Block]:
    blocks = [Block("heading", "Quality against cost")]
    for column in quality.columns:
        for axis in COST_AXES:
            points = points_of(quality, costs[axis], column)
            if len(points) >= 2:
                name = f"{column}-{axis}".replace(" ", "_").replace("(", "").replace(")", "")
                y_name = quality_name(store, quality, column)
                blocks.append(Block("svg", svg_plot(points, axis, y_name, f"{column}: {y_name} against {axis}"),
                                    name=f"{name}.svg"))
                front = ", ".join(p.label for p in points if p.on_front)
                blocks.append(Block("text", f"{column}: Pareto front ({axis}): {front}."))
                break
    return blocks if len(blocks) > 1 else []


def _run_blocks(store: Store, run_id: int) -> list[Block]:
    run = queries.get_run(store, run_id)
    if run is None:
        return [Block("text", f"run {run_id}: no such run")]
    blocks = [Block("heading", f"Run {run_id}: {render.run_label(run['model'], run['method'], run['shots'])} · "
                               f"{run['task']} · seed {run['seed']}"),
              Block("text", f"status {run['status']}, code version {run['code_version'] or 'unknown'}, "
                            f"spec hash {run['spec_hash'][:12]}"),
              Block("code", json.dumps(_shortened(json.loads(run["spec_json"])), indent=2, sort_keys=True,
                                            ensure_ascii=False))]
    intervals = queries.run_result_intervals(store, run_id)
    for task, values in sorted(queries.run_results(store, run_id).items()):
        shown = [[metric, f"{value:.4g}", "[{:.4g}, {:.4g}]".format(*intervals[task][metric][:2])
                  if metric in intervals.get(task, {}) else ""] for metric, value in sorted(values.items())]
        blocks += [Block("text", f"{task}: results"),
                   Block("table", rows=[["metric", "value", "95% interval"]] + shown)]
        rows = queries.predictions(store, run_id, task)
        if rows:
            blocks += _error_blocks(task, rows)
    return blocks


def _shortened(value):
    """The spec with every absolute local path (data_dir, a model folder, a task file) cut to "…/parent/name":
    the folder layout of the machine that ran it is no business of a paper's readers."""
    if isinstance(value, dict):
        return {key: _shortened(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shortened(item) for item in value]
    if isinstance(value, str) and value.startswith("/") and value.count("/") > 2:
        return "…/" + "/".join(Path(value).parts[-2:])
    return value


def _error_blocks(task: str, rows: list[dict]) -> list[Block]:
    report = error_report(rows)
    per_label = sorted(report.per_label.items(), key=lambda item: (item[1]["f1"], item[0]))
    table = [["label", "precision", "recall", "F1", "support"]] + [
        [label, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", str(int(v["support"]))]
        for label, v in per_label if v["support"]]
    confusions = sorted(((count, report.labels[g], report.labels[p]) for g, line in enumerate(report.confusion)
                         for p, count in enumerate(line) if g != p and count), reverse=True)[:10]
    kind = " (per tag)" if report.token_task else ""
    return [Block("text", f"{task}: per-label scores{kind}, worst F1 first"), Block("table", rows=table),
            Block("text", f"{task}: the most frequent confusions{kind}"),
            Block("table", rows=[["gold", "predicted", "examples"]] + [[g, p, str(c)] for c, g, p in confusions])]


# ---- writers ----------------------------------------------------------------------------------

def write_markdown(blocks: list[Block], target: Path) -> list[Path]:
    """The report as Markdown; each plot an SVG file beside it (linked). Returns the files written."""
    lines, written = [], [target]
    level = 1
    for block in blocks:
        if block.kind == "heading":
            lines += [f"{'#' * level} {block.text}", ""]
            level = 2
        elif block.kind == "text":
            lines += [block.text, ""]
        elif block.kind == "code":
            lines += ["```json", block.text, "```", ""]
        elif block.kind == "table":
            cells = [[text.replace("|", "\\|") for text in row] for row in block.rows]
            lines += ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
            lines += ["| " + " | ".join(row) + " |" for row in cells[1:]] + [""]
        elif block.kind == "svg":
            path = target.with_name(f"{target.stem}-{block.name}")
            path.write_text(block.text)
            written.append(path)
            lines += [f"![{block.name}]({path.name})", ""]
    target.write_text("\n".join(lines))
    return written


def write_html(blocks: list[Block], target: Path) -> list[Path]:
    """The report as one self-contained HTML file (plots inline)."""
    esc = html.escape
    out = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>clfbench report</title><style>",
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:.5em 0}"
           "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child,th:first-child"
           "{text-align:left}pre{background:#f6f6f6;padding:.5em}", "</style></head><body>"]
    level = 1
    for block in blocks:
        if block.kind == "heading":
            out.append(f"<h{level}>{esc(block.text)}</h{level}>")
            level = 2
        elif block.kind == "text":
            out.append(f"<p>{esc(block.text)}</p>")
        elif block.kind == "code":
            out.append(f"<pre>{esc(block.text)}</pre>")
        elif block.kind == "table":
            head = "".join(f"<th>{esc(t)}</th>" for t in block.rows[0])
            body = "".join("<tr>" + "".join(_html_cell(t) for t in row) + "</tr>" for row in block.rows[1:])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif block.kind == "svg":
            out.append(block.text)
    target.write_text("\n".join(out + ["</body></html>"]) + "\n")
    return [target]


def _html_cell(text: str) -> str:
    if text.startswith("**") and text.endswith("**"):
        return f"<td><b>{html.escape(text[2:-2])}</b></td>"
    return f"<td>{html.escape(text)}</td>"
