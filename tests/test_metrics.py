"""Tests for engine.metrics: hand-computed cases, agreement with sklearn/seqeval, import hygiene."""
from __future__ import annotations

import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from clfbench.engine.metrics import (
    classification_report,
    exact_match,
    joint_exact_match,
    normalise_tags,
    parse_failure_rate,
    per_label_report,
    slot_scores,
    task_results,
    token_accuracy,
)
from clfbench.engine.types import ClfbenchError, Prediction

REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# classification_report
# ----------------------------------------------------------------------------------------------

LABELS = ["sports", "politics", "tech"]
#          0         1         2         3           4           5       6
GOLD = ["sports", "sports", "sports", "politics", "politics", "tech", "tech"]
PRED = ["sports", "sports", "politics", "politics", "sports", "tech", "politics"]
# Correct: 0, 1, 3, 5 -> accuracy 4/7.
# sports:   tp=2 (0,1); predicted at 0,1,4 -> fp=1; support 3 -> fn=1.
#           P=2/3, R=2/3, F1=2*2/(2*2+1+1)=2/3.
# politics: tp=1 (3); predicted at 2,3,6 -> fp=2; support 2 -> fn=1.
#           P=1/3, R=1/2, F1=2*1/(2+2+1)=2/5.
# tech:     tp=1 (5); predicted at 5 -> fp=0; support 2 -> fn=1.
#           P=1, R=1/2, F1=2*1/(2+0+1)=2/3.
# macro F1 = (2/3 + 2/5 + 2/3) / 3 = 26/45.
# Confusion (rows gold, cols predicted, order sports, politics, tech):
#   sports:   [2, 1, 0]   (0,1 -> sports; 2 -> politics)
#   politics: [1, 1, 0]   (4 -> sports; 3 -> politics)
#   tech:     [0, 1, 1]   (6 -> politics; 5 -> tech)


def test_classification_report_hand_computed():
    report = classification_report(GOLD, PRED, LABELS)

    assert report["n"] == 7
    assert report["accuracy"] == 4 / 7
    assert report["per_label"] == {
        "sports": {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3},
        "politics": {"precision": 1 / 3, "recall": 1 / 2, "f1": 2 / 5, "support": 2},
        "tech": {"precision": 1.0, "recall": 1 / 2, "f1": 2 / 3, "support": 2},
    }
    assert report["macro_f1"] == pytest.approx(26 / 45, abs=1e-15)
    assert report["confusion"] == {
        "labels": ["sports", "politics", "tech"],
        "matrix": [[2, 1, 0], [1, 1, 0], [0, 1, 1]],
    }


def test_per_label_report_is_the_per_label_part_of_the_report():
    report = classification_report(GOLD, PRED, LABELS)
    assert per_label_report(GOLD, PRED, LABELS) == report["per_label"]


def test_none_and_out_of_set_predictions_are_wrong_and_get_their_own_columns():
    labels = ["a", "b", "c"]
    gold = ["a", "b", "c", "a"]
    predicted = ["a", None, "c", "zzz"]
    report = classification_report(gold, predicted, labels)

    # Only 0 and 2 are right; the None still counts in the denominator.
    assert report["accuracy"] == 2 / 4
    assert report["n"] == 4
    assert report["confusion"]["labels"] == ["a", "b", "c", "<other>", "<unparsed>"]
    assert report["confusion"]["matrix"] == [
        [1, 0, 0, 1, 0],  # gold a: once a, once "zzz"
        [0, 0, 0, 0, 1],  # gold b: unparsed
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    # a: tp=1, fp=0, fn=1 -> P=1, R=1/2, F1=2/3; b: no tp, no prediction -> all 0.0; c: perfect.
    assert report["per_label"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert report["per_label"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["per_label"]["c"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    # b occurs in gold, so it counts in the macro average; None/"zzz" add no class of their own.
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.0 + 1.0) / 3, abs=1e-15)


def test_unparsed_column_only_when_some_prediction_is_none():
    report = classification_report(["a", "b"], ["b", "b"], ["a", "b"])
    assert report["confusion"]["labels"] == ["a", "b"]
    assert report["confusion"]["matrix"] == [[0, 1], [0, 1]]


def test_all_unparsed_gives_zero_accuracy_but_full_denominator():
    report = classification_report(["a", "b", "a"], [None, None, None], ["a", "b"])
    assert report["accuracy"] == 0.0
    assert report["macro_f1"] == 0.0
    assert report["n"] == 3
    assert report["confusion"]["matrix"][0] == [0, 0, 2]


def test_undefined_scores_are_zero_without_warnings_or_nan():
    # "c" is in the label set but never gold nor predicted: every ratio is 0/0.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = classification_report(["a", "b"], ["a", "a"], ["a", "b", "c"])
    assert report["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["per_label"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # Absent label "c" is left out of the macro average: (F1(a)=2/3 + F1(b)=0) / 2.
    assert report["macro_f1"] == pytest.approx(1 / 3, abs=1e-15)


def test_matches_sklearn_on_a_seeded_random_case():
    from sklearn.metrics import accuracy_score, f1_score

    rng = random.Random(1234)
    labels = ["w", "x", "y", "z", "never_seen"]
    gold = [rng.choice(labels[:4]) for _ in range(300)]
    # Predictions are right 60% of the time; wrong ones never use "z". "never_seen" is in the label
    # set only, so it must stay out of the macro average, as in sklearn.
    predicted = [g if rng.random() < 0.6 else rng.choice(["w", "x", "y"]) for g in gold]
    report = classification_report(gold, predicted, labels)

    assert report["accuracy"] == pytest.approx(accuracy_score(gold, predicted), abs=1e-12)
    assert report["macro_f1"] == pytest.approx(
        f1_score(gold, predicted, average="macro", zero_division=0), abs=1e-12
    )
    # Averaging over the whole label set (with "never_seen") would give a lower number.
    all_labels_mean = sum(s["f1"] for s in report["per_label"].values()) / len(labels)
    assert report["macro_f1"] > all_labels_mean + 1e-3


def test_empty_input_gives_zeros():
    report = classification_report([], [], ["a", "b"])
    assert report["accuracy"] == 0.0
    assert report["macro_f1"] == 0.0
    assert report["n"] == 0
    assert report["confusion"] == {"labels": ["a", "b"], "matrix": [[0, 0], [0, 0]]}
    assert report["per_label"]["a"]["support"] == 0


def test_misaligned_or_unknown_gold_raise_clfbench_error():
    with pytest.raises(ClfbenchError):
        classification_report(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(ClfbenchError, match="not in the task's label set"):
        classification_report(["a", "q"], ["a", "a"], ["a", "b"])


# ----------------------------------------------------------------------------------------------
# slot_scores / normalise_tags / token_accuracy
# ----------------------------------------------------------------------------------------------


def test_slot_scores_hand_computed_one_right_one_wrong_span():
    # Gold spans: city(0-1), date(3). Predicted: city(0-1) right, time(3) wrong type.
    # tp=1, predicted 2, gold 2 -> P=1/2, R=1/2, F1=1/2.
    gold = [["B-city", "I-city", "O", "B-date"]]
    predicted = [["B-city", "I-city", "O", "B-time"]]
    assert slot_scores(gold, predicted) == {
        "slot_f1": 0.5,
        "slot_precision": 0.5,
        "slot_recall": 0.5,
        "n": 1,
    }


def test_slot_scores_precision_and_recall_differ():
    # Gold spans: city(0), date(2), person(4) -> 3. Predicted: city(0) only -> 1, right.
    # P=1/1, R=1/3, F1=2*1*(1/3)/(1+1/3)=1/2.
    gold = [["B-city", "O", "B-date", "O", "B-person"]]
    predicted = [["B-city", "O", "O", "O", "O"]]
    scores = slot_scores(gold, predicted)
    assert scores["slot_precision"] == 1.0
    assert scores["slot_recall"] == pytest.approx(1 / 3, abs=1e-15)
    assert scores["slot_f1"] == pytest.approx(1 / 2, abs=1e-15)


def test_normalise_tags_rules():
    assert normalise_tags(["Other", "B-city", "Other"], 3) == ["O", "B-city", "O"]
    assert normalise_tags(["B-city", "I-city", "B-x"], 2) == ["B-city", "I-city"]
    assert normalise_tags(["B-city"], 3) == ["B-city", "O", "O"]
    assert normalise_tags(None, 2) == ["O", "O"]
    assert normalise_tags([], 0) == []


def test_other_is_mapped_to_o_in_gold_and_predictions():
    # Only equal after mapping "Other" -> "O" on both sides.
    gold = [["Other", "B-city"]]
    predicted = [["O", "B-city"]]
    predicted_other = [["Other", "B-city"]]
    assert token_accuracy(gold, predicted) == 1.0
    assert token_accuracy([["O", "B-city"]], predicted_other) == 1.0
    assert exact_match(["x"], ["x"], gold, predicted) == 1.0
    assert exact_match(["x"], ["x"], [["O", "B-city"]], predicted_other) == 1.0
    # seqeval warns on "Other" ("seems not to be NE tag"): the mapping must happen before it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert slot_scores(gold, predicted_other)["slot_f1"] == 1.0


def test_longer_prediction_is_cut_to_gold_length():
    # The extra span past the gold end must not count as a false positive: P stays 1.
    gold = [["O", "B-city"]]
    predicted = [["O", "B-city", "B-state", "I-state"]]
    assert slot_scores(gold, predicted) == {
        "slot_f1": 1.0,
        "slot_precision": 1.0,
        "slot_recall": 1.0,
        "n": 1,
    }


def test_shorter_prediction_is_padded_with_o():
    # Padded to [B-city, I-city, O, O]: city right, state missed -> P=1, R=1/2, F1=2/3.
    # Padding by repeating the last tag would extend the city span and make it wrong.
    gold = [["B-city", "I-city", "O", "B-state"]]
    predicted = [["B-city", "I-city"]]
    scores = slot_scores(gold, predicted)
    assert scores["slot_precision"] == 1.0
    assert scores["slot_recall"] == 0.5
    assert scores["slot_f1"] == pytest.approx(2 / 3, abs=1e-15)
    assert token_accuracy(gold, predicted) == 3 / 4


def test_none_prediction_is_all_o():
    # Second sentence unparsed -> no predicted spans there: P=1/1, R=1/2, F1=2/3.
    gold = [["B-city"], ["O", "B-date"]]
    predicted = [["B-city"], None]
    scores = slot_scores(gold, predicted)
    assert scores["slot_precision"] == 1.0
    assert scores["slot_recall"] == 0.5
    assert scores["slot_f1"] == pytest.approx(2 / 3, abs=1e-15)
    assert scores["n"] == 2
    # Positions: B-city right; "O" right (None -> O); B-date wrong -> 2/3.
    assert token_accuracy(gold, predicted) == 2 / 3


def _independent_normalise(pred, gold_len):
    """Test-side rewrite of MASSIVE's rules, kept separate from the code under test."""
    if pred is None:
        pred = []
    pred = ["O" if t == "Other" else t for t in pred]
    if len(pred) > gold_len:
        return pred[:gold_len]
    return pred + ["O"] * (gold_len - len(pred))


def test_slot_scores_equal_seqeval_called_directly_on_a_random_case():
    from seqeval.metrics import f1_score, precision_score, recall_score

    rng = random.Random(7)
    tag_choices = ["O", "O", "O", "Other", "B-city", "I-city", "B-date", "I-date", "B-time"]
    gold, predicted = [], []
    for _ in range(60):
        length = rng.randint(1, 8)
        gold_seq = [rng.choice(tag_choices) for _ in range(length)]
        gold.append(gold_seq)
        roll = rng.random()
        if roll < 0.1:
            predicted.append(None)
        else:
            pred_len = max(0, length + rng.choice([-2, -1, 0, 0, 0, 1, 2]))
            pred_seq = [
                gold_seq[i] if i < length and rng.random() < 0.7 else rng.choice(tag_choices)
                for i in range(pred_len)
            ]
            predicted.append(pred_seq)

    gold_norm = [_independent_normalise(g, len(g)) for g in gold]
    pred_norm = [_independent_normalise(p, len(g)) for g, p in zip(gold, predicted)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval's default zero_division="warn"
        expected = {
            "slot_f1": f1_score(gold_norm, pred_norm),
            "slot_precision": precision_score(gold_norm, pred_norm),
            "slot_recall": recall_score(gold_norm, pred_norm),
        }
    scores = slot_scores(gold, predicted)
    assert scores["n"] == 60
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-12), key
    # Sanity: the case is neither trivial nor perfect.
    assert 0.2 < scores["slot_f1"] < 0.95


def test_slot_scores_with_no_entities_anywhere_is_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = slot_scores([["O", "O"]], [["O", "O"]])
    assert scores == {"slot_f1": 0.0, "slot_precision": 0.0, "slot_recall": 0.0, "n": 1}


def test_slot_scores_empty_input():
    zeros = {"slot_f1": 0.0, "slot_precision": 0.0, "slot_recall": 0.0, "n": 0}
    assert slot_scores([], []) == zeros
    assert token_accuracy([], []) == 0.0


def test_slot_scores_misaligned_raise():
    with pytest.raises(ClfbenchError):
        slot_scores([["O"]], [])


# ----------------------------------------------------------------------------------------------
# exact match
# ----------------------------------------------------------------------------------------------


def test_exact_match_needs_intent_and_all_tags():
    gold_labels = ["alarm", "alarm", "weather", "weather", "weather"]
    predicted_labels = ["alarm", "weather", "weather", "weather", None]
    gold_tags = [["B-time", "O"], ["B-time"], ["B-city"], ["O", "B-date"], ["O"]]
    predicted_tags = [
        ["B-time", "O"],  # intent right, tags right -> match
        ["B-time"],  # tags right, intent wrong -> no
        ["I-city"],  # intent right; same span for seqeval, but a different tag sequence -> no
        ["O", "B-date", "B-x"],  # intent right; cut to gold length -> equal -> match
        ["O"],  # intent unparsed -> no
    ]
    assert exact_match(gold_labels, predicted_labels, gold_tags, predicted_tags) == 2 / 5


def test_exact_match_empty_is_zero():
    assert exact_match([], [], [], []) == 0.0


def _intent(example_id, gold, predicted):
    return Prediction(example_id=example_id, text="", gold=gold, predicted=predicted)


def _slots(example_id, gold, predicted, status="ok"):
    return Prediction(
        example_id=example_id, text="", gold=gold, predicted=predicted, parse_status=status
    )


def test_joint_exact_match_pairs_by_id_not_position():
    intents = [
        _intent("e1", "alarm", "alarm"),
        _intent("e2", "alarm", "weather"),
        _intent("e3", "weather", "weather"),
    ]
    slots = [
        _slots("e3", ["B-city"], ["B-city"]),
        _slots("e2", ["O"], ["O"]),
        _slots("e1", ["B-time", "O"], ["O", "O"]),
    ]
    # e1: intent right, slots wrong; e2: intent wrong; e3: both right -> 1/3. Pairing by position would score
    # e1's intent with e3's slots.
    assert joint_exact_match(intents, slots) == pytest.approx(1 / 3)


def test_joint_exact_match_needs_the_same_examples_on_both_sides():
    # Different test sets are not one set of utterances: no exact match rather than one over a silent subset.
    assert joint_exact_match([_intent("a", "x", "x")], [_slots("b", ["O"], ["O"])]) is None
    assert joint_exact_match([_intent("a", "x", "x"), _intent("b", "x", "x")], [_slots("b", ["O"], ["O"])]) is None
    assert joint_exact_match([], []) is None


# ----------------------------------------------------------------------------------------------
# parse_failure_rate / task_results
# ----------------------------------------------------------------------------------------------


def test_parse_failure_rate():
    assert parse_failure_rate(["ok", "invalid_json", "ok", "empty"]) == 0.5
    assert parse_failure_rate(["ok", "ok"]) == 0.0
    assert parse_failure_rate(["truncated"]) == 1.0
    assert parse_failure_rate([]) == 0.0


def test_task_results_sequence():
    predictions = [
        Prediction(example_id=str(i), text="", gold=g, predicted=p)
        for i, (g, p) in enumerate(zip(GOLD, PRED))
    ]
    predictions.append(
        Prediction(
            example_id="x", text="", gold="tech", predicted=None, parse_status="invalid_json"
        )
    )
    results = task_results("sequence", predictions, LABELS)
    assert set(results) == {"accuracy", "macro_f1", "parse_failure_rate", "n"}
    assert results["n"] == 8
    assert results["accuracy"] == 4 / 8
    assert results["parse_failure_rate"] == 1 / 8
    expected = classification_report(GOLD + ["tech"], PRED + [None], LABELS)
    assert results["macro_f1"] == expected["macro_f1"]


def test_task_results_token():
    predictions = [
        _slots("a", ["B-city", "I-city", "O", "B-date"], ["B-city", "I-city", "O", "B-time"]),
        _slots("b", ["O", "B-time"], None, status="wrong_length"),
        _slots("c", ["B-city", "O"], ["B-city", "Other", "B-x"]),
    ]
    results = task_results("token", predictions, ["O", "B-city", "I-city", "B-date", "B-time"])
    assert set(results) == {
        "slot_f1",
        "slot_precision",
        "slot_recall",
        "token_accuracy",
        "parse_failure_rate",
        "n",
    }
    # Gold spans: city, date (a); time (b); city (c) -> 4. Predicted: city, time (a); city (c) -> 3.
    # Right: city (a), city (c) -> tp=2. P=2/3, R=2/4, F1=2*2/(3+4)=4/7.
    assert results["slot_precision"] == pytest.approx(2 / 3, abs=1e-12)
    assert results["slot_recall"] == 0.5
    assert results["slot_f1"] == pytest.approx(4 / 7, abs=1e-12)
    # Positions: a 3/4 right, b 1/2 (the O), c 2/2 -> 6/8.
    assert results["token_accuracy"] == 6 / 8
    assert results["parse_failure_rate"] == 1 / 3
    assert results["n"] == 3


def test_task_results_token_accepts_space_joined_tags():
    predictions = [_slots("a", "B-city I-city O", "B-city I-city O")]
    results = task_results("token", predictions, [])
    assert results["slot_f1"] == 1.0
    assert results["token_accuracy"] == 1.0


def test_task_results_empty_and_unknown_kind():
    assert task_results("sequence", [], LABELS) == {
        "accuracy": 0.0,
        "macro_f1": 0.0,
        "parse_failure_rate": 0.0,
        "n": 0,
    }
    assert task_results("token", [], [])["n"] == 0
    with pytest.raises(ClfbenchError, match="unknown task kind"):
        task_results("span", [], [])


# ----------------------------------------------------------------------------------------------
# import hygiene
# ----------------------------------------------------------------------------------------------


def test_import_pulls_neither_torch_nor_seqeval():
    code = (
        "import sys, engine.metrics; "
        "print(sorted(m for m in ('torch', 'seqeval', 'sklearn') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
