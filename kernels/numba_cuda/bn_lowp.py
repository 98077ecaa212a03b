"""Batch normalization of float16 input on the ``"numba-cuda"`` backend: float16 x and dy.

The CUDA counterpart of ``kernels/numba_cpu/bn_lowp.py`` (``docs/algorithms.md``, "Batch
normalization", "16-bit inputs"), same signatures and semantics: the result is the float32 batch
norm of x decoded exactly to float32 (and dy decoded), with y and dx rounded to nearest, ties to
even, into float16. The statistics, weight, bias, running statistics and dweight/dbias are
float32, as in cuDNN and torch.

    batchnorm_forward_lowp(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
                           training, momentum, eps, channel_axis, relu)
    batchnorm_backward_lowp(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                            training, channel_axis, relu)

float16 only: the CUDA array interface has no bfloat16 typestr, so a bfloat16 device array cannot
reach this backend; any x, dy, y or dx that is not float16 raises ``TypeError`` (before anything is
launched).

How (not fused): each call launches two kinds of kernels more than a float32 call, around the
float32 kernels of ``batchnorm.py`` used unchanged (``forward_on`` / ``backward_on``, on the
stream the caller's arrays choose):

    bn_lowp.decode_f16   x32[i] ← f32(x[i])        (and dy32[i] ← f32(dy[i]) in backward)
    float32              batchnorm forward(x32, …, y32, …) / backward(dy32, x32, …, dx32, …)
    bn_lowp.encode_f16   y[i] ← rn(y32[i])          (dx[i] ← rn(dx32[i]))

The conversions are ``lowp.f16_to_f32`` (exact) and ``lowp.f32_to_f16`` (round to nearest even,
the CPU backend's bits, NaN payload included), grid-stride loops over a uint16 view of the float16
array. x32, dy32, y32 and dx32 are float32 scratch from per-stream workspaces
(``_arrays.workspace``, named apart from the float32 kernels' own): they grow to the largest input
seen (3 × 4 bytes per element in backward) and stay allocated; on a stream chosen for torch
tensors they come from torch's caching allocator instead.

Bytes moved per element, as on the CPU backend: forward in training 24 B (a float32 call 12 B, a
fused float16 kernel would move 6 B), eval 20 B, backward 38 B (float32 20 B, fused 10 B). This
module buys the float32 kernels' numerics for float16 input, not speed; a fused kernel that decodes
inside the statistics and normalization passes and encodes as it stores is future work.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from ._arrays import dtype_of, flat, shape_of, stream_of, workspace
from ._jit import THREADS, blocks_for, kernel
from .batchnorm import backward_on, forward_on
from .lowp import f16_to_f32, f32_to_f16

__all__ = ["batchnorm_backward_lowp", "batchnorm_forward_lowp"]

_F16 = np.dtype(np.float16)


@kernel(lambda dt: types.void(types.uint16[::1], types.float32[::1]), dtypes=(types.float32,))
def _decode_f16(bits, out):
    """out[i] ← f32(bits[i]), float16 bits → float32, exact (subnormals, ±0, ±Inf, NaN); grid-stride."""
    for i in range(cuda.grid(1), bits.shape[0], cuda.gridsize(1)):
        out[i] = f16_to_f32(bits[i])


@kernel(lambda dt: types.void(types.float32[::1], types.uint16[::1]), dtypes=(types.float32,))
def _encode_f16(values, bits):
    """bits[i] ← rn(values[i]), float32 → float16 bits, round to nearest, ties to even; grid-stride."""
    for i in range(cuda.grid(1), values.shape[0], cuda.gridsize(1)):
        bits[i] = f32_to_f16(values[i])


def _check_f16(**arrays) -> None:
    for name, array in arrays.items():
        if dtype_of(array) != _F16:
            raise TypeError(f"{name}: the numba-cuda backend's 16-bit batch norm takes float16 only (the CUDA "
                            f"array interface has no bfloat16), got {dtype_of(array)}")


def _scratch(names, shape, stream) -> list:
    """float32 scratch arrays of ``shape``, one per workspace name, on ``stream``."""
    return [workspace(name, shape, np.float32, stream) for name in names]


def _decode(src, out, stream) -> None:
    n = math.prod(shape_of(src))
    if n:
        _decode_f16[np.float32][blocks_for(n), THREADS, stream](flat(src).view(np.uint16), flat(out))


def _encode(values, dst, stream) -> None:
    n = math.prod(shape_of(dst))
    if n:
        _encode_f16[np.float32][blocks_for(n), THREADS, stream](flat(values), flat(dst).view(np.uint16))


def batchnorm_forward_lowp(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
                           training, momentum, eps, channel_axis, relu):
    """Batch normalization forward of float16 ``x`` into float16 ``y`` (not fused): decode x to
    float32 scratch, the float32 forward on it (float32 ``weight``, ``bias``, running and saved
    statistics) into float32 scratch, encode into y (round to nearest even)."""
    _check_f16(x=x, y=y)
    stream = stream_of(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd)
    x32, y32 = _scratch(("bn_lowp_a", "bn_lowp_b"), shape_of(x), stream)
    _decode(x, x32, stream)
    forward_on(stream, x32, weight, bias, running_mean, running_var, y32, saved_mean, saved_invstd,
               training=training, momentum=momentum, eps=eps, channel_axis=channel_axis, relu=relu)
    _encode(y32, y, stream)


def batchnorm_backward_lowp(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                            training, channel_axis, relu):
    """Batch normalization backward of float16 ``dy`` and ``x`` into float16 ``dx`` (not fused):
    decode both to float32 scratch, the float32 backward on them (float32 parameters, saved
    statistics, ``dweight``, ``dbias``), encode dx (round to nearest even)."""
    _check_f16(dy=dy, x=x, dx=dx)
    stream = stream_of(x, dy, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias)
    dy32, x32, dx32 = _scratch(("bn_lowp_a", "bn_lowp_b", "bn_lowp_c"), shape_of(x), stream)
    _decode(dy, dy32, stream)
    _decode(x, x32, stream)
    backward_on(stream, dy32, x32, weight, bias, saved_mean, saved_invstd, dx32, dweight, dbias,
                training=training, channel_axis=channel_axis, relu=relu)
    _encode(dx32, dx, stream)
