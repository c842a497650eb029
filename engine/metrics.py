"""Scores for predictions: classification reports, slot scores under a task's slot rule, exact match.

Pure Python on purpose: the CLI imports this module at queue time, so it must not pull torch, and
seqeval (which pulls scikit-learn) is imported only inside the slot functions.

Conventions shared by every function here:
- a `None` prediction is a parse failure: it is wrong, and it still counts in the denominator;
- empty input gives 0.0 scores and n=0 instead of a division by zero;
- gold and predicted lists of different lengths are a bug in the caller and raise `ClfbenchError`.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from clfbench.engine.types import ClfbenchError, Prediction

# Confusion-matrix columns for predictions that are not a label of the label set.
UNPARSED_COLUMN = "<unparsed>"  # a None prediction (the output could not be parsed)
OTHER_COLUMN = "<other>"  # a parsed string outside the label set (accepted LLM outputs can be)

# MASSIVE writes the outside tag as "Other"; seqeval and our BIO label sets use "O".
MASSIVE_OUTSIDE_TAG = "Other"
OUTSIDE_TAG = "O"


# --------------------------------------------------------------------------------------------
# Sequence classification
# --------------------------------------------------------------------------------------------


def _require_same_length(gold: Sequence, predicted: Sequence, what: str) -> None:
    """Scores over misaligned lists would be silently wrong, so refuse them."""
    if len(gold) != len(predicted):
        raise ClfbenchError(
            f"{what}: {len(gold)} gold values but {len(predicted)} predictions; they must pair up"
        )


def _require_gold_in_label_set(gold: Sequence[str], labels: Sequence[str]) -> None:
    """The task loader guarantees this; a gold label outside the set means a wrong label list."""
    label_set = set(labels)
    unknown = sorted({g for g in gold if g not in label_set})
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ClfbenchError(f"gold labels not in the task's label set: {names}")


def _safe_ratio(numerator: float, denominator: float) -> float:
    """0.0 where a score is undefined, like sklearn with zero_division=0 but without the warning."""
    return numerator / denominator if denominator else 0.0


def _per_label_scores(
    gold: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of every label of the label set.

    F1 is computed as 2tp / (2tp + fp + fn): the same value as 2PR / (P + R), defined (as 0.0) when
    P and R are both 0, and one rounding step only.
    """
    true_positives = dict.fromkeys(labels, 0)
    predicted_counts = dict.fromkeys(labels, 0)
    support = dict.fromkeys(labels, 0)
    for gold_label, predicted_label in zip(gold, predicted):
        support[gold_label] += 1
        if predicted_label in predicted_counts:
            predicted_counts[predicted_label] += 1
            if predicted_label == gold_label:
                true_positives[gold_label] += 1

    scores: dict[str, dict[str, float]] = {}
    for label in labels:
        tp = true_positives[label]
        false_positives = predicted_counts[label] - tp
        false_negatives = support[label] - tp
        scores[label] = {
            "precision": _safe_ratio(tp, tp + false_positives),
            "recall": _safe_ratio(tp, tp + false_negatives),
            "f1": _safe_ratio(2 * tp, 2 * tp + false_positives + false_negatives),
            "support": support[label],
        }
    return scores


def _confusion_matrix(
    gold: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str]
) -> dict:
    """A square matrix over one label list, rows = gold, columns = predicted.

    One list for both axes keeps rendering simple; the extra "<other>"/"<unparsed>" rows stay 0
    because gold labels always come from the label set. The extra columns appear only when needed.
    """
    label_set = set(labels)
    axis = list(labels)
    if any(p is not None and p not in label_set for p in predicted):
        axis.append(OTHER_COLUMN)
    if any(p is None for p in predicted):
        axis.append(UNPARSED_COLUMN)

    index = {label: i for i, label in enumerate(axis)}
    matrix = [[0] * len(axis) for _ in axis]
    for gold_label, predicted_label in zip(gold, predicted):
        if predicted_label is None:
            column = index[UNPARSED_COLUMN]
        elif predicted_label in label_set:
            column = index[predicted_label]
        else:
            column = index[OTHER_COLUMN]
        matrix[index[gold_label]][column] += 1
    return {"labels": axis, "matrix": matrix}


def _macro_f1(
    per_label: dict[str, dict[str, float]], gold: Sequence[str], predicted: Sequence[str | None]
) -> float:
    """Mean F1 over the labels of the label set that occur in gold or in predictions.

    Averaging over present labels only (not the whole label set) matches sklearn's
    `f1_score(average="macro")`, which averages over the union of labels seen in y_true and y_pred;
    a label no test example has and no prediction uses says nothing about the method.
    Unlike sklearn, None and out-of-set predictions do not add a class of their own: they are
    simply wrong.
    """
    present = set(gold) | {p for p in predicted if p is not None}
    f1_values = [scores["f1"] for label, scores in per_label.items() if label in present]
    return _safe_ratio(sum(f1_values), len(f1_values))


def classification_report(
    gold: list[str], predicted: list[str | None], labels: list[str]
) -> dict:
    """Accuracy, macro-F1, per-label scores and confusion matrix of a sequence-classification task.

    Returns {"accuracy", "macro_f1", "per_label", "confusion", "n"}; see the module conventions for
    None predictions and empty input.
    """
    _require_same_length(gold, predicted, "classification_report")
    _require_gold_in_label_set(gold, labels)
    per_label = _per_label_scores(gold, predicted, labels)
    correct = sum(1 for g, p in zip(gold, predicted) if p is not None and p == g)
    return {
        "accuracy": _safe_ratio(correct, len(gold)),
        "macro_f1": _macro_f1(per_label, gold, predicted),
        "per_label": per_label,
        "confusion": _confusion_matrix(gold, predicted, labels),
        "n": len(gold),
    }


def per_label_report(
    gold: list[str], predicted: list[str | None], labels: list[str]
) -> dict[str, dict[str, float]]:
    """{label: {"precision", "recall", "f1", "support"}} for every label of the label set."""
    _require_same_length(gold, predicted, "per_label_report")
    _require_gold_in_label_set(gold, labels)
    return _per_label_scores(gold, predicted, labels)


# --------------------------------------------------------------------------------------------
# Token classification (slot filling): spans under a task's slot rule
# --------------------------------------------------------------------------------------------

# How slot spans are read, a property of the task (its `slot_metric:`), never of the method:
SLOT_RULES = {
    # MASSIVE's official evaluation (alexa/massive `eval_preds` + `convert_to_bio`): every tag is reduced to its
    # word's slot type and BIO is rebuilt from runs of the same type, then seqeval's default mode. A head's
    # "B-x B-x" over one two-word slot is one span, an "I-x" start opens a span. Gold is read the same way.
    "massive": "MASSIVE official: per-word slot types, BIO rebuilt from runs, seqeval",
    # seqeval's default mode on the tags as predicted (conlleval's reading: an I-x after O or another type opens a
    # span). The standard for CoNLL-2003 / ATIS, whose gold has adjacent same-type spans the MASSIVE rule would merge.
    "conlleval": "conlleval: seqeval default mode on the tags as predicted",
    # seqeval strict IOB2: a span must start with B-x and continue with I-x of the same type; anything else is no span.
    "strict": "strict IOB2: seqeval strict mode",
}
DEFAULT_SLOT_RULE = "conlleval"  # a token task that declares none (user NER / slot data)

# The metrics that depend on the slot rule: their result rows name it.
RULED_METRICS = ("slot_f1", "slot_precision", "slot_recall", "exact_match")


def _check_rule(rule: str) -> None:
    if rule not in SLOT_RULES:
        raise ClfbenchError(f"unknown slot metric rule {rule!r} (known: {', '.join(SLOT_RULES)})")


def normalise_tags(pred: Sequence[str] | None, gold_len: int) -> list[str]:
    """Make a tag sequence comparable with a gold sequence of `gold_len` tags.

    MASSIVE's rules for length and outside tag (alexa/massive `eval_preds`), used by every slot rule: "Other"
    becomes "O"; a longer prediction is cut to the gold length and a shorter one padded with "O", so an LLM that
    drops or adds tokens loses only those positions; a parse failure (None) becomes all "O", i.e. no slots.
    Also used on gold sequences (with their own length) for the "Other" mapping.
    """
    if pred is None:
        return [OUTSIDE_TAG] * gold_len
    tags = [OUTSIDE_TAG if tag == MASSIVE_OUTSIDE_TAG else tag for tag in pred[:gold_len]]
    return tags + [OUTSIDE_TAG] * (gold_len - len(tags))


def massive_bio(tags: Sequence[str]) -> list[str]:
    """MASSIVE's `convert_to_bio` on our tags: each tag becomes its word's slot type ("B-x", "I-x" and a bare "x"
    all mean x; "O" means outside), then a word whose type differs from the previous word's opens "B-type" and a
    word of the same type continues "I-type"."""
    rebuilt, previous = [], None
    for tag in tags:
        slot_type = None if tag == OUTSIDE_TAG else tag[2:] if tag[:2] in ("B-", "I-") else tag
        if slot_type is None:
            rebuilt.append(OUTSIDE_TAG)
        else:
            rebuilt.append(("I-" if slot_type == previous else "B-") + slot_type)
        previous = slot_type
    return rebuilt


def rule_sequences(
    gold_tags: Sequence[Sequence[str]], predicted_tags: Sequence[Sequence[str] | None], rule: str
) -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted sequences as the rule reads them: `normalise_tags`, then (massive) BIO rebuilt."""
    _check_rule(rule)
    _require_same_length(gold_tags, predicted_tags, "slot scores")
    gold_out = [normalise_tags(gold, len(gold)) for gold in gold_tags]
    pred_out = [normalise_tags(pred, len(gold)) for gold, pred in zip(gold_tags, predicted_tags)]
    if rule == "massive":
        gold_out = [massive_bio(tags) for tags in gold_out]
        pred_out = [massive_bio(tags) for tags in pred_out]
    return gold_out, pred_out


def strict_readable(tags: Sequence[str]) -> list[str]:
    """Tags as seqeval's strict IOB2 reader can take them: a tag that is neither "O" nor "B-x"/"I-x" (an LLM's bare
    "time") is no span under the strict rule, so it reads as "O" (seqeval itself raises KeyError on it)."""
    return [tag if tag == OUTSIDE_TAG or tag[:2] in ("B-", "I-") else OUTSIDE_TAG for tag in tags]


def _seqeval_mode(rule: str) -> dict:
    """seqeval's keyword arguments for a rule (imported here: seqeval pulls scikit-learn, which the CLI must not
    pay for at import time)."""
    if rule == "strict":
        from seqeval.scheme import IOB2

        return {"mode": "strict", "scheme": IOB2}
    return {}


def slot_scores(
    gold_tags: list[list[str]], predicted_tags: list[list[str] | None], rule: str = DEFAULT_SLOT_RULE
) -> dict[str, float]:
    """Span-level micro precision/recall/F1 with seqeval, the spans read under `rule` (see SLOT_RULES).

    zero_division=0 gives the same numbers as seqeval's default ("warn") without the warning.
    Returns {"slot_f1", "slot_precision", "slot_recall", "n"}.
    """
    gold_norm, pred_norm = rule_sequences(gold_tags, predicted_tags, rule)
    if not gold_norm:
        return {"slot_f1": 0.0, "slot_precision": 0.0, "slot_recall": 0.0, "n": 0}

    from seqeval.metrics import f1_score, precision_score, recall_score

    mode = _seqeval_mode(rule)
    if rule == "strict":
        gold_norm, pred_norm = [strict_readable(t) for t in gold_norm], [strict_readable(t) for t in pred_norm]
    return {
        "slot_f1": float(f1_score(gold_norm, pred_norm, zero_division=0, **mode)),
        "slot_precision": float(precision_score(gold_norm, pred_norm, zero_division=0, **mode)),
        "slot_recall": float(recall_score(gold_norm, pred_norm, zero_division=0, **mode)),
        "n": len(gold_norm),
    }


def token_accuracy(
    gold_tags: list[list[str]], predicted_tags: list[list[str] | None]
) -> float:
    """Share of gold token positions whose normalised predicted tag equals the gold tag (the tags as predicted,
    whatever the slot rule: a per-position score, not a span score).

    Counted over positions, not sentences (long sentences weigh more), the usual tagging accuracy.
    """
    gold_norm, pred_norm = rule_sequences(gold_tags, predicted_tags, "conlleval")
    positions = sum(len(gold) for gold in gold_norm)
    correct = sum(
        1 for gold, pred in zip(gold_norm, pred_norm) for g, p in zip(gold, pred) if g == p
    )
    return _safe_ratio(correct, positions)


def exact_match(
    gold_labels: list[str],
    predicted_labels: list[str | None],
    gold_tags: list[list[str]],
    predicted_tags: list[list[str] | None],
    rule: str = DEFAULT_SLOT_RULE,
) -> float:
    """Share of examples whose label is right AND whose tag sequence, read under `rule`, equals gold's.

    MASSIVE's "exact match accuracy" (one utterance is understood only if both parts are right). Under "massive"
    the sequences compared are the rebuilt BIO ones, as in alexa/massive `eval_preds` (so "B-x B-x" over a
    two-word slot matches gold "B-x I-x"); under "conlleval" and "strict" the normalised tags as predicted, as
    ATIS/SNIPS "sentence frame accuracy" compares them (an "I-x" start that seqeval's default mode reads as the
    right span is still not an exact match).
    """
    flags = exact_match_flags(gold_labels, predicted_labels, gold_tags, predicted_tags, rule)
    return _safe_ratio(sum(flags), len(flags))


def exact_match_flags(
    gold_labels: list[str],
    predicted_labels: list[str | None],
    gold_tags: list[list[str]],
    predicted_tags: list[list[str] | None],
    rule: str = DEFAULT_SLOT_RULE,
) -> list[bool]:
    """Per example, whether `exact_match` counts it (the bootstrap in engine.stats resamples these)."""
    _require_same_length(gold_labels, predicted_labels, "exact_match intents")
    _require_same_length(gold_labels, gold_tags, "exact_match intents vs tags")
    gold_norm, pred_norm = rule_sequences(gold_tags, predicted_tags, rule)
    return [pred_label is not None and pred_label == gold_label and pred_seq == gold_seq
            for gold_label, pred_label, gold_seq, pred_seq in zip(gold_labels, predicted_labels, gold_norm, pred_norm)]


# --------------------------------------------------------------------------------------------
# Per-task result rows
# --------------------------------------------------------------------------------------------


def parse_failure_rate(statuses: list[str]) -> float:
    """Share of predictions whose output did not parse (status other than "ok"); 0.0 if none."""
    return _safe_ratio(sum(1 for status in statuses if status != "ok"), len(statuses))


def as_tags(value: str | Sequence[str] | None) -> list[str] | None:
    """Token-task gold/predictions are tag lists; also accept the stored space-joined form."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.split()
    return list(value)


# ---- calibration ------------------------------------------------------------------------------------------

CALIBRATION_BINS = 15  # equal-width bins over [0, 1], as Guo et al. (2017) measure ECE


def calibration_bin(confidence: float, bins: int = CALIBRATION_BINS) -> int:
    """The bin of a confidence: (k/B, (k+1)/B], 0 in the first; scikit-learn's calibration_curve binning (an edge
    goes to the lower bin), so the diagram matches what a reader computes with it."""
    return bisect_left([k / bins for k in range(1, bins)], confidence)


def confidences_of(predictions: Sequence[Prediction]) -> list[float] | None:
    """Every prediction's confidence, or None unless every prediction has one (a method without probabilities,
    or predictions stored before clfbench kept them)."""
    values = [p.confidence for p in predictions]
    return None if not values or any(v is None for v in values) else [float(v) for v in values]


def reliability(confidences: Sequence[float], correct: Sequence[bool], bins: int = CALIBRATION_BINS) -> list[dict]:
    """A reliability diagram's bars: per bin, its range, how many predictions fall in it, their mean confidence
    and the share of them that is right (empty bins listed with count 0)."""
    totals = [[0, 0.0, 0] for _ in range(bins)]  # count, confidence sum, right
    for confidence, right in zip(confidences, correct):
        total = totals[calibration_bin(confidence, bins)]
        total[0] += 1
        total[1] += confidence
        total[2] += bool(right)
    return [{"low": k / bins, "high": (k + 1) / bins, "count": count,
             "confidence": _safe_ratio(confidence_sum, count), "accuracy": _safe_ratio(right, count)}
            for k, (count, confidence_sum, right) in enumerate(totals)]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool],
                               bins: int = CALIBRATION_BINS) -> float:
    """ECE: the mean over predictions of |accuracy − confidence| of their bin, Σ_b (n_b / n)·|acc_b − conf_b|."""
    n = len(confidences)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability(confidences, correct, bins)
               if b["count"]) if n else 0.0


def task_results(kind: str, predictions: list[Prediction], labels: list[str],
                 slot_rule: str | None = None) -> dict[str, float]:
    """The result rows the worker stores for one task.

    "sequence": accuracy, macro_f1, parse_failure_rate, n, and ece where every prediction has a confidence.
    "token": slot_f1, slot_precision, slot_recall (spans read under `slot_rule`, default DEFAULT_SLOT_RULE),
    token_accuracy, parse_failure_rate, n.
    `labels` is the task's label set (used by the sequence scores; tag sets need no list).
    """
    failure_rate = parse_failure_rate([p.parse_status for p in predictions])
    if kind == "sequence":
        report = classification_report(
            [p.gold for p in predictions], [p.predicted for p in predictions], labels
        )
        results = {
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "parse_failure_rate": failure_rate,
            "n": report["n"],
        }
        confidences = confidences_of(predictions)
        if confidences is not None:
            results["ece"] = expected_calibration_error(confidences, [p.predicted == p.gold for p in predictions])
        return results
    if kind == "token":
        gold_tags = [as_tags(p.gold) or [] for p in predictions]
        predicted_tags = [as_tags(p.predicted) for p in predictions]
        slots = slot_scores(gold_tags, predicted_tags, slot_rule or DEFAULT_SLOT_RULE)
        return {
            "slot_f1": slots["slot_f1"],
            "slot_precision": slots["slot_precision"],
            "slot_recall": slots["slot_recall"],
            "token_accuracy": token_accuracy(gold_tags, predicted_tags),
            "parse_failure_rate": failure_rate,
            "n": slots["n"],
        }
    raise ClfbenchError(f"unknown task kind {kind!r}: expected 'sequence' or 'token'")


def joint_exact_match(
    intent_predictions: list[Prediction], slot_predictions: list[Prediction], rule: str = DEFAULT_SLOT_RULE
) -> float | None:
    """Exact match of a sequence task and a token task over the same texts (MASSIVE's intent + slots), the
    slots read under `rule`; None when the two tasks' test sets are not the same examples (no pairing to score).

    Pairs predictions by example_id (in the sequence list's order): the two tasks may order them differently.
    """
    flags = joint_exact_match_flags(intent_predictions, slot_predictions, rule)
    return None if flags is None else _safe_ratio(sum(flags), len(flags))


def joint_exact_match_flags(
    intent_predictions: list[Prediction], slot_predictions: list[Prediction], rule: str = DEFAULT_SLOT_RULE
) -> list[bool] | None:
    """Per example of the sequence task (in its order), whether joint_exact_match counts it; None when unpaired."""
    slots_by_id = {p.example_id: p for p in slot_predictions}
    if not intent_predictions or set(slots_by_id) != {p.example_id for p in intent_predictions}:
        return None
    pairs = [(intent, slots_by_id[intent.example_id]) for intent in intent_predictions]
    return exact_match_flags(
        [intent.gold for intent, _ in pairs],
        [intent.predicted for intent, _ in pairs],
        [as_tags(slot.gold) or [] for _, slot in pairs],
        [as_tags(slot.predicted) for _, slot in pairs],
        rule,
    )
