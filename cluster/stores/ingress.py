"""The ingress's store, asynchronous (``redis.asyncio``): submit a request, post a cancellation, read a request's
output, read the dispatcher's snapshot and the replicas' heartbeats.

The ingress serves many concurrent requests on one event loop, each waiting on its output stream with
``XREAD BLOCK``; a synchronous client would block that loop. It queues the same submit transaction as the
synchronous :class:`~cluster.stores.admin.AdminStore` (:func:`~cluster.stores.base.queue_submit`).

A client is created per event loop: a ``redis.asyncio`` connection is bound to the loop it was opened on,
and test clients (or a server restarted in-process) may drive the same service from different loops.
"""

from __future__ import annotations

import asyncio
import weakref

import redis.asyncio as aioredis

from cluster.config import RedisSettings
from cluster.messages import (MetricsSnapshot, OutputEvent, ReplicaInfo, RequestRecord, UnknownMessage, decode_metrics,
                              read_output_entry, request_entry)
from cluster.stores.base import Keys, queue_submit, split_alive


class IngressStore:
    def __init__(self, url: str, prefix: str = "sf", password: str | None = None, max_connections: int = 576,
                 **tls):
        """``tls``: redis-py's ``ssl_*`` options for a rediss:// URL (:meth:`connect` takes them from the config)."""
        self.url = url
        self._options = {"password": password, **tls}
        self.max_connections = max_connections
        """Every request waiting for output holds one connection in a blocking XREAD, so this must exceed
        ``api.max_inflight`` (redis-py's default of 100 turned the 101st waiting request into a 503)."""
        self.k = Keys(prefix)
        self._clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis]" = (
            weakref.WeakKeyDictionary())

    @classmethod
    def connect(cls, settings: RedisSettings, **kwargs) -> "IngressStore":
        """The store ``settings`` (a config's ``redis``) describe: URL, prefix, password and TLS."""
        return cls(settings.url, settings.key_prefix, **settings.connection_kwargs(), **kwargs)

    @property
    def _r(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # socket_timeout must exceed the longest XREAD BLOCK we issue (see read_output's block_ms cap).
            # A blocking pool waits for a free connection instead of failing with "Too many connections".
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, **self._options, decode_responses=True, socket_timeout=30,
                socket_connect_timeout=5, health_check_interval=10, max_connections=self.max_connections,
                timeout=10)
            client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it too
            self._clients[loop] = client
        return client

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()

    async def ping(self) -> bool:
        return bool(await self._r.ping())

    async def submit(self, rec: RequestRecord) -> None:
        """Durable from here on: the record, the live set and the announcement land together."""
        async with self._r.pipeline(transaction=True) as pipe:
            queue_submit(pipe, self.k, rec)
            await pipe.execute()

    async def request_cancel(self, rid: str) -> None:
        await self._r.xadd(self.k.cancel, request_entry(rid))

    async def read_output(self, rid: str, last_id: str = "0", block_ms: int = 1000) -> list[tuple[str, OutputEvent]]:
        """Output events after ``last_id``; waits up to ``block_ms`` (at least 1 ms: 0 would mean forever)."""
        block_ms = max(1, min(int(block_ms), 20_000))
        resp = await self._r.xread({self.k.out(rid): last_id}, block=block_ms)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # redis-py sometimes swallows a cancellation that lands inside a blocking read and returns
            # normally (4 in 200 here); a waiter whose client left would then poll on until its deadline.
            raise asyncio.CancelledError()
        if not resp:
            return []
        return [(eid, read_output_entry(fields)) for eid, fields in resp[0][1]]

    async def metrics_snapshot(self) -> MetricsSnapshot | None:
        """The dispatcher's latest snapshot; None when there is none (no dispatcher published for a minute) or
        it is one this code cannot read (a newer dispatcher's)."""
        raw = await self._r.get(self.k.metrics)
        if not raw:
            return None
        try:
            return decode_metrics(raw)
        except (UnknownMessage, ValueError):
            return None

    async def replicas_alive(self) -> tuple[list[str], list[str]]:
        """(alive, dead) among registered replicas, by heartbeat."""
        ids = sorted(await self._r.smembers(self.k.replicas))
        if not ids:
            return [], []
        async with self._r.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.exists(self.k.hb(rid))
            return split_alive(ids, await pipe.execute())

    async def alive_replicas(self) -> list[ReplicaInfo]:
        """The registered replicas whose heartbeat is alive, as they registered (their Ray session included)."""
        alive, _ = await self.replicas_alive()
        if not alive:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for rid in alive:
                pipe.hgetall(self.k.replica(rid))
            return [ReplicaInfo.from_hash(data) for data in await pipe.execute() if data]
