"""Greedy decoding, free or constrained to the answer's grammar (a prefix tree of label tokens per answer group)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from clfbench.engine.decoding.answer import Answer, Progress
from clfbench.engine.decoding.decoder import Decoder, feed_chains, prefix_batches
from clfbench.engine.prompting.library import PromptBuilder
from clfbench.engine.prompting.outputs import OutputSpec, answer_token_limit, constraint_parts, groups
from clfbench.engine.prompting.parse import parse_answer
from clfbench.engine.types import ClfbenchError

Trie = dict  # token id -> Trie; a leaf (an option complete) is {}


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
    stop_ids = set(decoder.chat.stop_ids)
    P = len(decoder.prefix_ids) if use_prefix else 0
    chains = [ids[P:] for ids in ids_list]
    cache, scores, valid = feed_chains(decoder, chains, P, use_prefix)
    next_pos = torch.tensor([P + len(c) for c in chains], dtype=torch.long)
    rows = [_Row(index=i, grammar=g, limit=lim, node=g.tries[0] if g is not None else None)
            for i, (g, lim) in enumerate(zip(grammars, limits))]
    active = list(range(len(rows)))  # rows still in the cache, in cache order; scores[slot] belongs to active[slot]
    while True:
        for slot, b in enumerate(active):
            _advance(rows[b], _choose(rows[b], scores[slot]), stop_ids)
        still = [slot for slot, b in enumerate(active) if not rows[b].done]
        if not still:
            return rows
        if len(still) != len(active):  # finished rows leave the cache
            index = torch.tensor(still, dtype=torch.long)
            cache.batch_select_indices(index.to(decoder.device))
            valid, next_pos = valid[index], next_pos[index]
            active = [active[s] for s in still]
        scores, valid, next_pos = _feed_pending(decoder, cache, [rows[b].pending for b in active], valid, next_pos,
                                                use_prefix)


def _feed_pending(decoder: Decoder, cache, pending: list[list[int]], valid: torch.Tensor, next_pos: torch.Tensor,
                  use_prefix: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step: every active row's pending tokens (its choice and the forced tokens after it), right-padded, each
    attending to its row's real cached tokens and causally to the step's. Returns (the logits after each row's
    last pending token, the rows' `valid` slots grown by this step's, the rows' next positions)."""
    device = decoder.device
    A = len(pending)
    lengths = [len(tokens) for tokens in pending]
    L = max(lengths)
    tokens = torch.full((A, L), decoder.pad_id, dtype=torch.long)
    new_valid = torch.zeros((A, L), dtype=torch.bool)
    keep = torch.zeros((A, L), dtype=torch.bool)
    for slot, (row_tokens, n) in enumerate(zip(pending, lengths)):
        tokens[slot, :n] = torch.tensor(row_tokens, dtype=torch.long)
        new_valid[slot, :n] = True
        keep[slot, n - 1] = True
    step_positions = next_pos[:, None] + torch.arange(L)[None, :]
    step_causal = torch.ones((L, L), dtype=torch.bool).tril()[None] & new_valid[:, None, :]
    step_causal |= torch.eye(L, dtype=torch.bool)[None]
    allowed = torch.cat([valid[:, None, :].expand(A, L, valid.shape[1]), step_causal], dim=2)
    scores = decoder.forward(cache, tokens.to(device), step_positions.to(device), allowed.to(device),
                             keep.to(device), use_prefix, new_valid.to(device))
    return scores, torch.cat([valid, new_valid], dim=1), next_pos + torch.tensor(lengths, dtype=torch.long)


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
    """Every example's answer by greedy decoding (constrained to the answer's grammar when `opts.decision` is
    `constrained`), parsed; `truncated` when it stopped at its token limit rather than its stop token."""
    spec = builder.spec
    grammars = GrammarBuilder(decoder, spec, prompt_tail) if opts.decision == "constrained" else None
    items = builder.items
    answers: list[Answer | None] = [None] * len(items)
    tok = decoder.chat.tokenizer
    for use_prefix, batch in prefix_batches(decoder, ids, opts.batch_size):
        rows = greedy(decoder, [ids[i] for i in batch],
                      [grammars.grammar(items[i].n_words) if grammars else None for i in batch],
                      [opts.max_new_tokens or answer_token_limit(spec, items[i].n_words) for i in batch], use_prefix)
        for i, row in zip(batch, rows):
            out = row.out
            body = out[:-1] if out and out[-1] in decoder.chat.stop_ids else out
            raw = tok.decode(body, skip_special_tokens=False)
            parsed = parse_answer(raw, spec, items[i].n_words, truncated=not row.stopped)
            answers[i] = Answer(raw=raw, parsed=parsed, generated=len(out))
        progress.add(len(batch))
    return answers  # type: ignore[return-value]
