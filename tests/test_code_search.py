"""The GPU kernels' encode of an 8-bit code: a bucket table and one compare (kernels/_code_search.py).

The encode runs on the device; here it is replayed in NumPy over the tables the backends load, and
compared with the reference quantizer's nearest-code rule (``fastopt/reference/quantize.py``) and
with the count of midpoints below x̂, on every midpoint and its float32 neighbours, both ends of
every bucket, and random values. (Run once over every float32 in [−1, 1], 2,130,706,434 values per
map, the two agreed everywhere.)
"""

from __future__ import annotations

import numpy as np
import pytest

from fastopt.kernels import _code_search as C
from fastopt.kernels.cupy import _sources
from fastopt.reference.quantize import dynamic_map


def _encode(x, signed):
    """The kernels' two steps: q' = table[bucket(x)], then q = q' + [x > t_{q'}] (t_255 = +Inf)."""
    t = np.append(_sources.thresholds8(signed), np.float32(np.inf))
    q = C.table(_sources.thresholds8(signed))[C.bucket_index(x)].astype(np.int64)
    return q + (x > t[q])


def _nearest(x, signed):
    """The reference's rule: the nearest map value, the smaller code on a tie (float64 distances)."""
    m = dynamic_map(signed).astype(np.float64)
    return np.argmin(np.abs(x.astype(np.float64)[:, None] - m[None, :]), axis=1)


def _probes(signed, rng):
    mids = _sources.thresholds8(signed)
    up, down = np.float32(np.inf), np.float32(-np.inf)
    tops = np.arange(C.LOW - 2, C.HIGH + 1, dtype=np.uint32)
    edges = np.concatenate([tops << 16, (tops << 16) | 0xFFFF]).view(np.float32)  # both ends of each bucket
    x = np.concatenate([dynamic_map(signed), mids, np.nextafter(mids, up), np.nextafter(mids, down),
                        edges, rng.uniform(-1, 1, 20000).astype(np.float32),
                        (rng.standard_normal(20000) * 1e-5).astype(np.float32),
                        np.array([1, -1, 0, -0.0, 1e-30, -1e-30, 1e-45], np.float32)])
    x = x[np.abs(x) <= 1]
    return np.concatenate([x, -x])


@pytest.mark.parametrize("signed", [False, True])
def test_bucket_table_and_one_compare_give_the_reference_codes(signed, rng):
    x = _probes(signed, rng)
    got = _encode(x, signed)
    np.testing.assert_array_equal(got, np.searchsorted(_sources.thresholds8(signed), x, side="left"))
    np.testing.assert_array_equal(got, _nearest(x, signed))  # the unsigned map: code 0 for x < 0


def test_tables_are_a_byte_per_bucket_of_either_sign():
    for signed in (False, True):
        table = C.table(_sources.thresholds8(signed))
        assert table.dtype == np.uint8 and table.shape == (2 * C.RANGE,)
        positive, negative = table[:C.RANGE].astype(int), table[C.RANGE:].astype(int)
        assert (np.diff(positive) >= 0).all() and (np.diff(negative) <= 0).all()  # larger |x|, further out
    assert C.HIGH == int(np.float32(1).view(np.uint32) >> 16)


def test_both_gpu_backends_load_the_same_tables():
    from fastopt.kernels.numba_cpu.quantize import THRESHOLDS

    for signed in (False, True):
        np.testing.assert_array_equal(C.table(THRESHOLDS[(signed, np.dtype(np.float32))]),
                                      C.table(_sources.thresholds8(signed)))


@pytest.mark.parametrize("change, message", [
    (lambda t: np.concatenate([t[:200], [np.nextafter(t[201], np.float32(-np.inf))], t[201:]]), "share a bucket"),
    (lambda t: np.concatenate([[np.float32(1e-8)], t[1:]]), "outside"),  # the unsigned map's first is 1.6e-7
    (lambda t: t[::-1], "increasing"),
])
def test_midpoints_the_encode_cannot_take_are_refused(change, message):
    t = _sources.thresholds8(False)
    with pytest.raises(ValueError, match=message):
        C.table(change(t).astype(np.float32))
