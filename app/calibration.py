"""How far a run's confidence can be trusted on a task: expected calibration error and the reliability diagram.

Read from the predictions' stored confidences (the probability the method gave its answer: a classifier head's
or LLMEmbed's softmax, tf-idf's logistic regression), so it costs no run. Binned as engine.metrics bins them
(15 equal-width bins, scikit-learn's calibration_curve convention), with ECE's 95% bootstrap interval over test
examples (engine.stats). `clfbench calibration RUN`, the run detail's Calibration tab and the SVG for a paper all
come from `calibration()` and `diagram_lines()` here.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

from clfbench.engine import metrics, stats
from clfbench.engine.rescore import as_predictions
from clfbench.storage import queries
from clfbench.storage.db import Store

BAR_WIDTH = 30  # characters from confidence 0 to 1 in the text diagram


@dataclass
class Calibration:
    task: str
    n: int
    accuracy: float
    mean_confidence: float
    ece: float
    low: float
    high: float
    resamples: int
    bins: list[dict]  # engine.metrics.reliability's: low, high, count, confidence, accuracy


def calibration(store: Store, run_id: int, task: str) -> Calibration | None:
    """The run's calibration on `task`; None when its predictions carry no confidence (generated answers, a
    token task, or predictions stored before clfbench kept confidences)."""
    predictions = as_predictions(queries.predictions(store, run_id, task), token=False)
    confidences = metrics.confidences_of(predictions)
    if confidences is None:
        return None
    correct = [p.predicted is not None and p.predicted == p.gold for p in predictions]
    interval = stats.bootstrap_interval(stats.ece_counts(confidences, correct))
    return Calibration(task=task, n=len(predictions), accuracy=sum(correct) / len(correct),
                       mean_confidence=sum(confidences) / len(confidences), ece=interval.value, low=interval.low,
                       high=interval.high, resamples=interval.resamples,
                       bins=metrics.reliability(confidences, correct))


def summary_line(c: Calibration) -> str:
    """`ECE 4.1% [3.2, 5.3]`, and whether the run is over- or under-confident on the whole."""
    leaning = ("over-confident" if c.mean_confidence > c.accuracy else "under-confident"
               if c.mean_confidence < c.accuracy else "neither over- nor under-confident")
    return (f"{c.task}: ECE {c.ece * 100:.1f}% [{c.low * 100:.1f}, {c.high * 100:.1f}] over {c.n:,} predictions "
            f"({c.resamples:,} resamples); mean confidence {c.mean_confidence * 100:.1f}% vs accuracy "
            f"{c.accuracy * 100:.1f}%: {leaning}")


def diagram_lines(c: Calibration, width: int = BAR_WIDTH) -> list[str]:
    """The reliability diagram as text, one line per non-empty bin: the bar is the bin's accuracy, `|` marks its
    mean confidence (a calibrated bin's bar ends at its mark), then the gap accuracy − confidence."""
    lines = [f"{'confidence':<11} {'n':>6}  {'conf':>5}  {'acc':>5}  {'gap':>6}  accuracy bar, | = confidence"]
    for b in c.bins:
        if not b["count"]:
            continue
        filled = round(b["accuracy"] * width)
        bar = list("█" * filled + "·" * (width - filled))
        bar[min(width - 1, int(b["confidence"] * width))] = "|"
        lines.append(f"{b['low']:.2f}–{b['high']:.2f}  {b['count']:>6,}  {b['confidence']:>5.3f}  "
                     f"{b['accuracy']:>5.3f}  {(b['accuracy'] - b['confidence']) * 100:>+6.1f}  {''.join(bar)}")
    return lines


def reliability_svg(c: Calibration, title: str, size: int = 420) -> str:
    """A reliability diagram for a paper: per bin a bar of its accuracy, the diagonal of perfect calibration, and
    under it the share of predictions per bin; standalone SVG, no plotting library."""
    left, top, plot, hist = 60, 40, size - 100, 60
    bottom = top + plot

    def px(value: float) -> float:
        return left + value * plot

    def py(value: float) -> float:
        return bottom - value * plot

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{bottom + hist + 50}" '
           f'font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{size / 2:.0f}" y="20" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
           f'<text x="{size / 2:.0f}" y="34" text-anchor="middle">ECE {c.ece * 100:.1f}% '
           f'[{c.low * 100:.1f}, {c.high * 100:.1f}], n = {c.n:,}</text>']
    largest = max(b["count"] for b in c.bins) or 1
    for b in c.bins:
        x, w = px(b["low"]), (b["high"] - b["low"]) * plot
        if b["count"]:
            out.append(f'<rect x="{x:.1f}" y="{py(b["accuracy"]):.1f}" width="{w:.1f}" '
                       f'height="{b["accuracy"] * plot:.1f}" fill="#2c7fb8" stroke="white"><title>'
                       f'{b["low"]:.2f}–{b["high"]:.2f}: n {b["count"]}, confidence {b["confidence"]:.3f}, '
                       f'accuracy {b["accuracy"]:.3f}</title></rect>')
        height = b["count"] / largest * (hist - 10)
        out.append(f'<rect x="{x:.1f}" y="{bottom + hist - height:.1f}" width="{w:.1f}" height="{height:.1f}" '
                   f'fill="#7f8c8d" stroke="white"/>')
    out += [f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" stroke="#c0392b" stroke-dasharray="4 3"/>',
            f'<rect x="{left}" y="{top}" width="{plot}" height="{plot}" fill="none" stroke="black"/>']
    for tick in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<text x="{px(tick):.1f}" y="{bottom + hist + 16}" text-anchor="middle">{tick:g}</text>')
        out.append(f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    out += [f'<text x="{left + plot / 2:.0f}" y="{bottom + hist + 34}" text-anchor="middle">confidence (bars: '
            f'accuracy per bin; grey: predictions per bin; red: perfect calibration)</text>',
            f'<text transform="translate(16 {top + plot / 2:.0f}) rotate(-90)" text-anchor="middle">accuracy</text>',
            "</svg>"]
    return "\n".join(out) + "\n"
