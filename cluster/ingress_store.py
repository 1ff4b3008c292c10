"""The ingress's asynchronous view of the Redis state store (``redis.asyncio``).

The ingress serves many concurrent requests on one event loop, each waiting on its output stream with
``XREAD BLOCK``; the synchronous :class:`cluster.state.StateStore` would block that loop. This class writes
exactly what ``StateStore`` writes for the ingress-side operations (same :class:`Keys`, same
:class:`RequestRecord` encoding, same transaction), and nothing that belongs to the dispatcher.

A client is created per event loop: a ``redis.asyncio`` connection is bound to the loop it was opened on,
and test clients (or a server restarted in-process) may drive the same service from different loops.
"""

from __future__ import annotations

import asyncio
import json
import weakref

import redis.asyncio as aioredis

from cluster.config import RedisSettings
from cluster.state import Keys, RequestRecord

ENTRY_FIELDS = ("tokens", "replica", "finish_reason")


class AsyncStateStore:
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
    def connect(cls, settings: RedisSettings, **kwargs) -> "AsyncStateStore":
        """The store ``settings`` (a config's ``redis``) describe: URL, prefix, password and TLS."""
        return cls(settings.url, settings.key_prefix, **settings.connection_kwargs(), **kwargs)

    @property
    def r(self) -> aioredis.Redis:
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
        return bool(await self.r.ping())

    async def submit(self, rec: RequestRecord) -> None:
        """Same transaction as ``StateStore.submit``: record, live set and announcement land together."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.k.req(rec.id), mapping=rec.to_hash())
            pipe.sadd(self.k.live, rec.id)
            pipe.xadd(self.k.incoming, {"id": rec.id})
            await pipe.execute()

    async def request_cancel(self, rid: str) -> None:
        await self.r.xadd(self.k.cancel, {"id": rid})

    async def read_output(self, rid: str, last_id: str = "0", block_ms: int = 1000) -> list[tuple[str, dict]]:
        """Output events after ``last_id``; waits up to ``block_ms`` (at least 1 ms: 0 would mean forever)."""
        block_ms = max(1, min(int(block_ms), 20_000))
        resp = await self.r.xread({self.k.out(rid): last_id}, block=block_ms)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # redis-py sometimes swallows a cancellation that lands inside a blocking read and returns
            # normally (4 in 200 here); a waiter whose client left would then poll on until its deadline.
            raise asyncio.CancelledError()
        if not resp:
            return []
        return [(eid, dict(fields)) for eid, fields in resp[0][1]]

    async def metrics_snapshot(self) -> dict:
        raw = await self.r.get(self.k.metrics)
        if not raw:
            return {}
        try:
            snap = json.loads(raw)
        except ValueError:
            return {}
        return snap if isinstance(snap, dict) else {}

    async def replicas_alive(self) -> tuple[list[str], list[str]]:
        """(alive, dead) among registered replicas, by heartbeat (as ``StateStore.replicas_alive``)."""
        ids = sorted(await self.r.smembers(self.k.replicas))
        if not ids:
            return [], []
        async with self.r.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.exists(self.k.hb(rid))
            flags = await pipe.execute()
        return [i for i, f in zip(ids, flags) if f], [i for i, f in zip(ids, flags) if not f]
