"""The run contract: what the worker hands a method (`RunContext`), what a method hands back (`MethodOutput`).

A method is a module with `run(ctx: RunContext) -> MethodOutput | None`. Before calling it the worker has
validated the spec once (its options are the method's options object, a preset already applied), loaded the
tasks (train_limit and test_limit applied), checked them against the method's catalog entry (task kinds, how
many tasks, two labels or more, training data where the method trains) and resolved the model. The method
returns, on rank 0, one `Predicted` per test example id and task; the worker joins gold labels and texts,
computes every metric (the task definitions declare joint ones such as MASSIVE's exact match) and stores it all
in one transaction. Other ranks return None.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clfbench.engine.methods.catalog import MethodOptions
from clfbench.engine.spec import RunSpec
from clfbench.engine.types import TaskData

# The phases a run reports through `RunContext.set_phase`, in the order a run goes through them; the run list,
# the detail and `clfbench ls`/`show` print them with the phase's progress, and the ETA adds an evaluation's rest.
LOADING_MODEL, CONVERTING, TRAINING = "loading model", "converting", "training"
EVALUATING, TESTING, WRITING_RESULTS = "evaluating on dev", "testing", "writing results"
PHASES = (LOADING_MODEL, CONVERTING, TRAINING, EVALUATING, TESTING, WRITING_RESULTS)


@dataclass
class RunContext:
    """Everything a method needs to run, built by the worker. `log_metric` and `set_progress` are safe to call on
    every rank: only rank 0 writes to the store, in batches."""

    run_id: int
    attempt: int
    spec: RunSpec
    options: MethodOptions  # spec.options resolved for the run's tasks (e.g. encoder-finetune's paper preset)
    tasks: list[TaskData]
    model_path: str  # a local folder, or a hub id on machines with internet (an API method: the server's name)
    output_dir: Path  # per-run folder for checkpoints and caches; survives retries
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cuda:N" or "cpu"
    log_metric: Callable[[int, str, float], None]
    set_progress: Callable[[int, int], None]
    # (phase name, step, total): "loading model", "converting", "training", "evaluating on dev", "testing",
    # "writing results". A default that records nothing, so tests and benches that build a context need not care.
    set_phase: Callable[..., None] = lambda name, step=None, total=None: None
    # Appends to the run's attempt_note how this attempt began ("attempt 2 resumed from step 300"); rank 0 writes.
    note_attempt: Callable[[str], None] = lambda note: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def gpus(self) -> list[int]:
        """The run's GPUs as this process sees them (the engine sets CUDA_VISIBLE_DEVICES to the run's GPUs and
        launches one process per GPU): 0..world_size-1 on a GPU run, [] on CPU. A method that computes on rank 0
        alone (prompting, extraction) may place a model too large for one GPU across all of them."""
        return list(range(self.world_size)) if self.device.startswith("cuda") else []

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def shots(self) -> int:
        return self.spec.shots
