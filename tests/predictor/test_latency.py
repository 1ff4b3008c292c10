"""Slice-time model: fitting, held-out accuracy on synthetic data, profile files, online refit under drift."""

from __future__ import annotations

import json

import numpy as np
import pytest

from balancer.estimators import BilinearLatencyModel, SliceTimeEstimator
from predictor.latency import (
    COEFFS,
    OnlineLatencyEstimator,
    Profile,
    Samples,
    SliceMeasurement,
    fit_bilinear,
    load_profile,
    read_profile,
    samples_from_slice_log,
    slice_features,
    slice_mape,
)
from predictor.profiler import Grid, profile

TRUE = BilinearLatencyModel(a=2e-6, b=1e-4, c=3e-6, d=5e-3, e=4e-8, f=2e-5, g=1e-7, h=3e-3)


def _synthetic(model, noise=0.0, seed=0, steps=8, sizes=(1, 2, 4, 8, 16, 32), lengths=(16, 64, 256, 1024)):
    rng = np.random.default_rng(seed)
    s = Samples()
    for n in sizes:
        for L in lengths:
            jitter = lambda: rng.lognormal(0.0, noise) if noise else 1.0  # noqa: E731
            s.add_slice(n, L, model.prefill_time(n, L) * jitter(),
                        [model.decode_step_time(n, L + j) * jitter() for j in range(steps)])
    return s


def test_fit_recovers_known_coefficients_exactly_without_noise():
    s = _synthetic(TRUE)
    for nonneg in (True, False):
        fit = fit_bilinear(s.prefill, s.decode, nonneg=nonneg)
        for k in COEFFS:
            assert getattr(fit, k) == pytest.approx(getattr(TRUE, k), rel=1e-4), k


def test_fit_with_noise_predicts_heldout_slices_within_5_percent():
    s = _synthetic(TRUE, noise=0.03, seed=1)
    fit = fit_bilinear(s.prefill, s.decode)
    rng = np.random.default_rng(7)
    held = []
    for _ in range(20):
        n, L = int(rng.integers(1, 33)), int(rng.integers(16, 1024))
        held.append(SliceMeasurement(n, L, 32, TRUE.prefill_time(n, L),
                                     [TRUE.decode_step_time(n, L + j) for j in range(32)]))
    assert slice_mape(fit, held) < 5.0
    # the measured total is the closed form's sum, so the true model itself has ~0 error
    assert slice_mape(TRUE, held) < 1e-6


def test_slice_log_refits_the_model_and_skips_prefills_of_resumed_batches():
    """Timings logged by a cluster refit the model; a prefill of a batch with resumed rows is left out (it
    was two forwards, not prefill(N, L)), while its decode steps still count."""
    from cluster.messages import SliceTiming

    rows = []
    for n in (1, 2, 4, 8, 16, 32):
        for L in (16, 64, 256, 1024):
            rows.append(SliceTiming(n, L, resumed_rows=0, prefill_time=TRUE.prefill_time(n, L),
                                    decode_step_times=[TRUE.decode_step_time(n, L + j) for j in range(8)]))
    rows.append(SliceTiming(8, 512, resumed_rows=3, prefill_time=99.0,
                            decode_step_times=[TRUE.decode_step_time(8, 512 + j) for j in range(4)]))
    samples = samples_from_slice_log(rows)
    assert len(samples.prefill) == 24 and len(samples.decode) == 24 * 8 + 4
    fit = fit_bilinear(samples.prefill, samples.decode)
    for k in COEFFS:
        assert getattr(fit, k) == pytest.approx(getattr(TRUE, k), rel=1e-4), k


def test_slice_features_match_closed_form():
    n, L, s = np.array([1, 3, 7]), np.array([10, 100, 5]), 13
    x = slice_features(n, L, s)
    theta = np.array([getattr(TRUE, k) for k in COEFFS])
    assert np.allclose(x @ theta, TRUE.batch_time(n, L, s))


def test_fit_needs_enough_samples():
    with pytest.raises(ValueError):
        fit_bilinear([(1, 1, 1.0)], [(1, 1, 1.0)])


def test_profile_round_trip(tmp_path):
    s = _synthetic(TRUE, steps=2, sizes=(1, 4), lengths=(8, 32))
    prof = Profile(model=TRUE, key={"model": "m", "engine": "hf", "hardware": {"device": "cpu"}}, samples=s,
                   heldout=[SliceMeasurement(2, 9, 2, 0.1, [0.01, 0.02])], metrics={"slice_mape_heldout": 3.2})
    path = prof.save(tmp_path / "p.json")
    assert load_profile(path) == TRUE
    back = read_profile(path)
    assert back.key == prof.key and back.samples == s and back.metrics == prof.metrics
    assert back.heldout[0].total == pytest.approx(0.13)
    assert load_profile(path, expect={"engine": "hf"}) == TRUE
    with pytest.raises(ValueError):
        load_profile(path, expect={"engine": "deepspeed"})
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError):
        read_profile(path)


def test_packaged_default_profile_loads():
    model = load_profile()
    assert isinstance(model, BilinearLatencyModel)
    assert all(getattr(model, k) >= 0 for k in COEFFS)
    assert model.batch_time(8, 256, 64) > model.batch_time(1, 256, 64) > 0
    assert read_profile().metrics["slice_mape_heldout"] <= 10.0


def _feed(est, model, rng, k, split=True):
    for _ in range(k):
        n, L, S = int(rng.integers(1, 33)), int(rng.integers(16, 1024)), 64
        pre = model.prefill_time(n, L)
        dec = [model.decode_step_time(n, L + j) for j in range(S)]
        if split:
            est.observe(n, L, S, pre + sum(dec), pre, dec)
        else:
            est.observe(n, L, S, pre + sum(dec))


@pytest.mark.parametrize("split", [True, False])
def test_online_estimator_follows_drift(split):
    rng = np.random.default_rng(0)
    prior = BilinearLatencyModel(*(v * 0.7 for v in TRUE.as_dict().values()))  # profile 30 % off
    est = OnlineLatencyEstimator(prior)
    assert isinstance(est, SliceTimeEstimator)
    points = [(n, L, 64) for n in (1, 8, 32) for L in (32, 500, 1000)]

    def worst(target):
        return max(abs(est.batch_time(*p) / target.batch_time(*p) - 1.0) for p in points)

    assert worst(TRUE) > 0.25  # starts off
    _feed(est, TRUE, rng, 100, split)
    assert worst(TRUE) < 0.03
    slow = BilinearLatencyModel(*(v * 2 for v in TRUE.as_dict().values()))  # the hardware halves its speed
    _feed(est, slow, rng, 10, split)
    assert worst(slow) > 0.1  # not there yet ...
    _feed(est, slow, rng, 150, split)
    assert worst(slow) < 0.03  # ... but follows
    assert est.batch_time(np.array([1, 2, 4]), 100, 64).shape == (3,)


def test_online_estimator_narrow_traffic_keeps_other_shapes_sane():
    # Only small batches are reported after a uniform 1.5x slowdown: large-batch estimates must still
    # move with the drift instead of staying at the prior.
    prior = TRUE
    est = OnlineLatencyEstimator(prior)
    slow = BilinearLatencyModel(*(v * 1.5 for v in TRUE.as_dict().values()))
    for _ in range(100):
        pre = slow.prefill_time(2, 100)
        dec = [slow.decode_step_time(2, 100 + j) for j in range(64)]
        est.observe(2, 100, 64, pre + sum(dec), pre, dec)
    assert est.drift == pytest.approx(1.5, rel=0.01)
    ratio = est.batch_time(32, 1000, 64) / slow.batch_time(32, 1000, 64)
    assert 0.8 < ratio < 1.2


def test_profiler_on_a_fake_runner_reports_heldout_mape():
    class Fake:
        calls = 0

        def run(self, n, length, steps):
            Fake.calls += 1
            return TRUE.prefill_time(n, length), [TRUE.decode_step_time(n, length + j) for j in range(steps)]

    grid = Grid(batch_sizes=(1, 4, 16), lengths=(16, 128, 512), decode_steps=4, heldout_points=5,
                heldout_steps=8, repeats=1, max_tokens=4096)
    prof = profile(Fake(), grid, key={"engine": "fake"}, progress=False)
    assert prof.metrics["heldout_points"] == 5
    assert prof.metrics["slice_mape_heldout"] < 0.1
    assert len(prof.samples.prefill) == len(grid.training_points()) == 8  # 16x512 > 4096 is skipped
    assert set(grid.heldout()).isdisjoint(grid.training_points())


def test_profiler_runs_a_real_tiny_model(tiny_model_dir):
    from predictor.profiler import HFForwardRunner, load_hf_model

    model = load_hf_model(str(tiny_model_dir))
    runner = HFForwardRunner(model)
    pre, dec = runner.run(2, 16, 3)
    assert pre > 0 and len(dec) == 3 and all(t > 0 for t in dec)
    grid = Grid(batch_sizes=(1, 4), lengths=(8, 32), decode_steps=4, heldout_points=2, heldout_steps=4,
                repeats=1)
    prof = profile(runner, grid, progress=False)
    assert all(getattr(prof.model, k) >= 0 for k in COEFFS)
    assert prof.metrics["slice_mape_heldout"] is not None


def test_online_estimator_takes_slice_results():
    from balancer.types import FinishReason, RequestOutcome, SliceResult

    est = OnlineLatencyEstimator(TRUE)
    slow = BilinearLatencyModel(*(v * 3 for v in TRUE.as_dict().values()))
    for i in range(120):
        n, L = 1 + i % 16, 50 + 7 * i
        pre = slow.prefill_time(n, L)
        dec = [slow.decode_step_time(n, L + j) for j in range(31)]
        res = SliceResult(batch_id=f"b{i}", replica_id="r0",
                          outcomes=[RequestOutcome(f"q{k}", 32, FinishReason.SLICE_END) for k in range(n)],
                          elapsed=pre + sum(dec), prefill_time=pre, decode_step_times=dec)
        est.observe_result(res, max_input_len=L)
    assert est.reports == 120
    assert est.batch_time(8, 300, 31) == pytest.approx(slow.batch_time(8, 300, 31), rel=0.03)
    est.observe(0, 10, 5, 1.0)  # empty batches and zero times are ignored
    est.observe(3, 10, 5, 0.0)
    assert est.reports == 120


def test_kv_reused_slices_only_teach_decode():
    # A slice that resumed from a kept KV cache reports a near-zero "prefill": it must not drag the
    # prefill coefficients down, while its decode steps still count.
    est = OnlineLatencyEstimator(TRUE)
    for i in range(60):
        n, L = 4 + i % 8, 200 + 5 * i
        dec = [TRUE.decode_step_time(n, L + j) for j in range(31)]
        est.observe(n, L, 31, 1e-4 + sum(dec), prefill_time=1e-4, decode_step_times=dec, kv_reused=True)
    assert est.reports == 60
    assert est.model.prefill_time(8, 300) == pytest.approx(TRUE.prefill_time(8, 300), rel=0.02)
    assert est.drift == pytest.approx(1.0, rel=0.01)
    est.observe(4, 100, 0, 1.0, prefill_time=0.0, decode_step_times=[], kv_reused=True)  # nothing to learn
    assert est.reports == 60
