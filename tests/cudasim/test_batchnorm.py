"""Batch normalization forward and backward on the simulator, against the float64 reference.

Shapes cover ranks 2 to 4 in both layouts (channel axis 1 and last, plus a middle axis), channels
that fill several channels-last lanes (C > 32), and channels with enough values to be split over
several blocks (so the partials are merged across blocks). The simulator runs every CUDA thread as
a Python thread, so the table is a covering set, not a product. What depends on the shape (the
indexing and splits of ``stats_partial`` and ``grad_partial``, the channel tracking of ``normalize``
and ``input_grad``) runs in training mode on every shape; what does not (``eval_coefficients``,
``grad_finalize``'s eval branch, the relu and affine flags) runs on a few shapes, each value of each
flag in both dtypes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt.kernels.numba_cuda as backend
import fastopt.reference as reference

from .helpers import bn_case, bn_compare, device, host, run_batchnorm, run_batchnorm_f16

SHAPES = [
    ((7, 3), 1),            # rank 2, channels last (inner = 1), one block per channel group
    ((4, 2, 40), 1),        # rank 3, channel first, two splits per channel
    ((2, 4, 25, 3), 3),     # rank 4, channels last (NHWC), three splits per channel
    ((2, 3, 4, 6), 1),      # rank 4, channel first (NCHW)
]
MORE_SHAPES = [
    ((40, 5), 1),           # rank 2, channels last (TX = 8, TY = 8): three splits of 13-14 rows, so
                            # some threads take two rows; 200 values, so normalize's grid-stride turns
    ((4, 12, 3), 2),        # rank 3, channels last: two splits of 24 rows (TY = 16)
    ((2, 4, 3, 5), 2),      # rank 4, channel axis in the middle
]
WIDE_SHAPE = ((5, 36), 1)   # more channels than a block's 32 lanes (two channel groups)
# (training, relu, affine, dtype): every value of each option appears with both dtypes
COMBOS = [
    (True, False, True, np.float32),
    (True, True, False, np.float64),
    (False, True, True, np.float64),
    (False, False, False, np.float32),
]
TRAINING = COMBOS[:2]  # every shape: both dtypes, relu on and off, affine on and off
# the shapes with one combination each: relu in float32 and linear in float64 in training (COMBOS
# has relu in float64 only)
MORE_COMBOS = [(True, True, True, np.float32), (True, False, False, np.float64), COMBOS[0]]
# eval mode (eval_coefficients, grad_finalize without the batch terms) on one channels-last and one
# channel-first shape, relu and affine each on and off, both dtypes
EVAL = [(SHAPES[0], COMBOS[2]), (SHAPES[1], COMBOS[3])]


def shape_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-axis{axis}"


def combo_id(combo):
    training, relu, affine, dtype = combo
    return "-".join(["train" if training else "eval", "relu" if relu else "linear",
                     "affine" if affine else "plain", np.dtype(dtype).name])


_TABLE = ([(s, c) for s in SHAPES for c in TRAINING] + EVAL
          + list(zip(MORE_SHAPES, MORE_COMBOS)) + [(WIDE_SHAPE, COMBOS[1])])


@pytest.mark.parametrize("case_shape, combo", _TABLE, ids=[f"{shape_id(s)}-{combo_id(c)}" for s, c in _TABLE])
def test_batchnorm_matches_reference(case_shape, combo, rng):
    shape, axis = case_shape
    training, relu, affine, dtype = combo
    case = bn_case(rng, shape, axis, dtype, relu=relu, affine=affine)
    ref = run_batchnorm(reference, case, np.float64, training=training, relu=relu, axis=axis, on_device=False)
    got = run_batchnorm(backend, case, dtype, training=training, relu=relu, axis=axis)
    bn_compare(got, ref, case, dtype, relu=relu, axis=axis)


# one dtype: no running statistics is a flag of stats_finalize, the same code in both dtypes (every
# kernel runs in both dtypes in test_batchnorm_matches_reference)
@pytest.mark.parametrize("dtype", [np.float32], ids=["float32"])
def test_training_without_running_statistics(dtype, rng):
    case = bn_case(rng, (4, 3, 10), 1, dtype, relu=False)
    ref = run_batchnorm(reference, case, np.float64, training=True, relu=False, axis=1, on_device=False,
                        running=False)
    got = run_batchnorm(backend, case, dtype, training=True, relu=False, axis=1, running=False)
    bn_compare(got, ref, case, dtype, relu=False, axis=1)


def test_large_mean_float32_channel_keeps_its_accuracy(rng):
    """μ = hi + lo: a float32 channel at 1e4 ± 1 normalizes as accurately as one at 0."""
    case = bn_case(rng, (40, 4, 3), 1, np.float32, relu=False, offset_scale=1e4)
    ref = run_batchnorm(reference, case, np.float64, training=True, relu=False, axis=1, on_device=False)
    got = run_batchnorm(backend, case, np.float32, training=True, relu=False, axis=1)
    bn_compare(got, ref, case, np.float32, relu=False, axis=1, keys=["y", "saved_mean", "saved_invstd",
                                                                       "running_mean", "running_var"])


@pytest.mark.parametrize("axis", [1, -1])
def test_constant_channel_gives_beta(axis, rng):
    shape = (6, 2, 9) if axis == 1 else (6, 9, 2)
    x = np.full(shape, 3.25)
    case = dict(x=x, weight=np.array([2.0, -1.0]), bias=np.array([0.5, -0.25]), running_mean=np.zeros(2),
                running_var=np.ones(2), dy=rng.standard_normal(shape))
    got = run_batchnorm(backend, case, np.float32, training=True, relu=False, axis=axis)
    np.testing.assert_array_equal(got["saved_mean"], np.float32([3.25, 3.25]))
    np.testing.assert_array_equal(got["saved_invstd"], np.float32(1 / np.sqrt(1e-5)) * np.ones(2, np.float32))
    beta = case["bias"].reshape((1, 2, 1) if axis == 1 else (1, 1, 2))
    np.testing.assert_array_equal(got["y"], np.broadcast_to(beta, shape).astype(np.float32))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch(training, rng):
    """m = 0: training leaves the running statistics alone and saves NaN; eval saves the running
    ones; backward's parameter gradients are 0."""
    case = bn_case(rng, (0, 3), 1, np.float64, relu=False)
    got = run_batchnorm(backend, case, np.float64, training=training, relu=False, axis=1)
    assert got["y"].shape == (0, 3) and got["dx"].shape == (0, 3)
    np.testing.assert_array_equal(got["running_mean"], case["running_mean"])
    np.testing.assert_array_equal(got["running_var"], case["running_var"])
    if training:
        assert np.isnan(got["saved_mean"]).all() and np.isnan(got["saved_invstd"]).all()
    else:
        np.testing.assert_array_equal(got["saved_mean"], case["running_mean"])
    np.testing.assert_array_equal(got["dweight"], 0.0)
    np.testing.assert_array_equal(got["dbias"], 0.0)


def test_no_channels_writes_nothing_and_does_not_fail():
    x = device(np.empty((4, 0)))
    empty = device(np.empty(0))
    backend.batchnorm_forward(x, None, None, None, None, device(np.empty((4, 0))), empty, empty,
                              training=True, momentum=0.1, eps=1e-5, channel_axis=1, relu=False)
    backend.batchnorm_backward(x, x, None, None, empty, empty, device(np.empty((4, 0))), empty, empty,
                               training=True, channel_axis=1, relu=False)


def test_eval_forward_saves_the_running_statistics(rng):
    case = bn_case(rng, (5, 4, 6), 1, np.float64, relu=False)
    got = run_batchnorm(backend, case, np.float64, training=False, relu=False, axis=1)
    np.testing.assert_array_equal(got["saved_mean"], case["running_mean"])
    np.testing.assert_allclose(got["saved_invstd"], 1 / np.sqrt(case["running_var"] + 1e-5), rtol=1e-15)
    assert math.isfinite(host(device(got["y"])).sum())


# ---------------------------------------------------------------------------------------------
# float16 x and dy (``bn_lowp``: decode, the float32 kernels, encode)

# one case (each launch costs the simulator ~0.1 s): the shape-dependent code is the float32 kernels'
# (the tests above); tests/test_gpu_lowp_numba_cuda.py runs more shapes, eval mode and no affine
F16_TABLE = [(((7, 3), 1), True, True, True)]  # channels last, training, relu, affine


@pytest.mark.parametrize("case_shape, training, relu, affine", F16_TABLE,
                         ids=[f"{shape_id(s)}-{'train' if t else 'eval'}-{'relu' if r else 'linear'}-"
                              f"{'affine' if a else 'plain'}" for s, t, r, a in F16_TABLE])
def test_batchnorm_f16_is_the_float32_kernels_rounded(case_shape, training, relu, affine, rng):
    shape, axis = case_shape
    run_batchnorm_f16(rng, shape, axis, training=training, relu=relu, affine=affine)


def test_f16_conversion_kernels_match_the_cpu_backend_bits(rng):
    """decode: every float16 pattern class (±0, subnormals, normals, ±Inf, quiet and signalling
    NaNs with payloads) exactly; encode: round to nearest even, ties, overflow, subnormal results
    and NaN: the bits of the CPU backend's conversion passes (``numba_cpu.bn_lowp``)."""
    from fastopt.kernels.numba_cpu import bn_lowp as cpu
    from fastopt.kernels.numba_cuda import bn_lowp

    bits = np.concatenate([np.array([0, 0x8000, 1, 0x3FF, 0x400, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7C01,
                                     0x7E00, 0xFFFF, 0x8001], np.uint16),
                           rng.integers(0, 1 << 16, 100, dtype=np.uint16)])
    out = device(np.full(bits.size, np.nan, np.float32))
    bn_lowp._decode(device(bits).view(np.float16), out, 0)
    want = np.empty(bits.size, np.float32)
    cpu._decode(bits.view(np.float16), want)
    np.testing.assert_array_equal(host(out).view(np.uint32), want.view(np.uint32))

    values = np.concatenate([np.float32([1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 65519.0, 65520.0, -70000.0, 2.0**-25,
                                         3 * 2.0**-26, -6e-8, np.inf, -np.inf, np.nan, -np.nan]),
                             rng.standard_normal(100).astype(np.float32) * 1e3])
    encoded = device(np.zeros(values.size, np.uint16))
    bn_lowp._encode(device(values), encoded.view(np.float16), 0)
    want = np.empty(values.size, np.float16)
    cpu._encode(values, want)
    np.testing.assert_array_equal(host(encoded), want.view(np.uint16))


@pytest.mark.parametrize("which", ["x-float32", "y-float32", "dx-float32"])
def test_batchnorm_f16_bad_dtype_raises_before_writing(which):
    """A float32 x, y or dx given to the float16 functions: TypeError naming it; nothing written."""
    x16 = device(np.ones((4, 3), np.float16))
    ones = device(np.ones(3, np.float32))
    out = device(np.full((4, 3), np.nan, np.float16 if which == "x-float32" else np.float32))
    a, b = device(np.full(3, np.nan, np.float32)), device(np.full(3, np.nan, np.float32))
    with pytest.raises(TypeError, match=f"{which.split('-')[0]}: .*float16 only"):
        if which == "dx-float32":
            backend.batchnorm_backward_lowp(x16, x16, ones, ones, ones, ones, out, a, b, training=True,
                                            channel_axis=1, relu=False)
        else:
            x = device(np.ones((4, 3), np.float32)) if which == "x-float32" else x16
            backend.batchnorm_forward_lowp(x, ones, ones, ones, ones, out, a, b, training=True, momentum=0.1,
                                           eps=1e-5, channel_axis=1, relu=False)
    assert np.isnan(host(a)).all() and np.isnan(host(b)).all() and np.isnan(host(out)).all()
