"""Choosing the next token of each row: greedy, or seeded sampling that does not care about slicing.

Why not ``torch.multinomial`` with one generator per request: its stream position would depend on how many
draws happened before, i.e. on where earlier slices cut the request, and a generator cannot travel between
replicas. Instead the draw for absolute position p uses a fresh generator seeded from (seed, p), and we
invert the CDF with a single uniform number, so the token depends only on (seed, p, logits).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from worker.protocol import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over the 63-bit seed space
_MASK63 = (1 << 63) - 1


def position_seed(seed: int, position: int) -> int:
    """A generator seed for the token at absolute ``position`` of a request sampled with ``seed``."""
    x = (seed * _MIX + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 31
    return x & _MASK63


def adjust_logits(row: torch.Tensor, params: SamplingParams, history: Sequence[int], prompt_len: int,
                  end_ids: Iterable[int]) -> torch.Tensor:
    """The logits a row chooses from, in vLLM's order: min_tokens mask, then the penalties.

    Everything here depends only on the row's history, never on slicing: a sliced run sees the same history
    at each position, so it chooses the same token.
    """
    row = row.float().clone()
    output = list(history[prompt_len:])
    if params.min_tokens > len(output):
        ends = [t for t in end_ids if 0 <= t < row.numel()]
        if ends:
            row[ends] = float("-inf")
    if params.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), dtype=torch.long)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=row.numel())[: row.numel()]
        row -= params.frequency_penalty * counts.float() + params.presence_penalty * (counts > 0).float()
    return row


def sample_row(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Sample one token from a 1-D logits row (temperature, min_p, top_k, then nucleus), reproducibly when
    seeded."""
    scores = logits.float() / params.temperature
    probs_sorted, order = torch.sort(torch.softmax(scores, dim=-1), descending=True)
    if params.min_p > 0.0:
        probs_sorted = torch.where(probs_sorted >= params.min_p * probs_sorted[0], probs_sorted,
                                   torch.zeros_like(probs_sorted))
    if params.top_k > 0:
        probs_sorted[params.top_k:] = 0.0
    if params.top_p < 1.0:
        mass = probs_sorted / probs_sorted.sum()
        cum = torch.cumsum(mass, dim=-1)
        keep = (cum - mass) < params.top_p  # the smallest prefix whose mass reaches top_p; never empty
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
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    end_ids: Sequence[Iterable[int]],
    rows: Sequence[int],
) -> dict[int, int]:
    """Next token for each row index in ``rows`` of ``logits`` [B, V]. Row i has produced ``histories[i]``
    so far (its prompt is the first ``prompt_lens[i]`` tokens) and ends on ``end_ids[i]``; the token chosen
    sits at absolute position ``len(histories[i])``. Plain greedy rows share one argmax."""
    out: dict[int, int] = {}
    plain = [i for i in rows if params[i].greedy and not params[i].adjusts_logits]
    if plain:
        am = logits[plain].argmax(dim=-1).tolist()
        out.update(zip(plain, am))
    for i in rows:
        if i in out:
            continue
        row = logits[i].detach().cpu()
        if params[i].adjusts_logits:
            row = adjust_logits(row, params[i], histories[i], prompt_lens[i], end_ids[i])
        out[i] = int(row.argmax().item()) if params[i].greedy else sample_row(row, params[i], len(histories[i]))
    return out
