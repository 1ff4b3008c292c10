"""How a continuous batch of mixed context lengths is cut into lanes (separately padded sub-batches).

Every row of a left-padded batch attends over the batch's widest context, so a batch holding one long row and
many short ones computes mostly padding. Cutting it in two by length saves that padding at the price of one
more forward per step. Pure Python, so the engine (``worker.continuous``) and the simulator share it.
"""

from __future__ import annotations

GROUP_PAD_TOKENS = 32
"""Newcomers are prefilled together only while padding them to their group's longest costs fewer tokens than
this (about one forward's fixed cost in prefill tokens on the CPU profile: d / a ≈ 28)."""

SPLIT_SAVING = 8192
"""Padded row-tokens a cut must save before it is worth one more forward per step (a forward's fixed cost is
about 6.5 k row-tokens of attention on the CPU profile, h / e) and the copy that makes it."""


def padding(lengths: list[int]) -> int:
    """Row-tokens of padding when these rows share one left-padded batch."""
    return len(lengths) * max(lengths) - sum(lengths) if lengths else 0


def best_cut(lengths: list[int]) -> tuple[int, int]:
    """(k, saving): cutting the rows sorted by length after the k shortest saves ``saving`` row-tokens of padding
    (k = 0: no cut saves anything)."""
    order = sorted(lengths)
    n, total = len(order), padding(order)
    best_k, best_saving = 0, 0
    prefix = 0
    for k in range(1, n):
        prefix += order[k - 1]
        short = k * order[k - 1] - prefix
        long_ = (n - k) * order[-1] - (sum(order) - prefix)
        saving = total - short - long_
        if saving > best_saving:
            best_k, best_saving = k, saving
    return best_k, best_saving


def plan_lanes(lengths: list[int], max_lanes: int, min_saving: int = SPLIT_SAVING) -> list[list[int]]:
    """Indices of ``lengths`` in lanes: the widest-saving cut first, while a cut saves ``min_saving``."""
    lanes = [sorted(range(len(lengths)), key=lambda i: lengths[i])]
    while len(lanes) < max_lanes:
        cuts = [(best_cut([lengths[i] for i in lane]), j) for j, lane in enumerate(lanes)]
        (k, saving), j = max(cuts, key=lambda c: c[0][1])
        if saving < min_saving or k == 0:
            break
        lane = lanes.pop(j)
        lanes += [lane[:k], lane[k:]]
    return [lane for lane in lanes if lane]


def prefill_groups(lengths: list[int], max_pad: int) -> list[list[int]]:
    """Indices of ``lengths`` cut into groups of similar length, each padding at most ``max_pad`` tokens in all."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            pad = sum(lengths[i] - lengths[j] for j in group)  # the group padded to its new longest, lengths[i]
            if pad <= max_pad:
                group.append(i)
                continue
        groups.append([i])
    return groups
