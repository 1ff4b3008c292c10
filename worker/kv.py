"""KV-cache plumbing on top of transformers' ``DynamicCache``: left-padded batches of per-request caches.

A batch's cache is a ``DynamicCache`` whose every layer holds [B, H, T, D] keys/values, plus a 2-D
attention mask [B, T] (1 = a real token, 0 = padding). Padding can sit anywhere: transformers turns the
2-D mask into the causal+padding mask itself, and we pass explicit ``position_ids``. That is all we need for
- KV reuse across slices: cut each unfinished row out of the batch cache (its real positions only), keep it,
  and stack kept rows into the next slice's batch, left-padded to the longest;
- continuous batching: concatenate a freshly prefilled group into the running batch (padding the shorter
  side on the left) and drop finished rows, trimming columns that became padding for every row.
Only full-attention caches (``DynamicLayer``) are handled; sliding-window models are not our target.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

Layers = list[tuple[torch.Tensor, torch.Tensor]]
"""Per model layer, (keys, values), each [B, H, T, D]."""


@dataclass
class RowKV:
    """One request's cached keys/values: per layer, [1, H, L, D] over its real (unpadded) tokens."""

    layers: Layers
    length: int

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def cache_layers(cache: DynamicCache) -> Layers:
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_cache(layers: Layers, config) -> DynamicCache:
    """Wrap tensors as a ``DynamicCache`` the model can extend.

    The constructor's own path (``ddp_cache_data``) concatenates onto empty tensors, i.e. copies the whole
    KV once more; for plain ``DynamicLayer``s we hand the tensors over as they are.
    """
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(layers) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return DynamicCache(ddp_cache_data=layers, config=config)
    for layer, (k, v) in zip(cache.layers, layers):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def preallocated(layers: Layers, mask: torch.Tensor, extra: int, config) -> tuple[StaticCache, torch.Tensor] | None:
    """``layers`` copied into a ``StaticCache`` with room for ``extra`` more tokens, and the mask widened with
    zeros for them (``None`` when the model's layers are not plain full-attention ones).

    A ``DynamicCache`` grows by concatenation, i.e. copies the whole KV at every decode step; a slice runs at
    most S steps, so its cache can be allocated once. Each forward then writes the next column in place (the
    layers count what they hold), and the caller marks that column real in the mask.
    """
    width = mask.shape[1]
    static = StaticCache(config=config, max_cache_len=width + extra)
    if len(static.layers) != len(layers) or any(type(layer) is not StaticLayer for layer in static.layers):
        return None
    for layer, (k, v) in zip(static.layers, layers):
        layer.lazy_initialization(k, v)
        layer.keys[:, :, :width].copy_(k)
        layer.values[:, :, :width].copy_(v)
        layer.cumulative_length.fill_(width)
    return static, torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)


def filled(layers: Layers, mask: torch.Tensor, used: int) -> tuple[Layers, torch.Tensor]:
    """The first ``used`` columns of a preallocated batch (views, no copy)."""
    return [(k[:, :, :used], v[:, :, :used]) for k, v in layers], mask[:, :used]


def pad_left(layers: Layers, mask: torch.Tensor, width: int) -> tuple[Layers, torch.Tensor]:
    """Prepend padding columns so the sequence length becomes ``width``."""
    extra = width - mask.shape[1]
    if extra <= 0:
        return layers, mask
    out = []
    for k, v in layers:
        zk = k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3])
        zv = v.new_zeros(v.shape[0], v.shape[1], extra, v.shape[3])
        out.append((torch.cat([zk, k], dim=2), torch.cat([zv, v], dim=2)))
    return out, torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1)


def concat(a: Layers, a_mask: torch.Tensor, b: Layers, b_mask: torch.Tensor) -> tuple[Layers, torch.Tensor]:
    """Stack two batches' caches along the batch dimension (left-padding the shorter one)."""
    width = max(a_mask.shape[1], b_mask.shape[1])
    a, a_mask = pad_left(a, a_mask, width)
    b, b_mask = pad_left(b, b_mask, width)
    layers = [(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(a, b)]
    return layers, torch.cat([a_mask, b_mask])


def select(layers: Layers, mask: torch.Tensor, rows: list[int]) -> tuple[Layers, torch.Tensor]:
    """Keep only ``rows``, then drop leading columns that are padding for every remaining row."""
    idx = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, idx)
    used = mask.any(dim=0).nonzero()
    start = int(used[0].item()) if used.numel() else mask.shape[1]
    out = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:]) for k, v in layers]
    return out, mask[:, start:]


def extract_row(layers: Layers, mask: torch.Tensor, row: int) -> RowKV:
    """Copy out one row's keys/values at its real positions (so a later batch can place it anywhere)."""
    pos = mask[row].nonzero().squeeze(1)
    out = [(k[row : row + 1].index_select(2, pos), v[row : row + 1].index_select(2, pos)) for k, v in layers]
    return RowKV(out, int(pos.numel()))


def stack_rows(rows: list[RowKV | None], num_layers: int) -> tuple[Layers | None, torch.Tensor]:
    """Left-padded batch of kept rows; ``None`` rows (nothing kept) become all padding.

    Returns (layers or None when no row has anything, mask [B, C]) with C the longest kept length.
    """
    width = max((r.length for r in rows if r is not None), default=0)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    if width == 0:
        return None, mask
    ref = next(r for r in rows if r is not None).layers
    mask = mask.to(ref[0][0].device)
    layers: Layers = []
    for li in range(num_layers):
        k0, v0 = ref[li]
        k = k0.new_zeros(len(rows), k0.shape[1], width, k0.shape[3])
        v = v0.new_zeros(len(rows), v0.shape[1], width, v0.shape[3])
        for b, r in enumerate(rows):
            if r is not None and r.length:
                k[b, :, width - r.length :] = r.layers[li][0][0]
                v[b, :, width - r.length :] = r.layers[li][1][0]
        layers.append((k, v))
    for b, r in enumerate(rows):
        if r is not None and r.length:
            mask[b, width - r.length :] = 1
    return layers, mask


@dataclass
class KVEntry:
    tokens: tuple[int, ...]
    """The token ids whose keys/values ``kv`` holds (a request's history minus its last, unfed token)."""
    kv: RowKV


class KVStore:
    """Per-request KV caches kept between slices, least recently used evicted beyond ``budget_bytes``."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[str, KVEntry] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def put(self, request_id: str, tokens: list[int] | tuple[int, ...], kv: RowKV) -> bool:
        """Keep ``kv`` for ``request_id``; returns False when it alone exceeds the budget (not kept)."""
        self.pop(request_id)
        size = kv.nbytes
        if size > self.budget_bytes:
            return False
        self._evict_to(self.budget_bytes - size)
        self._entries[request_id] = KVEntry(tuple(tokens), kv)
        self.nbytes += size
        return True

    def resize(self, budget_bytes: int) -> None:
        """Change the budget, evicting least recently used entries beyond it."""
        self.budget_bytes = int(budget_bytes)
        self._evict_to(self.budget_bytes)

    def _evict_to(self, limit: int) -> None:
        while self._entries and self.nbytes > limit:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.kv.nbytes
            self.evictions += 1

    def pop(self, request_id: str) -> KVEntry | None:
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self.nbytes -= entry.kv.nbytes
        return entry

    def take(self, request_id: str, token_ids: list[int]) -> KVEntry | None:
        """Remove and return the entry if it covers a proper prefix of ``token_ids`` (else drop it)."""
        entry = self.pop(request_id)
        if entry is None:
            self.misses += 1
            return None
        n = len(entry.tokens)
        if n == 0 or n >= len(token_ids) or tuple(token_ids[:n]) != entry.tokens:
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
