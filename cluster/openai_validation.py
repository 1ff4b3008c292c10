"""Request validation and normalisation for the OpenAI endpoints, with OpenAI's and vLLM's conventions.

No Ray, no Redis, no app: every function takes what it checks against (the :class:`ModelLimits`, a tokenizer,
the body limits) and raises :class:`~cluster.openai_schema.ApiError` with an OpenAI-shaped body.

Defaults: ``model`` may be omitted (the served model); ``max_tokens`` defaults to 16 for completions (as
OpenAI) and to ``min(scheduler.max_gen_len, context - prompt)`` for chat; a default is shrunk to fit the
context, an explicit value that does not fit is a 400. ``temperature`` defaults to the model's generation
config (0, greedy, when it says ``do_sample: false``; else its temperature or 1). ``min_tokens`` means what
it means in vLLM: no EOS, stop token or stop string before that many tokens. ``max_completion_tokens`` wins
over ``max_tokens`` on chat, as in OpenAI. The trace-mode extension ``target_len`` generates exactly that
many tokens; with no ``max_tokens`` the budget becomes the target. Parameters this server cannot honour are
refused with a 400 that names them, never ignored.

Chat prompts without a chat template (fallback): ``BOS + "".join(f"{role}: {content}\\n\\n") + "assistant:"``.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

from cluster.openai_schema import ApiError, ChatRequest, bad_request

MAX_STOP_STRINGS = 16
MAX_PRIORITY = 1_000_000
"""Scheduling uses priorities as floats; 10**400 would overflow them."""
MAX_CHARS_PER_TOKEN = 64
"""A text longer than the context times this cannot fit, so it is refused without tokenizing it (seconds of
CPU for megabytes of text, during which other requests wait for the tokenizer)."""
DEFAULT_COMPLETION_MAX_TOKENS = 16
BODY_TIMEOUT_S = 30.0
"""How long a request body may take to arrive (408 beyond): a client trickling a body would otherwise hold its
slot forever. The proxy bounds the head the same way (:mod:`cluster.http_limits`)."""
CHAT_ROLES = {"system", "user", "assistant", "developer", "tool"}


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: the served model and the scheduler's generation bound."""

    model_name: str
    context_len: int
    vocab_size: int
    max_gen_len: int
    default_temperature: float


def check_common(req, kind: str, limits: ModelLimits) -> dict:
    """The parameters completions and chat share, normalised (defaults filled in, stop strings as a list)."""
    if req.model is not None and req.model != limits.model_name:
        raise ApiError(404, f"The model `{req.model}` does not exist (this server serves "
                       f"`{limits.model_name}`)", "invalid_request_error", "model", "model_not_found")
    if req.n != 1:
        raise bad_request("n must be 1 (one completion per request)", "n")
    if kind != "chat" and req.max_completion_tokens is not None:
        raise bad_request("max_completion_tokens is a chat parameter; /v1/completions takes max_tokens",
                          "max_completion_tokens", "unsupported_parameter")
    sampling = sampling_extras(req, limits.max_gen_len)
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    temperature = limits.default_temperature if req.temperature is None else req.temperature
    if not (0.0 <= temperature <= 2.0) or math.isnan(temperature):
        raise bad_request("temperature must be between 0 and 2", "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not (0.0 < top_p <= 1.0):
        raise bad_request("top_p must be greater than 0 and at most 1", "top_p")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
    if any(s == "" for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    stops = [checked_text(s, "stop", limits.context_len) for s in stops]
    stop_ids = list(req.stop_token_ids or [])
    if any(not (0 <= t < limits.vocab_size) for t in stop_ids):
        raise bad_request(f"stop_token_ids must be in [0, {limits.vocab_size})", "stop_token_ids")
    if req.seed is not None and not (-(2**63) <= req.seed < 2**64):
        raise bad_request("seed out of range", "seed")
    gmax = limits.max_gen_len
    target = req.target_len
    if target is not None and not (1 <= target <= gmax):
        raise bad_request(f"target_len must be between 1 and {gmax}", "target_len")
    max_tokens, param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:  # OpenAI and vLLM: it wins when both are sent
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    if max_tokens is not None and not (1 <= max_tokens <= gmax):
        raise bad_request(f"{param} must be between 1 and {gmax} (scheduler.max_gen_len), got {max_tokens}",
                          param)
    for name, value in (("target_len", target), ("min_tokens", sampling["min_tokens"] or None)):
        if value is not None and max_tokens is not None and value > max_tokens:
            raise bad_request(f"{name} ({value}) must not exceed {param} ({max_tokens})", name)
    return {"temperature": float(temperature), "top_p": float(top_p), "stops": stops, "stop_ids": stop_ids,
            "target": target, "max_tokens": max_tokens, "max_tokens_param": param, "sampling": sampling}


def check_extensions(req, allowed: bool) -> None:
    """The scheduling extensions (``priority``, ``target_len``, ``ignore_eos``) need ``allowed``."""
    used = [name for name, on in (("priority", req.priority != 0), ("target_len", req.target_len is not None),
                                  ("ignore_eos", req.ignore_eos)) if on]
    if used and not allowed:
        raise ApiError(403, f"{used[0]} is a scheduling extension: it needs an admin key (api.admin_keys) "
                       "or api.scheduling_extensions: true", "permission_error", used[0],
                       "extension_not_allowed")
    if not -MAX_PRIORITY <= req.priority <= MAX_PRIORITY:
        raise bad_request(f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}", "priority")


def sampling_extras(req, max_gen_len: int) -> dict:
    """vLLM's sampling knobs, checked with vLLM's ranges; absent ones take their neutral value."""
    def number(name: str, neutral: float, ok: Callable[[float], bool], rule: str) -> float:
        value = getattr(req, name)
        if value is None:
            return neutral
        if not math.isfinite(value) or not ok(value):
            raise bad_request(f"{name} must be {rule}, got {value}", name)
        return float(value)

    top_k = 0 if req.top_k is None else req.top_k
    if top_k < -1:
        raise bad_request(f"top_k must be 0 or -1 (disabled) or at least 1, got {top_k}", "top_k")
    min_tokens = 0 if req.min_tokens is None else req.min_tokens
    if not 0 <= min_tokens <= max_gen_len:
        raise bad_request(f"min_tokens must be between 0 and {max_gen_len}, got {min_tokens}", "min_tokens")
    return {
        "top_k": max(top_k, 0),
        "min_p": number("min_p", 0.0, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
        "repetition_penalty": number("repetition_penalty", 1.0, lambda v: v > 0.0, "greater than 0"),
        "presence_penalty": number("presence_penalty", 0.0, lambda v: -2.0 <= v <= 2.0, "in [-2, 2]"),
        "frequency_penalty": number("frequency_penalty", 0.0, lambda v: -2.0 <= v <= 2.0, "in [-2, 2]"),
        "min_tokens": min_tokens,
    }


def checked_text(text: str, param: str, context_len: int) -> str:
    """``text`` if it is valid Unicode and could fit the context; JSON's ``\\ud800`` escapes give lone
    surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid Unicode: a lone surrogate at character {exc.start}",
                          param) from None
    if len(text) > context_len * MAX_CHARS_PER_TOKEN:
        raise bad_request(f"This model's maximum context length is {context_len} tokens; {param} has "
                          f"{len(text)} characters, more than any {context_len} tokens could hold",
                          param, "context_length_exceeded")
    return text


def token_ids(value, param: str, vocab_size: int) -> list[int]:
    if not value:
        raise bad_request("prompt must not be empty", param)
    if any(isinstance(t, bool) or not isinstance(t, int) for t in value):
        raise bad_request("a token prompt must be a list of integers", param, "invalid_type")
    if any(not (0 <= t < vocab_size) for t in value):
        raise bad_request(f"token ids must be in [0, {vocab_size})", param)
    return list(value)


def check_completion_options(req) -> None:
    """OpenAI's completion options this server cannot honour, refused by name."""
    if req.echo:
        raise bad_request("echo is not supported", "echo", "unsupported_parameter")
    if req.logprobs is not None:
        raise bad_request("logprobs are not supported", "logprobs", "unsupported_parameter")
    if req.best_of not in (None, 1):
        raise bad_request("best_of must be 1", "best_of", "unsupported_parameter")
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix", "unsupported_parameter")


def completion_prompt(prompt, limits: ModelLimits) -> tuple[list[int] | None, str]:
    """(token ids, or None when the text still needs tokenizing; the text)."""
    if prompt is None:
        raise bad_request("prompt is required", "prompt", "missing")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise bad_request("batched prompts (a list of several prompts) are not supported: send one "
                              "request per prompt", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        return None, checked_text(prompt, "prompt", limits.context_len)
    if isinstance(prompt, list):
        ids = token_ids(prompt, "prompt", limits.vocab_size)
        return ids, ""
    raise bad_request("prompt must be a string or a list of token ids", "prompt", "invalid_type")


def chat_messages(req: ChatRequest, context_len: int) -> list[dict]:
    """The messages as ``{role, content}`` dicts with text content (refusing what a chat template cannot
    hold), after refusing the chat options this server cannot honour."""
    if not req.messages:
        raise bad_request("messages must not be empty", "messages")
    if req.logprobs or req.top_logprobs:
        raise bad_request("logprobs are not supported", "logprobs", "unsupported_parameter")
    if req.tools:
        raise bad_request("tools are not supported", "tools", "unsupported_parameter")
    # Tool and reasoning controls mean nothing without tools or a reasoning model: refuse them by name.
    for name in ("tool_choice", "parallel_tool_calls", "functions", "function_call", "reasoning_effort"):
        if getattr(req, name) is not None:
            raise bad_request(f"{name} is not supported (this server has no tools and no reasoning model)",
                              name, "unsupported_parameter")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {type: text} is supported", "response_format",
                          "unsupported_parameter")
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise bad_request(f"messages.{i}.role: unknown role {m.role!r}", f"messages.{i}.role")
        if m.name is not None:
            raise bad_request(f"messages.{i}.name is not supported: the chat template has no place for it",
                              f"messages.{i}.name", "unsupported_parameter")
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise bad_request(f"messages.{i}.content: only text parts are supported",
                                      f"messages.{i}.content", "unsupported_parameter")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad_request(f"messages.{i}.content must be a string or a list of text parts",
                              f"messages.{i}.content", "invalid_type")
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": checked_text(content, f"messages.{i}.content", context_len)})
    if not any(m["content"] for m in out):
        raise bad_request("messages must not all be empty", "messages")
    return out


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids of a chat: the tokenizer's chat template, or the documented fallback."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template may refuse a message order
            raise bad_request(f"the chat template rejected these messages: {exc}", "messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:"
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def token_budget(c: dict, prompt_len: int, kind: str, limits: ModelLimits) -> int:
    """``max_tokens`` for a prompt of ``prompt_len`` tokens (``c``: :func:`check_common`'s result): a default
    is shrunk to fit the context, an explicit value (or a ``target_len``) that does not fit is a 400."""
    if not prompt_len:
        raise bad_request("the prompt encodes to no tokens", "messages" if kind == "chat" else "prompt")
    room = limits.context_len - prompt_len
    max_tokens = c["max_tokens"]
    if max_tokens is None:  # a default: shrink it to fit
        gmax = limits.max_gen_len
        if c["target"] is not None:
            default = c["target"]
        else:
            default = gmax if kind == "chat" else min(DEFAULT_COMPLETION_MAX_TOKENS, gmax)
        max_tokens = min(default, room)
    if room < 1 or prompt_len + max_tokens > limits.context_len:
        raise bad_request(
            f"This model's maximum context length is {limits.context_len} tokens; the prompt has {prompt_len} "
            f"tokens and {max_tokens} more were requested", "messages" if kind == "chat" else "prompt",
            "context_length_exceeded")
    if c["target"] is not None and c["target"] > max_tokens:
        raise bad_request(f"target_len ({c['target']}) does not fit: at most {max_tokens} tokens fit after "
                          "this prompt", "target_len", "context_length_exceeded")
    return int(max_tokens)


# ---- the body ----------------------------------------------------------------------------------------------


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of ``raw``'s arrays and objects, counted without parsing (strings skipped)."""
    depth = deepest = 0
    for m in _JSON_BRACKETS.finditer(_JSON_STRING.sub(b'""', raw)):
        depth += 1 if m.group() in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


async def read_json(request: Request, max_bytes: int, max_depth: int) -> Any:
    """The body as JSON, refused before parsing when it is not JSON, too large or too deep.

    The checks come first because the parser is the weak point: a body nested a few thousand levels makes
    ``json.loads`` raise RecursionError, and a 50 MB body would be held in memory in full.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        # Browsers send text/plain and form posts cross-origin without a preflight: refusing them keeps a
        # web page from driving the API on behalf of whoever has it open.
        raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                       "invalid_request_error", None, "unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s ({size} bytes came)",
                       "invalid_request_error", None, "request_timeout") from None
    except ClientDisconnect:
        raise ApiError(499, "client closed the request", "client_closed", None, "client_closed") from None
    raw = b"".join(chunks)
    if json_depth(raw) > max_depth:
        raise bad_request(f"the request body nests deeper than {max_depth} levels", None, "invalid_json")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body exceeds {max_bytes} bytes (api.max_request_bytes)",
                    "invalid_request_error", None, "request_too_large")
