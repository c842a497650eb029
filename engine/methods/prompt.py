"""Prompting a local causal LM: `run(ctx) -> MethodOutput`, three ways to decide (option `decision`).

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
  Zhao et al. 2021). The argmax is found by an exact best-first branch and bound (`search_batch`): log-probs
  are <= 0, so the part of an answer's sum known so far bounds it from above, and a subtree that cannot beat the
  best complete answer is never fed (SmolLM2, MASSIVE, calibrated: 38% of the tree's tokens zero-shot). The
  choice is the one scoring every label would make. Token tasks have no closed answer list: refused.

What every example shares is computed once: the prompt text before the document (system prompt, instruction,
label list, few-shot examples) is run through the model once (`reuse_prefix`, default on), and its KV cache is
held ONCE, not copied to each row: `engine.shared_prefix` attends every query of a batch to it in one product
per KV head and merges that with each row's attention to its own tokens (log-sum-exp). Rows of a batch sit
behind that prefix, their own part left-padded, with explicit position ids and an explicit attention mask over
their own tokens.

Weights: `dtype=auto` is bfloat16 where the hardware multiplies it natively (a GPU that supports it, a CPU with
AVX512-BF16 or AMX), else float32; the log-softmax normalisers are computed in float32 either way.

Runs on rank 0 only (a run with several processes leaves the other ranks idle: they return None at once).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from clfbench.engine import shared_prefix
from clfbench.engine.prompting.chat import ChatFormat
from clfbench.engine.prompting.library import Item, PromptBuilder, load_prompt_set
from clfbench.engine.prompting.outputs import Group, OutputSpec, constraint_parts, groups
from clfbench.engine.prompting.parse import Parsed, parse_answer
from clfbench.engine.shared_prefix import PrefixKV
from clfbench.engine.types import ClfbenchError, MethodOutput, Prediction, RunContext

LOG = "prompt:"
SENTINEL = "\ue000clfbench-document\ue000"
Trie = dict  # token id -> Trie; a leaf (an option complete) is {}


# ------------------------------------------------------------------------------------------------- entry


def run(ctx: RunContext) -> MethodOutput | None:
    if not ctx.is_main:
        return None
    opts = ctx.options
    shots = int(getattr(ctx.spec, "shots", 0) or 0)
    seed = int(getattr(ctx.spec, "seed", 0) or 0)
    prompt = load_prompt_set(opts.prompt_set).select(ctx.tasks, shots)

    started = time.perf_counter()
    device = torch.device(ctx.device)
    tokenizer, model = load_model(ctx.model_path, opts.dtype, device)
    chat = ChatFormat(tokenizer, opts.chat_format, getattr(model, "generation_config", None))
    builder = PromptBuilder.create(prompt, ctx.tasks, shots, seed, opts.max_text_chars, chat.forbidden)
    decoder = Decoder(model, chat, device)
    load_time = time.perf_counter() - started
    print(f"{LOG} {prompt.describe()}, {len(builder.items)} examples, {shots} shots, decision={opts.decision}"
          + (f" ({opts.score_norm}{'' if opts.score_end else ', without the end token'})"
             if opts.decision == "score" else "") + f", chat_format={opts.chat_format}, "
          f"stop tokens {chat.stop_ids}, {str(model.dtype).removeprefix('torch.')} weights", flush=True)
    output = decide(ctx, decoder, builder, opts)
    for extra in output.extra_results.values():
        extra.update({"load_time_s": load_time, "shots": float(shots)})
    return output


def decide(ctx: RunContext, decoder: "Decoder", builder: PromptBuilder, opts) -> MethodOutput:
    """Answer every test example of `builder` with `decoder`'s model, as `opts` (PromptOptions fields: decision,
    score_norm, score_end, content_free, max_new_tokens, batch_size, reuse_prefix) says; one Prediction per example and
    task, and the decision's numbers as extra results. Shared by `prompt` and `llm-finetune` (a trained model)."""
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
    prefix_text = template_text.partition(SENTINEL)[0] if opts.reuse_prefix else ""
    decoder.set_prefix(prefix_text)
    progress = Progress(ctx, len(items))

    search: dict[str, float] = {}
    if opts.decision == "score":
        answers, search = score_answers(decoder, builder, texts, ids, opts, progress)
    else:
        answers = decode_answers(decoder, builder, ids, template_text.partition(SENTINEL)[2], opts, progress)
    decide_time = time.perf_counter() - started

    predictions: dict[str, list[Prediction]] = {t.name: [] for t in builder.tasks}
    for item, answer in zip(items, answers):
        parsed = answer.parsed
        for task in builder.tasks:
            example = item.by_task[task.name]
            gold = list(example.tags or ()) if task.kind == "token" else example.label
            result = parsed[task.name]
            predictions[task.name].append(Prediction(
                example_id=example.id, text=example.text, gold=gold, predicted=result.value,
                raw_output=answer.raw, parse_status=result.status))
    n = max(len(items), 1)
    extra = {
        "examples_per_s": len(items) / decide_time if decide_time > 0 else 0.0,
        "prompt_tokens_mean": sum(len(x) for x in ids) / n,
        "generated_tokens_mean": sum(a.generated for a in answers) / n,
        "prefix_tokens": float(len(decoder.prefix_ids)),
        "prefix_reused_share": sum(1 for x in ids if decoder.prefix_length(x)) / n,
        "decision_time_s": decide_time,
        **search,
    }
    if builder.neutralised:
        print(f"{LOG} {builder.neutralised} document(s) contained special-token text; neutralised", flush=True)
    print(f"{LOG} {len(items)} examples in {decide_time:.1f} s ({extra['examples_per_s']:.2f} ex/s), prompt "
          f"{extra['prompt_tokens_mean']:.0f} tokens on average, shared prefix {len(decoder.prefix_ids)}", flush=True)
    return MethodOutput(predictions=predictions, extra_results={t.name: dict(extra) for t in builder.tasks})


@dataclass
class Answer:
    raw: str
    parsed: dict[str, Parsed]
    generated: int = 0  # tokens the model produced (stop token included)


class Progress:
    def __init__(self, ctx: RunContext, total: int):
        self.ctx, self.total, self.done, self.started, self.last_log = ctx, total, 0, time.perf_counter(), 0.0
        ctx.set_progress(0, total)

    def add(self, count: int) -> None:
        self.done += count
        self.ctx.set_progress(self.done, self.total)
        now = time.perf_counter()
        if now - self.last_log > 10 or self.done == self.total:
            self.last_log = now
            rate = self.done / max(now - self.started, 1e-9)
            self.ctx.log_metric(self.done, "examples_per_s", rate)
            print(f"{LOG} {self.done}/{self.total} examples ({rate:.2f} ex/s)", flush=True)


# ------------------------------------------------------------------------------------------------- model


def load_model(model_path: str, dtype_name: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = resolve_dtype(dtype_name, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
    except (ValueError, ImportError):  # an architecture without SDPA support
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.to(device)
    model.eval()
    return tokenizer, model


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the hardware multiplies it natively -- a GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (measured here: bf16 matrix products 3-4x faster than float32 on one Zen 4 core) -- else
    float32 (emulated bf16 would be slower and less exact)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _cpu_has_native_bf16() -> bool:
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Decoder:
    """The model with a shared-prefix KV cache, batched forward passes with explicit masks and positions."""

    def __init__(self, model, chat: ChatFormat, device: torch.device):
        self.model, self.chat, self.device = model, chat, device
        # transformers passes a 4D mask through as it is; the packed attention builds its own (`PackedCall`)
        self.unused_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
        tok = chat.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else chat.stop_id
        self.pad_id = int(pad)
        self.sdpa = getattr(model.config, "_attn_implementation", "eager") in ("sdpa", shared_prefix.NAME)
        self.prefix_ids: list[int] = []
        self.prefix: PrefixKV | None = None
        self.split_attention = False  # the prefix held once, outside the rows' cache (engine.shared_prefix)
        self._split_cache: dict[tuple[str, str], tuple[int, list[int]]] = {}
        self._plain_cache: dict[str, list[int]] = {}

    def _plain(self, text: str) -> list[int]:
        ids = self._plain_cache.get(text)
        if ids is None:
            ids = self._plain_cache[text] = self.chat.encode_plain(text)
        return ids

    # ----------------------------------------------------------------------------------- shared prefix

    @torch.no_grad()
    def set_prefix(self, text: str) -> None:
        """Run the shared prompt text once and keep its KV cache (its last token is left out: it could merge with
        the document's first characters)."""
        self.prefix_ids, self.prefix = [], None
        ids = self.chat.encode(text)[:-1] if text else []
        if len(ids) < 2:
            return
        self.prefix = PrefixKV.compute(self.model, ids, self.device)
        self.prefix_ids = ids
        self.split_attention = self.split_attention or shared_prefix.enable(self.model)

    def prefix_length(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the shared cache covers (0 when they do not start with it)."""
        n = len(self.prefix_ids)
        return n if n and len(ids) > n and ids[:n] == self.prefix_ids else 0

    def new_cache(self, batch: int, with_prefix: bool):
        """The rows' KV cache: their own tokens only when the prefix is attended apart (split attention), else
        the prefix expanded to every row first."""
        from transformers import DynamicCache

        if with_prefix and self.prefix is not None and self.split_attention:
            return shared_prefix.RowCache()
        if not with_prefix or self.prefix is None:
            return DynamicCache(config=self.model.config)
        return DynamicCache(ddp_cache_data=self.prefix.expanded(batch), config=self.model.config)

    # --------------------------------------------------------------------------------------- forward

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = allowed[:, None, :, :]
        if self.sdpa:
            return mask
        dtype = self.model.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)

    def forward(self, cache, input_ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                keep: torch.Tensor, with_prefix: bool, real: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (the model's dtype) at the `keep` positions, flattened row by row. `allowed[b, q, k]`: query q
        of row b may attend key k of its OWN tokens (what the cache holds of them, then this call's); with
        `with_prefix` every query also sees the whole shared prefix. `real` (default: all) marks the slots that
        hold tokens rather than padding; `keep` must lie within it. With the prefix attended apart, only the real
        tokens are computed (`shared_prefix.PackedCall`)."""
        if with_prefix and self.split_attention:
            real = torch.ones_like(keep) if real is None else real
            call = shared_prefix.PackedCall.make(cache, real, allowed, self.model.dtype)
            out = self.model(input_ids=input_ids[real][None], position_ids=positions[real][None],
                             attention_mask=self.unused_mask, use_cache=False,
                             logits_to_keep=keep[real][None], shared_prefix=self.prefix, packed=call)
            return out.logits
        extra = {}
        if with_prefix:
            B, Q, _ = allowed.shape
            allowed = torch.cat([allowed.new_ones((B, Q, self.prefix.length)), allowed], dim=2)
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=self._mask(allowed),
                         past_key_values=cache, use_cache=True, logits_to_keep=keep, **extra)
        return out.logits

    # ------------------------------------------------------------------ prompt and answer, tokenised together

    def joint_split(self, ctx_text: str, ctx_ids: list[int], option: str) -> tuple[int, list[int]]:
        """Tokenise context + option together; (k, tokens): the joint ids are ctx_ids[:k] + tokens.

        k < len(ctx_ids) when the option's first characters merge with the context's last token. Text from the last
        special token on tokenises the same whatever precedes it, so only that tail is tokenised (and cached).
        """
        at = self.chat.last_special(ctx_text)
        if at >= 0:
            tail = ctx_text[at:]
            tail_ids = self._plain(tail)
            if ctx_ids[len(ctx_ids) - len(tail_ids):] == tail_ids:
                key = (tail, option)
                hit = self._split_cache.get(key)
                if hit is None:
                    joint = self.chat.encode_plain(tail + option)
                    k = _common_prefix(tail_ids, joint)
                    hit = (len(tail_ids) - k, joint[k:])
                    self._split_cache[key] = hit
                back, tokens = hit
                return len(ctx_ids) - back, list(tokens)
        joint = self.chat.encode(ctx_text + option)
        k = _common_prefix(ctx_ids, joint)
        return k, joint[k:]


# --------------------------------------------------------------------------------------- decoding (greedy)


@dataclass
class Grammar:
    """Constrained decoding of one example: a prefix tree per group, the last one ending with the stop token."""

    tries: list[Trie]
    branches_after: list[bool]  # does any group after g still have a choice?
    _branchy: dict[int, bool] = field(default_factory=dict)

    def branchy(self, node: Trie) -> bool:
        """Does a choice remain below this node?"""
        key = id(node)
        if key not in self._branchy:
            self._branchy[key] = len(node) > 1 or any(self.branchy(child) for child in node.values())
        return self._branchy[key]


def build_trie(sequences: list[list[int]]) -> Trie:
    """A prefix tree of token sequences; no sequence may be a prefix of another (each option ends with its own
    terminator: closing text or the stop token), so a leaf is exactly a complete option."""
    root: Trie = {}
    ends: set[int] = set()
    for seq in sequences:
        if not seq:
            raise ClfbenchError("constrained decoding: an option has no tokens")
        node = root
        for token in seq:
            if id(node) in ends:
                raise ClfbenchError("constrained decoding: an option's tokens are a prefix of another's")
            node = node.setdefault(token, {})
        if node:
            raise ClfbenchError("constrained decoding: an option's tokens are a prefix of another's")
        ends.add(id(node))
    return root


class GrammarBuilder:
    """Token prefix trees for the answer groups, the options tokenised after the prompt's fixed end."""

    def __init__(self, decoder: Decoder, spec: OutputSpec, prompt_tail: str):
        self.decoder, self.spec = decoder, spec
        self.prompt_tail = prompt_tail  # the prompt text after the document: the same for every example
        self._tries: dict[tuple, Trie] = {}
        self._grammars: dict[int | None, Grammar] = {}

    def tokens(self, context: str, options: tuple[str, ...], last: bool) -> list[list[int]]:
        chat = self.decoder.chat
        ctx_ids = chat.encode(context)
        out = []
        for option in options:
            k, toks = self.decoder.joint_split(context, ctx_ids, option)
            if k != len(ctx_ids):  # merged with the context: use the option's own tokens
                toks = chat.encode_plain(option)
            out.append(list(toks) + ([chat.stop_id] if last else []))
        return out

    def grammar(self, n_words: int | None) -> Grammar:
        key = n_words if self.spec.has_token_task else None
        if key in self._grammars:
            return self._grammars[key]
        answer_groups = groups(constraint_parts(self.spec, n_words))
        context = self.prompt_tail
        tries = []
        for g, group in enumerate(answer_groups):
            last = g == len(answer_groups) - 1
            trie_key = (context[-200:], group.options, last)
            trie = self._tries.get(trie_key)
            if trie is None:
                trie = build_trie(self.tokens(context, group.options, last))
                self._tries[trie_key] = trie
            tries.append(trie)
            context += group.options[0]
        branches_after = [any(len(gr.options) > 1 for gr in answer_groups[g + 1:]) for g in range(len(answer_groups))]
        grammar = Grammar(tries=tries, branches_after=branches_after)
        self._grammars[key] = grammar
        return grammar


@dataclass
class _Row:
    index: int  # position in the caller's list
    grammar: Grammar | None
    limit: int
    out: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens to feed before the next choice
    group: int = 0
    node: Trie | None = None
    stopped: bool = False  # ended with a stop token / completed its grammar
    done: bool = False


@torch.no_grad()
def greedy(decoder: Decoder, ids_list: list[list[int]], grammars: list[Grammar | None], limits: list[int],
           use_prefix: bool) -> list[_Row]:
    """Greedy decoding of a batch: rows behind the shared prefix (if `use_prefix`), their own parts left-padded.

    Without a grammar a row stops at a stop token or after `limit` tokens. With one, a row may only pick a child
    of its current tree node (the argmax over those children); forced tokens (a node with one child) are not
    chosen but fed together with the choice before them in one step, and once nothing is left to choose the rest
    of the answer is appended without running the model.
    """
    device = decoder.device
    stop_ids = set(decoder.chat.stop_ids)
    P = len(decoder.prefix_ids) if use_prefix else 0
    B = len(ids_list)
    chains = [ids[P:] for ids in ids_list]
    C = max(len(c) for c in chains)
    input_ids = torch.full((B, C), decoder.pad_id, dtype=torch.long)
    positions = torch.zeros((B, C), dtype=torch.long)
    valid = torch.zeros((B, C), dtype=torch.bool)  # which of the rows' own cached keys are real tokens
    for b, chain in enumerate(chains):
        pad = C - len(chain)
        input_ids[b, pad:] = torch.tensor(chain, dtype=torch.long)
        positions[b, pad:] = torch.arange(P, P + len(chain))
        valid[b, pad:] = True
    allowed = torch.ones((C, C), dtype=torch.bool).tril()[None] & valid[:, None, :]
    allowed |= torch.eye(C, dtype=torch.bool)[None]  # a pad query sees itself: no row fully masked
    keep = torch.zeros((B, C), dtype=torch.bool)
    keep[:, -1] = True
    cache = decoder.new_cache(B, use_prefix)
    scores = decoder.forward(cache, input_ids.to(device), positions.to(device), allowed.to(device), keep.to(device),
                             use_prefix, valid.to(device))
    next_pos = torch.tensor([P + len(c) for c in chains], dtype=torch.long)

    rows = [_Row(index=i, grammar=g, limit=lim) for i, (g, lim) in enumerate(zip(grammars, limits))]
    for row in rows:
        if row.grammar is not None:
            row.node = row.grammar.tries[0]
    active = list(range(B))  # rows still in the cache, in cache order; scores[slot] belongs to active[slot]
    while True:
        for slot, b in enumerate(active):
            _advance(rows[b], _choose(rows[b], scores[slot]), stop_ids)
        still = [slot for slot, b in enumerate(active) if not rows[b].done]
        if not still:
            break
        if len(still) != len(active):
            index = torch.tensor(still, dtype=torch.long)
            cache.batch_select_indices(index.to(device))
            valid, next_pos = valid[index], next_pos[index]
            active = [active[s] for s in still]
        A = len(active)
        lengths = [len(rows[b].pending) for b in active]
        L = max(lengths)
        tokens = torch.full((A, L), decoder.pad_id, dtype=torch.long)
        new_valid = torch.zeros((A, L), dtype=torch.bool)
        keep = torch.zeros((A, L), dtype=torch.bool)
        for slot, (b, n) in enumerate(zip(active, lengths)):
            tokens[slot, :n] = torch.tensor(rows[b].pending, dtype=torch.long)
            new_valid[slot, :n] = True
            keep[slot, n - 1] = True
        step_positions = next_pos[:, None] + torch.arange(L)[None, :]
        step_causal = torch.ones((L, L), dtype=torch.bool).tril()[None] & new_valid[:, None, :]
        step_causal |= torch.eye(L, dtype=torch.bool)[None]
        allowed = torch.cat([valid[:, None, :].expand(A, L, valid.shape[1]), step_causal], dim=2)
        scores = decoder.forward(cache, tokens.to(device), step_positions.to(device), allowed.to(device),
                                 keep.to(device), use_prefix, new_valid.to(device))
        valid = torch.cat([valid, new_valid], dim=1)
        next_pos = next_pos + torch.tensor(lengths, dtype=torch.long)
    return rows


def _choose(row: _Row, scores: torch.Tensor) -> int:
    if row.grammar is None:
        return int(scores.argmax())
    children = list(row.node.keys())
    if len(children) == 1:
        return children[0]
    candidates = torch.tensor(children, dtype=torch.long, device=scores.device)
    return children[int(scores[candidates].argmax())]


def _advance(row: _Row, token: int, stop_ids: set[int]) -> None:
    """Take `token`; then, with a grammar, every forced token up to the next real choice (they are fed together),
    or the whole rest of the answer when no choice is left."""
    row.out.append(token)
    row.pending = [token]
    grammar = row.grammar
    if grammar is None:
        if token in stop_ids:
            row.stopped = row.done = True
        elif len(row.out) >= row.limit:
            row.done = True
        return
    row.node = row.node[token]
    while True:
        if not row.node:  # this group's option is complete
            row.group += 1
            if row.group == len(grammar.tries):
                row.stopped = row.done = True
                return
            row.node = grammar.tries[row.group]
        if not (grammar.branchy(row.node) or grammar.branches_after[row.group]):
            while row.node:  # nothing left to choose: the forced rest, without running the model
                token = next(iter(row.node))
                row.out.append(token)
                row.node = row.node[token]
            continue
        if len(row.node) > 1:
            return  # a real choice: needs the scores after the pending tokens
        token = next(iter(row.node))  # forced, but a choice follows: feed it with the others
        row.out.append(token)
        row.pending.append(token)
        row.node = row.node[token]


def decode_answers(decoder: Decoder, builder: PromptBuilder, ids: list[list[int]], prompt_tail: str, opts,
                   progress: Progress) -> list[Answer]:
    spec = builder.spec
    constrained = opts.decision == "constrained"
    grammars = GrammarBuilder(decoder, spec, prompt_tail) if constrained else None
    items = builder.items

    def limit(item: Item) -> int:
        if opts.max_new_tokens:
            return opts.max_new_tokens
        if spec.has_token_task or spec.multi:
            return 64 + 16 * (item.n_words or 0)
        return 48

    answers: list[Answer | None] = [None] * len(items)
    tok = decoder.chat.tokenizer
    for use_prefix, batch in _batches(decoder, ids, opts.batch_size):
        rows = greedy(decoder, [ids[i] for i in batch],
                      [grammars.grammar(items[i].n_words) if grammars else None for i in batch],
                      [limit(items[i]) for i in batch], use_prefix)
        for i, row in zip(batch, rows):
            out = row.out
            body = out[:-1] if out and out[-1] in decoder.chat.stop_ids else out
            raw = tok.decode(body, skip_special_tokens=False)
            truncated = not row.stopped
            parsed = parse_answer(raw, spec, items[i].n_words, truncated=truncated)
            answers[i] = Answer(raw=raw, parsed=parsed, generated=len(out))
        progress.add(len(batch))
    return answers  # type: ignore[return-value]


def _batches(decoder: Decoder, ids: list[list[int]], batch_size: int) -> list[tuple[bool, list[int]]]:
    """Batches of example indices, similar lengths together; rows that start with the shared prefix apart from
    the (rare) rows that do not."""
    out = []
    for use_prefix in (True, False):
        members = [i for i in range(len(ids)) if bool(decoder.prefix_length(ids[i])) == use_prefix]
        members.sort(key=lambda i: len(ids[i]))
        out += [(use_prefix, members[s:s + batch_size]) for s in range(0, len(members), batch_size)]
    return out


# ------------------------------------------------------------------------------------------------- scoring


@dataclass
class _Tree:
    """The answers of one example as a prefix tree hanging below the context's first `root` tokens."""

    root: int  # context tokens before the tree (the answers' joint tokenisations agree up to here)
    chain: list[int]  # context tokens fed in this pass (after the prefix), the last one gives the root's scores
    nodes: list[int]  # token of each fed node
    parents: list[int]  # parent node index (-1: the root, i.e. the chain's last token)
    depths: list[int]  # 1 for the root's children
    # per option: [(distribution index, token)] for its scored tokens; distribution 0 is the root, i + 1 node i
    paths: list[list[tuple[int, int]]]


def _tree(decoder: Decoder, ctx_text: str, ctx_ids: list[int], options: tuple[str, ...], end: bool,
          P: int) -> _Tree:
    """`end`: each option ends with the stop token (scored like the option's own tokens)."""
    splits = [decoder.joint_split(ctx_text, ctx_ids, option) for option in options]
    stop = [decoder.chat.stop_id] if end else []
    root = min(k for k, _ in splits)
    if root <= P:
        raise ValueError("the answers re-tokenise into the shared prefix")
    nodes: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    index: dict[tuple[int, int], int] = {}
    paths = []
    for k, tokens in splits:
        sequence = ctx_ids[root:k] + list(tokens) + stop
        scored_from = k - root
        parent = -1
        path = []
        for depth, token in enumerate(sequence, start=1):
            if depth - 1 >= scored_from:
                path.append((parent + 1, token))
            if depth == len(sequence):
                break  # the last token is only scored, never fed (nothing hangs below it)
            key = (parent, token)
            if key not in index:
                index[key] = len(nodes)
                nodes.append(token)
                parents.append(parent)
                depths.append(depth)
            parent = index[key]
        paths.append(path)
    return _Tree(root=root, chain=ctx_ids[P:root], nodes=nodes, parents=parents, depths=depths, paths=paths)


@torch.no_grad()
def score_batch(decoder: Decoder, trees: list[_Tree], P: int) -> list[list[tuple[float, int]]]:
    """(summed log-prob, token count) of every option of every tree, one forward pass for the batch."""
    device = decoder.device
    B = len(trees)
    C = max(len(t.chain) for t in trees)
    T = max(len(t.nodes) for t in trees)
    Q = C + T
    input_ids = torch.full((B, Q), decoder.pad_id, dtype=torch.long)
    positions = torch.zeros((B, Q), dtype=torch.long)
    allowed = torch.zeros((B, Q, Q), dtype=torch.bool)  # over the rows' own tokens (the prefix is always seen)
    keep = torch.zeros((B, Q), dtype=torch.bool)
    real = torch.zeros((B, Q), dtype=torch.bool)
    allowed |= torch.eye(Q, dtype=torch.bool)[None]  # every query sees itself (pads too)
    for b, tree in enumerate(trees):
        c = len(tree.chain)
        start = C - c
        real[b, start:C + len(tree.nodes)] = True
        if c:
            input_ids[b, start:C] = torch.tensor(tree.chain)
            positions[b, start:C] = torch.arange(P, P + c)
            allowed[b, start:C, start:C] = torch.ones((c, c), dtype=torch.bool).tril()
        keep[b, C - 1] = True
        n = len(tree.nodes)
        if n:
            input_ids[b, C:C + n] = torch.tensor(tree.nodes)
            positions[b, C:C + n] = torch.tensor(tree.depths) + (tree.root - 1)
            allowed[b, C:C + n, start:C] = True
            for j, parent in enumerate(tree.parents):  # ancestors: the parent's row, then itself
                if parent >= 0:
                    allowed[b, C + j, C:C + n] = allowed[b, C + parent, C:C + n]
                allowed[b, C + j, C + j] = True
            keep[b, C:C + n] = True
    cache = decoder.new_cache(B, P > 0)
    logits = decoder.forward(cache, input_ids.to(device), positions.to(device), allowed.to(device),
                             keep.to(device), P > 0, real.to(device))
    rows, tokens = [], []
    offset = 0
    for tree in trees:
        rows += [offset + d for path in tree.paths for d, _ in path]
        tokens += [t for path in tree.paths for _, t in path]
        offset += 1 + len(tree.nodes)
    values = token_log_probs(logits, rows, tokens)
    out, at = [], 0
    for tree in trees:
        scores = []
        for path in tree.paths:
            scores.append((float(sum(values[at:at + len(path)])), len(path)))
            at += len(path)
        out.append(scores)
    return out


@dataclass
class _Search:
    """One example's best-first search over its answer tree (see `search_batch`)."""

    tree: _Tree
    offsets: list[float]  # subtracted from each option's sum (calibrated: its content-free sum; else 0)
    fed: dict[int, int] = field(default_factory=dict)  # node -> its slot among the row's own cached tokens
    known: list[float] = field(default_factory=list)  # per option: sum of its log-probs computed so far
    missing: list[int] = field(default_factory=list)  # per option: how many of its log-probs are still unknown
    next_entry: list[int] = field(default_factory=list)  # per option: index of its first unknown log-prob
    done: bool = False
    scored_at: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # distribution -> [(option, token)]

    def __post_init__(self) -> None:
        for p, path in enumerate(self.tree.paths):
            for dist, token in path:
                self.scored_at.setdefault(dist, []).append((p, token))


def _option_value(search: _Search, p: int, norm: str) -> float:
    """Option p's normalised score if complete, else an upper bound on it (unknown log-probs are <= 0)."""
    known, count = search.known[p], len(search.tree.paths[p])
    if norm == "mean":
        return known / max(count, 1)  # known <= the full sum <= 0: dividing by the full count is an upper bound
    return known - search.offsets[p]


@torch.no_grad()
def search_batch(decoder: Decoder, trees: list[_Tree], P: int, offsets: list[list[float]], norm: str,
                 width: int = 8) -> tuple[list[int], int]:
    """The best option of each tree, EXACTLY the argmax of `score_batch`'s normalised scores, without scoring every
    option: a best-first branch and bound. Log-probabilities are <= 0, so an option's sum of the log-probs known
    so far bounds its full sum from above; a subtree whose best bound is below the best complete option's score
    can never win and is never fed. Each round feeds, for every row, the `width` unfed nodes with the highest
    bounds (each attending to the shared prefix, its row's chain and its own ancestors, as in `score_batch`).
    Returns (the chosen option per tree, the number of tree nodes fed)."""
    device = decoder.device
    B = len(trees)
    searches = [_Search(tree=t, offsets=o, known=[0.0] * len(t.paths), missing=[len(p) for p in t.paths],
                        next_entry=[0] * len(t.paths)) for t, o in zip(trees, offsets)]
    # Round 0: the chains (left-padded); the last position gives the root's distribution.
    C = max(len(t.chain) for t in trees)
    input_ids = torch.full((B, C), decoder.pad_id, dtype=torch.long)
    positions = torch.zeros((B, C), dtype=torch.long)
    valid = torch.zeros((B, C), dtype=torch.bool)
    for b, tree in enumerate(trees):
        c = len(tree.chain)
        input_ids[b, C - c:] = torch.tensor(tree.chain, dtype=torch.long)
        positions[b, C - c:] = torch.arange(P, P + c)
        valid[b, C - c:] = True
    allowed = torch.ones((C, C), dtype=torch.bool).tril()[None] & valid[:, None, :]
    allowed |= torch.eye(C, dtype=torch.bool)[None]
    keep = torch.zeros((B, C), dtype=torch.bool)
    keep[:, -1] = True
    cache = decoder.new_cache(B, P > 0)
    logits = decoder.forward(cache, input_ids.to(device), positions.to(device), allowed.to(device),
                             keep.to(device), P > 0, valid.to(device))
    _learn(searches, [(b, 0) for b in range(B)], logits)
    ancestors = [valid[b].clone() for b in range(B)]  # per row: its chain's valid slots (the base of every node)
    width_so_far = C
    fed_total = 0
    while True:
        chosen: list[list[int]] = []
        for search in searches:
            chosen.append(_frontier(search, norm, width) if not search.done else [])
        if not any(chosen):
            break
        L = max(len(c) for c in chosen)
        tokens = torch.full((B, L), decoder.pad_id, dtype=torch.long)
        step_positions = torch.zeros((B, L), dtype=torch.long)
        allowed = torch.zeros((B, L, width_so_far + L), dtype=torch.bool)
        allowed[:, :, width_so_far:] = torch.eye(L, dtype=torch.bool)[None]  # each new token sees itself
        keep = torch.zeros((B, L), dtype=torch.bool)
        learned = []
        for b, (search, nodes) in enumerate(zip(searches, chosen)):
            tree = search.tree
            for j, node in enumerate(nodes):
                tokens[b, j] = tree.nodes[node]
                step_positions[b, j] = tree.depths[node] + tree.root - 1
                seen = ancestors[b].clone()
                parent = tree.parents[node]
                while parent >= 0:
                    seen[search.fed[parent]] = True
                    parent = tree.parents[parent]
                allowed[b, j, :width_so_far] = seen
                keep[b, j] = True
                search.fed[node] = width_so_far + j
                learned.append((b, node + 1))
            fed_total += len(nodes)
        logits = decoder.forward(cache, tokens.to(device), step_positions.to(device), allowed.to(device),
                                 keep.to(device), P > 0, keep.to(device))  # every fed node is kept, pads are not
        width_so_far += L
        for b in range(B):
            ancestors[b] = torch.cat([ancestors[b], torch.zeros(L, dtype=torch.bool)])
        _learn(searches, learned, logits)
    best = []
    for search in searches:
        values = [_option_value(search, p, norm) if search.missing[p] == 0 else float("-inf")
                  for p in range(len(search.tree.paths))]
        best.append(max(range(len(values)), key=values.__getitem__))
    return best, fed_total


def _learn(searches: list[_Search], distributions: list[tuple[int, int]], logits: torch.Tensor) -> None:
    """Add the log-probs that the new distributions (row, distribution index; logits row by row in that order)
    give to every option's tokens scored there."""
    rows, tokens, targets = [], [], []
    for row, (b, dist) in enumerate(distributions):
        for p, token in searches[b].scored_at.get(dist, ()):
            rows.append(row)
            tokens.append(token)
            targets.append((b, p))
    values = token_log_probs(logits, rows, tokens) if rows else []
    for (b, p), value in zip(targets, values):
        search = searches[b]
        search.known[p] += value
        search.missing[p] -= 1
        search.next_entry[p] += 1


def _frontier(search: _Search, norm: str, width: int) -> list[int]:
    """The unfed nodes worth feeding, highest bound first (at most `width`); marks the search done when none is:
    then no incomplete option can reach the best complete one."""
    tree = search.tree
    best = max((_option_value(search, p, norm) for p in range(len(tree.paths)) if search.missing[p] == 0),
               default=float("-inf"))
    candidates: dict[int, float] = {}
    for p, path in enumerate(tree.paths):
        if search.missing[p] == 0:
            continue
        value = _option_value(search, p, norm)
        if value < best:
            continue
        node = path[search.next_entry[p]][0] - 1  # the node whose distribution scores its next token
        while tree.parents[node] >= 0 and tree.parents[node] not in search.fed:
            node = tree.parents[node]  # unscored context tokens above it: feed those first
        if value > candidates.get(node, float("-inf")):
            candidates[node] = value
    if not candidates:
        search.done = True
        return []
    return sorted(candidates, key=candidates.__getitem__, reverse=True)[:width]


def token_log_probs(logits: torch.Tensor, rows: list[int], tokens: list[int], chunk: int = 16) -> list[float]:
    """log p(tokens[i]) under the distribution of logits[rows[i]]: the normaliser (log-sum-exp over the
    vocabulary, in float32) is computed once per row and in chunks, never a [rows, vocabulary] float32 copy."""
    norms = torch.cat([torch.logsumexp(logits[s:s + chunk].float(), dim=-1) for s in range(0, logits.shape[0], chunk)])
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    picked = logits[index, torch.tensor(tokens, dtype=torch.long, device=logits.device)].float()
    return (picked - norms[index]).double().cpu().tolist()


def score_answers(decoder: Decoder, builder: PromptBuilder, texts: list[str], ids: list[list[int]], opts,
                  progress: Progress) -> tuple[list[Answer], dict[str, float]]:
    """The best answer of every example, and {"answer_tokens_fed_share": the share of the answer trees' tokens
    that the exact search had to feed}."""
    spec = builder.spec
    if spec.has_token_task:
        raise ClfbenchError("decision=score is not defined for token (slot) tasks; use constrained or generate")
    answer_groups: list[Group] = groups(constraint_parts(spec))
    chat = decoder.chat
    n = len(texts)
    contexts = list(texts)
    context_ids = [list(x) for x in ids]
    chosen = [""] * n
    calibration: dict[str, list[float]] = {}
    content_free = chat.text(builder.render(opts.content_free)) if opts.score_norm == "calibrated" else ""

    stats = {"fed": 0, "all": 0}  # tree nodes fed by the search, and in all trees

    for g, group in enumerate(answer_groups):
        last = g == len(answer_groups) - 1
        end = last and opts.score_end  # only the last group's answer is followed by the stop token
        if len(group.options) == 1:
            for i in range(n):
                chosen[i] += group.options[0]
                contexts[i] += group.options[0]
                context_ids[i] = chat.encode(contexts[i])
            continue
        for use_prefix, batch in _batches(decoder, context_ids, opts.batch_size):
            P = len(decoder.prefix_ids) if use_prefix else 0
            trees = []
            for i in batch:
                try:
                    trees.append(_tree(decoder, contexts[i], context_ids[i], group.options, end, P))
                except ValueError:
                    raise ClfbenchError("scoring: an answer merges with the shared prompt text; "
                                        "use -o reuse_prefix=false") from None
            offsets = []
            for i in batch:
                if opts.score_norm == "calibrated":
                    cf_text = content_free + chosen[i]
                    if cf_text not in calibration:
                        calibration[cf_text] = _content_free_scores(decoder, cf_text, group.options, end)
                    offsets.append(calibration[cf_text])
                else:
                    offsets.append([0.0] * len(group.options))
            best, fed = search_batch(decoder, trees, P, offsets, opts.score_norm)
            stats["fed"] += fed
            stats["all"] += sum(len(t.nodes) for t in trees)
            for i, b in zip(batch, best):
                chosen[i] += group.options[b]
                contexts[i] += group.options[b]
            if last:
                progress.add(len(batch))
        if not last:
            for i in range(n):
                context_ids[i] = chat.encode(contexts[i])
    if stats["all"]:
        print(f"{LOG} the exact search fed {stats['fed']} of the answer trees' {stats['all']} tokens "
              f"({stats['fed'] / stats['all']:.0%})", flush=True)
    answers = []
    for i, item in enumerate(builder.items):
        parsed = parse_answer(chosen[i], spec, item.n_words)
        answers.append(Answer(raw=chosen[i], parsed=parsed, generated=0))
    return answers, ({"answer_tokens_fed_share": stats["fed"] / stats["all"]} if stats["all"] else {})


def _content_free_scores(decoder: Decoder, text: str, options: tuple[str, ...], end: bool) -> list[float]:
    ids = decoder.chat.encode(text)
    P = len(decoder.prefix_ids) if decoder.prefix_length(ids) else 0
    tree = _tree(decoder, text, ids, options, end, P)
    return [s for s, _ in score_batch(decoder, [tree], P)[0]]
