"""A fixed, realistic store for TUI tests, snapshots and screenshots.

`seed_store(path)` writes the same store every time: runs in every status, the three methods on MiniLM and
SmolLM2-135M, 0 and 5 shots, two seeds for some rows, single-task and consolidated (multi-task) runs on
20NG 20/7-class and MASSIVE intent/slots, loss curves, predictions (texts from engine/sample_data, some LLM parse
failures) and the result rows the worker would have written for those predictions (engine.metrics, the
scorer the worker uses, so results and predictions agree). Every timestamp derives from BASE_TIME and every
random draw from one seeded generator, so snapshots do not drift.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import yaml
from sqlalchemy import insert

from clfbench.engine import metrics, stats
from clfbench.engine.types import Prediction
from clfbench.storage.db import open_store
from clfbench.storage.models import Event, MetricPoint, PredictionRow, Result, Run

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "engine" / "sample_data"
TASK_DEFS = ROOT / "engine" / "task_defs"

# 2025-06-15 12:00:00 UTC. Freeze the TUI's clock at SEED_NOW so ages read the same in every snapshot.
BASE_TIME = 1_750_000_000.0
SEED_NOW = BASE_TIME + 6 * 3600


@dataclass(frozen=True)
class SeedRun:
    method: str
    model: str
    task: str
    shots: int = 0
    seed: int = 0
    status: str = "succeeded"
    quality: float = 0.8  # share of test examples predicted right
    parse_failures: float = 0.0  # share of LLM outputs that did not parse
    progress: tuple[int, int] | None = None
    error: str | None = None


ENCODER, PROMPT, LLM_FT = "encoder-finetune", "prompt", "llm-finetune"
MINILM, SMOLLM = "minilm", "smollm2-135m"
NG20, NG7, INTENT, SLOTS = "20ng-20class", "20ng-7class", "massive-intent", "massive-slots"
NG_BOTH, MASSIVE_BOTH = f"{NG20}+{NG7}", f"{INTENT}+{SLOTS}"

SEED_RUNS: list[SeedRun] = [
    # Encoder fine-tuning: single-task (two seeds) and consolidated, as in the paper's Table 3.
    SeedRun(ENCODER, MINILM, NG20, seed=0, quality=0.71),
    SeedRun(ENCODER, MINILM, NG20, seed=1, quality=0.68),
    SeedRun(ENCODER, MINILM, NG7, seed=0, quality=0.84),
    SeedRun(ENCODER, MINILM, NG7, seed=1, quality=0.82),
    SeedRun(ENCODER, MINILM, INTENT, seed=0, quality=0.86),
    SeedRun(ENCODER, MINILM, INTENT, seed=1, quality=0.84),
    SeedRun(ENCODER, MINILM, SLOTS, seed=0, quality=0.74),
    SeedRun(ENCODER, MINILM, SLOTS, seed=1, quality=0.72),
    SeedRun(ENCODER, MINILM, NG_BOTH, quality=0.73),
    SeedRun(ENCODER, MINILM, MASSIVE_BOTH, quality=0.83),
    # Prompting a small chat LLM: zero and five shots, with parse failures.
    SeedRun(PROMPT, SMOLLM, INTENT, shots=0, quality=0.18, parse_failures=0.22),
    SeedRun(PROMPT, SMOLLM, INTENT, shots=5, seed=0, quality=0.34, parse_failures=0.08),
    SeedRun(PROMPT, SMOLLM, INTENT, shots=5, seed=1, quality=0.30, parse_failures=0.10),
    SeedRun(PROMPT, SMOLLM, SLOTS, shots=0, quality=0.10, parse_failures=0.35),
    SeedRun(PROMPT, SMOLLM, NG7, shots=0, quality=0.31, parse_failures=0.12),
    SeedRun(PROMPT, SMOLLM, NG20, shots=5, quality=0.14, parse_failures=0.18),
    # Fine-tuned LLM: single-task and consolidated.
    SeedRun(LLM_FT, SMOLLM, INTENT, quality=0.80, parse_failures=0.02),
    SeedRun(LLM_FT, SMOLLM, NG20, quality=0.62, parse_failures=0.03),
    SeedRun(LLM_FT, SMOLLM, NG7, quality=0.78, parse_failures=0.01),
    SeedRun(LLM_FT, SMOLLM, MASSIVE_BOTH, quality=0.76, parse_failures=0.04),
    SeedRun(LLM_FT, SMOLLM, NG_BOTH, quality=0.66, parse_failures=0.03),
    # Every other status.
    SeedRun(ENCODER, MINILM, SLOTS, seed=2, status="running", progress=(120, 400)),
    SeedRun(PROMPT, SMOLLM, SLOTS, shots=5, status="running", progress=(37, 200)),
    SeedRun(PROMPT, SMOLLM, NG20, shots=0, status="queued"),
    SeedRun(LLM_FT, SMOLLM, SLOTS, status="queued"),
    SeedRun(LLM_FT, SMOLLM, SLOTS, seed=1, status="failed",
            error="RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total)"),
    SeedRun(PROMPT, SMOLLM, NG7, shots=5, status="cancelled", progress=(12, 100), error="cancelled by user"),
    SeedRun(ENCODER, MINILM, NG20, seed=2, status="interrupted", progress=(80, 300),
            error="worker exited with signal 9; no retries left (2)"),
]

FINETUNE_STEPS = 300


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _labels(task: str) -> list[str]:
    return yaml.safe_load((TASK_DEFS / f"{task}.yaml").read_text())["labels"]


def _test_examples(task: str) -> list[tuple[str, str, str | list[str]]]:
    """(example_id, text, gold) of the task's test split in engine/sample_data."""
    if task.startswith("20ng"):
        rows = _read_jsonl(SAMPLES / "20ng" / "test.jsonl")
        root = task == NG7  # the 7-class task is the newsgroup's root, as engine/task_defs says
        return [(r["id"], r["text"], r["label"].split(".")[0] if root else r["label"]) for r in rows]
    rows = _read_jsonl(SAMPLES / "massive_en" / "test.jsonl")
    if task == INTENT:
        return [(r["id"], r["text"], r["intent"]) for r in rows]
    return [(r["id"], r["text"], list(r["slots"])) for r in rows]


def _confusable(label: str, labels: list[str], rng: random.Random) -> str:
    """A wrong label a model would plausibly pick: one sharing the prefix (alarm_set -> alarm_query)."""
    prefix = label.replace(".", "_").split("_")[0]
    near = [other for other in labels if other != label and other.replace(".", "_").split("_")[0] == prefix]
    if near and rng.random() < 0.7:
        return rng.choice(near)
    return rng.choice([other for other in labels if other != label])


def _wrong_tags(gold: list[str], rng: random.Random) -> list[str]:
    """Gold tags with one slot dropped, retyped or a spurious one added."""
    tags = list(gold)
    slotted = [i for i, tag in enumerate(tags) if tag != "O"]
    if slotted and rng.random() < 0.6:
        i = rng.choice(slotted)
        tags[i] = "O" if rng.random() < 0.5 else tags[i][:2] + rng.choice(["date", "time", "place_name", "person"])
    else:
        tags[rng.randrange(len(tags))] = rng.choice(["B-date", "B-time", "B-place_name"])
    return tags


_GARBAGE = ["", "I'm sorry, I can't help with that.", "The answer is:", "{\"label\": ", "Sure! Here is"]


def _predict(run: SeedRun, task: str, rng: random.Random) -> list[Prediction]:
    labels = _labels(task) if task != SLOTS else []
    is_llm = run.method != ENCODER
    out = []
    for example_id, text, gold in _test_examples(task):
        token_task = isinstance(gold, list)
        if is_llm and rng.random() < run.parse_failures:
            raw = rng.choice(_GARBAGE)
            status = "empty" if not raw else ("wrong_length" if token_task else "not_in_label_set")
            out.append(Prediction(example_id, text, gold, None, raw_output=raw, parse_status=status))
            continue
        right = rng.random() < run.quality
        if token_task:
            predicted = gold if right else _wrong_tags(gold, rng)
            raw = json.dumps(predicted) if is_llm else None
        else:
            predicted = gold if right else _confusable(gold, labels, rng)
            raw = f"{predicted}" if is_llm else None
        out.append(Prediction(example_id, text, gold, predicted, raw_output=raw))
    return out


def _spec(run: SeedRun) -> tuple[str, str]:
    options = {"epochs": 3, "lr": 5e-5, "batch_size": 16} if run.method != PROMPT else {"decision": "generate"}
    spec = {"method": run.method, "model": run.model, "task": run.task, "shots": run.shots, "seed": run.seed,
            "gpus": None, "nproc": 1, "data_dir": None, "name": None, "options": options}
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


def _loss_curve(steps: int, start: float, end: float, rng: random.Random, every: int) -> list[tuple[int, float]]:
    return [(step, end + (start - end) * math.exp(-step / (steps / 4)) + rng.uniform(-0.03, 0.03))
            for step in range(every, steps + 1, every)]


def _metric_points(run_id: int, run: SeedRun, started: float, rng: random.Random) -> list[dict]:
    """Loss curves for fine-tuning runs (up to the progress step of an unfinished one), throughput for prompts."""
    if run.status == "queued":
        return []
    last_step = run.progress[0] if run.progress else FINETUNE_STEPS
    points = []
    if run.method == PROMPT:
        for step in range(10, last_step + 1, 10):
            points.append((step, "examples_per_s", 4.0 + rng.uniform(-0.5, 0.5)))
    else:
        points += [(s, "train_loss", v) for s, v in _loss_curve(FINETUNE_STEPS, 3.2, 0.35, rng, 10) if s <= last_step]
        points += [(s, "eval_loss", v + 0.15) for s, v in _loss_curve(FINETUNE_STEPS, 3.0, 0.4, rng, 50)
                   if s <= last_step]
        points += [(s, "eval_accuracy", min(1.0, run.quality * (1 - math.exp(-s / 60))))
                   for s in range(50, last_step + 1, 50)]
    return [{"run_id": run_id, "attempt": 1, "step": step, "name": name, "value": value,
             "time": started + step * 1.5} for step, name, value in points]


TEST_SPEED = {ENCODER: 310.0, PROMPT: 4.2, LLM_FT: 6.5}  # test examples/s on a GPU box, zero-shot


def _result_rows(run: SeedRun, predictions: dict[str, list[Prediction]], wall_time: float) -> list[dict]:
    """What engine.worker.result_rows stores, from the same scorer (it is torch-free)."""
    rows = []
    for task, task_predictions in predictions.items():
        kind = "token" if task == SLOTS else "sequence"
        labels = _labels(task) if kind == "sequence" else []
        values = metrics.task_results(kind, task_predictions, labels)
        values["wall_time_s"] = wall_time
        values["examples_per_s"] = len(task_predictions) / wall_time
        # What the worker measures at test time: methods differ by orders of magnitude (the plot screen's x axis).
        values["test_examples_per_s"] = TEST_SPEED[run.method] / (1 + 1.5 * run.shots / 5) * (1 + 0.05 * run.seed)
        intervals = _intervals(kind, task_predictions, labels)
        rows += [{"task": task, "metric": name, "value": float(value),
                  **intervals.get(name, _interval(None))} for name, value in values.items()]
    if INTENT in predictions and SLOTS in predictions:
        joint = stats.exact_match_counts(predictions[INTENT], predictions[SLOTS], metrics.DEFAULT_SLOT_RULE)
        rows.append({"task": SLOTS, "metric": "exact_match", "value": joint.value(), **_interval(joint)})
    return rows


_INTERVALS: dict[tuple, dict[str, dict]] = {}


def _with_confidence(run_id: int, run: SeedRun, task: str, predictions: list[Prediction]) -> list[Prediction]:
    """An encoder head's softmax confidence per answer, over-confident as fine-tuned encoders are (Guo et al.):
    high when right, still fairly high when wrong. Its own generator, so the shared draws (and every other
    snapshot) stay as they were."""
    if run.method != ENCODER or task == SLOTS:
        return predictions
    rng = random.Random(run_id)
    return [dataclasses.replace(p, confidence=(0.6 + 0.4 * rng.random() ** 0.4 if p.predicted == p.gold
                                               else 0.35 + 0.6 * rng.random())) for p in predictions]


def _intervals(kind: str, predictions: list[Prediction], labels: list[str]) -> dict[str, dict]:
    """Each metric's interval columns, computed once per process for the same predictions (every TUI test seeds a
    fresh store; the bootstrap would otherwise be most of the seeding time)."""
    key = (kind, tuple((p.example_id, str(p.gold), str(p.predicted), p.parse_status, p.confidence)
                       for p in predictions))
    if key not in _INTERVALS:
        _INTERVALS[key] = {name: _interval(counts) for name, counts in
                           stats.task_counts(kind, predictions, labels).items()}
    return _INTERVALS[key]


def _interval(counts) -> dict:
    """A result's 95% bootstrap interval, as the worker stores it (none for counts, times and rates per second)."""
    if counts is None:
        return {"low": None, "high": None, "resamples": None}  # one executemany: every row has the same keys
    interval = stats.bootstrap_interval(counts)
    return {"low": interval.low, "high": interval.high, "resamples": interval.resamples}


def _log_lines(run_id: int, run: SeedRun) -> str:
    lines = [f"[clfbench] run {run_id}: {run.method} {run.model} {run.task} shots={run.shots} seed={run.seed}",
             "[clfbench] loading tasks and model"]
    last = run.progress[0] if run.progress else (FINETUNE_STEPS if run.status != "queued" else 0)
    lines += [f"[clfbench] step {step}" for step in range(50, last + 1, 50)]
    if run.error:
        lines.append(run.error)
    if run.status == "succeeded":
        lines.append("[clfbench] finished")
    return "\n".join(lines) + "\n"


def seed_store(path: Path) -> str:
    """Create the seeded SQLite store at `path` (its folder must exist); returns its URL for open_store/--db.

    Run logs go to `<folder>/logs/run-<id>.log`. Calling it twice on a fresh path gives identical stores.
    """
    path = Path(path)
    url = f"sqlite:///{path}"
    store = open_store(url)
    logs = path.parent / "logs"
    logs.mkdir(exist_ok=True)
    rng = random.Random(20250615)
    with store.write() as connection:
        for index, run in enumerate(SEED_RUNS):
            run_id = index + 1
            created = BASE_TIME + index * 600
            started = None if run.status == "queued" else created + 60
            finished = started + 900 if run.status not in ("queued", "running") else None
            spec_json, spec_hash = _spec(run)
            log_path = logs / f"run-{run_id}.log"
            if run.status != "queued":
                log_path.write_text(_log_lines(run_id, run))
            progress = run.progress or ((FINETUNE_STEPS, FINETUNE_STEPS) if run.status == "succeeded" else None)
            connection.execute(insert(Run.__table__).values(
                id=run_id, method=run.method, model=run.model, task=run.task, shots=run.shots, seed=run.seed,
                spec_json=spec_json, spec_hash=spec_hash, code_version="seed", status=run.status,
                launch="process" if run.method == PROMPT else "torchrun",
                gpus_assigned="0" if run.status == "running" else None,
                attempt=0 if run.status == "queued" else 1,
                interruptions=2 if run.status == "interrupted" else 0,
                host=None if run.status == "queued" else "bench-host",
                pid=40000 + run_id if run.status == "running" else None,
                heartbeat_at=SEED_NOW - 2 if run.status == "running" else finished,
                created_at=created, started_at=started, finished_at=finished,
                cancel_requested=run.status == "cancelled", error=run.error,
                log_path=str(log_path) if run.status != "queued" else None,
                progress_step=progress[0] if progress else None,
                progress_total=progress[1] if progress else None,
            ))
            events = [("queued", f"{run.method} {run.model} {run.task}", created)]
            if started is not None:
                events += [("claimed", "attempt 1 on bench-host", started), ("launched", "pid 4000", started + 1)]
            if finished is not None:
                events.append((run.status, (run.error or "attempt 1")[:500], finished))
            connection.execute(insert(Event.__table__), [
                {"time": t, "run_id": run_id, "kind": kind, "message": message} for kind, message, t in events])
            points = _metric_points(run_id, run, started or created, rng)
            if points:
                connection.execute(insert(MetricPoint.__table__), points)
            if run.status != "succeeded":
                continue
            predictions = {task: _with_confidence(run_id, run, task, _predict(run, task, rng))
                           for task in run.task.split("+")}
            rows = [{"run_id": run_id, "task": task, "example_id": p.example_id, "text": p.text,
                     "gold": " ".join(p.gold) if isinstance(p.gold, list) else p.gold,
                     "predicted": " ".join(p.predicted) if isinstance(p.predicted, list) else p.predicted,
                     "raw_output": p.raw_output, "parse_status": p.parse_status, "confidence": p.confidence}
                    for task, task_predictions in predictions.items() for p in task_predictions]
            connection.execute(insert(PredictionRow.__table__), rows)
            connection.execute(insert(Result.__table__), [
                {"run_id": run_id, **row} for row in _result_rows(run, predictions, finished - started)])
    store.engine.dispose()
    return url
