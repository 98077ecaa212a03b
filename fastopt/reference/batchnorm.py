"""Batch normalization of the ``"numpy"`` backend, written straight from ``docs/algorithms.md``.

Forward and backward are a few NumPy expressions each, in the notation of the doc (x the input,
μ and σ² the per-channel mean and biased variance, ``invstd`` = 1/√(σ² + δ), x̂ = (x − μ)·invstd,
γ ``weight``, β ``bias``, m the number of values per channel). Readability comes before speed:
temporaries are fine here. Nothing is shared with the kernels.

Precision: every quantity is computed in float64 (x, dy and the parameters are converted first)
and rounded once to the arrays' dtype when it is stored. For float32 input this makes the
reference the float64 answer for the float32 data the kernels see. The mean is Σx/m refined once,
μ ← μ + Σ(x − μ)/m: in exact arithmetic the correction is 0, in floating point it removes most of
the rounding error of the first sum (a constant channel gets exactly its value, so y = β). The
variance is the two-pass mean of squared deviations, Σ(x − μ)²/m, never E[x²] − E[x]².

16-bit inputs (bfloat16, float16 x and dy): ``batchnorm_forward_lowp`` and
``batchnorm_backward_lowp`` decode with astype(float32), run the functions below on the float32
arrays (float32 channel vectors), and round y and dx to nearest even into x's dtype.

Arguments arrive validated and follow the backend contract in ``fastopt.batchnorm``:
``channel_axis`` is non-negative, outputs are preallocated, nothing overlaps, and in training the
number of values per channel m is 0 or at least 2.
"""

from __future__ import annotations

import numpy as np

__all__ = ["batchnorm_backward", "batchnorm_backward_lowp", "batchnorm_forward", "batchnorm_forward_lowp",
           "batchnorm_statistics"]


def _per_channel(x, channel_axis):
    """The axes to reduce over, a reshape that broadcasts a channel vector against x, and m."""
    axes = tuple(a for a in range(x.ndim) if a != channel_axis)
    shape = [1] * x.ndim
    shape[channel_axis] = x.shape[channel_axis]
    m = 1
    for a in axes:
        m *= x.shape[a]
    return axes, tuple(shape), m


def _affine64(weight, bias, channels):
    """γ and β in float64; γ = 1 and β = 0 where the layer has none."""
    gamma = np.ones(channels) if weight is None else weight.astype(np.float64)
    beta = np.zeros(channels) if bias is None else bias.astype(np.float64)
    return gamma, beta


def batchnorm_forward(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
                      training, momentum, eps, channel_axis, relu):
    """Batch normalization, forward, writing ``y``, ``saved_mean`` and ``saved_invstd``.

    training:  μ = Σx/m,  σ² = Σ(x − μ)²/m,  invstd = 1/√(σ² + δ)
               running_mean ← (1 − α)·running_mean + α·μ
               running_var  ← (1 − α)·running_var  + α·σ²·m/(m − 1)     (when given)
    eval:      μ = running_mean,  invstd = 1/√(running_var + δ)
    both:      x̂ = (x − μ)·invstd,  y = γx̂ + β,  y ← max(y, 0) with ``relu``

    ``saved_mean`` and ``saved_invstd`` receive μ and invstd (in eval, the running ones).
    With m = 0 (an empty batch) in training, y is empty, the running statistics are not touched
    and the saved statistics are NaN.
    """
    axes, shape, m = _per_channel(x, channel_axis)
    channels = x.shape[channel_axis]
    x64 = x.astype(np.float64)
    if training:
        if m == 0:
            saved_mean[...] = np.nan
            saved_invstd[...] = np.nan
            return
        mean = x64.sum(axis=axes) / m
        mean = mean + (x64 - mean.reshape(shape)).sum(axis=axes) / m  # one refinement step
        var = ((x64 - mean.reshape(shape)) ** 2).sum(axis=axes) / m
        invstd = 1.0 / np.sqrt(var + eps)
        if running_mean is not None:
            running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
            running_var[...] = ((1.0 - momentum) * running_var.astype(np.float64)
                                + momentum * var * (m / (m - 1)))
    else:
        mean = running_mean.astype(np.float64)
        invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    saved_mean[...] = mean
    saved_invstd[...] = invstd
    gamma, beta = _affine64(weight, bias, channels)
    x_hat = (x64 - mean.reshape(shape)) * invstd.reshape(shape)
    out = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    if relu:
        out = np.maximum(out, 0.0)  # NaN stays NaN
    y[...] = out


def batchnorm_backward(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                       training, channel_axis, relu):
    """Batch normalization, backward, writing ``dx``, ``dweight`` and ``dbias``.

    x̂ = (x − μ)·invstd from the saved statistics; g = dy, or with ``relu`` g = dy where
    γx̂ + β > 0 and 0 elsewhere (the mask recomputed from x, nothing stored by forward).

        dbias   = Σg
        dweight = Σg·x̂
        dx      = γ·invstd·(g − Σg/m − x̂·Σg·x̂/m)      (training: μ and σ depend on x)
        dx      = γ·invstd·g                           (training=False: μ and σ constants)

    Sums run over every axis but the channel axis; γ = 1 and β = 0 where they are None.
    """
    axes, shape, m = _per_channel(x, channel_axis)
    channels = x.shape[channel_axis]
    gamma, beta = _affine64(weight, bias, channels)
    mean = saved_mean.astype(np.float64).reshape(shape)
    invstd = saved_invstd.astype(np.float64).reshape(shape)
    x_hat = (x.astype(np.float64) - mean) * invstd
    g = dy.astype(np.float64)
    if relu:
        g = np.where(gamma.reshape(shape) * x_hat + beta.reshape(shape) > 0.0, g, 0.0)
    sum_g = g.sum(axis=axes)
    sum_g_xhat = (g * x_hat).sum(axis=axes)
    dbias[...] = sum_g
    dweight[...] = sum_g_xhat
    scale = gamma.reshape(shape) * invstd
    if training and m > 0:
        dx[...] = scale * (g - sum_g.reshape(shape) / m - x_hat * sum_g_xhat.reshape(shape) / m)
    else:
        dx[...] = scale * g


def _round(values32, out):
    """out ← values32 rounded to nearest, ties to even, in out's 16-bit dtype (``lowp.round_nearest``:
    astype, no overflow warning; past the format's range → ±Inf)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out[...] = values32.astype(out.dtype)


def batchnorm_forward_lowp(x, weight, bias, running_mean, running_var, y, saved_mean, saved_invstd, *,
                           training, momentum, eps, channel_axis, relu):
    """Batch normalization forward of bfloat16/float16 ``x`` ("16-bit inputs" in the doc): the
    float32 forward above of x decoded exactly to float32 (float32 weight, bias, running and saved
    statistics), y rounded to nearest even into x's dtype."""
    y32 = np.empty(x.shape, np.float32)
    batchnorm_forward(x.astype(np.float32), weight, bias, running_mean, running_var, y32, saved_mean,
                      saved_invstd, training=training, momentum=momentum, eps=eps, channel_axis=channel_axis,
                      relu=relu)
    _round(y32, y)


def batchnorm_backward_lowp(dy, x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias, *,
                            training, channel_axis, relu):
    """Batch normalization backward of bfloat16/float16 ``dy`` and ``x``: the float32 backward above
    of both decoded exactly to float32 (float32 parameters, saved statistics, dweight, dbias), dx
    rounded to nearest even into x's dtype."""
    dx32 = np.empty(x.shape, np.float32)
    batchnorm_backward(dy.astype(np.float32), x.astype(np.float32), weight, bias, saved_mean, saved_invstd,
                       dx32, dweight, dbias, training=training, channel_axis=channel_axis, relu=relu)
    _round(dx32, dx)


def batchnorm_statistics(x, mean, m2, *, channel_axis):
    """The per-channel statistics of x that ranks merge (synchronized batch norm), writing the
    float64 arrays ``mean`` and ``m2`` of shape (C,).

        m  = the number of values per channel (x.size / C),
        μ  = Σx/m           (refined once, μ ← μ + Σ(x − μ)/m, as in forward),
        M2 = Σ(x − μ)²      (so σ² = M2/m; never m·(E[x²] − E[x]²)).

    Sums run over every axis but ``channel_axis``, in float64. With m = 0 both are NaN; with
    m = 1, μ is the value and M2 = 0.
    """
    axes, shape, m = _per_channel(x, channel_axis)
    if m == 0:
        mean[...] = np.nan
        m2[...] = np.nan
        return
    x64 = x.astype(np.float64)
    mu = x64.sum(axis=axes) / m
    mu = mu + (x64 - mu.reshape(shape)).sum(axis=axes) / m  # one refinement step
    mean[...] = mu
    m2[...] = ((x64 - mu.reshape(shape)) ** 2).sum(axis=axes)
