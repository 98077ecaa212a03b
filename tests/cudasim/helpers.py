"""Shared by the numba-cuda tests (simulator and GPU): inputs, runners and comparisons.

Every backend call is checked against ``fastopt.reference`` called with float64 NumPy copies of
the same inputs, with the dtype-keyed tolerance table of ``tests/conftest.py``. Arrays go to the
device with ``numba.cuda.to_device`` (a simulated device under NUMBA_ENABLE_CUDASIM=1).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

import fastopt.kernels.numba_cuda as backend
import fastopt.reference as reference
from fastopt import functional

from conftest import TOLERANCE, assert_close
from optim_cases import initial_state

__all__ = [
    "TOLERANCE",
    "assert_close",
    "bn_case",
    "bn_compare",
    "device",
    "host",
    "run_batchnorm",
    "step_and_compare",
]


def code_line(x):
    """A 16-bit float array's bit patterns on one line of representable values (int64): ±0 both
    0, the next value up +1, the next down −1. ``abs(code_line(a) - code_line(b))`` counts codes
    apart across zero, where a raw int16 view would put −0 and +0 32,768 apart."""
    bits = np.asarray(x).view(np.uint16).astype(np.int64)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


def device(array):
    return cuda.to_device(np.ascontiguousarray(array))


def host(array):
    return None if array is None else backend.to_numpy(array)


# ---------------------------------------------------------------------------------------------
# optimizer updates


def _grad(rng, shape, dtype, param, hyper):
    grad = rng.standard_normal(shape).astype(dtype)
    if hyper.get("weight_decay"):
        # g with θ's sign, so g + λθ never cancels to ~δ (see tests/test_optim_backends.py)
        grad = np.copysign(grad, param)
    return grad


def step_and_compare(name, hyper, dtype, shape, rng, *, steps=2, grad_mul=None, device_grad_mul=False,
                     grad_clip=None, avg_weight=None):
    """``steps`` updates of one configuration on the device, each against the float64 reference
    started from float64 copies of the device's current state. Unused state arrays are passed as
    None. Extras: ``grad_mul`` (host float, or a (1,) device array of the dtype when
    ``device_grad_mul``), ``grad_clip``, and a Polyak average with ``avg_weight``."""
    spec = functional.SPECS[name]
    checked = spec.check(**hyper)
    used = spec.uses(checked)
    kernel = getattr(backend, spec.kernel)
    ref_kernel = getattr(reference, spec.kernel)

    param = rng.standard_normal(shape).astype(dtype)
    state = initial_state(name, shape, dtype, rng)
    avg = rng.standard_normal(shape).astype(dtype) if avg_weight is not None else None
    d_param = device(param)
    d_state = {k: (device(v) if k in used else None) for k, v in state.items()}
    d_avg = None if avg is None else device(avg)

    extras, ref_extras = {}, {}
    if grad_mul is not None:
        rounded = float(np.dtype(dtype).type(grad_mul))
        extras["grad_mul"] = device(np.array([grad_mul], dtype)) if device_grad_mul else grad_mul
        ref_extras["grad_mul"] = rounded
    if grad_clip is not None:
        extras["grad_clip"] = ref_extras["grad_clip"] = grad_clip
    if avg is not None:
        extras["avg"] = d_avg
        extras["avg_weight"] = ref_extras["avg_weight"] = avg_weight

    for t in range(1, steps + 1):
        param = host(d_param)
        state = {k: host(v) for k, v in d_state.items()}
        grad = _grad(rng, shape, dtype, param, hyper)
        if grad.size and grad_clip is not None:
            grad.reshape(-1)[0] = np.nan  # NaN passes the clamp unchanged
        d_grad = device(grad)
        expected_param = param.astype(np.float64)
        expected_state = {k: (None if v is None else v.astype(np.float64)) for k, v in state.items()}
        expected_avg = None if avg is None else host(d_avg).astype(np.float64)
        avg_before = None if avg is None else host(d_avg)
        step_kw = {"step": t} if spec.step_count else {}
        if expected_avg is not None:
            ref_extras["avg"] = expected_avg
        ref_kernel(expected_param, grad.astype(np.float64), *(expected_state[k] for k in spec.state),
                   **checked, **step_kw, **ref_extras)

        kernel(d_param, d_grad, *(d_state[k] for k in spec.state), **checked, **step_kw, **extras)

        got = host(d_param)
        assert got.dtype == dtype and got.shape == tuple(shape)
        np.testing.assert_array_equal(host(d_grad), grad, err_msg="the gradient was modified")
        assert_close(got, expected_param, dtype, f"{name} param after step {t}", before=param)
        for k in used:
            assert_close(host(d_state[k]), expected_state[k], dtype, f"{name} {k} after step {t}", before=state[k])
        if avg is not None:
            assert_close(host(d_avg), expected_avg, dtype, f"{name} avg after step {t}", before=avg_before)


# ---------------------------------------------------------------------------------------------
# batch normalization


def _channel(vector, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(vector, dtype=np.float64).reshape(shape)


def bn_case(rng, shape, axis, dtype, *, relu, affine=True, offset_scale=2.0):
    """Fresh inputs (float64 holding values of ``dtype``): per-channel offset and spread, γ of
    either sign, running statistics, dy.

    With relu, values whose pre-activation (training or eval) lies within rounding of 0, where the
    float32 and float64 masks may legitimately disagree, are nudged away from it (a few values of a
    large input always land there, so redrawing would not end)."""
    ndim = len(shape)
    axis %= ndim
    channels = shape[axis]
    axes = tuple(a for a in range(ndim) if a != axis)
    margin = 1e-4 if np.dtype(dtype) == np.float32 else 1e-9
    offset = rng.normal(0.0, offset_scale, channels)
    spread = rng.uniform(0.5, 3.0, channels)
    x = rng.standard_normal(shape) * _channel(spread, ndim, axis) + _channel(offset, ndim, axis)
    case = dict(
        x=x,
        weight=(rng.choice([-1.0, 1.0], channels) * rng.uniform(0.5, 1.5, channels)) if affine else None,
        bias=rng.normal(0.0, 0.5, channels) if affine else None,
        running_mean=offset + rng.normal(0.0, 0.3, channels),
        running_var=spread**2 * rng.uniform(0.7, 1.3, channels),
        dy=rng.standard_normal(shape),
    )
    case = {k: None if v is None else v.astype(dtype).astype(np.float64) for k, v in case.items()}
    if not relu or x.size == 0:
        return case
    gamma = _channel(case["weight"] if affine else np.ones(channels), ndim, axis)
    beta = _channel(case["bias"] if affine else np.zeros(channels), ndim, axis)
    running_scale = gamma / np.sqrt(_channel(case["running_var"], ndim, axis) + 1e-5)
    running_mean = _channel(case["running_mean"], ndim, axis)
    x = case["x"]
    for _ in range(50):
        mean = x.mean(axis=axes, keepdims=True)
        scale = gamma / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
        near = np.zeros(x.shape, bool)
        step = np.zeros(x.shape)
        for pre, k in (((x - mean) * scale + beta, scale), ((x - running_mean) * running_scale + beta,
                                                            running_scale)):
            close = np.abs(pre) <= margin
            near |= close
            # move the pre-activation to about ±4·margin, away from 0 on its own side
            step = np.where(close, (np.where(pre >= 0, 4.0, -4.0) * margin - pre) / k, step)
        if not near.any():
            case["x"] = x
            return case
        x = (x + step).astype(dtype).astype(np.float64)
    raise AssertionError("could not move the inputs away from the ReLU kink")


def run_batchnorm(module, case, dtype, *, training, relu, axis, running=True, momentum=0.1, eps=1e-5,
                  on_device=True):
    """Forward then backward through ``module`` (the backend on device arrays, or the reference on
    NumPy arrays), inputs cast to ``dtype``, every output NaN-poisoned first. Returns host arrays."""
    ndim = case["x"].ndim
    axis %= ndim
    channels = case["x"].shape[axis]
    to = device if on_device else (lambda a: a)
    cast = {k: (None if v is None else to(v.astype(dtype))) for k, v in case.items()}
    if not running:
        cast["running_mean"] = cast["running_var"] = None
    x = cast["x"]

    def poisoned():
        return (to(np.full(case["x"].shape, np.nan, dtype)), to(np.full(channels, np.nan, dtype)),
                to(np.full(channels, np.nan, dtype)))

    y, saved_mean, saved_invstd = poisoned()
    module.batchnorm_forward(x, cast["weight"], cast["bias"], cast["running_mean"], cast["running_var"],
                             y, saved_mean, saved_invstd, training=training, momentum=momentum,
                             eps=eps, channel_axis=axis, relu=relu)
    dx, dweight, dbias = poisoned()
    module.batchnorm_backward(cast["dy"], x, cast["weight"], cast["bias"], saved_mean, saved_invstd,
                              dx, dweight, dbias, training=training, channel_axis=axis, relu=relu)
    back = host if on_device else (lambda a: a)
    return {k: (None if v is None else back(v)) for k, v in dict(
        y=y, saved_mean=saved_mean, saved_invstd=saved_invstd, running_mean=cast["running_mean"],
        running_var=cast["running_var"], dx=dx, dweight=dweight, dbias=dbias).items()}


def _magnitudes(case, ref, *, relu, axis):
    """The size of what each output is computed from (float64): the scale of its rounding error.

    A sum over m terms is compared with Σ|term|, not with its possibly tiny value. Backward
    recomputes x̂ from the saved mean rounded to the dtype, which moves x̂ by about
    eps·|μ|·invstd: ``shift`` carries that into the gradients' scales."""
    x = case["x"]
    ndim = x.ndim
    axis %= ndim
    axes = tuple(a for a in range(ndim) if a != axis)
    channels = x.shape[axis]
    m = max(math.prod(x.shape[a] for a in axes), 1)
    gamma = np.ones(channels) if case["weight"] is None else case["weight"]
    beta = np.zeros(channels) if case["bias"] is None else case["bias"]
    mean, invstd = ref["saved_mean"], ref["saved_invstd"]
    x_hat = (x - _channel(mean, ndim, axis)) * _channel(invstd, ndim, axis)
    g = case["dy"]
    if relu:
        g = np.where(_channel(gamma, ndim, axis) * x_hat + _channel(beta, ndim, axis) > 0, g, 0.0)
    sum_g = np.abs(g).sum(axis=axes)
    sum_gx = np.abs(g * x_hat).sum(axis=axes)
    spread = 1.0 / invstd
    shift = np.abs(mean) * invstd
    gain = _channel(np.abs(gamma) * invstd, ndim, axis)
    mags = dict(
        y=_channel(np.abs(gamma), ndim, axis) * (1.0 + np.abs(x_hat)) + _channel(np.abs(beta), ndim, axis),
        saved_mean=np.abs(mean) + spread,
        saved_invstd=invstd,
        dbias=sum_g,
        dweight=sum_gx + sum_g * (1.0 + shift),
        dx=gain * (np.abs(g) + (1.0 + np.abs(x_hat) + _channel(shift, ndim, axis))
                   * _channel(sum_g * (1.0 + shift) + sum_gx, ndim, axis) / m),
        running_mean=np.abs(case["running_mean"]) + np.abs(mean) + spread,
        running_var=np.abs(case["running_var"]) + spread**2 * m / max(m - 1, 1),
    )
    return mags


def bn_compare(got, ref, case, dtype, *, relu, axis, keys=None):
    """Every output: dtype, shape, no NaN left, and |got − ref| ≤ rtol·(|ref| + magnitude) + atol
    with the conftest tolerance of the dtype."""
    tol = TOLERANCE[np.dtype(dtype)]
    mags = _magnitudes(case, ref, relu=relu, axis=axis)
    for key in keys or ("y", "saved_mean", "saved_invstd", "running_mean", "running_var", "dx",
                        "dweight", "dbias"):
        expected = ref[key]
        if expected is None:
            assert got[key] is None, key
            continue
        actual = got[key]
        assert actual.dtype == np.dtype(dtype), f"{key}: dtype {actual.dtype}"
        assert actual.shape == expected.shape, f"{key}: shape {actual.shape} != {expected.shape}"
        actual = actual.astype(np.float64)
        assert not np.isnan(actual).any(), f"{key}: NaN in the result (an element left unwritten?)"
        bound = tol["rtol"] * (np.abs(expected) + np.broadcast_to(mags[key], expected.shape)) + tol["atol"]
        err = np.abs(actual - expected)
        if err.size and not (err <= bound).all():
            i = np.unravel_index(np.argmax(err / bound), err.shape)
            raise AssertionError(f"{key}: |{actual[i]!r} - {expected[i]!r}| = {err[i]:.3e} > {bound[i]:.3e} "
                                 f"at {i}; worst error / bound = {np.max(err / bound):.3g}")


# ---------------------------------------------------------------------------------------------
# batch normalization of float16 x and dy (``bn_lowp``)


def _run_f16_or_f32(lowp, inputs, shape, axis, *, training, relu):
    """Forward then backward on the device: float16 x, dy through the ``*_lowp`` functions, or
    their float32 decodings through the float32 ones; every output poisoned (NaN) first."""
    x16, dy16, weight, bias, running_mean, running_var = inputs
    channels = shape[axis]
    dtype = np.float16 if lowp else np.float32
    x = device(x16 if lowp else x16.astype(np.float32))
    dy = device(dy16 if lowp else dy16.astype(np.float32))
    weight, bias = (None if v is None else device(v) for v in (weight, bias))
    d_mean, d_var = device(running_mean), device(running_var)
    y, dx = (device(np.full(shape, np.nan, dtype)) for _ in range(2))
    mean, invstd, dweight, dbias = (device(np.full(channels, np.nan, np.float32)) for _ in range(4))
    forward = backend.batchnorm_forward_lowp if lowp else backend.batchnorm_forward
    backward = backend.batchnorm_backward_lowp if lowp else backend.batchnorm_backward
    forward(x, weight, bias, d_mean, d_var, y, mean, invstd, training=training, momentum=0.1, eps=1e-5,
            channel_axis=axis, relu=relu)
    backward(dy, x, weight, bias, mean, invstd, dx, dweight, dbias, training=training, channel_axis=axis,
             relu=relu)
    return dict(y=host(y), saved_mean=host(mean), saved_invstd=host(invstd), running_mean=host(d_mean),
                running_var=host(d_var), dx=host(dx), dweight=host(dweight), dbias=host(dbias))


def run_batchnorm_f16(rng, shape, axis, *, training, relu, affine=True):
    """float16 batch norm (forward and backward) on the device, checked two ways:

    * bit for bit the rounding (to nearest even) of the backend's float32 kernels run on the
      decoded inputs, and float32 outputs equal to theirs (the module only decodes and encodes);
    * against the float64 reference of the decoded inputs: y and dx within one float16 rounding
      (relative 2⁻¹⁰) or, near 0, within 10⁻⁴ of the largest terms they are computed from (the
      float32 error of the terms: dx of a channel with few values cancels to about 0),
      float32 outputs within float32 tolerance (absolute: 10⁻⁵ of the largest channel's); with
      relu, elements whose pre-activation lies within float32 rounding of 0 (either side of the
      mask is right) are left out of dx and widen the dweight and dbias bounds by their terms."""
    channels = shape[axis % len(shape)]
    inputs = ((rng.standard_normal(shape) * 2 + 0.5).astype(np.float16),
              rng.standard_normal(shape).astype(np.float16),
              (rng.standard_normal(channels) + 1).astype(np.float32) if affine else None,
              rng.standard_normal(channels).astype(np.float32) if affine else None,
              rng.standard_normal(channels).astype(np.float32),
              (rng.random(channels) + 0.5).astype(np.float32))
    got = _run_f16_or_f32(True, inputs, shape, axis, training=training, relu=relu)
    f32 = _run_f16_or_f32(False, inputs, shape, axis, training=training, relu=relu)
    for key in ("y", "dx"):
        assert got[key].dtype == np.float16 and got[key].shape == shape, key
        np.testing.assert_array_equal(got[key].view(np.uint16), f32[key].astype(np.float16).view(np.uint16),
                                      err_msg=f"{key}: not the float32 kernels' result rounded")
    for key in ("saved_mean", "saved_invstd", "running_mean", "running_var", "dweight", "dbias"):
        np.testing.assert_array_equal(got[key], f32[key], err_msg=key)

    x64, dy64, weight, bias, running_mean, running_var = (None if v is None else v.astype(np.float64)
                                                          for v in inputs)
    ref = {k: np.empty(shape) for k in ("y", "dx")}
    ref.update({k: np.empty(channels) for k in ("saved_mean", "saved_invstd", "dweight", "dbias")})
    ref["running_mean"], ref["running_var"] = running_mean, running_var
    reference.batchnorm_forward(x64, weight, bias, running_mean, running_var, ref["y"], ref["saved_mean"],
                                ref["saved_invstd"], training=training, momentum=0.1, eps=1e-5,
                                channel_axis=axis % len(shape), relu=relu)
    reference.batchnorm_backward(dy64, x64, weight, bias, ref["saved_mean"], ref["saved_invstd"], ref["dx"],
                                 ref["dweight"], ref["dbias"], training=training, channel_axis=axis % len(shape),
                                 relu=relu)
    # with relu, a pre-activation within float32 rounding of 0 may take either side of the mask:
    # such elements are left out of dx, and their terms widen the bounds of dweight and dbias
    ndim, axis = len(shape), axis % len(shape)
    extra = {"dweight": np.zeros(channels), "dbias": np.zeros(channels)}
    ambiguous = np.zeros(shape, bool)
    gamma = _channel(np.ones(channels) if weight is None else weight, ndim, axis)
    xhat = (x64 - _channel(ref["saved_mean"], ndim, axis)) * _channel(ref["saved_invstd"], ndim, axis)
    scaled = xhat * gamma
    shift = _channel(np.zeros(channels) if bias is None else bias, ndim, axis)
    # the largest terms each output is computed from (dx cancels to ~0 for tiny m, e.g. m = 2)
    terms = {"y": np.max(np.abs(scaled) + np.abs(shift), initial=0.0),
             "dx": np.max(np.abs(gamma * _channel(ref["saved_invstd"], ndim, axis)), initial=0.0)
             * np.max(np.abs(dy64), initial=0.0) * (1.0 + np.max(np.abs(xhat), initial=0.0))}
    if relu:
        ambiguous = np.abs(scaled + shift) <= 1e-5 * (1.0 + np.abs(scaled) + np.abs(shift))
        others = tuple(a for a in range(ndim) if a != axis)
        extra["dbias"] = np.sum(np.where(ambiguous, np.abs(dy64), 0.0), axis=others)
        extra["dweight"] = np.sum(np.where(ambiguous, np.abs(dy64 * xhat), 0.0), axis=others)
    for key, value in ref.items():
        if key in ("y", "dx"):
            keep = ~ambiguous if key == "dx" else np.ones(shape, bool)
            np.testing.assert_allclose(got[key].astype(np.float64)[keep], value[keep], rtol=2.0**-10,
                                       atol=1e-4 * terms[key], err_msg=key)
        else:  # sums over m values (dweight, dbias) may cancel: absolute error against the largest
            bound = 1e-5 * (np.abs(value) + max(1.0, np.max(np.abs(value), initial=0.0))) + extra.get(key, 0.0)
            error = np.abs(got[key].astype(np.float64) - value)
            assert np.all(error <= bound), f"{key}: error {np.max(error - bound)} past the bound"
