"""Drive requests through slice engines with the real dispatch core: slice by slice, re-batched each time."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from balancer.config import SchedulerConfig
from balancer.estimators import BilinearLatencyModel, LinearKVMemory
from balancer.types import FinishReason, Mode, Request, RequestOutcome, SliceResult
from cluster.dispatch_core import CommitOutcome, DispatchCore
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
    """Serve ``reqs`` through the real dispatch core until all finish: in slices of ``slice_len`` tokens (SCLS),
    or to completion in static batches (SLS) when ``slice_len`` is None.

    The core forms the batches and places them on as many logical replicas as there are engines; each batch
    then runs on an engine picked at random, so a request's slices land on different engines and next to
    different neighbours, as in the cluster. Checks the slice contract on every output.
    """
    rng = random.Random(seed)
    config = SchedulerConfig(mode=Mode.SLS if slice_len is None else Mode.SCLS, slice_len=slice_len or 64,
                             max_gen_len=max(r.budget for r in reqs), max_batch_size=4, sls_batch_size=3,
                             kv_reuse=False)
    core = DispatchCore(config, _LATENCY, LinearKVMemory(bytes_per_token=1.0, budget_bytes=1e12))
    core.start(epoch=1)
    for i in range(max(len(engines), 2)):
        core.on_replica_joined(f"replica-{i}", 0.0)
    by_id = {r.rid: r for r in reqs}
    for r in reqs:
        assert core.on_arrival(Request(r.rid, len(r.prompt), r.budget, 0.0), 0.0) == []
    results = []
    for now in range(1, 10_000):
        if all(r.reason is not None for r in reqs):
            assert not core.held()
            return results
        for post in core.tick(float(now)):
            order = post.message
            group = [by_id[rid] for rid in order.request_ids]
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
            outcomes = [RequestOutcome(o.request_id, len(o.new_token_ids), o.finish_reason) for o in res.outputs]
            for commit in core.on_slice(SliceResult(order.batch_id, post.replica_id, outcomes, 0.01), 1, now):
                core.on_committed(commit, CommitOutcome.APPLIED, now)
    raise AssertionError("requests never finished")


_LATENCY = BilinearLatencyModel(a=2e-6, b=1e-4, c=3e-6, d=5e-3, e=4e-8, f=2e-5, g=1e-7, h=3e-3)
"""Any plausible latency model: here it only steers how the core groups and places the batches."""


def vllm_python_or_skip():
    """The vLLM venv's Python, or skip the test with the reason (the venv is an opt-in install)."""
    import pytest

    from worker.vllm_engine import find_python

    try:
        return find_python()
    except FileNotFoundError as e:
        pytest.skip(f"vLLM venv missing: {e}")
