"""Attention for a batch whose rows all continue one shared prompt prefix, with that prefix's keys held ONCE.

Every prompt of a run starts with the same text (instruction, label list, few-shot examples). Its KV cache is
computed once (`PrefixKV.compute`), and is not copied into each row of a batch: the rows' cache holds only their
own tokens. Each attention layer then works in two parts and merges them exactly (the log-sum-exp merge of
cascade attention, as in Hydragen, Juravsky et al. 2024):

- every query of the batch against the prefix keys: one matrix product per KV head, the batch folded into the
  rows (no mask: every row may see the whole prefix). Large products are what a CPU (or GPU) is fast at; the
  per-row attention of a plain KV cache reads the same prefix keys once per row with small products instead;
- each row's queries against its own keys, under that row's mask (padding, causality, or a tree of answers).

`softmax([a, b]) @ [Va; Vb]` equals `(ea @ Va + eb @ Vb) / (sum ea + sum eb)` with `ea = exp(a - m)`,
`eb = exp(b - m)` for any shared shift `m`: the two parts are computed with their own maxima and rescaled.

Padding is left out of everything but the second part (`PackedCall`): the batch's real tokens go through the
model packed into ONE row, so the linear layers and the prefix part never compute a pad. Only the small per-row
part puts them back into the padded [rows, width] layout that the rows' masks and cache (`RowCache`) use. A batch
of answer trees is far from rectangular (rows finish their search early, frontiers differ in width): in the
search rounds of 200 MASSIVE utterances at batch 32, 32% of the padded layout's slots were pads.

The model is switched to this attention (`enable`) under its own name in transformers' attention registry. A call
without `shared_prefix=` runs transformers' own SDPA attention, so a model switched to it behaves as before
everywhere else (training included).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clfbench.engine.decoding.model import returned_cache

NAME = "clfbench_shared_prefix"
_registered = False


class PrefixKV:
    """The shared prefix's keys and values per layer, [kv_heads, P, head_dim] each (positions 0..P-1)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers = layers
        self.length = layers[0][0].shape[-2] if layers else 0

    @classmethod
    @torch.no_grad()
    def compute(cls, model, ids: list[int], device: torch.device) -> "PrefixKV":
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
        return cls([(layer.keys[0], layer.values[0]) for layer in returned_cache(out).layers])

    def expanded(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix as a plain per-row KV cache (no copy until the cache grows), for models without `enable`."""
        return [(k[None].expand(batch, -1, -1, -1), v[None].expand(batch, -1, -1, -1)) for k, v in self.layers]


class RowCache:
    """The rows' own keys and values per layer, [rows, kv_heads, W, head_dim] in the padded row layout: everything
    the rows fed after the shared prefix, pads included (their masks hide them)."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.layers:
            old_keys, old_values = self.layers[layer]
            keys, values = torch.cat([old_keys, keys], dim=2), torch.cat([old_values, values], dim=2)
        self.layers[layer] = (keys, values)
        return keys, values

    def batch_select_indices(self, index: torch.Tensor) -> None:
        """Keep only these rows (the name and meaning of transformers' cache method). With the model across GPUs
        each layer's keys sit on its layer's GPU: the index goes to each."""
        self.layers = {layer: (k[index.to(k.device)], v[index.to(v.device)]) for layer, (k, v) in self.layers.items()}


@dataclass
class PackedCall:
    """One forward pass whose real tokens are packed into one row. `real` [rows, width] marks the slots of the
    padded row layout that hold them (packed in row-major order); `bias` [rows, 1, width, W] is the additive mask
    of each slot over its row's own keys (the cache's, then this call's), made once per call, not per layer."""

    cache: RowCache
    real: torch.Tensor
    bias: torch.Tensor
    slots: torch.Tensor  # flat indices of the real slots in [rows * width]
    _grouped: dict | None = None  # device -> grouped bias (a model across GPUs needs one on each)
    _slots: dict | None = None  # device -> slots

    @classmethod
    def make(cls, cache: RowCache, real: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype) -> "PackedCall":
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
        return cls(cache=cache, real=real, bias=bias[:, None], slots=real.reshape(-1).nonzero()[:, 0])

    def grouped_bias(self, group: int, device: torch.device) -> torch.Tensor:
        """The mask for queries folded by KV head, [rows, 1, group * width, W]: the `group` query heads that share
        a KV head attend as one block of rows (half the time of one small product per query head on CPU). Made
        by the first layer on each device, reused by the others (every layer of a model has the same group)."""
        self._grouped = self._grouped or {}
        if device not in self._grouped:
            self._grouped[device] = self.bias.to(device).repeat(1, 1, group, 1)
        return self._grouped[device]

    def slots_on(self, device: torch.device) -> torch.Tensor:
        """`slots` on `device` (the layer's, when the model is placed across GPUs), moved once per device."""
        self._slots = self._slots or {}
        if device not in self._slots:
            self._slots[device] = self.slots.to(device)
        return self._slots[device]


def enable(model) -> bool:
    """Switch `model` to the split attention; False (model unchanged) when its architecture cannot switch."""
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not _registered:
        AttentionInterface.register(NAME, attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # masks built by transformers: the same as for SDPA
        _registered = True
    current = getattr(model.config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":  # eager or flash kernels: leave the model as it is
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError, AttributeError):
        return False
    return getattr(model.config, "_attn_implementation", None) == NAME


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shared_prefix=None,
              packed=None, **kwargs):
    """transformers' attention signature, returning ([B, Q, H, D], None). Without `shared_prefix`: SDPA. With it
    (and `packed`), the batch is one packed row: query [1, H, N, D], key/value this call's [1, KVH, N, D]; the
    rows' masks and cache are in `packed` (`PackedCall`), `attention_mask` is unused."""
    if shared_prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return _packed_attention(module, query, key, value, scaling, shared_prefix, packed)


def _packed_attention(module, query, key, value, scaling, shared_prefix: PrefixKV, packed: PackedCall):
    prefix_keys, prefix_values = shared_prefix.layers[module.layer_idx]
    _, H, N, D = query.shape
    KVH = key.shape[1]
    group = H // KVH
    scale = scaling if scaling is not None else D ** -0.5
    part = _part_cpu if query.device.type == "cpu" else _part_math
    rows, width = packed.real.shape
    slots = packed.slots_on(query.device)

    def to_rows(x: torch.Tensor) -> torch.Tensor:  # [1, heads, N, D] -> [rows, heads, width, D], zeros at pads
        heads = x.shape[1]
        out = x.new_zeros(heads, rows * width, D)
        out[:, slots] = x[0]
        return out.view(heads, rows, width, D).transpose(0, 1)

    # 1. The prefix: query heads h = kv * group + g share KV head kv, so the group and the packed tokens fold into
    #    the rows of one product per KV head.
    out_prefix, lse_prefix = part(query.reshape(1, KVH, group * N, D), prefix_keys[None], prefix_values[None], None,
                                  scale)
    out_prefix, lse_prefix = out_prefix.reshape(H, N, D), lse_prefix.reshape(H, N)
    # 2. The rows' own tokens, in the padded row layout, under their masks; then back to the packed order.
    keys, values = packed.cache.append(module.layer_idx, to_rows(key), to_rows(value))
    folded = to_rows(query).reshape(rows, KVH, group * width, D)
    out_own, lse_own = part(folded, keys, values, packed.grouped_bias(group, query.device), scale)
    out_own = out_own.reshape(rows, H, width, D).transpose(0, 1).reshape(H, rows * width, D)[:, slots]
    lse_own = lse_own.reshape(rows, H, width).transpose(0, 1).reshape(H, rows * width)[:, slots]
    # 3. The exact merge: each part's softmax was normalised by its own sum, exp(lse); reweight by its share.
    total = torch.logaddexp(lse_prefix, lse_own)
    out = out_prefix.float() * torch.exp(lse_prefix - total)[..., None] \
        + out_own.float() * torch.exp(lse_own - total)[..., None]
    return out.to(query.dtype).transpose(0, 1)[None].contiguous(), None


def _part_cpu(query, key, value, bias, scale):
    """(softmax(q k^T + bias) v, log-sum-exp of the scores) from PyTorch's fused CPU kernel; `bias` is additive
    (-inf: masked) in the query's dtype, or None."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                          attn_mask=bias, scale=scale)
    return out, lse


def _part_math(query, key, value, bias, scale):
    """The same in plain operations, for any device."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]).to(value.dtype), value)
    return out, lse
