"""Quality against cost, one point per results row on one task, with the Pareto front marked (`clfbench plot`):
drawn in the terminal (plotext) and written as SVG for a paper, by hand, so no plotting library is needed.

A point is on the Pareto front when no other point is at least as good on both axes and better on one: the
classifiers worth considering at their cost. Which way is better on each axis comes from the metric
(render.lower_is_better: times, GPU-seconds, memory and dollars are best low; accuracy and throughput high).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass

from clfbench.app import render
from clfbench.storage.queries import Matrix


@dataclass(frozen=True)
class Point:
    label: str
    x: float
    y: float
    on_front: bool = False


def points_of(quality: Matrix, cost: Matrix, column: str) -> list[Point]:
    """One point per row that has both numbers in `column` (a cell's mean over its seeds); accuracy-like
    qualities in percent, as every table and export of clfbench prints them."""
    scale = 100.0 if render.is_percent_metric(quality.metric) else 1.0
    found = []
    for row in quality.rows:
        q, c = quality.cells.get((row, column)), cost.cells.get((row, column))
        if q is None or c is None or not q.values or not c.values or math.isnan(q.mean) or math.isnan(c.mean):
            continue
        if not render.metric_applies(quality.metric, row[1]):
            continue
        found.append(Point(render.row_label(row), c.mean, q.mean * scale))
    return mark_front(found, x_lower_better=render.lower_is_better(cost.metric),
                      y_lower_better=render.lower_is_better(quality.metric))


def mark_front(points: list[Point], x_lower_better: bool, y_lower_better: bool) -> list[Point]:
    """The points with on_front set where no other point dominates them."""
    sx, sy = (-1 if x_lower_better else 1), (-1 if y_lower_better else 1)

    def dominates(a: Point, b: Point) -> bool:
        return sx * a.x >= sx * b.x and sy * a.y >= sy * b.y and (sx * a.x > sx * b.x or sy * a.y > sy * b.y)

    return [Point(p.label, p.x, p.y, not any(dominates(o, p) for o in points if o is not p)) for p in points]


def terminal_plot(points: list[Point], x_name: str, y_name: str, width: int = 80, height: int = 20,
                  legend: bool = True) -> str:
    """A plotext scatter: front points as ◆, the others as ·, each numbered; the numbers' legend under it
    (legend=False: the caller lays its own out)."""
    import plotext

    plotext.clear_figure()
    plotext.plotsize(width, height)
    plotext.theme("clear")
    for marker, on_front in (("·", False), ("◆", True)):
        chosen = [p for p in points if p.on_front == on_front]
        if chosen:
            # The key in the plot's corner only with the legend: it can cover a point there.
            plotext.scatter([p.x for p in chosen], [p.y for p in chosen], marker=marker,
                            label=("Pareto front" if on_front else "dominated") if legend else None)
    for number, p in enumerate(points, 1):  # the front's numbers in red: the numbers cover the markers
        plotext.text(str(number), p.x, p.y, color="red" if p.on_front else "default")
    log_x = wide_range([p.x for p in points])
    if log_x:
        plotext.xscale("log")
    plotext.xlabel(x_name + (" (log scale)" if log_x else ""))
    plotext.ylabel(y_name)
    if not legend:
        return plotext.build()
    lines = [f"{n:>3} {'◆' if p.on_front else '·'} {p.label}: {y_name} {p.y:.4g}, {x_name} {p.x:.4g}"
             for n, p in enumerate(points, 1)]
    return plotext.build() + "\n" + "\n".join(lines)


def svg_plot(points: list[Point], x_name: str, y_name: str, title: str, width: int = 720, height: int = 480) -> str:
    """A standalone SVG scatter: axes with ticks, every point labelled, the Pareto front joined by a line."""
    left, right, top, bottom = 70, 260, 40, 60
    log_x = wide_range([p.x for p in points])
    xs, ys = [math.log10(p.x) if log_x else p.x for p in points], [p.y for p in points]
    x_lo, x_hi = _padded(min(xs), max(xs))
    y_lo, y_hi = _padded(min(ys), max(ys))

    def px(x: float) -> float:
        x = math.log10(x) if log_x else x
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    esc = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.0f}" y="20" text-anchor="middle" font-size="13">{esc(title)}</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>']
    for i in range(6):
        x, y = x_lo + (x_hi - x_lo) * i / 5, y_lo + (y_hi - y_lo) * i / 5
        x = 10 ** x if log_x else x
        out.append(f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:.3g}</text>')
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.4g}</text>')
    out.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 18}" text-anchor="middle">{esc(x_name)}'
               f'{" (log scale)" if log_x else ""}</text>')
    out.append(f'<text transform="translate(16 {(top + height - bottom) / 2:.0f}) rotate(-90)" '
               f'text-anchor="middle">{esc(y_name)}</text>')
    front = sorted((p for p in points if p.on_front), key=lambda p: p.x)
    if len(front) > 1:
        joined = " ".join(f"{px(p.x):.1f},{py(p.y):.1f}" for p in front)
        out.append(f'<polyline points="{joined}" fill="none" stroke="#c0392b" stroke-dasharray="4 3"/>')
    for number, p in enumerate(points, 1):
        colour = "#c0392b" if p.on_front else "#7f8c8d"
        out.append(f'<circle cx="{px(p.x):.1f}" cy="{py(p.y):.1f}" r="4" fill="{colour}"><title>{esc(p.label)}'
                   f'</title></circle>')
        out.append(f'<text x="{px(p.x) + 6:.1f}" y="{py(p.y) - 6:.1f}">{number}</text>')
        out.append(f'<text x="{width - right + 12}" y="{top + 14 * number}" fill="{colour}">'
                   f'{number} {esc(p.label)}</text>')
    out.append(f'<text x="{width - right + 12}" y="{top + 14 * (len(points) + 2)}" fill="#c0392b">'
               f'red, joined: the Pareto front</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


COST_SUFFIXES = ("_per_s", "_time_s", "_gb", "_usd")


def is_cost_metric(metric: str) -> bool:
    """A metric that says what a run cost (speed, time, GPU-seconds, memory, dollars): a plot's x axis."""
    return metric.endswith(COST_SUFFIXES) or metric == "gpu_seconds"


def quality_name(store, quality: Matrix, column: str) -> str:
    """axis_name for `column` of the quality matrix: a token column is one whose runs scored slot F1."""
    from clfbench.storage import queries

    run_ids = [cell.run_ids[0] for (_row, name), cell in quality.cells.items() if name == column]
    task = quality.column_tasks.get(column, column)
    token = bool(run_ids) and "slot_f1" in queries.run_results(store, run_ids[0]).get(task, {})
    return axis_name(quality.metric, token_column=token if run_ids else None)


def axis_name(metric: str, token_column: bool | None = None) -> str:
    """The quality axis's name, in percent for accuracy-like metrics (points_of scales them). "auto" is slot F1
    on a token column and accuracy on a sequence one (None: not known)."""
    name = metric
    if metric == "auto":
        name = "accuracy / slot F1" if token_column is None else "slot F1" if token_column else "accuracy"
    return name + (" (%)" if render.is_percent_metric(metric) else "")


def wide_range(values: list[float]) -> bool:
    """A log axis when the values are all positive and span two orders of magnitude (throughputs: tf-idf's 50,000
    examples/s beside an LLM's 3)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 100


def _padded(low: float, high: float) -> tuple[float, float]:
    """An axis range with 5% room on each side (and some room at all when every point has one value)."""
    span = high - low or abs(high) or 1.0
    return low - 0.05 * span, high + 0.05 * span
