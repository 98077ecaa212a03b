"""Block-wise dynamic quantization of the ``"numba"`` backend (``docs/algorithms.md``, "Block-wise
dynamic quantization"):

    quantize_blockwise(x, codes, absmax, *, signed, block)     a_b = fl32(max|x_i|), q_i = nearest m_j to x_i / a_b
    dequantize_blockwise(codes, absmax, out, *, signed, block) y_i = m_{q_i} · a_b

Each kernel runs over blocks in parallel (``prange``): a block's absmax is found first, in a
register (the block's 256 values stay in L1 for the second loop, which divides and writes the
codes), so memory sees one read of x and one write of codes and absmax. Inputs below
``SERIAL_BELOW`` elements run the serial twins (``_jit``): same code, same results.

The map is a constant of this module, built here from its definition (and checked bit for bit
against the reference's in the tests). The nearest code is a count: q = #{j : x̂ > t_j} over the
255 thresholds t_j, the midpoints (m_j + m_{j+1})/2, found by an 8-step branch-free binary
search. For float64 the midpoints are exact float64 numbers; for float32 each is rounded down to
float32, which gives the same count for every float32 x̂ (no float32 lies in (t↓, t) when t is
not one, and x̂ = t is a tie, which this count sends to the smaller code). So the kernels match
the reference's argmin code for code, ties included, in both dtypes.
"""

from __future__ import annotations

import numpy as np
from numba import prange, types

from ._jit import kernel

__all__ = ["dequantize_blockwise", "quantize_blockwise"]

SERIAL_BELOW = 1 << 15  # elements; as the optimizer updates (multi.SERIAL_BELOW), not measured separately


def _map(signed: bool) -> np.ndarray:
    """The dynamic map: 0, 1 and ±10^(e−6)·(2n + 18k + 9)/(20n), k < n, n = 2^e (signed) or 2^(e+1)."""
    values = [0.0, 1.0]
    for e in range(7):
        n = 2 ** e if signed else 2 ** (e + 1)
        for k in range(n):
            v = (2 * n + 18 * k + 9) / (20 * n * 10 ** (6 - e))  # one rounding to float64 of an exact ratio
            values += [v, -v] if signed else [v]
    return np.array(sorted(values), dtype=np.float32)


def _thresholds(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 255 midpoints, exact in float64 (sums of two nearby float32 values), and rounded down to float32."""
    lo, hi = m[:-1].astype(np.float64), m[1:].astype(np.float64)
    mid = (lo + hi) / 2
    assert (mid - lo == hi - mid).all()
    down = mid.astype(np.float32)
    above = down.astype(np.float64) > mid
    down[above] = np.nextafter(down[above], np.float32(-np.inf))
    return down, mid


MAP = {signed: _map(signed) for signed in (True, False)}
ZERO = {signed: int(np.flatnonzero(MAP[signed] == 0)[0]) for signed in (True, False)}
THRESHOLDS = {(signed, np.dtype(dtype)): t for signed in (True, False)
              for dtype, t in zip((np.float32, np.float64), _thresholds(MAP[signed]))}
MAP_AS = {(signed, np.dtype(dtype)): MAP[signed].astype(dtype) for signed in (True, False)
          for dtype in (np.float32, np.float64)}


@kernel([types.void(dtype[::1], types.uint8[::1], types.float32[::1], dtype[::1], types.int64, types.int64)
         for dtype in (types.float32, types.float64)])
def _quantize(x, codes, absmax, thresholds, zero, block):
    """a_b = fl32(max_{i∈b}|x_i|); q_i = #{j : x_i / a_b > t_j}; a non-finite block: a_b = NaN,
    q_i = zero; a_b = 0: q_i = zero. ``thresholds``: the 255 midpoints in x's dtype."""
    n = x.shape[0]
    blocks = (n + block - 1) // block
    for b in prange(blocks):
        lo = b * block
        hi = min(lo + block, n)
        amax = abs(x[lo])
        check = x[lo] - x[lo]  # NaN exactly when some x_i is NaN or ±inf (inf − inf, NaN − NaN)
        for i in range(lo + 1, hi):
            v = x[i]
            av = abs(v)
            if av > amax:
                amax = av
            check += v - v
        a = np.float32(amax)
        if check != check or np.isinf(a):
            absmax[b] = np.float32(np.nan)
            for i in range(lo, hi):
                codes[i] = zero
        elif a == np.float32(0):
            absmax[b] = a
            for i in range(lo, hi):
                codes[i] = zero
        else:
            absmax[b] = a
            for i in range(lo, hi):
                s = x[i] / a
                q = 0
                step = 128
                while step > 0:
                    if s > thresholds[q + step - 1]:
                        q += step
                    step >>= 1
                codes[i] = q


@kernel([types.void(types.uint8[::1], types.float32[::1], dtype[::1], dtype[::1], types.int64)
         for dtype in (types.float32, types.float64)])
def _dequantize(codes, absmax, out, values, block):
    """y_i = m_{q_i} · a_b in out's dtype; ``values``: the map in out's dtype."""
    n = codes.shape[0]
    blocks = (n + block - 1) // block
    for b in prange(blocks):
        lo = b * block
        hi = min(lo + block, n)
        a = absmax[b]
        for i in range(lo, hi):
            out[i] = values[codes[i]] * a


def _sized(k, n: int):
    return k.serial if n < SERIAL_BELOW else k


def quantize_blockwise(x, codes, absmax, *, signed, block) -> None:
    """codes ← the map's codes of x, absmax ← one float32 per block (validated arguments)."""
    flat = x.reshape(-1)
    if flat.size == 0:
        return
    _sized(_quantize, flat.size)(flat, codes.reshape(-1), absmax, THRESHOLDS[(bool(signed), x.dtype)],
                                 ZERO[bool(signed)], block)


def dequantize_blockwise(codes, absmax, out, *, signed, block) -> None:
    """out ← m[codes] · absmax of each element's block (validated arguments)."""
    flat = out.reshape(-1)
    if flat.size == 0:
        return
    _sized(_dequantize, flat.size)(codes.reshape(-1), absmax, flat, MAP_AS[(bool(signed), out.dtype)], block)
