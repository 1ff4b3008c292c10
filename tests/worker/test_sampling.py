"""vLLM's sampling knobs (min_tokens, penalties, top_k, min_p): the same meaning as transformers' own logits
processors, and still independent of slicing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
)

from balancer.types import FinishReason
from tests.worker.helpers import Req, run_sliced
from worker.protocol import SamplingParams, SliceItem
from worker.sampling import adjust_logits, sample_row, select_tokens

V = 50
histories = st.lists(st.integers(0, V - 1), min_size=1, max_size=30)
logit_rows = st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=V, max_size=V)


@settings(max_examples=60, deadline=None)
@given(histories, logit_rows, st.floats(0.5, 2.0))
def test_repetition_penalty_is_transformers(history, logits, penalty):
    row = torch.tensor(logits)
    ours = adjust_logits(row, SamplingParams(repetition_penalty=penalty), history, 1, ())
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([history]), row[None].clone())[0]
    assert torch.allclose(ours, theirs)


@settings(max_examples=60, deadline=None)
@given(histories, logit_rows, st.integers(1, 5), st.integers(0, 40))
def test_min_tokens_is_transformers_min_new_tokens(history, logits, prompt_len, min_tokens):
    prompt_len = min(prompt_len, len(history))
    row = torch.tensor(logits)
    ours = adjust_logits(row, SamplingParams(min_tokens=min_tokens), history, prompt_len, {3, 7})
    proc = MinNewTokensLengthLogitsProcessor(prompt_len, min_tokens, [3, 7])
    theirs = proc(torch.tensor([history]), row[None].clone())[0]
    assert torch.equal(ours, theirs)


@settings(max_examples=60, deadline=None)
@given(histories, logit_rows, st.floats(-2, 2), st.floats(-2, 2))
def test_presence_and_frequency_count_output_tokens_only(history, logits, presence, frequency):
    prompt_len = len(history) // 2 or 1
    row = torch.tensor(logits)
    ours = adjust_logits(row, SamplingParams(presence_penalty=presence, frequency_penalty=frequency), history,
                         prompt_len, ())
    output = history[prompt_len:]
    for t in range(V):
        n = output.count(t)
        expected = logits[t] - frequency * n - (presence if n else 0.0)
        assert ours[t].item() == pytest.approx(expected, abs=1e-4)


@settings(max_examples=40, deadline=None)
@given(logit_rows, st.integers(1, V), st.floats(0.01, 1.0), st.integers(0, 10_000))
def test_top_k_and_min_p_only_draw_what_transformers_keeps(logits, k, min_p, seed):
    row = torch.tensor(logits)
    kept = TopKLogitsWarper(k)(None, row[None].clone())[0]
    kept = MinPLogitsWarper(min_p)(None, kept[None])[0]
    allowed = set(torch.nonzero(torch.isfinite(kept)).flatten().tolist())
    # transformers applies both to the same distribution; so does the sampler (min_p on the full softmax)
    kept_min_p = MinPLogitsWarper(min_p)(None, row[None].clone())[0]
    allowed = {t for t in allowed if torch.isfinite(kept_min_p[t])}
    token = sample_row(row, SamplingParams(temperature=1.0, top_k=k, min_p=min_p, seed=seed), position=3)
    assert token in allowed


def test_top_k_one_is_greedy():
    row = torch.randn(V)
    for seed in range(20):
        assert sample_row(row, SamplingParams(temperature=1.5, top_k=1, seed=seed), seed) == int(row.argmax())


def test_greedy_rows_with_penalties_leave_the_shared_argmax():
    logits = torch.zeros(2, V)
    logits[:, 5], logits[:, 6] = 1.0, 0.5
    plain, penalised = SamplingParams(), SamplingParams(repetition_penalty=3.0)
    picks = select_tokens(logits, [plain, penalised], [[5], [5]], [1, 1], [(), ()], [0, 1])
    assert picks[0] == 5 and picks[1] == 6  # 1.0 / 3 < 0.5


def _hf_reference(hf_model, prompt, budget, **kw):
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("slice_len", [2, 5, None])
def test_greedy_with_repetition_penalty_and_min_tokens_equals_generate(make_hf, hf_model, reference, prompts,
                                                                       slice_len):
    """The row's end token is its own first greedy token, so without min_tokens it would stop at once."""
    reqs = []
    for i, (p, b) in enumerate(prompts):
        first = reference(p, 1)[0]
        params = SamplingParams(repetition_penalty=1.4, min_tokens=min(4, b))
        reqs.append(Req(f"r{i}", p, b + 6, sampling=params, eos=(first,)))
    run_sliced([make_hf(), make_hf(kv_reuse=False)], reqs, slice_len, seed=slice_len or 0)
    for r in reqs:
        end = r.eos[0]
        ref = _hf_reference(hf_model, r.prompt, r.budget, repetition_penalty=1.4, eos_token_id=end,
                            min_new_tokens=r.sampling.min_tokens, pad_token_id=0)
        assert r.generated == ref, r.rid
        assert len(r.generated) >= r.sampling.min_tokens
        assert r.reason is (FinishReason.EOS if ref[-1] == end else FinishReason.LENGTH)


def test_continuous_engine_honours_the_same_knobs(make_hf, hf_model, prompts):
    from worker.continuous import ContinuousBatchingEngine

    params = [SamplingParams(temperature=0.9, seed=i, top_k=8, min_p=0.05, presence_penalty=0.7,
                             frequency_penalty=0.3, repetition_penalty=1.2, min_tokens=3) for i in range(len(prompts))]
    items = [SliceItem(f"r{i}", p, len(p), b + 3, eos_token_ids=(), sampling=params[i])
             for i, (p, b) in enumerate(prompts)]
    static = [o.new_token_ids for o in make_hf().run_slice(items, None).outputs]
    cb = [o.new_token_ids for o in ContinuousBatchingEngine(hf_model, max_concurrency=3).run(items)]
    assert cb == static


@pytest.mark.parametrize("slice_len", [1, 4])
def test_seeded_sampling_with_every_knob_sliced_equals_unsliced(make_hf, prompts, slice_len):
    def serve(slice_len, frequency=0.6):
        reqs = [Req(f"r{i}", p, b + 4, eos=(), sampling=SamplingParams(
            temperature=1.1, top_p=0.95, top_k=20, min_p=0.02, seed=7 + i, repetition_penalty=1.3,
            presence_penalty=0.4, frequency_penalty=frequency, min_tokens=2)) for i, (p, b) in enumerate(prompts)]
        run_sliced([make_hf(), make_hf(kv_reuse=False)], reqs, slice_len, seed=slice_len or 0)
        return [r.generated for r in reqs]

    whole = serve(None)
    assert serve(slice_len) == whole
    assert serve(None, frequency=-2.0) != whole  # the penalty matters
