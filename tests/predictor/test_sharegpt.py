"""ShareGPT loading, vLLM's sampling rules and the conversation split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from predictor.sharegpt import (
    MAX_PROMPT_LEN,
    MAX_TOTAL_LEN,
    MIN_LEN,
    Conversation,
    TokenCountCache,
    conversation_id,
    heldout_conversations,
    load_conversations,
    passes_vllm_filter,
    sample_requests,
    split_by_conversation,
)


class WordTokenizer:
    """A deterministic stand-in: one token per whitespace-separated word, plus a BOS."""

    name_or_path = "words"

    def __call__(self, texts, **_):
        return {"input_ids": [[0] + [1] * len(t.split()) for t in texts]}


def test_load_conversations_decodes_the_truncated_file():
    convs = load_conversations()
    assert 15000 < len(convs) <= 17671
    ids = [c.id for c in convs]
    assert len(set(ids)) == len(ids)  # duplicated ids keep one record
    assert all(c.prompt and isinstance(c.response, str) for c in convs[:200])
    assert load_conversations(limit=5) == convs[:5]


def test_conversation_id():
    assert conversation_id("QWJhYvA_12") == "QWJhYvA"
    assert conversation_id("abc") == "abc"
    assert conversation_id("a_b_c") == "a_b_c"  # non-numeric suffix: not a chunk id


@given(st.integers(0, 3000), st.integers(0, 3000))
def test_filter_rule_matches_vllm(p, o):
    expected = p >= 4 and o >= 4 and p <= 1024 and p + o <= 2048
    assert passes_vllm_filter(p, o) == expected


def _random_convs(draw_lengths):
    return [Conversation(f"c{i // 2}_{i % 2}", " ".join(["w"] * p), " ".join(["w"] * o))
            for i, (p, o) in enumerate(draw_lengths)]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1500), st.integers(0, 1500)), min_size=1, max_size=60),
       st.integers(0, 5), st.integers(1, 80))
def test_sample_requests_obeys_rules_and_is_deterministic(lengths, seed, n):
    convs = _random_convs(lengths)
    tok = WordTokenizer()
    cache = TokenCountCache(tok, persist=False)
    got = sample_requests(tok, n, seed, conversations=convs, cache=cache)
    # every kept request passes the rule, with lengths counted by the tokenizer (BOS included)
    for r in got:
        assert r.prompt_len >= MIN_LEN and r.output_len >= MIN_LEN
        assert r.prompt_len <= MAX_PROMPT_LEN and r.prompt_len + r.output_len <= MAX_TOTAL_LEN
        assert r.prompt_len == len(r.prompt.split()) + 1
    eligible = sum(passes_vllm_filter(p + 1, o + 1) for p, o in lengths)
    assert len(got) == min(n, eligible)
    assert len({r.id for r in got}) == len(got)
    assert got == sample_requests(tok, n, seed, conversations=convs, cache=cache)


def test_sample_requests_fixed_output_len_and_seed_changes_order():
    convs = _random_convs([(10, 10)] * 50)
    tok = WordTokenizer()
    a = sample_requests(tok, 20, 0, conversations=convs, cache=TokenCountCache(tok, persist=False))
    b = sample_requests(tok, 20, 1, conversations=convs, cache=TokenCountCache(tok, persist=False))
    assert [r.id for r in a] != [r.id for r in b]
    c = sample_requests(tok, 5, 0, conversations=convs, fixed_output_len=7, cache=TokenCountCache(tok, persist=False))
    assert all(r.output_len == 7 for r in c)


def test_sample_real_sharegpt_with_real_tokenizer(tiny_tokenizer, tmp_path):
    cache = TokenCountCache(tiny_tokenizer, directory=tmp_path)
    reqs = sample_requests(tiny_tokenizer, 50, seed=0, cache=cache)
    assert len(reqs) == 50
    assert all(passes_vllm_filter(r.prompt_len, r.output_len) for r in reqs)
    r = reqs[0]
    assert r.prompt_len == len(tiny_tokenizer(r.prompt)["input_ids"])
    # the counts were persisted and are reused without tokenizing again
    assert cache.path.is_file()
    reloaded = TokenCountCache(tiny_tokenizer, directory=tmp_path)
    reloaded.tokenizer = None  # would fail if it tried to tokenize
    assert sample_requests(None, 50, seed=0, cache=reloaded) == reqs


def test_split_by_conversation_keeps_chunks_together():
    convs = load_conversations(limit=3000)
    train, test = split_by_conversation(convs, 0.2, seed=0)
    assert len(train) + len(test) == len(convs)
    assert 0.15 < len(test) / len(convs) < 0.25
    assert not {c.conversation_id for c in train} & {c.conversation_id for c in test}
    # stable: a conversation's side does not depend on the other records present
    _, test_half = split_by_conversation(convs[:1500], 0.2, seed=0)
    assert {c.id for c in test_half} == {c.id for c in test if c in set(convs[:1500])}
    with pytest.raises(ValueError):
        split_by_conversation(convs, 1.5)


def test_heldout_conversations_is_the_length_predictors_test_side():
    held = heldout_conversations()
    train, test = split_by_conversation(load_conversations(), 0.2, seed=0)
    assert [c.id for c in held] == [c.id for c in test]
    assert not {c.conversation_id for c in held} & {c.conversation_id for c in train}
