"""Label scoring: the answer with the highest log-likelihood given the prompt (`score_answers`), found exactly by a
best-first branch and bound over the answers' prefix tree (`search_batch`). `score_batch` scores every answer in
one pass: the reference the search is tested against, and what the content-free calibration uses."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from clfbench.engine.decoding.answer import LOG, Answer, Progress
from clfbench.engine.decoding.decoder import Decoder, feed_chains, prefix_batches
from clfbench.engine.prompting.chat import ChatFormat
from clfbench.engine.prompting.library import PromptBuilder
from clfbench.engine.prompting.outputs import Group, constraint_parts, groups
from clfbench.engine.prompting.parse import parse_answer
from clfbench.engine.types import ClfbenchError


@dataclass
class AnswerTree:
    """The answers of one example as a prefix tree hanging below the context's first `root` tokens."""

    root: int  # context tokens before the tree (the answers' joint tokenisations agree up to here)
    chain: list[int]  # context tokens fed in this pass (after the prefix), the last one gives the root's scores
    nodes: list[int]  # token of each fed node
    parents: list[int]  # parent node index (-1: the root, i.e. the chain's last token)
    depths: list[int]  # 1 for the root's children
    # per option: [(distribution index, token)] for its scored tokens; distribution 0 is the root, i + 1 node i
    paths: list[list[tuple[int, int]]]


def answer_tree(decoder: Decoder, ctx_text: str, ctx_ids: list[int], options: tuple[str, ...], end: bool,
          P: int) -> AnswerTree:
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
    return AnswerTree(root=root, chain=ctx_ids[P:root], nodes=nodes, parents=parents, depths=depths, paths=paths)


@torch.no_grad()
def score_batch(decoder: Decoder, trees: list[AnswerTree], P: int) -> list[list[tuple[float, int]]]:
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
class AnswerSearch:
    """One example's best-first search over its answer tree (see `search_batch`)."""

    tree: AnswerTree
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


def _option_value(search: AnswerSearch, p: int, norm: str) -> float:
    """Option p's normalised score if complete, else an upper bound on it (unknown log-probs are <= 0)."""
    known, count = search.known[p], len(search.tree.paths[p])
    if norm == "mean":
        return known / max(count, 1)  # known <= the full sum <= 0: dividing by the full count is an upper bound
    return known - search.offsets[p]


@torch.no_grad()
def search_batch(decoder: Decoder, trees: list[AnswerTree], P: int, offsets: list[list[float]], norm: str,
                 width: int = 8) -> tuple[list[int], int]:
    """The best option of each tree, EXACTLY the argmax of `score_batch`'s normalised scores, without scoring every
    option: a best-first branch and bound. Log-probabilities are <= 0, so an option's sum of the log-probs known
    so far bounds its full sum from above; a subtree whose best bound is below the best complete option's score
    can never win and is never fed. Each round feeds, for every row, the `width` unfed nodes with the highest
    bounds (each attending to the shared prefix, its row's chain and its own ancestors, as in `score_batch`).
    Returns (the chosen option per tree, the number of tree nodes fed)."""
    searches = [AnswerSearch(tree=t, offsets=o, known=[0.0] * len(t.paths), missing=[len(p) for p in t.paths],
                        next_entry=[0] * len(t.paths)) for t, o in zip(trees, offsets)]
    # Round 0: the chains (left-padded); the last position gives the root's distribution.
    cache, logits, valid = feed_chains(decoder, [t.chain for t in trees], P, P > 0)
    _learn(searches, [(b, 0) for b in range(len(trees))], logits)
    ancestors = [valid[b].clone() for b in range(len(trees))]  # per row: its chain's valid slots (every node's base)
    fed_total = 0
    while True:
        chosen = [frontier(search, norm, width) if not search.done else [] for search in searches]
        if not any(chosen):
            break
        fed_total += _feed_round(decoder, cache, searches, chosen, ancestors, P > 0)
    return [best_option(search, norm) for search in searches], fed_total


def _feed_round(decoder: Decoder, cache, searches: list[AnswerSearch], chosen: list[list[int]],
                ancestors: list[torch.Tensor], with_prefix: bool) -> int:
    """Feed each row's chosen nodes (right-padded), each attending to its row's chain and its own fed ancestors,
    and learn the log-probs their distributions give; `ancestors` grows by the round's slots. Returns how many
    nodes were fed."""
    device = decoder.device
    B, L = len(searches), max(len(c) for c in chosen)
    width_so_far = ancestors[0].shape[0]  # the rows' cached slots so far: chains, then every earlier round
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
            allowed[b, j, :width_so_far] = _seen_by(search, node, ancestors[b])
            keep[b, j] = True
            search.fed[node] = width_so_far + j
            learned.append((b, node + 1))
    logits = decoder.forward(cache, tokens.to(device), step_positions.to(device), allowed.to(device),
                             keep.to(device), with_prefix, keep.to(device))  # every fed node is kept, pads are not
    for b in range(B):
        ancestors[b] = torch.cat([ancestors[b], torch.zeros(L, dtype=torch.bool)])
    _learn(searches, learned, logits)
    return sum(len(nodes) for nodes in chosen)


def _seen_by(search: AnswerSearch, node: int, chain_slots: torch.Tensor) -> torch.Tensor:
    """The cached slots a newly fed node attends to: its row's chain, and the slots of its fed ancestors."""
    seen = chain_slots.clone()
    parent = search.tree.parents[node]
    while parent >= 0:
        seen[search.fed[parent]] = True
        parent = search.tree.parents[parent]
    return seen


def best_option(search: AnswerSearch, norm: str) -> int:
    """The complete option with the highest normalised score (the search ends with the best one complete)."""
    values = [_option_value(search, p, norm) if search.missing[p] == 0 else float("-inf")
              for p in range(len(search.tree.paths))]
    return max(range(len(values)), key=values.__getitem__)


def _learn(searches: list[AnswerSearch], distributions: list[tuple[int, int]], logits: torch.Tensor) -> None:
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


def frontier(search: AnswerSearch, norm: str, width: int) -> list[int]:
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


@dataclass
class _Chosen:
    """Every example's answer so far, and its context: the prompt followed by that answer, as text and tokens."""

    answers: list[str]
    contexts: list[str]
    context_ids: list[list[int]]

    def append(self, i: int, text: str) -> None:
        self.answers[i] += text
        self.contexts[i] += text

    def retokenise(self, chat: ChatFormat) -> None:
        """Tokenise the contexts again (an answer may merge with the prompt's last token)."""
        self.context_ids = [chat.encode(context) for context in self.contexts]


def score_answers(decoder: Decoder, builder: PromptBuilder, texts: list[str], ids: list[list[int]], opts,
                  progress: Progress) -> tuple[list[Answer], dict[str, float]]:
    """The best answer of every example, and {"answer_tokens_fed_share": the share of the answer trees' tokens
    that the exact search had to feed}. The answer's groups are chosen in turn, each after the ones before it."""
    spec = builder.spec
    if spec.has_token_task:
        raise ClfbenchError("decision=score is not defined for token (slot) tasks; use constrained or generate")
    answer_groups: list[Group] = groups(constraint_parts(spec))
    chosen = _Chosen(answers=[""] * len(texts), contexts=list(texts), context_ids=[list(x) for x in ids])
    offsets = _offsets_function(decoder, builder, opts)
    stats = {"fed": 0, "all": 0}  # tree nodes fed by the search, and in all trees
    for g, group in enumerate(answer_groups):
        last = g == len(answer_groups) - 1
        if len(group.options) == 1:  # nothing to choose
            for i in range(len(texts)):
                chosen.append(i, group.options[0])
            chosen.retokenise(decoder.chat)
            continue
        # only the last group's answer is followed by the stop token
        _choose_group(decoder, chosen, group.options, last and opts.score_end, opts, offsets, stats,
                      progress if last else None)
        if not last:
            chosen.retokenise(decoder.chat)
    if stats["all"]:
        print(f"{LOG} the exact search fed {stats['fed']} of the answer trees' {stats['all']} tokens "
              f"({stats['fed'] / stats['all']:.0%})", flush=True)
    answers = [Answer(raw=raw, parsed=parse_answer(raw, spec, item.n_words), generated=0)
               for raw, item in zip(chosen.answers, builder.items)]
    return answers, ({"answer_tokens_fed_share": stats["fed"] / stats["all"]} if stats["all"] else {})


def _choose_group(decoder: Decoder, chosen: _Chosen, options: tuple[str, ...], end: bool, opts, offsets,
                  stats: dict[str, int], progress: Progress | None) -> None:
    """Append to every example its best option of this group, found by `search_batch` batch by batch; counts the
    tree nodes fed and in all trees into `stats`, and the examples done into `progress` (given for the last
    group)."""
    for use_prefix, batch in prefix_batches(decoder, chosen.context_ids, opts.batch_size):
        P = len(decoder.prefix_ids) if use_prefix else 0
        trees = [_example_tree(decoder, chosen.contexts[i], chosen.context_ids[i], options, end, P) for i in batch]
        best, fed = search_batch(decoder, trees, P, [offsets(chosen.answers[i], options, end) for i in batch],
                                 opts.score_norm)
        stats["fed"] += fed
        stats["all"] += sum(len(t.nodes) for t in trees)
        for i, b in zip(batch, best):
            chosen.append(i, options[b])
        if progress is not None:
            progress.add(len(batch))


def _example_tree(decoder: Decoder, ctx_text: str, ctx_ids: list[int], options: tuple[str, ...], end: bool,
                  P: int) -> AnswerTree:
    try:
        return answer_tree(decoder, ctx_text, ctx_ids, options, end, P)
    except ValueError:
        raise ClfbenchError("scoring: an answer merges with the shared prompt text; "
                            "use -o reuse_prefix=false") from None


def _offsets_function(decoder: Decoder, builder: PromptBuilder, opts):
    """offsets(answer so far, options, end) -> what each option's summed log-prob is reduced by: its content-free
    sum for `calibrated` (computed once per distinct answer so far), else 0."""
    if opts.score_norm != "calibrated":
        return lambda answer, options, end: [0.0] * len(options)
    content_free = decoder.chat.text(builder.render(opts.content_free))
    calibration: dict[str, list[float]] = {}

    def offsets(answer: str, options: tuple[str, ...], end: bool) -> list[float]:
        text = content_free + answer
        if text not in calibration:
            calibration[text] = _content_free_scores(decoder, text, options, end)
        return calibration[text]

    return offsets


def _content_free_scores(decoder: Decoder, text: str, options: tuple[str, ...], end: bool) -> list[float]:
    ids = decoder.chat.encode(text)
    P = len(decoder.prefix_ids) if decoder.prefix_length(ids) else 0
    tree = answer_tree(decoder, text, ids, options, end, P)
    return [s for s, _ in score_batch(decoder, [tree], P)[0]]
