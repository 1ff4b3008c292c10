"""The engine protocol: what a worker replica hands an engine and what it gets back.

One slice = at most ``max_steps`` new tokens per request. A batch is a list of :class:`SliceItem`; each carries
everything the engine needs to resume the request from scratch (its whole token history), so a slice can
run on any replica. An engine *may* additionally keep a request's KV cache between slices and skip the
re-prefill when the history it is handed extends what it cached (see ``EngineSliceResult.kv_reused``);
correctness never depends on that.

Accounting (what the predictor fits and the balancer reports):
- the prefill forward (``prefill_time``) yields each row's first token of the slice; each following forward
  is one decode step (``decode_step_times``), so a full slice of S tokens is 1 prefill + (S-1) decode steps;
- ``pad_tokens``: padding positions computed in the prefill forward (left padding to the longest input);
- ``invalid_tokens``: decode positions computed for rows that had already finished in this slice;
- ``reprefill_tokens``: tokens prefilled again although an earlier slice had already computed them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from balancer.types import FinishReason, RequestOutcome, SliceResult


@dataclass(frozen=True)
class SamplingParams:
    """Greedy by default. With ``temperature > 0`` the engine samples (optionally nucleus, ``top_p``).

    With a ``seed`` the token drawn at absolute position p depends only on (seed, p, the logits), never on
    the batch or on how the request was cut into slices: a sliced sampled run equals an unsliced one.
    Without a seed sampling is not reproducible.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    """Keep only the k most likely tokens; 0 (or -1, as in vLLM) keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below ``min_p`` times the most likely token's (after temperature)."""
    repetition_penalty: float = 1.0
    """HF/vLLM repetition penalty over prompt and output tokens: positive logits divided, negative multiplied."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already in the output (not the prompt), as OpenAI."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence in the output (not the prompt), as OpenAI."""
    min_tokens: int = 0
    """No end-of-sequence or stop token before this many output tokens of the whole request (vLLM's meaning):
    they are masked out of the logits, so greedy and sampled rows pick the best other token."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits depend on the row's history (penalties, min_tokens) before any choice."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_tokens > 0)


GREEDY = SamplingParams()


@dataclass
class SliceItem:
    """One request's part of a slice."""

    request_id: str
    token_ids: list[int]
    """Prompt followed by every token generated so far (over all earlier slices)."""
    prompt_len: int
    max_new_tokens: int
    """Remaining generation budget (tokens still allowed over this and later slices)."""
    eos_token_ids: tuple[int, ...] | None = None
    """End-of-sequence ids; ``None`` means the model's own (generation_config), ``()`` means none."""
    stop_token_ids: tuple[int, ...] = ()
    """Further ids that end the request (finish reason STOP); the stop token is part of the output."""
    sampling: SamplingParams = GREEDY
    target_len: int | None = None
    """Trace mode: emit exactly this many further tokens (capped by the budget), ignoring EOS and stop ids,
    like vLLM's ``--ignore-eos`` with fixed output lengths. Reaching it reports EOS (the replayed request's
    natural end); running out of budget first reports LENGTH. The caller decrements it between slices."""

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError(f"request {self.request_id}: empty token_ids")
        if not 0 < self.prompt_len <= len(self.token_ids):
            raise ValueError(f"request {self.request_id}: prompt_len {self.prompt_len} vs {len(self.token_ids)} tokens")

    @property
    def generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def budget(self) -> int:
        """Tokens this request may still emit: the budget, further capped by the trace target if any."""
        if self.target_len is None:
            return max(self.max_new_tokens, 0)
        return max(min(self.max_new_tokens, self.target_len), 0)


@dataclass
class ItemOutput:
    """What one slice did for one request."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason
    """``SLICE_END`` when the request needs another slice."""
    kv_reused: bool = False
    """This row resumed from a KV cache kept since its previous slice (no re-prefill of its history)."""


@dataclass
class EngineSliceResult:
    outputs: list[ItemOutput]
    """One per input item, in input order."""
    prefill_time: float = 0.0
    decode_step_times: list[float] = field(default_factory=list)
    pad_tokens: int = 0
    invalid_tokens: int = 0
    reprefill_tokens: int = 0
    kv_reused: bool = False
    """Every row that ran resumed from a kept KV cache, so the slice did no real prefill."""
    elapsed: float = 0.0
    """Wall time of the whole ``run_slice`` call, seconds."""

    @property
    def new_tokens(self) -> int:
        return sum(len(o.new_token_ids) for o in self.outputs)

    def to_slice_result(self, batch_id: str, replica_id: str) -> SliceResult:
        """The balancer's view of this result."""
        return SliceResult(
            batch_id=batch_id,
            replica_id=replica_id,
            outcomes=[RequestOutcome(o.request_id, len(o.new_token_ids), o.finish_reason) for o in self.outputs],
            elapsed=self.elapsed,
            prefill_time=self.prefill_time,
            decode_step_times=list(self.decode_step_times),
            pad_tokens=self.pad_tokens,
            invalid_tokens=self.invalid_tokens,
            reprefill_tokens=self.reprefill_tokens,
            kv_reused=self.kv_reused,
        )


@runtime_checkable
class Engine(Protocol):
    """A slice engine. Implementations: ``worker.hf_engine.HFEngine``, ``worker.deepspeed_engine.DeepSpeedEngine``."""

    def run_slice(self, items: Sequence[SliceItem], max_steps: int | None = None,
                  on_step=None) -> EngineSliceResult:
        """Run ``items`` together for at most ``max_steps`` new tokens each (``None``: to completion); rows
        stop on their own conditions. ``on_step(tokens_so_far_by_id)``, if given, is called after every
        forward so tokens can be streamed before the slice ends."""
        ...

    def drop(self, request_ids: Sequence[str]) -> None:
        """Forget any state kept for these requests (they finished, were aborted or moved away)."""
        ...


@runtime_checkable
class ContinuousEngine(Protocol):
    """The continuous contract: work joins and leaves at any step.

    Implementations: ``worker.continuous.ContinuousBatchingEngine`` (HF / DeepSpeed forward) and
    ``worker.vllm_engine.VLLMEngine`` (a vLLM engine in a child process). The worker replica drives it one
    ``step()`` at a time and lays the dispatcher's slices (leases of S tokens) over it, so a request whose slice
    ends and that stays on this replica simply keeps its row: no re-prefill, no gap.
    """

    def add(self, item: SliceItem) -> None:
        """Admit a request; it joins the running batch at the next step with room. ``item.max_new_tokens`` is
        the whole remaining budget (the slice is the worker's business, not the engine's)."""
        ...

    def step(self) -> list[ItemOutput]:
        """One engine iteration; returns the requests that finished in it, each with *all* the tokens it
        produced since ``add``."""
        ...

    def abort(self, request_id: str) -> bool:
        """Stop a waiting or running request now and free everything kept for it. True if it was there."""
        ...

    def has_work(self) -> bool:
        ...

    def produced(self) -> dict[str, list[int]]:
        """Tokens produced so far by every admitted, unfinished request (empty until its first step)."""
        ...


def run_to_completion(engine: ContinuousEngine, items) -> list[ItemOutput]:
    """Serve ``items`` (all arriving now) on a continuous engine until each finishes; outputs in input order."""
    order = []
    for it in items:
        order.append(it.request_id)
        engine.add(it)
    done: dict[str, ItemOutput] = {}
    while engine.has_work():
        for out in engine.step():
            done[out.request_id] = out
    return [done[rid] for rid in order]
