"""The worker: `torchrun ... -m clfbench.engine.worker RUN_ID` (`python -m clfbench.engine.worker RUN_ID` for API
jobs).

It loads the run's spec from the store, loads the tasks and checks them against the method's catalog entry,
resolves the model, runs the method module, and on rank 0 writes metric points (batched), one prediction row per
test example and task (the method's answers joined with the gold labels and texts here, once for every method),
and result rows. It ends the run truthfully: `succeeded` with everything written in one transaction, or `failed`
with a one-line error (the engine appends the log tail). Any rank that raises records the failure; the first
writer wins because every write is guarded by the run's attempt.
"""
from __future__ import annotations

import importlib
import logging
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

from clfbench.engine import metrics, stats
from clfbench.engine.context import CONVERTING, LOADING_MODEL, WRITING_RESULTS, RunContext
from clfbench.engine.methods.catalog import check_task_fit
from clfbench.engine.models import _plan as model_plan
from clfbench.engine.models import resolve_model
from clfbench.engine.recorder import Recorder, RunNotOurs
from clfbench.engine.spec import RunSpec, spec_from_json
from clfbench.engine.tasks import get_task, identity, load_task, resolve_data_dir
from clfbench.engine.types import (EXIT_NOT_OURS, EXIT_STORE_UNREACHABLE, ClfbenchError, MethodOutput,
                                  Prediction, TaskData)
from clfbench.storage import queries, queue
from clfbench.storage.db import StoreError, open_store
from clfbench.storage.outage import StoreUnreachable, retrying

# A worker that stopped because the store stayed unreachable past CLFBENCH_STORE_OUTAGE_S exits
# EXIT_STORE_UNREACHABLE: its engine marks the run interrupted (requeued while retries are left) and the next
# attempt resumes from the last checkpoint. One whose run is no longer its own exits EXIT_NOT_OURS.


def _distributed_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _setup_torch(world_size: int, local_rank: int, seed: int) -> str:
    """Pick the device, start the process group when there are several ranks, seed every RNG."""
    import numpy as np
    import torch

    use_cuda = torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "") != ""
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
        # Share the threads given to this run (by the engine: the free cores at launch, or the spec's threads:)
        # between its ranks instead of oversubscribing them.
        cores = int(os.environ.get("CLFBENCH_CPU_THREADS") or os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // world_size))
        print(f"clfbench worker: cpu, {torch.get_num_threads()} thread(s) per rank", flush=True)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return device


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def _resolve_model_once(name: str, rank: int, world_size: int, recorder: Recorder) -> str:
    """Rank 0 resolves first, the others after it: a conversion into the model cache then happens once. While
    it converts (a GGUF into safetensors, a zip unpacked, a tiny model built) the run's phase says so."""
    path = None
    if rank == 0:
        converts = model_plan(name).action == "build"
        if converts:
            recorder.set_phase(CONVERTING)
        path = resolve_model(name)
        if converts:
            recorder.set_phase(LOADING_MODEL)
    _barrier(world_size)
    return path if path is not None else resolve_model(name)


def load_tasks(spec: RunSpec, tasks_json: str | None = None) -> list[TaskData]:
    """The run's tasks with the options' train_limit / test_limit applied (every method that has them).

    With `tasks_json` (the tasks frozen at queue time) each task is the frozen definition, whatever its YAML says
    now, and its data files must still have their frozen sha256 (else one line: the file changed). The hashes
    are compared after loading, against the very bytes loaded (engine.tasks.rows hashes what it reads), and
    also when loading fails, since a changed file is the likelier reason. Runs queued before tasks were frozen
    look their tasks up by name or path, as then."""
    options = spec.options
    entries = identity.frozen_tasks(tasks_json)
    definitions = [identity.thaw_task(entry) for entry in entries] or [get_task(name) for name in spec.task_names]
    loaded = []
    for position, task in enumerate(definitions):
        entry = entries[position] if entries else None
        try:
            loaded.append(load_task(task, data_dir=resolve_data_dir(spec.data_dir),
                                    train_limit=getattr(options, "train_limit", None),
                                    test_limit=getattr(options, "test_limit", None),
                                    dev_limit=getattr(options, "dev_limit", None), seed=spec.seed))
        finally:
            if entry is not None:
                identity.check_data_unchanged(entry)
    return loaded


def check_tasks(spec: RunSpec, tasks: list[TaskData]) -> None:
    """Before any model loads: the tasks fit the method (its catalog entry), hold data it can use, and the
    options fit the task kinds (the same checks as at queue time, for specs that reached the store other ways)."""
    info = spec.method_info
    check_task_fit(info, [(task.name, task.kind) for task in tasks])
    for task in tasks:
        if len(task.labels) < 2:
            raise ClfbenchError(f"{spec.method}: task {task.name} has fewer than two labels")
        if info.needs_train and not task.train:
            raise ClfbenchError(f"{spec.method}: task {task.name} has no training examples")
    try:
        spec.options.check_task_kinds([task.kind for task in tasks])
    except ValueError as error:
        raise ClfbenchError(f"invalid options for {spec.method}: {error}") from None


def join_predictions(tasks: list[TaskData], output: MethodOutput) -> dict[str, list[Prediction]]:
    """Per task, one row per test example in the test set's order: the method's answer with the gold label (or
    tags) and the text. A test example without an answer, or an answer for no test example, is an error."""
    joined = {}
    for task in tasks:
        answers = output.predictions.get(task.name, {})
        ids = [example.id for example in task.test]
        missing = [i for i in ids if i not in answers]
        unknown = sorted(set(answers) - set(ids))
        if missing or unknown:
            problem = (f"no prediction for {len(missing)} of {len(ids)} test examples (first: {missing[0]})" if missing
                       else f"predictions for {len(unknown)} ids not in the test set (first: {unknown[0]})")
            raise RuntimeError(f"the method returned {problem} of task {task.name}")
        joined[task.name] = [
            Prediction(example_id=example.id, text=example.text,
                       gold=list(example.tags or ()) if task.kind == "token" else example.label,
                       predicted=answers[example.id].value, raw_output=answers[example.id].raw_output,
                       parse_status=answers[example.id].parse_status, confidence=answers[example.id].confidence)
            for example in task.test
        ]
    return joined


def _prediction_rows(task: str, predictions: list[Prediction]) -> list[dict]:
    rows = []
    for p in predictions:
        gold = " ".join(p.gold) if isinstance(p.gold, list) else p.gold
        predicted = " ".join(p.predicted) if isinstance(p.predicted, list) else p.predicted
        rows.append({"task": task, "example_id": p.example_id, "text": p.text, "gold": gold,
                     "predicted": predicted, "raw_output": p.raw_output, "parse_status": p.parse_status,
                     "confidence": p.confidence})
    return rows


def run_costs(device: str, world_size: int, wall_time_s: float) -> dict[str, float]:
    """What a run cost, recorded the same way for every method, so the matrix can show any of them beside its
    quality (`clfbench results --metric gpu_seconds`): GPU-seconds (the run's GPUs × its wall time; 0 on CPU), the
    peak resident memory of rank 0's process, and on a GPU the peak memory torch allocated on rank 0's device."""
    import resource

    on_gpu = device.startswith("cuda")
    # ru_maxrss is in kB on Linux (bytes on macOS, where clfbench does not train).
    costs = {"gpu_seconds": (world_size if on_gpu else 0) * wall_time_s,
             "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
    if on_gpu:
        import torch

        costs["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 1e9
    return costs


def result_rows(tasks: list[TaskData], predictions: dict[str, list[Prediction]], extra: dict[str, dict[str, float]],
                wall_time_s: float, costs: dict[str, float] | None = None) -> list[dict]:
    """Every task's scores, then the joint ones. A slot score's row names the rule its spans were read under
    (`rule`), so a number never travels without the definition that produced it."""
    rows = []
    for task in tasks:
        values = metrics.task_results(task.kind, predictions[task.name], task.labels, task.slot_metric)
        values.update(extra.get(task.name, {}))
        values["wall_time_s"] = wall_time_s
        values.update(costs or {})
        intervals = {name: stats.bootstrap_interval(counts) for name, counts in
                     stats.task_counts(task.kind, predictions[task.name], task.labels, task.slot_metric).items()}
        rows += [_result_row(task, name, value, intervals.get(name)) for name, value in values.items()]
    return rows + joint_result_rows(tasks, predictions)


def _result_row(task: TaskData, metric: str, value: float, interval: stats.Interval | None = None) -> dict:
    """One result; a share of test examples (accuracy, F1s, rates) carries its 95% bootstrap interval."""
    rule = task.slot_metric or metrics.DEFAULT_SLOT_RULE if task.kind == "token" and metric in metrics.RULED_METRICS \
        else None
    row = {"task": task.name, "metric": metric, "value": float(value), "rule": rule}
    if interval is not None and interval.resamples:
        row.update(low=interval.low, high=interval.high, resamples=interval.resamples)
    return row


def joint_result_rows(tasks: list[TaskData], predictions: dict[str, list[Prediction]]) -> list[dict]:
    """Exact match (the label and every slot right, slots read under the token task's rule) for a run with one
    sequence task and one token task over the same test examples, whatever the tasks are called (a user's SNIPS
    intent + slots pair as much as MASSIVE's); stored under the token task."""
    sequence = [t for t in tasks if t.kind == "sequence"]
    token = [t for t in tasks if t.kind == "token"]
    if len(sequence) != 1 or len(token) != 1:
        return []
    rule = token[0].slot_metric or metrics.DEFAULT_SLOT_RULE
    counts = stats.exact_match_counts(predictions[sequence[0].name], predictions[token[0].name], rule)
    if counts is None:
        return []
    return [_result_row(token[0], "exact_match", counts.value(), stats.bootstrap_interval(counts))]


def _prepare(run: dict, recorder: Recorder, attempt: int) -> RunContext:
    """Everything up to the method's call: spec, device, tasks and their checks, model, the context."""
    rank, world_size, local_rank = _distributed_env()
    recorder.set_phase(LOADING_MODEL)  # until the method trains or tests: tasks, weights, tokenizer
    spec = spec_from_json(run["spec_json"])
    print(f"clfbench worker: run {run['id']} attempt {attempt} rank {rank}/{world_size}: "
          f"{spec.method} {spec.model} {spec.task}", flush=True)
    local_model = spec.method_info.local_model
    if local_model:
        device = _setup_torch(world_size, local_rank, spec.seed)
    else:  # no local weights (an API method, a classical baseline): no torch to import, seed or set up
        device = "cpu"
        random.seed(spec.seed)
    tasks = load_tasks(spec, run.get("tasks_json"))
    check_tasks(spec, tasks)  # before any model loads: a slot task with decision=score fails at once
    try:
        options = spec.options.resolved(spec.task_names)
    except ValueError as error:
        raise ClfbenchError(f"{spec.method}: {error}") from None
    # Without local weights the model is a name (the model on an API server, or just a label).
    model_path = _resolve_model_once(spec.model, rank, world_size, recorder) if local_model else spec.model
    output_dir = Path(os.environ.get("CLFBENCH_RUN_DIR") or run["output_dir"] or ".")
    return RunContext(
        run_id=run["id"], attempt=attempt, spec=spec, options=options, tasks=tasks, model_path=model_path,
        output_dir=output_dir, rank=rank, world_size=world_size, local_rank=local_rank, device=device,
        log_metric=recorder.log_metric, set_progress=recorder.set_progress, set_phase=recorder.set_phase,
        note_attempt=lambda note: _note_attempt(recorder, note),
    )


def _note_attempt(recorder: Recorder, note: str) -> None:
    """Rank 0 appends how this attempt began to the run's attempt_note (fenced: nothing if no longer ours)."""
    if not recorder.enabled:
        return
    try:
        queue.set_attempt_note(recorder.store, recorder.run_id, recorder.attempt, note)
    except Exception as error:  # a note is for people: a store hiccup here must not fail the training
        print(f"clfbench worker: could not note '{note}': {_one_line(error)}", flush=True)


def _finish(store, ctx: RunContext, output: MethodOutput | None, started: float) -> None:
    """Rank 0: join and score the predictions, then write them, the results and `succeeded` in one transaction."""
    if output is None:
        raise RuntimeError(f"method {ctx.method} returned no output on rank 0")
    predictions = join_predictions(ctx.tasks, output)
    rows = [row for task in ctx.tasks for row in _prediction_rows(task.name, predictions[task.name])]
    wall_time_s = time.time() - started
    results = result_rows(ctx.tasks, predictions, output.extra_results, wall_time_s=wall_time_s,
                          costs=run_costs(ctx.device, ctx.world_size, wall_time_s))
    # Through an outage: retried for the window (storage.outage), then StoreUnreachable. A commit whose answer the
    # outage swallowed is retried too and then refused (the run is no longer running): it was written.
    if retrying(lambda: queue.finish_succeeded(store, ctx.run_id, ctx.attempt, rows, results),
                "writing the run's results"):
        # The resume checkpoint (weights + optimizer state, ~3x the model) has served its purpose;
        # a retry of a finished run should train again, not skip to the end.
        shutil.rmtree(ctx.output_dir / "checkpoint", ignore_errors=True)
        for task in ctx.tasks:  # the run's last lines in `clfbench logs -f`: what it scored
            shown = ", ".join(f"{row['metric']} {row['value']:.4g}" for row in results if row["task"] == task.name)
            print(f"clfbench worker: run {ctx.run_id} succeeded: {task.name} ({len(predictions[task.name])} test "
                  f"examples): {shown}", flush=True)
    else:
        print("clfbench worker: the run is no longer ours (cancelled or re-claimed); nothing written", flush=True)


def _one_line(error: Exception) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return message if isinstance(error, ClfbenchError) else f"{type(error).__name__}: {message}"


def _destroy_process_group() -> None:
    if "torch" not in sys.modules:  # a run without local weights never loaded torch: do not import it to check
        return
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass


def _stop_on_outage(recorder: Recorder, run_id: int, attempt: int, lost: StoreUnreachable) -> int:
    """The store stayed unreachable past the window: stop, say so in one line, write every waiting point once the
    store answers (however long that takes: they are the run's history), and exit so that the engine marks the
    run interrupted; its next attempt resumes from the last checkpoint (written every checkpoint_every steps)."""
    print(f"clfbench worker: run {run_id} attempt {attempt} stopped: {lost}; it ends interrupted once the store "
          "answers, and its next attempt resumes from its last checkpoint", flush=True)
    try:
        recorder.close(wait_for_store=True)
    except Exception as error:  # the points were kept as long as the process lived; say why they were not written
        print(f"clfbench worker: metric points of run {run_id} not written: {_one_line(error)}", flush=True)
    return EXIT_STORE_UNREACHABLE


def _fail(store, recorder: Recorder, run_id: int, attempt: int, error: Exception) -> int:
    """The method (or a write) raised: record `failed` with one line, after the points logged before it."""
    try:
        recorder.close()
    except StoreUnreachable as lost:
        return _stop_on_outage(recorder, run_id, attempt, lost)
    except Exception as write_error:
        print(f"clfbench worker: metric points not written: {_one_line(write_error)}", flush=True)
    traceback.print_exception(error)
    try:
        retrying(lambda: queue.finish_failed(store, run_id, attempt, _one_line(error)), "recording the failure")
    except StoreUnreachable as lost:
        return _stop_on_outage(recorder, run_id, attempt, lost)
    return 1


def run_worker(run_id: int) -> int:
    rank = _distributed_env()[0]
    try:
        # A worker launched while the store restarts waits for it like any other write (storage.outage).
        store = retrying(lambda: open_store(os.environ.get("CLFBENCH_DB"), create=False), "opening the store")
        run = retrying(lambda: queries.get_run(store, run_id), "reading the run")
    except (StoreError, StoreUnreachable) as error:
        print(f"clfbench worker: {error}", file=sys.stderr)
        return 2
    if run is None:
        print(f"clfbench worker: no run {run_id} in {store.describe()}", file=sys.stderr)
        return 2
    attempt = int(os.environ.get("CLFBENCH_RUN_ATTEMPT", run["attempt"]))
    # The spill file of points waiting out an outage lives with the run's log and checkpoint.
    folder = Path(os.environ.get("CLFBENCH_RUN_DIR") or run["output_dir"] or ".")
    recorder = Recorder(store, run_id, attempt, enabled=rank == 0, spill_dir=folder if folder.is_dir() else None)
    recorder.start_heartbeat()
    started = time.time()
    try:
        ctx = _prepare(run, recorder, attempt)
        output = importlib.import_module(ctx.spec.method_info.module).run(ctx)
        if rank == 0:
            recorder.set_phase(WRITING_RESULTS)  # the closing heartbeat writes it: scoring and the transaction
        recorder.close()
        recorder.check_ours()  # a refused heartbeat after the method's last point: nothing to finish
        if rank == 0:
            _finish(store, ctx, output, started)
        # No closing barrier: ranks with nothing left to do (e.g. while rank 0 alone predicts or prompts)
        # simply exit; waiting would risk the process-group timeout on long rank-0-only work.
        return 0
    except RunNotOurs as lost:
        # Another attempt (or a cancel) owns the run now: it alone writes its status; finish_failed would be
        # refused anyway, and the log says why this process stopped.
        recorder.close()
        print(f"clfbench worker: run {lost.run_id} attempt {lost.attempt} is no longer ours (cancelled or "
              "re-claimed): stopping without writing", flush=True)
        return EXIT_NOT_OURS
    except StoreUnreachable as lost:
        return _stop_on_outage(recorder, run_id, attempt, lost)
    except Exception as error:
        if _peer_lost(error):
            return _stop_on_lost_peer(recorder, error)
        return _fail(store, recorder, run_id, attempt, error)
    finally:
        _destroy_process_group()


# What gloo and NCCL say when another rank of the run died mid-collective.
PEER_LOST_SIGNS = ("Connection reset by peer", "Connection closed by peer", "remote process exited",
                   "Socket Timeout", "Broken pipe")


def _peer_lost(error: Exception) -> bool:
    """Whether a collective failed because another rank died (killed, out of memory, a lost node): the run did
    not fail, its attempt ended. Only with several ranks."""
    if _distributed_env()[1] < 2:
        return False
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    kinds = tuple(k for k in (getattr(dist, "DistNetworkError", None),) if k is not None)
    return isinstance(error, kinds) or any(sign in str(error) for sign in PEER_LOST_SIGNS)


def _stop_on_lost_peer(recorder: Recorder, error: Exception) -> int:
    """Write nothing: the engine reads torchrun's root cause (the rank that died first) and ends the attempt by
    it (a killed rank: requeued, resumed from the checkpoint), instead of this rank calling the run failed."""
    try:
        recorder.close()
    except Exception as write_error:
        print(f"clfbench worker: metric points not written: {_one_line(write_error)}", flush=True)
    print(f"clfbench worker: another rank of this run died ({_one_line(error)}); stopping without writing",
          flush=True)
    return 1


def main() -> int:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        print("usage: python -m clfbench.engine.worker RUN_ID", file=sys.stderr)
        return 2
    code = run_worker(int(sys.argv[1]))
    if _distributed_env()[1] > 1:
        _leave_without_teardown(code)
    return code


def _leave_without_teardown(code: int) -> None:
    """A rank of a several-rank run exits without the interpreter's finalisation: the process group is destroyed
    and all the run writes is written, but tearing down torch's communication threads at interpreter exit can
    still abort the process ("terminate called without an active exception", seen once in CI with gloo), and
    torchrun then stops the ranks still working (rank 0 predicting alone) and calls the run failed."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
