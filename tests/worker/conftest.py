"""Worker test fixtures: one test-sized model per session, engines around it, and a ``generate`` reference.

The test model (``make_model.TEST_SPEC``) goes through exactly the default model's build path but builds
in about a second, so equality tests can afford many slicings.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from worker import make_model

    return make_model.build_model(tmp_path_factory.mktemp("worker-models") / "tiny-llama", make_model.TEST_SPEC)


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from worker.hf_engine import load_model, set_cpu_threads

    set_cpu_threads(1)
    return load_model(model_dir)


@pytest.fixture(scope="session")
def ds_engine(model_dir):
    """One DeepSpeed engine per session (init_inference is the slow part); its KV store is cleared per use."""
    from worker.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine.from_pretrained(model_dir)


@pytest.fixture
def make_hf(hf_model):
    """Fresh HF engines (own KV stores) over the shared session model."""
    from worker.hf_engine import HFEngine

    return lambda **kw: HFEngine(hf_model, **kw)


@pytest.fixture
def reference(hf_model):
    """Greedy ``model.generate`` of one unpadded prompt: the ground truth every engine must reproduce."""
    import torch

    cache: dict = {}

    def ref(prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt), max_new_tokens)
        if key not in cache:
            ids = torch.tensor([prompt])
            out = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
            )
            cache[key] = out[0, len(prompt):].tolist()
        return cache[key]

    return ref


@pytest.fixture(scope="session")
def prompts():
    """Mixed-length prompts (3 to 60 tokens) with mixed budgets, reproducible."""
    import random

    rng = random.Random(7)
    lens = [3, 11, 25, 7, 60, 1, 18]
    budgets = [20, 6, 15, 25, 9, 12, 1]
    return [([rng.randrange(10, 1000) for _ in range(n)], b) for n, b in zip(lens, budgets)]
