"""End to end in continuous slices: real Ray Serve deployments, a real Redis server, real engines.

The HF cluster checks every output against plain transformers ``generate``; tokens must stream before a slice
ends; a worker or the dispatcher killed mid-load loses nothing. The vLLM cluster (skipped without the vLLM
venv: ``SLICEFLEET_WITH_VLLM=1 scripts/setup.sh``) checks its outputs against one unsliced run of the same vLLM
engine, including after a worker is killed mid-slice.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.cluster.test_e2e import (MODEL, PROMPTS, SLICE, check_output, kill_a_worker_mid_slice,  # noqa: F401
                                    kill_the_dispatcher_mid_load, prompt_ids, reference, send_mixed)
from tests.cluster.test_e2e import start_cluster as start_e2e_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STREAM_EVERY = 2


def start_cluster(tmp_path_factory, **overrides):
    """The end-to-end cluster of test_e2e in continuous slices, streaming every ``STREAM_EVERY`` steps."""
    return start_e2e_cluster(tmp_path_factory, **{"scheduler.mode": "continuous_slices",
                                                  "engine.stream_every": STREAM_EVERY, **overrides})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def store(cluster):
    from cluster.stores.admin import AdminStore

    return AdminStore(cluster.cfg.redis.url, cluster.cfg.redis.key_prefix)


def test_concurrent_requests_match_generate_and_keep_their_rows(cluster, store, reference):
    jobs, responses = send_mixed(cluster, 16)
    served = set()
    for (prompt, max_tokens), resp in zip(jobs, responses):
        rid = check_output(store, reference, resp, prompt_ids(reference, prompt), max_tokens)
        rec = store.record(rid)
        assert rec.slices == -(-len(store.generated(rid)) // SLICE) or rec.finish_reason != "length"
        served.update(rec.replicas)
    assert len(served) == 2, served  # max-min spread the rows over both replicas


def test_tokens_stream_every_few_steps_not_per_slice(cluster, reference):
    chunks, arrivals = [], []
    with httpx.stream("POST", f"{cluster.url}/v1/completions", timeout=300,
                      json={"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 40, "stream": True,
                            "ignore_eos": True}) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[len("data: "):])
                arrivals.append(time.perf_counter())
    assert chunks[-1] == "[DONE]"
    bodies = [json.loads(c) for c in chunks[:-1]]
    content = [b for b in bodies if b["choices"] and b["choices"][0]["text"]]
    # 40 tokens in slices of 8 would be 5 chunks; streamed every 2 steps they come in far more.
    assert len(content) > 40 // SLICE * 2, len(content)


def test_killing_a_worker_mid_slice_loses_nothing(cluster, store, reference):
    kill_a_worker_mid_slice(cluster, store, reference)


def test_killing_the_dispatcher_mid_load_loses_nothing(cluster, store, reference):
    kill_the_dispatcher_mid_load(cluster, store, reference)
