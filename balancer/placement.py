"""Where each batch runs.

- ``maxmin`` (SCLS): longest estimated batch first, each onto the replica that would finish its work
  earliest. This is LPT scheduling: it keeps every replica's expected completion close to the others'.
- ``round_robin``: batches in the order given, replicas in turn (what a plain load balancer does).
- ``least_work``: batches in the order given, each to the replica with the least outstanding estimated work
  (the usual "least outstanding requests" balancer, in seconds instead of requests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from balancer.types import Assignment, Batch


@dataclass
class ReplicaState:
    """The scheduler's view of one replica."""

    id: str
    slots: int
    """Batches it may hold at once (running plus queued)."""
    expected_free_at: float = 0.0
    """When the replica is expected to finish everything it holds."""
    inflight: dict[str, Batch] = field(default_factory=dict)
    busy_time: float = 0.0
    """Measured serving time of all batches it completed (for load-imbalance figures)."""

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.inflight)

    def outstanding(self, now: float) -> float:
        return max(self.expected_free_at - now, 0.0)


CostOn = Callable[[Batch, str], float]
"""Estimated seconds of a batch on a given replica (it can differ: a replica may hold some rows' KV caches)."""


def _same_everywhere(batch: Batch, replica_id: str) -> float:
    return batch.est_time


class PlacementPolicy(Protocol):
    name: str

    def place(self, batches: list[Batch], replicas: list[ReplicaState], now: float,
              cost_on: CostOn = _same_everywhere) -> list[Assignment]:
        """Assign every batch to a replica with a free slot (callers pass no more batches than free slots).

        Updates each chosen replica's ``expected_free_at`` and ``inflight``, and each batch's ``est_time`` to
        its cost on the chosen replica.
        """


def _assign(batch: Batch, replica: ReplicaState, now: float, cost_on: CostOn) -> Assignment:
    batch.est_time = cost_on(batch, replica.id)
    start = max(replica.expected_free_at, now)
    replica.expected_free_at = start + batch.est_time
    replica.inflight[batch.id] = batch
    return Assignment(batch, replica.id, start, replica.expected_free_at)


class MaxMin:
    """Largest batch first, onto the replica where it would *finish* earliest, counting what it costs there."""

    name = "maxmin"

    def place(self, batches, replicas, now, cost_on=_same_everywhere):
        out = []
        for batch in sorted(batches, key=lambda b: (-b.est_time, b.id)):
            open_ = [r for r in replicas if r.free_slots > 0]
            if not open_:
                break
            target = min(open_, key=lambda r: (max(r.expected_free_at, now) + cost_on(batch, r.id), r.id))
            out.append(_assign(batch, target, now, cost_on))
        return out


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._cursor = 0

    def place(self, batches, replicas, now, cost_on=_same_everywhere):
        out = []
        ordered = sorted(replicas, key=lambda r: r.id)
        for batch in batches:
            for _ in range(len(ordered)):
                replica = ordered[self._cursor % len(ordered)]
                self._cursor += 1
                if replica.free_slots > 0:
                    out.append(_assign(batch, replica, now, cost_on))
                    break
            else:
                break
        return out


class LeastWork:
    name = "least_work"

    def place(self, batches, replicas, now, cost_on=_same_everywhere):
        out = []
        for batch in batches:
            open_ = [r for r in replicas if r.free_slots > 0]
            if not open_:
                break
            target = min(open_, key=lambda r: (r.outstanding(now), r.id))
            out.append(_assign(batch, target, now, cost_on))
        return out


def make_placement(name: str) -> PlacementPolicy:
    """Factory for the configured placement name."""
    table = {"maxmin": MaxMin, "round_robin": RoundRobin, "least_work": LeastWork}
    if name not in table:
        raise ValueError(f"unknown placement {name!r}; choose one of {sorted(table)}")
    return table[name]()
