"""Batch normalization of the ``"cupy"`` backend: host side of ``batchnorm.cu``.

Follows the backend contract in ``fastopt.batchnorm`` (validated arguments, non-negative
``channel_axis``, outputs preallocated) and the numerics of ``kernels/numba_cpu/batchnorm.py``
(see ``batchnorm.cu``: statistics and gradient sums accumulated in float64, elementwise passes in
the dtype). x is viewed as (outer, C, inner) without copying; inner = 1 (channels-last, e.g. NHWC
or (N, C)) and inner > 1 (channel-first, e.g. NCHW) have their own reduction and elementwise
kernels.

Launches: training forward 3 (statistics, finalize, normalize), eval forward 2 (coefficients,
normalize), backward 3 (sums, finalize, input gradient). Scratch: the per-chunk partials (3·P·C
float64 forward, 2·P·C backward) and the per-channel coefficients, never proportional to x.

Chunks: the reduction grid is sized to the device: P chunks per channel with C·P (channel-first)
or ⌈C/tc⌉·P (channels-last) blocks filling at most four whole waves of the blocks the device runs
at once (the occupancy calculator's count for that kernel), but no chunk smaller than two
register groups per thread: on an H200 (132 SMs) 256×64×56×56 gets a few dozen chunks per
channel, 4096×512×7×7 one or two. Results are deterministic for a given shape and device (fixed merge
order), but may differ in the last bits between devices with different SM counts.

``forward_at`` / ``backward_at`` are the launches inside the caller's ``_device.place``: 16-bit
batch norm (``bn_lowp.py``) runs them on float32 scratch between its conversion passes.
"""

from __future__ import annotations

import math

import numpy as np

from . import _device, _loader, _sources

__all__ = ["batchnorm_backward", "batchnorm_forward"]

_BLOCK = _sources.BLOCK
_GROUP = {np.dtype(np.float32): 16, np.dtype(np.float64): 8}  # batchnorm.cu Group<T>::size


def _view3(shape, channel_axis):
    return math.prod(shape[:channel_axis]), shape[channel_axis], math.prod(shape[channel_axis + 1:])


def _null_or(array) -> np.uint64:
    return np.uint64(0 if array is None else _device.pointer(array))


def _ptr(array) -> np.uint64:
    return np.uint64(_device.pointer(array))


_WAVES = 4  # reduction blocks per device-full of them: whole waves, short enough that none idles long


def _chunks(values: int, columns: int, threads: int, group: int, resident: int) -> int:
    """Chunks P of each column (a channel, or a tile of channels) of ``values`` values, read by
    ``threads`` threads per block: columns·P blocks fill the device in at most _WAVES whole waves
    of ``resident`` blocks (no small last wave), and no chunk holds fewer than two register groups
    per thread."""
    wanted = _WAVES * resident // columns
    most = -(-values // (2 * group * threads))
    return max(1, min(wanted, most))


def _tile(channels: int) -> int:
    """Channels per channels-last block: the power of 2 ≥ C, at most 32 (a warp's width)."""
    return min(32, 1 << max(0, (channels - 1).bit_length()))


def _width(dtype, pointers, run: int) -> int:
    """The vector width when every pointer is aligned and a vector never crosses ``run`` (the
    contiguous values of one channel: inner, channel-first; C, channels-last), else 1."""
    width = _sources.vector_width(dtype)
    if run % width == 0 and all(map(_sources.is_aligned, pointers)):
        return width
    return 1


def _fill(where, array, value) -> None:
    n = _device.size_of(array)
    if n:
        dtype = _device.dtype_of(array)
        name = _sources.bn_kernel("fill", dtype)
        _loader.launch("batchnorm", name, _loader.grid("batchnorm", name, n, _BLOCK), _BLOCK,
                       (_ptr(array), np.int64(n), dtype.type(value)), where.stream)


def batchnorm_forward(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
                      training, momentum, eps, channel_axis, relu):
    """Batch normalization forward (see the module docstring and ``fastopt.batchnorm``)."""
    if x.shape[channel_axis] == 0:
        return
    with _device.place(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd) as where:
        forward_at(where, x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd,
                   training=training, momentum=momentum, eps=eps, channel_axis=channel_axis, relu=relu)


def forward_at(where, x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
               training, momentum, eps, channel_axis, relu):
    """``batchnorm_forward``'s launches at the Place ``where`` (inside its ``_device.place``)."""
    dtype = _device.dtype_of(x)
    outer, channels, inner = _view3(tuple(x.shape), channel_axis)
    if channels == 0:
        return
    m = outer * inner
    launch = _loader.launch
    if training and m == 0:  # an empty batch: nothing to normalize, statistics undefined
        _fill(where, saved_mean, math.nan)
        _fill(where, saved_invstd, math.nan)
        return
    coef = where.scratch((4, channels), dtype)
    affine = (_null_or(weight), _null_or(bias), _ptr(saved_mean), _ptr(saved_invstd), _ptr(coef))
    if training:
        group = _GROUP[dtype]
        if inner == 1:
            tc = _tile(channels)
            tiles = -(-channels // tc)
            name = _sources.bn_kernel("bn_stats_cl", dtype)
            chunks = _chunks(outer, tiles, _BLOCK // tc, group, _loader.resident("batchnorm", name, _BLOCK))
            part = where.scratch((3, chunks, channels), np.float64)
            launch("batchnorm", name, tiles * chunks, _BLOCK,
                   (_ptr(x), np.int64(outer), np.int64(channels), np.int32(tc), np.int64(tiles),
                    np.int64(chunks), _ptr(part)), where.stream)
        else:
            name = _sources.bn_kernel("bn_stats_cf", dtype)
            chunks = _chunks(m, channels, _BLOCK, group, _loader.resident("batchnorm", name, _BLOCK))
            part = where.scratch((3, chunks, channels), np.float64)
            launch("batchnorm", name, channels * chunks, _BLOCK,
                   (_ptr(x), np.int64(channels), np.int64(inner), np.int64(m), np.int64(chunks), _ptr(part)),
                   where.stream)
        launch("batchnorm", _sources.bn_kernel("bn_finalize", dtype), channels, _BLOCK,
               (_ptr(part), np.int64(chunks), np.int64(channels), np.float64(eps), np.float64(momentum),
                _null_or(running_mean), _null_or(running_var), *affine), where.stream)
    else:
        launch("batchnorm", _sources.bn_kernel("bn_eval_coefficients", dtype), -(-channels // _BLOCK), _BLOCK,
               (_ptr(running_mean), _ptr(running_var), np.float64(eps), *affine, np.int64(channels)),
               where.stream)
    if m == 0:
        return
    run = channels if inner == 1 else inner
    width = _width(dtype, (_device.pointer(x), _device.pointer(y)), run)
    units = outer * channels * inner // width
    if inner == 1:
        name = _sources.bn_kernel("bn_normalize_cl", dtype, width)
        launch("batchnorm", name, _loader.grid("batchnorm", name, units, _BLOCK), _BLOCK,
               (_ptr(x), _ptr(coef), _ptr(y), np.int64(units), np.int64(channels), np.int32(relu)), where.stream)
    else:
        name = _sources.bn_kernel("bn_normalize_cf", dtype, width)
        launch("batchnorm", name, _loader.grid("batchnorm", name, units, _BLOCK), _BLOCK,
               (_ptr(x), _ptr(coef), _ptr(y), np.int64(units), np.int64(channels), np.int64(inner // width),
                np.int32(relu)), where.stream)


def batchnorm_backward(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                       training, channel_axis, relu):
    """Batch normalization backward (see the module docstring and ``fastopt.batchnorm``)."""
    if x.shape[channel_axis] == 0:
        return
    with _device.place(x, dy, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias) as where:
        backward_at(where, dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias,
                    training=training, channel_axis=channel_axis, relu=relu)


def backward_at(where, dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                training, channel_axis, relu):
    """``batchnorm_backward``'s launches at the Place ``where`` (inside its ``_device.place``)."""
    dtype = _device.dtype_of(x)
    outer, channels, inner = _view3(tuple(x.shape), channel_axis)
    if channels == 0:
        return
    m = outer * inner
    launch = _loader.launch
    if m == 0:
        _fill(where, dweight, 0.0)
        _fill(where, dbias, 0.0)
        return
    group = _GROUP[dtype]
    saved = (_ptr(saved_mean), _ptr(saved_invstd), _null_or(weight), _null_or(bias))
    if inner == 1:
        tc = _tile(channels)
        tiles = -(-channels // tc)
        name = _sources.bn_kernel("bn_grad_reduce_cl", dtype)
        chunks = _chunks(outer, tiles, _BLOCK // tc, group, _loader.resident("batchnorm", name, _BLOCK))
        part = where.scratch((2, chunks, channels), np.float64)
        launch("batchnorm", name, tiles * chunks, _BLOCK,
               (_ptr(dy), _ptr(x), *saved, np.int32(relu), np.int64(outer), np.int64(channels), np.int32(tc),
                np.int64(tiles), np.int64(chunks), _ptr(part)), where.stream)
    else:
        name = _sources.bn_kernel("bn_grad_reduce_cf", dtype)
        chunks = _chunks(m, channels, _BLOCK, group, _loader.resident("batchnorm", name, _BLOCK))
        part = where.scratch((2, chunks, channels), np.float64)
        launch("batchnorm", name, channels * chunks, _BLOCK,
               (_ptr(dy), _ptr(x), *saved, np.int32(relu), np.int64(channels), np.int64(inner), np.int64(m),
                np.int64(chunks), _ptr(part)), where.stream)
    coef = where.scratch((5, channels), dtype)
    launch("batchnorm", _sources.bn_kernel("bn_grad_finalize", dtype), channels, _BLOCK,
           (_ptr(part), np.int64(chunks), np.int64(channels), np.float64(m), np.int32(training),
            *saved, _ptr(dweight), _ptr(dbias), _ptr(coef)), where.stream)
    run = channels if inner == 1 else inner
    width = _width(dtype, (_device.pointer(x), _device.pointer(dy), _device.pointer(dx)), run)
    units = m * channels // width
    if inner == 1:
        name = _sources.bn_kernel("bn_input_grad_cl", dtype, width)
        launch("batchnorm", name, _loader.grid("batchnorm", name, units, _BLOCK), _BLOCK,
               (_ptr(dy), _ptr(x), _ptr(coef), _ptr(dx), np.int64(units), np.int64(channels), np.int32(relu)),
               where.stream)
    else:
        name = _sources.bn_kernel("bn_input_grad_cf", dtype, width)
        launch("batchnorm", name, _loader.grid("batchnorm", name, units, _BLOCK), _BLOCK,
               (_ptr(dy), _ptr(x), _ptr(coef), _ptr(dx), np.int64(units), np.int64(channels),
                np.int64(inner // width), np.int32(relu)), where.stream)
