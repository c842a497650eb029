"""Throughput of llm-finetune's training step on CUDA GPUs: tokens/s and MFU on a randomly initialised ~1B Llama.

    python bench/llm_finetune_throughput.py                       # every visible GPU, relaunched under torchrun
    python bench/llm_finetune_throughput.py --seq-len 1024 --batch-size 4 --peak-tflops 989
    torchrun --standalone --nproc-per-node 2 bench/llm_finetune_throughput.py

The step is the method's own: `engine.training.start_training` (DDP over NCCL, fp32 master weights, fused AdamW)
around `AnswerLoss`, `llm_finetune.micro_batch` (bf16 autocast, forward and backward) on a batch built by `collate`,
then `engine.training.optimizer_step` (gradient clipping, AdamW, schedule). Each row is a random
prompt of `--seq-len - --answer-len` tokens and a random answer of `--answer-len` labelled tokens; rows are fed
whole (no shared prefix, so every token is computed once and counted once). The model is a Llama config of ~1.1B
parameters (TinyLlama's shape: 22 layers, hidden 2048, 32 heads, 4 KV heads, MLP 5632, vocab 32000), random weights.

Reported after `--warmup` steps, over `--steps` steps: tokens/s (all GPUs) and MFU = 6 * params * tokens/s /
(peak bf16 FLOP/s per GPU * GPUs). 6 * params per token is the usual estimate (forward 2, backward 4; attention
scores not counted, the output layer counted although logits are computed only for the answer columns), so
the MFU is an estimate, not a measurement of FLOPs. `--peak-tflops`: 989 is H100 SXM's dense bf16 peak; an H100
PCIe is 756, an A100 312.

Without a CUDA GPU it says so and exits 0.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row (prompt + answer)")
    parser.add_argument("--answer-len", type=int, default=16, help="labelled tokens at the end of each row")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per GPU per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of one GPU, TFLOP/s")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        print("llm_finetune_throughput: no CUDA GPU here; this benchmark measures GPU training throughput, "
              "nothing to do")
        return 0
    if "RANK" not in os.environ:  # relaunch under torchrun on every visible GPU
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={torch.cuda.device_count()}", str(Path(__file__).resolve()), *sys.argv[1:]]
        return subprocess.call(command)

    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from clfbench.engine.context import RunContext
    from clfbench.engine.methods import llm_finetune as lf
    from clfbench.engine.training import StepPlan, autocast_for, optimizer_step, start_training

    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    torch.cuda.set_device(local_rank)
    device = torch.device(f"cuda:{local_rank}")
    if world_size > 1:
        dist.init_process_group("nccl")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq_len),
                         attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(config).to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = sum(p.numel() for p in model.parameters())
    # AnswerLoss reads only the mask rule (SDPA takes the boolean [B, 1, Q, K] mask) and the pad id of a Decoder.
    decoder = SimpleNamespace(_mask=lambda allowed: allowed[:, None, :, :], pad_id=0)
    loss_model = lf.AnswerLoss(model, decoder)
    out_dir = Path(tempfile.mkdtemp(prefix="llm-ft-bench-"))
    ctx = RunContext(run_id=0, attempt=1, spec=SimpleNamespace(seed=0, shots=0), options=None, tasks=[],
                     model_path="", output_dir=out_dir, rank=rank, world_size=world_size, local_rank=local_rank,
                     device=str(device), log_metric=lambda *a: None, set_progress=lambda *a: None)
    total = args.warmup + args.steps
    plan = StepPlan(steps_per_epoch=total, total_steps=total, warmup_steps=0)
    # Nothing to resume in the fresh folder; wraps the loss in DDP when there are several GPUs.
    training = start_training(ctx, model, plan, {"bench": True}, lr=1e-5, weight_decay=0.0, log_prefix="bench:",
                              module=loss_model)
    autocast = autocast_for(device, bf16=True)

    generator = torch.Generator().manual_seed(rank)
    prompt_len = args.seq_len - args.answer_len
    rows = []
    for _ in range(args.batch_size):
        ids = torch.randint(1, args.vocab, (args.seq_len,), generator=generator).tolist()
        rows.append(lf.Encoded(ids=ids, n_prompt=prompt_len))
    batch = lf.collate(rows, [], pad_id=0)
    labelled = args.batch_size * args.answer_len * world_size
    scale = world_size / labelled

    for step in range(total):
        if step == args.warmup:
            torch.cuda.synchronize()
            if world_size > 1:
                dist.barrier()
            started = time.perf_counter()
        lf.micro_batch(training, batch, scale, True, autocast, device)
        optimizer_step(training)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    tokens_per_s = args.steps * args.batch_size * args.seq_len * world_size / elapsed
    mfu = 6 * params * tokens_per_s / (args.peak_tflops * 1e12 * world_size)
    if rank == 0:
        print(f"model: Llama {params / 1e9:.2f}B params ({args.layers} layers, hidden {args.hidden}), bf16 autocast, "
              f"fp32 master weights, {'gradient checkpointing, ' if args.gradient_checkpointing else ''}"
              f"{world_size} x {torch.cuda.get_device_name(device)}")
        print(f"batch: {args.batch_size} rows x {args.seq_len} tokens per GPU ({args.answer_len} labelled per row)")
        print(f"step time: {elapsed / args.steps * 1000:.1f} ms; peak memory "
              f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB on GPU {local_rank}")
        print(f"throughput: {tokens_per_s:,.0f} tokens/s ({tokens_per_s / world_size:,.0f} per GPU)")
        print(f"MFU: {100 * mfu:.1f}% (6 x params x tokens/s over {args.peak_tflops:g} TFLOP/s per GPU)")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
