"""OpenAI-compatible request schemas, error bodies and response shapes for the REST ingress.

Requests are validated with pydantic in *strict* mode (``"5"`` is not an integer, ``1`` is not a bool), and
every failure becomes an OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}``.
Unknown fields are ignored (as vLLM does), so newer clients that send extra options keep working;
known-but-unsupported options with a non-default value (``n > 1``, ``logprobs``, ``echo``, ``best_of``,
``suffix``, ``logit_bias``, tools and functions, ``reasoning_effort``, a message ``name``) are refused with 400
naming them rather than silently ignored. Sampling follows vLLM: ``top_k``, ``min_p``, ``repetition_penalty``,
``presence_penalty``, ``frequency_penalty``, ``min_tokens``, ``stop_token_ids``.

Status codes (all error bodies share the shape above):

====  ==========================  ===========================  ==================================================
code  type                        code field                   when
====  ==========================  ===========================  ==================================================
400   invalid_request_error       invalid_json                 body is not JSON, not a JSON object, or nested
                                                               deeper than api.max_json_depth
400   invalid_request_error       invalid_type / missing /     schema errors (wrong type, missing field); OpenAI
                                  invalid_value                itself answers 400 here, so do we (never 422)
400   invalid_request_error       invalid_value                bad parameter values (max_tokens, temperature,
                                                               top_p, n, stop, empty prompt, batched prompts, ...)
400   invalid_request_error       context_length_exceeded      prompt + max_tokens longer than the model context
400   invalid_request_error       unsupported_parameter        known OpenAI options Slicefleet does not implement
401   invalid_request_error       invalid_api_key              api.api_keys set and the bearer key missing/wrong
403   permission_error            extension_not_allowed        priority / target_len / ignore_eos without an
                                                               admin key or api.scheduling_extensions
404   invalid_request_error       model_not_found              ``model`` is not the served model
404   invalid_request_error       not_found                    unknown route
405   invalid_request_error       method_not_allowed           wrong HTTP method on a known route
408   invalid_request_error       request_timeout              the body did not arrive within 30 s (the proxy
                                                               closes a connection whose head takes 30 s)
413   invalid_request_error       request_too_large            body over api.max_request_bytes (before reading it)
415   invalid_request_error       unsupported_media_type       Content-Type is not application/json
429   rate_limit_error            backlog_exceeded             predicted backlog > api.max_backlog_seconds
                                                               (with a ``Retry-After`` header, seconds)
429   rate_limit_error            too_many_requests            api.max_inflight requests already in flight
500   server_error                generation_failed            the request ended with finish_reason "error"
503   server_error                store_unavailable            Redis did not answer while accepting the request
503   server_error                no_replicas                  no worker replica is alive (``Retry-After: 5``)
503   server_error                request_cancelled            the cluster cancelled the request (not the client)
504   timeout                     request_timeout              no finish within api.request_timeout (cancelled)
====  ==========================  ===========================  ==================================================

Once a stream has started (status 200 sent), failures arrive as one SSE event ``data: {"error": {...}}``
followed by ``data: [DONE]``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error that becomes an OpenAI-style JSON error response."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


# ---- request models ------------------------------------------------------------------------------------


class _Req(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", protected_namespaces=())


class StreamOptions(_Req):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM: every chunk carries the usage so far."""


class _Common(_Req):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(None, description="Served model id; None: the configured model.")
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    max_completion_tokens: int | None = None
    """Chat only (it wins over max_tokens there); rejected on /v1/completions, which OpenAI defines without it."""
    # vLLM's sampling extensions.
    top_k: int | None = Field(None, description="Keep the k most likely tokens; 0 or -1 keeps all.")
    min_p: float | None = Field(None, description="Drop tokens below min_p times the top token's probability.")
    repetition_penalty: float | None = Field(None, description="> 1 discourages tokens of the prompt and output.")
    min_tokens: int | None = Field(None, description="No EOS or stop before this many output tokens.")
    stop_token_ids: list[int] | None = None
    # Extensions for benchmarks and scheduling.
    ignore_eos: bool = False
    target_len: int | None = Field(None, description="Trace mode: generate exactly this many tokens.")
    priority: int = 0


class CompletionRequest(_Common):
    prompt: Any = None
    """A string, a list of token ids, or a one-element list of either (checked by the ingress)."""
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Req):
    role: str
    content: Any = None
    name: str | None = None
    """Rejected when set: the chat template has no place for it."""


class ChatRequest(_Common):
    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None


def validation_error_to_api(exc: ValidationError) -> ApiError:
    """The first pydantic error as a 400 with the offending field as ``param``."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    if loc and loc[0] == "messages" and len(loc) >= 3:
        param = ".".join(loc[:3])
    else:
        param = loc[0] if loc else None
    kind = err.get("type", "")
    code = "missing" if kind == "missing" else ("invalid_type" if kind.endswith("_type") else "invalid_value")
    msg = err.get("msg", "invalid value")
    return bad_request(f"{param}: {msg}" if param else msg, param, code)


def parse_request(model: type[_Req], data: Any) -> Any:
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_api(exc) from None


# ---- response shapes -----------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, created: int, model: str, text: str, finish_reason: str | None,
                        prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_response(rid: str, created: int, model: str, text: str, finish_reason: str | None,
                  prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None = None,
                     with_usage_field: bool = False, usage_so_far: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage_field:
        chunk["usage"] = usage_so_far
    return chunk


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               with_usage_field: bool = False, usage_so_far: dict | None = None) -> dict:
    """``usage_so_far``: vLLM's ``continuous_usage_stats`` (else the field is null until the usage chunk)."""
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage_field:
        chunk["usage"] = usage_so_far
    return chunk


def usage_chunk(kind: str, rid: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, only usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_card(model: str, created: int, max_model_len: int | None = None) -> dict:
    """One model as ``GET /v1/models/{id}`` (``client.models.retrieve``) answers it."""
    card = {"id": model, "object": "model", "created": created, "owned_by": "slicefleet"}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


def models_response(model: str, created: int, max_model_len: int | None = None) -> dict:
    return {"object": "list", "data": [model_card(model, created, max_model_len)]}
