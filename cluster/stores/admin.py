"""The store of the CLI, the bench harnesses and the tests: what the cluster holds, read from outside (requests,
output, the metrics snapshot, slice timings, the streams and the server's own figures), and requests submitted
or cancelled synchronously, exactly as the ingress does (:func:`~cluster.stores.base.queue_submit`).

Nothing here takes part in serving: the roles' stores are :mod:`~cluster.stores.ingress`,
:mod:`~cluster.stores.dispatcher` and :mod:`~cluster.stores.worker`.
"""

from __future__ import annotations

from collections import Counter

from cluster.messages import (MetricsSnapshot, OutputEvent, RequestRecord, ResultMessage, SliceTiming,
                              UnknownMessage, decode_metrics, decode_timing, read_output_entry, read_request_entry, read_result_entry,
                              request_entry)
from cluster.stores.base import Store, queue_submit
from cluster.stores.dispatcher import DispatcherStore
from cluster.stores.worker import WORK_GROUP

SHARED_STREAMS = ("incoming", "cancel", "results")
"""The streams every request passes through (a request's own output stream expires with it)."""


class AdminStore(Store):
    # ---- as the ingress would ------------------------------------------------------------------------
    def submit(self, rec: RequestRecord) -> None:
        pipe = self._r.pipeline(transaction=True)
        queue_submit(pipe, self.k, rec)
        pipe.execute()

    def request_cancel(self, rid: str) -> None:
        self._r.xadd(self.k.cancel, request_entry(rid))

    def read_output(self, rid: str, last_id: str = "0", block_ms: int | None = 1000) -> list[tuple[str, OutputEvent]]:
        resp = self._r.xread({self.k.out(rid): last_id}, block=block_ms)
        if not resp:
            return []
        return [(eid.decode(), read_output_entry(fields)) for eid, fields in resp[0][1]]

    # ---- what the dispatcher published ---------------------------------------------------------------
    def metrics_snapshot(self) -> MetricsSnapshot | None:
        """The dispatcher's latest snapshot, or None when there is none (or it is a newer dispatcher's)."""
        raw = self._r.get(self.k.metrics)
        if not raw:
            return None
        try:
            return decode_metrics(raw)
        except UnknownMessage:
            return None

    def slice_log(self) -> list[SliceTiming]:
        """The measured slice timings, oldest first (``predictor.latency.samples_from_slice_log`` reads them)."""
        return [decode_timing(x) for x in self._r.lrange(self.k.slice_log, 0, -1)]

    def output_replicas(self, rids: list[str]) -> dict[str, str]:
        """Request id -> the replica its latest tokens came from (each output event names it)."""
        pipe = self._r.pipeline(transaction=False)
        for rid in rids:
            pipe.xrevrange(self.k.out(rid), count=1)
        out = {}
        for rid, entries in zip(rids, pipe.execute()):
            replica = read_output_entry(entries[0][1]).replica if entries else ""
            if replica:
                out[rid] = replica
        return out

    # ---- the streams ---------------------------------------------------------------------------------
    def _stream(self, name: str) -> str:
        if name not in SHARED_STREAMS:
            raise ValueError(f"no shared stream {name!r} (one of {SHARED_STREAMS})")
        return getattr(self.k, name)

    def stream_length(self, name: str) -> int:
        """Entries a shared stream holds now (``incoming``, ``cancel`` or ``results``)."""
        return int(self._r.xlen(self._stream(name)))

    def stream_added(self, name: str) -> int:
        """Entries ever added to a shared stream (its readers delete what they handled, so its length drops)."""
        if not self._r.exists(self._stream(name)):
            return 0
        return int(self._r.xinfo_stream(self._stream(name))["entries-added"])

    def request_ids(self, name: str) -> list[str]:
        """The request ids ``incoming`` or ``cancel`` holds, oldest first (what no dispatcher handled yet)."""
        if name == "results":
            raise ValueError("the results stream carries results (see results())")
        return [read_request_entry(fields) for _, fields in self._r.xrange(self._stream(name))]

    def follow(self, last: dict[str, str], block_ms: int | None = None) -> list[tuple[str, str]]:
        """(stream name, request id) of the entries of ``incoming`` and ``cancel`` after ``last`` (stream name ->
        the last entry id seen, "0" for all; advanced in place), waiting up to ``block_ms`` for one. Outside the
        dispatcher's consumer group: a dispatcher's reading is unaffected (a test's stand-in dispatcher uses it)."""
        names = {self._stream(name): name for name in last}
        resp = self._r.xread({stream: last[name] for stream, name in names.items()}, block=block_ms)
        out = []
        for stream, entries in resp or []:
            name = names[stream.decode()]
            for eid, fields in entries:
                last[name] = eid.decode()
                out.append((name, read_request_entry(fields)))
        return out

    def results(self) -> list[ResultMessage]:
        """The results stream's messages, oldest first (those no dispatcher handled yet)."""
        return [read_result_entry(fields) for _, fields in self._r.xrange(self.k.results)]

    def dispatch_pending(self, name: str) -> int:
        """Entries of a shared stream delivered to the dispatcher and not acknowledged."""
        return self._pending(self._stream(name), DispatcherStore.DISPATCH_GROUP)

    def work_length(self, replica_id: str) -> int:
        """Entries a replica's work stream holds now."""
        return int(self._r.xlen(self.k.work(replica_id)))

    def work_pending(self, replica_id: str) -> int:
        """Batches delivered to a replica and not acknowledged."""
        return self._pending(self.k.work(replica_id), WORK_GROUP)

    def _pending(self, stream: str, group: str) -> int:
        return int(self._r.xpending(stream, group)["pending"])

    # ---- the server ------------------------------------------------------------------------------------
    def blocked_output_readers(self) -> int:
        """Clients blocked in an XREAD now (an ingress waiting on a request's output)."""
        return sum(1 for c in self._r.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", ""))

    def figures(self) -> dict:
        """Redis's own memory, its key count, keys by kind (the part after the prefix: req, gen, out, hb, ...),
        the length and bytes (``MEMORY USAGE``) of the shared streams and the slice log, the live set's size,
        and the append-only file's size and rewrites so far."""
        r, prefix = self._r, self.k.p
        info = r.info("memory")
        persistence = r.info("persistence")
        kinds: Counter = Counter()
        for key in r.scan_iter(count=1000):
            parts = key.decode(errors="replace").split(":")
            kinds[parts[1] if len(parts) > 1 and parts[0] == prefix else "foreign"] += 1
        lengths, sizes = {}, {}
        for name in (*SHARED_STREAMS, "slice_log"):
            key = getattr(self.k, name)
            kind = r.type(key)
            lengths[name] = int(r.xlen(key) if kind == b"stream" else r.llen(key) if kind == b"list" else 0)
            sizes[name] = int(r.memory_usage(key) or 0) if kind != b"none" else 0
        return {"used_memory": int(info["used_memory"]), "used_memory_rss": int(info.get("used_memory_rss", 0)),
                "dbsize": int(r.dbsize()), "keys": dict(kinds), "streams": lengths, "stream_bytes": sizes,
                "live": int(r.scard(self.k.live)),
                # An append-only-file rewrite forks the server and competes with the fsync of every write.
                "aof_current_size": int(persistence.get("aof_current_size", 0)),
                "aof_rewrites": int(persistence.get("aof_rewrites", 0))}
