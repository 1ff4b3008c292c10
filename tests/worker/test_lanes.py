"""Lane planning: cuts by context length save padding, never lose a row, and stop when a cut does not pay."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.lanes import best_cut, padding, plan_lanes, prefill_groups


def test_prefill_groups_bound_padding():
    lengths = [5, 300, 7, 310, 6, 1000]
    groups = prefill_groups(lengths, 32)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert sum(longest - lengths[i] for i in g) <= 32
    assert len(groups) == 3


def test_one_long_row_among_short_ones_gets_a_lane_of_its_own():
    lengths = [10, 12, 11, 9] * 8 + [2000]
    lanes = plan_lanes(lengths, max_lanes=4, min_saving=1000)
    assert [lengths[i] for i in lanes[-1]] == [2000] and len(lanes) == 2


@given(st.lists(st.integers(1, 3000), min_size=1, max_size=40), st.integers(1, 4), st.integers(0, 20000))
def test_lanes_partition_the_rows_and_never_pad_more(lengths, max_lanes, min_saving):
    lanes = plan_lanes(lengths, max_lanes, min_saving)
    assert sorted(i for lane in lanes for i in lane) == list(range(len(lengths)))
    assert 1 <= len(lanes) <= max_lanes
    assert sum(padding([lengths[i] for i in lane]) for lane in lanes) <= padding(lengths)
    k, saving = best_cut(lengths)
    if len(lanes) == 1 and max_lanes > 1:
        assert saving < min_saving or k == 0
