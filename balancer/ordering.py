"""Which waiting requests go first: FCFS, predicted shortest-first (SSJF) and HRRN (Magnus), all with aging.

A policy only ranks; it never batches or places. Aging sits above every policy: a request that has waited
``max_wait`` seconds in the pool goes ahead of every fresher one, oldest first. That bounds any request's wait
for its next slice by ``max_wait`` plus the time to drain the aged requests ahead of it, whatever the policy
thinks of it (SSJF's anti-starvation rule, applied per slice).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from balancer.types import Request

ServiceTime = Callable[[Request], float]
"""Predicted seconds of service a request still needs (the scheduler derives it from its estimators)."""


class OrderingPolicy(Protocol):
    name: str

    def scores(self, requests: list[Request], now: float) -> np.ndarray:
        """One number per request: among fresh requests of equal priority, smaller goes first."""


def _attr(requests: list[Request], name: str) -> np.ndarray:
    return np.fromiter((getattr(r, name) for r in requests), dtype=float, count=len(requests))


class FCFS:
    name = "fcfs"

    def scores(self, requests, now):
        return _attr(requests, "arrival")


class ShortestPredictedFirst:
    """SSJF: fewest predicted remaining tokens first."""

    name = "sjf"

    def scores(self, requests, now):
        return _attr(requests, "predicted_remaining")


class HighestResponseRatioNext:
    """HRRN: largest (time in system + predicted service) / predicted service first.

    Time in system counts from arrival, so a request's ratio is the slowdown it would see if it finished now;
    short requests win early, and waiting raises every request's ratio, so HRRN ages by itself.
    """

    name = "hrrn"

    def __init__(self, service_time: ServiceTime, floor: float = 1e-3):
        self.service_time = service_time
        self.floor = floor

    def scores(self, requests, now):
        service = np.maximum(np.fromiter((self.service_time(r) for r in requests), float, len(requests)),
                             self.floor)
        wait = np.maximum(now - _attr(requests, "arrival"), 0.0)
        return -(wait + service) / service


def make_ordering(name: str, service_time: ServiceTime | None = None, floor: float = 1e-3) -> OrderingPolicy:
    """Factory for the configured policy name."""
    if name == "fcfs":
        return FCFS()
    if name == "sjf":
        return ShortestPredictedFirst()
    if name == "hrrn":
        if service_time is None:
            raise ValueError("hrrn ordering needs a service-time function")
        return HighestResponseRatioNext(service_time, floor)
    raise ValueError(f"unknown ordering {name!r}; choose fcfs, sjf or hrrn")


def select(pool: list[Request], policy: OrderingPolicy, now: float, max_wait: float,
           limit: int | None = None) -> list[Request]:
    """The first ``limit`` requests of the pool in serving order: aged ones (oldest first), then by policy.

    "Aged" means waiting in the pool (since it last entered) for ``max_wait`` seconds or more.
    """
    n = len(pool)
    if n == 0:
        return []
    since = np.fromiter((r.arrival if r.pool_since is None else r.pool_since for r in pool), float, n)
    fresh = (now - since < max_wait).astype(np.int8)
    priority = _attr(pool, "priority")
    scores = policy.scores(pool, now)
    # Keys, last one most significant: aged before fresh; aged by how long they waited; fresh by
    # priority, then score, then arrival. lexsort is stable, so pool order breaks the remaining ties.
    key_main = np.where(fresh == 1, scores, since)
    key_prio = np.where(fresh == 1, -priority, 0.0)
    order = np.lexsort((_attr(pool, "arrival"), key_main, key_prio, fresh))
    if limit is not None:
        order = order[:limit]
    return [pool[i] for i in order]
