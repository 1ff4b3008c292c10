"""Stopping rules, trace mode, seeded sampling, KV-reuse bookkeeping and the result accounting."""

from __future__ import annotations

import pytest

from balancer.types import FinishReason, SliceResult
from tests.worker.helpers import Req, run_sliced
from worker.protocol import EngineSliceResult, SamplingParams, SliceItem

PROMPT = [17, 42, 99, 3, 250, 8]


def test_stop_token_ends_row_and_others_continue(make_hf, reference):
    """A stop id ends its row (token included); the batch goes on for the others, counting invalid work."""
    eng = make_hf(kv_reuse=False)
    ref = reference(PROMPT, 12)
    stop = ref[3]
    first = ref.index(stop)  # the first occurrence is where it must stop
    other = [5, 6, 7, 8]
    res = eng.run_slice(
        [SliceItem("a", PROMPT, len(PROMPT), 12, stop_token_ids=(stop,)), SliceItem("b", other, 4, 12)], 12
    )
    a, b = res.outputs
    assert a.new_token_ids == ref[: first + 1] and a.finish_reason is FinishReason.STOP
    assert b.new_token_ids == reference(other, 12) and b.finish_reason is FinishReason.LENGTH
    assert res.invalid_tokens == 12 - (first + 1)  # decode positions row a computed after it stopped
    assert len(res.decode_step_times) == 11
    assert res.pad_tokens == len(PROMPT) - len(other)


def test_eos_from_item_and_stop_early_when_all_done(make_hf, reference):
    eng = make_hf()
    ref = reference(PROMPT, 10)
    res = eng.run_slice([SliceItem("a", PROMPT, len(PROMPT), 10, eos_token_ids=(ref[2],))], 8)
    (a,) = res.outputs
    assert a.finish_reason is FinishReason.EOS and a.new_token_ids == ref[: ref.index(ref[2]) + 1]
    assert len(res.decode_step_times) == len(a.new_token_ids) - 1  # no step after the only row stopped
    assert res.invalid_tokens == 0
    assert "a" not in eng.store  # finished requests leave nothing behind


def test_trace_mode_emits_exactly_target_ignoring_eos_and_stop(make_hf, reference):
    ref = reference(PROMPT, 12)
    eos, stop = (ref[0],), (ref[1],)  # would stop at once without trace mode
    normal = make_hf().run_slice([SliceItem("a", PROMPT, len(PROMPT), 50, eos_token_ids=eos)], 20).outputs[0]
    assert normal.finish_reason is FinishReason.EOS and len(normal.new_token_ids) == 1
    for target in (1, 7, 13):
        reqs = [Req("t", PROMPT, 50, target_len=target, eos=eos, stop=stop)]
        run_sliced([make_hf()], reqs, 4)
        assert len(reqs[0].generated) == target and reqs[0].reason is FinishReason.EOS
    # the budget runs out before the target: LENGTH, exactly the budget
    reqs = [Req("t", PROMPT, 5, target_len=9, eos=eos)]
    run_sliced([make_hf()], reqs, 3)
    assert len(reqs[0].generated) == 5 and reqs[0].reason is FinishReason.LENGTH
    # trace mode does not change which tokens come out
    reqs = [Req("t", PROMPT, 12, target_len=12, eos=eos, stop=stop)]
    run_sliced([make_hf()], reqs, 5)
    assert reqs[0].generated == ref


def test_trace_mode_in_continuous_batching(hf_model):
    from worker.continuous import ContinuousBatchingEngine

    eng = ContinuousBatchingEngine(hf_model, max_concurrency=2)
    outs = eng.run([SliceItem(f"r{n}", PROMPT[: n % 5 + 1], n % 5 + 1, 40, eos_token_ids=tuple(range(1024)),
                              target_len=n) for n in (3, 9, 1, 14)])
    assert [len(o.new_token_ids) for o in outs] == [3, 9, 1, 14]
    assert all(o.finish_reason is FinishReason.EOS for o in outs)


@pytest.mark.parametrize("slice_len", [1, 3, 7])
def test_seeded_sampling_sliced_equals_unsliced(make_hf, prompts, slice_len):
    def serve(slice_len, seed_offset=0, engines=None):
        reqs = [Req(f"r{i}", p, b, sampling=SamplingParams(temperature=1.3, top_p=0.9, seed=100 + i + seed_offset),
                    eos=()) for i, (p, b) in enumerate(prompts)]
        run_sliced(engines or [make_hf(), make_hf(kv_reuse=False)], reqs, slice_len, seed=slice_len or 0)
        return [r.generated for r in reqs]

    whole = serve(None)
    assert serve(slice_len) == whole
    assert serve(None, seed_offset=1000) != whole  # the seed matters
    assert any(len(set(g)) > 1 for g in whole)


def test_seeded_sampling_same_in_continuous_batching(make_hf, hf_model, prompts):
    from worker.continuous import ContinuousBatchingEngine

    params = [SamplingParams(temperature=0.8, seed=i) for i in range(len(prompts))]
    items = [SliceItem(f"r{i}", p, len(p), b, eos_token_ids=(), sampling=params[i]) for i, (p, b) in enumerate(prompts)]
    sliced = [o.new_token_ids for o in make_hf().run_slice(items, None).outputs]
    cb = [o.new_token_ids for o in ContinuousBatchingEngine(hf_model, max_concurrency=3).run(items)]
    assert cb == sliced


def test_top_p_tiny_is_greedy(make_hf, reference):
    items = [SliceItem("a", PROMPT, len(PROMPT), 10, sampling=SamplingParams(temperature=1.0, top_p=1e-9, seed=1))]
    assert make_hf().run_slice(items, 10).outputs[0].new_token_ids == reference(PROMPT, 10)


def test_kv_store_eviction_falls_back_to_prefill(make_hf, reference, prompts):
    """With a budget that holds only one request's cache, rows evicted from it are re-prefilled, still exact."""
    eng = make_hf(kv_budget_bytes=1)
    reqs = [Req(f"r{i}", p, b) for i, (p, b) in enumerate(prompts)]
    results = run_sliced([eng], reqs, 3)
    assert not any(res.kv_reused for res in results) and len(eng.store) == 0
    for r in reqs:
        assert r.generated == reference(r.prompt, r.budget)

    eng = make_hf()
    res = eng.run_slice([SliceItem("a", PROMPT, len(PROMPT), 10), SliceItem("b", [1, 2], 2, 10)], 3)
    assert len(eng.store) == 2
    row_bytes = max(e.kv.nbytes for e in eng.store._entries.values())
    small = make_hf(kv_budget_bytes=row_bytes + 1)
    small.run_slice([SliceItem("a", PROMPT, len(PROMPT), 10), SliceItem("b", [1, 2], 2, 10)], 3)
    assert len(small.store) == 1 and small.store.evictions == 1 and small.store.nbytes <= row_bytes + 1
    assert res.kv_reused is False


def test_kv_store_resize_evicts_least_recent_beyond_the_new_budget(make_hf):
    eng = make_hf()
    eng.run_slice([SliceItem(r, PROMPT, len(PROMPT), 10) for r in ("a", "b", "c")], 3)
    sizes = {rid: e.kv.nbytes for rid, e in eng.store._entries.items()}
    assert list(sizes) == ["a", "b", "c"]
    eng.set_kv_keep_budget(sizes["b"] + sizes["c"])
    assert "a" not in eng.store and "b" in eng.store and "c" in eng.store and eng.store.evictions == 1
    assert eng.store.nbytes == sizes["b"] + sizes["c"]


def test_kv_reuse_only_for_matching_history(make_hf):
    eng = make_hf()
    first = eng.run_slice([SliceItem("a", PROMPT, len(PROMPT), 20)], 4).outputs[0]
    assert "a" in eng.store
    # same id, but a history that does not extend what was cached: must not reuse (and must not crash)
    res = eng.run_slice([SliceItem("a", [9, 9, 9] + first.new_token_ids, 3, 16)], 2)
    assert res.kv_reused is False and res.outputs[0].kv_reused is False
    res = eng.run_slice([SliceItem("a", [9, 9, 9] + first.new_token_ids + res.outputs[0].new_token_ids, 3, 14)], 2)
    assert res.kv_reused is True and res.reprefill_tokens == 0 and res.pad_tokens == 0
    eng.drop(["a"])
    assert "a" not in eng.store


def test_resumed_rows_are_not_padded_to_fresh_prompts(make_hf, reference):
    """A batch mixing a row with a kept cache and fresh rows feeds them apart: the resumed row feeds one
    token, only the fresh rows pad among themselves, and every output stays exact and in input order."""
    eng = make_hf()
    short, long_a, long_b = [7, 8, 9], list(range(20, 60)), list(range(100, 130))
    first = eng.run_slice([SliceItem("s", short, len(short), 12)], 4).outputs[0]
    history = short + first.new_token_ids
    res = eng.run_slice(
        [SliceItem("la", long_a, len(long_a), 6), SliceItem("s", history, len(short), 8),
         SliceItem("lb", long_b, len(long_b), 6)], 6
    )
    assert [o.request_id for o in res.outputs] == ["la", "s", "lb"]
    assert res.outputs[1].kv_reused and not res.outputs[0].kv_reused
    assert res.pad_tokens == len(long_a) - len(long_b)  # not + len(long_a) - 1 for the resumed row
    assert res.reprefill_tokens == 0
    assert first.new_token_ids + res.outputs[1].new_token_ids == reference(short, 10)
    assert res.outputs[0].new_token_ids == reference(long_a, 6)
    assert res.outputs[2].new_token_ids == reference(long_b, 6)


def test_zero_budget_and_zero_steps_do_no_compute(make_hf):
    eng = make_hf()
    res = eng.run_slice(
        [SliceItem("a", PROMPT, len(PROMPT), 0), SliceItem("b", PROMPT, len(PROMPT), 5, target_len=0)], 4
    )
    assert [o.finish_reason for o in res.outputs] == [FinishReason.LENGTH, FinishReason.EOS]
    assert res.prefill_time == 0 and res.new_tokens == 0
    res = eng.run_slice([SliceItem("c", PROMPT, len(PROMPT), 5)], 0)
    assert res.outputs[0].finish_reason is FinishReason.SLICE_END and res.outputs[0].new_token_ids == []


def test_max_steps_none_runs_static_batch_to_completion(make_hf, reference, prompts):
    items = [SliceItem(f"r{i}", p, len(p), b, eos_token_ids=()) for i, (p, b) in enumerate(prompts)]
    res = make_hf().run_slice(items, None)
    assert all(o.finish_reason is FinishReason.LENGTH for o in res.outputs)
    for o, (p, b) in zip(res.outputs, prompts):
        ref = reference(p, b)  # generate stops at EOS; with eos_token_ids=() the row goes on
        assert len(o.new_token_ids) == b and o.new_token_ids[: len(ref)] == ref
    assert any(len(reference(p, b)) < b for p, b in prompts)  # the set really contains an EOS to ignore
    longest = max(b for _, b in prompts)
    assert len(res.decode_step_times) == longest - 1
    assert res.invalid_tokens == sum(longest - b for _, b in prompts)
    assert res.pad_tokens == sum(max(len(p) for p, _ in prompts) - len(p) for p, _ in prompts)
    assert res.elapsed >= res.prefill_time + sum(res.decode_step_times) > 0


def test_to_slice_result_carries_accounting():
    from worker.protocol import ItemOutput

    r = EngineSliceResult(
        outputs=[ItemOutput("a", [1, 2], FinishReason.SLICE_END), ItemOutput("b", [3], FinishReason.EOS)],
        prefill_time=0.5, decode_step_times=[0.1], pad_tokens=3, invalid_tokens=1, reprefill_tokens=4,
        kv_reused=True, elapsed=0.7,
    )
    s = r.to_slice_result("batch-1", "replica-0")
    assert isinstance(s, SliceResult) and s.batch_id == "batch-1" and s.replica_id == "replica-0"
    assert [(o.request_id, o.new_tokens, o.finish_reason) for o in s.outcomes] == [
        ("a", 2, FinishReason.SLICE_END), ("b", 1, FinishReason.EOS)]
    assert (s.elapsed, s.prefill_time, s.decode_step_times, s.pad_tokens, s.invalid_tokens,
            s.reprefill_tokens, s.kv_reused) == (0.7, 0.5, [0.1], 3, 1, 4, True)


def test_slice_item_validation():
    with pytest.raises(ValueError):
        SliceItem("x", [], 0, 5)
    with pytest.raises(ValueError):
        SliceItem("x", [1, 2], 3, 5)
    assert SliceItem("x", [1, 2, 3], 2, 5, target_len=2).budget == 2
    assert SliceItem("x", [1, 2, 3], 2, 5).generated == 1


def test_build_engine_backends(model_dir):
    from worker.continuous import ContinuousBatchingEngine
    from worker.factory import build_engine
    from worker.hf_engine import HFEngine
    from worker.protocol import Engine

    eng = build_engine("hf", model_dir, kv_reuse=False, num_threads=1)
    assert isinstance(eng, HFEngine) and isinstance(eng, Engine) and eng.kv_reuse is False
    cb = build_engine("continuous", model_dir, max_concurrency=5)
    assert isinstance(cb, ContinuousBatchingEngine) and cb.max_concurrency == 5
    with pytest.raises(ValueError):
        build_engine("no-such-backend", model_dir)
