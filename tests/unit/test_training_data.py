"""The train/test split and file sharding that every worker computes on its own."""

import numpy as np

from lakeray.training.data import holdout_mask


def test_split_is_deterministic_and_near_the_fraction():
    ids = np.arange(200_000, dtype=np.int64)
    first, again = holdout_mask(ids, 0.2), holdout_mask(ids.copy(), 0.2)
    assert np.array_equal(first, again)
    assert abs(first.mean() - 0.2) < 0.01
    # Sequential ids must not split into blocks: both halves of the id range get held-out rows.
    assert abs(first[:100_000].mean() - first[100_000:].mean()) < 0.01


def test_split_of_a_row_does_not_depend_on_its_neighbours():
    ids = np.array([5, 17, 123456789, 42], dtype=np.int64)
    whole = holdout_mask(ids, 0.3)
    alone = np.array([holdout_mask(ids[i : i + 1], 0.3)[0] for i in range(len(ids))])
    assert np.array_equal(whole, alone)
