"""Scheduler configuration: one dataclass, one docstring per field."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from balancer.types import Mode


@dataclass
class SchedulerConfig:
    mode: Mode = Mode.CONTINUOUS_SLICES
    """``continuous_slices`` (slices over a continuous batch per replica), ``scls`` (the paper's static slice
    batches), ``sls`` (static batches to completion) or ``ils`` (continuous batching, no slices)."""

    slice_len: int = 64
    """S: decode steps a batch runs before its unfinished requests return to the pool (SCLS), or a request's
    lease on its replica before the dispatcher decides again where it continues (continuous slices)."""

    max_gen_len: int = 1024
    """G: the largest generation budget any request gets; larger ``max_tokens`` are capped to it."""

    max_batch_size: int = 32
    """Upper bound on rows per batch, whatever the memory estimate allows."""

    sls_batch_size: int = 8
    """SLS: the fixed size of each static batch (FCFS, filled in arrival order)."""

    ils_max_concurrency: int = 16
    """ILS: most requests a replica decodes at once in its continuous batch."""

    max_running: int = 64
    """Continuous slices: most requests one replica decodes at once; its KV budget may allow fewer."""

    move_margin: float = 0.25
    """Continuous slices: at a slice boundary a request moves only if another replica is predicted to finish
    it this fraction sooner, its re-prefill included (hysteresis: a move costs a prefill and a round trip)."""

    ordering: Literal["fcfs", "sjf", "hrrn"] = "sjf"
    """Which request runs first: ``fcfs``, ``sjf`` (shortest predicted remaining first) or ``hrrn``."""

    placement: Literal["maxmin", "round_robin", "least_work"] = "maxmin"
    """Which replica gets a batch: ``maxmin``, ``round_robin`` or ``least_work``."""

    max_wait: float = 60.0
    """Aging: a request that has waited this many seconds in the pool goes ahead of any fresher one
    (FCFS among the aged), so no ordering can starve it."""

    queue_depth: int = 2
    """Batches a replica may hold at once (running plus queued). Two hides the dispatch round trip;
    more commits the pool to replicas early and makes new arrivals wait behind it."""

    kv_reuse: bool = True
    """Engines keep an unfinished request's KV cache after a slice. Placement then counts the prefill a
    batch saves on the replica that holds its rows' caches."""

    hrrn_service_floor: float = 1.0
    """HRRN: the smallest predicted service (tokens) used in (wait + service) / service."""

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)
        positive = ("slice_len", "max_gen_len", "max_batch_size", "sls_batch_size",
                    "ils_max_concurrency", "queue_depth", "max_running")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.move_margin < 1.0:
            raise ValueError(f"SchedulerConfig.move_margin must be in [0, 1), got {self.move_margin!r}")
        if self.max_wait <= 0:
            raise ValueError(f"SchedulerConfig.max_wait must be > 0 seconds, got {self.max_wait!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "SchedulerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown scheduler settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
