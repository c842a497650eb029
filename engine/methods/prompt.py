"""Prompting a local causal LM: `run(ctx) -> MethodOutput`, three ways to decide (option `decision`).

- ``generate``: greedy decoding of each answer (batched, the per-example part left-padded), stopped by the
  model's stop tokens or `max_new_tokens`, then parsed by `engine.prompting.parse`, which records why an answer
  failed (``empty``, ``not_in_label_set``, ``invalid_json``, ``missing_field``, ``wrong_length``, ``truncated``).
- ``constrained``: the same greedy decoding, but each step may only pick a token that keeps the answer inside
  its grammar: a prefix tree over the label token sequences (labels tokenised after the prompt, as they appear),
  then the stop token; for slots one tag per word; for a multi-task prompt a JSON object with one enum per task.
  Every answer parses, by construction.
- ``score``: the log-likelihood of every answer given the prompt. Prompt and answer are tokenised TOGETHER and
  split afterwards (so a leading-space or merged token is the one the model would see), the answer ends with the
  stop token (so "comp" cannot win over "comp.graphics" by stopping early), and all answers of one example are
  scored in one forward pass over their prefix tree (a tree attention mask, no copy of the prompt per label).
  `score_norm`: ``sum``, ``mean`` (per token) or ``calibrated`` (minus the answer's sum for the content-free
  document "N/A", Zhao et al. 2021). Token tasks have no closed answer list: refused.

What every example shares is computed once: the prompt text before the document (system prompt, instruction,
label list, few-shot examples) is run through the model once, and its KV cache is expanded to each batch
(`reuse_prefix`, default on). Rows of a batch sit behind that prefix, their own part left-padded, with explicit
position ids and an explicit attention mask.

Runs on rank 0 only (a run with several processes leaves the other ranks idle: they return None at once).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.prompting.chat import ChatFormat
from engine.prompting.library import Item, PromptBuilder, load_prompt_set
from engine.prompting.outputs import Group, OutputSpec, constraint_parts, groups
from engine.prompting.parse import Parsed, parse_answer
from engine.types import ClfbenchError, MethodOutput, Prediction, RunContext

LOG = "prompt:"
SENTINEL = "\ue000clfbench-document\ue000"
Trie = dict  # token id -> Trie; a leaf (an option complete) is {}


# ------------------------------------------------------------------------------------------------- entry


def run(ctx: RunContext) -> MethodOutput | None:
    if not ctx.is_main:
        return None
    opts = ctx.options
    try:
        opts.check_task_kinds([t.kind for t in ctx.tasks])
    except ValueError as error:
        raise ClfbenchError(str(error)) from None
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
          + (f" ({opts.score_norm})" if opts.decision == "score" else "") + f", chat_format={opts.chat_format}, "
          f"stop tokens {chat.stop_ids}", flush=True)
    output = decide(ctx, decoder, builder, opts)
    for extra in output.extra_results.values():
        extra.update({"load_time_s": load_time, "shots": float(shots)})
    return output


def decide(ctx: RunContext, decoder: "Decoder", builder: PromptBuilder, opts) -> MethodOutput:
    """Answer every test example of `builder` with `decoder`'s model, as `opts` (PromptOptions fields: decision,
    score_norm, content_free, max_new_tokens, batch_size, reuse_prefix) says; one Prediction per example and
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

    if opts.decision == "score":
        answers = score_answers(decoder, builder, texts, ids, opts, progress)
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
    if dtype_name == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
    except (ValueError, ImportError):  # an architecture without SDPA support
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.to(device)
    model.eval()
    return tokenizer, model


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
        tok = chat.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else chat.stop_id
        self.pad_id = int(pad)
        self.sdpa = getattr(model.config, "_attn_implementation", "eager") == "sdpa"
        self.prefix_ids: list[int] = []
        self.prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
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
        self.prefix_ids, self.prefix_kv = [], None
        ids = self.chat.encode(text)[:-1] if text else []
        if len(ids) < 2:
            return
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        self.prefix_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.prefix_ids = ids

    def prefix_length(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the shared cache covers (0 when they do not start with it)."""
        n = len(self.prefix_ids)
        return n if n and len(ids) > n and ids[:n] == self.prefix_ids else 0

    def new_cache(self, batch: int, with_prefix: bool):
        from transformers import DynamicCache

        if not with_prefix or self.prefix_kv is None:
            return DynamicCache(config=self.model.config)
        data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.prefix_kv]
        return DynamicCache(ddp_cache_data=data, config=self.model.config)

    # --------------------------------------------------------------------------------------- forward

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = allowed[:, None, :, :]
        if self.sdpa:
            return mask
        dtype = self.model.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)

    def forward(self, cache, input_ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (float32) at the `keep` positions, flattened row by row. `allowed[b, q, k]`: query q
        of row b may attend key k (keys = what the cache holds, then this call's tokens)."""
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=self._mask(allowed),
                         past_key_values=cache, use_cache=True, logits_to_keep=keep)
        return torch.log_softmax(out.logits.float(), dim=-1)

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
    valid = torch.zeros((B, P + C), dtype=torch.bool)  # which keys of the cache are real tokens, per row
    valid[:, :P] = True
    for b, chain in enumerate(chains):
        pad = C - len(chain)
        input_ids[b, pad:] = torch.tensor(chain, dtype=torch.long)
        positions[b, pad:] = torch.arange(P, P + len(chain))
        valid[b, P + pad:] = True
    causal = torch.ones((C, C), dtype=torch.bool).tril()
    allowed = torch.cat([valid[:, None, :P].expand(B, C, P), causal[None] & valid[:, None, P:]], dim=2)
    allowed[:, :, P:] |= torch.eye(C, dtype=torch.bool)[None]  # a pad query sees itself: no row fully masked
    keep = torch.zeros((B, C), dtype=torch.bool)
    keep[:, -1] = True
    cache = decoder.new_cache(B, use_prefix)
    scores = decoder.forward(cache, input_ids.to(device), positions.to(device), allowed.to(device), keep.to(device))
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
                                 keep.to(device))
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


def _tree(decoder: Decoder, ctx_text: str, ctx_ids: list[int], options: tuple[str, ...], last: bool,
          P: int) -> _Tree:
    splits = [decoder.joint_split(ctx_text, ctx_ids, option) for option in options]
    stop = [decoder.chat.stop_id] if last else []
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
    allowed = torch.zeros((B, Q, P + Q), dtype=torch.bool)
    keep = torch.zeros((B, Q), dtype=torch.bool)
    allowed[:, :, P:] |= torch.eye(Q, dtype=torch.bool)[None]  # every query sees itself (pads too)
    for b, tree in enumerate(trees):
        c = len(tree.chain)
        start = C - c
        if c:
            input_ids[b, start:C] = torch.tensor(tree.chain)
            positions[b, start:C] = torch.arange(P, P + c)
            allowed[b, start:C, :P] = True
            allowed[b, start:C, P + start:P + C] = torch.ones((c, c), dtype=torch.bool).tril()
        keep[b, C - 1] = True
        n = len(tree.nodes)
        if n:
            input_ids[b, C:C + n] = torch.tensor(tree.nodes)
            positions[b, C:C + n] = torch.tensor(tree.depths) + (tree.root - 1)
            allowed[b, C:C + n, :P] = True
            allowed[b, C:C + n, P + start:P + C] = True
            for j, parent in enumerate(tree.parents):  # ancestors: the parent's row, then itself
                if parent >= 0:
                    allowed[b, C + j, P + C:P + C + n] = allowed[b, C + parent, P + C:P + C + n]
                allowed[b, C + j, P + C + j] = True
            keep[b, C:C + n] = True
    cache = decoder.new_cache(B, P > 0)
    logprobs = decoder.forward(cache, input_ids.to(device), positions.to(device), allowed.to(device),
                               keep.to(device))
    out = []
    offset = 0
    for tree in trees:
        rows = torch.tensor([offset + d for path in tree.paths for d, _ in path], dtype=torch.long, device=device)
        tokens = torch.tensor([t for path in tree.paths for _, t in path], dtype=torch.long, device=device)
        values = logprobs[rows, tokens].double().cpu().tolist()
        scores, at = [], 0
        for path in tree.paths:
            scores.append((float(sum(values[at:at + len(path)])), len(path)))
            at += len(path)
        out.append(scores)
        offset += 1 + len(tree.nodes)
    return out


def score_answers(decoder: Decoder, builder: PromptBuilder, texts: list[str], ids: list[list[int]], opts,
                  progress: Progress) -> list[Answer]:
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

    def norm(raw: list[tuple[float, int]], cf: list[float] | None) -> list[float]:
        if opts.score_norm == "mean":
            return [s / max(count, 1) for s, count in raw]
        if opts.score_norm == "calibrated":
            return [s - c for (s, _), c in zip(raw, cf)]
        return [s for s, _ in raw]

    for g, group in enumerate(answer_groups):
        last = g == len(answer_groups) - 1
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
                    trees.append(_tree(decoder, contexts[i], context_ids[i], group.options, last, P))
                except ValueError:
                    raise ClfbenchError("scoring: an answer merges with the shared prompt text; "
                                        "use -o reuse_prefix=false") from None
            raw_scores = score_batch(decoder, trees, P)
            for i, raw in zip(batch, raw_scores):
                cf = None
                if opts.score_norm == "calibrated":
                    cf_text = content_free + chosen[i]
                    if cf_text not in calibration:
                        calibration[cf_text] = _content_free_scores(decoder, cf_text, group.options, last)
                    cf = calibration[cf_text]
                values = norm(raw, cf)
                best = max(range(len(values)), key=values.__getitem__)
                chosen[i] += group.options[best]
                contexts[i] += group.options[best]
            if last:
                progress.add(len(batch))
        if not last:
            for i in range(n):
                context_ids[i] = chat.encode(contexts[i])
    answers = []
    for i, item in enumerate(builder.items):
        parsed = parse_answer(chosen[i], spec, item.n_words)
        answers.append(Answer(raw=chosen[i], parsed=parsed, generated=0))
    return answers


def _content_free_scores(decoder: Decoder, text: str, options: tuple[str, ...], last: bool) -> list[float]:
    ids = decoder.chat.encode(text)
    P = len(decoder.prefix_ids) if decoder.prefix_length(ids) else 0
    tree = _tree(decoder, text, ids, options, last, P)
    return [s for s, _ in score_batch(decoder, [tree], P)[0]]
