"""Ceiling of prompt-only length prediction: repeat pairs, agreement, bounds, Gaussian extrapolation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from predictor.ceiling import (
    embedding_neighbour_pairs,
    exact_repeat_pairs,
    gaussian_ceiling,
    normalise_prompt,
    pair_agreement,
    within_repeat_sigma,
)


def test_normalise_prompt_collapses_whitespace_and_case():
    assert normalise_prompt("  Explain\n quantum   Computing ") == "explain quantum computing"


def test_exact_repeat_pairs_skip_same_conversation_and_identical_responses():
    prompts = ["Hi there", "hi  there", "HI THERE", "hi there", "other"]
    convs = ["a", "b", "a", "c", "d"]
    responses = ["r1", "r2", "r3", "r2", "r4"]
    # (0, 2): same conversation; (1, 3): the same answer shared twice; (0, 4)...: different prompts.
    assert exact_repeat_pairs(prompts, convs, responses) == [(0, 1), (0, 3), (1, 2), (2, 3)]


def test_embedding_neighbour_pairs_threshold_and_blocks():
    emb = np.array([[1, 0], [0.999, 0.0447], [0, 1], [0.0447, 0.999]], dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pairs = embedding_neighbour_pairs(emb, ["a", "b", "c", "d"], ["1", "2", "3", "4"], cosine=0.99, block=3)
    assert pairs == [(0, 1), (2, 3)]
    assert embedding_neighbour_pairs(emb, ["a", "a", "c", "d"], ["1", "2", "3", "3"], cosine=0.99) == []


def test_pair_agreement_weights_each_record_once_and_bounds_bayes():
    lengths = [10, 20, 500, 30]  # median 100: short, short, long, short
    edges = [15, 100, 300, 1000]  # buckets 0, 1, 3, 1
    res = pair_agreement([(0, 1), (0, 2), (1, 3)], lengths, median=100, edges=edges)
    # Record 0: agrees with 1, not with 2 -> 0.5; record 1: 1.0; record 2: 0.0; record 3: 1.0.
    assert res["records"] == 4 and res["pairs"] == 3
    assert res["binary_agreement"] == pytest.approx(0.625)
    # ±1: 0-1 yes, 0-2 no, 1-3 yes -> same as binary here; exact: only 1-3 -> (0 + .5 + 0 + 1) / 4.
    assert res["bucket_pm1_agreement"] == pytest.approx(0.625)
    assert res["bucket_agreement"] == pytest.approx(0.375)
    assert res["binary_bayes_low"] == pytest.approx(0.625)
    assert res["binary_bayes_high"] == pytest.approx((1 + math.sqrt(1 - 2 * 0.375)) / 2)
    assert pair_agreement([], lengths, 100, edges)["pairs"] == 0


def test_within_repeat_sigma_recovers_the_noise():
    rng = np.random.default_rng(0)
    means = rng.normal(5, 1, 4000)
    a = np.expm1(means + rng.normal(0, 0.5, 4000))
    b = np.expm1(means + rng.normal(0, 0.5, 4000))
    lengths = np.concatenate([a, b])
    pairs = [(i, i + 4000) for i in range(4000)]
    assert within_repeat_sigma(pairs, lengths) == pytest.approx(0.5, rel=0.05)


def test_gaussian_ceiling_perfect_without_noise_and_chance_with_only_noise():
    rng = np.random.default_rng(1)
    lengths = np.expm1(rng.normal(5, 1, 5000))
    median = float(np.median(lengths))
    edges = [float(np.percentile(lengths, q)) for q in (25, 50, 75, 99)]
    sharp = gaussian_ceiling(lengths, 1e-3, median, edges)
    assert sharp["binary_acc"] > 0.99 and sharp["bucket_pm1_acc"] > 0.99
    # All variance is noise: every prompt looks the same, so binary accuracy is a coin toss at the median.
    blind = gaussian_ceiling(lengths, float(np.std(np.log1p(lengths))), median, edges)
    assert blind["explainable_share"] == pytest.approx(0.0, abs=1e-9)
    assert blind["binary_acc"] == pytest.approx(0.5, abs=0.02)
