"""Batch normalization of 16-bit input on the ``"numba"`` backend: bfloat16 and float16 x and dy.

``docs/algorithms.md``, "Batch normalization", "16-bit inputs": the result is the float32 batch
norm of x decoded exactly to float32 (and dy decoded), with y and dx rounded to nearest, ties to
even, into x's dtype. The statistics, weight, bias, running statistics and dweight/dbias are
float32, as in cuDNN and torch.

How (not fused): each call runs two passes more than a float32 call, around the float32 kernels
of ``batchnorm.py`` used unchanged:

    decode   x32[i] ← f32(x[i])          (and dy32[i] ← f32(dy[i]) in backward)   ``lowbits``
    float32  batchnorm.batchnorm_forward(x32, …, y32, …)  /  batchnorm_backward(dy32, x32, …, dx32, …)
    encode   y[i] ← rn(y32[i])            (dx[i] ← rn(dx32[i]))

x32, dy32, y32 and dx32 are float32 scratch arrays in a per-thread workspace that grows to the
largest input seen (3 × 4 bytes per element of it: dy32, x32 and dx32 in backward) and is then
reused: a call with ``out=`` allocates no array memory in the steady state, and the workspace
stays allocated for the life of the thread. The decode and encode kernels are flat parallel loops
over tiles of ``_TILE`` elements, float32 arithmetic and integer bit operations only
(``lowbits.bf16_to_f32``, ``f32_to_bf16``, ``f16_to_f32``, ``f32_to_f16``), with serial twins
(``_jit``) below ``_SERIAL_BELOW`` elements, the threshold of ``batchnorm.py``.

Bytes moved per element (the float32 passes as ``batchnorm.py`` runs them):

    forward, training   decode 2 + 4, statistics 4, normalize 4 + 4, encode 4 + 2   = 24 B
                        (float32 forward: 12 B; a fused 16-bit kernel: 2 + 2 + 2 = 6 B)
    forward, eval       decode 2 + 4, normalize 4 + 4, encode 4 + 2                  = 20 B
                        (float32: 8 B; fused: 4 B)
    backward            decode 2·(2 + 4), reduce 8, input gradient 8 + 4, encode 4 + 2 = 38 B
                        (float32 backward: 20 B; fused: 2·2 + 2·2 + 2 = 10 B)

So a 16-bit call moves about twice the bytes of a float32 call instead of half: this module buys
correctness and the float32 kernels' numerics, not speed. Measured on x of shape (64, 64, 56, 56)
(12.8 M elements, the idle 2-core development machine, medians of 9 calls with ``out=``):
forward in training 4.4 ms float32, 10.2 ms bfloat16, 14.5 ms float16 (11.8 ms once the float16
conversions stopped branching); backward 8.3 / 16.8 / 21.5 (16.4) ms (``bench/RESULTS.md``, "Low
precision"). The conversion passes run near memory speed (bfloat16 decode 36 GB/s; float16
encode, which computes the subnormal rounding for every element, 17 GB/s) since each tile's loop
is a function of its own (written inline in the ``prange`` body it did not vectorize and the
passes were 4x slower). (The float32 kernels write large outputs with streaming stores, so
the encode pass reads y32 or dx32 back from memory.) A fused kernel that decodes inside the
statistics and normalization passes and encodes as it stores is future work.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import prange

from . import batchnorm as _bn
from ._cache import njit as cached_njit
from ._jit import kernel
from .lowbits import bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16

__all__ = ["batchnorm_backward", "batchnorm_forward", "conversion_kernels"]

_TILE = 1 << 14  # elements one task of a decode/encode kernel converts
_SERIAL_BELOW = _bn._SERIAL_BELOW  # fewer elements: the serial twins (as the float32 kernels)
_ALIGN = 64  # bytes: every scratch array starts on a cache line


# ---------------------------------------------------------------------------------------------
# kernels: flat conversions, one tile of ``_TILE`` elements per task


# Each tile runs a flat loop over its slices, compiled as a function of its own: written inline
# in the prange body (for i in range(lo, hi), or over lo + j) the loop did not vectorize, and the
# kernels ran 2-5x slower than this form (bench/RESULTS.md, "Low precision").


@cached_njit()
def _bf16_to_f32_run(bits, out):
    for i in range(bits.shape[0]):
        out[i] = bf16_to_f32(bits[i])


@cached_njit()
def _f16_to_f32_run(bits, out):
    for i in range(bits.shape[0]):
        out[i] = f16_to_f32(bits[i])


@cached_njit()
def _f32_to_bf16_run(values, bits):
    for i in range(values.shape[0]):
        bits[i] = f32_to_bf16(values[i])


@cached_njit()
def _f32_to_f16_run(values, bits):
    for i in range(values.shape[0]):
        bits[i] = f32_to_f16(values[i])


@kernel(["void(uint16[::1], float32[::1])"])
def _decode_bf16(bits, out):
    """out[i] ← f32(bits[i]), bfloat16 bits → float32, exact."""
    n = bits.shape[0]
    for t in prange((n + _TILE - 1) // _TILE):
        lo = t * _TILE
        hi = min(lo + _TILE, n)
        _bf16_to_f32_run(bits[lo:hi], out[lo:hi])


@kernel(["void(uint16[::1], float32[::1])"])
def _decode_f16(bits, out):
    """out[i] ← f32(bits[i]), float16 bits → float32, exact (subnormals, ±0, ±Inf, NaN)."""
    n = bits.shape[0]
    for t in prange((n + _TILE - 1) // _TILE):
        lo = t * _TILE
        hi = min(lo + _TILE, n)
        _f16_to_f32_run(bits[lo:hi], out[lo:hi])


@kernel(["void(float32[::1], uint16[::1])"])
def _encode_bf16(values, bits):
    """bits[i] ← rn(values[i]), float32 → bfloat16 bits, round to nearest, ties to even."""
    n = values.shape[0]
    for t in prange((n + _TILE - 1) // _TILE):
        lo = t * _TILE
        hi = min(lo + _TILE, n)
        _f32_to_bf16_run(values[lo:hi], bits[lo:hi])


@kernel(["void(float32[::1], uint16[::1])"])
def _encode_f16(values, bits):
    """bits[i] ← rn(values[i]), float32 → float16 bits, round to nearest, ties to even."""
    n = values.shape[0]
    for t in prange((n + _TILE - 1) // _TILE):
        lo = t * _TILE
        hi = min(lo + _TILE, n)
        _f32_to_f16_run(values[lo:hi], bits[lo:hi])


# ---------------------------------------------------------------------------------------------
# host side


class _Workspace(threading.local):
    """Each thread's float32 scratch: one buffer grown to the largest need seen, and the views of
    the recent (shape, count) requests into it (cleared when it grows)."""

    def __init__(self):
        self.buffer = np.empty(0, np.uint8)
        self.views: dict = {}


_workspace = _Workspace()
_VIEWS_KEPT = 16


def _scratch(shape: tuple, count: int) -> list[np.ndarray]:
    """``count`` float32 arrays of ``shape``, 64-byte aligned and disjoint, in this thread's
    workspace; their contents are undefined and they are valid until this thread's next call.
    Disjoint from ``batchnorm.py``'s own workspace, which the float32 kernels use meanwhile."""
    key = (shape, count)
    views = _workspace.views.get(key)
    if views is not None:
        return views
    n = math.prod(shape)
    stride = -(-n * 4 // _ALIGN) * _ALIGN
    need = count * stride + _ALIGN
    buffer = _workspace.buffer
    if buffer.size < need:
        buffer = _workspace.buffer = np.empty(max(need, buffer.size + buffer.size // 2), np.uint8)
        _workspace.views.clear()  # views into the old buffer
    start = -buffer.ctypes.data % _ALIGN
    views = [buffer[start + k * stride:start + k * stride + n * 4].view(np.float32).reshape(shape)
             for k in range(count)]
    if len(_workspace.views) >= _VIEWS_KEPT:
        _workspace.views.clear()
    _workspace.views[key] = views
    return views


def conversion_kernels(dtype: str) -> tuple:
    """The decode and encode kernels of the 16-bit format ``dtype`` ("bfloat16" or "float16")."""
    return (_decode_f16, _encode_f16) if dtype == "float16" else (_decode_bf16, _encode_bf16)


def _sized(k, n: int):
    return k.serial if n < _SERIAL_BELOW else k


def _half(dtype) -> bool:
    """True for float16, False for bfloat16 (the only two 16-bit formats the API admits)."""
    return np.dtype(dtype) == np.float16


def _decode(src: np.ndarray, out: np.ndarray) -> None:
    bits = src.reshape(-1).view(np.uint16)
    _sized(_decode_f16 if _half(src.dtype) else _decode_bf16, bits.size)(bits, out.reshape(-1))


def _encode(values: np.ndarray, dst: np.ndarray) -> None:
    bits = dst.reshape(-1).view(np.uint16)
    _sized(_encode_f16 if _half(dst.dtype) else _encode_bf16, bits.size)(values.reshape(-1), bits)


def batchnorm_forward(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
                      training, momentum, eps, channel_axis, relu):
    """Batch normalization forward of bfloat16/float16 ``x`` into ``y`` of x's dtype: decode x to
    float32 scratch, ``batchnorm.batchnorm_forward`` on it (float32 ``weight``, ``bias``, running
    and saved statistics) into float32 scratch, encode into y (round to nearest even)."""
    x32, y32 = _scratch(x.shape, 2)
    _decode(x, x32)
    _bn.batchnorm_forward(x32, weight, bias, running_mean, running_var, y32, saved_mean, saved_invstd,
                          training=training, momentum=momentum, eps=eps, channel_axis=channel_axis, relu=relu)
    _encode(y32, y)


def batchnorm_backward(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                       training, channel_axis, relu):
    """Batch normalization backward of bfloat16/float16 ``dy`` and ``x`` (one dtype) into ``dx`` of
    that dtype: decode both to float32 scratch, ``batchnorm.batchnorm_backward`` on them (float32
    parameters, saved statistics, ``dweight``, ``dbias``), encode dx (round to nearest even)."""
    dy32, x32, dx32 = _scratch(x.shape, 3)
    _decode(dy, dy32)
    _decode(x, x32)
    _bn.batchnorm_backward(dy32, x32, weight, bias, saved_mean, saved_invstd, dx32, dweight, dbias,
                           training=training, channel_axis=channel_axis, relu=relu)
    _encode(dx32, dx)
