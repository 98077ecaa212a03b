"""Per-channel (count, mean, M2) of x for the ``"numba"`` backend: what synchronized batch norm's
ranks merge.

    m  = the number of values per channel,   μ = Σx/m,   M2 = Σ(x − μ)²      (float64)

One pass over x from memory, through the statistics kernels of training-mode forward
(``batchnorm``): ``_stats_channel_first`` (inner > 1, e.g. NCHW) or ``_stats_channels_last``
(inner = 1, e.g. NHWC or (N, C)), each writing per-(chunk, channel) partials (the chunk's mean and
M2, float64; a block of values is read once from memory, float64 input in the corrected two-pass
formula within the cached block, float32 in one shifted pass), then ``_merge_mean_m2`` merges the
chunks per channel with Chan et al.'s pairwise update, in chunk order,

    n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n,

and writes μ and M2 (not the variance or invstd: the ranks go on merging); forward's own merge
does the same updates before it turns M2 into invstd. Inputs below
the size threshold run the kernels' serial twins (``_sized``); scratch comes from the per-thread
workspace (``_scratch``), so a call allocates no array memory once the workspace has grown.

Which values chunk k holds is the chunking of the statistics kernels (``batchnorm._chunk_values``);
the merge is forward's own, ``batchnorm._merge_chunks``, so the two cannot drift apart.
"""

from __future__ import annotations

import numpy as np

from ._jit import kernel
from .batchnorm import (
    _channel_first_chunks,
    _chunks,
    _merge_chunks,
    _scratch,
    _sized,
    _stats_channel_first,
    _stats_channels_last,
    _view3,
)

__all__ = ["batchnorm_statistics"]


@kernel([f"void({t}[:, :, ::1], float64[:, ::1], float64[:, ::1], int64, int64, float64[::1], float64[::1])"
         for t in ("float32", "float64")], parallel=False)
def _merge_mean_m2(x, part_mean, part_m2, groups, pieces, mean, m2):
    """Merge the chunks' (μ_k, M2_k) per channel into ``mean`` = μ and ``m2`` = M2 (float64) with
    forward's merge, ``batchnorm._merge_chunks``. x (viewed as (outer, C, inner)) is read for its
    shape only: it says which values each chunk held (and gives the kernel its two dtypes)."""
    outer, _, inner = x.shape
    _merge_chunks(part_mean, part_m2, groups, pieces, outer, inner, mean, m2)


def batchnorm_statistics(x, mean, m2, *, channel_axis):
    """Write μ and M2 of every channel of x into the float64 arrays ``mean`` and ``m2`` of shape
    (C,) (module docstring); NaN when x holds no values per channel. x is validated: C-contiguous,
    float32 or float64, ``channel_axis`` non-negative."""
    x3 = _view3(x, channel_axis)
    outer, channels, inner = x3.shape
    if channels == 0:
        return
    if outer * inner == 0:  # no values: the statistics are undefined
        mean.fill(np.nan)
        m2.fill(np.nan)
        return
    shifted = x.dtype == np.float32  # one-pass blocks, as forward's statistics
    if inner == 1:
        chunks = _chunks(outer, channels)
        part_mean, part_m2, sums = _scratch(((chunks, channels), np.float64), ((chunks, channels), np.float64),
                                            ((chunks, 3, channels), np.float64))
        _sized(_stats_channels_last, x)(x.reshape(outer, channels), chunks, shifted, part_mean, part_m2, sums)
        groups, pieces = chunks, 1
    else:
        groups, pieces = _channel_first_chunks(outer, inner)
        part_mean, part_m2 = _scratch(((groups * pieces, channels), np.float64),
                                      ((groups * pieces, channels), np.float64))
        _sized(_stats_channel_first, x)(x3, groups, pieces, shifted, part_mean, part_m2)
    _merge_mean_m2(x3, part_mean, part_m2, groups, pieces, mean, m2)
