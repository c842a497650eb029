"""How sure a number is: bootstrap intervals over test examples, paired tests between two runs on the same
examples (McNemar's exact test, the paired bootstrap), and Holm's correction over a column of comparisons.

Every metric the worker stores is a function of sums over test examples of a few per-example counts (accuracy:
right, 1; macro-F1: per label tp, predicted, gold; slot F1: per utterance matched, predicted and gold spans). A
bootstrap resample draws n examples with replacement, which is a vector of draw counts W; the resample's metric
is the metric of W @ counts. So one matrix product scores a thousand resamples, and slot F1 resamples
utterances, never tokens (the spans of one utterance stay together, as the issue of dependence asks).

numpy only, no torch: the CLI and the TUI import this.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from clfbench.engine import metrics
from clfbench.engine.types import ClfbenchError, Prediction

RESAMPLES = 1000  # enough for a 95% interval's ends to move by ~0.1 point between seeds of the bootstrap
LEVEL = 0.95
BOOTSTRAP_SEED = 0  # fixed: the same predictions always give the same interval
_CHUNK_CELLS = 2_000_000  # resamples × examples held at once (16 MB of float64 draw counts)


@dataclass(frozen=True)
class Counts:
    """Per-example counts (n × k) and the metric as a function of their column sums (any leading shape)."""

    columns: np.ndarray
    score: Callable[[np.ndarray], np.ndarray]

    @property
    def n(self) -> int:
        return int(self.columns.shape[0])

    def value(self) -> float:
        return float(self.score(self.columns.sum(axis=0)))

    def subset(self, rows: Sequence[int]) -> Counts:
        return Counts(self.columns[list(rows)], self.score)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float
    resamples: int
    level: float = LEVEL


@dataclass(frozen=True)
class Difference:
    """a − b on the same examples, with a percentile interval and a two-sided p-value."""

    value: float
    low: float
    high: float
    p_value: float
    test: str  # "McNemar exact" or "paired bootstrap (1000 resamples)"


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (engine.metrics' convention)."""
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    return np.divide(numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator).shape),
                     where=denominator != 0)


def share_counts(flags: Sequence[bool]) -> Counts:
    """A share of examples (accuracy, exact match, parse failure rate): columns (flag, 1)."""
    columns = np.column_stack([np.asarray(flags, dtype=float), np.ones(len(flags))]) if len(flags) else \
        np.zeros((0, 2))
    return Counts(columns, lambda s: _ratio(s[..., 0], s[..., 1]))


def accuracy_counts(gold: Sequence[str], predicted: Sequence[str | None]) -> Counts:
    return share_counts([p is not None and p == g for g, p in zip(gold, predicted)])


def macro_f1_counts(gold: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str]) -> Counts:
    """Per example and label: a true positive, a prediction of the label, a gold of the label. A resample's
    macro-F1 averages F1 = 2tp / (predicted + gold) over the labels present in its gold or predictions, as
    engine.metrics._macro_f1 does over the whole test set. A gold label outside `labels` joins them (engine.metrics
    would refuse such a label list; a bootstrap of stored predictions reads what is there)."""
    labels = list(labels) + sorted(set(gold) - set(labels))
    index = {label: i for i, label in enumerate(labels)}
    width = len(labels)
    columns = np.zeros((len(gold), 3 * width))
    for row, (g, p) in enumerate(zip(gold, predicted)):
        columns[row, 2 * width + index[g]] = 1
        if p in index:
            columns[row, width + index[p]] = 1
            if p == g:
                columns[row, index[g]] = 1

    def score(s: np.ndarray) -> np.ndarray:
        tp, pred, gold_count = s[..., :width], s[..., width:2 * width], s[..., 2 * width:]
        present = (pred + gold_count) > 0
        f1 = _ratio(2 * tp, pred + gold_count)
        return _ratio((f1 * present).sum(axis=-1), present.sum(axis=-1))

    return Counts(columns, score)


def _spans(tags: Sequence[str], rule: str) -> set[tuple]:
    """The spans seqeval reads in one utterance under a rule (engine.metrics.SLOT_RULES); spans of different
    utterances never match, so per-utterance matches sum to seqeval's corpus counts."""
    if rule == "strict":
        from seqeval.scheme import IOB2, Entities

        return {entity.to_tuple()[1:] for entity in Entities([metrics.strict_readable(tags)], IOB2).entities[0]}
    from seqeval.metrics.sequence_labeling import get_entities

    return set(get_entities(list(tags)))


def slot_counts(gold_tags: Sequence[Sequence[str]], predicted_tags: Sequence[Sequence[str] | None],
                rule: str) -> dict[str, Counts]:
    """slot_f1, slot_precision and slot_recall (micro over spans, as seqeval) from per-utterance counts of
    matched, predicted and gold spans."""
    gold_seqs, pred_seqs = metrics.rule_sequences(gold_tags, predicted_tags, rule)
    columns = np.zeros((len(gold_seqs), 3))
    for row, (gold, pred) in enumerate(zip(gold_seqs, pred_seqs)):
        gold_spans, pred_spans = _spans(gold, rule), _spans(pred, rule)
        columns[row] = (len(gold_spans & pred_spans), len(pred_spans), len(gold_spans))
    return {"slot_f1": Counts(columns, lambda s: _ratio(2 * s[..., 0], s[..., 1] + s[..., 2])),
            "slot_precision": Counts(columns, lambda s: _ratio(s[..., 0], s[..., 1])),
            "slot_recall": Counts(columns, lambda s: _ratio(s[..., 0], s[..., 2]))}


def token_accuracy_counts(gold_tags: Sequence[Sequence[str]],
                          predicted_tags: Sequence[Sequence[str] | None]) -> Counts:
    """Per utterance: right positions and positions (token accuracy counts positions, resamples utterances)."""
    gold_seqs, pred_seqs = metrics.rule_sequences(gold_tags, predicted_tags, "conlleval")
    columns = np.array([(sum(g == p for g, p in zip(gold, pred)), len(gold))
                        for gold, pred in zip(gold_seqs, pred_seqs)], dtype=float).reshape(-1, 2)
    return Counts(columns, lambda s: _ratio(s[..., 0], s[..., 1]))


def task_counts(kind: str, predictions: Sequence[Prediction], labels: Sequence[str],
                slot_rule: str | None = None) -> dict[str, Counts]:
    """Counts for every metric engine.metrics.task_results stores for a task (not n)."""
    failures = share_counts([p.parse_status != "ok" for p in predictions])
    if kind == "sequence":
        gold, predicted = [p.gold for p in predictions], [p.predicted for p in predictions]
        counts = {"accuracy": accuracy_counts(gold, predicted), "macro_f1": macro_f1_counts(gold, predicted, labels),
                  "parse_failure_rate": failures}
        confidences = metrics.confidences_of(predictions)
        if confidences is not None:
            counts["ece"] = ece_counts(confidences, [p == g for g, p in zip(gold, predicted)])
        return counts
    if kind == "token":
        gold_tags = [metrics.as_tags(p.gold) or [] for p in predictions]
        predicted_tags = [metrics.as_tags(p.predicted) for p in predictions]
        counts = slot_counts(gold_tags, predicted_tags, slot_rule or metrics.DEFAULT_SLOT_RULE)
        counts["token_accuracy"] = token_accuracy_counts(gold_tags, predicted_tags)
        counts["parse_failure_rate"] = failures
        return counts
    raise ClfbenchError(f"unknown task kind {kind!r}: expected 'sequence' or 'token'")


def ece_counts(confidences: Sequence[float], correct: Sequence[bool],
               bins: int = metrics.CALIBRATION_BINS) -> Counts:
    """Per example, in its bin (engine.metrics.calibration_bin): 1, its confidence, whether it is right; ECE is
    Σ_b |Σ right − Σ confidence| / n over the bins, so a resample's ECE re-bins nothing."""
    columns = np.zeros((len(confidences), 3 * bins))
    for row, (confidence, right) in enumerate(zip(confidences, correct)):
        b = metrics.calibration_bin(confidence, bins)
        columns[row, [b, bins + b, 2 * bins + b]] = (1.0, confidence, float(right))

    def score(s: np.ndarray) -> np.ndarray:
        count, confidence, right = s[..., :bins], s[..., bins:2 * bins], s[..., 2 * bins:]
        return _ratio(np.abs(right - confidence).sum(axis=-1), count.sum(axis=-1))

    return Counts(columns, score)


def exact_match_counts(intent_predictions: Sequence[Prediction], slot_predictions: Sequence[Prediction],
                       rule: str) -> Counts | None:
    """Joint exact match per example (engine.metrics.joint_exact_match's pairing); None when not paired."""
    flags = metrics.joint_exact_match_flags(intent_predictions, slot_predictions, rule)
    return None if flags is None else share_counts(flags)


# ---- resampling -------------------------------------------------------------------------------

def resample_draws(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of bootstrap draw counts: row r says how often resample r drew each of the n examples."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, _CHUNK_CELLS // max(n, 1)))
    done = 0
    while done < resamples:
        rows = min(chunk, resamples - done)
        picks = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        yield np.bincount(picks.ravel(), minlength=rows * n).reshape(rows, n).astype(float)
        done += rows


def _percentile_ends(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_interval(counts: Counts, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = LEVEL) -> Interval:
    """The metric and its percentile bootstrap interval over test examples."""
    value = counts.value()
    if counts.n == 0:
        return Interval(value, math.nan, math.nan, 0, level)
    scores = np.concatenate([counts.score(draws @ counts.columns)
                             for draws in resample_draws(counts.n, resamples, seed)])
    return Interval(value, *_percentile_ends(scores, level), resamples, level)


def _two_sided_p(differences: np.ndarray, resamples: int) -> float:
    """Twice the share of resampled differences on the far side of zero, each count plus one over resamples plus
    one, so that it is never 0 from a finite number of resamples."""
    at_most, at_least = int((differences <= 0).sum()), int((differences >= 0).sum())
    return min(1.0, 2 * (min(at_most, at_least) + 1) / (resamples + 1))


def paired_bootstrap(a: Counts, b: Counts, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = LEVEL) -> Difference:
    """a − b resampling the same examples for both (rows of a and b are the same examples, in order).

    The p-value is two-sided: twice the share of resampled differences on the far side of zero, each count
    plus one over resamples plus one so that it is never 0 from a finite number of resamples."""
    if a.n != b.n:
        raise ClfbenchError(f"paired bootstrap: {a.n} and {b.n} examples; a paired test needs the same examples")
    value = a.value() - b.value()
    if a.n == 0:
        return Difference(value, math.nan, math.nan, math.nan, "paired bootstrap")
    differences = np.concatenate([a.score(draws @ a.columns) - b.score(draws @ b.columns)
                                  for draws in resample_draws(a.n, resamples, seed)])
    p_value = _two_sided_p(differences, resamples)
    return Difference(value, *_percentile_ends(differences, level), p_value,
                      f"paired bootstrap ({resamples} resamples)")


def seeds_bootstrap(a: Sequence[Counts], b: Sequence[Counts], resamples: int = RESAMPLES,
                    seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> Difference:
    """mean over A's seed runs − mean over B's, when every run answered the same examples (rows in the same order).

    Two-level bootstrap: each resample draws the test examples (the same draw for every run: the pairing) and,
    independently per side, the seed runs with replacement, so the interval and the p-value carry both the test
    set's noise and the seeds' spread. With one run per side it is paired_bootstrap (the same example draws)."""
    if not a or not b or len({c.n for c in (*a, *b)}) != 1:
        raise ClfbenchError("two-level bootstrap: every run of both sides must have answered the same examples")
    value = float(np.mean([c.value() for c in a]) - np.mean([c.value() for c in b]))
    seed_rng = np.random.default_rng(seed + 1)  # apart from the example draws: one run per side is paired_bootstrap
    chunks = []
    for draws in resample_draws(a[0].n, resamples, seed):
        means = []
        for side in (a, b):
            scores = np.stack([c.score(draws @ c.columns) for c in side], axis=1)  # resamples × runs
            chosen = seed_rng.integers(0, len(side), size=scores.shape)
            means.append(np.take_along_axis(scores, chosen, axis=1).mean(axis=1))
        chunks.append(means[0] - means[1])
    differences = np.concatenate(chunks)
    p_value = _two_sided_p(differences, resamples)
    return Difference(value, *_percentile_ends(differences, level), p_value,
                      f"two-level bootstrap over examples and seeds ({resamples} resamples)")


def mcnemar_exact(only_a_right: int, only_b_right: int) -> float:
    """McNemar's exact two-sided p-value: of the examples exactly one of two classifiers gets right, is the split
    further from even than chance allows? Binomial(b + c, 1/2), twice the smaller tail, at most 1."""
    discordant = only_a_right + only_b_right
    if discordant == 0:
        return 1.0
    smaller = min(only_a_right, only_b_right)
    tail = sum(math.comb(discordant, k) for k in range(smaller + 1)) / 2 ** discordant
    return min(1.0, 2 * tail)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (in the input's order): a family of m comparisons is tested at the
    level asked without Bonferroni's loss of power."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
