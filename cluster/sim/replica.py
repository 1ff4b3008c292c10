"""Simulated replicas: what an engine would do with a batch, timed by the latency model instead of run.

Both follow the HF engines' real behaviour: rows are left-padded to the batch's longest input, every decode
step runs at the padded context length, and a slice re-prefills everything a request has so far (no KV is
carried between slices in the simulation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from balancer.estimators import BilinearLatencyModel
from balancer.types import Batch, FinishReason, Request, RequestOutcome, SliceResult
from worker.lanes import GROUP_PAD_TOKENS, plan_lanes, prefill_groups

class SimulatedRequest(Request):
    """A request as the scheduler sees it, plus what only the simulated engine knows: how many tokens it
    produces before EOS. Kept on the request itself, not in a table by id: a replica reads it for every row of
    every batch, and a lookup in a million-entry table missed the CPU caches each time."""

    __slots__ = ("true_len",)

    true_len: int


_EOS, _LENGTH, _SLICE_END = FinishReason.EOS, FinishReason.LENGTH, FinishReason.SLICE_END
"""Module constants: an enum member looked up on its class costs a call, once per row of every batch."""


def _finish(produced: int, true_len: int, max_tokens: int) -> FinishReason:
    """Why a row stopped once it has ``produced`` tokens in all."""
    if produced >= true_len:
        return _EOS
    if produced >= max_tokens:
        return _LENGTH
    return _SLICE_END


@dataclass
class SliceReplica:
    """Runs one batch at a time (SCLS slices, SLS static batches); queued batches wait their turn.

    Like the HF engine with ``kv_reuse``, it keeps each unfinished row's KV cache in an LRU of
    ``kv_cache_tokens``; a row that comes back with exactly the history it left with skips its re-prefill.
    """

    id: str
    latency: BilinearLatencyModel
    kv_cache_tokens: int = 0
    queue: list[Batch] = field(default_factory=list)
    running: Batch | None = None
    busy_time: float = 0.0
    kv_rows: dict[str, int] = field(default_factory=dict)
    """request id -> history length its kept cache covers, least recently used first (a row is popped when it
    runs and put back at the end; a plain dict keeps that order at half an OrderedDict's cost)."""
    kv_held: int = 0
    """Tokens held in ``kv_rows`` (kept as a running total: the sum is needed after every batch)."""
    kv_reused_rows: int = 0
    pad_tokens: int = 0
    invalid_tokens: int = 0
    reprefill_tokens: int = 0

    def submit(self, batch: Batch) -> None:
        self.queue.append(batch)

    def start_next(self) -> SliceResult | None:
        """Start the next queued batch; returns the result it will report when done."""
        if self.running is not None or not self.queue:
            return None
        batch = self.running = self.queue.pop(0)
        result = self.execute(batch)
        self.busy_time += result.elapsed
        self.pad_tokens += result.pad_tokens
        self.invalid_tokens += result.invalid_tokens
        self.reprefill_tokens += result.reprefill_tokens
        return result

    def finish_running(self) -> None:
        self.running = None

    def release(self, request_id: str) -> None:
        """The request's next slice runs elsewhere: free the KV cache kept for it here, as the engine does."""
        tokens = self.kv_rows.pop(request_id, None)
        if tokens is not None:
            self.kv_held -= tokens

    def execute(self, batch: Batch) -> SliceResult:
        """What running ``batch`` (of ``SimulatedRequest``) does, and how long it takes."""
        # One pass over the rows, with running figures in locals and plain comparisons rather than max(): at a
        # million requests this runs for every row of every batch, and each builtin call or attribute write
        # per row costs more than the arithmetic.
        kv_rows, keep, cap = self.kv_rows, self.kv_cache_tokens > 0, batch.steps
        outcomes = []
        steps = new_total = 0
        n_fresh = fresh_len = fresh_inputs = reprefill = reused = 0
        held = self.kv_held
        for r in batch.requests:
            rid, generated, target = r.id, r.generated, r.true_len
            input_len = r.prompt_len + generated
            budget = r.max_tokens
            k = target - generated  # min(cap, tokens to EOS, budget left (at least 0)), and _finish, inlined
            if k > cap:
                k = cap
            left = budget - generated if budget > generated else 0
            if k > left:
                k = left
            produced = generated + k
            reason = _EOS if produced >= target else _LENGTH if produced >= budget else _SLICE_END
            outcomes.append(RequestOutcome(rid, k, reason))
            if k > steps:  # the engine stops once every row has finished
                steps = k
            new_total += k
            kept = kv_rows.pop(rid, None)  # a row's cache is taken by this run, whether still usable or not
            if kept is not None:
                held -= kept
            if kept is not None and kept == input_len:
                reused += 1
            else:
                n_fresh += 1
                if input_len > fresh_len:
                    fresh_len = input_len
                fresh_inputs += input_len
                if r.slices > 0:
                    reprefill += input_len
            if keep and reason is _SLICE_END:  # it will need another slice: keep its cache
                kv_rows[rid] = input_len + k
                held += input_len + k
        self.kv_held = held
        self.kv_reused_rows += reused
        self._evict()
        size, longest = batch.size, batch.max_input_len
        prefill = (self.latency.prefill_time(n_fresh, fresh_len) if n_fresh
                   else self.latency.prefill_time(size, 1))
        decode = self.latency.batch_time(size, longest, steps) - self.latency.prefill_time(size, longest)
        return SliceResult(
            batch_id=batch.id,
            replica_id=self.id,
            outcomes=outcomes,
            elapsed=float(prefill + decode),
            pad_tokens=n_fresh * fresh_len - fresh_inputs,
            invalid_tokens=size * steps - new_total,
            reprefill_tokens=reprefill,
            kv_reused=not n_fresh,
        )

    def _evict(self) -> None:
        """Drop the least recently used kept caches beyond capacity."""
        while self.kv_held > self.kv_cache_tokens and self.kv_rows:
            tokens = self.kv_rows.pop(next(iter(self.kv_rows)))  # a dict keeps insertion order: oldest first
            self.kv_held -= tokens


@dataclass(slots=True)
class _Active:
    request: Request
    target: int
    """Tokens this request will produce in the continuous batch before it leaves."""
    batch: Batch | None
    """Its current lease (one slice of ``batch.steps`` tokens); ``None`` while the dispatcher decides where its
    next slice runs (the row keeps decoding meanwhile, as a live replica does)."""
    produced: int = 0
    lease_start: int = 0
    """``produced`` when the current lease began."""


@dataclass
class ContinuousReplica:
    """One continuous batch (ILS, and continuous slices): requests join between iterations and leave the moment
    they finish.

    Each request holds a lease of ``batch.steps`` tokens (its whole budget in ILS, one slice in continuous
    slices). When a lease runs out the replica reports a slice end and the row keeps decoding until the
    dispatcher renews the lease here (``submit`` of a batch for a request it runs) or moves it away
    (``release``). Iterations are simulated in segments of at most ``max_segment`` steps, ending early at the
    next leave or lease end, so a request assigned while a segment runs joins within ``max_segment``
    iterations; when the replica is full (the regime that matters for throughput) joins happen exactly at
    leaves and nothing is delayed.
    """

    id: str
    latency: BilinearLatencyModel
    max_segment: int = 16
    max_lanes: int = 1
    """Lanes the engine decodes the batch in (``worker.lanes``): 1 models one padded batch."""
    active: dict[str, _Active] = field(default_factory=dict)
    held: dict[str, _Active] = field(default_factory=dict)
    """Rows that finished while their next lease was undecided: reported once it is."""
    joining: list[Batch] = field(default_factory=list)
    busy_time: float = 0.0
    segment_end: float | None = None
    pad_tokens: int = 0
    invalid_tokens: int = 0
    """Tokens decoded for rows that then moved away (their next lease went elsewhere)."""
    row_iterations: int = 0
    iterations: int = 0
    early_returns: int = 0

    def submit(self, batch: Batch) -> None:
        rid = batch.requests[0].id
        row = self.active.get(rid) or self.held.get(rid)
        if row is None:
            self.joining.append(batch)
        else:  # a renewed lease: the row never left
            row.batch = batch

    def release(self, request_id: str) -> None:
        """The request's next slice runs elsewhere: drop its row and what it decoded past its last lease."""
        row = self.active.pop(request_id, None) or self.held.pop(request_id, None)
        if row is not None:
            self.invalid_tokens += row.produced - row.lease_start

    @property
    def idle(self) -> bool:
        return self.segment_end is None

    def run_segment(self, now: float) -> float | None:
        """Admit joiners (prefill), then run iterations until the next leave, lease end or the segment cap.

        Returns when the segment ends, or None if there is nothing to run.
        """
        prefill = 0.0
        if self.joining:
            rows = [b.requests[0] for b in self.joining]
            # as the engine does: joiners prefilled in groups of similar length
            for group in prefill_groups([r.input_len for r in rows], GROUP_PAD_TOKENS):
                longest = max(rows[i].input_len for i in group)
                prefill += float(self.latency.prefill_time(len(group), longest))
                self.pad_tokens += sum(longest - rows[i].input_len for i in group)
            for b in self.joining:
                r = b.requests[0]
                target = min(r.true_len - r.generated, r.remaining)
                self.active[r.id] = _Active(r, target, b)
            self.joining.clear()
        if not self.active:
            self.segment_end = None
            return None
        n = len(self.active)
        contexts = [a.request.input_len + a.produced - a.lease_start for a in self.active.values()]
        k = self.max_segment
        for a in self.active.values():
            k = min(k, a.target - a.produced)
            if a.batch is not None:
                k = min(k, a.lease_start + a.batch.steps - a.produced)
        k = max(k, 1)
        decode = 0.0
        for lane in plan_lanes(contexts, self.max_lanes):  # as the engine does: lanes of similar context
            width = max(contexts[i] for i in lane)
            decode += float(self.latency.batch_time(len(lane), width, k) - self.latency.prefill_time(len(lane), width))
        for a in self.active.values():
            a.produced += k
        self.row_iterations += n * k
        self.iterations += k
        self.busy_time += prefill + decode
        self.segment_end = now + prefill + decode
        return self.segment_end

    def leave(self) -> list[SliceResult]:
        """Results due at the end of the segment."""
        self.segment_end = None
        return self.due()

    def due(self) -> list[SliceResult]:
        """Results that can be reported now: finished rows and ended leases (after a segment or a renewal)."""
        out = []
        for a in list(self.active.values()) + list(self.held.values()):
            rid = a.request.id
            if a.batch is None:
                if a.produced >= a.target and rid in self.active:
                    self.held[rid] = self.active.pop(rid)  # finished past its lease: wait for the next one
                continue
            in_lease = a.produced - a.lease_start
            if a.produced >= a.target and in_lease <= a.batch.steps:
                self.active.pop(rid, None)
                self.held.pop(rid, None)
                out.append(self._result(a, in_lease))
            elif in_lease >= a.batch.steps:
                out.append(self._result(a, a.batch.steps))
                a.lease_start += a.batch.steps
                a.batch = None
                if a.produced >= a.target:
                    self.held[rid] = self.active.pop(rid)
        finished = sum(1 for r in out if r.outcomes[0].finish_reason.is_final)
        if finished and self.active:
            self.early_returns += finished
        return out

    def _result(self, a: _Active, tokens: int) -> SliceResult:
        return SliceResult(a.batch.id, self.id,
                           [RequestOutcome(a.request.id, tokens,
                                           _finish(a.request.generated + tokens, a.request.true_len,
                                                   a.request.max_tokens))],
                           elapsed=0.0)
