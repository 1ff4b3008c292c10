"""The request-head deadline of :mod:`cluster.http_limits` on a real uvicorn server over loopback sockets: idle and
trickling connections are closed, nothing else is (kept-alive connections, slow bodies' responses, streams).
That Serve's proxy really runs it is checked end to end in tests/cluster/test_hostile_clients.py."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn

from cluster.http_limits import HeadDeadlineProtocol
from cluster.redis_server import free_loopback_port

DEADLINE = 1.0
WAIT = 15.0
"""How long a test waits for the server to act (far beyond the deadline: only a connection left open forever
fails)."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:  # read the whole body, however slowly it comes
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    if scope["path"] == "/slow-stream":
        for _ in range(3):  # a response that outlives the head deadline
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(DEADLINE)
    await send({"type": "http.response.body", "body": b"ok\n"})


@pytest.fixture(scope="module")
def port():
    HeadDeadlineProtocol.head_timeout_s = DEADLINE
    port = free_loopback_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=HeadDeadlineProtocol,
                                           timeout_keep_alive=30, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(WAIT)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _response(s: socket.socket) -> bytes:
    """One complete response of the test app (chunked: it ends with the empty last chunk)."""
    out = b""
    while not out.endswith(b"0\r\n\r\n"):
        chunk = s.recv(65536)
        assert chunk, out
        out += chunk
    return out


GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def test_a_connection_that_sends_nothing_is_closed(port):
    with _connect(port) as s:
        assert _read_until_closed(s) == b""  # closed, silently: there was no request to answer


def test_a_trickled_head_gets_408_and_is_closed(port):
    with _connect(port) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n")
        for _ in range(int(3 * DEADLINE / 0.2)):  # keep trickling past the deadline
            try:
                s.sendall(b"x")
            except OSError:
                break
            time.sleep(0.2)
        reply = _read_until_closed(s)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), reply
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_requests_kept_alive_and_slow_bodies_are_left_alone(port):
    with _connect(port) as s:
        s.sendall(GET)
        assert b" 200 " in _response(s)
        time.sleep(2 * DEADLINE)  # idle between requests is the keep-alive timeout's business (30 s here)
        s.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\n")
        for byte in b"body":  # a body slower than the head deadline: the ingress bounds bodies, not the proxy
            time.sleep(DEADLINE / 2)
            s.sendall(bytes([byte]))
        assert b" 200 " in _response(s)


def test_a_long_streaming_response_is_not_cut(port):
    with _connect(port) as s:
        s.sendall(b"GET /slow-stream HTTP/1.1\r\nHost: t\r\n\r\n")
        reply = _response(s)
    assert reply.count(b"tick") == 3


def test_the_next_head_on_a_kept_alive_connection_has_a_deadline_too(port):
    with _connect(port) as s:
        s.sendall(GET)
        assert b" 200 " in _response(s)
        s.sendall(b"GET / HTTP/1.1\r\n")  # and never the rest
        assert _read_until_closed(s) == b""
