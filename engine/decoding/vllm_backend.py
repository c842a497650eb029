"""The `prompt` method's decisions on vLLM (`backend: vllm`): an offline `vllm.LLM` in the worker, tensor parallel
over the run's GPUs, with automatic prefix caching (the instruction, label list and shots every example shares are
computed once and found again by hash). vLLM is imported here only, and only when a run uses it.

Same prompts, same parser, same stored outputs as the hf path (`decide`): the prompt text is rendered by
`PromptBuilder` and `ChatFormat` and tokenised with the model's own tokenizer, and vLLM gets those TOKEN IDS, not
text, so both backends see the same tokens. Answers go through `engine.prompting.parse` with the same failure
reasons. The decisions (see docs/vllm.md):

- ``generate``: greedy (temperature 0), the hf path's token limit, stopped at the chat format's stop tokens;
- ``constrained``: vLLM structured outputs: a choice list for one sequence task, else a regular expression built
  from `constraint_parts` (the hf grammar's own language: the same fixed text, one enum per task, one slot type
  per word), so every answer parses as on the hf path;
- ``score``: each option's log-likelihood from one-token requests at the nodes of the answers' prefix tree (the
  tree `engine.decoding.scoring` builds: prompt and answer tokenised together, then split), each asking for the
  log-probs of exactly the tokens scored there (`logprob_token_ids`); the same `score_norm` and `score_end`.
  `prompt_logprobs` would give the same numbers but makes vLLM skip its prefix cache for the request (every
  label would recompute the whole prompt).
"""
from __future__ import annotations

import os
import re
import time
import types
from dataclasses import dataclass, field

import torch

from clfbench.engine.context import RunContext
from clfbench.engine.decoding.answer import LOG, Answer, Progress
from clfbench.engine.decoding.decide import DecisionSettings
from clfbench.engine.decoding.decoder import Decoder
from clfbench.engine.decoding.model import resolve_dtype
from clfbench.engine.decoding.scoring import AnswerSearch, answer_tree, best_option, frontier
from clfbench.engine.prompting.chat import ChatFormat
from clfbench.engine.prompting.library import PromptBuilder
from clfbench.engine.prompting.outputs import (Choice, Fixed, OutputSpec, answer_token_limit, constraint_parts,
                                              groups)
from clfbench.engine.prompting.parse import parse_answer
from clfbench.engine.types import ClfbenchError, MethodOutput

MAX_TOKEN_IDS = 128  # vLLM's cap on `logprob_token_ids` per request (sampling_params.MAX_LOGPROB_TOKEN_IDS)
CPU_KV_CACHE_GIB = 2  # SmolLM2-135M in float32: about 45,000 tokens of KV cache


# ------------------------------------------------------------------------- the constraint, as plain values


def structured_constraint(spec: OutputSpec, n_words: int | None) -> dict:
    """The structured-output constraint of one example, as `StructuredOutputsParams` keywords: {"choice": labels}
    for one sequence task, else {"regex": ...} whose sentences are exactly the hf grammar's answers (the
    canonical text `target_text` writes: the same fixed text, an alternation per choice; slots: one per word)."""
    parts = constraint_parts(spec, n_words)
    if len(parts) == 1 and isinstance(parts[0], Choice):
        return {"choice": list(parts[0].options)}
    return {"regex": answer_regex(parts)}


def answer_regex(parts: list[Fixed | Choice]) -> str:
    """Fixed text escaped, each choice an alternation of its escaped options (longest first, so no engine that
    matches the first alternative can stop at a prefix: "time" inside "time_zone")."""
    out = []
    for part in parts:
        if isinstance(part, Fixed):
            out.append(re.escape(part.text))
        else:
            options = sorted(part.options, key=len, reverse=True)
            out.append("(" + "|".join(re.escape(option) for option in options) + ")")
    return "".join(out)


def answer_schema(spec: OutputSpec, n_words: int | None) -> dict:
    """The same answers as a JSON schema (an enum per task; slots: an array of exactly `n_words` enums). Not
    what the backend sends: a schema admits any JSON spacing and key order, which the hf grammar does not, so
    the two backends would differ for reasons that are not the model's. Kept as the reference the regex is
    tested against (every canonical answer satisfies both)."""
    def field(f) -> dict:
        if f.kind == "token":
            return {"type": "array", "items": {"enum": list(f.choices)}, "minItems": n_words or 0,
                    "maxItems": n_words or 0}
        return {"enum": list(f.choices)}

    if not spec.multi:
        return field(spec.fields[0])
    return {"type": "object", "properties": {f.json_field: field(f) for f in spec.fields},
            "required": [f.json_field for f in spec.fields], "additionalProperties": False}


# --------------------------------------------------------------------------------------------- the engine


@dataclass
class VllmEngine:
    """An offline vLLM engine and the chat format its prompts are rendered with. `counts`: the requests' prompt
    tokens, those vLLM found in its prefix cache, and the answer-tree nodes the score search fed and held."""

    llm: object
    chat: ChatFormat
    dtype: str
    max_model_len: int
    tensor_parallel: int
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, model_path: str, dtype_name: str, chat_format: str, device: str, seed: int,
             **engine_args) -> "VllmEngine":
        """vLLM on every GPU the run was given (`CUDA_VISIBLE_DEVICES` holds the run's GPUs), or on the CPU;
        `engine_args` go to `vllm.LLM` as they are (tests: `enforce_eager=True`)."""
        from transformers import AutoTokenizer, GenerationConfig
        from vllm import LLM

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:
            generation_config = None
        chat = ChatFormat(tokenizer, chat_format, generation_config)
        on_gpu = device.startswith("cuda")
        gpus = torch.cuda.device_count() if on_gpu else 1
        dtype = str(resolve_dtype(dtype_name, torch.device("cuda" if on_gpu else "cpu"))).removeprefix("torch.")
        llm = LLM(model=model_path, tokenizer=model_path, tensor_parallel_size=gpus, dtype=dtype, seed=seed,
                  enable_prefix_caching=True, max_logprobs=MAX_TOKEN_IDS,
                  **({} if on_gpu else cpu_engine_args()) | engine_args)
        max_len = int(llm.llm_engine.model_config.max_model_len)
        return cls(llm=llm, chat=chat, dtype=dtype, max_model_len=max_len, tensor_parallel=gpus)

    def run(self, prompts: list[list[int]], params: list) -> list:
        """One `generate` call over token-id prompts (vLLM batches and schedules them), results in order; counts
        their prompt tokens and those found in the prefix cache."""
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        for out in outputs:
            self.add("prompt", len(out.prompt_token_ids or ()))
            self.add("cached", int(getattr(out, "num_cached_tokens", 0) or 0))
        return outputs

    def add(self, name: str, count: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + count

    def next_token_log_probs(self, requests: list[tuple[list[int], list[int]]]) -> list[dict[int, float]]:
        """Per (prompt ids, token ids): the log-probs of those tokens as the next one, from one-token requests
        that ask for exactly them (`logprob_token_ids`, at most MAX_TOKEN_IDS per request)."""
        from vllm import SamplingParams

        prompts, params, owners = [], [], []
        for r, (prompt, tokens) in enumerate(requests):
            for s in range(0, len(tokens), MAX_TOKEN_IDS):
                chunk = tokens[s:s + MAX_TOKEN_IDS]
                prompts.append(prompt)
                params.append(SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=chunk,
                                             detokenize=False))
                owners.append((r, chunk))
        found: list[dict[int, float]] = [{} for _ in requests]
        for out, (r, chunk) in zip(self.run(prompts, params) if prompts else [], owners):
            position = out.outputs[0].logprobs[0]
            found[r].update({token: float(position[token].logprob) for token in chunk})
        return found

    def decide(self, ctx: RunContext, builder: PromptBuilder, settings: DecisionSettings) -> MethodOutput:
        """`decide`'s contract on vLLM: one `Predicted` per example and task, and the decision's numbers."""
        chat, items = self.chat, builder.items
        started = time.perf_counter()
        texts = [chat.text(builder.render(item.text)) for item in items]
        ids = [chat.encode(text) for text in texts]
        longest = max((len(x) for x in ids), default=0)
        if longest + 8 > self.max_model_len:
            raise ClfbenchError(f"the longest prompt has {longest} tokens, more than the model's "
                                f"{self.max_model_len} positions; cut documents with -o max_text_chars=N or use "
                                f"fewer shots")
        progress = Progress(ctx, len(items))
        self.counts = {}
        if settings.decision == "score":
            answers = score_answers(self, builder, texts, ids, settings, progress)
        else:
            answers = generate_answers(self, builder, ids, settings, progress)
        seconds = time.perf_counter() - started
        extra = self._numbers(ids, answers, seconds)
        if builder.neutralised:
            print(f"{LOG} {builder.neutralised} document(s) contained special-token text; neutralised", flush=True)
        print(f"{LOG} vllm: {len(items)} examples in {seconds:.1f} s ({extra['examples_per_s']:.2f} ex/s), prompt "
              f"{extra['prompt_tokens_mean']:.0f} tokens on average, {extra['prefix_cache_hit_share']:.0%} of the "
              f"requests' prompt tokens found in the prefix cache", flush=True)
        return MethodOutput(predictions=builder.predicted([(a.raw, a.parsed) for a in answers]),
                            extra_results={t.name: dict(extra) for t in builder.tasks})

    def _numbers(self, ids: list[list[int]], answers: list[Answer], seconds: float) -> dict[str, float]:
        n, counts = max(len(ids), 1), self.counts
        rate = len(ids) / seconds if seconds > 0 else 0.0
        extra = {"examples_per_s": rate, "test_examples_per_s": rate,
                 "prompt_tokens_mean": sum(len(x) for x in ids) / n,
                 "generated_tokens_mean": sum(a.generated for a in answers) / n,
                 "prefix_cache_hit_share": counts.get("cached", 0) / max(counts.get("prompt", 0), 1),
                 "decision_time_s": seconds, "tensor_parallel": float(self.tensor_parallel)}
        if counts.get("tree"):
            extra["answer_tokens_fed_share"] = counts.get("fed", 0) / counts["tree"]
        return extra


def cpu_engine_args() -> dict:
    """vLLM's settings on a CPU. Its memory fraction is of the whole NUMA node and refused when other processes
    hold part of it: a fixed KV cache instead (VLLM_CPU_KVCACHE_SPACE, in GiB, overrides). Blocks of 32 tokens,
    the CPU attention's smallest (default 128): a request recomputes its prompt from the last full cached block
    on, and the score requests differ only after the prompt. The engine core runs in this process: a second
    one would only compete for the same cores."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    memory = {} if "VLLM_CPU_KVCACHE_SPACE" in os.environ else {"kv_cache_memory_bytes": CPU_KV_CACHE_GIB << 30}
    return {"block_size": 32, **memory}


# ---------------------------------------------------------------------------- generate and constrained


def generate_answers(engine: VllmEngine, builder: PromptBuilder, ids: list[list[int]], settings: DecisionSettings,
                     progress: Progress) -> list[Answer]:
    """Greedy answers (constrained by `structured_constraint` for `constrained`), parsed; `truncated` when an
    answer stopped at its token limit rather than a stop token. Batches of `batch_size` examples, for progress."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    spec, items, chat = builder.spec, builder.items, engine.chat
    stop_ids = set(chat.stop_ids)
    answers: list[Answer] = []
    for start in range(0, len(items), settings.batch_size):
        batch = range(start, min(start + settings.batch_size, len(items)))
        params = []
        for i in batch:
            limit = settings.max_new_tokens or answer_token_limit(spec, items[i].n_words)
            structured = (StructuredOutputsParams(**structured_constraint(spec, items[i].n_words))
                          if settings.decision == "constrained" else None)
            params.append(SamplingParams(temperature=0.0, max_tokens=limit, stop_token_ids=list(chat.stop_ids),
                                         detokenize=False, skip_special_tokens=False, structured_outputs=structured))
        for i, out in zip(batch, engine.run([ids[i] for i in batch], params)):
            tokens = list(out.outputs[0].token_ids)
            stopped = out.outputs[0].finish_reason == "stop"
            body = tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens
            raw = chat.tokenizer.decode(body, skip_special_tokens=False)
            parsed = parse_answer(raw, spec, items[i].n_words, truncated=not stopped)
            answers.append(Answer(raw=raw, parsed=parsed, generated=len(body) + (1 if stopped else 0)))
        progress.add(len(batch))
    return answers


# ------------------------------------------------------------------------------------------------ score


def token_splitter(chat: ChatFormat) -> Decoder:
    """A `Decoder` without a model: what `answer_tree` needs of one is `joint_split` (prompt and answer tokenised
    together, then split, with its cache) and the chat format; nothing here runs a forward pass."""
    return Decoder(types.SimpleNamespace(config=types.SimpleNamespace()), chat, torch.device("cpu"))


def tree_requests(tree, wanted: list[int] | None = None) -> list[tuple[int, list[int], list[int]]]:
    """(distribution, prompt ids, the token ids whose log-probs it must give) per distribution of `tree` that
    scores a token (only those in `wanted`, when given), in distribution order: 0 is after the context
    (`tree.chain`), i + 1 after node i and its ancestors."""
    scored: dict[int, list[int]] = {}
    for path in tree.paths:
        for dist, token in path:
            if token not in scored.setdefault(dist, []):
                scored[dist].append(token)
    requests = []
    for dist in sorted(scored) if wanted is None else [d for d in wanted if d in scored]:
        below: list[int] = []
        node = dist - 1
        while node >= 0:
            below.append(tree.nodes[node])
            node = tree.parents[node]
        requests.append((dist, tree.chain + below[::-1], scored[dist]))
    return requests


def node_log_probs(engine, trees: list, wanted: list[list[int] | None]) -> list[dict[tuple[int, int], float]]:
    """Per tree, {(distribution, token): log-prob} at its `wanted` distributions (None: all), all trees' requests
    in one call of `engine.next_token_log_probs`."""
    requests, owners = [], []
    for t, tree in enumerate(trees):
        for dist, prompt, tokens in tree_requests(tree, wanted[t]):
            requests.append((prompt, tokens))
            owners.append((t, dist))
    found: list[dict[tuple[int, int], float]] = [{} for _ in trees]
    for (t, dist), values in zip(owners, engine.next_token_log_probs(requests)):
        found[t].update({(dist, token): value for token, value in values.items()})
    return found


def score_trees(engine, trees: list) -> list[list[tuple[float, int]]]:
    """Every option's (summed log-prob, token count) for every tree: what calibration needs, and the reference
    `search_trees` is tested against."""
    return [[(sum(values[step] for step in path), len(path)) for path in tree.paths]
            for tree, values in zip(trees, node_log_probs(engine, trees, [None] * len(trees)))]


def search_trees(engine, trees: list, offsets: list[list[float]], norm: str, width: int = 8
                 ) -> tuple[list[int], int]:
    """The best option of each tree, exactly the argmax of `score_trees`' normalised scores: the hf path's
    best-first branch and bound (`engine.decoding.scoring.search_batch`, its search state and frontier reused),
    the engine computing each round's distributions. Returns (the chosen option per tree, the nodes fed)."""
    searches = [AnswerSearch(tree=t, offsets=o, known=[0.0] * len(t.paths), missing=[len(p) for p in t.paths],
                        next_entry=[0] * len(t.paths)) for t, o in zip(trees, offsets)]
    wanted: list[list[int]] = [[0] for _ in trees]  # round 0: the distribution after each context
    fed = 0
    while any(wanted):
        for search, dists, values in zip(searches, wanted, node_log_probs(engine, trees, wanted)):
            for dist in dists:
                for p, token in search.scored_at.get(dist, ()):
                    search.known[p] += values[(dist, token)]
                    search.missing[p] -= 1
                    search.next_entry[p] += 1
        chosen = [frontier(search, norm, width) if not search.done else [] for search in searches]
        for search, nodes in zip(searches, chosen):
            search.fed.update({node: 0 for node in nodes})  # asked for in the next round
        fed += sum(len(nodes) for nodes in chosen)
        wanted = [[node + 1 for node in nodes] for nodes in chosen]
    return [best_option(search, norm) for search in searches], fed


def score_answers(engine: VllmEngine, builder: PromptBuilder, texts: list[str], ids: list[list[int]],
                  settings: DecisionSettings, progress: Progress) -> list[Answer]:
    """The best answer of every example; the answer's groups are chosen in turn, each after the ones before it
    (as `engine.decoding.scoring.score_answers`)."""
    spec = builder.spec
    if spec.has_token_task:
        raise ClfbenchError("decision=score is not defined for token (slot) tasks; use constrained or generate")
    splitter = token_splitter(engine.chat)
    answer_groups = groups(constraint_parts(spec))
    chosen, contexts, context_ids = [""] * len(texts), list(texts), [list(x) for x in ids]
    offsets = Calibration(engine, splitter, engine.chat.text(builder.render(settings.content_free)),
                          settings.score_norm == "calibrated")
    for g, group in enumerate(answer_groups):
        last = g == len(answer_groups) - 1
        end = last and settings.score_end
        for start in range(0, len(texts), settings.batch_size):
            batch = range(start, min(start + settings.batch_size, len(texts)))
            best = [0] * len(batch)
            if len(group.options) > 1:
                trees = [answer_tree(splitter, contexts[i], context_ids[i], group.options, end, 0) for i in batch]
                best, fed = search_trees(engine, trees, [offsets(chosen[i], group.options, end) for i in batch],
                                         settings.score_norm)
                engine.add("fed", fed)
                engine.add("tree", sum(len(t.nodes) for t in trees))
            for i, b in zip(batch, best):
                chosen[i] += group.options[b]
                contexts[i] += group.options[b]
                if not last:
                    context_ids[i] = engine.chat.encode(contexts[i])  # an answer may merge with the prompt's end
            if last:
                progress.add(len(batch))
    return [Answer(raw=raw, parsed=parse_answer(raw, spec, item.n_words), generated=0)
            for raw, item in zip(chosen, builder.items)]


@dataclass
class Calibration:
    """What each option's summed log-prob is reduced by: under `calibrated`, its sum after the content-free
    document (and the same answer so far), computed once per distinct answer so far; else 0."""

    engine: object
    splitter: Decoder
    content_free: str  # the prompt with the content-free document
    calibrated: bool
    known: dict[tuple[str, tuple[str, ...], bool], list[float]] = field(default_factory=dict)

    def __call__(self, answer: str, options: tuple[str, ...], end: bool) -> list[float]:
        if not self.calibrated:
            return [0.0] * len(options)
        key = (answer, options, end)
        if key not in self.known:
            text = self.content_free + answer
            tree = answer_tree(self.splitter, text, self.splitter.chat.encode(text), options, end, 0)
            self.known[key] = [total for total, _ in score_trees(self.engine, [tree])[0]]
        return self.known[key]
