"""The closed-form latency model keeps single-shape estimates; kept or not, every answer is the same."""

from __future__ import annotations

import pickle

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.estimators import BilinearLatencyModel
from tests.balancer.helpers import models


@settings(max_examples=200, deadline=None)
@given(latency=models, shapes=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 4096), st.integers(0, 128)),
                                       min_size=1, max_size=20))
def test_a_kept_estimate_is_the_one_computed_afresh(latency, shapes):
    fresh = BilinearLatencyModel(**latency.as_dict())  # nothing kept yet
    for n, length, steps in shapes + shapes:  # the second pass reads what the first kept
        kept = latency.batch_time(n, length, steps)
        assert kept == fresh._batch_time(n, length, steps)
        # ... and the very number the DP's array path computes for that shape
        assert kept == latency.batch_time(np.array([n]), np.array([length]), steps)[0]


def test_what_a_model_keeps_is_not_part_of_it():
    used = BilinearLatencyModel(1e-5, 2e-4, 1e-5, 5e-3, 1e-7, 3e-4, 1e-7, 2e-3)
    used.batch_time(4, 100, 16)
    unused = BilinearLatencyModel(**used.as_dict())
    assert used == unused and hash(used) == hash(unused) and repr(used) == repr(unused)
    assert set(used.as_dict()) == set("abcdefgh")
    again = pickle.loads(pickle.dumps(used))
    assert again == used and again.batch_time(4, 100, 16) == used.batch_time(4, 100, 16)
