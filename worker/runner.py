"""The pieces every engine shares: a model forward with an explicit cache, and per-row generation state.

``ModelRunner`` wraps *any* callable with the transformers forward signature: the HF model itself, or the
DeepSpeed ``InferenceEngine`` around it. That is how the HF and DeepSpeed engines share one slice loop.
``RowState`` holds one request's progress and its stopping rules, so the slice loop and the
continuous-batching loop stop requests identically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache

from balancer.types import FinishReason
from worker import kv
from worker.protocol import ItemOutput, SliceItem
from worker.sampling import select_tokens


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class ModelRunner:
    """Forward passes of one causal LM with a caller-managed ``DynamicCache``.

    ``forward`` defaults to the model; DeepSpeed passes its inference engine (same call signature).
    """

    def __init__(self, model, forward: Callable[..., Any] | None = None):
        self.model = model
        self.forward_fn = forward if forward is not None else model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.num_layers = int(self.config.get_text_config(decoder=True).num_hidden_layers)
        gen = getattr(model, "generation_config", None)
        self.eos_token_ids = _as_ids(getattr(gen, "eos_token_id", None) or self.config.eos_token_id)
        pad = getattr(gen, "pad_token_id", None)
        if pad is None:
            pad = self.config.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 1 << 30) or (1 << 30))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
    ) -> tuple[torch.Tensor, DynamicCache]:
        """One forward over ``input_ids`` [B, M] after ``cache`` (length T; mask [B, T + M]).

        Returns the last position's logits [B, V] (float32) and the cache, extended in place. The same
        cache object is passed step after step: rebuilding it from tensors would copy the whole KV.
        """
        if cache is None:
            cache = DynamicCache(config=self.config)
        out = self.forward_fn(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float(), out.past_key_values


@dataclass
class RowState:
    """One request inside a running batch."""

    item: SliceItem
    eos: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    """Full history: the item's token_ids plus what this run has produced."""
    new: list[int] = field(default_factory=list)
    reason: FinishReason | None = None
    kv_reused: bool = False
    max_positions: int = 1 << 30

    @classmethod
    def start(cls, item: SliceItem, default_eos: tuple[int, ...], max_positions: int) -> "RowState":
        eos = default_eos if item.eos_token_ids is None else item.eos_token_ids
        row = cls(item=item, eos=frozenset(eos), tokens=list(item.token_ids), max_positions=max_positions)
        if item.budget <= 0:
            # Nothing may be emitted: an exhausted budget is LENGTH, a reached trace target is EOS.
            row.reason = FinishReason.LENGTH if item.max_new_tokens <= 0 else FinishReason.EOS
        elif len(row.tokens) >= max_positions:
            row.reason = FinishReason.LENGTH
        return row

    @property
    def done(self) -> bool:
        return self.reason is not None

    @property
    def end_ids(self) -> frozenset[int]:
        """The tokens that would end this row now; ``min_tokens`` keeps them out of its first outputs."""
        if self.item.target_len is not None:
            return frozenset()
        return self.eos | frozenset(self.item.stop_token_ids)

    def push(self, token: int) -> None:
        """Append a produced token and decide whether the request ends here."""
        self.tokens.append(token)
        self.new.append(token)
        item, n = self.item, len(self.new)
        if item.target_len is None:
            if token in self.eos:
                self.reason = FinishReason.EOS
            elif token in item.stop_token_ids:
                self.reason = FinishReason.STOP
            elif n >= item.max_new_tokens:
                self.reason = FinishReason.LENGTH
        elif n >= item.max_new_tokens:
            self.reason = FinishReason.LENGTH
        elif n >= item.target_len:
            self.reason = FinishReason.EOS
        if self.reason is None and len(self.tokens) >= self.max_positions:
            self.reason = FinishReason.LENGTH  # the model cannot attend any further

    def output(self) -> ItemOutput:
        return ItemOutput(
            request_id=self.item.request_id,
            new_token_ids=list(self.new),
            finish_reason=self.reason or FinishReason.SLICE_END,
            kv_reused=self.kv_reused,
        )


def choose(logits: torch.Tensor, rows: list[RowState], active: list[int]) -> None:
    """Pick and push the next token of each active row (indices into ``rows``/``logits``)."""
    picks = select_tokens(
        logits, [r.item.sampling for r in rows], [r.tokens for r in rows], [r.item.prompt_len for r in rows],
        [r.end_ids for r in rows], active,
    )
    for b in active:
        rows[b].push(picks[b])


@dataclass
class Prefill:
    """The result of prefilling a group of rows: their batch cache, mask and next positions."""

    cache: DynamicCache
    mask: torch.Tensor
    pad_tokens: int
    reprefill_tokens: int
    seconds: float
    order: list[int] = field(default_factory=list)
    """Row b of ``cache``/``mask``/logits is input row ``order[b]`` (rows are grouped by what they feed)."""


def prefill(
    runner: ModelRunner, rows: list[RowState], kept: list[kv.RowKV | None] | None = None
) -> tuple[torch.Tensor, Prefill]:
    """Feed each row's not-yet-cached tokens; return last logits and the batch state.

    ``kept[b]`` (optional) holds row b's cache over a prefix of its history. Rows with a kept cache feed
    one or a few tokens while fresh rows feed their whole history, so the two kinds are fed in separate
    forwards and their caches joined afterwards: in one left-padded forward every resumed row would be
    padded to the longest prompt, and that padding is computed like real tokens. ``Prefill.order`` says
    how the rows were regrouped (resumed rows first).
    """
    kept = kept or [None] * len(rows)
    resumed = [b for b, k in enumerate(kept) if k is not None]
    fresh = [b for b, k in enumerate(kept) if k is None]
    groups = [g for g in (resumed, fresh) if g]
    parts = [_prefill_group(runner, [rows[b] for b in g], [kept[b] for b in g]) for g in groups]
    logits, state = parts[0]
    state.order = list(groups[0])
    for (more_logits, more), group in zip(parts[1:], groups[1:]):
        layers, state.mask = kv.concat(kv.cache_layers(state.cache), state.mask,
                                       kv.cache_layers(more.cache), more.mask)
        state.cache = kv.make_cache(layers, runner.config)
        logits = torch.cat([logits, more_logits])
        state.pad_tokens += more.pad_tokens
        state.reprefill_tokens += more.reprefill_tokens
        state.seconds += more.seconds
        state.order += group
    return logits, state


def _prefill_group(
    runner: ModelRunner, rows: list[RowState], kept: list[kv.RowKV | None]
) -> tuple[torch.Tensor, Prefill]:
    """One left-padded forward over each row's tokens after its kept cache (if any)."""
    cached = [k.length if k is not None else 0 for k in kept]
    rest = [len(r.tokens) - c for r, c in zip(rows, cached)]
    width = max(rest)
    B = len(rows)
    input_ids = torch.full((B, width), runner.pad_token_id, dtype=torch.long)
    in_mask = torch.zeros(B, width, dtype=torch.long)
    pos = torch.zeros(B, width, dtype=torch.long)
    reprefill = 0
    for b, (r, c, s) in enumerate(zip(rows, cached, rest)):
        input_ids[b, width - s :] = torch.tensor(r.tokens[c:], dtype=torch.long)
        in_mask[b, width - s :] = 1
        pos[b, width - s :] = torch.arange(c, c + s)
        if r.item.generated > 0:
            reprefill += s - 1  # all but the last token had been computed by an earlier slice
    layers, kv_mask = kv.stack_rows(kept, runner.num_layers)
    cache = kv.make_cache(layers, runner.config) if layers is not None else None
    mask = torch.cat([kv_mask.cpu(), in_mask], dim=1)
    t0 = time.perf_counter()
    logits, cache = runner.forward(input_ids, mask, pos, cache)
    runner.sync()
    seconds = time.perf_counter() - t0
    state = Prefill(cache, mask.to(runner.device), sum(width - s for s in rest), reprefill, seconds,
                    list(range(B)))
    return logits, state


def decode_inputs(rows: list[RowState]) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-token inputs of a decode step: each row's last token at its own position.

    A finished row (kept in a static batch until the slice ends) repeats its last token: that compute is
    wasted and counted as invalid, and its cache is never kept, so what it writes does not matter.
    """
    ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long)
    pos = torch.tensor([[len(r.tokens) - 1] for r in rows], dtype=torch.long)
    return ids, pos
