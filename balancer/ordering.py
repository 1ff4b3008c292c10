"""Which waiting requests go first: FCFS, predicted shortest-first (SSJF) and HRRN (Magnus), all with aging.

A policy only ranks; it never batches or places. Aging sits above every policy: a request that has waited
``max_wait`` seconds in the pool goes ahead of every fresher one, oldest first. That bounds any request's wait
for its next slice by ``max_wait`` plus the time to drain the aged requests ahead of it, whatever the policy
thinks of it (SSJF's anti-starvation rule, applied per slice).
"""

from __future__ import annotations

import heapq
from typing import Callable, Protocol

from balancer.types import Request

ServiceTime = Callable[[Request], float]
"""Predicted seconds of service a request still needs (the scheduler derives it from its estimators)."""


class OrderingPolicy(Protocol):
    name: str

    def key(self, request: Request, now: float) -> tuple:
        """Sort key: smaller goes first."""


class FCFS:
    name = "fcfs"

    def key(self, request: Request, now: float) -> tuple:
        return (-request.priority, request.arrival, request.id)


class ShortestPredictedFirst:
    """SSJF: fewest predicted remaining tokens first; ties by arrival."""

    name = "sjf"

    def key(self, request: Request, now: float) -> tuple:
        return (-request.priority, request.predicted_remaining, request.arrival, request.id)


class HighestResponseRatioNext:
    """HRRN: largest (time in system + predicted service) / predicted service first.

    Time in system counts from arrival, so a request's ratio is the slowdown it would see if it finished now;
    short requests win early, and waiting raises every request's ratio, so HRRN ages by itself.
    """

    name = "hrrn"

    def __init__(self, service_time: ServiceTime, floor: float = 1e-3):
        self.service_time = service_time
        self.floor = floor

    def key(self, request: Request, now: float) -> tuple:
        service = max(self.service_time(request), self.floor)
        ratio = (max(now - request.arrival, 0.0) + service) / service
        return (-request.priority, -ratio, request.arrival, request.id)


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


def waited(request: Request, now: float) -> float:
    """Seconds since the request last entered the pool."""
    since = request.arrival if request.pool_since is None else request.pool_since
    return now - since


def select(pool: list[Request], policy: OrderingPolicy, now: float, max_wait: float,
           limit: int | None = None) -> list[Request]:
    """The first ``limit`` requests of the pool in serving order: aged ones (FCFS) first, then by policy."""
    aged = [r for r in pool if waited(r, now) >= max_wait]
    aged.sort(key=lambda r: (-waited(r, now), r.id))
    if limit is not None and len(aged) >= limit:
        return aged[:limit]
    aged_ids = {r.id for r in aged}
    fresh = [r for r in pool if r.id not in aged_ids]
    rest_limit = None if limit is None else limit - len(aged)

    def key(r: Request) -> tuple:
        return policy.key(r, now)

    if rest_limit is not None and rest_limit < len(fresh):
        fresh = heapq.nsmallest(rest_limit, fresh, key=key)
    else:
        fresh.sort(key=key)
    return aged + fresh
