"""End to end: real Ray Serve deployments, a real Redis server, the real default model doing real forward
passes. One cluster for the module (start-up is the expensive part); every test checks outputs against
plain transformers ``generate`` on the same weights.

The cluster places batches round-robin: with the default cache-aware max-min a lone request rightly stays
on the replica that keeps its KV cache, and these tests need to see requests move between replicas.
Max-min itself is covered by the balancer's property tests, the simulator and tests/cluster/test_dispatcher.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
import time

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "slicefleet-tiny-llama"
SLICE = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from cluster.config import load_config
    from cluster.local import LocalCluster
    from cluster.redis_server import free_loopback_port

    cfg = load_config(None, {
        "api.port": free_loopback_port(),
        "api.scheduling_extensions": True,  # the tests drive ignore_eos and priorities
        "scheduler.mode": "scls",
        "scheduler.slice_len": SLICE,
        "scheduler.max_gen_len": 96,
        "scheduler.max_batch_size": 8,
        "replicas.num_replicas": 2,
        "replicas.num_cpus": 0.5,
        "scheduler.placement": "round_robin",
    })
    c = LocalCluster(cfg, redis_dir=tmp_path_factory.mktemp("redis"))
    c.start(timeout=600)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference():
    """Greedy continuation by plain transformers generate(), one request at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.make_model import ensure_default_model

    path = ensure_default_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cache: dict = {}

    def generate(prompt_ids: tuple[int, ...], max_tokens: int) -> list[int]:
        key = (prompt_ids, max_tokens)
        if key not in cache:
            with torch.no_grad():
                out = model.generate(torch.tensor([list(prompt_ids)]), max_new_tokens=max_tokens, do_sample=False,
                                     attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
            ids = out[0, len(prompt_ids):].tolist()
            eos = model.generation_config.eos_token_id
            eos = set(eos if isinstance(eos, list) else [eos])
            for i, t in enumerate(ids):
                if t in eos:
                    ids = ids[:i + 1]
                    break
            cache[key] = ids
        return cache[key]

    generate.tokenizer = tok
    return generate


@pytest.fixture(scope="module")
def store(cluster):
    from cluster.state import StateStore

    return StateStore(cluster.cfg.redis.url, cluster.cfg.redis.key_prefix)


PROMPTS = [
    "Hello there, how are you",
    "Write a short poem about the sea",
    "What is the capital of France?",
    "Explain slice-level scheduling in one paragraph",
    "List three prime numbers",
    "Translate 'good morning' into German",
    "def fibonacci(n):",
    "Once upon a time",
]


def complete(cluster, prompt, max_tokens, timeout=600):
    resp = httpx.post(f"{cluster.url}/v1/completions", timeout=timeout,
                      json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens})
    assert resp.status_code == 200, resp.text
    return resp


def check_output(store, reference, resp, prompt_ids, max_tokens):
    """The stored tokens equal generate()'s, exactly once (no token lost or doubled)."""
    rid = resp.json()["id"].split("-", 1)[1]  # "cmpl-<request id>"
    generated = store.generated(rid)
    expected = reference(tuple(prompt_ids), max_tokens)
    assert generated == expected, f"{rid}: {len(generated)} tokens vs {len(expected)} expected"
    body = resp.json()
    assert body["usage"]["completion_tokens"] == len(expected)
    assert body["choices"][0]["text"] == reference.tokenizer.decode(expected, skip_special_tokens=True)
    return rid


def prompt_ids(reference, prompt):
    return reference.tokenizer(prompt, add_special_tokens=True)["input_ids"]


def test_completion_matches_generate(cluster, store, reference):
    resp = complete(cluster, PROMPTS[0], 20)
    rid = check_output(store, reference, resp, prompt_ids(reference, PROMPTS[0]), 20)
    rec = store.record(rid)
    assert rec.status == "done" and rec.slices == 3  # 20 tokens in slices of 8
    # Its slices ran on both replicas, one after another, and the output is still exactly generate()'s.
    assert len(rec.replicas) == 3 and len(set(rec.replicas)) == 2, rec.replicas


def test_chat_and_streaming(cluster, reference):
    tok = reference.tokenizer
    messages = [{"role": "user", "content": "Say something nice"}]
    resp = httpx.post(f"{cluster.url}/v1/chat/completions", timeout=300,
                      json={"model": MODEL, "messages": messages, "max_tokens": 24})
    assert resp.status_code == 200, resp.text
    from cluster.ingress import render_chat

    ids = render_chat(tok, messages)
    expected = reference(tuple(ids), 24)
    assert resp.json()["choices"][0]["message"]["content"] == tok.decode(expected, skip_special_tokens=True)

    chunks = []
    with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=300,
                      json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 30, "stream": True}) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[len("data: "):])
    assert chunks[-1] == "[DONE]"
    bodies = [json.loads(c) for c in chunks[:-1]]
    text = "".join(b["choices"][0]["text"] for b in bodies if b["choices"])
    expected = reference(tuple(prompt_ids(reference, PROMPTS[1])), 30)
    assert text == tok.decode(expected, skip_special_tokens=True)
    assert len([b for b in bodies if b["choices"] and b["choices"][0]["text"]]) >= 2  # sent as slices finished


def send_mixed(cluster, n):
    """``n`` concurrent completions of mixed prompts and lengths: (jobs, responses)."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), 8 + (i * 7) % 80) for i in range(n)]
    with cf.ThreadPoolExecutor(n) as pool:
        return jobs, list(pool.map(lambda j: complete(cluster, *j), jobs))


def test_twenty_concurrent_requests_of_mixed_lengths(cluster, store, reference):
    jobs, responses = send_mixed(cluster, 20)
    served = set()
    for (prompt, max_tokens), resp in zip(jobs, responses):
        rid = check_output(store, reference, resp, prompt_ids(reference, prompt), max_tokens)
        served.update(store.record(rid).replicas)
    # Round-robin spread the slices over both replicas. (Whether one given request changes replica under
    # concurrent load depends on how many batches each round places, so the move itself is shown where it is
    # certain: test_completion_matches_generate.)
    assert len(served) == 2, served


def test_openai_client(cluster, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=300)
    assert MODEL in [m.id for m in client.models.list().data]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16)
    expected = reference(tuple(prompt_ids(reference, PROMPTS[2])), 16)
    assert out.choices[0].text == reference.tokenizer.decode(expected, skip_special_tokens=True)
    chat = client.chat.completions.create(model=MODEL, max_tokens=12,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 12 or \
        chat.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=16, stream=True) if c.choices]
    assert "".join(pieces) == out.choices[0].text


def serve_actor(kind: str):
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if f"#{kind}#" in a["name"]]
    assert names, f"no {kind} replica actor found"
    return ray.get_actor(names[0], namespace="serve")


def run_load_and(cluster, store, reference, action, n=12, max_tokens=64):
    """Send ``n`` requests at once; run ``action`` while they are in flight; check every output."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + "!" * (i // len(PROMPTS)), max_tokens - (i % 4) * 8) for i in range(n)]
    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(complete, cluster, *j) for j in jobs]
        deadline = time.monotonic() + 60
        while store.metrics_snapshot().get("tokens_generated", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until slices are really running
        action()
        responses = [f.result() for f in futures]
    for (prompt, max_tokens), resp in zip(jobs, responses):
        check_output(store, reference, resp, prompt_ids(reference, prompt), max_tokens)
    return responses


def kill_a_worker_mid_slice(cluster, store, reference):
    """Kill one worker replica under load: every output is still exact, and the replica is seen as lost."""
    import ray

    before = store.metrics_snapshot().get("replicas_lost", 0)
    run_load_and(cluster, store, reference, lambda: ray.kill(serve_actor("SliceWorker"), no_restart=True))
    deadline = time.monotonic() + 30
    while store.metrics_snapshot().get("replicas_lost", 0) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.metrics_snapshot()["replicas_lost"] > before
    cluster.wait_healthy(300)  # Serve replaces the replica


def kill_the_dispatcher_mid_load(cluster, store, reference):
    """Kill the dispatcher under load: a new one takes over from Redis and every output is still exact."""
    import ray

    epoch = store.epoch()
    run_load_and(cluster, store, reference, lambda: ray.kill(serve_actor("Dispatcher"), no_restart=True))
    assert store.epoch() > epoch  # a new dispatcher took over and rebuilt from Redis
    cluster.wait_healthy(300)


def test_killing_a_worker_mid_slice_loses_nothing(cluster, store, reference):
    kill_a_worker_mid_slice(cluster, store, reference)


def test_killing_the_dispatcher_mid_load_loses_nothing(cluster, store, reference):
    kill_the_dispatcher_mid_load(cluster, store, reference)


def test_restarting_redis_mid_load_loses_nothing(cluster, store, reference):
    def restart():
        time.sleep(0.3)
        cluster.redis.restart()

    run_load_and(cluster, store, reference, restart, n=8)
    cluster.wait_healthy(120)
