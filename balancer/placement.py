"""Where each batch runs.

- ``maxmin`` (SCLS): longest estimated batch first, each onto the replica that would finish its work
  earliest. This is LPT scheduling: it keeps every replica's expected completion close to the others'.
- ``round_robin``: batches in the order given, replicas in turn (what a plain load balancer does).
- ``least_work``: batches in the order given, each to the replica with the least outstanding estimated work
  (the usual "least outstanding requests" balancer, in seconds instead of requests).

The scheduler keeps its replicas in an ``OpenReplicas`` index across rounds, and each policy says which open
replicas it needs to see (``candidates``): max-min only ever looks at the earliest-free few, so a round on a
fleet of a thousand replicas costs what its batches cost, not what the fleet costs.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Protocol

from balancer.types import Assignment, Batch


@dataclass(slots=True)
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
    kv_tokens: int = 0
    """Continuous slices: KV tokens its rows may fill by the end of their current slices (the memory bound)."""
    keeps_kv: bool = True
    """Whether its engine keeps a request's KV cache between slices (what the replica reports; an engine with
    DeepSpeed's injected kernels, or with kv_reuse off, does not), so whether it can be a cache holder."""

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.inflight)

    def outstanding(self, now: float) -> float:
        return max(self.expected_free_at - now, 0.0)


_CLOSED = (0, False)
"""(free slots, idle) of a replica the index does not count."""


class OpenReplicas:
    """The scheduler's replicas, indexed for placement: which have a free slot, in the order max-min ranks them.

    Max-min ranks an open replica by ``(max(expected_free_at, now), id)``. The index keeps that order across
    rounds instead of re-sorting the fleet each round: replicas whose work ends later than ``now`` sit in a heap
    by ``(expected_free_at, id)``, and those already free by ``now`` (they all tie at ``now``) in a heap by id.
    Heap entries are invalidated lazily: every ``update`` gives the replica a new version, and an entry with an
    old version is dropped when it surfaces. It also keeps the fleet's free-slot and idle-replica totals.
    """

    def __init__(self) -> None:
        self._replicas: dict[str, ReplicaState] = {}
        self._version: dict[str, int] = {}
        self._counted: dict[str, tuple[int, bool]] = {}  # id -> (free slots, idle) as last counted
        self._later: list[tuple[float, str, int]] = []  # (expected_free_at, id, version): busy beyond _now
        self._ready: list[tuple[str, int]] = []  # (id, version): free by _now
        self._now = -math.inf
        self.free_slots = 0
        """Free slots over all replicas."""
        self.idle = 0
        """Replicas holding no batch at all."""

    def update(self, replica: ReplicaState) -> None:
        """Record a replica after its ``expected_free_at`` or ``inflight`` changed (or when it joins)."""
        rid = replica.id
        free, idle = max(replica.free_slots, 0), not replica.inflight
        old_free, old_idle = self._counted.get(rid, _CLOSED)
        self.free_slots += free - old_free
        self.idle += idle - old_idle
        self._counted[rid] = (free, idle)
        self._replicas[rid] = replica
        version = self._version[rid] = self._version.get(rid, 0) + 1
        if free:
            heapq.heappush(self._later, (replica.expected_free_at, rid, version))
        self._compact_if_mostly_stale()

    def discard(self, replica_id: str) -> None:
        """Forget a replica (its heap entries become stale)."""
        free, idle = self._counted.pop(replica_id, (0, False))
        self.free_slots -= free
        self.idle -= idle
        self._replicas.pop(replica_id, None)
        self._version.pop(replica_id, None)

    def is_open(self, replica_id: str) -> bool:
        return self._counted.get(replica_id, _CLOSED)[0] > 0

    def get(self, replica_id: str) -> ReplicaState | None:
        return self._replicas.get(replica_id)

    def all_open(self) -> list[ReplicaState]:
        """Every open replica, by id."""
        return [self._replicas[rid] for rid in sorted(rid for rid in self._counted if self.is_open(rid))]

    def earliest(self, k: int, now: float) -> list[ReplicaState]:
        """The ``k`` open replicas with the smallest ``(max(expected_free_at, now), id)``, smallest first."""
        if now < self._now:  # time went back (a wall clock): "free by now" must be decided again
            self._later += [(self._replicas[rid].expected_free_at, rid, v) for rid, v in self._ready
                            if self._valid(rid, v)]
            self._ready = []
            heapq.heapify(self._later)
        self._now = now
        while self._later and self._later[0][0] <= now:
            _, rid, v = heapq.heappop(self._later)
            if self._valid(rid, v):
                heapq.heappush(self._ready, (rid, v))
        # Every ready replica ranks before every later one; take from both heaps, then put the taken back.
        taken_ready = self._pop_valid(self._ready, k, 0)
        taken_later = self._pop_valid(self._later, k - len(taken_ready), 1)
        for entry in taken_ready:
            heapq.heappush(self._ready, entry)
        for entry in taken_later:
            heapq.heappush(self._later, entry)
        return [self._replicas[rid] for rid, _ in taken_ready] + [self._replicas[e[1]] for e in taken_later]

    def _pop_valid(self, heap: list, k: int, id_at: int) -> list:
        """Pop the ``k`` smallest valid entries (the replica id is at ``entry[id_at]``, the version last)."""
        taken = []
        while heap and len(taken) < k:
            entry = heapq.heappop(heap)
            if self._valid(entry[id_at], entry[-1]):
                taken.append(entry)
        return taken

    def _valid(self, replica_id: str, version: int) -> bool:
        # is_open, inlined: every heap entry popped is checked, a few per batch placed
        return self._version.get(replica_id) == version and self._counted.get(replica_id, _CLOSED)[0] > 0

    def _compact_if_mostly_stale(self) -> None:
        """Drop stale entries once they outnumber the live ones (a long run updates replicas millions of times)."""
        if len(self._later) + len(self._ready) <= 4 * len(self._counted) + 64:
            return
        self._later = [e for e in self._later if self._valid(e[1], e[2])]
        self._ready = [e for e in self._ready if self._valid(e[0], e[1])]
        heapq.heapify(self._later)
        heapq.heapify(self._ready)


def cost_on(batch: Batch, replica_id: str) -> float:
    """A batch's estimated seconds on one replica: lower where some of its rows' KV caches are kept."""
    return batch.cheaper_on.get(replica_id, batch.est_time)


class PlacementPolicy(Protocol):
    name: str

    def candidates(self, batches: list[Batch], replicas: OpenReplicas, now: float) -> list[ReplicaState]:
        """The open replicas ``place`` needs to see to place these batches exactly as it would among all."""

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

    def candidates(self, batches, replicas, now):
        # Each batch takes the heap top or a replica that holds its caches, so with k batches only the k
        # earliest-free replicas (a replica may take two) and the open cache holders can ever be chosen.
        chosen = replicas.earliest(len(batches), now)
        seen = {r.id for r in chosen}
        for batch in batches:
            for rid in batch.cheaper_on:
                if rid not in seen and replicas.is_open(rid):
                    seen.add(rid)
                    chosen.append(replicas.get(rid))
        return chosen

    def place(self, batches, replicas, now):
        by_id = {r.id: r for r in replicas}
        heap = [(max(r.expected_free_at, now), r.id) for r in replicas if r.free_slots > 0]
        heapq.heapify(heap)
        out = []
        for batch in sorted(batches, key=lambda b: (-b.est_time, b.id)):
            while heap:
                free_at, rid = heap[0]
                top = by_id[rid]
                if top.free_slots > 0 and free_at == max(top.expected_free_at, now):
                    break
                heapq.heappop(heap)  # full, or a stale entry from before its last assignment
            if not heap:
                break
            best_finish, best = free_at + batch.est_time, top
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


class _SeesAllOpen:
    """Policies that look at every open replica (in id order)."""

    def candidates(self, batches, replicas, now):
        return replicas.all_open()


class RoundRobin(_SeesAllOpen):
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


class LeastWork(_SeesAllOpen):
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
