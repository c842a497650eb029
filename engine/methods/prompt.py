"""Prompting a local causal LM: `run(ctx) -> MethodOutput`, three ways to decide (option `decision`).

The method is this module's `run`; the decoding itself is the library `engine.decoding`, shared with
`llm-finetune`.

- ``generate``: greedy decoding of each answer (batched, the per-example part left-padded), stopped by the
  model's stop tokens or `max_new_tokens`, then parsed by `engine.prompting.parse`, which records why an answer
  failed (``empty``, ``not_in_label_set``, ``invalid_json``, ``missing_field``, ``wrong_length``, ``truncated``).
- ``constrained``: the same greedy decoding, but each step may only pick a token that keeps the answer inside
  its grammar: a prefix tree over the label token sequences (labels tokenised after the prompt, as they appear),
  then the stop token; for slots one tag per word; for a multi-task prompt a JSON object with one enum per task.
  Every answer parses, by construction.
- ``score``: the answer with the highest log-likelihood given the prompt. Prompt and answer are tokenised
  TOGETHER and split afterwards (so a leading-space or merged token is the one the model would see), the answer
  ends with the stop token (so "comp" cannot win over "comp.graphics" by stopping early; `score_end=false` leaves
  it out, lm-evaluation-harness's convention, which never feeds a label's last token), and the answers of one
  example form a prefix tree fed with a tree attention mask (no copy of the prompt per label). `score_norm`:
  ``sum``, ``mean`` (per token) or ``calibrated`` (minus the answer's sum for the content-free document "N/A",
  Zhao et al. 2021). The argmax is found by an exact best-first branch and bound (`engine.decoding.scoring`):
  log-probs are <= 0, so the part of an answer's sum known so far bounds it from above, and a subtree that cannot
  beat the best complete answer is never fed (SmolLM2, MASSIVE, calibrated: 38% of the tree's tokens zero-shot).
  The choice is the one scoring every label would make. Token tasks have no closed answer list: refused.

What every example shares is computed once: the prompt text before the document (system prompt, instruction,
label list, few-shot examples) is run through the model once (`reuse_prefix`, default on), and its KV cache is
held ONCE, not copied to each row: `engine.decoding.shared_prefix` attends every query of a batch to it in one
product per KV head and merges that with each row's attention to its own tokens (log-sum-exp). Rows of a batch
sit behind that prefix, their own part left-padded, with explicit position ids and an explicit attention mask over
their own tokens.

Weights: `dtype=auto` is bfloat16 where the hardware multiplies it natively (a GPU that supports it, a CPU with
AVX512-BF16 or AMX), else float32; the log-softmax normalisers are computed in float32 either way.

`backend`: `hf` is the decoding above (transformers); `vllm` runs the same prompts, parser and decision modes on
an offline vLLM engine (`engine.decoding.vllm_backend`, docs/vllm.md); `auto` is vllm on GPUs where it is installed.

Runs on rank 0 only (a run with several processes leaves the other ranks idle: they return None at once); on
the hf backend, rank 0 places a model too large for one GPU across all the run's GPUs (`load_model`).
"""
from __future__ import annotations

import time

import torch

from clfbench.engine.context import RunContext
from clfbench.engine.decoding import DecisionSettings, Decoder, decide, load_model
from clfbench.engine.prompting.chat import ChatFormat
from clfbench.engine.prompting.library import PromptBuilder, load_prompt_set
from clfbench.engine.types import MethodOutput

LOG = "prompt:"


def run(ctx: RunContext) -> MethodOutput | None:
    if not ctx.is_main:
        return None
    opts = ctx.options
    prompt = load_prompt_set(opts.prompt_set).select(ctx.tasks, ctx.shots)

    started = time.perf_counter()
    backend = opts.backend_for(ctx.device)
    if backend == "vllm":
        from clfbench.engine.decoding.vllm_backend import VllmEngine

        engine = VllmEngine.load(ctx.model_path, opts.dtype, opts.chat_format, ctx.device, ctx.seed)
        chat, weights = engine.chat, f"{engine.dtype} weights, vllm (tensor parallel {engine.tensor_parallel})"
        decide_with = engine.decide
    else:
        device = torch.device(ctx.device)
        tokenizer, model = load_model(ctx.model_path, opts.dtype, device, ctx.gpus, opts.batch_size)
        chat = ChatFormat(tokenizer, opts.chat_format, getattr(model, "generation_config", None))
        weights = f"{str(model.dtype).removeprefix('torch.')} weights"
        decoder = Decoder(model, chat, device)

        def decide_with(ctx, builder, settings):
            return decide(ctx, decoder, builder, settings)
    builder = PromptBuilder.create(prompt, ctx.tasks, ctx.shots, ctx.seed, opts.max_text_chars, chat.forbidden)
    load_time = time.perf_counter() - started
    print(f"{LOG} {prompt.describe()}, {len(builder.items)} examples, {ctx.shots} shots, decision={opts.decision}"
          + (f" ({opts.score_norm}{'' if opts.score_end else ', without the end token'})"
             if opts.decision == "score" else "") + f", chat_format={opts.chat_format}, "
          f"stop tokens {chat.stop_ids}, {weights}", flush=True)
    settings = DecisionSettings(
        decision=opts.decision, score_norm=opts.score_norm, score_end=opts.score_end, content_free=opts.content_free,
        max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size, reuse_prefix=opts.reuse_prefix)
    output = decide_with(ctx, builder, settings)
    for extra in output.extra_results.values():
        extra.update({"load_time_s": load_time, "shots": float(ctx.shots), "backend_vllm": float(backend == "vllm")})
    return output
