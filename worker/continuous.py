"""``ContinuousBatchingEngine``: iteration-level scheduling for the ILS baseline (Orca / vLLM style).

Requests wait in a FIFO queue; at most ``max_concurrency`` run at once. Each ``step()`` is one iteration:
- if requests wait and there is room, the step prefills the newcomers as one left-padded group (yielding
  their first tokens) and splices their caches into the running batch, like vLLM's prefill-first policy;
- otherwise it decodes one token for every running request.
Finished requests leave the batch at once (their rows are cut out of the cache and padding columns that no
row needs any more are trimmed), so nobody waits for the longest request. Stopping rules, sampling and
trace mode are shared with the slice engines (``worker.runner.RowState``).

Why not transformers' own ``generate_batch`` / ``ContinuousBatchingManager``: in 5.23 it does run on CPU
and matched ``generate`` greedily here, but it drives itself from a background thread (no synchronous
``step()`` to time and to interleave arrivals with), has no per-request seeded sampling or stop ids, and
no trace-mode target lengths. The baseline needs all of those, so this module keeps the loop in our hands.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import torch
from transformers import DynamicCache, StaticCache

from worker import kv
from worker.protocol import ItemOutput, SliceItem
from worker.runner import ModelRunner, RowState, choose, decode_inputs, prefill


GROWTH = 64
"""Decode steps the running batch's cache has room for before it is copied into a bigger buffer."""

GROUP_PAD_TOKENS = 32
"""Newcomers are prefilled together only while padding them to their group's longest costs fewer tokens than
this (about one forward's fixed cost in prefill tokens on the CPU profile: d / a ≈ 28)."""


def prefill_groups(lengths: list[int], max_pad: int) -> list[list[int]]:
    """Indices of ``lengths`` cut into groups of similar length, each padding at most ``max_pad`` tokens in all."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            pad = sum(lengths[i] - lengths[j] for j in group)  # the group padded to its new longest, lengths[i]
            if pad <= max_pad:
                group.append(i)
                continue
        groups.append([i])
    return groups


@dataclass
class CBStats:
    """Counters since construction (or ``reset_stats``)."""

    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_time: float = 0.0
    decode_time: float = 0.0
    decode_step_times: list[float] = field(default_factory=list)
    pad_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    max_running: int = 0
    forwards: list[tuple[int, int, float, bool]] = field(default_factory=list)
    """Every forward since the caller last took them: (rows, padded context, seconds, was a prefill); what a
    latency profile can be refit from under real conditions."""


class ContinuousBatchingEngine:
    """Continuous batching over one model, under a concurrency cap."""

    backend = "continuous"

    def __init__(self, model, *, max_concurrency: int = 16, forward=None, group_pad_tokens: int = GROUP_PAD_TOKENS):
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.model = model
        self.runner = ModelRunner(model, forward=forward)
        self.max_concurrency = max_concurrency
        self.group_pad_tokens = group_pad_tokens
        self.waiting: deque[RowState] = deque()
        self.running: list[RowState] = []
        self._cache: DynamicCache | StaticCache | None = None
        self._mask: torch.Tensor | None = None
        self._used = 0
        """Columns of ``_mask``/``_cache`` written so far; the rest is room to grow in place."""
        self._preallocate = True
        self.stats = CBStats()

    @classmethod
    def from_pretrained(cls, model_path, device: str = "cpu", dtype: str = "float32", **kwargs):
        from worker.hf_engine import load_model

        return cls(load_model(model_path, device, dtype), **kwargs)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.runner.eos_token_ids

    def reset_stats(self) -> None:
        self.stats = CBStats()

    def add(self, item: SliceItem) -> None:
        """Queue a request; it joins the running batch at the next step with room."""
        self.waiting.append(RowState.start(item, self.runner.eos_token_ids, self.runner.max_positions))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def abort(self, request_id: str) -> bool:
        """Stop a waiting or running request now; a running row is cut out of the batch cache. True if found."""
        for r in list(self.waiting):
            if r.item.request_id == request_id:
                self.waiting.remove(r)
                return True
        keep = [b for b, r in enumerate(self.running) if r.item.request_id != request_id]
        if len(keep) == len(self.running):
            return False
        self._keep_rows(keep)
        return True

    def drop(self, request_ids) -> None:
        """Forget these requests (finished elsewhere, cancelled or moved): the ``Engine`` protocol's name."""
        for rid in request_ids:
            self.abort(rid)

    def produced(self) -> dict[str, list[int]]:
        """Tokens produced so far by every unfinished request (waiting ones: none yet)."""
        out = {r.item.request_id: r.new for r in self.running}
        out.update((r.item.request_id, []) for r in self.waiting)
        return out

    def _keep_rows(self, keep: list[int]) -> None:
        self.running = [self.running[b] for b in keep]
        if keep:
            self._hold(*kv.select(*self._filled(), keep))
        else:
            self._cache = self._mask = None

    def step(self) -> list[ItemOutput]:
        """One iteration; returns the requests that finished in it."""
        finished: list[ItemOutput] = []
        newcomers: list[RowState] = []
        while self.waiting and len(self.running) + len(newcomers) < self.max_concurrency:
            row = self.waiting.popleft()
            if row.done:  # nothing to generate (exhausted budget): leaves without compute
                finished.append(row.output())
            else:
                newcomers.append(row)
        if newcomers:
            self._prefill(newcomers)
        elif self.running:
            self._decode()
        else:
            return finished
        self.stats.steps += 1
        self.stats.max_running = max(self.stats.max_running, len(self.running))
        keep = [b for b, r in enumerate(self.running) if not r.done]
        if len(keep) < len(self.running):
            finished += [r.output() for r in self.running if r.done]
            self._keep_rows(keep)
        self.stats.finished += len(finished)
        return finished

    def _prefill(self, rows: list[RowState]) -> None:
        # One left-padded forward per group of similar lengths: padding is computed like real tokens, and a
        # prefill token costs far more than the fixed cost of one more forward.
        for group in prefill_groups([len(r.tokens) for r in rows], self.group_pad_tokens):
            members = [rows[b] for b in group]
            logits, state = prefill(self.runner, members)
            choose(logits, members, list(range(len(members))))
            self.stats.prefill_steps += 1
            self.stats.prefill_time += state.seconds
            self.stats.forwards.append((len(members), state.mask.shape[1], state.seconds, True))
            self.stats.pad_tokens += state.pad_tokens
            self.stats.generated_tokens += len(members)
            if self._cache is None:
                self._hold(kv.cache_layers(state.cache), state.mask)
            else:
                self._hold(*kv.concat(*self._filled(), kv.cache_layers(state.cache), state.mask))
            self.running += members

    def _filled(self) -> tuple[kv.Layers, torch.Tensor]:
        return kv.filled(kv.cache_layers(self._cache), self._mask, self._used)

    def _hold(self, layers: kv.Layers, mask: torch.Tensor) -> None:
        """Keep the running batch's KV with room for ``GROWTH`` decode steps written in place (a join, a leave
        or a full buffer copies it anyway; between those, steps copy nothing)."""
        self._used = mask.shape[1]
        grown = kv.preallocated(layers, mask, GROWTH, self.runner.config) if self._preallocate else None
        if grown is None:
            self._preallocate = False  # not plain full-attention layers: grow by concatenation
            self._cache, self._mask = kv.make_cache(layers, self.runner.config), mask
        else:
            self._cache, self._mask = grown

    def _decode(self) -> None:
        ids, pos = decode_inputs(self.running)
        if self._preallocate and self._used == self._mask.shape[1]:
            self._hold(*self._filled())
        if self._used < self._mask.shape[1]:
            self._mask[:, self._used] = 1
        else:
            self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        self._used += 1
        t0 = time.perf_counter()
        logits, self._cache = self.runner.forward(ids, self._mask, pos, self._cache)
        choose(logits, self.running, list(range(len(self.running))))
        self.runner.sync()
        dt = time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.decode_time += dt
        self.stats.forwards.append((len(self.running), self._used, dt, False))
        self.stats.decode_step_times.append(dt)
        self.stats.generated_tokens += len(self.running)

    def run(self, items: Iterable[SliceItem]) -> list[ItemOutput]:
        """Convenience: serve ``items`` (all arriving now) to completion; outputs in input order."""
        order = []
        for it in items:
            order.append(it.request_id)
            self.add(it)
        done: dict[str, ItemOutput] = {}
        while self.has_work():
            for out in self.step():
                done[out.request_id] = out
        return [done[rid] for rid in order]
