"""Drive requests through slice engines the way the dispatcher does: slice by slice, re-batched each time."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from balancer.types import FinishReason
from worker.protocol import EngineSliceResult, SamplingParams, SliceItem


@dataclass
class Req:
    rid: str
    prompt: list[int]
    budget: int
    sampling: SamplingParams = SamplingParams()
    target_len: int | None = None
    stop: tuple[int, ...] = ()
    eos: tuple[int, ...] | None = None
    generated: list[int] = field(default_factory=list)
    reason: FinishReason | None = None
    slices: int = 0

    def item(self) -> SliceItem:
        target = None if self.target_len is None else self.target_len - len(self.generated)
        return SliceItem(
            request_id=self.rid,
            token_ids=self.prompt + self.generated,
            prompt_len=len(self.prompt),
            max_new_tokens=self.budget - len(self.generated),
            eos_token_ids=self.eos,
            stop_token_ids=self.stop,
            sampling=self.sampling,
            target_len=target,
        )


def run_sliced(engines, reqs: list[Req], slice_len: int | None, seed: int = 0) -> list[EngineSliceResult]:
    """Serve ``reqs`` in slices of ``slice_len`` tokens until all finish.

    Every round the unfinished requests are shuffled and cut into one or two batches, each run on an
    engine picked at random, so a request's slices land on different engines and next to different
    neighbours, as in the cluster. Checks the slice contract on every output.
    """
    rng = random.Random(seed)
    results = []
    for _ in range(10_000):
        todo = [r for r in reqs if r.reason is None]
        if not todo:
            return results
        rng.shuffle(todo)
        cut = rng.randint(1, len(todo)) if len(todo) > 1 and rng.random() < 0.5 else len(todo)
        for group in (todo[:cut], todo[cut:]):
            if not group:
                continue
            res = rng.choice(engines).run_slice([r.item() for r in group], slice_len)
            results.append(res)
            assert [o.request_id for o in res.outputs] == [r.rid for r in group]
            for r, out in zip(group, res.outputs):
                if slice_len is not None:
                    assert len(out.new_token_ids) <= slice_len
                if out.finish_reason is FinishReason.SLICE_END:
                    assert len(out.new_token_ids) == slice_len, "a slice may only end a row after S tokens"
                r.generated += out.new_token_ids
                r.slices += 1
                if out.finish_reason.is_final:
                    r.reason = out.finish_reason
                assert len(r.generated) <= r.budget
    raise AssertionError("requests never finished")


def vllm_python_or_skip():
    """The vLLM venv's Python, or skip the test with the reason (the venv is an opt-in install)."""
    import pytest

    from worker.vllm_engine import find_python

    try:
        return find_python()
    except FileNotFoundError as e:
        pytest.skip(f"vLLM venv missing: {e}")
