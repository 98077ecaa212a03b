"""Batch normalization at randomized, non-default ``eps`` and ``momentum``: the functions on every
layout, backend, dtype, mode and ReLU setting, and the ``BatchNorm`` layer over several training
steps then eval, against the float64 reference with the same values.

Each drawn value is checked to matter: the reference run with ``eps`` = 1e-5 or ``momentum`` = 0.1
(the defaults) must differ from the expected outputs beyond the tolerance, so a kernel that ignored
either would fail. Tolerances are those of ``tests/test_batchnorm.py`` (error / magnitude of what
was summed).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from fastopt.batchnorm import BatchNorm

from test_batchnorm import BACKENDS, DTYPE_IDS, DTYPES, TOL, assert_within, magnitudes, make_case, run

DEFAULTS = dict(eps=1e-5, momentum=0.1)
# (shape, channel_axis): both layouts, odd sizes, a row longer than a statistics block
SHAPES = [((6, 3, 5), 1), ((2, 4, 5, 3), -1), ((3, 2, 2100), 1), ((700, 5), -1)]


def shape_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-axis{axis}"


def case_rng(*parts):
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


def draw_values(rng):
    """eps large enough to move invstd beyond the float32 tolerance for channels of variance up to
    9; momentum away from 0.1."""
    return dict(eps=float(np.exp(rng.uniform(np.log(1e-2), np.log(0.5)))), momentum=float(rng.uniform(0.2, 0.7)))


def draw_case(rng, shape, axis, dtype, *, relu, eps):
    """Inputs as ``test_batchnorm.make_case`` draws them, away from the ReLU kink at this ``eps``."""
    return make_case(rng, shape, axis, dtype, relu=relu, eps=eps)


def _differs(a: dict, b: dict, mags: dict, tol: float) -> bool:
    for key, mag in mags.items():
        if a.get(key) is None or b.get(key) is None:
            continue
        bound = tol * (np.broadcast_to(mag, b[key].shape) + np.abs(b[key]))
        if (np.abs(a[key].astype(np.float64) - b[key]) > 2 * bound).any():
            return True
    return False


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_shape", SHAPES, ids=shape_id)
def test_functions_at_drawn_eps_and_momentum(case_shape, backend, dtype, training, relu):
    shape, axis = case_shape
    rng = case_rng(shape, axis, backend, np.dtype(dtype).name, training, relu)
    values = draw_values(rng)
    case = draw_case(rng, shape, axis, dtype, relu=relu, eps=values["eps"])
    ref = run(case, backend="numpy", dtype=np.float64, training=training, relu=relu, axis=axis, **values)
    got = run(case, backend=backend, dtype=dtype, training=training, relu=relu, axis=axis, **values)
    mags = magnitudes(case, ref, training=training, relu=relu, axis=axis)
    tol = TOL[np.dtype(dtype)]
    for key in mags:
        if ref.get(key) is None:
            continue
        assert got[key].dtype == np.dtype(dtype), f"{key}: dtype {got[key].dtype}"
        assert_within(f"{key} at {values}", got[key], ref[key], mags[key], tol)
    # each value must matter: momentum only moves the running statistics, which eval only reads
    for name in (("eps", "momentum") if training else ("eps",)):
        other = run(case, backend="numpy", dtype=np.float64, training=training, relu=relu, axis=axis,
                    **dict(values, **{name: DEFAULTS[name]}))
        assert _differs(other, ref, mags, tol), f"{name}={values[name]} does not move any output beyond the tolerance"


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_shape", [((8, 3, 5), 1), ((6, 5, 4), -1)], ids=shape_id)
def test_layer_at_drawn_eps_and_momentum(case_shape, backend, dtype, relu):
    """Three training steps (forward and backward) then an eval forward: the layer's outputs, its
    running statistics and its parameter gradients follow the reference functions called with the
    layer's eps and momentum, step by step from float64 copies of the layer's state."""
    shape, axis = case_shape
    rng = case_rng("layer", shape, axis, backend, np.dtype(dtype).name, relu)
    values = draw_values(rng)
    channels = shape[axis]
    layer = BatchNorm(channels, **values, channel_axis=axis, relu=relu, dtype=dtype, backend=backend)
    tol = TOL[np.dtype(dtype)]
    mattered = set()
    for step in range(4):
        training = step < 3
        layer.train(training)
        case = draw_case(rng, shape, axis, dtype, relu=relu, eps=values["eps"])
        if step == 0:
            layer.weight[...], layer.bias[...] = case["weight"], case["bias"]
        case.update(weight=layer.weight.copy(), bias=layer.bias.copy(), running_mean=layer.running_mean.copy(),
                    running_var=layer.running_var.copy())
        ref = run(case, backend="numpy", dtype=np.float64, training=training, relu=relu, axis=axis, **values)
        mags = magnitudes(case, ref, training=training, relu=relu, axis=axis)
        y = layer.forward(case["x"])
        dx = layer.backward(case["dy"])
        got = dict(y=y, dx=dx, dweight=layer.grad_weight, dbias=layer.grad_bias,
                   running_mean=layer.running_mean, running_var=layer.running_var)
        for key, value in got.items():
            assert value.dtype == np.dtype(dtype), f"{key}: dtype {value.dtype}"
            assert_within(f"{key} at step {step} ({values})", value, ref[key], mags[key], tol)
        for name in values:
            other = run(case, backend="numpy", dtype=np.float64, training=training, relu=relu, axis=axis,
                        **dict(values, **{name: DEFAULTS[name]}))
            if _differs(other, ref, {k: mags[k] for k in got}, tol):
                mattered.add(name)
    assert mattered == set(values), f"{sorted(set(values) - mattered)} never moved the layer's outputs: draw values that matter"
