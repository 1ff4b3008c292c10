"""The predicted backlog: how long a request arriving now would wait before a replica starts it.

Admission control compares it with ``api.max_backlog_seconds``. It must cost the waiting pool the way the
replicas will actually run it, in batches of the size the scheduler forms: a request's share of a full
batch, not its time alone (on a CPU a batch of 32 costs far more than one request, so dividing solo times by
the batch size made the estimate about ten times too low).

* **Continuous modes** (``continuous_slices``, ``ils``): a replica runs one batch of at most ``rows`` rows
  (its row cap, or fewer where its KV budget runs out), and a waiting request joins as soon as a row frees.
  Free rows take waiting requests at once; the rest wait while rows finish, and rows finish at the rate the
  replica gets through work: each request's share of a full batch (:func:`continuous_slices.row_work`). The
  wait is the pool's work beyond the free rows, spread over the replicas.
* **Static modes** (``scls``, ``sls``): a replica runs its batches one after another, so a new request waits
  for everything already placed there (``outstanding``) and for the pool, each waiting request costed as its
  share of a batch of the mode's size (or as many rows as fit the memory bound).

Pure arithmetic on the scheduler's state and estimators: no clock (``now`` is passed in), no I/O.
"""

from __future__ import annotations

import math

from balancer import continuous_slices as cs
from balancer.config import SchedulerConfig
from balancer.estimators import MemoryEstimator, SliceTimeEstimator
from balancer.types import Mode, Request

CONTINUOUS_MODES = (Mode.CONTINUOUS_SLICES, Mode.ILS)


def requests_per_replica(config: SchedulerConfig) -> int:
    """The most requests one replica holds placed at once (running, or queued on it): the rows of its
    continuous batch, or ``queue_depth`` static batches of the mode's batch size. Past this many requests
    per replica, the rest wait in the dispatcher's pool."""
    mode = Mode(config.mode)
    if mode is Mode.CONTINUOUS_SLICES:
        return config.max_running
    if mode is Mode.ILS:
        return config.ils_max_concurrency
    size = config.max_batch_size if mode is Mode.SCLS else config.sls_batch_size
    return config.queue_depth * size


def predicted_backlog_seconds(scheduler, now: float) -> float:
    """Seconds until the replicas could start a request arriving now (``inf``: work waits and no replica
    is there to do it). ``scheduler``: a :class:`balancer.scheduler.Scheduler` (its pool, replicas,
    configuration and estimators are read, nothing is changed)."""
    pool = list(scheduler.pool.values())
    replicas = list(scheduler.replicas.values())
    if not replicas:
        return math.inf if pool else 0.0
    config = scheduler.config
    if Mode(config.mode) in CONTINUOUS_MODES:
        rows = continuous_rows(config, scheduler.memory, pool)
        free = sum(max(rows - len(r.inflight), 0) for r in replicas)
        return continuous_wait(scheduler.time, pool, rows, free) / len(replicas)
    placed = sum(r.outstanding(now) for r in replicas)
    return (static_pool_work(config, scheduler.time, scheduler.memory, pool) + placed) / len(replicas)


def continuous_rows(config: SchedulerConfig, memory: MemoryEstimator, pool: list[Request]) -> int:
    """Rows one replica's continuous batch holds: its row cap, or fewer when the KV budget fills first (rows
    the size of the pool's average lease; ``continuous_slices`` reserves a row's input plus its slice)."""
    cap = requests_per_replica(config)
    if not pool or Mode(config.mode) is not Mode.CONTINUOUS_SLICES:
        return cap
    tokens = sum(r.input_len + min(config.slice_len, r.remaining) for r in pool) / len(pool)
    return max(min(cap, memory.max_batch_size(int(math.ceil(tokens)), 0)), 1)


def continuous_wait(time: SliceTimeEstimator, pool: list[Request], rows: int, free: int) -> float:
    """Replica-seconds of work before the last waiting request gets a row: the ``free`` rows take waiting
    requests at once, and the others wait while rows finish, one request's share of a full batch at a time
    (the pool's mean share: which requests go first is the ordering's business)."""
    waiting = len(pool) - free
    if waiting <= 0:
        return 0.0
    work = sum(cs.row_work(time, r, rows, fresh=True) for r in pool)
    return work * waiting / len(pool)


def static_pool_work(config: SchedulerConfig, time: SliceTimeEstimator, memory: MemoryEstimator,
                     pool: list[Request]) -> float:
    """Replica-seconds to run the pool to its predicted end in static batches of the mode's size (SCLS:
    ``max_batch_size``, or as many rows as fit the memory bound for a slice; SLS: ``sls_batch_size``, as many
    as fit for the whole run): each request costs its share of such a batch of rows as long as itself.

    Padding to a batch's longest row is left out (SCLS's DP groups similar lengths), and the pool is not cut
    into actual groups: a regrouping would let the estimate drop when a short request joins."""
    sls = Mode(config.mode) is Mode.SLS
    size = config.sls_batch_size if sls else config.max_batch_size
    work = 0.0
    for r in pool:
        fits = memory.max_batch_size(r.input_len, r.remaining if sls else min(config.slice_len, r.remaining))
        rows = max(min(size, fits), 1)
        work += float(time.batch_time(rows, r.input_len, int(math.ceil(r.predicted_remaining)))) / rows
    return work
