"""A worker replica's store: registration and heartbeat, and its work stream (consumer group ``worker``).
Results and slice timings go out through what every store can post (:class:`~cluster.stores.base.Store`)."""

from __future__ import annotations

import logging

from cluster.messages import ReplicaInfo, UnknownMessage, WorkMessage, read_work_entry
from cluster.stores.base import Store

log = logging.getLogger(__name__)

WORK_GROUP = "worker"


class WorkerStore(Store):
    def take_cpu_slot(self) -> int:
        """0, 1, 2, ... for the replicas that ask in turn (engines pinned to distinct cores)."""
        return int(self._r.incr(self.k.cpu_slot)) - 1

    def register_replica(self, info: ReplicaInfo, ttl: float) -> None:
        """Announce the replica (and beat once); its work stream and consumer group exist from here on."""
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(self.k.replica(info.id), mapping=info.to_hash())
        pipe.sadd(self.k.replicas, info.id)
        pipe.set(self.k.hb(info.id), "1", px=int(ttl * 1000))
        pipe.execute()
        self._ensure_group(self.k.work(info.id), WORK_GROUP)

    def heartbeat(self, replica_id: str, ttl: float, busy_seconds: float | None = None) -> bool:
        """Beat; False when the replica is no longer registered (a dispatcher presumed it dead)."""
        pipe = self._r.pipeline(transaction=False)
        pipe.sismember(self.k.replicas, replica_id)
        pipe.set(self.k.hb(replica_id), "1", px=int(ttl * 1000))
        flags = pipe.execute()
        if flags[0] and busy_seconds is not None:
            # not before the check: an HSET on a forgotten replica would recreate half its record
            self._r.hset(self.k.replica(replica_id), mapping=ReplicaInfo.busy_fields(busy_seconds))
        return bool(flags[0])

    def read_work(self, replica_id: str, block_ms: int | None, count: int = 1,
                  pending: bool = False) -> list[tuple[str, WorkMessage]]:
        """Next batches for a replica (its own consumer in the group); ``block_ms`` None returns at once (0 would
        block forever).

        ``pending``: instead, the batches already delivered to this consumer but never acknowledged (its
        loop failed between reading a batch and posting the result, e.g. while Redis restarted). A message
        this code cannot read (a newer dispatcher's) is logged, acknowledged and skipped.
        """
        resp = self._r.xreadgroup(WORK_GROUP, replica_id, {self.k.work(replica_id): "0" if pending else ">"},
                                  count=count, block=None if pending else block_ms)
        if not resp:
            return []
        out = []
        for eid, fields in resp[0][1]:
            if not fields:  # a pending entry deleted from its stream
                continue
            try:
                out.append((eid.decode(), read_work_entry(fields)))
            except UnknownMessage as exc:
                log.error("work message %s skipped: %s", eid.decode(), exc)
                self.ack_work(replica_id, eid.decode())
        return out

    def ack_work(self, replica_id: str, entry_id: str) -> None:
        """Acknowledge (and delete) a batch once its result is posted."""
        self._ack(self.k.work(replica_id), WORK_GROUP, [entry_id])
