"""`decide`: answer every test example of a prompt builder with a model, in one of three decision modes. Shared by
the `prompt` method and `llm-finetune` (on the model it trained), so both decide the same way and their numbers
compare."""
from __future__ import annotations

import time
from dataclasses import dataclass

from clfbench.engine.context import RunContext
from clfbench.engine.decoding.answer import LOG, Answer, Progress
from clfbench.engine.decoding.decoder import SENTINEL, Decoder
from clfbench.engine.decoding.greedy import decode_answers
from clfbench.engine.decoding.scoring import score_answers
from clfbench.engine.prompting.library import PromptBuilder
from clfbench.engine.types import ClfbenchError, MethodOutput


@dataclass(frozen=True)
class DecisionSettings:
    """How to decide: the decision options of `prompt` (and `llm-finetune`'s test-time options)."""

    decision: str  # generate | constrained | score
    score_norm: str = "sum"  # score: sum | mean | calibrated
    score_end: bool = True  # score: the stop token after each label is part of its score
    content_free: str = "N/A"  # score_norm=calibrated: the content-free document
    max_new_tokens: int | None = None  # generate: the token limit per answer (None: by the answer's shape)
    batch_size: int = 32
    reuse_prefix: bool = True  # compute the prompt text every example shares once


def decide(ctx: RunContext, decoder: Decoder, builder: PromptBuilder, settings: DecisionSettings) -> MethodOutput:
    """Answer every test example of `builder` with `decoder`'s model as `settings` say: one `Predicted` per example
    and task, and the decision's numbers (throughput, prompt and answer lengths) as extra results."""
    chat, model = decoder.chat, decoder.model
    items = builder.items
    started = time.perf_counter()
    texts = [chat.text(builder.render(item.text)) for item in items]
    ids = [chat.encode(text) for text in texts]
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max((len(x) for x in ids), default=0)
    if limit and longest + 8 > limit:
        raise ClfbenchError(f"the longest prompt has {longest} tokens, more than the model's {limit} positions; "
                            f"cut documents with -o max_text_chars=N or use fewer shots")
    template_text = chat.text(builder.render(SENTINEL))
    prefix_text = template_text.partition(SENTINEL)[0] if settings.reuse_prefix else ""
    decoder.set_prefix(prefix_text)
    progress = Progress(ctx, len(items))

    search: dict[str, float] = {}
    if settings.decision == "score":
        answers, search = score_answers(decoder, builder, texts, ids, settings, progress)
    else:
        answers = decode_answers(decoder, builder, ids, template_text.partition(SENTINEL)[2], settings, progress)
    decide_time = time.perf_counter() - started
    extra = _decision_numbers(decoder, ids, answers, decide_time) | search
    if builder.neutralised:
        print(f"{LOG} {builder.neutralised} document(s) contained special-token text; neutralised", flush=True)
    print(f"{LOG} {len(items)} examples in {decide_time:.1f} s ({extra['examples_per_s']:.2f} ex/s), prompt "
          f"{extra['prompt_tokens_mean']:.0f} tokens on average, shared prefix {len(decoder.prefix_ids)}", flush=True)
    return MethodOutput(predictions=builder.predicted([(a.raw, a.parsed) for a in answers]),
                        extra_results={t.name: dict(extra) for t in builder.tasks})


def _decision_numbers(decoder: Decoder, ids: list[list[int]], answers: list[Answer], seconds: float
                      ) -> dict[str, float]:
    n = max(len(ids), 1)
    return {
        "examples_per_s": len(ids) / seconds if seconds > 0 else 0.0,
        # the name every method gives its test-time throughput (the encoder heads', the Pareto plot's x axis)
        "test_examples_per_s": len(ids) / seconds if seconds > 0 else 0.0,
        "prompt_tokens_mean": sum(len(x) for x in ids) / n,
        "generated_tokens_mean": sum(a.generated for a in answers) / n,
        "prefix_tokens": float(len(decoder.prefix_ids)),
        "prefix_reused_share": sum(1 for x in ids if decoder.prefix_length(x)) / n,
        "decision_time_s": seconds,
    }
