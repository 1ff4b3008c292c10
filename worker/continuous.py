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

from worker import kv
from worker.lanes import GROUP_PAD_TOKENS, SPLIT_SAVING, best_cut, prefill_groups
from worker.protocol import ItemOutput, SliceItem, run_to_completion
from worker.runner import ModelRunner, RowState, choose, decode_inputs, prefill


GROWTH = 64
"""Decode steps the running batch's cache has room for before it is copied into a bigger buffer."""

LANE_PAD_TOKENS = 4096
"""A prefilled group joins a running lane only while the padding that adds (rows x columns, attended at every
decode step) stays below this; otherwise it runs as a lane of its own. One more forward per step costs what
about 6.5 k padded row-tokens of attention cost on the CPU profile (h / e)."""

COMPACT_AT = 4
"""A lane is compacted (its cache copied without its dead rows) once a quarter of its rows (and at least two)
are dead; until then newcomers take the dead rows' slots over in place."""

MAX_LANES = 4
"""Most lanes (separately padded sub-batches) one engine decodes per step."""



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
    invalid_tokens: int = 0
    """Positions decoded for rows that had already left (kept until their lane is compacted)."""
    lane_splits: int = 0
    """Lanes cut in two by context length (their padding cost more than another forward)."""
    slot_fills: int = 0
    """Newcomers written into the slot of a row that had left (joins that copied no other row's cache)."""
    generated_tokens: int = 0
    finished: int = 0
    max_running: int = 0
    forwards: list[tuple[int, int, float, bool]] = field(default_factory=list)
    """Every forward since the caller last took them: (rows, padded context, seconds, was a prefill); what a
    latency profile can be refit from under real conditions."""


class Lane:
    """Rows decoded together in one forward: one left-padded KV cache, with room to grow in place.

    A row that leaves (finished, aborted) is not cut out at once: cutting copies the whole lane's cache, which
    costs several decode steps of a full lane. Its slot stays, decoded and ignored (counted as invalid tokens),
    and the next newcomer whose history fits the lane's width takes it over in place (``fill``): only the
    newcomer's own keys and values are written. Under steady load rows leave and join one for one, and the
    lane's cache is never copied. Dead slots are cut out once they make up ``1 / COMPACT_AT`` of the lane.
    """

    def __init__(self, runner: ModelRunner, rows: list[RowState], layers: kv.Layers, mask: torch.Tensor):
        self.runner = runner
        self.rows = rows
        self.dead: set[int] = set()
        self._preallocate = True
        self._hold(layers, mask)

    @property
    def live(self) -> list[RowState]:
        return [r for b, r in enumerate(self.rows) if b not in self.dead]

    def retire(self, indices) -> None:
        """These rows left; their columns are freed at the next compaction."""
        self.dead.update(indices)
        if len(self.dead) == len(self.rows):
            self.rows, self.dead = [], set()
        elif len(self.dead) >= max(2, len(self.rows) / COMPACT_AT):
            self.compact()

    def compact(self) -> None:
        if self.dead:
            keep = [b for b in range(len(self.rows)) if b not in self.dead]
            self.dead = set()
            self.keep(keep)

    @property
    def width(self) -> int:
        """Columns of its padded cache (what every row of it attends over)."""
        return self._used

    def join_cost(self, n: int, width: int) -> int:
        """Padding (row x columns) that joining ``n`` rows of ``width`` columns would add."""
        if width <= self._used:
            return n * (self._used - width)
        return len(self.rows) * (width - self._used)

    def fill(self, rows: list[RowState], layers: kv.Layers, mask: torch.Tensor) -> list[int]:
        """Write prefilled rows into dead slots, right-aligned to the lane's current column (their next token is
        fed there with everyone else's). Returns the indices (into ``rows``) placed; the rest did not fit."""
        placed = []
        free = sorted(self.dead)
        lengths = mask.sum(dim=1).tolist()
        cache_layers = kv.cache_layers(self._cache)
        for i, (row, length) in enumerate(zip(rows, lengths)):
            length = int(length)
            if not free or length > self._used:
                continue
            b = free.pop(0)
            start = self._used - length
            for (k, v), (nk, nv) in zip(cache_layers, layers):
                k[b, :, start:self._used] = nk[i, :, nk.shape[2] - length:]
                v[b, :, start:self._used] = nv[i, :, nv.shape[2] - length:]
            self._mask[b].zero_()
            self._mask[b, start:self._used] = 1
            self.rows[b] = row
            self.dead.discard(b)
            placed.append(i)
        return placed

    def join(self, rows: list[RowState], layers: kv.Layers, mask: torch.Tensor) -> None:
        self.compact()
        self._hold(*kv.concat(*self._filled(), layers, mask))
        self.rows += rows

    def merge(self, other: "Lane") -> None:
        self.join(other.rows, *other._filled())

    def split(self, moved: list[int]) -> "Lane":
        """Move rows ``moved`` (live ones) into a lane of their own; this lane keeps its other live rows."""
        layers, mask = self._filled()
        other = Lane(self.runner, [self.rows[b] for b in moved], *kv.select(layers, mask, moved))
        self.dead.update(moved)
        self.compact()
        return other

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (the others finished or were aborted); trims columns nobody needs any more."""
        self.rows = [self.rows[b] for b in indices]
        if indices:
            self._hold(*kv.select(*self._filled(), indices))

    def decode(self) -> float:
        """One decode step of every row (dead ones too: their tokens are ignored); returns its seconds."""
        ids, pos = decode_inputs(self.rows)
        if self._preallocate and self._used == self._mask.shape[1]:
            self._hold(*self._filled())
        if self._used < self._mask.shape[1]:
            self._mask[:, self._used] = 1
        else:
            self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        self._used += 1
        t0 = time.perf_counter()
        logits, self._cache = self.runner.forward(ids, self._mask, pos, self._cache)
        choose(logits, self.rows, [b for b in range(len(self.rows)) if b not in self.dead])
        self.runner.sync()
        return time.perf_counter() - t0

    def _filled(self) -> tuple[kv.Layers, torch.Tensor]:
        return kv.filled(kv.cache_layers(self._cache), self._mask, self._used)

    def _hold(self, layers: kv.Layers, mask: torch.Tensor) -> None:
        """Keep the lane's KV with room for ``GROWTH`` decode steps written in place (a join, a leave or a full
        buffer copies it anyway; between those, steps copy nothing)."""
        self._used = mask.shape[1]
        grown = kv.preallocated(layers, mask, GROWTH, self.runner.config) if self._preallocate else None
        if grown is None:
            self._preallocate = False  # not plain full-attention layers: grow by concatenation
            self._cache, self._mask = kv.make_cache(layers, self.runner.config), mask
        else:
            self._cache, self._mask = grown


class ContinuousBatchingEngine:
    """Continuous batching over one model, under a concurrency cap.

    The running requests are kept in up to ``max_lanes`` *lanes*, each one left-padded batch decoded by one
    forward per step. A continuous batch of mixed lengths padded as one would attend over its longest row's
    context for every row; lanes group rows of similar context, and a new group joins the lane where it adds
    the least padding, or opens a lane of its own when that padding would cost more than a forward.
    """

    backend = "continuous"

    def __init__(self, model, *, max_concurrency: int = 16, forward=None, group_pad_tokens: int = GROUP_PAD_TOKENS,
                 lane_pad_tokens: int = LANE_PAD_TOKENS, max_lanes: int = MAX_LANES,
                 split_saving: int = SPLIT_SAVING):
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if max_lanes < 1:
            raise ValueError("max_lanes must be >= 1")
        self.model = model
        self.runner = ModelRunner(model, forward=forward)
        self.max_concurrency = max_concurrency
        self.group_pad_tokens = group_pad_tokens
        self.lane_pad_tokens = lane_pad_tokens
        self.max_lanes = max_lanes
        self.split_saving = split_saving
        self.waiting: deque[RowState] = deque()
        self.lanes: list[Lane] = []
        self.stats = CBStats()

    @classmethod
    def from_pretrained(cls, model_path, device: str = "cpu", dtype: str = "float32", **kwargs):
        from worker.hf_engine import load_model

        return cls(load_model(model_path, device, dtype), **kwargs)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.runner.eos_token_ids

    @property
    def running(self) -> list[RowState]:
        return [r for lane in self.lanes for r in lane.live]

    def reset_stats(self) -> None:
        self.stats = CBStats()

    def add(self, item: SliceItem) -> None:
        """Queue a request; it joins the running batch at the next step with room."""
        self.waiting.append(RowState.start(item, self.runner.eos_token_ids, self.runner.max_positions))

    def has_work(self) -> bool:
        return bool(self.waiting or self.lanes)

    @property
    def num_running(self) -> int:
        return sum(len(lane.rows) - len(lane.dead) for lane in self.lanes)

    def abort(self, request_id: str) -> bool:
        """Stop a waiting or running request now; a running row is cut out of its lane. True if found."""
        for r in list(self.waiting):
            if r.item.request_id == request_id:
                self.waiting.remove(r)
                return True
        for lane in self.lanes:
            for b, r in enumerate(lane.rows):
                if b not in lane.dead and r.item.request_id == request_id:
                    lane.retire([b])
                    self.lanes = [x for x in self.lanes if x.rows]
                    return True
        return False

    def drop(self, request_ids) -> None:
        """Forget these requests (finished elsewhere, cancelled or moved): the ``Engine`` protocol's name."""
        for rid in request_ids:
            self.abort(rid)

    def produced(self) -> dict[str, list[int]]:
        """Tokens produced so far by every unfinished request (waiting ones: none yet)."""
        out = {r.item.request_id: r.new for r in self.running}
        out.update((r.item.request_id, []) for r in self.waiting)
        return out

    def step(self) -> list[ItemOutput]:
        """One iteration; returns the requests that finished in it."""
        finished: list[ItemOutput] = []
        newcomers: list[RowState] = []
        running = self.num_running
        while self.waiting and running + len(newcomers) < self.max_concurrency:
            row = self.waiting.popleft()
            if row.done:  # nothing to generate (exhausted budget): leaves without compute
                finished.append(row.output())
            else:
                newcomers.append(row)
        if newcomers:
            self._prefill(newcomers)
        elif self.lanes:
            self._decode()
        else:
            return finished
        self.stats.steps += 1
        self.stats.max_running = max(self.stats.max_running, self.num_running)
        for lane in self.lanes:
            left = [b for b, r in enumerate(lane.rows) if r.done and b not in lane.dead]
            if left:
                finished += [lane.rows[b].output() for b in left]
                lane.retire(left)
        self.lanes = [lane for lane in self.lanes if lane.rows]
        self._merge_close_lanes()
        self._split_wide_lanes()
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
            self._place(members, kv.cache_layers(state.cache), state.mask)

    def _place(self, rows: list[RowState], layers: kv.Layers, mask: torch.Tensor) -> None:
        """Take over dead slots where the padding is acceptable; then join the lane where the rest add the least
        padding, or open a lane when that costs more."""
        for lane in sorted(self.lanes, key=lambda x: x.width):
            if not lane.dead or lane.join_cost(len(rows), mask.shape[1]) > self.lane_pad_tokens:
                continue
            placed = lane.fill(rows, layers, mask)
            self.stats.slot_fills += len(placed)
            if placed:
                rest = [i for i in range(len(rows)) if i not in set(placed)]
                if not rest:
                    return
                rows = [rows[i] for i in rest]
                layers, mask = kv.select(layers, mask, rest)
        width = mask.shape[1]
        best = min(self.lanes, key=lambda lane: lane.join_cost(len(rows), width), default=None)
        if best is not None and (best.join_cost(len(rows), width) <= self.lane_pad_tokens
                                 or len(self.lanes) >= self.max_lanes):
            best.join(rows, layers, mask)
        else:
            self.lanes.append(Lane(self.runner, rows, layers, mask))

    def _merge_close_lanes(self) -> None:
        """Lanes whose widths came close (rows left, trimming one) run as one again."""
        if len(self.lanes) < 2:
            return
        self.lanes.sort(key=lambda lane: lane.width)
        for a, b in zip(self.lanes, self.lanes[1:]):
            if b.join_cost(len(a.rows), a.width) <= self.lane_pad_tokens // 2:
                a.compact()
                b.merge(a)
                a.rows = []
                break
        self.lanes = [lane for lane in self.lanes if lane.rows]

    def _split_wide_lanes(self) -> None:
        """Cut a lane in two by context length where that saves more padding than a forward costs."""
        for lane in list(self.lanes):
            if len(self.lanes) >= self.max_lanes:
                return
            live = [b for b in range(len(lane.rows)) if b not in lane.dead]
            if len(live) < 2:
                continue
            lengths = [len(lane.rows[b].tokens) - 1 for b in live]
            k, saving = best_cut(lengths)
            if k and saving >= self.split_saving:
                order = sorted(range(len(live)), key=lambda i: lengths[i])
                self.lanes.append(lane.split(sorted(live[i] for i in order[k:])))
                self.stats.lane_splits += 1

    def _decode(self) -> None:
        for lane in self.lanes:
            dt = lane.decode()
            self.stats.decode_steps += 1
            self.stats.decode_time += dt
            self.stats.forwards.append((len(lane.rows), lane.width, dt, False))
            self.stats.decode_step_times.append(dt)
            self.stats.generated_tokens += len(lane.rows) - len(lane.dead)
            self.stats.invalid_tokens += len(lane.dead)

    def run(self, items: Iterable[SliceItem]) -> list[ItemOutput]:
        """Convenience: serve ``items`` (all arriving now) to completion; outputs in input order."""
        return run_to_completion(self, items)
