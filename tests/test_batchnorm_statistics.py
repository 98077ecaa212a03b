"""``batchnorm_statistics``: the per-channel (mean, M2) synchronized batch norm merges across ranks,
the numba backend against the float64 reference.

    m = values per channel,  μ = Σx/m,  M2 = Σ(x − μ)²      (float64 outputs of shape (C,))

The table runs (shape, channel axis) × dtype × offset: both layouts (channel-first rows, grouped
and split into pieces; channels-last rows in one or several chunks; the serial twins and the
parallel kernels), zero and one value per channel, no channels, and a large mean (offset 1e4,
std 1) where a naive E[x²] − E[x]² loses every digit. Outputs are poisoned with NaN first, so an
unwritten channel fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastopt import reference
from fastopt.kernels import numba_cpu

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["float32", "float64"]

# Error allowed, relative to the magnitude summed (|μ| + σ for the mean, M2 for M2): both sides
# accumulate in float64 from the same values, so float32 input is held to float64 sums.
TOL = {np.dtype(np.float32): 1e-11, np.dtype(np.float64): 1e-11}

# (shape, channel_axis)
SHAPES = [
    ((0, 3), 1),  # no values per channel, channels-last
    ((0, 3, 4, 4), 1),  # no values per channel, channel-first
    ((2, 3, 0), 1),  # no values per channel: empty rows
    ((4, 0), 1),  # no channels
    ((1, 5), 1),  # one value per channel
    ((1, 4, 1, 1), 1),  # one value per channel, NCHW with 1 × 1 images
    ((5, 3), 1),
    ((4, 3, 5), 1),
    ((2, 3, 4, 5), 1),
    ((3, 4, 5, 2), 2),  # the channel axis in the middle
    ((2, 4, 5, 3), 3),  # NHWC
    ((64, 3, 100), 1),  # channel-first, short rows grouped into 2 chunks
    ((3000, 12), 1),  # channels-last, 2 chunks, serial
    ((2, 2, 40000), 1),  # channel-first, parallel, rows split into pieces
    ((5000, 16), 1),  # channels-last, parallel, 3 chunks
]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in SHAPES]


def _run(module, x, axis):
    channels = x.shape[axis]
    mean = np.full(channels, np.nan)
    m2 = np.full(channels, np.nan)
    module.batchnorm_statistics(x, mean, m2, channel_axis=axis)
    return mean, m2


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["mean0", "mean1e4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
def test_numba_matches_the_reference(shape, axis, dtype, offset):
    rng = np.random.default_rng()
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    ref_mean, ref_m2 = _run(reference, x, axis)
    mean, m2 = _run(numba_cpu, x, axis)
    assert mean.dtype == m2.dtype == np.float64
    if x.shape[axis] == 0:  # nothing to write
        assert mean.shape == m2.shape == ref_mean.shape == (0,)
        return
    m = x.size // x.shape[axis]
    if m == 0:
        assert np.isnan(mean).all() and np.isnan(m2).all() and np.isnan(ref_mean).all() and np.isnan(ref_m2).all()
        return
    assert np.isfinite(mean).all() and np.isfinite(m2).all()
    tol = TOL[np.dtype(dtype)]
    # against what was summed: the values for μ (|μ| + σ), the squared deviations for M2
    scale = np.abs(ref_mean) + np.sqrt(ref_m2 / m)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=tol * scale.max(), err_msg="mean")
    np.testing.assert_allclose(m2, ref_m2, rtol=tol, atol=tol * ref_m2.max(), err_msg="m2")
    if m == 1:
        assert (m2 == 0.0).all() and (mean == np.moveaxis(x, axis, -1).reshape(-1)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_a_constant_channel_has_its_value_and_no_spread(dtype):
    x = np.full((6, 3, 50), 1234.5, dtype)
    x[:, 1] = -0.25
    for module in (reference, numba_cpu):
        mean, m2 = _run(module, x, 1)
        assert list(mean) == [1234.5, -0.25, 1234.5] and list(m2) == [0.0, 0.0, 0.0], module.__name__


def test_the_statistics_give_forwards_variance():
    """σ² = M2/m is the biased variance that training-mode forward normalizes with."""
    rng = np.random.default_rng()
    x = rng.standard_normal((8, 5, 6, 7)) * 3.0 + 2.0
    mean, m2 = _run(numba_cpu, x, 1)
    m = x.size // 5
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(m2 / m, x.var(axis=(0, 2, 3)), rtol=1e-12)
