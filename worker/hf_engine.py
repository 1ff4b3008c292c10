"""``HFEngine``: run one slice of a batch on a Hugging Face transformers model.

The slice loop (``run_slice``) is the one every static-batch backend uses (DeepSpeed subclasses this and
only swaps the forward callable): a left-padded prefill of each row's history (or of the part not in a
kept KV cache), then one-token decode steps until every row has stopped or the slice has produced
``max_steps`` tokens. Rows stop individually (EOS, stop id, budget, trace target) but stay in the batch,
as in static batching; the wasted positions are reported as ``invalid_tokens``.

KV reuse: when ``kv_reuse`` is on, each row that ends the slice unfinished leaves its cache in a bounded
LRU store (``kv_budget_bytes``); if its next slice comes back to this engine with the same history plus
what it generated, only its last token is fed instead of re-prefilling the whole history.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from worker import kv
from worker.protocol import EngineSliceResult, SliceItem
from worker.runner import ModelRunner, RowState, choose, decode_inputs, prefill

log = logging.getLogger(__name__)

DEFAULT_KV_BUDGET_BYTES = 512 << 20
PREALLOCATE_STEPS = 256
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(_DTYPES)}") from None


def set_cpu_threads(num_threads: int | None) -> None:
    """Pin torch's intra-op threads for CPU engines.

    Several replicas and other processes share this machine's two cores. With more OpenMP threads than
    free cores, every matmul waits at a spin barrier for a descheduled thread: a 16x64 batch decoded 20x
    slower with 2 threads than with 1 under such contention. Default: ``$SLICEFLEET_TORCH_THREADS`` or 1.
    """
    if num_threads is None:
        num_threads = int(os.environ.get("SLICEFLEET_TORCH_THREADS", "1"))
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


def load_model(model_path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "float32"):
    """Load a local Hugging Face causal LM directory (nothing is fetched from a hub)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=resolve_dtype(dtype), local_files_only=True, attn_implementation="sdpa"
    )
    return model.to(device).eval()


class HFEngine:
    """Slice engine on a transformers model (CPU or GPU)."""

    backend = "hf"

    def __init__(
        self,
        model,
        *,
        kv_reuse: bool = True,
        kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
        forward=None,
        preallocate_steps: int = PREALLOCATE_STEPS,
    ):
        self.model = model
        self.runner = ModelRunner(model, forward=forward)
        self.kv_reuse = kv_reuse
        self.preallocate_steps = preallocate_steps
        """Runs of at most this many decode steps write into a cache allocated once (0: never). Longer runs
        (a static batch run to its budget) grow as they go: most of a budget-sized buffer may never be used,
        and every step would attend over all of it."""
        self.store = kv.KVStore(kv_budget_bytes)

    @classmethod
    def from_pretrained(cls, model_path: str | Path, device: str = "cpu", dtype: str = "float32", **kwargs):
        return cls(load_model(model_path, device, dtype), **kwargs)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.runner.eos_token_ids

    def set_kv_keep_budget(self, nbytes: float) -> None:
        """Bytes the kept-cache store may hold (the cluster sets it from the replica's measured KV budget)."""
        self.store.resize(int(nbytes))

    def drop(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self.store.pop(rid)

    def run_slice(self, items: Sequence[SliceItem], max_steps: int | None = None,
                  on_step: Callable[[dict[str, list[int]]], None] | None = None) -> EngineSliceResult:
        """Run ``items`` for at most ``max_steps`` new tokens each (``None``: until every row stops, as a
        static batch in SLS does). Outputs come back in input order.

        ``on_step`` (optional) is called after the prefill and after every decode step with each running
        request's tokens so far in this slice, so the caller can stream them before the slice ends."""
        t_start = time.perf_counter()
        runner = self.runner
        rows = [RowState.start(it, runner.eos_token_ids, runner.max_positions) for it in items]
        if max_steps is None:
            max_steps = max((r.item.budget for r in rows), default=0)
        live = [r for r in rows if not r.done] if max_steps > 0 else []
        for r in rows:
            if r.done:
                self.store.pop(r.item.request_id)
        result = EngineSliceResult(outputs=[])
        if not live:
            result.outputs = [r.output() for r in rows]
            result.elapsed = time.perf_counter() - t_start
            return result

        kept: list[kv.RowKV | None] = []
        for r in live:
            entry = self.store.take(r.item.request_id, r.tokens) if self.kv_reuse else None
            r.kv_reused = entry is not None
            kept.append(entry.kv if entry is not None else None)

        logits, state = prefill(runner, live, kept)
        kept.clear()
        live = [live[b] for b in state.order]
        result.prefill_time = state.seconds
        result.pad_tokens = state.pad_tokens
        result.reprefill_tokens = state.reprefill_tokens
        result.kv_reused = all(r.kv_reused for r in live)
        choose(logits, live, list(range(len(live))))
        if on_step is not None:
            on_step({r.item.request_id: r.new for r in live})
        cache, mask = state.cache, state.mask
        width = mask.shape[1]
        static = None
        if 0 < max_steps - 1 <= self.preallocate_steps:
            static = kv.preallocated(kv.cache_layers(cache), mask, max_steps - 1, runner.config)
        if static is not None:
            cache, mask = static

        for step in range(max_steps - 1):
            active = [b for b, r in enumerate(live) if not r.done]
            if not active:
                break
            ids, pos = decode_inputs(live)
            if static is not None:
                mask[:, width + step] = 1
            else:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            t0 = time.perf_counter()
            logits, cache = runner.forward(ids, mask, pos, cache)
            choose(logits, live, active)
            runner.sync()
            result.decode_step_times.append(time.perf_counter() - t0)
            result.invalid_tokens += len(live) - len(active)
            if on_step is not None:
                on_step({r.item.request_id: r.new for r in live})

        if self.kv_reuse:
            for b, r in enumerate(live):
                if not r.done:
                    row_kv = kv.extract_row(kv.cache_layers(cache), mask, b)
                    # the cache covers the history minus the last token, which was sampled but never fed
                    assert row_kv.length == len(r.tokens) - 1, (row_kv.length, len(r.tokens))
                    self.store.put(r.item.request_id, r.tokens[:-1], row_kv)
        result.outputs = [r.output() for r in rows]
        result.elapsed = time.perf_counter() - t_start
        return result
