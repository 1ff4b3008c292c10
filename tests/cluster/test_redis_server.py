"""The embedded Redis: a SIGKILLed server comes back under supervision on the same port with its data."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from cluster.redis_server import EmbeddedRedis


def wait_until(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_supervised_server_comes_back_after_sigkill_with_its_aof(caplog):
    with EmbeddedRedis() as srv:
        srv.supervise(every=0.1)
        client = redis.Redis.from_url(srv.url, socket_timeout=2)
        client.set("accepted", "yes")
        client.xadd("stream", {"a": "1"})
        old_pid, port = srv.pid, srv.port
        with caplog.at_level("WARNING", logger="cluster.redis_server"):
            os.kill(old_pid, signal.SIGKILL)
            assert wait_until(lambda: srv.restarts == 1), "the supervisor did not restart the server"
        assert srv.pid != old_pid and srv.port == port
        assert client.get("accepted") == b"yes"  # replayed from the append-only file, not a fresh server
        assert client.xlen("stream") == 1
        assert any("restarting it on 127.0.0.1" in r.getMessage() for r in caplog.records)
        # A second death is handled as well (the watcher keeps running after a restart).
        os.kill(srv.pid, signal.SIGKILL)
        assert wait_until(lambda: srv.restarts == 2)
        assert client.get("accepted") == b"yes"


def test_unsupervised_server_stays_down_and_stop_cleans_up():
    srv = EmbeddedRedis().start()
    data_dir = srv.data_dir
    os.kill(srv.pid, signal.SIGKILL)
    time.sleep(0.5)
    assert srv.restarts == 0
    client = redis.Redis.from_url(srv.url, socket_connect_timeout=0.5)
    try:
        client.ping()
        raise AssertionError("nobody should have restarted it")
    except redis.ConnectionError:
        pass
    srv.stop()  # a dead process is reaped, not waited on
    assert not data_dir.exists()  # our own temporary directory goes with it


def test_restart_keeps_data_in_a_given_directory(tmp_path):
    with EmbeddedRedis(tmp_path / "r") as srv:
        redis.Redis.from_url(srv.url).set("k", "v")
        srv.restart()
        assert redis.Redis.from_url(srv.url).get("k") == b"v"
    assert (tmp_path / "r").exists()  # a directory the caller gave is the caller's to remove


def test_the_private_embedded_redis_needs_its_password(tmp_path):
    import redis

    from cluster.redis_server import EmbeddedRedis

    with EmbeddedRedis.private(tmp_path / "r") as server:
        assert redis.Redis.from_url(server.url).ping()
        anonymous = redis.Redis(host="127.0.0.1", port=server.port)
        with pytest.raises(redis.exceptions.NoPermissionError):
            anonymous.get("anything")
        assert server.password not in server.safe_url and str(server.port) in server.safe_url
