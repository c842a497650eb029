"""The decoder: a causal LM with the run's shared prompt prefix computed once, and batched forward passes with
explicit masks and positions (`Decoder.forward`). Every decision mode (greedy, constrained, label scoring) and the
generative fine-tune's training loss go through it. Also what greedy decoding and label scoring share: the first
pass of a batch over its rows' own prompt tokens (`feed_chains`), and how examples are batched (`prefix_batches`)."""
from __future__ import annotations

import torch

from clfbench.engine.decoding import shared_prefix
from clfbench.engine.decoding.model import cache_argument
from clfbench.engine.decoding.shared_prefix import PrefixKV
from clfbench.engine.prompting.chat import ChatFormat

# Stands for the document in a rendered prompt: the text before it is what every example shares.
SENTINEL = "\ue000clfbench-document\ue000"


def prefix_token_ids(chat: ChatFormat, text: str) -> list[int]:
    """The tokens of the prompt text every example shares, without its last one (it could merge with the
    document's first characters); [] when fewer than two remain. The one rule for the prompt method's KV cache
    and the generative fine-tune's shared prefix."""
    ids = chat.encode(text)[:-1] if text else []
    return ids if len(ids) >= 2 else []


def slices_boolean_keep() -> bool:
    """Whether this transformers computes logits only where a 2-D boolean `logits_to_keep` is True (its
    modeling_utils.slice_logits_to_keep, in newer 5.x releases). Older 5.x releases index `hidden[:, keep, :]`
    and fail with "too many indices for tensor of dimension 3" (transformers 5.17, seen on a GPU box): there the
    decoder asks for every position's logits and picks the kept ones itself: the same numbers, more memory."""
    global _SLICES_BOOLEAN_KEEP
    if _SLICES_BOOLEAN_KEEP is None:
        try:
            from transformers.modeling_utils import slice_logits_to_keep
            kept = slice_logits_to_keep(torch.zeros(1, 2, 1), torch.tensor([[True, False]]))
            _SLICES_BOOLEAN_KEEP = tuple(kept.shape) == (1, 1)
        except (ImportError, IndexError, RuntimeError):
            _SLICES_BOOLEAN_KEEP = False
    return _SLICES_BOOLEAN_KEEP


_SLICES_BOOLEAN_KEEP: bool | None = None


def kept_logits(model, keep: torch.Tensor, **inputs) -> torch.Tensor:
    """The model's logits at the True positions of the 2-D boolean `keep`, flattened row by row (kept, vocab)."""
    if slices_boolean_keep():
        return model(logits_to_keep=keep, **inputs).logits
    return model(logits_to_keep=0, **inputs).logits[keep]


def common_prefix(a: list[int], b: list[int]) -> int:
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
        ids = prefix_token_ids(self.chat, text)
        if not ids:
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
            return kept_logits(self.model, keep[real][None], input_ids=input_ids[real][None],
                               position_ids=positions[real][None], attention_mask=self.unused_mask, use_cache=False,
                               shared_prefix=self.prefix, packed=call)
        extra = {}
        if with_prefix:
            B, Q, _ = allowed.shape
            allowed = torch.cat([allowed.new_ones((B, Q, self.prefix.length)), allowed], dim=2)
        return kept_logits(self.model, keep, input_ids=input_ids, position_ids=positions,
                           attention_mask=self._mask(allowed), use_cache=True, **cache_argument(self.model, cache),
                           **extra)

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
                    k = common_prefix(tail_ids, joint)
                    hit = (len(tail_ids) - k, joint[k:])
                    self._split_cache[key] = hit
                back, tokens = hit
                return len(ctx_ids) - back, list(tokens)
        joint = self.chat.encode(ctx_text + option)
        k = common_prefix(ctx_ids, joint)
        return k, joint[k:]


def feed_chains(decoder: Decoder, chains: list[list[int]], P: int, with_prefix: bool
                ) -> tuple[object, torch.Tensor, torch.Tensor]:
    """The first pass of a batch: each row's own tokens after the shared prefix (its chain, at positions P on),
    left-padded to one width. Returns (the rows' cache, the logits at each row's last position, `valid` [rows,
    width] on the host: which of the cached slots hold real tokens, what every later query of the row may see)."""
    device = decoder.device
    B, C = len(chains), max(len(c) for c in chains)
    input_ids = torch.full((B, C), decoder.pad_id, dtype=torch.long)
    positions = torch.zeros((B, C), dtype=torch.long)
    valid = torch.zeros((B, C), dtype=torch.bool)
    for b, chain in enumerate(chains):
        pad = C - len(chain)
        input_ids[b, pad:] = torch.tensor(chain, dtype=torch.long)
        positions[b, pad:] = torch.arange(P, P + len(chain))
        valid[b, pad:] = True
    allowed = torch.ones((C, C), dtype=torch.bool).tril()[None] & valid[:, None, :]
    allowed |= torch.eye(C, dtype=torch.bool)[None]  # a pad query sees itself: no row fully masked
    keep = torch.zeros((B, C), dtype=torch.bool)
    keep[:, -1] = True
    cache = decoder.new_cache(B, with_prefix)
    logits = decoder.forward(cache, input_ids.to(device), positions.to(device), allowed.to(device), keep.to(device),
                             with_prefix, valid.to(device))
    return cache, logits, valid


def prefix_batches(decoder: Decoder, ids: list[list[int]], batch_size: int) -> list[tuple[bool, list[int]]]:
    """Batches of example indices, similar lengths together; rows that start with the shared prefix apart from
    the (rare) rows that do not."""
    out = []
    for use_prefix in (True, False):
        members = [i for i in range(len(ids)) if bool(decoder.prefix_length(ids[i])) == use_prefix]
        members.sort(key=lambda i: len(ids[i]))
        out += [(use_prefix, members[s:s + batch_size]) for s in range(0, len(members), batch_size)]
    return out

