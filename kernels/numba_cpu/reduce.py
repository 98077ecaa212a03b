"""Gradient reductions of the ``"numba"`` backend: Σg² over a list, the clip/unscale factor, scaling.

    grad_sumsq(grads)                                  Σ g² over every element of every array
    grad_multiplier(sumsq, max_norm, inv_scale, dtype) inv_scale · min(1, max_norm / (√sumsq · inv_scale + 1e-6))
    scale_grads_(grads, grad_mul)                      g ← g · grad_mul in place

(``docs/backends.md``, "Gradient reductions"). The lists run as one launch each over the tensor
table of ``multi.py`` (same limits: C-contiguous arrays of one dtype, alive and unmodified during
the call): a part runner per operation (``runners.py``: its loop compiled once per dtype, as a C
function) run by the optimizers' launcher, which a program that steps an optimizer has compiled
already.

``grad_sumsq`` accumulates in float64, each value widened before it is squared, so for float32
gradients no square or sum overflows (|g|² ≤ 1.2e77) and the sum is non-finite exactly when some
element is: +inf when an element is ±inf, NaN when one is NaN (inf + NaN = NaN; no term is
negative, so inf − inf cannot occur). For float64 gradients a finite |g| > 1.3e154 squares to
inf, as in the NumPy reference (``np.dot``). Each part of the flat element range (``multi.py``:
the cut depends on the total element count only) is summed by ``_sumsq_span``, compiled with
``fastmath={"reassoc"}`` and no other flag, so LLVM splits the sum into vector lanes (inf and NaN
still propagate: there is no ``nnan``/``ninf``); the per-part sums are then added in part order
(``sum_of_parts``). A list of fewer than ``multi.SERIAL_BELOW`` elements runs on the calling
thread (the launcher's serial twin): the same parts, in order.
The lanes depend on where each tensor piece starts, which depends on the cut only: the result is
bitwise reproducible for the same list shapes on any number of threads (not between CPUs with
different vector widths), and differs from the reference's ``np.dot`` order by rounding only.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .multi import (COLUMNS, PARAM, SERIAL_BELOW, aligned_split, array_at, float64_at, gather, last_at_most,
                    next_span, part_range, parts_on_host, pointer)
from .runners import Launched, Runner

__all__ = ["grad_multiplier", "grad_sumsq", "scale_grads_", "sum_of_parts"]


@numba.njit(fastmath={"reassoc"}, error_model="numpy")
def _sumsq_span(x, i0, i1):
    """Σ x[i]² for i in [i0, i1), in float64, in vector lanes (inlined by LLVM, flags kept)."""
    total = 0.0
    for i in range(i0, i1):
        value = np.float64(x[i])
        total += value * value
    return total


def _sumsq_run(part, parts, table_at, rows, offsets_at, count, sums_at):
    """Σ g² over part ``part`` of ``parts`` of the table's PARAM column, in float64, into slot
    ``part`` of the ``parts`` float64 slots at ``sums_at`` (a part runner: C signature
    ``runners.runner_signature`` of the gradients' dtype, whatever the slots' dtype)."""
    table = array_at(table_at, (rows, COLUMNS))
    offsets = array_at(offsets_at, count)
    like = sums_at[0]  # a value of the gradients' dtype: it types their pointers
    lo, hi = part_range(part, parts, offsets[count - 1])
    t = last_at_most(offsets, lo)
    total = 0.0
    while lo < hi:
        i0, i1, lo = next_span(offsets, t, lo, hi)
        total += _sumsq_span(pointer(table[t, PARAM], like), i0, i1)
        t += 1
    array_at(float64_at(sums_at), parts)[part] = total


def _scale_run(part, parts, table_at, rows, offsets_at, count, hyper_at):
    """g ← g · grad_mul over part ``part`` of ``parts`` of the table's PARAM column; ``hyper``
    holds grad_mul in the arrays' dtype (a part runner)."""
    table = array_at(table_at, (rows, COLUMNS))
    offsets = array_at(offsets_at, count)
    grad_mul = hyper_at[0]
    lo, hi = part_range(part, parts, offsets[count - 1])
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


# Run by the optimizers' launcher (``runners.launch_parts``), in parallel or, for a small list, on
# the calling thread: each compiles its loop once per dtype, and no parallel kernel of its own.
_sumsq = Launched(Runner(_sumsq_run, "sumsq_run", {}))
_scale = Launched(Runner(_scale_run, "scale_run", {}))


def sum_of_parts(kernel, table, offsets, dtype) -> float:
    """Run ``kernel``, a launched part runner that writes its part's float64 sum into slot
    ``part`` of one slot per part (handed to it as an array of ``dtype``), over the tensor table;
    return the slots' sum in part order, as a loop adds them (``np.sum`` adds pairwise)."""
    total = int(offsets[-1])
    sums = np.empty(parts_on_host(total), np.float64)
    (kernel.serial if total < SERIAL_BELOW else kernel)(table, offsets, sums.view(dtype))
    result = 0.0
    for value in sums.tolist():
        result += value
    return result


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
    return sum_of_parts(_sumsq, *table, grads[0].dtype)


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
    table, offsets = table
    (_scale.serial if offsets[-1] < SERIAL_BELOW else _scale)(table, offsets, np.array([grad_mul], grads[0].dtype))
