"""Continuous slices: the costs and choices the scheduler makes when every replica runs one continuous batch.

A request's slice is a *lease* of at most S tokens on one replica. Inside the replica it is one row of the
running batch: it joins at the next step and leaves the moment it finishes. What the dispatcher decides:
- where a new request joins: max-min on predicted completion (least predicted outstanding work first), under
  each replica's row cap and KV-memory bound;
- at each slice boundary, whether the request keeps its row (the default: no re-prefill, no gap) or moves to a
  replica where it is predicted to finish sooner, its re-prefill included.

Costs come from the same ``SliceTimeEstimator`` as everything else: one decode step of ``n`` rows at context
``L`` is ``batch_time(n, L, 1) - batch_time(n, L, 0)``.
"""

from __future__ import annotations

from balancer.estimators import MemoryEstimator, SliceTimeEstimator
from balancer.placement import ReplicaState
from balancer.types import Batch, Request


def step_time(time: SliceTimeEstimator, n: int, context: int) -> float:
    """Seconds of one decode step of ``n`` rows at ``context`` tokens."""
    n = max(n, 1)
    return float(time.batch_time(n, context, 1) - time.batch_time(n, context, 0))


def row_work(time: SliceTimeEstimator, request: Request, rows: int, fresh: bool) -> float:
    """A request's predicted share of a replica's time until it finishes, in a batch of ``rows`` rows:
    its prefill when it joins fresh, then its remaining tokens at ``1/rows`` of a step each."""
    context = request.input_len
    share = step_time(time, rows, context) / max(rows, 1)
    prefill = float(time.batch_time(1, context, 0)) if fresh else 0.0
    return prefill + request.predicted_remaining * share


def finish_on(time: SliceTimeEstimator, request: Request, rows: int, fresh: bool) -> float:
    """Seconds until ``request`` finishes in a batch of ``rows`` rows (every row advances one token a step)."""
    context = request.input_len
    prefill = float(time.batch_time(1, context, 0)) if fresh else 0.0
    return prefill + request.predicted_remaining * step_time(time, rows, context)


def fits(replica: ReplicaState, tokens: int, memory: MemoryEstimator) -> bool:
    """A row of ``tokens`` KV tokens joins ``replica`` within its row cap and its KV budget."""
    return replica.free_slots > 0 and memory.max_batch_size(replica.kv_tokens + tokens, 0) >= 1


def should_move(time: SliceTimeEstimator, request: Request, here: ReplicaState, there: ReplicaState,
                margin: float) -> bool:
    """Move at a slice boundary only when ``there`` finishes the request ``margin`` sooner, re-prefill counted."""
    stay = finish_on(time, request, len(here.inflight), fresh=False)
    move = finish_on(time, request, len(there.inflight) + 1, fresh=True)
    return move < (1.0 - margin) * stay


def batch_tokens(batch: Batch) -> int:
    """KV tokens a one-row lease reserves (fixed at formation: the row's history grows as tokens are applied)."""
    return batch.max_input_len + batch.steps
