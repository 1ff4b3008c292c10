"""Cluster configuration: how a replica's KV budget is shared between running batches and kept caches."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.config import EngineSettings


def test_kv_budget_split_between_batches_and_kept_caches():
    eng = EngineSettings(kv_keep_fraction=0.25)
    batch, keep = eng.split_kv_budget(8e9)
    assert (batch, keep) == (6e9, 2e9)
    # without KV reuse nothing is kept, so batches get the whole budget
    assert EngineSettings(kv_reuse=False).split_kv_budget(8e9) == (8e9, 0.0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_kv_keep_fraction_must_leave_room_for_both(fraction):
    with pytest.raises(ValidationError, match="kv_keep_fraction"):
        EngineSettings(kv_keep_fraction=fraction)
