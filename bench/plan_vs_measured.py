"""The memory plan (`clfbench plan`, engine/memory_plan.py) against the peak memory of the real workload on CPU.

    python bench/plan_vs_measured.py              # every case, ~5 min on 2 busy cores
    python bench/plan_vs_measured.py --case prompt
    python bench/plan_vs_measured.py --device cuda --model FOLDER   # on a GPU (bench/gpu_checks.sh)

On a GPU (`--device cuda`) the LLM cases run there, on `--model` (default SmolLM2; gpu_checks.sh gives a random
~1B Llama built from TinyLlama's shapes, which needs no download): llm-finetune's step under bf16 autocast with
fp32 master weights, as the method trains on a GPU, and the prompt method's decoding in the dtype `auto` gives
(bf16). *measured* is then `torch.cuda.max_memory_allocated` over the case, parameters included, against the
plan for one GPU without its CUDA context (the allocator does not count it).

Each case runs the methods' own code on a real model, a few steps, in a fresh process:

- `llm-finetune` (SmolLM2-135M-Instruct): `llm_finetune.collate` and `AnswerLoss` (logits only for the answer
  columns), backward, gradient clipping and AdamW as `engine.training.make_optimizer` builds it, `zero_grad` to
  None, 2 optimizer steps, fp32 (the method's CPU precision: bf16 autocast is GPU-only). Rows of 256 tokens, the
  last 8 of them the answer and stop token; once fed whole, once behind a 192-token shared prefix (the method's
  default `share_prefix`);
- `prompt` (SmolLM2): `engine.decoding.greedy` (the prompt method's decoding: the batch's KV cache, the logits of
  the last position) on 8 prompts of 512 tokens, 4 new tokens each, in the dtype `auto` gives on this CPU;
- `encoder-finetune` (all-MiniLM-L6-v2): the head library's `load_encoder` and its `HeadsModel` (a 60-label
  sequence head, dropout on), cross-entropy, AdamW, 2 steps of 32 texts × 128 tokens, fp32.

What is measured: the peak of the bytes torch's CPU allocator holds for live tensors, from the profiler's
allocation events (`torch.profiler.profile(profile_memory=True)`: every allocation and free of the c10 CPU
allocator, temporaries inside an op included), plus the model's parameters and buffers that exist before the
profile starts. That is what `torch.cuda.max_memory_allocated` counts on a GPU, and what the plan models: tensor
bytes, not the allocator's cache, glibc's free lists, Python objects or library code. The resident set's
high-water mark (ru_maxrss, minus the resident set before the model was loaded) is printed beside it for
context: it includes all of those, and glibc keeps freed memory mapped.

The plan is given each case's geometry (batch, tokens, answer tokens, shared prefix, dtype, CPU) -- the plan of a
queued run assumes the worst of these (rows of max_length tokens, no shared prefix, 64 answer tokens).
The 1 GB the plan adds per GPU for the CUDA context does not exist on CPU and is left out of the comparison.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = 2  # the peak is in the second step's backward: AdamW's moments exist from the first step on


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_bytes(module) -> int:
    """Bytes of the module's parameters and buffers (each storage once: tied weights share one)."""
    storages = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def profiled_peak(work) -> int:
    """The peak, over `work()`, of the bytes allocated by torch's CPU allocator during it and not yet freed."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ------------------------------------------------------------------------------------------------- cases


DEVICE = "cpu"  # the child's: --device
MODEL = "smollm2-135m"  # the LLM cases' model: --model (an alias or a local folder)


def llm_case_model():
    """The LLM cases' model path, device and loader (SmolLM2 on CPU unless --model / --device say otherwise)."""
    from clfbench.engine.decoding import load_model
    from clfbench.engine.models import resolve_model

    import torch
    return resolve_model(MODEL), torch.device(DEVICE), load_model


def token_ids(count: int, vocab: int, generator) -> list[int]:
    """Random ids of ordinary tokens (above the special ones at the start of every vocabulary here)."""
    import torch

    return torch.randint(min(100, vocab // 4), vocab, (count,), generator=generator).tolist()


def measured_peak(work, baseline: int) -> int:
    """Bytes at the peak of `work()`: on CPU the live tensors before it (`baseline`) plus the allocation events'
    peak; on a GPU what the caching allocator reports, which counts the tensors alive before it too."""
    import torch

    if DEVICE == "cpu":
        return baseline + profiled_peak(work)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    work()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def finetune_case(shared: int) -> dict:
    """llm-finetune's step on 4 rows of 256 tokens (8 labelled), fed whole or behind a `shared`-token prefix."""
    import torch

    from clfbench.engine.decoding import Decoder
    from clfbench.engine.methods.llm_finetune import AnswerLoss, Encoded, _inputs, collate, prepare_model
    from clfbench.engine.prompting.chat import ChatFormat
    from clfbench.engine.training import autocast_for, make_optimizer

    path, device, load_model = llm_case_model()
    before = rss_bytes()
    tokenizer, model = load_model(path, "float32", device)  # fp32 master weights, as the method trains
    decoder = Decoder(model, ChatFormat(tokenizer, "template", model.generation_config), device)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prefix = token_ids(shared, vocab, generator)
    rows = [Encoded(ids=prefix + token_ids(256 - shared, vocab, generator), n_prompt=248) for _ in range(4)]
    batch = collate(rows, prefix, decoder.pad_id)
    loss_model: AnswerLoss = prepare_model(model, decoder, argparse.Namespace(gradient_checkpointing=False))
    optimizer = make_optimizer(model, 1e-5, 0.0, device)
    on_gpu = device.type == "cuda"

    def steps():
        for _ in range(STEPS):
            with autocast_for(device, True):  # bf16 autocast on a GPU, as the method; nothing on CPU
                summed = loss_model(**_inputs(batch, device))
            (summed / 32).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    measured = measured_peak(steps, live_bytes(model))
    return {"measured": measured, "rss": _rss_peak() - before, "dtype": "bfloat16" if on_gpu else "float32",
            "geometry": {"batch": 4, "tokens": 256, "answer_tokens": 8, "shared_prefix": shared}}


def prompt_case() -> dict:
    """The prompt method's greedy decoding of 8 prompts of 512 tokens, 4 new tokens each."""
    import torch

    from clfbench.engine.decoding import Decoder
    from clfbench.engine.decoding.greedy import greedy
    from clfbench.engine.prompting.chat import ChatFormat

    path, device, load_model = llm_case_model()
    before = rss_bytes()
    tokenizer, model = load_model(path, "auto", device)
    decoder = Decoder(model, ChatFormat(tokenizer, "template", model.generation_config), device)
    generator = torch.Generator().manual_seed(0)
    prompts = [token_ids(512, model.config.vocab_size, generator) for _ in range(8)]
    measured = measured_peak(lambda: greedy(decoder, prompts, [None] * 8, [4] * 8, use_prefix=False),
                             live_bytes(model))
    return {"measured": measured, "rss": _rss_peak() - before,
            "dtype": str(model.dtype).removeprefix("torch."), "geometry": {"batch": 8, "tokens": 516}}


def encoder_case() -> dict:
    """encoder-finetune's model (the head library) on 32 texts × 128 tokens, 3 AdamW steps."""
    import torch
    import torch.nn.functional as F

    from clfbench.engine.heads import Head, load_encoder
    from clfbench.engine.models import resolve_model
    from clfbench.engine.training import make_optimizer

    path, cpu = resolve_model("minilm"), torch.device("cpu")
    before = rss_bytes()
    _, model = load_encoder(path, [Head("intent", "sequence", [f"label{i}" for i in range(60)])])
    model.train()
    optimizer = make_optimizer(model, 1e-5, 0.01, cpu)
    generator = torch.Generator().manual_seed(0)
    baseline = live_bytes(model)

    def steps():
        for _ in range(STEPS):
            input_ids = torch.randint(1000, 30000, (32, 128), generator=generator)
            (logits,) = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            F.cross_entropy(logits, torch.randint(0, 60, (32,), generator=generator)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    peak = profiled_peak(steps)
    return {"measured": baseline + peak, "rss": _rss_peak() - before, "dtype": "float32",
            "geometry": {"batch": 32, "tokens": 128}}


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


CASES = {
    "llm-finetune": ("llm-finetune", "smollm2-135m", "4 × 256 tokens, fed whole", lambda: finetune_case(0)),
    "llm-finetune-shared": ("llm-finetune", "smollm2-135m", "4 × 256 tokens, 192 shared", lambda: finetune_case(192)),
    "prompt": ("prompt", "smollm2-135m", "8 × 512 tokens + 4 new", prompt_case),
    "encoder-finetune": ("encoder-finetune", "minilm", "32 × 128 tokens", encoder_case),
}


LLM_CASES = ["llm-finetune", "llm-finetune-shared", "prompt"]  # the ones --device cuda and --model apply to


def _child(name: str, device: str, model: str, queue) -> None:
    import torch

    global DEVICE, MODEL
    DEVICE, MODEL = device, model
    torch.manual_seed(0)
    queue.put(CASES[name][3]())


def planned(method: str, model: str, result: dict, device: str) -> float:
    """The plan's bytes for the case's geometry on one device, without the CUDA context."""
    from clfbench.engine import memory_plan

    shape = memory_plan.shape_of(memory_plan.read_config(memory_plan.model_config(model)))
    workload = memory_plan.Workload(**result["geometry"], precision=result["dtype"], on_gpu=device == "cuda")
    parts = memory_plan.method_parts(method, shape, {}, 1, workload)
    return sum(value for name, value in parts.items() if name != memory_plan.CUDA_CONTEXT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="run only these (repeatable)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default=MODEL, help="the LLM cases' model: an alias or a local folder")
    args = parser.parse_args()
    names = args.case or (LLM_CASES if args.device == "cuda" else list(CASES))
    if args.device == "cuda" and set(names) - set(LLM_CASES):
        parser.error(f"--device cuda runs the LLM cases only: {', '.join(LLM_CASES)}")
    context = multiprocessing.get_context("spawn")  # a fresh process per case: its own RSS high-water mark
    print(f"{'case':<20} {'model':<13} {'geometry':<28} {'dtype':<9} {'plan':>8} {'measured':>9} {'plan/meas':>9} "
          f"{'RSS peak':>9}")
    for name in names:
        method, model, geometry, _ = CASES[name]
        model = args.model if name in LLM_CASES else model
        queue = context.Queue()
        child = context.Process(target=_child, args=(name, args.device, model, queue))
        child.start()
        result = queue.get()
        child.join()
        plan = planned(method, model, result, args.device)
        print(f"{name:<20} {Path(model).name[:13]:<13} {geometry:<28} {result['dtype']:<9} {plan / 1e9:>6.2f}GB "
              f"{result['measured'] / 1e9:>7.2f}GB {plan / result['measured']:>9.2f} {result['rss'] / 1e9:>7.2f}GB",
              flush=True)


if __name__ == "__main__":
    main()
