"""The worker: `torchrun ... -m clfbench.engine.worker RUN_ID` (or `python -m clfbench.engine.worker RUN_ID` for API jobs).

It loads the run's spec from the store, resolves data and model, runs the method module, and on
rank 0 writes metric points (batched), one prediction row per test example and task, and result rows.
It ends the run truthfully: `succeeded` with everything written in one transaction, or `failed` with a
one-line error (the engine appends the log tail). Any rank that raises records the failure; the first
writer wins because every write is guarded by the run's attempt.
"""
from __future__ import annotations

import importlib
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

from clfbench.engine import metrics
from clfbench.engine.models import resolve_model
from clfbench.engine.recorder import Recorder
from clfbench.engine.spec import spec_from_json
from clfbench.engine.tasks import get_task, load_task, resolve_data_dir
from clfbench.engine.types import ClfbenchError, MethodOutput, RunContext, TaskData
from clfbench.storage import queue, queries
from clfbench.storage.db import open_store


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
        # Share the cores given to this run (by the engine: its slot of the host) between its ranks instead of
        # oversubscribing them.
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


def load_tasks(spec, options) -> list[TaskData]:
    train_limit = getattr(options, "train_limit", None)
    test_limit = getattr(options, "test_limit", None)
    return [
        load_task(get_task(name), data_dir=resolve_data_dir(spec.data_dir), train_limit=train_limit, test_limit=test_limit,
                  seed=spec.seed)
        for name in spec.task_names
    ]


def _prediction_rows(task: str, output: MethodOutput) -> list[dict]:
    rows = []
    for p in output.predictions.get(task, []):
        gold = " ".join(p.gold) if isinstance(p.gold, list) else p.gold
        predicted = " ".join(p.predicted) if isinstance(p.predicted, list) else p.predicted
        rows.append({"task": task, "example_id": p.example_id, "text": p.text, "gold": gold,
                     "predicted": predicted, "raw_output": p.raw_output, "parse_status": p.parse_status})
    return rows


def result_rows(tasks: list[TaskData], output: MethodOutput, wall_time_s: float) -> list[dict]:
    rows = []
    by_name = {task.name: task for task in tasks}
    for task in tasks:
        values = metrics.task_results(task.kind, output.predictions.get(task.name, []), task.labels)
        values.update(output.extra_results.get(task.name, {}))
        values["wall_time_s"] = wall_time_s
        rows += [{"task": task.name, "metric": name, "value": float(value)} for name, value in values.items()]
    # Intent + slots in one run: the official MASSIVE exact match (both right for the same utterance).
    sequence = [t for t in tasks if t.kind == "sequence" and t.name.startswith("massive-intent")]
    token = [t for t in tasks if t.kind == "token"]
    if sequence and token and sequence[0].name in by_name:
        value = metrics.joint_exact_match(output.predictions[sequence[0].name], output.predictions[token[0].name])
        rows.append({"task": token[0].name, "metric": "exact_match", "value": value})
    return rows


def run_worker(run_id: int) -> int:
    rank, world_size, local_rank = _distributed_env()
    store = open_store(os.environ.get("CLFBENCH_DB"), create=False)
    run = queries.get_run(store, run_id)
    if run is None:
        print(f"clfbench worker: no run {run_id} in {store.describe()}", file=sys.stderr)
        return 2
    attempt = int(os.environ.get("CLFBENCH_RUN_ATTEMPT", run["attempt"]))
    recorder = Recorder(store, run_id, attempt, enabled=rank == 0)
    recorder.start_heartbeat()
    started = time.time()
    try:
        spec = spec_from_json(run["spec_json"])
        options = spec.method_options()
        print(f"clfbench worker: run {run_id} attempt {attempt} rank {rank}/{world_size}: "
              f"{spec.method} {spec.model} {spec.task}", flush=True)
        local_model = spec.method_info.local_model
        if local_model:
            device = _setup_torch(world_size, local_rank, spec.seed)
        else:  # an API method: the model runs on a server; no torch to import, seed, or share cores with
            device = "cpu"
            random.seed(spec.seed)
        tasks = load_tasks(spec, options)
        try:  # before any model loads: a slot task with decision=score fails at once, with the queue's message
            options.check_task_kinds([task.kind for task in tasks])
        except ValueError as error:
            raise ClfbenchError(f"invalid options for {spec.method}: {error}") from None
        if not local_model:
            model_path = spec.model  # the model's name on the server
        elif rank == 0:  # rank 0 resolves first: a conversion into the model cache then happens once, not per rank
            model_path = resolve_model(spec.model)
        _barrier(world_size)
        if local_model and rank != 0:
            model_path = resolve_model(spec.model)
        output_dir = Path(os.environ.get("CLFBENCH_RUN_DIR") or run["output_dir"] or ".")
        context = RunContext(
            run_id=run_id, attempt=attempt, spec=spec, options=options, tasks=tasks, model_path=model_path,
            output_dir=output_dir, rank=rank, world_size=world_size, local_rank=local_rank, device=device,
            log_metric=recorder.log_metric, set_progress=recorder.set_progress,
        )
        method = importlib.import_module(spec.method_info.module)
        output = method.run(context)
        recorder.close()
        if rank == 0:
            if output is None:
                raise RuntimeError(f"method {spec.method} returned no output on rank 0")
            predictions = [row for task in tasks for row in _prediction_rows(task.name, output)]
            results = result_rows(tasks, output, wall_time_s=time.time() - started)
            if queue.finish_succeeded(store, run_id, attempt, predictions, results):
                # The resume checkpoint (weights + optimizer state, ~3x the model) has served its purpose;
                # a retry of a finished run should train again, not skip to the end.
                shutil.rmtree(output_dir / "checkpoint", ignore_errors=True)
            else:
                print("clfbench worker: the run is no longer ours (cancelled or re-claimed); nothing written",
                      flush=True)
        # No closing barrier: ranks with nothing left to do (e.g. while rank 0 alone predicts or prompts)
        # simply exit; waiting would risk the process-group timeout on long rank-0-only work.
        return 0
    except Exception as error:
        recorder.close()
        traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        one_line = message if isinstance(error, ClfbenchError) else f"{type(error).__name__}: {message}"
        queue.finish_failed(store, run_id, attempt, one_line)
        return 1
    finally:
        try:
            if "torch" not in sys.modules:  # an API run never loaded torch: do not import it just to check
                raise ImportError
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def main() -> int:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        print("usage: python -m clfbench.engine.worker RUN_ID", file=sys.stderr)
        return 2
    return run_worker(int(sys.argv[1]))


if __name__ == "__main__":
    sys.exit(main())
