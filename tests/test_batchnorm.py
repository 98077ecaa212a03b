"""Batch normalization, functional API: every backend against the float64 reference and torch.

The tables below run forward then backward on (shape, channel axis) × backend × dtype × training ×
relu × affine. Every output is poisoned with NaN before a kernel runs, so an unwritten element
fails. Errors are measured against the size of what was summed or multiplied (``mag``): a
gradient sum over m terms is compared with Σ|term|, not with its possibly tiny result.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest

import fastopt.kernels.numba_cpu.batchnorm as numba_batchnorm
from fastopt.batchnorm import batchnorm_backward, batchnorm_forward

BACKENDS = ["numpy", "numba"]
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["float32", "float64"]

# Error / magnitude allowed, by dtype: against the float64 reference, and against torch (which
# accumulates float32 in float32).
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
TORCH_TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}

# (shape, channel_axis): ranks 2 to 5 in both layouts, odd sizes, a row longer than a statistics
# block (2048), more channels than a channels-last block, and a channel axis in the middle.
SHAPES = [
    ((5, 3), 1),
    ((4, 3, 5), 1),
    ((2, 3, 4, 5), 1),
    ((2, 3, 2, 3, 4), 1),
    ((4, 5, 3), -1),
    ((2, 4, 5, 3), -1),
    ((2, 2, 3, 4, 3), -1),
    ((2, 3, 2100), 1),
    ((3, 2500), -1),
    ((2, 4, 3, 5), 2),
]
TORCH_SHAPES = SHAPES[:7]
# several reduction tasks and blocks per channel; tasks that start inside a row; rows split into
# several elementwise tiles (8192)
MEDIUM_SHAPES = [((16, 8, 64, 64), 1), ((16, 64, 64, 8), -1), ((7, 3, 5001), 1), ((1, 2, 50001), 1)]


def shape_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-axis{axis}"


# ---------------------------------------------------------------------------------------------
# helpers


def channel_view(vector, ndim, axis):
    """A per-channel vector shaped to broadcast against an array of rank ndim."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(vector, dtype=np.float64).reshape(shape)


def make_case(rng, shape, axis, dtype, *, relu, affine=True, eps=1e-5):
    """Fresh inputs: per-channel offset and spread, γ of either sign, running statistics and dy.

    With relu, inputs are redrawn until no pre-activation (training or eval) lies within rounding
    of 0 (at ``eps``), where the float32 and float64 masks may legitimately disagree."""
    channels = shape[axis]
    ndim = len(shape)
    axes = tuple(a for a in range(ndim) if a != axis % ndim)
    margin = 1e-4 if np.dtype(dtype) == np.float32 else 1e-9
    for _ in range(200):
        offset = rng.normal(0.0, 2.0, channels)
        spread = rng.uniform(0.5, 3.0, channels)
        x = rng.standard_normal(shape) * channel_view(spread, ndim, axis) + channel_view(offset, ndim, axis)
        case = dict(
            x=x.astype(dtype),
            weight=(rng.choice([-1.0, 1.0], channels) * rng.uniform(0.5, 1.5, channels)).astype(dtype) if affine else None,
            bias=rng.normal(0.0, 0.5, channels).astype(dtype) if affine else None,
            running_mean=(offset + rng.normal(0.0, 0.3, channels)).astype(dtype),
            running_var=(spread**2 * rng.uniform(0.7, 1.3, channels)).astype(dtype),
            dy=rng.standard_normal(shape).astype(dtype),
        )
        if not relu:
            return case
        x64 = case["x"].astype(np.float64)
        gamma = channel_view(case["weight"] if affine else np.ones(channels), ndim, axis)
        beta = channel_view(case["bias"] if affine else np.zeros(channels), ndim, axis)
        mean = x64.mean(axis=axes, keepdims=True)
        var = x64.var(axis=axes, keepdims=True)
        pre_train = gamma * (x64 - mean) / np.sqrt(var + eps) + beta
        pre_eval = (gamma * (x64 - channel_view(case["running_mean"], ndim, axis))
                    / np.sqrt(channel_view(case["running_var"], ndim, axis) + eps) + beta)
        if min(np.abs(pre_train).min(), np.abs(pre_eval).min()) > margin:
            return case
    raise AssertionError("could not draw inputs away from the ReLU kink")


def poisoned_outputs(x, channels, axis_len=None):
    """Forward or backward outputs (full-size, per-channel, per-channel) filled with NaN."""
    return (np.full_like(x, np.nan), np.full(channels, np.nan, x.dtype), np.full(channels, np.nan, x.dtype))


def run(case, *, backend, dtype, training, relu, axis, momentum=0.1, eps=1e-5, running=True, bwd_training=None):
    """Forward then backward on one backend, inputs cast to ``dtype``; every output poisoned first."""
    cast = {k: (None if v is None else v.astype(dtype)) for k, v in case.items()}
    x = cast["x"]
    channels = x.shape[axis]
    running_mean = cast["running_mean"] if running else None
    running_var = cast["running_var"] if running else None
    y, saved_mean, saved_invstd = batchnorm_forward(
        x, cast["weight"], cast["bias"], running_mean, running_var, training=training, momentum=momentum,
        eps=eps, channel_axis=axis, relu=relu, backend=backend, out=poisoned_outputs(x, channels))
    dx, dweight, dbias = batchnorm_backward(
        cast["dy"], x, cast["weight"], saved_mean, saved_invstd, bias=cast["bias"],
        training=training if bwd_training is None else bwd_training, channel_axis=axis, relu=relu,
        backend=backend, out=poisoned_outputs(x, channels))
    return dict(y=y, saved_mean=saved_mean, saved_invstd=saved_invstd, running_mean=running_mean,
                running_var=running_var, dx=dx, dweight=dweight, dbias=dbias)


def magnitudes(case, ref, *, training, relu, axis):
    """The size of what each output is computed from, in float64: the scale of its rounding error."""
    x = case["x"].astype(np.float64)
    ndim = x.ndim
    axes = tuple(a for a in range(ndim) if a != axis % ndim)
    m = max(math.prod(x.shape[a] for a in axes), 1)
    channels = x.shape[axis]
    gamma = np.ones(channels) if case["weight"] is None else case["weight"].astype(np.float64)
    beta = np.zeros(channels) if case["bias"] is None else case["bias"].astype(np.float64)
    mean = ref["saved_mean"].astype(np.float64)
    invstd = ref["saved_invstd"].astype(np.float64)
    x_hat = (x - channel_view(mean, ndim, axis)) * channel_view(invstd, ndim, axis)
    g = case["dy"].astype(np.float64)
    if relu:
        g = np.where(channel_view(gamma, ndim, axis) * x_hat + channel_view(beta, ndim, axis) > 0, g, 0.0)
    sum_abs_g = np.abs(g).sum(axis=axes)
    sum_abs_gx = np.abs(g * x_hat).sum(axis=axes)
    spread = np.sqrt(np.maximum(1.0 / invstd**2, 0.0))
    # backward recomputes x̂ from the saved mean, rounded to the dtype: that rounding moves x̂ by
    # about eps·|mean|·invstd, large when a channel's spread is small next to its mean
    shift = np.abs(mean) * invstd
    gi = channel_view(np.abs(gamma) * invstd, ndim, axis)
    dx = gi * (np.abs(g) + (1.0 + np.abs(x_hat) + channel_view(shift, ndim, axis))
               * channel_view(sum_abs_g * (1.0 + shift) + sum_abs_gx, ndim, axis) / m)
    mags = dict(
        y=channel_view(np.abs(gamma), ndim, axis) * (1.0 + np.abs(x_hat)) + channel_view(np.abs(beta), ndim, axis),
        saved_mean=np.abs(mean) + spread,
        saved_invstd=invstd,
        dx=dx,
        dweight=sum_abs_gx + sum_abs_g * (1.0 + shift),
        dbias=sum_abs_g,
    )
    if ref["running_mean"] is not None:
        mags["running_mean"] = np.abs(case["running_mean"]) + np.abs(mean) + spread
        mags["running_var"] = np.abs(case["running_var"]) + spread**2 * m / max(m - 1, 1)
    return mags


def assert_within(what, actual, expected, mag, tol):
    """|actual − expected| ≤ tol·(mag + |expected|) elementwise, shapes equal, no stray NaN."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert not np.isnan(actual).any(), f"{what}: NaN in the result (an element left unwritten?)"
    bound = tol * (np.broadcast_to(mag, expected.shape) + np.abs(expected))
    err = np.abs(actual - expected)
    if err.size and not (err <= bound).all():
        i = np.unravel_index(np.argmax(err / np.maximum(bound, 1e-300)), err.shape)
        raise AssertionError(f"{what}: |{actual[i]!r} - {expected[i]!r}| = {err[i]:.3e} > {bound[i]:.3e} "
                             f"at {i}; worst error / bound = {np.max(err / np.maximum(bound, 1e-300)):.3g}")


def compare_all(got, ref, mags, dtype, tol_table=TOL, keys=None):
    tol = tol_table[np.dtype(dtype)]
    for key in keys or mags:
        if ref.get(key) is None:
            continue
        assert got[key].dtype == np.dtype(dtype), f"{key}: dtype {got[key].dtype}"
        assert_within(key, got[key], ref[key], mags[key], tol)


# ---------------------------------------------------------------------------------------------
# every backend against the float64 reference


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_shape", SHAPES, ids=shape_id)
def test_backend_matches_float64_reference(case_shape, backend, dtype, training, relu, affine, rng):
    shape, axis = case_shape
    case = make_case(rng, shape, axis, dtype, relu=relu, affine=affine)
    ref = run(case, backend="numpy", dtype=np.float64, training=training, relu=relu, axis=axis)
    got = run(case, backend=backend, dtype=dtype, training=training, relu=relu, axis=axis)
    compare_all(got, ref, magnitudes(case, ref, training=training, relu=relu, axis=axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case_shape", MEDIUM_SHAPES, ids=shape_id)
def test_numba_medium_shapes(case_shape, dtype, rng):
    shape, axis = case_shape
    case = make_case(rng, shape, axis, dtype, relu=False)
    ref = run(case, backend="numpy", dtype=np.float64, training=True, relu=False, axis=axis)
    got = run(case, backend="numba", dtype=dtype, training=True, relu=False, axis=axis)
    compare_all(got, ref, magnitudes(case, ref, training=True, relu=False, axis=axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_without_running_statistics(backend, dtype, rng):
    case = make_case(rng, (4, 3, 5), 1, dtype, relu=False)
    ref = run(case, backend="numpy", dtype=np.float64, training=True, relu=False, axis=1)
    got = run(case, backend=backend, dtype=dtype, training=True, relu=False, axis=1, running=False)
    assert got["running_mean"] is None
    mags = magnitudes(case, ref, training=True, relu=False, axis=1)
    compare_all(got, ref, mags, dtype, keys=["y", "saved_mean", "saved_invstd", "dx", "dweight", "dbias"])


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_shape", [((4, 3, 5), 1), ((4, 5, 3), -1)], ids=shape_id)
def test_eval_forward_saves_running_statistics_and_backward_treats_them_as_constants(case_shape, backend, relu, rng):
    shape, axis = case_shape
    case = make_case(rng, shape, axis, np.float64, relu=relu)
    got = run(case, backend=backend, dtype=np.float64, training=False, relu=relu, axis=axis)
    np.testing.assert_array_equal(got["saved_mean"], case["running_mean"])
    np.testing.assert_allclose(got["saved_invstd"], 1 / np.sqrt(case["running_var"] + 1e-5), rtol=1e-15)
    np.testing.assert_array_equal(got["running_mean"], case["running_mean"])  # eval leaves them alone
    np.testing.assert_array_equal(got["running_var"], case["running_var"])
    ndim = len(shape)
    gain = channel_view(case["weight"] * got["saved_invstd"], ndim, axis)
    mask = got["y"] > 0 if relu else True
    np.testing.assert_allclose(got["dx"], np.where(mask, gain * case["dy"], 0.0), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_output_is_clamped_and_backward_masks_by_it(backend, relu, rng):
    case = make_case(rng, (6, 4, 7), 1, np.float64, relu=True)
    plain = run(case, backend=backend, dtype=np.float64, training=True, relu=False, axis=1)
    fused = run(case, backend=backend, dtype=np.float64, training=True, relu=True, axis=1)
    np.testing.assert_array_equal(fused["y"], np.maximum(plain["y"], 0.0))
    assert (fused["y"] == 0).any() and (fused["y"] > 0).any()
    # the fused backward equals the plain backward fed dy masked by y > 0
    masked = dict(case, dy=np.where(plain["y"] > 0, case["dy"], 0.0))
    through = run(masked, backend=backend, dtype=np.float64, training=True, relu=False, axis=1)
    for key in ("dx", "dweight", "dbias"):
        np.testing.assert_allclose(fused[key], through[key], rtol=1e-12, atol=1e-12, err_msg=key)


# ---------------------------------------------------------------------------------------------
# the reference itself: finite differences


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case_shape", [((3, 2, 2), 1), ((4, 3), -1), ((2, 2, 3), -1)], ids=shape_id)
def test_reference_gradient_matches_finite_differences(case_shape, training, relu, affine, rng):
    shape, axis = case_shape
    case = make_case(rng, shape, axis, np.float64, relu=relu, affine=affine)
    x, weight, bias, r = case["x"], case["weight"], case["bias"], case["dy"]

    def loss(x, weight, bias):
        y, _, _ = batchnorm_forward(x, weight, bias, case["running_mean"].copy(), case["running_var"].copy(),
                                    training=training, channel_axis=axis, relu=relu, backend="numpy")
        return float(np.sum(r * y))

    def numeric(array, *, h=1e-6):
        grad = np.empty_like(array)
        for i in np.ndindex(array.shape):
            keep = array[i]
            array[i] = keep + h
            up = loss(x, weight, bias)
            array[i] = keep - h
            down = loss(x, weight, bias)
            array[i] = keep
            grad[i] = (up - down) / (2 * h)
        return grad

    _, saved_mean, saved_invstd = batchnorm_forward(
        x, weight, bias, case["running_mean"].copy(), case["running_var"].copy(), training=training,
        channel_axis=axis, relu=relu, backend="numpy")
    dx, dweight, dbias = batchnorm_backward(r, x, weight, saved_mean, saved_invstd, bias=bias, training=training,
                                            channel_axis=axis, relu=relu, backend="numpy")
    np.testing.assert_allclose(dx, numeric(x), rtol=1e-6, atol=1e-7, err_msg="dx")
    if affine:
        np.testing.assert_allclose(dweight, numeric(weight), rtol=1e-6, atol=1e-7, err_msg="dweight")
        np.testing.assert_allclose(dbias, numeric(bias), rtol=1e-6, atol=1e-7, err_msg="dbias")


# ---------------------------------------------------------------------------------------------
# torch


def torch_batch_norm(case, *, dtype, training, relu, axis, momentum=0.1, eps=1e-5):
    """torch.nn.functional.batch_norm (channels moved to axis 1) and its autograd gradients."""
    torch = pytest.importorskip("torch", reason="torch is not installed; parity with torch cannot be checked")
    ndim = case["x"].ndim
    axis = axis % ndim

    def tensor(a, grad=False):
        if a is None:
            return None
        t = torch.tensor(np.moveaxis(a, axis, 1) if a.ndim == ndim else a, dtype=getattr(torch, np.dtype(dtype).name))
        return t.requires_grad_(grad)

    x = tensor(case["x"], grad=True)
    weight = tensor(case["weight"], grad=True)
    bias = tensor(case["bias"], grad=True)
    running_mean = tensor(case["running_mean"])
    running_var = tensor(case["running_var"])
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training=training,
                                       momentum=momentum, eps=eps)
    if relu:
        y = torch.relu(y)
    y.backward(tensor(case["dy"]))

    def back(t):
        a = t.detach().numpy()
        return np.moveaxis(a, 1, axis) if a.ndim == ndim else a

    out = dict(y=back(y), running_mean=back(running_mean), running_var=back(running_var), dx=back(x.grad))
    if weight is not None:
        out.update(dweight=back(weight.grad), dbias=back(bias.grad))
    if training:
        _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            tensor(case["x"]), None, None, None, None, True, momentum, eps)
        out.update(saved_mean=back(save_mean), saved_invstd=back(save_invstd))
    return out


@pytest.mark.torch
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_shape", TORCH_SHAPES, ids=shape_id)
def test_matches_torch(case_shape, backend, dtype, training, relu, rng):
    shape, axis = case_shape
    case = make_case(rng, shape, axis, dtype, relu=relu)
    expected = torch_batch_norm(case, dtype=dtype, training=training, relu=relu, axis=axis)
    got = run(case, backend=backend, dtype=dtype, training=training, relu=relu, axis=axis)
    ref = run(case, backend="numpy", dtype=np.float64, training=training, relu=relu, axis=axis)
    mags = magnitudes(case, ref, training=training, relu=relu, axis=axis)
    compare_all(got, expected, mags, dtype, tol_table=TORCH_TOL, keys=list(expected))


@pytest.mark.torch
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_without_affine_parameters(backend, rng):
    case = make_case(rng, (3, 4, 5, 2), 1, np.float64, relu=False, affine=False)
    expected = torch_batch_norm(case, dtype=np.float64, training=True, relu=False, axis=1)
    got = run(case, backend=backend, dtype=np.float64, training=True, relu=False, axis=1)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-10, err_msg=key)


# ---------------------------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, mean, limit", [(np.float32, 1e4, 1e-3), (np.float64, 1e8, 1e-6)],
                         ids=["float32-mean1e4", "float64-mean1e8"])
@pytest.mark.parametrize("case_shape", [((64, 3, 9, 9), 1), ((64, 9, 9, 3), -1)], ids=shape_id)
def test_large_mean_small_spread_matches_float64_reference(case_shape, dtype, mean, limit, backend, rng):
    """A channel with mean 1e4 (float32) or 1e8 (float64) and std 1: no catastrophic cancellation.

    The float64 reference runs on the same values; errors are relative to the output's size
    (max |y|) and, for the statistics, to σ (mean) and to invstd. The float64 reference is itself
    checked against exactly rounded sums (math.fsum)."""
    shape, axis = case_shape
    channels = shape[axis]
    ndim = len(shape)
    offsets = mean * np.array([1.0, -1.0, 0.5])
    x = (rng.standard_normal(shape) + channel_view(offsets, ndim, axis)).astype(dtype)
    weight = rng.uniform(0.5, 1.5, channels).astype(dtype)
    bias = rng.normal(0, 0.5, channels).astype(dtype)
    running = [np.zeros(channels, dtype), np.ones(channels, dtype)]
    y, saved_mean, saved_invstd = batchnorm_forward(x, weight, bias, *running, channel_axis=axis, backend=backend,
                                                    out=poisoned_outputs(x, channels))
    x64 = x.astype(np.float64)
    ref_running = [np.zeros(channels), np.ones(channels)]
    y64, mean64, invstd64 = batchnorm_forward(x64, weight.astype(np.float64), bias.astype(np.float64), *ref_running,
                                              channel_axis=axis, backend="numpy")
    y_err = np.max(np.abs(y - y64)) / np.max(np.abs(y64))
    mean_err = np.max(np.abs(saved_mean - mean64) * invstd64)  # in units of σ
    invstd_err = np.max(np.abs(saved_invstd - invstd64) / invstd64)
    var_err = np.max(np.abs(running[1] - ref_running[1]) / ref_running[1])
    print(f"{backend} {np.dtype(dtype).name}: y {y_err:.2e}, mean {mean_err:.2e} σ, invstd {invstd_err:.2e}, "
          f"running_var {var_err:.2e}")
    assert y_err <= limit and mean_err <= limit and invstd_err <= limit and var_err <= limit

    # the reference against exactly rounded sums
    moved = np.moveaxis(x64, axis, 0).reshape(channels, -1)
    exact_mean = np.array([math.fsum(row) / row.size for row in moved])
    exact_var = np.array([math.fsum((row - mu) ** 2) / row.size for row, mu in zip(moved, exact_mean)])
    assert np.max(np.abs(mean64 - exact_mean) * invstd64) <= 1e-6
    assert np.max(np.abs(invstd64 * np.sqrt(exact_var + 1e-5) - 1)) <= 1e-9


@pytest.mark.parametrize("dtype, value", [(np.float32, 3.7), (np.float32, 1e4 + 0.1), (np.float64, 0.1),
                                          (np.float64, 1e8 + 0.1)], ids=["f32-3.7", "f32-1e4", "f64-0.1", "f64-1e8"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_shape", [((8, 3, 5, 5), 1), ((8, 5, 5, 3), -1)], ids=shape_id)
def test_constant_channel_gives_bias(case_shape, backend, dtype, value, rng):
    shape, axis = case_shape
    ndim = len(shape)
    x = rng.standard_normal(shape)
    np.moveaxis(x, axis, 0)[1] = value
    x = x.astype(dtype)
    weight = np.array([1.0, 2.0, 0.5], dtype)
    bias = np.array([0.1, -0.7, 0.3], dtype)
    running = [np.zeros(3, dtype), np.ones(3, dtype)]
    y, saved_mean, saved_invstd = batchnorm_forward(x, weight, bias, *running, channel_axis=axis, backend=backend,
                                                    out=poisoned_outputs(x, 3))
    assert np.isfinite(y).all() and np.isfinite(saved_invstd).all() and np.isfinite(running[1]).all()
    constant = np.moveaxis(y, axis, 0)[1]
    if backend == "numba":  # the kernels' block means reproduce the constant exactly
        assert (constant == bias[1]).all()
        assert saved_mean[1] == x.flat[np.ravel_multi_index(tuple(1 if a == axis % ndim else 0 for a in range(ndim)), shape)]
    else:
        np.testing.assert_allclose(constant, bias[1], atol=1e-5 if dtype == np.float32 else 1e-5)
    dy = rng.standard_normal(shape).astype(dtype)
    grads = batchnorm_backward(dy, x, weight, saved_mean, saved_invstd, channel_axis=axis, backend=backend)
    assert all(np.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# sizes at the edges


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, axis", [((1, 3), 1), ((1, 3, 1, 1), 1), ((1, 1, 1, 3), -1)])
def test_training_with_one_value_per_channel_raises_and_touches_nothing(shape, axis, backend, rng):
    x = rng.standard_normal(shape)
    running_mean, running_var = np.zeros(3), np.ones(3)
    out = poisoned_outputs(x, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batchnorm_forward(x, None, None, running_mean, running_var, channel_axis=axis, backend=backend, out=out)
    assert (running_mean == 0).all() and (running_var == 1).all()
    assert all(np.isnan(o).all() for o in out)
    y, _, _ = batchnorm_forward(x, None, None, running_mean, running_var, training=False, channel_axis=axis,
                                backend=backend)  # eval is fine
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, axis", [((0, 3, 4), 1), ((0, 3), 1), ((2, 0, 3), -1)])
def test_empty_batch(shape, axis, backend):
    x = np.zeros(shape)
    channels = shape[axis]
    running_mean, running_var = np.full(channels, 0.5), np.full(channels, 2.0)
    y, saved_mean, saved_invstd = batchnorm_forward(x, np.ones(channels), np.zeros(channels), running_mean,
                                                    running_var, channel_axis=axis, backend=backend)
    assert y.shape == shape
    assert (running_mean == 0.5).all() and (running_var == 2.0).all()
    assert np.isnan(saved_mean).all() and np.isnan(saved_invstd).all()
    dx, dweight, dbias = batchnorm_backward(x, x, np.ones(channels), saved_mean, saved_invstd, channel_axis=axis,
                                            backend=backend)
    assert dx.shape == shape and (dweight == 0).all() and (dbias == 0).all()
    y, _, _ = batchnorm_forward(x, None, None, running_mean, running_var, training=False, channel_axis=axis,
                                backend=backend)
    assert y.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_channels(backend):
    x = np.zeros((4, 0, 3), np.float32)
    empty = np.zeros(0, np.float32)
    y, saved_mean, saved_invstd = batchnorm_forward(x, empty, empty, empty.copy(), empty.copy(), backend=backend)
    assert y.shape == x.shape and saved_mean.shape == (0,)
    dx, dweight, dbias = batchnorm_backward(x, x, empty, saved_mean, saved_invstd, backend=backend)
    assert dx.shape == x.shape and dweight.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_is_written_in_place_and_returned(backend, rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    out = poisoned_outputs(x, 3)
    result = batchnorm_forward(x, None, None, None, None, backend=backend, out=out)
    assert all(r is o for r, o in zip(result, out))
    grads_out = poisoned_outputs(x, 3)
    grads = batchnorm_backward(x, x, None, result[1], result[2], backend=backend, out=list(grads_out))
    assert all(g is o for g, o in zip(grads, grads_out))
    assert all(np.isfinite(g).all() for g in grads)
    # entries may be None: those are allocated
    y, saved_mean, saved_invstd = batchnorm_forward(x, None, None, None, None, backend=backend,
                                                    out=(None, out[1], None))
    assert saved_mean is out[1] and y is not out[0]


def test_numba_results_do_not_depend_on_the_thread_count(rng):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here")
    x = rng.standard_normal((16, 4, 40, 40)).astype(np.float32) + 3
    last = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dy_last = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    long = rng.standard_normal((2, 4, 40001)).astype(np.float32) + 3  # one task per row piece
    dy_long = rng.standard_normal(long.shape).astype(np.float32)
    before = numba.get_num_threads()

    def everything():
        results = []
        for xs, g, axis in ((x, dy, 1), (last, dy_last, -1), (long, dy_long, 1)):
            fwd = batchnorm_forward(xs, None, None, np.zeros(4, np.float32), np.ones(4, np.float32),
                                    channel_axis=axis, backend="numba")
            results += [*fwd, *batchnorm_backward(g, xs, None, fwd[1], fwd[2], channel_axis=axis, backend="numba")]
        return results

    try:
        numba.set_num_threads(1)
        serial = everything()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        parallel = everything()
    finally:
        numba.set_num_threads(before)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["_normalize_channel_first", "_normalize_channels_last",
                                  "_input_grad_channel_first", "_input_grad_channels_last"])
def test_float32_elementwise_kernels_do_no_float64_arithmetic(name):
    """Only the statistics accumulate in float64; the per-element passes stay in float32. (The
    arithmetic is the body's: ``kernels/numba_cpu/tasks.py``.)"""
    body = getattr(numba_batchnorm, name).body
    py_func = body.py_func
    signature = [s for s in body.signatures if "float32" in s]
    dispatcher = numba.njit(signature, cache=False)(py_func)
    typemap = dispatcher.overloads[dispatcher.signatures[0]].type_annotation.typemap
    wide = {var: str(t) for var, t in typemap.items() if "float64" in str(t)}
    assert not wide, f"float64 values in the float32 {name}: {wide}"


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, and nothing modified


def listed(out):
    return out if isinstance(out, (tuple, list)) else ()


def forward_args(dtype=np.float32, shape=(4, 3, 5)):
    x = np.arange(math.prod(shape), dtype=dtype).reshape(shape) % 7
    return dict(x=x, weight=np.ones(3, dtype), bias=np.zeros(3, dtype), running_mean=np.zeros(3, dtype),
                running_var=np.ones(3, dtype))


FORWARD_BAD = [
    # (id, change to the arguments, exception, message fragment)
    ("x-rank1", lambda a: a.update(x=np.zeros(6, np.float32)), ValueError, "x must have rank >= 2"),
    ("x-int", lambda a: a.update(x=np.zeros((4, 3), np.int64)), TypeError, "x must have dtype float32 or float64"),
    ("x-list", lambda a: a.update(x=[[1.0, 2.0, 3.0]] * 2), TypeError, "x must be a numpy.ndarray"),
    ("x-strided", lambda a: a.update(x=np.zeros((4, 6, 5), np.float32)[:, ::2]), ValueError, "x must be C-contiguous"),
    ("weight-length", lambda a: a.update(weight=np.ones(4, np.float32)), ValueError, r"weight must have shape \(3,\)"),
    ("weight-2d", lambda a: a.update(weight=np.ones((3, 1), np.float32)), ValueError, r"weight must have shape \(3,\)"),
    ("bias-length", lambda a: a.update(bias=np.zeros(2, np.float32)), ValueError, r"bias must have shape \(3,\)"),
    ("running_mean-length", lambda a: a.update(running_mean=np.zeros(5, np.float32)), ValueError,
     r"running_mean must have shape \(3,\)"),
    ("running_var-dtype", lambda a: a.update(running_var=np.ones(3)), TypeError,
     r"running_var must have the dtype of x \(float32\), got float64"),
    ("weight-dtype", lambda a: a.update(weight=np.ones(3)), TypeError, "weight must have the dtype of x"),
    ("channel_axis-high", lambda a: a.update(channel_axis=3), ValueError, r"channel_axis must be in \[-3, 3\)"),
    ("channel_axis-low", lambda a: a.update(channel_axis=-4), ValueError, "channel_axis must be in"),
    ("channel_axis-float", lambda a: a.update(channel_axis=1.0), TypeError, "channel_axis must be an int"),
    ("momentum-high", lambda a: a.update(momentum=1.5), ValueError, "momentum must be <= 1.0"),
    ("momentum-negative", lambda a: a.update(momentum=-0.1), ValueError, "momentum must be >= 0.0"),
    ("eps-zero", lambda a: a.update(eps=0.0), ValueError, "eps must be > 0.0"),
    ("eps-nan", lambda a: a.update(eps=float("nan")), ValueError, "eps must be finite"),
    ("eps-inf", lambda a: a.update(eps=float("inf")), ValueError, "eps must be finite"),
    ("training-int", lambda a: a.update(training=1), TypeError, "training must be a bool"),
    ("relu-str", lambda a: a.update(relu="yes"), TypeError, "relu must be a bool"),
    ("eval-without-running", lambda a: a.update(training=False, running_mean=None, running_var=None), ValueError,
     "running_mean and running_var are required with training=False"),
    ("running_var-missing", lambda a: a.update(running_var=None), ValueError,
     "running_mean and running_var must be given together"),
    ("running_mean-readonly", lambda a: a["running_mean"].setflags(write=False), ValueError,
     "running_mean must be writeable"),
    ("one-value-per-channel", lambda a: a.update(x=np.ones((1, 3, 1), np.float32), out=None), ValueError,
     "more than 1 value per channel"),
    ("out-length", lambda a: a.update(out=(None, None)), TypeError, "out must be None or a tuple of 3"),
    ("out-array", lambda a: a.update(out=np.zeros((4, 3, 5), np.float32)), TypeError, "out must be None or a tuple"),
    ("out-y-shape", lambda a: a.update(out=(np.zeros((4, 3, 4), np.float32), None, None)), ValueError,
     r"out\[0\] \(y\) must have the shape of x"),
    ("out-saved_mean-dtype", lambda a: a.update(out=(None, np.zeros(3), None)), TypeError,
     r"out\[1\] \(saved_mean\) must have the dtype of x"),
    ("out-y-is-x", lambda a: a.update(out=(a["x"], None, None)), ValueError, "must not share memory"),
    ("out-saved_mean-is-running_mean", lambda a: a.update(out=(None, a["running_mean"], None)), ValueError,
     "must not share memory"),
    ("running-is-weight", lambda a: a.update(running_mean=a["weight"]), ValueError, "must not share memory"),
    ("backend-unknown", lambda a: a.update(backend="cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("change, exc, match", [c[1:] for c in FORWARD_BAD], ids=[c[0] for c in FORWARD_BAD])
def test_forward_bad_input_raises_and_modifies_nothing(change, exc, match):
    args = forward_args()
    args["out"] = poisoned_outputs(args["x"], 3)
    change(args)
    arrays = [a for a in (*args.values(), *listed(args["out"])) if isinstance(a, np.ndarray)]
    before = [a.copy() for a in arrays]
    x = args.pop("x")
    positional = [args.pop(k) for k in ("weight", "bias", "running_mean", "running_var")]
    with pytest.raises(exc, match=match):
        batchnorm_forward(x, *positional, **args)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


def backward_args(dtype=np.float32, shape=(4, 3, 5)):
    x = np.arange(math.prod(shape), dtype=dtype).reshape(shape) % 7
    return dict(dy=np.ones(shape, dtype), x=x, weight=np.ones(3, dtype), saved_mean=np.full(3, 3.0, dtype),
                saved_invstd=np.full(3, 0.5, dtype))


BACKWARD_BAD = [
    ("dy-shape", lambda a: a.update(dy=np.ones((4, 3, 4), np.float32)), ValueError, "dy must have the shape of x"),
    ("dy-dtype", lambda a: a.update(dy=np.ones((4, 3, 5))), TypeError, "dy must have the dtype of x"),
    ("x-rank1", lambda a: a.update(x=np.ones(5, np.float32), dy=np.ones(5, np.float32)), ValueError,
     "x must have rank >= 2"),
    ("weight-length", lambda a: a.update(weight=np.ones(2, np.float32)), ValueError, "weight must have shape"),
    ("saved_mean-length", lambda a: a.update(saved_mean=np.ones(4, np.float32)), ValueError,
     "saved_mean must have shape"),
    ("saved_invstd-none", lambda a: a.update(saved_invstd=None), TypeError, "saved_invstd must be a numpy.ndarray"),
    ("saved_invstd-dtype", lambda a: a.update(saved_invstd=np.ones(3)), TypeError, "saved_invstd must have the dtype"),
    ("relu-without-bias", lambda a: a.update(relu=True), TypeError, "bias must be passed with relu=True"),
    ("bias-length", lambda a: a.update(relu=True, bias=np.zeros(4, np.float32)), ValueError, "bias must have shape"),
    ("training-str", lambda a: a.update(training="no"), TypeError, "training must be a bool"),
    ("channel_axis-high", lambda a: a.update(channel_axis=5), ValueError, "channel_axis must be in"),
    ("out-dx-is-dy", lambda a: a.update(out=(a["dy"], None, None)), ValueError, "must not share memory"),
    ("out-dweight-is-weight", lambda a: a.update(out=(None, a["weight"], None)), ValueError, "must not share memory"),
    ("out-dbias-readonly", lambda a: a.update(out=(None, None, np.zeros(3, np.float32))) or
     a["out"][2].setflags(write=False), ValueError, "must be writeable"),
]


@pytest.mark.parametrize("change, exc, match", [c[1:] for c in BACKWARD_BAD], ids=[c[0] for c in BACKWARD_BAD])
def test_backward_bad_input_raises_and_modifies_nothing(change, exc, match):
    args = backward_args()
    args["out"] = poisoned_outputs(args["x"], 3)
    change(args)
    arrays = [a for a in (*args.values(), *listed(args["out"])) if isinstance(a, np.ndarray)]
    before = [a.copy() for a in arrays]
    positional = [args.pop(k) for k in ("dy", "x", "weight", "saved_mean", "saved_invstd")]
    with pytest.raises(exc, match=match):
        batchnorm_backward(*positional, **args)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)
