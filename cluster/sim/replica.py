"""Simulated replicas: what an engine would do with a batch, timed by the latency model instead of run.

Both follow the HF engines' real behaviour: rows are left-padded to the batch's longest input, every decode
step runs at the padded context length, and a slice re-prefills everything a request has so far (no KV is
carried between slices in the simulation).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from balancer.estimators import BilinearLatencyModel
from balancer.types import Batch, FinishReason, Request, RequestOutcome, SliceResult


def _finish(req: Request, new_tokens: int, true_len: int) -> FinishReason:
    """Why a row stopped after ``new_tokens`` more tokens."""
    produced = req.generated + new_tokens
    if produced >= true_len:
        return FinishReason.EOS
    if produced >= req.max_tokens:
        return FinishReason.LENGTH
    return FinishReason.SLICE_END


@dataclass
class SliceReplica:
    """Runs one batch at a time (SCLS slices, SLS static batches); queued batches wait their turn.

    Like the HF engine with ``kv_reuse``, it keeps each unfinished row's KV cache in an LRU of
    ``kv_cache_tokens``; a row that comes back with exactly the history it left with skips its re-prefill.
    """

    id: str
    latency: BilinearLatencyModel
    true_len: dict[str, int]
    kv_cache_tokens: int = 0
    queue: list[Batch] = field(default_factory=list)
    running: Batch | None = None
    busy_time: float = 0.0
    kv_rows: OrderedDict = field(default_factory=OrderedDict)
    """request id -> history length its kept cache covers (LRU order)."""
    kv_held: int = 0
    """Tokens held in ``kv_rows`` (kept as a running total: the sum is needed after every batch)."""
    kv_reused_rows: int = 0

    def submit(self, batch: Batch) -> None:
        self.queue.append(batch)

    def start_next(self) -> tuple[Batch, SliceResult] | None:
        """Start the next queued batch; returns it with the result it will report when done."""
        if self.running is not None or not self.queue:
            return None
        batch = self.running = self.queue.pop(0)
        result = self.execute(batch)
        self.busy_time += result.elapsed
        return batch, result

    def finish_running(self) -> None:
        self.running = None

    def execute(self, batch: Batch) -> SliceResult:
        longest = batch.max_input_len
        new = [min(batch.steps, self.true_len[r.id] - r.generated, r.remaining) for r in batch.requests]
        steps = max(new)  # the engine stops once every row has finished
        outcomes = [RequestOutcome(r.id, k, _finish(r, k, self.true_len[r.id]))
                    for r, k in zip(batch.requests, new)]
        reused = set()
        for r in batch.requests:  # a row's cache is taken by this run, whether it is still usable or not
            kept = self.kv_rows.pop(r.id, None)
            if kept is not None:
                self.kv_held -= kept
                if kept == r.input_len:
                    reused.add(r.id)
        fresh = [r for r in batch.requests if r.id not in reused]
        self.kv_reused_rows += len(reused)
        if fresh:
            fresh_len = max(r.input_len for r in fresh)
            prefill = self.latency.prefill_time(len(fresh), fresh_len)
        else:
            fresh_len, prefill = 0, self.latency.prefill_time(batch.size, 1)
        decode = self.latency.batch_time(batch.size, longest, steps) - self.latency.prefill_time(batch.size, longest)
        self._keep(batch, new, outcomes)
        return SliceResult(
            batch_id=batch.id,
            replica_id=self.id,
            outcomes=outcomes,
            elapsed=float(prefill + decode),
            pad_tokens=sum(fresh_len - r.input_len for r in fresh),
            invalid_tokens=sum(steps - k for k in new),
            reprefill_tokens=sum(r.input_len for r in fresh if r.slices > 0),
            kv_reused=not fresh,
        )

    def _keep(self, batch: Batch, new: list[int], outcomes: list[RequestOutcome]) -> None:
        """Keep the caches of rows that will need another slice; evict least recently used beyond capacity."""
        if self.kv_cache_tokens <= 0:
            return
        for r, k, o in zip(batch.requests, new, outcomes):
            if not o.finish_reason.is_final:
                self.kv_rows[r.id] = r.input_len + k
                self.kv_held += r.input_len + k
        while self.kv_held > self.kv_cache_tokens and self.kv_rows:
            _, tokens = self.kv_rows.popitem(last=False)
            self.kv_held -= tokens


@dataclass
class _Active:
    batch: Batch
    request: Request
    target: int
    """Tokens this request will produce in the continuous batch before it leaves."""
    produced: int = 0


@dataclass
class ContinuousReplica:
    """Iteration-level batching (ILS): requests join between iterations and leave the moment they finish.

    Iterations are simulated in segments of at most ``max_segment`` steps, ending early at the next leave,
    so a request assigned while a segment runs joins within ``max_segment`` iterations; when the replica is
    full (the regime that matters for throughput) joins happen exactly at leaves and nothing is delayed.
    """

    id: str
    latency: BilinearLatencyModel
    true_len: dict[str, int]
    max_segment: int = 16
    active: dict[str, _Active] = field(default_factory=dict)
    joining: list[Batch] = field(default_factory=list)
    busy_time: float = 0.0
    segment_end: float | None = None
    pad_tokens: int = 0
    row_iterations: int = 0
    iterations: int = 0
    early_returns: int = 0

    def submit(self, batch: Batch) -> None:
        self.joining.append(batch)

    @property
    def idle(self) -> bool:
        return self.segment_end is None

    def run_segment(self, now: float) -> float | None:
        """Admit joiners (prefill), then run iterations until the next leave or the segment cap.

        Returns when the segment ends, or None if there is nothing to run.
        """
        prefill = 0.0
        if self.joining:
            rows = [b.requests[0] for b in self.joining]
            longest = max(r.input_len for r in rows)
            prefill = float(self.latency.prefill_time(len(rows), longest))
            self.pad_tokens += sum(longest - r.input_len for r in rows)
            for b in self.joining:
                r = b.requests[0]
                target = min(self.true_len[r.id] - r.generated, r.remaining)
                self.active[r.id] = _Active(b, r, target)
            self.joining.clear()
        if not self.active:
            self.segment_end = None
            return None
        n = len(self.active)
        context = max(a.request.input_len + a.produced for a in self.active.values())
        k = min(min(a.target - a.produced for a in self.active.values()), self.max_segment)
        k = max(k, 1)
        decode = float(self.latency.batch_time(n, context, k) - self.latency.prefill_time(n, context))
        for a in self.active.values():
            a.produced += k
        self.row_iterations += n * k
        self.iterations += k
        self.busy_time += prefill + decode
        self.segment_end = now + prefill + decode
        return self.segment_end

    def leave(self) -> list[SliceResult]:
        """Results for the requests that finished at the end of the segment."""
        done = [a for a in self.active.values() if a.produced >= a.target]
        for a in done:
            del self.active[a.request.id]
        if done and self.active:
            self.early_returns += len(done)
        self.segment_end = None
        return [
            SliceResult(a.batch.id, self.id,
                        [RequestOutcome(a.request.id, a.produced,
                                        _finish(a.request, a.produced, self.true_len[a.request.id]))],
                        elapsed=0.0)
            for a in done
        ]
