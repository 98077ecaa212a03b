"""Gradient reductions of the ``"numba"`` backend: Σg² over a list, the clip/unscale factor, scaling.

    grad_sumsq(grads)                                  Σ g² over every element of every array
    grad_multiplier(sumsq, max_norm, inv_scale, dtype) inv_scale · min(1, max_norm / (√sumsq · inv_scale + 1e-6))
    scale_grads_(grads, grad_mul)                      g ← g · grad_mul in place

(``docs/backends.md``, "Gradient reductions"). The lists run as one kernel call each over the
tensor table of ``multi.py`` (same limits: C-contiguous arrays of one dtype, alive and unmodified
during the call).

``grad_sumsq`` accumulates in float64, each value widened before it is squared, so for float32
gradients no square or sum overflows (|g|² ≤ 1.2e77) and the sum is non-finite exactly when some
element is: +inf when an element is ±inf, NaN when one is NaN (inf + NaN = NaN; no term is
negative, so inf − inf cannot occur). For float64 gradients a finite |g| > 1.3e154 squares to
inf, as in the NumPy reference (``np.dot``). Each part of the flat element range (``multi.py``:
the cut depends on the total element count only) is summed by ``_sumsq_span``, compiled with
``fastmath={"reassoc"}`` and no other flag, so LLVM splits the sum into vector lanes (inf and NaN
still propagate: there is no ``nnan``/``ninf``); the per-part sums are then added in part order.
A list of fewer than ``multi.SERIAL_BELOW`` elements runs the kernel's serial twin: the same parts
in the same order on the calling thread (``_jit``).
The lanes depend on where each tensor piece starts, which depends on the cut only: the result is
bitwise reproducible for the same list shapes on any number of threads (not between CPUs with
different vector widths), and differs from the reference's ``np.dot`` order by rounding only.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange, types

from ._jit import kernel
from .multi import (PARAM, SERIAL_BELOW, aligned_split, gather, last_at_most, next_span,
                    part_range, parts_for, pointer)

__all__ = ["grad_multiplier", "grad_sumsq", "scale_grads_"]


@numba.njit(fastmath={"reassoc"}, error_model="numpy")
def _sumsq_span(x, i0, i1):
    """Σ x[i]² for i in [i0, i1), in float64, in vector lanes (inlined by LLVM, flags kept)."""
    total = 0.0
    for i in range(i0, i1):
        value = np.float64(x[i])
        total += value * value
    return total


_TABLE = (types.int64[:, ::1], types.int64[::1])


@numba.njit(error_model="numpy")
def _sumsq_part(part, parts, table, offsets, like):
    """Σ g² over part ``part`` of ``parts`` of the table's PARAM column, in float64."""
    lo, hi = part_range(part, parts, offsets[offsets.shape[0] - 1])
    t = last_at_most(offsets, lo)
    total = 0.0
    while lo < hi:
        i0, i1, lo = next_span(offsets, t, lo, hi)
        total += _sumsq_span(pointer(table[t, PARAM], like), i0, i1)
        t += 1
    return total


@kernel([types.float64(*_TABLE, dtype) for dtype in (types.float32, types.float64)])
def _sumsq(table, offsets, like):
    """Σ g² over the table's PARAM column, float64; ``like`` a scalar of the arrays' dtype. The
    per-part sums are added in part order."""
    parts = parts_for(offsets[offsets.shape[0] - 1])
    partial = np.empty(parts)
    for part in prange(parts):
        partial[part] = _sumsq_part(part, parts, table, offsets, like)
    result = 0.0
    for part in range(parts):
        result += partial[part]
    return result


@numba.njit(error_model="numpy")
def _scale_part(part, parts, table, offsets, grad_mul):
    """g ← g · grad_mul over part ``part`` of ``parts`` of the table's PARAM column."""
    lo, hi = part_range(part, parts, offsets[offsets.shape[0] - 1])
    t = last_at_most(offsets, lo)
    while lo < hi:
        i0, i1, lo = next_span(offsets, t, lo, hi)
        g = pointer(table[t, PARAM], grad_mul)
        split = aligned_split(table[t, PARAM], i0, i1, grad_mul)
        for i in range(i0, split):
            g[i] = g[i] * grad_mul
        for i in range(split, i1):
            g[i] = g[i] * grad_mul
        t += 1


@kernel([types.void(*_TABLE, dtype) for dtype in (types.float32, types.float64)])
def _scale(table, offsets, grad_mul):
    """g ← g · grad_mul over the table's PARAM column, in the arrays' dtype."""
    parts = parts_for(offsets[offsets.shape[0] - 1])
    for part in prange(parts):
        _scale_part(part, parts, table, offsets, grad_mul)


def _sized(kernel, table):
    """``kernel``, or its serial twin for a small list (``multi.SERIAL_BELOW``)."""
    return kernel.serial if table[1][-1] < SERIAL_BELOW else kernel


def _by_dtype(grads):
    """The list split into lists of one dtype, in first-seen order."""
    groups: dict = {}
    for g in grads:
        groups.setdefault(g.dtype, []).append(g)
    return list(groups.values())


def _table(grads, written):
    """The tensor table of ``grads``, or None when they mix dtypes (one call per dtype then; not
    a contract case, but cheap to allow)."""
    try:
        return gather(grads, param_written=written)
    except ValueError:
        if len({g.dtype for g in grads}) == 1:
            raise
        return None


def grad_sumsq(grads) -> float:
    """Σ g² over every element of every array in ``grads``, accumulated in float64 (a Python
    float; non-finite exactly when some element is)."""
    if len(grads) == 0:
        return 0.0
    table = _table(grads, written=False)
    if table is None:
        return sum(grad_sumsq(group) for group in _by_dtype(grads))
    return _sized(_sumsq, table)(*table, grads[0].dtype.type(0))


def grad_multiplier(sumsq, max_norm, inv_scale, dtype) -> float:
    """inv_scale · min(1, max_norm / (√sumsq · inv_scale + 1e-6)), or inv_scale when max_norm is
    None; host float64 math, exactly as the reference (which returns it unrounded: the update
    kernels and ``scale_grads_`` round it to the arrays' dtype once). NaN when sumsq is NaN (min()
    would drop it); 0 when sumsq is inf (max_norm / inf)."""
    if max_norm is None:
        return float(inv_scale)
    coef = max_norm / (math.sqrt(sumsq) * inv_scale + 1e-6)
    if math.isnan(coef):
        return math.nan
    return inv_scale * min(1.0, coef)


def scale_grads_(grads, grad_mul) -> None:
    """g ← g · grad_mul in place for every array of ``grads``, in their dtype."""
    if len(grads) == 0:
        return
    table = _table(grads, written=True)
    if table is None:
        for group in _by_dtype(grads):
            scale_grads_(group, grad_mul)
        return
    _sized(_scale, table)(*table, grads[0].dtype.type(grad_mul))
