"""``VLLMEngine`` keeps the continuous contract: same stopping rules as the torch engines, slicing-invariant
greedy output, trace mode, abort and stop ids. It needs the vLLM venv (``bash bench/vllm_setup.sh`` or
``SLICEFLEET_WITH_VLLM=1 scripts/setup.sh``); without it the module is skipped. One child engine (about 10-20 s
to start, eager) serves every test of the module, on the session's test-sized model (head_dim 32, which vLLM's
CPU attention accepts).
"""

from __future__ import annotations

import random

import pytest

from balancer.types import FinishReason
from tests.worker.helpers import vllm_python_or_skip
from worker.protocol import ContinuousEngine, SliceItem

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(model_dir):
    from worker.vllm_engine import VLLMEngine

    python = vllm_python_or_skip()
    eng = VLLMEngine(model_dir, python=python, max_model_len=512, max_concurrency=8, kv_cache_gib=1,
                     cpu_bind="0", block_size=32)
    yield eng
    eng.close()
    assert not eng.alive


@pytest.fixture
def eng(engine):
    assert not engine.has_work(), "a previous test left work behind"
    yield engine
    engine.drop(list(engine.produced()))


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(n)]


def _serve(eng, item: SliceItem):
    (out,) = eng.run([item])
    return out


def test_is_a_continuous_engine(eng):
    assert isinstance(eng, ContinuousEngine)
    assert eng.backend == "vllm" and eng.eos_token_ids


def test_sliced_greedy_equals_unsliced(eng):
    """Abort after k tokens, re-add with the history and the rest of the budget: same tokens as one run."""
    budget = 30
    for n, k in ((45, 7), (70, 4)):
        prompt = _prompt(n, n)
        full = _serve(eng, SliceItem("full", prompt, len(prompt), budget, eos_token_ids=()))
        assert full.finish_reason is FinishReason.LENGTH and len(full.new_token_ids) == budget

        got: list[int] = []
        resumed_cached = []
        while True:
            eng.add(SliceItem("sliced", prompt + got, len(prompt), budget - len(got), eos_token_ids=()))
            done = None
            while done is None:
                fin = eng.step()
                if fin:
                    (done,) = fin
                    break
                part = eng.produced()["sliced"]
                if len(part) >= k:
                    if got:
                        resumed_cached.append(eng.cached_tokens("sliced"))
                    assert eng.abort("sliced")
                    got += part
                    break
            if done is not None:
                got += done.new_token_ids
                break
        assert got == full.new_token_ids
        assert not eng.has_work()
        # Prefix caching: every resumed slice found its history's full blocks cached (no re-prefill of them).
        assert resumed_cached and all(c and c > 0 for c in resumed_cached)


def test_trace_target_reports_eos(eng):
    prompt = _prompt(20, 1)
    out = _serve(eng, SliceItem("t", prompt, len(prompt), 50, target_len=13))
    assert out.finish_reason is FinishReason.EOS and len(out.new_token_ids) == 13
    # The budget runs out before the target: LENGTH.
    out = _serve(eng, SliceItem("t", prompt, len(prompt), 5, target_len=13))
    assert out.finish_reason is FinishReason.LENGTH and len(out.new_token_ids) == 5
    # Trace mode ignores EOS and stop ids even when the model produces them.
    free = _serve(eng, SliceItem("f", prompt, len(prompt), 10, eos_token_ids=()))
    out = _serve(eng, SliceItem("t", prompt, len(prompt), 50, target_len=10,
                                eos_token_ids=(free.new_token_ids[2],), stop_token_ids=(free.new_token_ids[3],)))
    assert out.new_token_ids == free.new_token_ids and out.finish_reason is FinishReason.EOS


def test_nothing_to_generate_leaves_at_next_step(eng):
    prompt = _prompt(10, 2)
    eng.add(SliceItem("zero", prompt, len(prompt), 0))
    eng.add(SliceItem("reached", prompt, len(prompt), 5, target_len=0))
    assert eng.has_work()
    outs = {o.request_id: o for o in eng.step()}
    assert outs["zero"].finish_reason is FinishReason.LENGTH and outs["zero"].new_token_ids == []
    assert outs["reached"].finish_reason is FinishReason.EOS and outs["reached"].new_token_ids == []
    assert not eng.has_work()


def test_abort_running_request_frees_it(eng):
    prompt = _prompt(30, 3)
    eng.add(SliceItem("a", prompt, len(prompt), 200, eos_token_ids=()))
    eng.add(SliceItem("b", prompt[:20], 20, 4, eos_token_ids=()))
    assert eng.produced() == {"a": [], "b": []}
    eng.step()
    eng.step()
    assert len(eng.produced()["a"]) >= 1
    assert eng.abort("a") and not eng.abort("a")
    finished = []
    while eng.has_work():
        finished += eng.step()
    assert [o.request_id for o in finished] == ["b"] and len(finished[0].new_token_ids) == 4
    assert eng.num_running == 0 and eng.produced() == {}
    assert not eng.abort("nope")


def test_stop_and_eos_ids(eng):
    prompt = _prompt(25, 4)
    free = _serve(eng, SliceItem("free", prompt, len(prompt), 20, eos_token_ids=())).new_token_ids
    stop = free[5]
    cut = free.index(stop) + 1
    out = _serve(eng, SliceItem("s", prompt, len(prompt), 20, eos_token_ids=(), stop_token_ids=(stop,)))
    assert out.finish_reason is FinishReason.STOP and out.new_token_ids == free[:cut]
    out = _serve(eng, SliceItem("e", prompt, len(prompt), 20, eos_token_ids=(stop,)))
    assert out.finish_reason is FinishReason.EOS and out.new_token_ids == free[:cut]
    # A token that is both EOS and a stop id ends the request as EOS (RowState's order).
    out = _serve(eng, SliceItem("b", prompt, len(prompt), 20, eos_token_ids=(stop,), stop_token_ids=(stop,)))
    assert out.finish_reason is FinishReason.EOS and out.new_token_ids == free[:cut]


def test_batch_of_mixed_requests(eng):
    """Several requests at once each get exactly what they get alone (continuous batching is transparent)."""
    reqs = [SliceItem(f"m{i}", _prompt(5 + 9 * i, 10 + i), 5 + 9 * i, 6 + i, eos_token_ids=()) for i in range(5)]
    alone = [_serve(eng, it).new_token_ids for it in reqs]
    together = eng.run(reqs)
    assert [o.new_token_ids for o in together] == alone
    assert eng.stats.generated_tokens > 0 and eng.stats.pad_tokens == 0 and eng.stats.decode_step_times


def test_agreement_with_hf(eng, hf_model, capsys):
    """Not a hard check: float32 kernels differ, so we only report how many of the first 32 greedy tokens
    vLLM and the HF engine share (random weights make near-ties common)."""
    from worker.hf_engine import HFEngine

    hf = HFEngine(hf_model)
    figures = []
    for seed, n in ((5, 12), (6, 40)):
        prompt = _prompt(n, seed)
        item = SliceItem(f"cmp{seed}", prompt, n, 32, eos_token_ids=())
        ours = _serve(eng, item).new_token_ids
        ref = hf.run_slice([item]).outputs[0].new_token_ids
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        figures.append(same)
    with capsys.disabled():
        print(f"\nvLLM vs HF greedy: leading tokens in agreement out of 32: {figures}")
