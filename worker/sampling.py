"""Choosing the next token of each row: greedy, or seeded sampling that does not care about slicing.

Why not ``torch.multinomial`` with one generator per request: its stream position would depend on how many
draws happened before, i.e. on where earlier slices cut the request, and a generator cannot travel between
replicas. Instead the draw for absolute position p uses a fresh generator seeded from (seed, p), and we
invert the CDF with a single uniform number, so the token depends only on (seed, p, logits).
"""

from __future__ import annotations

from typing import Sequence

import torch

from worker.protocol import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over the 63-bit seed space
_MASK63 = (1 << 63) - 1


def position_seed(seed: int, position: int) -> int:
    """A generator seed for the token at absolute ``position`` of a request sampled with ``seed``."""
    x = (seed * _MIX + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & _MASK63


def sample_row(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Sample one token from a 1-D logits row (temperature, then nucleus), reproducibly when seeded."""
    scores = logits.float() / params.temperature
    probs_sorted, order = torch.sort(torch.softmax(scores, dim=-1), descending=True)
    if params.top_p < 1.0:
        cum = torch.cumsum(probs_sorted, dim=-1)
        keep = (cum - probs_sorted) < params.top_p  # the smallest prefix whose mass reaches top_p; never empty
        probs_sorted = torch.where(keep, probs_sorted, torch.zeros_like(probs_sorted))
    cdf = torch.cumsum(probs_sorted, dim=-1)
    if params.seed is None:
        u = torch.rand(()).item()
    else:
        gen = torch.Generator().manual_seed(position_seed(params.seed, position))
        u = torch.rand((), generator=gen).item()
    idx = int(torch.searchsorted(cdf, torch.tensor([u * cdf[-1].item()], dtype=cdf.dtype)).item())
    idx = min(idx, cdf.numel() - 1)
    return int(order[idx].item())


def select_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int], rows: Sequence[int]
) -> dict[int, int]:
    """Next token for each row index in ``rows`` of ``logits`` [B, V]; ``positions[i]`` is row i's absolute
    position of the token being chosen. Greedy rows share one argmax."""
    out: dict[int, int] = {}
    greedy = [i for i in rows if params[i].greedy]
    if greedy:
        am = logits[greedy].argmax(dim=-1).tolist()
        out.update(zip(greedy, am))
    for i in rows:
        if not params[i].greedy:
            out[i] = sample_row(logits[i].detach().cpu(), params[i], positions[i])
    return out
