"""A whole Slicefleet cluster on this machine: Redis (embedded unless configured), Ray on loopback, the app.

Used by ``slicefleet serve``, the end-to-end tests and the benchmarks, so all three run the same thing.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import httpx

from cluster.config import SlicefleetConfig

log = logging.getLogger("slicefleet.local")


class LocalCluster:
    def __init__(self, cfg: SlicefleetConfig, app_name: str = "slicefleet", redis_dir: str | Path | None = None):
        self.cfg = cfg
        self.app_name = app_name
        self.redis = None
        self.redis_dir = redis_dir
        self._ray_started = False

    @property
    def url(self) -> str:
        return f"http://{self.cfg.api.host}:{self.cfg.api.port}"

    def start(self, timeout: float = 300.0) -> "LocalCluster":
        # Every Ray socket on 127.0.0.1 (DESIGN.md); set before Ray is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Serve's proxy (uvicorn) has no timeout for a request head: without this a client holds a connection
        # forever by sending nothing or a byte at a time. Read by the proxy process, so set before Ray starts.
        from cluster.http_limits import CALLBACK, CALLBACK_ENV

        os.environ.setdefault(CALLBACK_ENV, CALLBACK)
        import ray
        from ray import serve

        if not self.cfg.redis.url:
            from cluster.redis_server import EmbeddedRedis

            # Supervised: nothing else restarts this process if it dies, and everything above retries until
            # Redis answers again, so a restart on the same port with the same AOF is a full recovery.
            self.redis = EmbeddedRedis.private(self.redis_dir).start().supervise()
            self.cfg = self.cfg.with_redis_url(self.redis.url)
        else:
            from cluster.stores.base import wait_for_redis

            # A Redis that cannot be used (down, plain vs TLS, untrusted certificate, wrong password) fails here
            # with the reason, not as a health check that times out once every replica has started.
            wait_for_redis(self.cfg.redis.url, **self.cfg.redis.connection_kwargs())
        from worker.make_model import ensure_default_model

        if not self.cfg.model.path:
            ensure_default_model()  # build once here rather than racing in every replica
        if not ray.is_initialized():
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", configure_logging=False)
            self._ray_started = True
        serve.start(http_options={"host": self.cfg.api.host, "port": self.cfg.api.port})
        from cluster.app import build_app_from_config

        log.info("deploying %d worker replicas (%s, %s engine)", self.cfg.replicas.num_replicas,
                 self.cfg.scheduler.mode, self.cfg.engine.backend)
        serve.run(build_app_from_config(self.cfg), name=self.app_name, route_prefix="/", blocking=False)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                resp = httpx.get(f"{self.url}/health", timeout=5)
                if resp.status_code == 200:
                    return
                last = resp.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise TimeoutError(f"cluster not healthy after {timeout:.0f} s: {last}")

    def stop(self) -> None:
        try:
            import ray
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
                if self._ray_started:
                    ray.shutdown()
        finally:
            if self.redis is not None:
                self.redis.stop()
                self.redis = None

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
