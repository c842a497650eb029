"""Decision modes of the prompt method side by side: same model, same utterances, one process.

    PYTHONPATH=. python bench/decision_modes.py                        # smollm2-135m, 200 MASSIVE test utterances
    PYTHONPATH=. python bench/decision_modes.py --n 40 --threads 2 --dtype bfloat16 --json out.json

Each mode runs `engine.methods.prompt.run` exactly as the worker calls it (zero-shot, the paper's Listing 7, the
chat template), on the fixed `test_limit` subset of MASSIVE intent from the real data folder. Reported per mode:
examples/s (decision time only; model loading is excluded and printed apart), accuracy, parse-failure rate, and
ratios to the generate mode. With `--ablation-n N` (default 50) the score and constrained modes also run on the
first N of those utterances with `reuse_prefix=false`, to measure what reusing the shared prompt prefix buys.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "generate": dict(decision="generate"),
    "constrained": dict(decision="constrained"),
    "score-sum": dict(decision="score", score_norm="sum"),
    "score-calibrated": dict(decision="score", score_norm="calibrated"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="massive-intent")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--n", type=int, default=200, help="test utterances (the fixed test_limit subset)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the dev box has 2 shared cores)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    parser.add_argument("--chat-format", default="template", choices=["template", "raw"])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--ablation-n", type=int, default=50, help="0: skip the reuse_prefix=false runs")
    parser.add_argument("--json", default=None, help="write the numbers here too")
    args = parser.parse_args()

    import torch

    from engine import metrics
    from engine.methods import prompt
    from engine.methods.catalog import PromptOptions
    from engine.models import resolve_model
    from engine.tasks import get_task, load_task
    from engine.types import RunContext

    torch.set_num_threads(args.threads)
    model_path = resolve_model(args.model)
    task = load_task(get_task(args.task), data_dir=args.data_dir, test_limit=args.n, seed=0)
    print(f"{args.model} on {len(task.test)} {args.task} test examples (fixed subset), zero-shot, "
          f"{args.chat_format} chat format, {args.dtype}, batch {args.batch_size}, {args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)

    def run(options: dict, n: int | None = None) -> dict:
        data = task if n is None else dataclasses.replace(task, test=task.test[:n])
        opts = PromptOptions(batch_size=args.batch_size, dtype=args.dtype, chat_format=args.chat_format,
                             max_new_tokens=args.max_new_tokens, test_limit=args.n, **options)
        ctx = RunContext(run_id=0, attempt=1, spec=SimpleNamespace(seed=0, shots=0), options=opts, tasks=[data],
                         model_path=model_path, output_dir=Path("."), rank=0, world_size=1, local_rank=0,
                         device="cpu", log_metric=lambda *a: None, set_progress=lambda *a: None)
        started = time.perf_counter()
        output = prompt.run(ctx)
        wall = time.perf_counter() - started
        predictions = output.predictions[task.name]
        scores = metrics.task_results(task.kind, predictions, task.labels)
        extra = output.extra_results[task.name]
        statuses: dict[str, int] = {}
        for p in predictions:
            statuses[p.parse_status] = statuses.get(p.parse_status, 0) + 1
        return {"n": len(predictions), "examples_per_s": extra["examples_per_s"], "accuracy": scores["accuracy"],
                "parse_failure_rate": scores["parse_failure_rate"], "statuses": statuses,
                "prompt_tokens_mean": extra["prompt_tokens_mean"], "generated_tokens_mean": extra["generated_tokens_mean"],
                "prefix_tokens": extra["prefix_tokens"], "decision_time_s": extra["decision_time_s"],
                "wall_s": wall}

    results: dict[str, dict] = {}
    for name in [m.strip() for m in args.modes.split(",") if m.strip()]:
        results[name] = run(MODES[name])
        r = results[name]
        print(f"  {name:17s} {r['examples_per_s']:6.2f} ex/s  accuracy {r['accuracy']:.3f}  "
              f"parse failures {r['parse_failure_rate']:.3f}  {r['statuses']}", flush=True)

    ablation: dict[str, dict] = {}
    if args.ablation_n:
        n = min(args.ablation_n, len(task.test))
        for name in ("constrained", "score-sum"):
            if name not in results:
                continue
            with_reuse = run(MODES[name], n)
            without = run({**MODES[name], "reuse_prefix": False}, n)
            same = with_reuse["accuracy"] == without["accuracy"]
            ablation[name] = {"n": n, "with_reuse": with_reuse["examples_per_s"],
                              "without_reuse": without["examples_per_s"],
                              "speedup": with_reuse["examples_per_s"] / max(without["examples_per_s"], 1e-9),
                              "same_accuracy": same}

    print()
    print(f"| mode | ex/s | x generate | accuracy | parse failures | prompt tok | generated tok |")
    print("|---|---|---|---|---|---|---|")
    base = results.get("generate", {}).get("examples_per_s")
    for name, r in results.items():
        ratio = f"{r['examples_per_s'] / base:.2f}" if base else "-"
        print(f"| {name} | {r['examples_per_s']:.2f} | {ratio} | {r['accuracy']:.3f} | {r['parse_failure_rate']:.3f} "
              f"| {r['prompt_tokens_mean']:.0f} | {r['generated_tokens_mean']:.1f} |")
    if "score-sum" in results and "score-calibrated" in results and results["score-sum"]["accuracy"]:
        print(f"\ncalibrated / sum accuracy: "
              f"{results['score-calibrated']['accuracy'] / results['score-sum']['accuracy']:.2f}x")
    for name, a in ablation.items():
        print(f"prefix reuse, {name} on {a['n']}: {a['with_reuse']:.2f} vs {a['without_reuse']:.2f} ex/s without "
              f"= {a['speedup']:.2f}x (same accuracy: {a['same_accuracy']})")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "ablation": ablation},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
