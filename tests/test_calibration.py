"""Calibration (issue 13): ECE and the reliability diagram from the confidences a method stores.

The binning and ECE are checked against scikit-learn's calibration_curve on the same inputs, against answers
known in closed form (a calibrated and an over-confident classifier), and the bootstrap's ECE against the plain
one; then what a user sees: `clfbench calibration`, its SVG, its one-line refusals, and the run detail's tab.
"""
from __future__ import annotations

import asyncio
import json
import random
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from clfbench.app.calibration import calibration, summary_line
from clfbench.engine import metrics, stats
from clfbench.storage.db import open_store
from tests.tui_seed import SEED_NOW, seed_store

ENCODER_7CLASS = 3  # minilm encoder-finetune on 20ng-7class: confidences stored
PROMPT_INTENT = 11  # smollm2 prompted: generated answers, no confidence


def sklearn_ece(confidences, correct, bins=metrics.CALIBRATION_BINS) -> float:
    """ECE from scikit-learn's calibration_curve (accuracy and confidence per non-empty bin) and its binning."""
    accuracy, confidence = calibration_curve(np.asarray(correct, dtype=int), np.asarray(confidences), n_bins=bins)
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], confidences), minlength=bins)
    return float((counts[counts > 0] / len(confidences) * np.abs(accuracy - confidence)).sum())


@pytest.mark.parametrize("seed", range(5))
def test_ece_and_the_reliability_bins_match_scikit_learn(seed):
    rng = random.Random(seed)
    confidences = [rng.random() for _ in range(700)]
    correct = [rng.random() < c ** 1.7 for c in confidences]  # over-confident
    assert metrics.expected_calibration_error(confidences, correct) == pytest.approx(sklearn_ece(confidences, correct))
    accuracy, confidence = calibration_curve(np.asarray(correct, int), np.asarray(confidences), n_bins=15)
    bins = [b for b in metrics.reliability(confidences, correct) if b["count"]]
    assert [b["accuracy"] for b in bins] == pytest.approx(list(accuracy))
    assert [b["confidence"] for b in bins] == pytest.approx(list(confidence))
    # The bootstrap scores the same number from its column sums.
    assert stats.ece_counts(confidences, correct).value() == pytest.approx(sklearn_ece(confidences, correct))


def test_a_confidence_on_a_bin_edge_goes_to_the_lower_bin_as_in_scikit_learn():
    edges = [k / 15 for k in range(16)]
    expected = np.searchsorted(np.linspace(0, 1, 16)[1:-1], edges)
    assert [metrics.calibration_bin(e) for e in edges] == list(expected)


def test_a_calibrated_classifier_scores_near_zero_and_an_over_confident_one_its_gap():
    rng = random.Random(7)
    confidences = [rng.uniform(0.3, 1.0) for _ in range(20_000)]
    calibrated = [rng.random() < c for c in confidences]
    assert metrics.expected_calibration_error(confidences, calibrated) < 0.02
    # Always 90% sure, right 60% of the time: ECE is the gap, 0.3.
    assert metrics.expected_calibration_error([0.9] * 1000, [i % 10 < 6 for i in range(1000)]) == pytest.approx(0.3)


def test_the_worker_scores_ece_only_where_every_answer_has_a_confidence():
    from clfbench.engine.types import Prediction

    with_confidence = [Prediction(str(i), "t", "a", "a" if i % 4 else "b", confidence=0.8) for i in range(40)]
    results = metrics.task_results("sequence", with_confidence, ["a", "b"])
    assert results["ece"] == pytest.approx(0.05)  # 80% sure, 75% right
    assert "ece" in stats.task_counts("sequence", with_confidence, ["a", "b"])
    one_missing = with_confidence[:-1] + [Prediction("39", "t", "a", None, parse_status="empty")]
    assert "ece" not in metrics.task_results("sequence", one_missing, ["a", "b"])


def test_clfbench_calibration_prints_ece_with_its_interval_and_writes_the_diagram(cli, tmp_path):
    folder = tmp_path / "seeded"
    folder.mkdir()
    cli.env["CLFBENCH_DB"] = seed_store(folder / "clfbench.db")
    target = tmp_path / "diagram.svg"
    printed = cli.run("calibration", str(ENCODER_7CLASS), "-o", str(target)).stdout
    expected = calibration(open_store(cli.env["CLFBENCH_DB"]), ENCODER_7CLASS, "20ng-7class")
    assert printed.splitlines()[0] == summary_line(expected)
    assert f"ECE {expected.ece * 100:.1f}% [{expected.low * 100:.1f}, {expected.high * 100:.1f}]" in printed
    assert expected.low <= expected.ece <= expected.high and expected.resamples == 1000
    assert sum(b["count"] for b in expected.bins) == expected.n == 100
    bars = [line for line in printed.splitlines() if "|" in line and "–" in line]
    assert len(bars) == sum(1 for b in expected.bins if b["count"])
    svg = ElementTree.parse(target).getroot()
    assert svg.tag.endswith("svg") and f"wrote {target}" in printed
    as_json = json.loads(cli.run("calibration", str(ENCODER_7CLASS), "--json").stdout)
    assert as_json["ece"] == pytest.approx(expected.ece) and len(as_json["bins"]) == metrics.CALIBRATION_BINS
    # A prompted LLM's generated answers have no probability: one line that says why.
    refused = cli.run("calibration", str(PROMPT_INTENT), check=False)
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert "stored no confidences" in refused.stderr
    missing = cli.run("calibration", "999", check=False)
    assert missing.returncode != 0 and "no run 999" in missing.stderr


def test_the_run_detail_shows_the_calibration_tab(home, tmp_path):
    from clfbench.app.tui.app import ClfbenchApp
    from clfbench.app.tui.messages import OpenRun
    from clfbench.app.tui.detail import DetailScreen
    from textual.widgets import Static

    folder = tmp_path / "seeded"
    folder.mkdir()
    url = seed_store(folder / "clfbench.db")
    expected = calibration(open_store(url), ENCODER_7CLASS, "20ng-7class")

    async def main():
        app = ClfbenchApp(db=url, now=lambda: SEED_NOW, start_engine=False)
        async with app.run_test(size=(80, 24)) as pilot:
            app.post_message(OpenRun(ENCODER_7CLASS))
            for _ in range(4):
                await pilot.pause()
                await app.workers.wait_for_complete()
            assert isinstance(app.screen, DetailScreen)
            await pilot.press("6")
            await pilot.pause()
            shown = str(app.screen.query_one("#calibration-text", Static).render())
            assert shown.startswith(summary_line(expected))

    asyncio.run(main())
