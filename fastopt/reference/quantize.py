"""Block-wise dynamic quantization, the reference: ``docs/algorithms.md``, "Block-wise dynamic
quantization", in plain NumPy, sharing no code with the kernels.

    map        m_0 < … < m_255: 0, 1 and ±10^(e−6)·(1/10 + 9/10·(2k+1)/(2n_e)), k < n_e, e = 0…6,
               n_e = 2^e signed, 2^(e+1) unsigned, each rounded once to float32 from its exact value
    absmax     a_b = fl32(max_{i∈b} |x_i|)
    quantize   x̂_i = fl(x_i / a_b) in x's dtype;  q_i = argmin_j |x̂_i − m_j| (ties: the smaller j)
    dequantize y_i = fl(m_{q_i} · a_b) in y's dtype

A block holding NaN or ±inf (or whose absmax overflows float32) gets a_b = NaN and every code
the zero code; a block with a_b = 0 gets the zero code everywhere.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

__all__ = ["dequantize_blockwise", "dynamic_map", "quantize_blockwise"]

_MAPS: dict[bool, np.ndarray] = {}


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 values of the dynamic (tree) map, sorted, float32 (a read-only array)."""
    signed = bool(signed)
    if signed not in _MAPS:
        exact = [Fraction(0), Fraction(1)]
        for e in range(7):
            n = 2 ** e if signed else 2 ** (e + 1)
            for k in range(n):
                value = Fraction(10) ** (e - 6) * (Fraction(1, 10) + Fraction(9, 10) * Fraction(2 * k + 1, 2 * n))
                exact += [value, -value] if signed else [value]
        exact.sort()
        # float(Fraction) is correctly rounded to float64; every value has few enough bits that the
        # second rounding, to float32, rounds the exact value (checked against Fraction below)
        values = np.array([float(v) for v in exact], dtype=np.float64).astype(np.float32)
        for v, x in zip(values, exact):
            below, above = np.nextafter(v, np.float32(-np.inf)), np.nextafter(v, np.float32(np.inf))
            assert abs(Fraction(float(v)) - x) <= min(abs(Fraction(float(below)) - x), abs(Fraction(float(above)) - x))
        values.flags.writeable = False
        _MAPS[signed] = values
    return _MAPS[signed]


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def quantize_blockwise(x, codes, absmax, *, signed, block) -> None:
    """codes ← q, absmax ← a of ``x`` (any shape, C order, blocks of ``block`` elements)."""
    m = dynamic_map(signed).astype(np.float64)
    zero = int(np.flatnonzero(m == 0)[0])
    flat, out = x.reshape(-1), codes.reshape(-1)
    for b in range(_blocks(flat.size, block)):
        values = flat[b * block:(b + 1) * block]
        with np.errstate(over="ignore", invalid="ignore"):
            a = np.float32(np.max(np.abs(values)))
        if not np.isfinite(a):
            absmax[b], out[b * block:(b + 1) * block] = np.float32(np.nan), zero
            continue
        absmax[b] = a
        if a == 0:
            out[b * block:(b + 1) * block] = zero
            continue
        scaled = (values / values.dtype.type(a)).astype(np.float64)  # x̂ in x's dtype, widened exactly
        # |x̂ − m_j| in float64 is exact near every midpoint (docs/algorithms.md), so argmin (which
        # returns the first, smaller, index of equal distances) implements the tie rule
        out[b * block:(b + 1) * block] = np.argmin(np.abs(scaled[:, None] - m[None, :]), axis=1)


def dequantize_blockwise(codes, absmax, out, *, signed, block) -> None:
    """out ← m[codes] · absmax of each element's block, in out's dtype."""
    m = dynamic_map(signed)
    flat, y = codes.reshape(-1), out.reshape(-1)
    for b in range(_blocks(flat.size, block)):
        values = m[flat[b * block:(b + 1) * block]].astype(y.dtype)
        y[b * block:(b + 1) * block] = values * y.dtype.type(absmax[b])
