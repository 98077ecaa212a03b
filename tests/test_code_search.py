"""The GPU kernels' code search over midpoints in breadth-first order (kernels/_code_search.py).

The search itself runs on the device; here it is replayed in NumPy over the same table the
backends build, and compared with the reference quantizer's nearest-code rule
(``fastopt/reference/quantize.py``) on every midpoint, its float32 neighbours and random values.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastopt.kernels._code_search import search_order
from fastopt.kernels.cupy import _sources
from fastopt.reference.quantize import dynamic_map


def _search(x, table):
    """The kernels' loop: node ← 2·node + [x > table[node]], 8 times from node 1; code = node − 256."""
    node = np.ones(x.shape, dtype=np.int64)
    for _ in range(8):
        node = 2 * node + (x > table[node])
    return node - 256


def _nearest(x, signed):
    """The reference's rule: the nearest map value, the smaller code on a tie (float64 distances)."""
    m = dynamic_map(signed).astype(np.float64)
    return np.argmin(np.abs(x.astype(np.float64)[:, None] - m[None, :]), axis=1)


def test_order_is_a_permutation_of_the_midpoints_and_the_sentinel():
    order = search_order()
    assert sorted(order.tolist()) == list(range(256))
    assert order[0] == 255  # +Inf, never read
    assert order[1] == 127  # the root splits the codes in halves


@pytest.mark.parametrize("signed", [False, True])
def test_breadth_first_search_gives_the_reference_codes(signed, rng):
    thresholds = np.append(_sources.thresholds8(signed), np.float32(np.inf))
    table = thresholds[search_order()]
    m = dynamic_map(signed)
    lo = np.float32(-1) if signed else np.float32(0)
    mids = _sources.thresholds8(signed)
    probes = np.concatenate([
        m, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
        rng.uniform(lo, 1, 20000).astype(np.float32),
        (rng.standard_normal(20000) * 1e-4).astype(np.float32).clip(lo, 1),
        np.array([lo, 1, 0], dtype=np.float32)])
    if not signed:
        probes = np.abs(probes)
    np.testing.assert_array_equal(_search(probes, table), _nearest(probes, signed))
    # and the sorted 8-step search the kernels used before gives the same: the same comparisons
    assert np.array_equal(_search(probes, table), np.searchsorted(mids, probes, side="left"))


def test_a_level_of_the_tree_hits_each_shared_memory_bank_at_most_level_size_over_32_times():
    """The 2^l nodes of level l sit in consecutive words (1, 1, 1, 1, 1, 1, 2, 4 per bank); in
    sorted order a level's nodes pile into few of the 32 banks (1, 2, 4, then 8 per bank)."""
    order = search_order()
    for level in range(8):
        nodes = np.arange(1 << level, 2 << level)
        per_bank = np.bincount(nodes % 32, minlength=32).max()
        assert per_bank == max(1, (1 << level) // 32), level
        sorted_per_bank = np.bincount(order[nodes] % 32, minlength=32).max()
        assert sorted_per_bank == min(1 << level, 8), level
