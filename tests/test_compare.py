"""Numbers a researcher can defend, through the real command line on real tfidf runs of the shipped MASSIVE
sample: every result carries its 95% bootstrap interval, the matrix and every export show it, `rescore` gives
runs stored before intervals theirs, and `compare` pairs two runs on their shared examples."""
from __future__ import annotations

import csv
import io
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from statsmodels.stats.contingency_tables import mcnemar

from clfbench.engine import stats
from tests.conftest import SAMPLES, Cli, kill_processes_of_home
from tests.test_cli import assert_one_line_error

TFIDF = ["--method", "tfidf", "--model", "tfidf", "--task", "massive-intent", "--data-dir", str(SAMPLES)]


@pytest.fixture(scope="module")
def built_store(tmp_path_factory) -> tuple[Path, tuple[int, int, int]]:
    """Two tfidf runs that differ in one option, and a third that answered only the first 120 test examples: run
    once by a real engine for the module; each test gets a copy of the store."""
    home = tmp_path_factory.mktemp("compare-home")
    env = {**os.environ, "CLFBENCH_HOME": str(home)}
    for name in ("CLFBENCH_DB", "CLFBENCH_DATA"):
        env.pop(name, None)
    cli = Cli(home=home, env=env)
    try:
        (words,) = cli.json("queue", *TFIDF, "-o", "max_ngram=1")
        (pairs,) = cli.json("queue", *TFIDF, "-o", "max_ngram=2", "-o", "C=0.5")
        (fewer,) = cli.json("queue", *TFIDF, "-o", "max_ngram=2", "-o", "C=0.5", "-o", "test_limit=120")
        assert cli.run("engine", "--until-idle", "--max-cpu-runs", "3").returncode == 0
        assert [run["status"] for run in cli.json("ls")] == ["succeeded"] * 3
    finally:
        kill_processes_of_home(home)
    return home / "clfbench.db", (words["id"], pairs["id"], fewer["id"])


def stored(cli, run_id: int) -> dict:
    """A run's stored results, read in-process (the expectations; what is under test goes through the CLI)."""
    from clfbench.storage import queries
    from clfbench.storage.db import open_store

    store = open_store(f"sqlite:///{cli.home / 'clfbench.db'}")
    try:
        return queries.run_results(store, run_id)["massive-intent"]
    finally:
        store.engine.dispose()


@pytest.fixture
def two_runs(cli, built_store):
    database, ids = built_store
    cli.home.mkdir(parents=True, exist_ok=True)
    shutil.copy(database, cli.home / "clfbench.db")
    return ids


def test_every_result_has_its_interval_and_every_format_shows_it(cli, two_runs):
    words, _pairs, _fewer = two_runs
    shown = cli.json("show", str(words))
    accuracy = shown["results"]["massive-intent"]["accuracy"]
    interval = shown["result_intervals"]["massive-intent"]["accuracy"]
    assert interval["low"] < accuracy < interval["high"] and interval["resamples"] == 1000
    text = cli.run("show", str(words)).stdout
    assert f"accuracy={accuracy:.4g} [{interval['low']:.4g}, {interval['high']:.4g}]" in text

    exported = cli.json("results")
    cell = next(row for row in exported["rows"] if "max_ngram=1" in row["variant"])["cells"]["massive-intent"]
    half = (interval["high"] - interval["low"]) / 2 * 100
    assert cell["low"] == interval["low"] and cell["high"] == interval["high"] and cell["resamples"] == 1000
    assert cell["text"] == f"{accuracy * 100:.1f} ±{half:.1f}"
    assert "± is half its 95% bootstrap interval over test examples (1,000 resamples)" in exported["cells_note"]
    table = list(csv.reader(io.StringIO(cli.run("results", "-f", "csv").stdout)))
    row = next(r for r in table[1:] if "max_ngram=1" in r[3])
    assert table[0][7:9] == ["massive-intent low", "massive-intent high"]
    assert float(row[7]) == pytest.approx(interval["low"] * 100) and float(row[8]) == pytest.approx(
        interval["high"] * 100)
    assert cell["text"] in cli.run("results", "-f", "md").stdout
    assert cell["text"].replace("±", "$\\pm$") in cli.run("results", "-f", "latex").stdout
    terminal = cli.run("results").stdout
    assert cell["text"] in terminal and "half its 95% bootstrap interval" in terminal


def test_rescore_gives_results_stored_before_intervals_the_same_ones(cli, two_runs):
    words, _pairs, _fewer = two_runs
    before = cli.json("show", str(words))["result_intervals"]
    with sqlite3.connect(cli.home / "clfbench.db") as connection:  # as a store made before schema v5 holds them
        connection.execute("UPDATE results SET low = NULL, high = NULL, resamples = NULL")
    assert "±" not in cli.json("results")["rows"][0]["cells"]["massive-intent"]["text"]
    printed = cli.run("rescore", str(words)).stdout
    assert "massive-intent accuracy" in printed and "95% interval" in printed and "added" in printed
    assert cli.json("show", str(words))["result_intervals"] == before
    assert cli.run("rescore", str(words)).stdout.strip().endswith("changed 0 of 1 run(s)")


def test_compare_pairs_two_runs_with_mcnemar_and_the_paired_bootstrap(cli, two_runs):
    words, pairs, _fewer = two_runs
    report = cli.json("compare", str(words), str(pairs))
    (task,) = report["tasks"]
    assert task["task"] == "massive-intent" and task["shared"] == 200 and task["only_a"] == task["only_b"] == 0
    agreement = task["agreement"]
    assert sum(agreement.values()) == 200
    accuracy, macro_f1 = task["metrics"]
    expected = mcnemar([[agreement["both right"], agreement["only a right"]],
                        [agreement["only b right"], agreement["both wrong"]]], exact=True).pvalue
    assert accuracy["metric"] == "accuracy" and accuracy["difference"]["test"] == "McNemar exact"
    assert accuracy["difference"]["p_value"] == pytest.approx(expected)
    shown = {run: stored(cli, run) for run in (words, pairs)}
    assert accuracy["value_a"] == pytest.approx(shown[words]["accuracy"])
    assert accuracy["difference"]["value"] == pytest.approx(shown[words]["accuracy"] - shown[pairs]["accuracy"])
    assert macro_f1["value_b"] == pytest.approx(shown[pairs]["macro_f1"])
    assert macro_f1["difference"]["test"] == "paired bootstrap (1000 resamples)"
    low, high = macro_f1["difference"]["low"], macro_f1["difference"]["high"]
    assert low <= macro_f1["difference"]["value"] <= high
    # The examples only one run got right are listed, with gold and both answers.
    assert {d["right"] for d in task["disagreements"]} <= {"a", "b"}
    assert len(task["disagreements"]) == min(5, agreement["only a right"]) + min(5, agreement["only b right"])

    text = cli.run("compare", str(words), str(pairs)).stdout
    assert "McNemar exact" in text and "200 test examples both answered" in text
    assert ("no significant difference at 0.05" in text) or ("is better by" in text)
    # A run compared with itself: no difference, p = 1.
    same = cli.json("compare", str(words), str(words))["tasks"][0]["metrics"][0]["difference"]
    assert same["value"] == 0 and same["p_value"] == 1.0


def test_compare_says_when_test_sets_differ_and_uses_the_shared_examples(cli, two_runs):
    _words, pairs, fewer = two_runs
    (task,) = cli.json("compare", str(pairs), str(fewer))["tasks"]
    assert task["shared"] == 120 and task["only_a"] == 80 and task["only_b"] == 0
    text = cli.run("compare", str(pairs), str(fewer)).stdout
    assert "the test sets differ (A alone has 80, B alone 0): compared on the shared examples only" in text
    # Same model and options on the same 120 examples: the same answers.
    assert task["agreement"]["only a right"] == task["agreement"]["only b right"] == 0


def test_compare_refuses_in_one_line(cli, two_runs):
    words, pairs, _fewer = two_runs
    (queued,) = cli.json("queue", *TFIDF, "-o", "C=3")
    assert_one_line_error(cli.run("compare", str(words), str(queued["id"]), check=False),
                          f"run {queued['id']} is queued", "only succeeded runs")
    assert_one_line_error(cli.run("compare", str(words), str(pairs), "--task", "massive-slots", check=False),
                          "no task in common named 'massive-slots'")
    assert_one_line_error(cli.run("compare", str(words), str(pairs), "--alpha", "2", check=False), "--alpha")


def test_the_interval_the_worker_stored_is_the_one_the_predictions_give(cli, two_runs):
    from clfbench.engine.types import Prediction
    from clfbench.storage import queries
    from clfbench.storage.db import open_store

    words, _pairs, _fewer = two_runs
    store = open_store(f"sqlite:///{cli.home / 'clfbench.db'}")
    rows = queries.predictions(store, words, "massive-intent")
    predictions = [Prediction(example_id=r["example_id"], text=r["text"], gold=r["gold"], predicted=r["predicted"])
                   for r in rows]
    counts = stats.accuracy_counts([p.gold for p in predictions], [p.predicted for p in predictions])
    interval = stats.bootstrap_interval(counts)
    stored = queries.run_result_intervals(store, words)["massive-intent"]["accuracy"]
    assert stored == (interval.low, interval.high, 1000)


def test_significance_bolds_the_cells_not_shown_worse_than_the_best(cli, two_runs):
    exported = cli.json("results", "--significance")
    cells = {row["variant"]: row["cells"]["massive-intent"] for row in exported["rows"]}
    assert len(cells) == 3
    best = max(cells, key=lambda variant: cells[variant]["mean"])
    others = [variant for variant in cells if variant != best]
    # The same p-values `compare` gives against the best run (McNemar exact, on their shared examples), then Holm.
    from clfbench.app.compare import cell_p_value
    from clfbench.storage.db import open_store

    store = open_store(f"sqlite:///{cli.home / 'clfbench.db'}")
    p_values = [cell_p_value(store, cells[v]["runs"], cells[best]["runs"], "massive-intent", "accuracy")
                for v in others]
    store.engine.dispose()
    assert cells[best]["bold"]
    assert [cells[v]["bold"] for v in others] == [p >= 0.05 for p in stats.holm(p_values)]
    assert any("Holm-corrected over the column" in note for note in exported["notes"])
    plain = cli.json("results")  # without --significance only the best is bold
    assert [v for row in plain["rows"] for v in [row["cells"]["massive-intent"]["bold"]]].count(True) == 1


def test_every_run_records_what_it_cost_and_the_matrix_shows_it_lowest_best(cli, two_runs):
    costs = {run: stored(cli, run) for run in two_runs}
    for values in costs.values():
        assert values["gpu_seconds"] == 0.0  # a CPU run
        assert 0.05 < values["peak_rss_gb"] < 16  # rank 0's resident memory: Python, scikit-learn and the data
        assert values["wall_time_s"] > 0
    exported = cli.json("results", "--metric", "peak_rss_gb")
    cells = [row["cells"]["massive-intent"] for row in exported["rows"]]
    (bold,) = [cell for cell in cells if cell["bold"]]
    assert bold["mean"] == min(cell["mean"] for cell in cells)  # a cost: the smallest is the best


def test_plot_draws_quality_against_cost_with_the_pareto_front(cli, two_runs, tmp_path):
    import xml.etree.ElementTree as ElementTree

    quality = {run: stored(cli, run) for run in two_runs}
    drawn = cli.run("plot", "--task", "massive-intent", "--x", "peak_rss_gb").stdout
    assert drawn.count("peak_rss_gb") >= 3 and "Pareto front" in drawn
    target = tmp_path / "pareto.svg"
    printed = cli.run("plot", "--task", "massive-intent", "--x", "peak_rss_gb", "-o", str(target)).stdout
    svg = ElementTree.parse(target).getroot()
    circles = svg.findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == 3 and f"wrote {target}: 3 points" in printed
    # The most accurate run is never dominated: nothing beats its accuracy.
    best = max(two_runs, key=lambda run: quality[run]["accuracy"])
    front = [c.find("{http://www.w3.org/2000/svg}title").text for c in circles if c.get("fill") == "#c0392b"]
    assert front and len(front) <= 3
    # In percent, as every table of clfbench prints accuracy.
    assert any(f"accuracy (%) {quality[best]['accuracy'] * 100:.4g}" in line and "◆" in line
               for line in drawn.splitlines())
    assert_one_line_error(cli.run("plot", "--task", "massive-slots", check=False), "no results column 'massive-slots'")


def test_the_pareto_front_keeps_exactly_the_undominated_points():
    from clfbench.app.plot import Point, mark_front

    points = [Point("cheap, poor", 1, 0.5), Point("dear, good", 10, 0.9), Point("dear, poor", 10, 0.4),
              Point("middling", 5, 0.7), Point("worse middling", 6, 0.6), Point("tie", 5, 0.7)]
    front = {p.label for p in mark_front(points, x_lower_better=True, y_lower_better=False) if p.on_front}
    assert front == {"cheap, poor", "dear, good", "middling", "tie"}
    # Throughput is better high: the fastest and the best remain.
    fast = {p.label for p in mark_front(points, x_lower_better=False, y_lower_better=False) if p.on_front}
    assert fast == {"dear, good"}


def test_a_report_holds_the_matrix_the_plot_and_each_chosen_runs_details(cli, two_runs, tmp_path):
    import xml.etree.ElementTree as ElementTree
    from html.parser import HTMLParser

    words, pairs, _fewer = two_runs
    target = tmp_path / "report.md"
    printed = cli.run("report", "-o", str(target), "--runs", f"{words},{pairs}").stdout
    text = target.read_text()
    matrix_cell = cli.json("results")["rows"][0]["cells"]["massive-intent"]["text"]
    assert "## Results" in text and matrix_cell in text and "Holm-corrected" in text
    assert f"## Run {words}: tfidf · tfidf · massive-intent" in text and f"## Run {pairs}:" in text
    assert '"max_ngram": 1' in text  # the exact spec, its local paths shortened for sharing
    assert str(SAMPLES) not in text and '"data_dir": "…/engine/sample_data"' in text
    assert "per-label scores" in text and "most frequent confusions" in text and "| accuracy |" in text
    plots = sorted(tmp_path.glob("report-*.svg"))
    assert plots and all(ElementTree.parse(plot).getroot().tag.endswith("svg") for plot in plots)
    assert f"({plots[0].name})" in text and str(plots[0]) in printed
    page = tmp_path / "report.html"
    cli.run("report", "-o", str(page))
    HTMLParser().feed(page.read_text())
    assert "<svg" in page.read_text() and "<table>" in page.read_text()
    assert_one_line_error(cli.run("report", "-o", str(tmp_path / "report.txt"), check=False), ".md or .html")
    assert_one_line_error(cli.run("report", "-o", str(tmp_path / "report.md"), "--runs", "x", check=False),
                          "--runs takes run ids")
