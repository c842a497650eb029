"""TF-IDF + logistic regression, the classical baseline: `run(ctx) -> MethodOutput`.

The vectorizer learns its n-gram vocabulary and IDF weights from the training texts only; a multinomial logistic
regression (lbfgs) is fitted on them; the test texts (and the dev texts, when the task has a dev split: their
accuracy is reported, never used to choose anything) are predicted with it. Everything runs in one process on
the CPU. No torch: this module does not import it, and the worker does not set it up for this method (the catalog
entry says `local_model=False`: the run's `model` is only a name for the features).
"""
from __future__ import annotations

import os
import time
import warnings

from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from clfbench.engine.context import EVALUATING, TESTING, TRAINING, RunContext
from clfbench.engine.methods.catalog import TfidfOptions
from clfbench.engine.types import Example, MethodOutput, Predicted, TaskData

LOG = "tfidf:"


def make_vectorizer(opts: TfidfOptions) -> TfidfVectorizer:
    return TfidfVectorizer(ngram_range=(1, opts.max_ngram), min_df=opts.min_df, max_features=opts.max_features,
                           sublinear_tf=opts.sublinear_tf, lowercase=opts.lowercase)


def make_classifier(opts: TfidfOptions, seed: int) -> LogisticRegression:
    # lbfgs is deterministic; the seed only matters to solvers that shuffle, and is passed so that none can drift.
    return LogisticRegression(C=opts.C, max_iter=opts.max_iter, solver="lbfgs", random_state=seed,
                              class_weight=None if opts.class_weight == "none" else "balanced")


def fit_quietly(classifier: LogisticRegression, features, labels: list[str]) -> int:
    """Fit, and return the solver's iterations. scikit-learn's multi-line ConvergenceWarning would land in the
    run's log as a traceback-like block: the caller prints one line instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(features, labels)
    return int(max(classifier.n_iter_))


def accuracy(predicted: list[str], examples: list[Example]) -> float:
    return sum(p == e.label for p, e in zip(predicted, examples)) / len(examples)


def cpu_threads() -> int:
    """The cores the engine gave this run (its CPU slot of the host, as the worker gives torch), or fewer when the
    engine's environment asks for fewer with OMP_NUM_THREADS (scikit-learn's loss runs on OpenMP threads)."""
    slot = int(os.environ.get("CLFBENCH_CPU_THREADS") or os.cpu_count() or 1)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(slot, int(asked)) if asked.isdigit() else slot)


def fit(task: TaskData, opts: TfidfOptions, seed: int) -> tuple[TfidfVectorizer, LogisticRegression, dict]:
    """The vectorizer and the classifier fitted on the training texts, and the numbers to store about them."""
    started = time.perf_counter()
    vectorizer = make_vectorizer(opts)
    features = vectorizer.fit_transform([e.text for e in task.train])
    n_features = len(vectorizer.vocabulary_)
    print(f"{LOG} {task.name}: {len(task.train)} training texts -> {n_features} word 1-{opts.max_ngram}-gram "
          f"features in {time.perf_counter() - started:.1f}s", flush=True)
    fit_started = time.perf_counter()
    classifier = make_classifier(opts, seed)
    iterations = fit_quietly(classifier, features, [e.label for e in task.train])
    print(f"{LOG} logistic regression (C={opts.C:g}, lbfgs) fitted in {time.perf_counter() - fit_started:.1f}s, "
          f"{iterations} iterations", flush=True)
    if iterations >= opts.max_iter:
        print(f"{LOG} warning: lbfgs did not converge in max_iter={opts.max_iter} iterations (raise -o max_iter)",
              flush=True)
    numbers = {"features": float(n_features), "iterations": float(iterations),
               "fit_time_s": time.perf_counter() - started}
    return vectorizer, classifier, numbers


def predict(vectorizer: TfidfVectorizer, classifier: LogisticRegression, examples: list[Example]) -> list[str]:
    return [str(label) for label in classifier.predict(vectorizer.transform([e.text for e in examples]))]


def predict_with_confidence(vectorizer: TfidfVectorizer, classifier: LogisticRegression,
                            examples: list[Example]) -> list[tuple[str, float]]:
    """Each example's label and the probability the logistic regression gives it (calibration reads it)."""
    if not examples:
        return []
    probabilities = classifier.predict_proba(vectorizer.transform([e.text for e in examples]))
    best = probabilities.argmax(axis=1)
    return [(str(classifier.classes_[b]), float(row[b])) for b, row in zip(best, probabilities)]


def classify(task: TaskData, opts: TfidfOptions, ctx: RunContext) -> tuple[dict[str, Predicted], dict[str, float]]:
    """Fit on train, report dev, predict test: the test predictions by example id, and the numbers to store."""
    total = 2 + bool(task.dev)  # stages: fit, (dev,) test
    ctx.set_phase(TRAINING)
    vectorizer, classifier, extra = fit(task, opts, ctx.seed)
    ctx.set_progress(1, total)
    if task.dev:  # reported only: nothing is chosen by it
        ctx.set_phase(EVALUATING, 0, len(task.dev))
        dev_accuracy = accuracy(predict(vectorizer, classifier, task.dev), task.dev)
        extra["dev_accuracy"] = dev_accuracy
        ctx.log_metric(int(extra["iterations"]), "eval_accuracy", dev_accuracy)
        print(f"{LOG} dev accuracy {dev_accuracy:.4f} ({len(task.dev)} examples)", flush=True)
        ctx.set_progress(2, total)
    started = time.perf_counter()
    ctx.set_phase(TESTING, 0, len(task.test))
    predicted = predict_with_confidence(vectorizer, classifier, task.test)
    extra["predict_time_s"] = time.perf_counter() - started
    # the name every method gives its test-time throughput (the Pareto plot's usual cost axis)
    extra["test_examples_per_s"] = len(task.test) / extra["predict_time_s"] if extra["predict_time_s"] > 0 else 0.0
    print(f"{LOG} predicted {len(task.test)} test texts in {extra['predict_time_s']:.1f}s", flush=True)
    ctx.set_progress(total, total)
    return {e.id: Predicted(label, confidence=p) for e, (label, p) in zip(task.test, predicted)}, extra


def run(ctx: RunContext) -> MethodOutput | None:
    if not ctx.is_main:  # one process does all the work; extra ranks (--nproc 2) have nothing to share
        return None
    (task,) = ctx.tasks  # the catalog entry allows one sequence task, checked by the worker
    threads = cpu_threads()
    print(f"{LOG} cpu, {threads} thread(s)", flush=True)
    with threadpool_limits(threads):  # oversubscribed OpenMP threads slow a busy host down many times over
        predictions, extra = classify(task, ctx.options, ctx)
    return MethodOutput(predictions={task.name: predictions}, extra_results={task.name: extra})
