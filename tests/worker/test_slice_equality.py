"""The key correctness property: cutting a request into slices changes nothing.

Greedy output of a request served in k slices (re-batched with different neighbours and on different
engines every slice) equals one unsliced ``model.generate`` of that request alone, for every backend.
"""

from __future__ import annotations

import random

import pytest

from balancer.types import FinishReason
from tests.worker.helpers import Req, run_sliced


def _reqs(prompts):
    return [Req(f"r{i}", p, b) for i, (p, b) in enumerate(prompts)]


def _check_against_reference(reqs, reference, eos_ids):
    for r in reqs:
        ref = reference(r.prompt, r.budget)
        assert r.generated == ref, f"{r.rid} (prompt {len(r.prompt)}, {r.slices} slices) diverged from generate"
        expected = FinishReason.EOS if ref and ref[-1] in eos_ids else FinishReason.LENGTH
        assert r.reason is expected


@pytest.mark.parametrize("slice_len", [1, 2, 5, None])
@pytest.mark.parametrize("kv_reuse", [False, True])
@pytest.mark.parametrize("preallocate_steps", [256, 0], ids=["preallocated", "grown"])
def test_hf_sliced_equals_generate(make_hf, reference, prompts, slice_len, kv_reuse, preallocate_steps):
    """Both ways a slice's cache can grow: written in place into a buffer allocated for the whole slice, or
    concatenated step by step (runs longer than ``preallocate_steps``, DeepSpeed's injected kernels)."""
    engines = [make_hf(kv_reuse=kv_reuse, preallocate_steps=preallocate_steps) for _ in range(2)]
    reqs = _reqs(prompts)
    results = run_sliced(engines, reqs, slice_len, seed=slice_len or 0)
    _check_against_reference(reqs, reference, engines[0].eos_token_ids)
    if slice_len is not None:
        assert max(r.slices for r in reqs) > 1  # really sliced
    reused = [o.kv_reused for res in results for o in res.outputs]
    if kv_reuse and slice_len is not None:
        assert any(reused), "two engines and many slices: some slice must have found its cache"
        # a row that resumed from its cache prefilled nothing again
        assert any(res.kv_reused and res.reprefill_tokens == 0 for res in results)
    else:
        assert not any(reused)
    if not kv_reuse and slice_len is not None:
        assert any(res.reprefill_tokens > 0 for res in results)


@pytest.mark.parametrize("slice_len", [1, 4, None])
def test_deepspeed_cpu_sliced_equals_generate(ds_engine, reference, prompts, slice_len):
    import deepspeed

    assert isinstance(ds_engine.ds_engine, deepspeed.InferenceEngine)
    assert ds_engine.runner.forward_fn is ds_engine.ds_engine  # forwards really go through DeepSpeed
    assert not ds_engine.kernel_inject
    ds_engine.store.clear()
    reqs = _reqs(prompts)
    results = run_sliced([ds_engine], reqs, slice_len, seed=3)
    _check_against_reference(reqs, reference, ds_engine.eos_token_ids)
    if slice_len is not None:
        assert any(res.kv_reused for res in results)


@pytest.mark.parametrize("cap", [1, 3, 16])
@pytest.mark.parametrize("growth", [64, 2])
@pytest.mark.parametrize("lanes", [1, 3])
def test_continuous_batching_equals_generate(hf_model, reference, prompts, cap, growth, lanes, monkeypatch):
    """``growth`` 2: the running batch outgrows its preallocated room every other step and is moved.
    ``lanes`` 3 with no padding allowed: every group of a different length decodes in a lane of its own, up to 3."""
    from worker import continuous
    from worker.continuous import ContinuousBatchingEngine
    from worker.protocol import SliceItem

    monkeypatch.setattr(continuous, "GROWTH", growth)
    eng = ContinuousBatchingEngine(hf_model, max_concurrency=cap, max_lanes=lanes,
                                   lane_pad_tokens=0 if lanes > 1 else continuous.LANE_PAD_TOKENS)
    most_lanes = 0
    rng = random.Random(cap)
    pending = list(enumerate(prompts))
    got = {}
    steps = 0
    while pending or eng.has_work():
        # arrivals at arbitrary steps, sometimes several at once
        for _ in range(rng.choice([0, 0, 1, 2])):
            if pending:
                i, (p, b) = pending.pop(0)
                eng.add(SliceItem(f"r{i}", p, len(p), b))
        for out in eng.step():
            assert out.finish_reason.is_final
            got[out.request_id] = out
        most_lanes = max(most_lanes, len(eng.lanes))
        assert eng.num_running <= cap and len(eng.lanes) <= lanes
        steps += 1
        assert steps < 10_000
    assert len(got) == len(prompts)
    for i, (p, b) in enumerate(prompts):
        assert got[f"r{i}"].new_token_ids == reference(p, b), f"r{i} diverged under continuous batching"
    assert 1 <= eng.stats.max_running <= cap
    if cap > 1:
        assert eng.stats.max_running > 1  # requests really shared iterations
    assert eng.stats.generated_tokens == sum(len(o.new_token_ids) for o in got.values())
    assert eng.stats.prefill_steps >= 1 and eng.stats.decode_steps >= 1
    if lanes > 1 and cap > 1:
        assert most_lanes > 1  # rows of different lengths really decoded in separate lanes
    if lanes == 1 and cap == 3:
        assert eng.stats.slot_fills > 0  # newcomers really took over the slots of rows that had left


def test_continuous_batching_finished_leave_at_once(hf_model):
    """A short request leaves the batch the step it finishes; the long one keeps running alone."""
    from worker.continuous import ContinuousBatchingEngine
    from worker.protocol import SliceItem

    eng = ContinuousBatchingEngine(hf_model, max_concurrency=4)
    eng.add(SliceItem("short", [5, 6, 7], 3, 2, eos_token_ids=()))
    eng.add(SliceItem("long", [8, 9, 10, 11, 12], 5, 10, eos_token_ids=()))
    assert eng.step() == [] and eng.num_running == 2  # prefill: one token each
    done = eng.step()  # decode: short has its 2nd token and leaves
    assert [o.request_id for o in done] == ["short"] and len(done[0].new_token_ids) == 2
    assert eng.num_running == 1
    outs = []
    while eng.has_work():
        outs += eng.step()
    assert [o.request_id for o in outs] == ["long"] and len(outs[0].new_token_ids) == 10
    assert outs[0].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("slice_len", [1, 3, 8])
def test_continuous_slices_with_moves_equal_generate(hf_model, reference, prompts, slice_len):
    """Continuous slices as a replica runs them: rows keep running across slice boundaries, and at some
    boundaries a request is aborted on one engine and re-added (its history so far) on the other."""
    from worker.continuous import ContinuousBatchingEngine
    from worker.protocol import SliceItem

    engines = [ContinuousBatchingEngine(hf_model, max_concurrency=4) for _ in range(2)]
    rng = random.Random(slice_len)
    where: dict[str, int] = {}
    history: dict[str, list[int]] = {}  # tokens generated before the current engine took the request
    got: dict[str, list[int]] = {}
    moves = 0
    for i, (p, b) in enumerate(prompts):
        rid = f"r{i}"
        where[rid], history[rid] = i % 2, []
        engines[i % 2].add(SliceItem(rid, p, len(p), b))
    budgets = {f"r{i}": b for i, (_, b) in enumerate(prompts)}
    for _ in range(10_000):
        if not any(e.has_work() for e in engines):
            break
        for k, eng in enumerate(engines):
            for out in eng.step():
                got[out.request_id] = history[out.request_id] + out.new_token_ids
            for rid, toks in list(eng.produced().items()):
                if toks and len(toks) % slice_len == 0 and rng.random() < 0.3:  # a boundary, and a move
                    assert eng.abort(rid) and rid not in eng.produced()
                    history[rid] += list(toks)
                    i = int(rid[1:])
                    p = prompts[i][0]
                    where[rid] = 1 - k
                    engines[1 - k].add(SliceItem(rid, p + history[rid], len(p), budgets[rid] - len(history[rid])))
                    moves += 1
    assert moves > 0
    for i, (p, b) in enumerate(prompts):
        assert got[f"r{i}"] == reference(p, b), f"r{i} diverged across moves"
    assert not any(e.has_work() for e in engines)

