"""End to end on vLLM replicas: Slicefleet's continuous slices with ``engine.backend: vllm`` (each worker replica
owns a vLLM engine in a child process), real Ray Serve, real Redis.

Outputs must equal one unsliced greedy run of the same vLLM engine, token for token, also when a worker is
killed mid-slice and its requests continue on the other replica. Skipped without the vLLM venv
(``SLICEFLEET_WITH_VLLM=1 scripts/setup.sh`` builds it; CI does).
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import pytest

from tests.cluster.test_e2e import PROMPTS, complete, serve_actor
from tests.cluster.test_e2e_continuous import start_cluster
from tests.worker.helpers import vllm_python_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def vllm_reference():
    """Greedy output of one unsliced run on a vLLM engine of its own (same model, same venv)."""
    from transformers import AutoTokenizer

    from worker.make_model import ensure_default_model
    from worker.protocol import SliceItem
    from worker.vllm_engine import VLLMEngine

    python = vllm_python_or_skip()
    path = ensure_default_model()
    eng = VLLMEngine(path, python=python, max_model_len=2048, max_concurrency=8, kv_cache_gib=1, cpu_bind="0")
    tok = AutoTokenizer.from_pretrained(path)
    cache: dict = {}

    def generate(prompt: str, max_tokens: int) -> list[int]:
        if (prompt, max_tokens) not in cache:
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
            (out,) = eng.run([SliceItem("ref", ids, len(ids), max_tokens)])
            cache[prompt, max_tokens] = out.new_token_ids
        return cache[prompt, max_tokens]

    yield generate
    eng.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, vllm_reference):
    c = start_cluster(tmp_path_factory, **{"engine.backend": "vllm"})
    yield c
    c.stop()


@pytest.fixture(scope="module")
def store(cluster):
    from cluster.state import StateStore

    return StateStore(cluster.cfg.redis.url, cluster.cfg.redis.key_prefix)


def _check(store, vllm_reference, jobs, responses):
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
    assert store.metrics_snapshot().get("mode") == "continuous_slices"


def test_a_killed_vllm_worker_loses_nothing(cluster, store, vllm_reference):
    import ray

    jobs = [(PROMPTS[i % len(PROMPTS)] + "." * (i // len(PROMPTS)), 64 - (i % 4) * 8) for i in range(10)]
    before = store.metrics_snapshot().get("replicas_lost", 0)
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(complete, cluster, *j) for j in jobs]
        deadline = time.monotonic() + 60
        while store.metrics_snapshot().get("tokens_generated", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        ray.kill(serve_actor("SliceWorker"), no_restart=True)
        responses = [f.result() for f in futures]
    _check(store, vllm_reference, jobs, responses)
    deadline = time.monotonic() + 30
    while store.metrics_snapshot().get("replicas_lost", 0) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.metrics_snapshot()["replicas_lost"] > before
