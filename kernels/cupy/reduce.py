"""Gradient reductions of the ``"cupy"`` backend: host side of ``reduce.cu``.

    grad_sumsq(grads) -> device float64 array of shape (1,): Σ g² over every element of every
        array, accumulated in float64 (tensor-list kernel writing one partial per block, then one
        block adding the partials in a fixed order). inf or NaN exactly when some g is.
    grad_multiplier(sumsq, max_norm, inv_scale, dtype) -> device array of shape (1,) and ``dtype``:
        inv_scale·min(1, max_norm / (√sumsq·inv_scale + 1e-6)), or inv_scale when max_norm is None;
        one thread, float64, rounded to dtype.
    scale_grads_(grads, grad_mul): g ← g·grad_mul in place (tensor-list kernel).

No host synchronization: results stay on the device, ``grad_mul`` may be such a device array.
Gradient lists may mix float32 and float64 arrays (one launch sequence per dtype).
"""

from __future__ import annotations

import numpy as np

from . import _device, _loader, _sources
from .optim import grad_mul_args, pack_lists

__all__ = ["grad_multiplier", "grad_sumsq", "scale_grads_"]

_BLOCK = _sources.BLOCK


def _by_dtype(arrays) -> dict:
    """Non-empty arrays grouped by dtype: {dtype: ([pointer], [size])}."""
    groups: dict = {}
    for a in arrays:
        n = _device.size_of(a)
        if n:
            rows, sizes = groups.setdefault(_device.dtype_of(a), ([], []))
            rows.append([_device.pointer(a)])
            sizes.append(n)
    return groups


def grad_sumsq(grads):
    grads = list(grads)
    with _device.place(grads[0] if grads else None, *grads[1:]) as where:
        launches = []
        for dtype, (rows, sizes) in _by_dtype(grads).items():
            name = _sources.reduce_kernel("sumsq_partial", dtype)
            for packed, units in pack_lists(rows, sizes, 1, _sources.vector_width(dtype)):
                launches.append((name, packed, _loader.grid("reduce", name, units, _BLOCK)))
        total = sum(grid for _, _, grid in launches)
        partials = where.scratch((max(total, 1),), np.float64)
        base = _device.pointer(partials)
        offset = 0
        for name, packed, grid in launches:
            _loader.launch("reduce", name, grid, _BLOCK, (packed, np.uint64(base + 8 * offset)), where.stream)
            offset += grid
        out = where.output((1,), np.float64)
        _loader.launch("reduce", _sources.reduce_kernel("sum_partials"), 1, _BLOCK,
                       (np.uint64(base), np.int64(total), np.uint64(_device.pointer(out))), where.stream)
        del partials  # returned to its pool on this stream: reused only by later work on it
    return out


def grad_multiplier(sumsq, max_norm, inv_scale, dtype):
    dtype = _device.as_numpy_dtype(dtype)  # a NumPy or torch dtype
    on_device = not isinstance(sumsq, (int, float, np.integer, np.floating))
    with _device.place(sumsq if on_device else None) as where:
        out = where.output((1,), dtype)
        args = (np.uint64(_device.pointer(sumsq) if on_device else 0),
                np.float64(0.0 if on_device else sumsq),
                np.float64(0.0 if max_norm is None else max_norm), np.float64(inv_scale),
                np.int32(max_norm is not None), np.uint64(_device.pointer(out)))
        _loader.launch("reduce", _sources.reduce_kernel("grad_multiplier", dtype), 1, 1, args, where.stream)
    return out


def scale_grads_(grads, grad_mul) -> None:
    grads = list(grads)
    groups = _by_dtype(grads)
    if not groups:
        return
    first = next(g for g in grads if _device.size_of(g))
    with _device.place(first, *grads, grad_mul) as where:
        for dtype, (rows, sizes) in groups.items():
            mul_value, mul_pointer = grad_mul_args(grad_mul, dtype)
            name = _sources.reduce_kernel("scale_list", dtype)
            for packed, units in pack_lists(rows, sizes, 1, _sources.vector_width(dtype)):
                _loader.launch("reduce", name, _loader.grid("reduce", name, units, _BLOCK), _BLOCK,
                               (packed, mul_value, mul_pointer), where.stream)
