"""Shared fixtures for predictor tests: a tiny model built once per session, and a private cache dir."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A test-sized Llama + BPE tokenizer built with the worker's own ``make-model`` path."""
    make_model = pytest.importorskip("worker.make_model")
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    return make_model.build_model(out, make_model.TEST_SPEC)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))
