"""engine.stats checked against scipy, statsmodels and scikit-learn on the same inputs, and the bootstrap's
coverage on simulated test sets whose true accuracy is known."""
from __future__ import annotations

import random

import numpy as np
import pytest
from scipy.stats import binomtest, bootstrap
from sklearn.metrics import accuracy_score, f1_score
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

from clfbench.engine import metrics, stats
from clfbench.engine.types import Prediction


@pytest.mark.parametrize("b, c", [(0, 0), (0, 1), (1, 1), (3, 9), (9, 3), (10, 10), (25, 40), (130, 106),
                                  (0, 30), (500, 450)])
def test_mcnemar_exact_matches_statsmodels_and_scipy(b, c):
    expected = mcnemar([[50, b], [c, 20]], exact=True).pvalue
    assert stats.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    if b + c:
        assert stats.mcnemar_exact(b, c) == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, rel=1e-9)


def test_holm_matches_statsmodels():
    rng = np.random.default_rng(3)
    for size in (1, 2, 5, 12):
        p_values = list(rng.uniform(0, 0.2, size))
        expected = multipletests(p_values, method="holm")[1]
        assert stats.holm(p_values) == pytest.approx(list(expected))


def random_labels(rng: random.Random, n: int, labels: list[str], right: float) -> tuple[list, list]:
    gold = [rng.choice(labels) for _ in range(n)]
    predicted = [g if rng.random() < right else rng.choice(labels) for g in gold]
    return gold, predicted


def test_point_values_match_sklearn_and_engine_metrics():
    rng = random.Random(7)
    labels = [f"label_{i}" for i in range(12)]
    gold, predicted = random_labels(rng, 400, labels, 0.6)
    assert stats.accuracy_counts(gold, predicted).value() == pytest.approx(accuracy_score(gold, predicted))
    assert stats.macro_f1_counts(gold, predicted, labels).value() == pytest.approx(
        f1_score(gold, predicted, average="macro"))
    # Parse failures (None) are wrong answers and add no class: engine.metrics' reading, not sklearn's.
    predicted[::7] = [None] * len(predicted[::7])
    report = metrics.classification_report(gold, predicted, labels)
    assert stats.accuracy_counts(gold, predicted).value() == pytest.approx(report["accuracy"])
    assert stats.macro_f1_counts(gold, predicted, labels).value() == pytest.approx(report["macro_f1"])


def random_tags(rng: random.Random, length: int) -> list[str]:
    """Tags with every irregularity the rules read differently: I- starts, B-x B-x, type changes, MASSIVE's Other."""
    return [rng.choice(["O", "Other", "B-date", "I-date", "B-place", "I-place", "time", "B-time"])
            for _ in range(length)]


@pytest.mark.parametrize("rule", sorted(metrics.SLOT_RULES))
def test_slot_counts_per_utterance_sum_to_seqevals_corpus_scores(rule):
    rng = random.Random(11)
    gold = [random_tags(rng, rng.randint(1, 9)) for _ in range(300)]
    predicted = [random_tags(rng, rng.randint(0, 10)) if rng.random() > 0.1 else None for _ in gold]
    expected = metrics.slot_scores(gold, predicted, rule)
    counts = stats.slot_counts(gold, predicted, rule)
    for name in ("slot_f1", "slot_precision", "slot_recall"):
        assert counts[name].value() == pytest.approx(expected[name], abs=1e-12), name
    assert stats.token_accuracy_counts(gold, predicted).value() == pytest.approx(
        metrics.token_accuracy(gold, predicted))


def test_task_counts_give_every_stored_metric_and_the_joint_exact_match():
    rng = random.Random(5)
    labels = ["a", "b", "c"]
    gold, predicted = random_labels(rng, 60, labels, 0.7)
    intents = [Prediction(example_id=str(i), text="t", gold=g, predicted=p, parse_status="ok" if p else "failed")
               for i, (g, p) in enumerate(zip(gold, predicted))]
    tags = [random_tags(rng, 4) for _ in gold]
    slots = [Prediction(example_id=str(i), text="t", gold=t, predicted=t if rng.random() < 0.6 else random_tags(rng, 4))
             for i, t in enumerate(tags)]
    for kind, predictions in (("sequence", intents), ("token", slots)):
        stored = metrics.task_results(kind, predictions, labels, "massive")
        counts = stats.task_counts(kind, predictions, labels, "massive")
        assert set(counts) == set(stored) - {"n"}
        for name, value in counts.items():
            assert value.value() == pytest.approx(stored[name]), (kind, name)
    joint = stats.exact_match_counts(intents, list(reversed(slots)), "massive")
    assert joint.value() == pytest.approx(metrics.joint_exact_match(intents, slots, "massive"))


def test_bootstrap_interval_agrees_with_scipys_percentile_bootstrap():
    rng = np.random.default_rng(1)
    right = rng.random(500) < 0.8
    ours = stats.bootstrap_interval(stats.accuracy_counts(list(right), [True] * 500), resamples=4000)
    theirs = bootstrap((right.astype(float),), np.mean, n_resamples=4000, method="percentile",
                       confidence_level=0.95, random_state=2).confidence_interval
    assert ours.value == pytest.approx(right.mean())
    assert ours.low == pytest.approx(theirs.low, abs=0.006) and ours.high == pytest.approx(theirs.high, abs=0.006)
    assert ours.low < ours.value < ours.high and ours.resamples == 4000


def test_the_same_predictions_always_give_the_same_interval():
    counts = stats.accuracy_counts(["a", "b"] * 100, ["a", "a"] * 100)
    assert stats.bootstrap_interval(counts) == stats.bootstrap_interval(counts)
    assert stats.bootstrap_interval(counts, seed=1) != stats.bootstrap_interval(counts)


def test_a_95_percent_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    """1,000 simulated test sets of 300 examples from a classifier whose true accuracy is 0.8."""
    rng = np.random.default_rng(2026)
    covered = 0
    for trial in range(1000):
        right = rng.random(300) < 0.8
        interval = stats.bootstrap_interval(stats.accuracy_counts(list(right), [True] * 300), resamples=500,
                                            seed=trial)
        covered += interval.low <= 0.8 <= interval.high
    assert 0.93 <= covered / 1000 <= 0.97, covered


def test_paired_tests_hold_their_level_when_two_classifiers_are_equally_good():
    """Two classifiers with the same true accuracy, errors independent: each test rejects at 0.05 about 5% of
    the time (McNemar's exact test is conservative, so at most that)."""
    rng = np.random.default_rng(9)
    mcnemar_rejects = bootstrap_rejects = 0
    trials = 300
    for trial in range(trials):
        a, b = rng.random(300) < 0.75, rng.random(300) < 0.75
        mcnemar_rejects += stats.mcnemar_exact(int((a & ~b).sum()), int((~a & b).sum())) < 0.05
        difference = stats.paired_bootstrap(stats.accuracy_counts(list(a), [True] * 300),
                                            stats.accuracy_counts(list(b), [True] * 300), resamples=400, seed=trial)
        bootstrap_rejects += difference.p_value < 0.05
    assert mcnemar_rejects / trials <= 0.07
    assert bootstrap_rejects / trials <= 0.09


def test_a_real_difference_is_found_and_identical_runs_differ_by_nothing():
    rng = random.Random(4)
    labels = [f"l{i}" for i in range(6)]
    gold, good = random_labels(rng, 600, labels, 0.9)
    _, poor = random_labels(random.Random(5), 600, labels, 0.6)
    poor = [p if rng.random() < 0.7 else g for g, p in zip(gold, poor)]
    better = stats.paired_bootstrap(stats.macro_f1_counts(gold, good, labels),
                                    stats.macro_f1_counts(gold, poor, labels))
    assert better.value > 0 and better.low > 0 and better.p_value < 0.01
    same = stats.paired_bootstrap(stats.macro_f1_counts(gold, good, labels), stats.macro_f1_counts(gold, good, labels))
    assert same.value == 0 and same.low == 0 == same.high and same.p_value == 1.0


def seed_runs(rng, n: int, accuracies) -> list[stats.Counts]:
    """One run per seed on the same n examples, each right with its own (seed-dependent) probability."""
    return [stats.share_counts(list(rng.random(n) < accuracy)) for accuracy in accuracies]


def test_the_two_level_bootstrap_over_one_seed_each_is_the_paired_bootstrap():
    rng = np.random.default_rng(3)
    a, b = seed_runs(rng, 400, [0.8]), seed_runs(rng, 400, [0.74])
    two_level, paired = stats.seeds_bootstrap(a, b), stats.paired_bootstrap(a[0], b[0])
    assert (two_level.value, two_level.low, two_level.high, two_level.p_value) == \
        (paired.value, paired.low, paired.high, paired.p_value)


def test_the_two_level_bootstrap_holds_its_level_when_seeds_spread_and_finds_a_real_difference():
    """Three seeds a side whose accuracies spread (sd 0.03) around the same mean: at 0.05 it rejects about 5% of the
    time, because it resamples the seeds too; a test over the examples alone would count the seeds' spread as a
    difference between the rows and reject far more often (checked here on the same data)."""
    rng = np.random.default_rng(11)
    trials, two_level, examples_only = 150, 0, 0
    for trial in range(trials):
        a = seed_runs(rng, 300, 0.75 + 0.03 * rng.standard_normal(3))
        b = seed_runs(rng, 300, 0.75 + 0.03 * rng.standard_normal(3))
        two_level += stats.seeds_bootstrap(a, b, resamples=300, seed=trial).p_value < 0.05
        pooled = [stats.Counts(np.vstack([c.columns for c in side]), side[0].score) for side in (a, b)]
        examples_only += stats.paired_bootstrap(*pooled, resamples=300, seed=trial).p_value < 0.05
    assert two_level / trials <= 0.09
    assert examples_only / trials > 2 * max(two_level / trials, 0.03)
    better = stats.seeds_bootstrap(seed_runs(rng, 300, [0.86, 0.85, 0.87]), seed_runs(rng, 300, [0.74, 0.75, 0.73]))
    assert better.value > 0.08 and better.low > 0 and better.p_value < 0.01
