"""From the store's output stream to text: incremental detokenization, stop strings, finish reasons.

:func:`relay` is the one generator of output events; the streaming response formats each event as an SSE
chunk and the non-streaming one folds them (:func:`collect`), so stop strings, finish reasons and token
counts are worked out in one place. No Ray and no app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

from cluster.stores.base import STORE_UNAVAILABLE
from cluster.stores.ingress import IngressStore

log = logging.getLogger(__name__)

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
"""Store finish reasons -> OpenAI's. ``cancelled`` and ``error`` become errors (503, 500)."""


class RelayTimeout(Exception):
    """The request's deadline passed before its finishing event."""


# ---- text assembly: incremental decoding and stop strings -----------------------------------------------


class TextAssembler:
    """Turns output token ids, slice by slice, into text deltas that are safe to send.

    Each ``feed`` decodes every token so far and returns the new suffix, holding back (a) a trailing
    U+FFFD (an incomplete UTF-8 sequence that the next tokens will complete) and (b) a tail that could be
    the start of a stop string. When a stop string appears the text is cut before it, ``stopped`` turns
    True and ``completion_tokens`` counts the tokens up to the one that completed the stop string.

    With ``min_tokens`` (vLLM's rule) a stop string counts only once it ends in the text of a token after
    the first ``min_tokens``.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str] | None = None, min_tokens: int = 0):
        self.decode = decode
        self.stops = [s for s in (stops or []) if s]
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.min_tokens = min_tokens
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._used_tokens: int | None = None
        self._floor: int | None = None if min_tokens > 0 else 0
        """Characters a stop string must end after: the text of the first ``min_tokens`` tokens."""

    @property
    def sent_text(self) -> str:
        return self.text[: self.sent]

    @property
    def completion_tokens(self) -> int:
        return self._used_tokens if self._used_tokens is not None else len(self.ids)

    def feed(self, new_ids: list[int], stop_token_last: bool = False) -> str:
        """``stop_token_last``: the last id is a stop token that ended the request. As in vLLM it counts as a
        completion token but adds no text."""
        if self.stopped:
            return ""
        before = len(self.ids)
        self.ids.extend(int(t) for t in new_ids)
        text = self.decode(self.ids[:-1] if stop_token_last and new_ids else self.ids)
        if self.stops and self._floor is None and len(self.ids) > self.min_tokens:
            self._floor = len(self.decode(self.ids[: self.min_tokens]))
        if self.stops and self._floor is not None:
            edge = max(self.sent, self._floor)
            hits = [(pos, s) for s in self.stops if (pos := text.find(s, max(0, edge - len(s) + 1))) >= 0]
            if hits:
                pos, stop = min(hits)
                end = max(pos, self.sent)  # never retract text already sent
                delta = text[self.sent:end]
                self.text, self.sent, self.stopped = text[:end], end, True
                self._used_tokens = self._tokens_covering(pos + len(stop), before)
                return delta
        self.text = text
        end = len(text)
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        if self.stops:
            end -= self._partial_stop_suffix(text[:end], self.sent)
        delta = text[self.sent:end]
        self.sent = end
        return delta

    def flush(self) -> str:
        """The generation ended: whatever was held back is final now, except the bytes of a character the
        budget cut in half (a trailing U+FFFD), which vLLM's detokenizer never emits either."""
        if self.stopped:
            return ""
        self.text = self.text[: max(len(self.text.rstrip("\ufffd")), self.sent)]
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

    def _partial_stop_suffix(self, text: str, floor: int) -> int:
        for k in range(min(self.max_stop - 1, len(text) - floor), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _tokens_covering(self, n_chars: int, start: int) -> int:
        for k in range(max(start, 1), len(self.ids) + 1):
            if len(self.decode(self.ids[:k])) >= n_chars:
                return k
        return len(self.ids)


def detokenizer(tokenizer) -> Callable[[list[int]], str]:
    return partial(tokenizer.decode, skip_special_tokens=True)


async def read_events(store: IngressStore, rid: str, deadline: float,
                      poll_seconds: float) -> AsyncIterator[tuple[list[int], str | None]]:
    """(new token ids, finish reason or None) per output event of ``{p}:out:{rid}``, until the finishing one;
    :class:`RelayTimeout` at ``deadline`` (``time.monotonic()``)."""
    last = "0"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RelayTimeout()
        try:
            entries = await store.read_output(rid, last, block_ms=min(remaining, poll_seconds) * 1000)
        except STORE_UNAVAILABLE as exc:
            # Redis restarting (it keeps the stream in its AOF): keep waiting until the deadline.
            log.warning("reading output of %s failed (%s); retrying", rid, exc)
            await asyncio.sleep(min(0.5, max(remaining, 0.0)))
            continue
        for eid, event in entries:
            last = eid
            yield event.tokens, event.finish_reason
            if event.finish_reason:
                return


async def relay(events: AsyncIterator[tuple[list[int], str | None]], asm: TextAssembler,
                stop_token_ids: list[int], *, cancel: Callable[[], Awaitable[None]],
                count: Callable[[int], None]) -> AsyncIterator[tuple[str, str | None]]:
    """(text delta, None) for each piece of text safe to send, then one (the held-back tail, store finish
    reason) to end. A stop string ends it with reason ``stop``, cancelling the request (``cancel``) when the
    generation had not finished by itself. ``count(n)``: n more tokens came."""
    async for tokens, reason in events:
        count(len(tokens))
        # As in vLLM a stop token that ended the request counts as a completion token but adds no text.
        stop_token_last = reason == "stop" and bool(tokens) and tokens[-1] in stop_token_ids
        delta = asm.feed(tokens, stop_token_last)
        if delta:
            yield delta, None
        if asm.stopped:
            if reason is None:
                await cancel()
            yield asm.flush(), "stop"
            return
        if reason:
            yield asm.flush(), reason
            return


async def collect(events: AsyncIterator[tuple[str, str | None]]) -> tuple[str, str]:
    """The non-streaming fold of :func:`relay`: (the whole text, store finish reason)."""
    text, reason = "", None
    async for delta, reason in events:
        text += delta
    if reason is None:
        raise RelayTimeout()  # unreachable: relay ends with a finish reason or raises
    return text, reason


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
