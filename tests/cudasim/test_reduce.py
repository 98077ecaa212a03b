"""grad_sumsq, grad_multiplier and scale_grads_ on the simulator, against the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastopt.kernels.numba_cuda as backend
import fastopt.reference as reference

from conftest import assert_close

from .helpers import device, host

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["float32", "float64"]
# a list mixing empty arrays, one element, several simulated chunks (24) and a 2-D array
SHAPES = [(0,), (1,), (37,), (4, 33), (0, 5), (300,)]


def _grads(rng, dtypes):
    return [(rng.standard_normal(s) * 3).astype(dt) for s, dt in zip(SHAPES, dtypes)]


@pytest.mark.parametrize("mix", ["float32", "float64", "mixed"])
def test_grad_sumsq_matches_reference(mix, rng):
    dtypes = {"float32": [np.float32] * 6, "float64": [np.float64] * 6,
              "mixed": [np.float32, np.float64] * 3}[mix]
    grads = _grads(rng, dtypes)
    out = backend.grad_sumsq([device(g) for g in grads])
    assert out.shape == (1,) and out.dtype == np.float64
    np.testing.assert_allclose(host(out)[0], reference.grad_sumsq(grads), rtol=1e-13)


def test_grad_sumsq_of_nothing_is_zero():
    assert host(backend.grad_sumsq([]))[0] == 0.0
    assert host(backend.grad_sumsq([device(np.empty(0, np.float32))]))[0] == 0.0


# each bad value once and each dtype once (the kernel widens to float64 before squaring, the same code
# in both dtypes); that finite gradients give a finite sum is test_grad_sumsq_matches_reference's
@pytest.mark.parametrize("dtype, bad, expected", [(np.float32, -np.inf, np.inf), (np.float64, np.nan, np.nan)],
                         ids=["float32-inf", "float64-nan"])
def test_grad_sumsq_is_nonfinite_exactly_when_an_element_is(dtype, bad, expected, rng):
    grads = _grads(rng, [dtype] * 6)
    assert np.isfinite(reference.grad_sumsq(grads))  # only the planted element makes it non-finite
    grads[3][2, 17] = bad
    got = host(backend.grad_sumsq([device(g) for g in grads]))[0]
    np.testing.assert_equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("max_norm", [None, 1.0, 1e3])
@pytest.mark.parametrize("inv_scale", [1.0, 0.125])
@pytest.mark.parametrize("sumsq", [0.0, 4.0, 2.5e5, math.inf, math.nan])
def test_grad_multiplier_matches_reference(sumsq, inv_scale, max_norm, dtype):
    out = backend.grad_multiplier(device(np.array([sumsq])), max_norm, inv_scale, dtype)
    assert out.shape == (1,) and out.dtype == np.dtype(dtype)
    expected = np.dtype(dtype).type(reference.grad_multiplier(sumsq, max_norm, inv_scale, dtype))
    np.testing.assert_allclose(host(out)[0], expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("on_device", [False, True], ids=["host_mul", "device_mul"])
@pytest.mark.parametrize("mix", ["float32", "float64", "mixed"])
def test_scale_grads_matches_reference(mix, on_device, rng):
    dtypes = {"float32": [np.float32] * 6, "float64": [np.float64] * 6,
              "mixed": [np.float32, np.float64] * 3}[mix]
    grads = _grads(rng, dtypes)
    d_grads = [device(g) for g in grads]
    grad_mul = device(np.array([0.3], dtypes[0])) if on_device else 0.3
    backend.scale_grads_(d_grads, grad_mul)
    expected = [g.copy() for g in grads]
    # a device multiplier holds 0.3 rounded to its dtype; each array then rounds it to its own
    reference.scale_grads_(expected, float(dtypes[0](0.3)) if on_device else 0.3)
    for g, e, dt in zip(d_grads, expected, dtypes):
        assert_close(host(g), e.astype(np.float64), dt, "scaled gradient")


def test_norm_clip_pipeline_stays_on_the_device(rng):
    """grad_sumsq -> grad_multiplier -> an update reading the device multiplier."""
    grads = _grads(rng, [np.float32] * 6)
    d_grads = [device(g) for g in grads]
    sumsq = backend.grad_sumsq(d_grads)
    mul = backend.grad_multiplier(sumsq, 1.0, 0.5, np.float32)
    expected_mul = reference.grad_multiplier(reference.grad_sumsq(grads), 1.0, 0.5, np.float32)
    np.testing.assert_allclose(host(mul)[0], np.float32(expected_mul), rtol=1e-6)
    param = rng.standard_normal(300).astype(np.float32)
    d_param = device(param)
    backend.sgd_step(d_param, d_grads[-1], None, lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0,
                     convention="textbook", grad_mul=mul)
    expected = param.astype(np.float64)
    reference.sgd_step(expected, grads[-1].astype(np.float64), None, lr=1.0, momentum=0.0, nesterov=False,
                       weight_decay=0.0, convention="textbook", grad_mul=float(np.float32(expected_mul)))
    assert_close(host(d_param), expected, np.float32, "param")
