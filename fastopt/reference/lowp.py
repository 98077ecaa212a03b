"""Low-precision storage, the reference: ``docs/algorithms.md``, "Low-precision storage: bfloat16,
float16 and stochastic rounding", in plain NumPy, sharing no code with the kernels.

    round_nearest(x, dtype)          x.astype(dtype): round to nearest, ties to even (ml_dtypes for
                                     bfloat16, NumPy for float16)
    MIX(z)                           the splitmix64 finalizer on uint64, arithmetic mod 2⁶⁴
    tensor_key(seed, step, k)        MIX(MIX(MIX(k + γ) + step) + seed), γ = 0x9E3779B97F4A7C15,
                                     as the signed int64 with the same 64 bits
    uniform(key, i)                  (MIX(key + (i + 1)·γ) >> 40) · 2⁻²⁴
    round_stochastic(x, dtype, key, i)
                                     d = x truncated toward zero to the format, s its spacing there,
                                     u⁺ = d + s·sign(x); u⁺ when u < (|x| − |d|)/s, else d; the
                                     fraction is 0 when u⁺ is past the largest finite value

The stochastic neighbours are computed from the format's parameters in float64 (every bfloat16,
float16 and float32 value, their differences and quotients by the power-of-two spacing are exact
there), not from bit patterns.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["round_nearest", "round_stochastic", "tensor_key", "uniform"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)

@functools.lru_cache(maxsize=1)
def _formats() -> dict:
    """(fraction bits t, smallest normal exponent, largest finite value) of each format. ml_dtypes
    is imported here, at the first rounding, not with the module: it takes about 0.6 s."""
    import ml_dtypes

    return {
        np.dtype(ml_dtypes.bfloat16): (7, -126, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)),
        np.dtype(np.float16): (10, -14, float(np.finfo(np.float16).max)),
    }


def _format(dtype):
    dtype = np.dtype(dtype)
    formats = _formats()
    if dtype not in formats:
        raise ValueError(f"dtype: expected bfloat16 or float16, got {dtype}")
    return dtype, formats[dtype]


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (wrapping mod 2⁶⁴)."""
    with np.errstate(over="ignore"):
        z = z ^ (z >> np.uint64(30))
        z = z * np.uint64(0xBF58476D1CE4E5B9)
        z = z ^ (z >> np.uint64(27))
        z = z * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _u64(value) -> np.ndarray:
    """An integer (any sign, taken mod 2⁶⁴) as a one-element uint64 array."""
    return np.array([int(value) % (1 << 64)], dtype=np.uint64)


def tensor_key(seed: int, step: int, k: int) -> int:
    """MIX(MIX(MIX(k + γ) + step) + seed) mod 2⁶⁴, as a Python int in int64's range (same bits)."""
    with np.errstate(over="ignore"):
        z = _mix(_u64(k) + _GAMMA)
        z = _mix(z + _u64(step))
        z = _mix(z + _u64(seed))
    return int(z.view(np.int64)[0])


def uniform(key, index) -> np.ndarray:
    """u_i = (MIX(key + (i + 1)·γ) >> 40) · 2⁻²⁴ for each index i, float32 in [0, 1)."""
    index = np.asarray(index, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        z = _mix(_u64(key)[0] + (index + np.uint64(1)) * _GAMMA)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


def round_nearest(x, dtype) -> np.ndarray:
    """float32 ``x`` rounded to nearest (ties to even) in ``dtype`` (bfloat16 or float16); values
    past the format's range become ±Inf, as IEEE (no overflow warning)."""
    dtype, _ = _format(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, dtype=np.float32).astype(dtype)


def round_stochastic(x, dtype, key, index) -> np.ndarray:
    """float32 ``x`` rounded stochastically to ``dtype`` with u = uniform(key, index): |x| rounds
    to |d| + s when u < (|x| − |d|)/s, else to |d| (d: x truncated toward zero, s: the spacing of
    the format at |d|; a fraction of 0 past the largest finite value); ±Inf and NaN as in
    round_nearest."""
    dtype, (t, emin, largest) = _format(dtype)
    x = np.asarray(x, dtype=np.float32)
    u = uniform(key, np.broadcast_to(index, x.shape)).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN (signalling ones too) and Inf pass
        ax = np.abs(x.astype(np.float64))
        _, e = np.frexp(ax)  # ax = m·2^e, m ∈ [½, 1): ax ∈ [2^(e−1), 2^e)
        spacing = np.ldexp(1.0, np.maximum(e - 1, emin) - t)
        low = np.floor(ax / spacing) * spacing
        fraction = (ax - low) / spacing
        fraction = np.where(low >= largest, 0.0, fraction)  # u⁺ would be past the largest finite
        low = np.minimum(low, largest)
        magnitude = np.where(u < fraction, low + spacing, low)
        result = np.copysign(magnitude, x.astype(np.float64)).astype(dtype)
        return np.where(np.isfinite(x), result, x.astype(dtype))
