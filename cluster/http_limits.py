"""A deadline for a request's head on Ray Serve's HTTP proxy, which Serve has no setting for.

Serve's proxy runs uvicorn, and uvicorn times out nothing while a request arrives: ``keep_alive_timeout_s``
only runs between a response and the next request, and every byte received disarms it. A client that opens a
connection and sends nothing, or trickles a request head a byte at a time (Slowloris), holds its socket and a
file descriptor for as long as it likes (measured here: 20 such sockets and 200 idle ones still open after
100 s). Middleware cannot help, since it runs only once the head is parsed; a reverse proxy in front can (nginx's
``client_header_timeout``), and :mod:`cluster.local` does it in process for ``slicefleet serve``.

:func:`install` is a Serve HTTP-proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): it runs in the
proxy's process before its server starts and points uvicorn's default ``auto`` protocol at
:class:`HeadDeadlineProtocol`, uvicorn's own protocol class with one timer added: from the moment a connection
opens (or the next request's first byte arrives on a kept-alive one) its head must be complete within
``$SLICEFLEET_HTTP_HEAD_TIMEOUT_S`` seconds (default 30), else the connection is closed, with a 408 and an
OpenAI-shaped error body when part of a first request had arrived. Bodies are the ingress's business
(``cluster.openai_validation.BODY_TIMEOUT_S``); a streaming response is never cut, the timer stops when the head is in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("slicefleet.http_limits")

HEAD_TIMEOUT_ENV = "SLICEFLEET_HTTP_HEAD_TIMEOUT_S"
DEFAULT_HEAD_TIMEOUT_S = 30.0
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = f"{__name__}:install"


def head_timeout_s() -> float:
    return float(os.environ.get(HEAD_TIMEOUT_ENV) or DEFAULT_HEAD_TIMEOUT_S)


def timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": {"message": f"the request head did not arrive within {seconds:g} s",
                                 "type": "invalid_request_error", "param": None, "code": "request_timeout"}})
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body.encode()))


class HeadDeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol (httptools or h11, whichever uvicorn picks) with a deadline for each head.

    Both implementations set ``self.cycle`` to a new request/response cycle once a head is parsed, so a
    changed ``cycle`` is the signal that the head is in; ``cycle`` is None before the first request."""

    head_timeout_s = DEFAULT_HEAD_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_cycle = None
        self._head_bytes = 0
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_head_deadline()  # the next request on a kept-alive connection begins
        self._head_bytes += len(data)
        super().data_received(data)
        if self._head_timer is not None and self.cycle is not self._head_cycle:
            self._disarm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._head_cycle, self._head_bytes = self.cycle, 0
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None and self._head_bytes:
            # Part of a first request came: say why. Later on a kept-alive connection the bytes may be the
            # rest of a body already refused, where a second response would be garbage on the wire.
            self.transport.write(timeout_response(self.head_timeout_s))
        self.transport.close()


def install() -> list:
    """The Serve HTTP-proxy callback: serve every connection with :class:`HeadDeadlineProtocol`.

    Returns the (no) extra middlewares Serve expects of a proxy callback."""
    import uvicorn.config

    HeadDeadlineProtocol.head_timeout_s = head_timeout_s()
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeadDeadlineProtocol"
    log.info("HTTP proxy: a request head must arrive within %g s", HeadDeadlineProtocol.head_timeout_s)
    return []
