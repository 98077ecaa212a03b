"""Batch normalization of 16-bit input on the ``"cupy"`` backend: bfloat16 and float16 x and dy.

The functions of ``kernels/numba_cpu/bn_lowp.py`` (exported there and here as
``batchnorm_forward_lowp`` / ``batchnorm_backward_lowp``), same signatures and semantics
(``docs/algorithms.md``, "Batch normalization", "16-bit inputs"): the result is the float32 batch
norm of x decoded exactly to float32 (and dy decoded), with y and dx rounded to nearest, ties to
even, into x's dtype. The statistics, weight, bias, running statistics and dweight/dbias are
float32, as in cuDNN and torch.

How (not fused): each call runs the float32 kernels of ``batchnorm.cu`` unchanged between
conversion passes of ``convert.cu``, all on the call's stream:

    decode   x32[i] ← f32(x[i])          (and dy32[i] ← f32(dy[i]) in backward)   fo::decode16<H>
    float32  batchnorm.forward_at(x32, …, y32, …)  /  batchnorm.backward_at(dy32, x32, …, dx32, …)
    encode   y[i] ← rn(y32[i])            (dx[i] ← rn(dx32[i]))                    fo::encode16<H>

x32, y32 (forward) and dy32, x32, dx32 (backward) are float32 scratch arrays of x's shape from the
launch stream's allocator (CuPy's pool, or torch's caching allocator for torch tensors), released
when the call returns (stream-ordered, no synchronization). Bytes moved per element: forward in
training 2 + 4 (decode) + 4 (statistics) + 4 + 4 (normalize) + 4 + 2 (encode) = 24 B against 12 B
for float32 input; backward 38 B against 20 B. A fused kernel that decodes as it loads and encodes
as it stores is future work.

A bfloat16 array is recognized by its dtype's name (a torch bfloat16 tensor, an ml_dtypes array):
CuPy itself has no bfloat16 dtype. Arguments are validated by ``fastopt.batchnorm`` (the backend
contract); a dtype other than bfloat16/float16 raises TypeError here before anything is launched.
"""

from __future__ import annotations

import numpy as np

from . import _device, _loader, _sources
from .batchnorm import backward_at, forward_at

__all__ = ["batchnorm_backward_lowp", "batchnorm_forward_lowp"]

_BLOCK = _sources.BLOCK
_F32 = np.dtype(np.float32)


def _name(array) -> str:
    """The dtype's name, also for a torch bfloat16 tensor (``lowp._dtype_name``)."""
    try:
        return _device.dtype_of(array).name
    except TypeError:
        return str(getattr(array, "dtype", "")).rsplit(".", 1)[-1]


def _formats(x, **others) -> str:
    """The 16-bit format name of ``x`` ("float16" or "bfloat16"), which every array of ``others``
    must share; else TypeError naming the argument."""
    low = _name(x)
    if low not in _sources.LOW_FORMATS:
        raise TypeError(f"x: 16-bit batch norm takes bfloat16 or float16 x and dy, got dtype {low}")
    for where, array in others.items():
        got = _name(array)
        if got != low:
            raise TypeError(f"{where}: expected x's dtype {low}, got {got}")
    return low


def _convert(where, kernel: str, low: str, source, target) -> None:
    """``decode16`` (16-bit ``source`` → float32 ``target``) or ``encode16`` (the reverse)."""
    n = _device.size_of(source)
    if n == 0:
        return
    name = _sources.convert_kernel(kernel, low)
    _loader.launch("convert", name, _loader.grid("convert", name, n, _BLOCK), _BLOCK,
                   (np.uint64(_device.pointer(source)), np.uint64(_device.pointer(target)), np.int64(n)), where.stream)


def batchnorm_forward_lowp(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
                           training, momentum, eps, channel_axis, relu):
    """Batch normalization forward of bfloat16/float16 ``x`` into ``y`` of x's dtype: decode x to
    float32 scratch, the float32 forward on it (float32 ``weight``, ``bias``, running and saved
    statistics) into float32 scratch, encode into y (round to nearest even). Not fused."""
    low = _formats(x, y=y)
    if x.shape[channel_axis] == 0:
        return
    with _device.place(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd) as where:
        shape = tuple(x.shape)
        x32, y32 = where.scratch(shape, _F32), where.scratch(shape, _F32)
        _convert(where, "decode16", low, x, x32)
        forward_at(where, x32, weight, bias, running_mean, running_var, y32, saved_mean, saved_invstd,
                   training=training, momentum=momentum, eps=eps, channel_axis=channel_axis, relu=relu)
        _convert(where, "encode16", low, y32, y)
        del x32, y32


def batchnorm_backward_lowp(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                            training, channel_axis, relu):
    """Batch normalization backward of bfloat16/float16 ``dy`` and ``x`` (one dtype) into ``dx`` of
    that dtype: decode both to float32 scratch, the float32 backward on them (float32 parameters,
    saved statistics, ``dweight``, ``dbias``), encode dx (round to nearest even). Not fused."""
    low = _formats(x, dy=dy, dx=dx)
    if x.shape[channel_axis] == 0:
        return
    with _device.place(x, dy, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias) as where:
        shape = tuple(x.shape)
        dy32, x32, dx32 = (where.scratch(shape, _F32) for _ in range(3))
        _convert(where, "decode16", low, dy, dy32)
        _convert(where, "decode16", low, x, x32)
        backward_at(where, dy32, x32, weight, bias, saved_mean, saved_invstd, dx32, dweight, dbias,
                    training=training, channel_axis=channel_axis, relu=relu)
        _convert(where, "encode16", low, dx32, dx)
        del dy32, x32, dx32
