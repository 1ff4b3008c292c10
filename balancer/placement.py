"""Where each batch runs.

- ``maxmin`` (SCLS): longest estimated batch first, each onto the replica that would finish its work
  earliest. This is LPT scheduling: it keeps every replica's expected completion close to the others'.
- ``round_robin``: batches in the order given, replicas in turn (what a plain load balancer does).
- ``least_work``: batches in the order given, each to the replica with the least outstanding estimated work
  (the usual "least outstanding requests" balancer, in seconds instead of requests).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Protocol

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


def cost_on(batch: Batch, replica_id: str) -> float:
    """A batch's estimated seconds on one replica: lower where some of its rows' KV caches are kept."""
    return batch.cheaper_on.get(replica_id, batch.est_time)


class PlacementPolicy(Protocol):
    name: str

    def place(self, batches: list[Batch], replicas: list[ReplicaState], now: float) -> list[Assignment]:
        """Assign every batch to a replica with a free slot (callers pass no more batches than free slots).

        Updates each chosen replica's ``expected_free_at`` and ``inflight``.
        """


def _assign(batch: Batch, replica: ReplicaState, now: float) -> Assignment:
    start = max(replica.expected_free_at, now)
    replica.expected_free_at = start + cost_on(batch, replica.id)
    replica.inflight[batch.id] = batch
    return Assignment(batch, replica.id, start, replica.expected_free_at)


class MaxMin:
    """Largest batch first, onto the replica where it would *finish* earliest, counting what it costs there.

    A batch costs the same everywhere except on the few replicas in ``batch.cheaper_on`` (they hold some of
    its rows' KV caches), so the best replica is either the earliest-free one (a heap top) or one of those.
    That keeps a decision O(batches · log replicas) on a fleet of hundreds.
    """

    name = "maxmin"

    def place(self, batches, replicas, now):
        by_id = {r.id: r for r in replicas}
        heap = [(max(r.expected_free_at, now), r.id) for r in replicas if r.free_slots > 0]
        heapq.heapify(heap)
        out = []
        for batch in sorted(batches, key=lambda b: (-b.est_time, b.id)):
            while heap and (by_id[heap[0][1]].free_slots <= 0
                            or heap[0][0] != max(by_id[heap[0][1]].expected_free_at, now)):
                heapq.heappop(heap)  # full, or a stale entry from before its last assignment
            if not heap:
                break
            best_finish, best = heap[0][0] + batch.est_time, by_id[heap[0][1]]
            for rid, cost in batch.cheaper_on.items():
                r = by_id.get(rid)
                if r is not None and r.free_slots > 0:
                    finish = max(r.expected_free_at, now) + cost
                    if (finish, rid) < (best_finish, best.id):
                        best_finish, best = finish, r
            out.append(_assign(batch, best, now))
            if best.free_slots > 0:
                heapq.heappush(heap, (max(best.expected_free_at, now), best.id))
        return out


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._cursor = 0

    def place(self, batches, replicas, now):
        out = []
        ordered = sorted(replicas, key=lambda r: r.id)
        for batch in batches:
            for _ in range(len(ordered)):
                replica = ordered[self._cursor % len(ordered)]
                self._cursor += 1
                if replica.free_slots > 0:
                    out.append(_assign(batch, replica, now))
                    break
            else:
                break
        return out


class LeastWork:
    name = "least_work"

    def place(self, batches, replicas, now):
        out = []
        for batch in batches:
            open_ = [r for r in replicas if r.free_slots > 0]
            if not open_:
                break
            target = min(open_, key=lambda r: (r.outstanding(now), r.id))
            out.append(_assign(batch, target, now))
        return out


def make_placement(name: str) -> PlacementPolicy:
    """Factory for the configured placement name."""
    table = {"maxmin": MaxMin, "round_robin": RoundRobin, "least_work": LeastWork}
    if name not in table:
        raise ValueError(f"unknown placement {name!r}; choose one of {sorted(table)}")
    return table[name]()
