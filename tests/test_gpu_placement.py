"""How the engine places runs on an 8-GPU box, without a GPU (issue 11, item 5): a fake inventory of GPUs 0-7 and
a launch that records instead of starting workers, so only the placement is under test: the claims, the GPUs the
store assigns and the engine's own bookkeeping, exactly as a real engine runs them.
"""
from __future__ import annotations

import os

from clfbench.engine.daemon import Child, Engine, EngineConfig
from clfbench.storage import queries, queue
from clfbench.storage.db import open_store

EIGHT = list(range(8))


def placing_engine(store, monkeypatch) -> Engine:
    engine_id = queue.register_engine(store, "gpu-box", os.getpid(), EIGHT, host_id="gpu-box")
    engine = Engine(config=EngineConfig(url=store.url, gpus=EIGHT), store=store, engine_id=engine_id,
                    host="gpu-box", host_id="gpu-box")

    def launch(run: dict) -> None:  # what Engine.launch records, without a worker process
        gpus = [int(gpu) for gpu in run["gpus_assigned"].split(",")]
        engine.children[run["id"]] = Child(run_id=run["id"], attempt=run["attempt"], pid=0, gpus=gpus,
                                           launch=run["launch"], log_path="")
        queue.set_launched(store, run["id"], run["attempt"], pid=0, gpus_assigned=run["gpus_assigned"],
                           log_path="", output_dir="")

    monkeypatch.setattr(engine, "launch", launch)
    return engine


def queue_prompts(cli, count: int) -> None:
    """`count` one-GPU prompt runs (seeds 0..count-1), queued as a sweep from a spec file."""
    spec = cli.home.parent / "prompts.yaml"
    spec.write_text(f"method: prompt\nmodel: smollm2-135m\ntask: massive-intent\ngpus: 1\n"
                    f"seed: {list(range(count))}\n")
    cli.run("queue", str(spec))


def place_all(engine: Engine) -> list[int]:
    placed = []
    while engine.claim_and_launch():
        placed.append(max(engine.children))
    return placed


def assigned(engine: Engine) -> dict[int, list[int]]:
    return {run_id: child.gpus for run_id, child in engine.children.items()}


def test_a_4_gpu_fine_tune_beside_1_gpu_prompt_runs_never_shares_a_gpu_and_the_rest_wait(cli, monkeypatch):
    cli.run("queue", "--method", "llm-finetune", "--model", "smollm2-135m", "--task", "massive-intent", "--gpus", "4")
    queue_prompts(cli, 6)
    store = open_store()
    engine = placing_engine(store, monkeypatch)
    placed = place_all(engine)
    gpus = assigned(engine)
    # 8 GPUs: the fine-tune's 4 and four prompt runs; two prompt runs wait.
    assert len(placed) == 5 and sorted(len(g) for g in gpus.values()) == [1, 1, 1, 1, 4]
    every = [gpu for held in gpus.values() for gpu in held]
    assert sorted(every) == EIGHT  # each GPU once
    waiting = [run for run in queries.list_runs(store) if run["status"] == "queued"]
    assert len(waiting) == 2
    # A prompt run ends: its GPU goes to the next waiting run, and to no one else.
    done = next(run_id for run_id, held in gpus.items() if len(held) == 1)
    freed = gpus[done]
    queue.finish_succeeded(store, done, 1, [], [])
    del engine.children[done]
    assert place_all(engine) and assigned(engine)[max(engine.children)] == freed
    assert not engine.claim_and_launch()  # nothing free: the last one waits


def test_a_run_waits_until_enough_gpus_are_free_and_another_engine_on_the_host_is_counted(cli, monkeypatch):
    queue_prompts(cli, 6)
    store = open_store()
    engine = placing_engine(store, monkeypatch)
    assert len(place_all(engine)) == 6  # six GPUs busy, two free
    cli.run("queue", "--method", "llm-finetune", "--model", "smollm2-135m", "--task", "massive-intent", "--gpus", "4")
    assert not engine.claim_and_launch()  # 4 GPUs asked, 2 free: it waits
    # A second engine of the same host sees the same ledger: its GPUs 0-7 are the same GPUs.
    other = placing_engine(store, monkeypatch)
    assert not other.claim_and_launch()
    for run_id in list(engine.children)[:2]:
        queue.finish_succeeded(store, run_id, 1, [], [])
        del engine.children[run_id]
    assert engine.claim_and_launch()
    fine_tune = engine.children[max(engine.children)]
    assert len(fine_tune.gpus) == 4
    assert not set(fine_tune.gpus) & {gpu for run_id, child in engine.children.items()
                                      if run_id != fine_tune.run_id for gpu in child.gpus}
