"""Gradient reductions of the ``"numba-cuda"`` backend: the global norm, its multiplier, scaling.

    grad_sumsq(grads)                     Σ g² over every element of every array, in float64
    grad_multiplier(sumsq, max_norm, inv_scale, dtype)
                                          inv_scale · min(1, max_norm / (√sumsq · inv_scale + 1e-6))
    scale_grads_(grads, grad_mul)         g ← g · grad_mul in place

All three stay on the device: ``grad_sumsq`` returns a float64 device array of shape (1,),
``grad_multiplier`` a device array of shape (1,) and the requested dtype (written by a one-thread
kernel), and both results are arrays of the kind of their input (CuPy in, CuPy out; torch in,
torch out; numba otherwise). Nothing is synchronized or copied to the host.

``grad_sumsq`` runs one tensor-list launch per dtype present (see ``_tensors``): each block adds
the squares of the chunks it visits in float64 (a float32 value is widened before it is squared,
so each square is exact), reduces its threads with warp shuffles (``cuda.shfl_down_sync``) and
shared memory, and writes one partial sum; a one-block kernel then adds the partials in a fixed
order. No atomics, so the result is the same on every run. A NaN or ±Inf element makes the sum
NaN or +Inf, so the sum is non-finite exactly when some element is (a finite float32 square
cannot overflow float64).

Kernels with float64 arithmetic in their float32 variant, on purpose: ``reduce.sumsq_partial``
and ``reduce.sumsq_total`` (the sum is float64 by contract), ``reduce.multiplier`` (computed in
float64 by contract, then rounded to the dtype) and ``reduce.convert`` (a float64 ↔ float32 copy
of a device ``grad_mul`` whose dtype differs from the gradients'). ``reduce.scale`` is pure dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64, types

from . import _tensors
from ._arrays import address, as_numpy_dtype, dtype_of, empty, flat, owns, shape_of, stream_of, workspace
from ._jit import THREADS, blocks_for, kernel

__all__ = ["grad_multiplier", "grad_sumsq", "multiplier", "scale_grads_"]

_CHUNK = _tensors.CHUNK
_view = _tensors.view
_find = _tensors.find
_WARPS = THREADS // 32  # warps per block of the reductions
assert THREADS % 32 == 0 and _WARPS <= 32
_FULL_MASK = 0xFFFFFFFF


@cuda.jit(device=True)
def _warp_sum(v):
    """Σ v over the 32 lanes of a warp, in lane 0 (a shuffle tree; every lane must call it)."""
    offset = 16
    while offset > 0:
        v += cuda.shfl_down_sync(_FULL_MASK, v, offset)
        offset //= 2
    return v


@cuda.jit(device=True)
def block_sum(v):
    """Σ v (float64) over the threads of a 1-D block of ``THREADS`` threads, valid in thread 0.

    Warp shuffles, then one float64 per warp through shared memory, then one more warp tree.
    Every thread of the block must call it (it synchronizes the block)."""
    partial = cuda.shared.array(32, float64)
    lane = cuda.threadIdx.x % 32
    warp = cuda.threadIdx.x // 32
    cuda.syncthreads()  # a previous call's readers are done with ``partial``
    v = _warp_sum(v)
    if lane == 0:
        partial[warp] = v
    cuda.syncthreads()
    v = partial[lane] if lane < _WARPS else 0.0
    return _warp_sum(v)


def _list_signature(dt):
    return types.void(types.int64[:, ::1], dt[::1], types.int64, types.float64[::1], types.int64)


@kernel(_list_signature, float64="the sum of squares is accumulated in float64 by contract")
def _sumsq_partial(table, like, chunks, partial, offset):
    """partial[offset + block] = Σ g² (float64) over the chunks this block visits."""
    acc = 0.0
    for q in range(cuda.blockIdx.x, chunks, cuda.gridDim.x):
        t = _find(table, q)
        n = table[t, 0]
        start = (q - table[t, 1]) * _CHUNK
        stop = min(start + _CHUNK, n)
        grad = _view(table[t, 2], n, like)
        for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
            g = float64(grad[i])
            acc += g * g
    acc = block_sum(acc)
    if cuda.threadIdx.x == 0:
        partial[offset + cuda.blockIdx.x] = acc


@kernel(lambda dt: types.void(dt[::1], types.int64, dt[::1]), float64="adds float64 partial sums",
        dtypes=(types.float64,))
def _sumsq_total(partial, count, out):
    """out[0] = Σ partial[:count], in a fixed order (one block)."""
    acc = 0.0
    for k in range(cuda.threadIdx.x, count, cuda.blockDim.x):
        acc += partial[k]
    acc = block_sum(acc)
    if cuda.threadIdx.x == 0:
        out[0] = acc


def grad_sumsq(grads):
    """Σ g² over every element of every array, as a float64 device array of shape (1,)."""
    like = grads[0] if grads else None
    out = empty((1,), np.float64, like) if like is not None else cuda.device_array(1, np.float64)
    stream = stream_of(out, *grads)
    groups: dict[np.dtype, list] = {}
    for g in grads:
        n = math.prod(shape_of(g))
        if n:
            groups.setdefault(dtype_of(g), []).append((g, n))
    launches = []
    for dtype, members in groups.items():
        table, chunks = _tensors.table([(n, address(g)) for g, n in members], stream)
        launches.append((dtype, table, chunks, flat(members[0][0])))
    blocks = [blocks_for(chunks, threads=1) for _, _, chunks, _ in launches]
    partial = workspace("sumsq", (max(1, sum(blocks)),), np.float64, stream)
    offset = 0
    for (dtype, table, chunks, like_flat), count in zip(launches, blocks):
        _sumsq_partial[dtype][count, THREADS, stream](table, like_flat, chunks, partial, offset)
        offset += count
    _sumsq_total[np.float64][1, THREADS, stream](partial, offset, flat(out))
    return out


@kernel(lambda dt: types.void(types.float64[::1], dt[::1], types.float64, types.float64,
                              types.boolean),
        float64="computes the multiplier in float64 by contract, then rounds it to the dtype")
def _multiplier(sumsq, out, max_norm, inv_scale, has_max_norm):
    """out[0] = inv_scale · min(1, max_norm / (√sumsq · inv_scale + 1e-6)) (NaN stays NaN), or
    inv_scale without max_norm; float64, rounded to out's dtype. One thread."""
    if cuda.grid(1) != 0:
        return
    result = inv_scale
    if has_max_norm:
        coef = max_norm / (math.sqrt(sumsq[0]) * inv_scale + 1e-6)
        if coef != coef:
            result = coef
        elif coef < 1.0:
            result = inv_scale * coef
    out[0] = result


def grad_multiplier(sumsq, max_norm, inv_scale, dtype):
    """The gradient multiplier as a device array of shape (1,) and ``dtype``, of sumsq's kind."""
    dtype = as_numpy_dtype(dtype)
    out = empty((1,), dtype, sumsq)
    has_max_norm = max_norm is not None
    _multiplier[dtype][1, 1, stream_of(sumsq)](
        flat(sumsq), flat(out), float(max_norm) if has_max_norm else 0.0, float(inv_scale),
        has_max_norm)
    return out


def _other(dt):
    return types.float64 if dt == types.float32 else types.float32


@kernel(lambda dt: types.void(_other(dt)[::1], dt[::1]), float64="converts between float64 and float32")
def _convert(source, out):
    """out[0] = source[0], rounded to out's dtype (one thread)."""
    if cuda.grid(1) == 0:
        out[0] = source[0]


def multiplier(grad_mul, dtype, stream, dummy):
    """(array, use_array, host value) for a kernel's grad_mul arguments: a device grad_mul as a
    1-D numba array of ``dtype`` (converted on the device if needed), else ``dummy`` and the float."""
    if owns(grad_mul):
        array = flat(grad_mul)
        if dtype_of(grad_mul) != dtype:
            converted = workspace("grad_mul", (1,), dtype, stream)
            _convert[dtype][1, 1, stream](array, converted)
            array = converted
        return array, True, 1.0
    return dummy, False, float(grad_mul)


@kernel(lambda dt: types.void(types.int64[:, ::1], dt[::1], dt[::1], types.boolean, dt, types.int64))
def _scale(table, like, mul_array, use_mul_array, mul, chunks):
    """g ← g · grad_mul over every tensor of the table (in the dtype)."""
    m = mul_array[0] if use_mul_array else mul
    for q in range(cuda.blockIdx.x, chunks, cuda.gridDim.x):
        t = _find(table, q)
        n = table[t, 0]
        start = (q - table[t, 1]) * _CHUNK
        stop = min(start + _CHUNK, n)
        grad = _view(table[t, 2], n, like)
        for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
            grad[i] = grad[i] * m


def scale_grads_(grads, grad_mul) -> None:
    """g ← g · grad_mul in place for every array (one launch per dtype present)."""
    groups: dict[np.dtype, list] = {}
    for g in grads:
        n = math.prod(shape_of(g))
        if n:
            groups.setdefault(dtype_of(g), []).append((g, n))
    for dtype, members in groups.items():
        stream = stream_of(*(g for g, _ in members), grad_mul)
        table, chunks = _tensors.table([(n, address(g)) for g, n in members], stream)
        like = flat(members[0][0])
        mul_array, use_mul_array, mul = multiplier(grad_mul, dtype, stream, like)
        _scale[dtype][blocks_for(chunks, threads=1), THREADS, stream](
            table, like, mul_array, use_mul_array, dtype.type(mul), chunks)

