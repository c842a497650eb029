"""Queue-time checks and the numbers users compare, as a user meets them through the real command line: a model of
the wrong kind for its method and a spec queued twice are refused in one line with nothing stored; the matrix
counts each seed once and says n; every export gives the same numbers and says when there are none; `models`
fits 80 columns; a label absent from a run's test subset is told apart from a label the task does not have."""
from __future__ import annotations

import csv
import io
import json

import pytest

from tests.conftest import SAMPLES
from tests.test_cli import assert_one_line_error

TFIDF = ["--method", "tfidf", "--model", "tfidf", "--task", "massive-intent", "--data-dir", str(SAMPLES)]


def test_every_method_with_local_weights_says_which_model_kinds_it_runs():
    from clfbench.engine.methods.catalog import METHODS
    from clfbench.engine.submit import MODEL_KINDS

    local = {name for name, info in METHODS.items() if info.local_model}
    assert set(MODEL_KINDS) == local, "a method with local weights must declare its model kinds in MODEL_KINDS"


@pytest.mark.parametrize("method, model", [("prompt", "minilm"), ("llm-finetune", "tiny-bert"),
                                           ("ls-llama", "sentence-transformers/all-MiniLM-L6-v2"),
                                           ("ls-unllama", "tiny-bert")])
def test_an_encoder_for_a_method_that_needs_a_decoder_is_refused_in_one_line(cli, method, model):
    result = cli.run("queue", "--method", method, "--model", model, "--task", "massive-intent",
                     "--data-dir", str(SAMPLES), check=False)
    assert_one_line_error(result, f"{model} is an encoder", f"{method} needs a decoder LLM", "smollm2-135m")
    assert cli.json("ls") == []


def test_a_local_folder_is_judged_by_its_config_and_an_unknown_hub_id_is_accepted(cli, tmp_path):
    folder = tmp_path / "my-bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    refused = cli.run("queue", "--method", "prompt", "--model", str(folder), *TFIDF[4:], check=False)
    assert_one_line_error(refused, str(folder), "config.json", "is an encoder", "prompt needs a decoder LLM")
    # Nothing is downloaded at queue time to look at a hub id; encoder-finetune and llmembed take either kind.
    for method, model in (("prompt", "someone/some-llm"), ("encoder-finetune", "tiny-llama"),
                          ("llmembed", "tiny-bert"), ("encoder-finetune", str(folder))):
        cli.run("queue", "--method", method, "--model", model, *TFIDF[4:], "--dry-run")
    assert cli.json("ls") == []


def test_a_spec_identical_to_a_standing_run_is_refused_unless_allowed(cli):
    (first,) = cli.json("queue", *TFIDF)
    again = cli.run("queue", *TFIDF, check=False)
    assert_one_line_error(again, f"run {first['id']} (queued) has the same spec", "--allow-duplicate")
    sweep = cli.run("queue", *TFIDF, "--seed", "0", "--seed", "1", check=False)
    assert_one_line_error(sweep, f"run {first['id']} (queued)", "1 of these 2 runs", "nothing queued")
    twice = cli.run("queue", *TFIDF, "--seed", "3", "--seed", "3", check=False)
    assert_one_line_error(twice, "sweep items 1 and 2 are the same spec")
    assert [run["id"] for run in cli.json("ls")] == [first["id"]]  # no refusal stored anything
    (forced,) = cli.json("queue", *TFIDF, "--allow-duplicate")
    assert forced["id"] != first["id"]
    # A cancelled run no longer stands for its spec: queueing it again is not a duplicate.
    (other,) = cli.json("queue", *TFIDF, "--seed", "5")
    cli.run("cancel", str(other["id"]))
    cli.json("queue", *TFIDF, "--seed", "5")


def test_the_matrix_counts_a_seed_once_and_every_export_agrees(cli):
    limits = ["-o", "train_limit=200", "-o", "test_limit=12"]
    runs = cli.json("queue", *TFIDF, *limits, "--seed", "0", "--seed", "1")
    (repeat,) = cli.json("queue", *TFIDF, *limits, "--seed", "0", "--allow-duplicate")
    assert cli.run("engine", "--until-idle").returncode == 0
    accuracy = {run["id"]: cli.json("show", str(run["id"]))["results"]["massive-intent"]["accuracy"]
                for run in runs + [repeat]}
    # Seed 0 counts once, by its newest run: n is 2, the mean is over the two seeds.
    kept = [runs[1]["id"], repeat["id"]]
    mean = (accuracy[kept[0]] + accuracy[kept[1]]) / 2

    exported = cli.json("results")
    (row,) = exported["rows"]
    cell = row["cells"]["massive-intent"]
    assert cell["n"] == 2 and sorted(cell["runs"]) == sorted(kept) and cell["repeats"] == [runs[0]["id"]]
    assert cell["mean"] == pytest.approx(mean) and exported["unit"] == "fraction"
    text = cell["text"]  # what md, LaTeX and the table print
    assert text.startswith(f"{mean * 100:.1f}")

    printed = cli.run("results", "-f", "csv").stdout
    table = list(csv.reader(io.StringIO(printed)))
    assert table[0][4:] == ["massive-intent", "massive-intent std", "massive-intent n", "massive-intent low",
                            "massive-intent high"]
    assert float(table[1][4]) == pytest.approx(mean * 100, abs=1e-3) and table[1][6] == "2"  # percent, like md
    assert table[1][7:] == ["", ""]  # two seeds: their spread is the std, no one run's bootstrap interval
    assert "# cells: accuracy / slot F1 (%), mean ± std over 2 seeds each" in printed.splitlines()[2]
    md = cli.run("results", "-f", "md").stdout
    assert f"| {text} |" in md.replace("**", "") and "over 2 seeds each" in md
    assert text.replace("±", "$\\pm$") in cli.run("results", "-f", "latex").stdout
    terminal = cli.run("results").stdout
    assert text in terminal and f"run {runs[0]['id']} left out" in terminal
    fractions = list(csv.reader(io.StringIO(cli.run("results", "-f", "csv", "--fraction").stdout)))
    assert float(fractions[1][4]) == pytest.approx(mean, abs=1e-5)

    # A label of the task that this run's 12 test examples do not hold, and one the task does not have.
    report = cli.json("errors", str(repeat["id"]))
    labels = {json.loads(line)["intent"] for line in (SAMPLES / "massive_en" / "train.jsonl").read_text().splitlines()}
    absent = sorted(labels - set(report["per_label"]))[0]
    valid = cli.run("errors", str(repeat["id"]), "--label", absent, check=False)
    assert_one_line_error(valid, f"label '{absent}' is valid for massive-intent",
                          "but not in this run's test subset", "12 test example(s)")
    typo = cli.run("errors", str(repeat["id"]), "--label", absent + "x", check=False)
    assert_one_line_error(typo, f"'{absent}x' is not a label of massive-intent", f"did you mean '{absent}'")


def test_no_results_say_so_in_every_format(cli):
    assert cli.run("results").stdout.strip() == "no results yet (runs appear here when they succeed)"
    assert cli.run("results", "-f", "md").stdout.strip() == "no results yet (runs appear here when they succeed)"
    assert cli.run("results", "-f", "csv").stdout.strip() == "# no results yet (runs appear here when they succeed)"
    assert cli.run("results", "-f", "latex").stdout.strip() == "% no results yet (runs appear here when they succeed)"
    exported = cli.json("results")
    assert exported["rows"] == [] and exported["notes"] == ["no results yet (runs appear here when they succeed)"]


def test_models_fits_80_columns_and_says_where_the_rest_is(cli):
    cli.env["COLUMNS"] = "80"
    lines = cli.run("models").stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, lines
    assert lines[0].split() == ["alias", "kind", "params", "offline", "description"]
    rows = {line.split()[0]: line.split() for line in lines[1:6]}
    assert rows["minilm"][1:3] == ["encoder", "22.7M"] and rows["tiny-llama"][1] == "decoder"
    assert lines[-1] == "(clfbench models --json: hub ids, where each model loads from, install commands)"
