"""The GPU kernels' encode of an 8-bit code: a bucket table and one compare, no search.

The code of x̂ (|x̂| ≤ 1) is q = #{i : x̂ > t_i} over the 255 sorted midpoints of the map
(``numba_cpu/quantize.py``). The GPU kernels find it in two steps, the method of the CPU's vector
encoder (``numba_cpu/state8.py``, the 16-bit keys):

1. The bucket of x̂ is the top 16 bits of its float32 pattern: the sign and the 15-bit ``top``
   (8 exponent bits, 7 mantissa bits). Order the buckets as the values are ordered (the monotone
   key of ``numba_cpu/state8._ukeys``, top half). No two midpoints of either map share a bucket
   (checked when the table is built), so every midpoint in a bucket below x̂'s is below x̂, every
   one in a bucket above is above, and at most one, t_{q'}, shares x̂'s bucket, where
   q' = #{i : bucket(t_i) < bucket(x̂)}.
2. q = q' + [x̂ > t_{q'}]  (t_255 = +Inf), the exact compare with the midpoint itself.

``table(t)[b]`` is q' for bucket index b = neg·RANGE + min(max(top, LOW), HIGH) − LOW (neg:
the sign bit), t the map's 255 float32 midpoints. LOW is the top of 2⁻²³, below the smallest
midpoint magnitude of either map (1.6·10⁻⁷, about 2⁻²²·⁵⁵), HIGH the top of 1.0: with no midpoint
of either sign below LOW or above HIGH (``table`` checks), clamping keeps q'. One byte a bucket:
2·RANGE = 5,890 bytes a map, held in shared memory.

This replaced an 8-step binary search over the midpoints in shared memory: eight dependent loads,
compares and selects a state and element, the loads of a warp's lanes colliding in few banks. On
an H200, 8-bit Adam over 2²⁸ elements went from 4.04 to 2.58 ms (cupy, with pointers resolved once
a block as well) and from 5.83 to 3.85 ms (numba-cuda) (``bench/RESULTS.md``, "Second lease"). q
equals the search's count, and so the reference's nearest code, ties included: checked for every
float32 in [−1, 1] once, and on chosen values in ``tests/test_code_search.py``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HIGH", "LOW", "RANGE", "bucket_index", "table"]


def _tops(values) -> np.ndarray:
    return (np.asarray(values, np.float32).view(np.uint32) & np.uint32(0x7FFFFFFF)) >> np.uint32(16)


LOW = int(_tops(np.float32(2.0 ** -23)))
HIGH = int(_tops(np.float32(1.0)))
RANGE = HIGH - LOW + 1


def bucket_index(x) -> np.ndarray:
    """The table index of float32 values x, as the kernels compute it (int64)."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.int64)
    top = (bits & 0x7FFFFFFF) >> 16
    return (bits >> 31) * RANGE + np.clip(top, LOW, HIGH) - LOW


def _monotone_top(x) -> np.ndarray:
    bits = np.asarray(x, np.float32).view(np.uint32)
    return (np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000)) >> np.uint32(16)).astype(np.int64)


def table(thresholds) -> np.ndarray:
    """q' of every bucket index (uint8, 2·RANGE entries: x ≥ +0 first, then x ≤ −0), for a map's
    255 sorted float32 midpoints ``thresholds``; raises ValueError where the encode would be wrong."""
    t = np.asarray(thresholds, np.float32)
    if t.shape != (255,) or not (np.diff(t) > 0).all():
        raise ValueError(f"thresholds must be 255 increasing float32 midpoints, got shape {t.shape}")
    keys = _monotone_top(t)
    if not (np.diff(keys) > 0).all():
        raise ValueError("two midpoints share a bucket: the one-compare encode would be wrong")
    if (_tops(t) < LOW).any() or (_tops(t) > HIGH).any():
        raise ValueError("a midpoint's magnitude lies outside [2^-23, 1]: clamping would change q'")
    tops = np.arange(LOW, HIGH + 1, dtype=np.uint32)
    positive = (tops << np.uint32(16)).view(np.float32)
    negative = ((tops | np.uint32(0x8000)) << np.uint32(16)).view(np.float32)
    found = np.searchsorted(keys, _monotone_top(np.concatenate([positive, negative])), side="left")
    return found.astype(np.uint8)
