"""End to end on vLLM replicas: Slicefleet's continuous slices with ``engine.backend: vllm`` (each worker replica
owns a vLLM engine in a child process), real Ray Serve, real Redis.

Outputs must equal one unsliced greedy run of the same vLLM engine (a vLLM OpenAI server of the same model, which
is also the peer of the openai-client comparisons), token for token, also when a worker is
killed mid-slice and its requests continue on the other replica. Skipped without the vLLM venv
(``SLICEFLEET_WITH_VLLM=1 scripts/setup.sh`` builds it; CI does).
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from tests.cluster.test_e2e import MODEL, PROMPTS, complete, serve_actor
from tests.cluster.test_e2e_continuous import start_cluster
from tests.worker.helpers import vllm_python_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def vllm_peer(tmp_path_factory):
    """A vLLM OpenAI server of the same model (same venv): the unsliced reference and the peer the official
    openai client compares against. Started first, so the cluster's vLLM children start beside it."""
    from bench.vllm_peer import start_servers, stop_servers
    from cluster.redis_server import free_loopback_port
    from worker.make_model import ensure_default_model

    venv = vllm_python_or_skip().parent.parent
    procs, urls = start_servers(venv, ensure_default_model(), 1, MODEL, base_port=free_loopback_port(),
                                log_dir=tmp_path_factory.mktemp("vllm-peer"), timeout=600)
    yield urls[0]
    stop_servers(procs)


@pytest.fixture(scope="module")
def vllm_reference(vllm_peer):
    """Greedy token ids of one unsliced vLLM run per (prompt, max_tokens), from the peer server (vLLM's
    ``return_token_ids``); ``prefetch`` asks for many at once, as the server batches them."""
    cache: dict = {}

    def one(job):
        prompt, max_tokens = job
        resp = httpx.post(f"{vllm_peer}/v1/completions", timeout=600,
                          json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                "return_token_ids": True})
        resp.raise_for_status()
        return resp.json()["choices"][0]["token_ids"]

    def prefetch(jobs):
        todo = [j for j in dict.fromkeys(jobs) if j not in cache]
        with cf.ThreadPoolExecutor(max(1, len(todo))) as pool:
            cache.update(zip(todo, pool.map(one, todo)))

    def generate(prompt: str, max_tokens: int) -> list[int]:
        prefetch([(prompt, max_tokens)])
        return cache[prompt, max_tokens]

    generate.prefetch = prefetch
    return generate


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, vllm_peer):
    c = start_cluster(tmp_path_factory, **{"engine.backend": "vllm"})
    yield c
    c.stop()


@pytest.fixture(scope="module")
def store(cluster):
    from cluster.stores.admin import AdminStore

    return AdminStore(cluster.cfg.redis.url, cluster.cfg.redis.key_prefix)


def _check(store, vllm_reference, jobs, responses):
    vllm_reference.prefetch(jobs)
    for (prompt, max_tokens), resp in zip(jobs, responses):
        rid = resp.json()["id"].split("-", 1)[1]
        assert store.generated(rid) == vllm_reference(prompt, max_tokens), rid
        assert resp.json()["usage"]["completion_tokens"] == len(vllm_reference(prompt, max_tokens))


def test_vllm_replicas_match_an_unsliced_vllm_run(cluster, store, vllm_reference):
    jobs = [(PROMPTS[i % len(PROMPTS)] + "?" * (i // len(PROMPTS)), 16 + (i * 11) % 80) for i in range(12)]
    with cf.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda j: complete(cluster, *j), jobs))
    _check(store, vllm_reference, jobs, responses)
    slices = [store.record(r.json()["id"].split("-", 1)[1]).slices for r in responses]
    assert max(slices) > 1  # long requests really ran several slices (leases) on their engine
    assert store.metrics_snapshot().mode == "continuous_slices"


def test_a_killed_vllm_worker_loses_nothing(cluster, store, vllm_reference):
    import ray

    jobs = [(PROMPTS[i % len(PROMPTS)] + "." * (i // len(PROMPTS)), 64 - (i % 4) * 8) for i in range(10)]
    before = store.metrics_snapshot().replicas_lost
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(complete, cluster, *j) for j in jobs]
        deadline = time.monotonic() + 60
        while store.metrics_snapshot().tokens_generated == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        ray.kill(serve_actor("SliceWorker"), no_restart=True)
        responses = [f.result() for f in futures]
    _check(store, vllm_reference, jobs, responses)
    deadline = time.monotonic() + 30
    while store.metrics_snapshot().replicas_lost <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.metrics_snapshot().replicas_lost > before


# ---- the official openai client, against Slicefleet and against a vLLM server of the same model ----------


@pytest.fixture(scope="module")
def clients(cluster, vllm_peer):
    """(Slicefleet's client, the vLLM server's client): the same request must get the same answer from both."""
    openai = pytest.importorskip("openai")
    sf = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=600)
    peer = openai.OpenAI(base_url=f"{vllm_peer}/v1", api_key="unused", max_retries=0, timeout=600)
    return sf, peer


def _both(clients, **kw):
    kw.setdefault("temperature", 0)
    return [c.completions.create(model=MODEL, **kw) for c in clients]


def _same(a, b):
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].finish_reason == b.choices[0].finish_reason
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (b.usage.prompt_tokens, b.usage.completion_tokens)


def test_models_retrieve_gives_vllms_model_card(clients):
    """vLLM 0.32 has no GET /v1/models/{id} (it answers 404); OpenAI has, and its client's ``retrieve`` calls it.
    Slicefleet answers it with the card vLLM lists under /v1/models."""
    import openai

    sf, peer = clients
    (listed,) = peer.models.list().data
    card = sf.models.retrieve(MODEL)
    assert (card.id, card.object, card.max_model_len) == (listed.id, listed.object, listed.max_model_len)
    assert [m.id for m in sf.models.list().data] == [listed.id]
    with pytest.raises(openai.NotFoundError):
        sf.models.retrieve("no-such-model")


def test_min_tokens_via_extra_body_as_vllm(clients, vllm_reference):
    """The prompt's own first greedy token is made a stop token: without min_tokens both stop at once."""
    prompt = PROMPTS[1]
    first = vllm_reference(prompt, 4)[0]
    bare = _both(clients, prompt=prompt, max_tokens=12, extra_body={"stop_token_ids": [first]})
    _same(*bare)
    assert bare[0].usage.completion_tokens == 1 and bare[0].choices[0].finish_reason == "stop"
    floor = _both(clients, prompt=prompt, max_tokens=12, extra_body={"stop_token_ids": [first], "min_tokens": 6})
    _same(*floor)
    assert floor[0].usage.completion_tokens >= 6


def test_top_k_as_vllm(clients):
    greedy = _both(clients, prompt=PROMPTS[2], max_tokens=20, temperature=0)
    top1 = _both(clients, prompt=PROMPTS[2], max_tokens=20, temperature=1.0, seed=3, extra_body={"top_k": 1})
    _same(*top1)
    _same(top1[0], greedy[0])


def test_repetition_penalty_as_vllm(clients):
    plain = _both(clients, prompt=PROMPTS[1], max_tokens=40, temperature=0)
    penalised = _both(clients, prompt=PROMPTS[1], max_tokens=40, temperature=0,
                      extra_body={"repetition_penalty": 1.8})
    _same(*penalised)
    assert penalised[0].choices[0].text != plain[0].choices[0].text  # the penalty changed the output


def test_stream_include_usage_as_vllm(clients):
    got = []
    for c in clients:
        text, usage = "", None
        for chunk in c.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=24, temperature=0, stream=True,
                                          stream_options={"include_usage": True}):
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                assert usage is None  # exactly one usage chunk
                usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        got.append((text, usage))
    assert got[0] == got[1] and got[0][1][1] == 24


def test_chat_max_completion_tokens_wins_as_vllm(clients):
    answers = [c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                         max_tokens=30, max_completion_tokens=7, temperature=0) for c in clients]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage.completion_tokens == answers[1].usage.completion_tokens <= 7
