"""The "cupy" backend on a real GPU, every kernel against the float64 NumPy reference.

Marked ``gpu``; each skips with the reason when CuPy is not installed or no CUDA device is usable.
The backend modules are called directly (``fastopt.kernels.cupy``), with CuPy arrays (and torch
CUDA tensors where torch is installed). Outputs are poisoned with NaN before a kernel runs, so an
unwritten element fails. ``test_backend_imports_anywhere_and_compiles_nothing`` is not a GPU test:
importing the backend needs neither CuPy nor a GPU and compiles nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import fastopt.kernels.cupy as cupy_backend
import fastopt.reference as reference
from fastopt import functional

from conftest import TOLERANCE, assert_close
from optim_cases import CASES, case_id, initial_state
import sweep

NO_GPU = cupy_backend.unavailable_reason() or None  # imports CuPy if installed, compiles nothing


def gpu(test):
    """A GPU test: marked ``gpu``, skipped with the reason where no GPU can run it."""
    return pytest.mark.gpu(pytest.mark.skipif(NO_GPU is not None, reason=NO_GPU or "")(test))


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def backend():
    return cupy_backend


def host(a) -> np.ndarray:
    import cupy

    return cupy.asnumpy(a)


def device(values, dtype, offset: int = 0):
    """A device copy of ``values`` as ``dtype``; ``offset`` > 0 makes a view whose first element
    is ``offset`` elements into its allocation (misaligned for the 16-byte vector paths)."""
    import cupy

    values = np.asarray(values, dtype=dtype)
    base = cupy.empty(values.size + offset, dtype)
    view = base[offset:].reshape(values.shape)
    if values.size:
        view.set(values)
    return view


# ---------------------------------------------------------------------------------------------
# import without a GPU (not a GPU test)


def test_backend_imports_anywhere_and_compiles_nothing():
    """Importing needs no GPU and no CuPy: nothing is imported from CuPy, compiled or allocated,
    and unavailable_reason() says whether the backend can run here."""
    code = (
        "import json, sys\n"
        "import fastopt.kernels.cupy as k\n"
        "assert 'cupy' not in sys.modules, 'CuPy imported at import'\n"
        "assert k._loader.compiled() == []\n"
        "names = ['sgd_step', 'adagrad_step', 'rmsprop_step', 'adadelta_step', 'adam_step', "
        "'delta_bar_delta_step', 'multi_step', 'grad_sumsq', 'grad_multiplier', 'scale_grads_', "
        "'batchnorm_forward', 'batchnorm_backward', 'owns', 'zeros_like', 'full_like', 'empty_like', 'empty', "
        "'to_numpy', 'from_numpy', 'copy_from_numpy', 'unavailable_reason']\n"
        "missing = [n for n in names if not callable(getattr(k, n, None))]\n"
        "assert not missing, missing\n"
        "import numpy\n"
        "assert not k.owns(numpy.zeros(3))\n"
        "reason = k.unavailable_reason()\n"
        "assert isinstance(reason, str)\n"
        "assert k._loader.compiled() == []\n"
        "print(json.dumps(reason))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    reason = json.loads(out.stdout.strip())
    assert (reason == "") == (NO_GPU is None), (reason, NO_GPU)


# ---------------------------------------------------------------------------------------------
# optimizer updates

STEPS = 3
# (shape, offset): sizes 0, 1, odd, not a multiple of a block, larger than one grid round; offset 1
# is a misaligned view (element-by-element kernel), offset 0 the 16-byte vector kernel
SHAPES = [((0,), 0), ((1,), 0), ((7,), 0), ((1000,), 0), ((1000,), 1), ((2**20 + 3,), 0), ((2**20 + 3,), 1),
          ((3, 5, 7), 0)]


def _shape_id(item):
    shape, offset = item
    return "x".join(map(str, shape)) + ("-misaligned" if offset else "")


def _reference_step(name, hyper, param, grad, state, step, *, grad_mul=1.0, grad_clip=math.inf, avg=None,
                     avg_weight=0.0):
    """One float64 reference step from float64 copies; returns (param, state, avg)."""
    spec = functional.SPECS[name]
    p = param.astype(np.float64)
    s = {k: v.astype(np.float64) for k, v in state.items()}
    a = None if avg is None else avg.astype(np.float64)
    step_kw = {"step": step} if spec.step_count else {}
    getattr(reference, spec.kernel)(p, grad.astype(np.float64), *(s[k] for k in spec.state), **hyper, **step_kw,
                                    grad_mul=grad_mul, grad_clip=grad_clip, avg=a, avg_weight=avg_weight)
    return p, s, a


@gpu
@pytest.mark.parametrize("shape_offset", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_update_matches_float64_reference(case, dtype, shape_offset, backend, rng):
    name, hyper = case
    shape, offset = shape_offset
    spec = functional.SPECS[name]
    h = spec.check(**hyper)
    param = device(rng.standard_normal(shape), dtype, offset)
    state = {k: device(v, dtype, offset) for k, v in initial_state(name, shape, dtype, rng).items()}
    for t in range(1, STEPS + 1):
        g = rng.standard_normal(shape).astype(dtype)
        if hyper.get("weight_decay"):
            g = np.copysign(g, host(param))  # g + λθ never cancels (see test_optim_backends)
        grad = device(g, dtype, offset)
        before = {"param": host(param), **{k: host(v) for k, v in state.items()}}
        expected_param, expected_state, _ = _reference_step(
            name, h, host(param), g, {k: host(v) for k, v in state.items()}, t)
        step_kw = {"step": t} if spec.step_count else {}
        getattr(backend, spec.kernel)(param, grad, *(state[k] for k in spec.state), **h, **step_kw)
        assert param.dtype == dtype
        np.testing.assert_array_equal(host(grad), g, err_msg="the gradient was modified")
        assert_close(host(param), expected_param, dtype, f"param after step {t}", before=before["param"])
        for k in spec.uses(h):
            assert_close(host(state[k]), expected_state[k], dtype, f"{k} after step {t}", before=before[k])


EXTRA_CASES = [CASES[2], CASES[5], CASES[10], CASES[14], CASES[16], CASES[19], CASES[21], CASES[22]]


@gpu
@pytest.mark.parametrize("mul_on_device", [False, True], ids=["host-mul", "device-mul"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", EXTRA_CASES, ids=case_id)
def test_update_with_extras_matches_reference(case, dtype, offset, mul_on_device, backend, rng):
    """grad_mul (host number or device scalar), grad_clip and the Polyak average, fused; the
    factors are exact in float32 so the float64 reference sees the same values."""
    name, hyper = case
    spec = functional.SPECS[name]
    h = spec.check(**hyper)
    shape = (4099,)
    param = device(rng.standard_normal(shape), dtype, offset)
    state = {k: device(v, dtype, offset) for k, v in initial_state(name, shape, dtype, rng).items()}
    avg = device(rng.standard_normal(shape), dtype, offset)
    extras = dict(grad_mul=0.5, grad_clip=0.75, avg_weight=0.25)
    for t in range(1, STEPS + 1):
        g = (rng.standard_normal(shape) * 2).astype(dtype)
        if hyper.get("weight_decay"):
            g = np.copysign(g, host(param))  # g + λθ never cancels (see test_optim_backends)
        g[7] = np.nan  # NaN passes through the clamp
        grad = device(g, dtype, offset)
        before = {"param": host(param), "avg": host(avg), **{k: host(v) for k, v in state.items()}}
        expected_param, expected_state, expected_avg = _reference_step(
            name, h, host(param), g, {k: host(v) for k, v in state.items()}, t, avg=host(avg), **extras)
        mul = device([0.5], dtype) if mul_on_device else 0.5
        step_kw = {"step": t} if spec.step_count else {}
        getattr(backend, spec.kernel)(param, grad, *(state[k] for k in spec.state), **h, **step_kw, grad_mul=mul,
                                      grad_clip=0.75, avg=avg, avg_weight=0.25)
        assert np.isnan(host(param)[7]) and np.isnan(host(avg)[7])
        keep = np.arange(shape[0]) != 7
        assert_close(host(param)[keep], expected_param[keep], dtype, f"param after step {t}",
                     before=before["param"][keep])
        assert_close(host(avg)[keep], expected_avg[keep], dtype, f"avg after step {t}", before=before["avg"][keep])
        for k in spec.uses(h):
            assert_close(host(state[k])[keep], expected_state[k][keep], dtype, f"{k} after step {t}",
                         before=before[k][keep])


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", EXTRA_CASES, ids=case_id)
def test_default_extras_reproduce_the_plain_update_bit_for_bit(case, dtype, backend, cp, rng):
    name, hyper = case
    spec = functional.SPECS[name]
    h = spec.check(**hyper)
    shape = (1001,)
    start = rng.standard_normal(shape)
    states0 = initial_state(name, shape, dtype, rng)
    g = rng.standard_normal(shape).astype(dtype)
    step_kw = {"step": 1} if spec.step_count else {}
    results = []
    for extras in ({}, dict(grad_mul=1.0, grad_clip=math.inf, avg=None, avg_weight=0.0),
                   dict(grad_mul=cp.ones(1, dtype))):
        param = device(start, dtype)
        state = {k: device(v, dtype) for k, v in states0.items()}
        getattr(backend, spec.kernel)(param, device(g, dtype), *(state[k] for k in spec.state), **h, **step_kw,
                                      **extras)
        results.append([host(param)] + [host(state[k]) for k in spec.uses(h)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


# ---------------------------------------------------------------------------------------------
# many tensors at once


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_multi_step_matches_per_tensor_reference(case, dtype, backend, rng, monkeypatch):
    """Tensors of many sizes (0, tiny, misaligned, larger than a grid round), more than one launch's
    capacity, with extras and averages; launches counted."""
    from fastopt.kernels.cupy import _loader, _sources, optim

    name, hyper = case
    spec = functional.SPECS[name]
    h = spec.check(**hyper)
    count = 140
    sizes = [int(s) for s in rng.integers(0, 300, count)] + [0, 1, 2**20 + 3, 4096]
    offsets = [int(o) for o in rng.integers(0, 2, len(sizes))]
    params = [device(rng.standard_normal(n), dtype, o) for n, o in zip(sizes, offsets)]
    states = [{k: device(v, dtype, o) for k, v in initial_state(name, (n,), dtype, rng).items()}
              for n, o in zip(sizes, offsets)]
    avgs = [device(rng.standard_normal(n), dtype) for n in sizes]
    launches = []
    real_launch = _loader.launch
    monkeypatch.setattr(_loader, "launch", lambda *a: (launches.append(a[1]), real_launch(*a)))
    for t in range(1, 3):
        grads_host = [rng.standard_normal(n).astype(dtype) for n in sizes]
        if hyper.get("weight_decay"):  # g + λθ never cancels (see test_optim_backends)
            grads_host = [np.copysign(g, host(p)) for g, p in zip(grads_host, params)]
        grads = [device(g, dtype, o) for g, o in zip(grads_host, offsets)]
        # each array before the step: an update that cancels leaves an error of its inputs' size
        before = [(host(p), host(a), {k: host(v) for k, v in s.items()}) for p, s, a in zip(params, states, avgs)]
        expected = [_reference_step(name, h, host(p), g, {k: host(v) for k, v in s.items()}, t, grad_mul=0.5,
                                    grad_clip=1.5, avg=host(a), avg_weight=0.25)
                    for p, g, s, a in zip(params, grads_host, states, avgs)]
        step_kw = {"step": t} if spec.step_count else {}
        launches.clear()
        backend.multi_step(spec.kernel, params, grads, [tuple(s[k] for k in spec.state) for s in states], avgs,
                           grad_mul=0.5, grad_clip=1.5, avg_weight=0.25, **h, **step_kw)
        variant = optim._CONFIGURE[spec.kernel](**h, **step_kw)[0]
        capacity = _sources.list_capacity(_sources.UPDATES[variant].states + 3)
        assert len(launches) == -(-sum(1 for n in sizes if n) // capacity)
        for i, (p, s, a, (ep, es, ea)) in enumerate(zip(params, states, avgs, expected)):
            what = f"tensor {i} (n={sizes[i]}, offset {offsets[i]}) step {t}"
            p0, a0, s0 = before[i]
            assert_close(host(p), ep, dtype, "param of " + what, before=p0)
            assert_close(host(a), ea, dtype, "avg of " + what, before=a0)
            for k in spec.uses(h):
                assert_close(host(s[k]), es[k], dtype, f"{k} of " + what, before=s0[k])


# ---------------------------------------------------------------------------------------------
# gradient reductions


@gpu
@pytest.mark.parametrize("dtypes", [(np.float32,), (np.float64,), (np.float32, np.float64)],
                         ids=["float32", "float64", "mixed"])
@pytest.mark.parametrize("count", [0, 1, 7, 300])
def test_grad_sumsq_matches_reference(count, dtypes, backend, cp, rng):
    sizes = [int(s) for s in rng.integers(0, 5000, count)]
    if count:
        sizes[0] = 2**20 + 3
    grads_host = [rng.standard_normal(n).astype(dtypes[i % len(dtypes)]) for i, n in enumerate(sizes)]
    grads = [device(g, g.dtype, i % 2) for i, g in enumerate(grads_host)]
    out = backend.grad_sumsq(grads)
    assert isinstance(out, cp.ndarray) and out.shape == (1,) and out.dtype == np.float64
    np.testing.assert_allclose(host(out)[0], reference.grad_sumsq(grads_host), rtol=1e-12)
    if count:
        for bad in (np.nan, np.inf, -np.inf):
            g = grads_host[0].copy()
            g[12345] = bad
            got = host(backend.grad_sumsq([device(g, g.dtype)] + grads[1:]))[0]
            assert (np.isnan(got) if np.isnan(bad) else got == np.inf), (bad, got)


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_grad_multiplier_matches_reference(dtype, backend, cp):
    for sumsq in (0.0, 0.25, 4.0, 1e6, math.inf, math.nan):
        for max_norm, inv_scale in ((None, 1.0), (None, 1 / 1024), (1.0, 1.0), (2.0, 0.25), (1e-3, 1.0)):
            expected = dtype(reference.grad_multiplier(sumsq, max_norm, inv_scale, dtype))
            for given in (cp.array([sumsq], np.float64), sumsq):
                out = backend.grad_multiplier(given, max_norm, inv_scale, dtype)
                assert isinstance(out, cp.ndarray) and out.shape == (1,) and out.dtype == dtype
                got = host(out)[0]
                assert got == expected or (np.isnan(got) and np.isnan(expected)), (sumsq, max_norm, inv_scale, got)


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_scale_grads_matches_reference(dtype, backend, cp, rng):
    sizes = [0, 1, 5, 1001, 2**20 + 3] + [int(s) for s in rng.integers(0, 100, 200)]
    grads_host = [rng.standard_normal(n).astype(dtype) for n in sizes]
    grads = [device(g, dtype, i % 2) for i, g in enumerate(grads_host)]
    expected = [g.copy() for g in grads_host]
    reference.scale_grads_(expected, 0.3)
    backend.scale_grads_(grads, 0.3)
    for g, e in zip(grads, expected):
        np.testing.assert_array_equal(host(g), e)
    backend.scale_grads_(grads, cp.array([2.0], dtype))
    for g, e in zip(grads, expected):
        np.testing.assert_array_equal(host(g), e * dtype(2.0))


@gpu
def test_clip_by_norm_pipeline_stays_on_the_device(backend, cp, rng):
    """grad_sumsq → grad_multiplier → adam_step(grad_mul=device array), as a training step uses it."""
    dtype = np.float32
    grads_host = [rng.standard_normal(n).astype(dtype) * 10 for n in (1000, 33, 4096)]
    grads = [device(g, dtype) for g in grads_host]
    mul = backend.grad_multiplier(backend.grad_sumsq(grads), 1.0, 1.0, dtype)
    expected_mul = reference.grad_multiplier(reference.grad_sumsq(grads_host), 1.0, 1.0, dtype)
    np.testing.assert_allclose(host(mul)[0], expected_mul, rtol=1e-6)
    h = functional.SPECS["adam"].check(lr=1e-2)
    p = device(np.ones(1000), dtype)
    m, v = backend.zeros_like(p), backend.zeros_like(p)
    backend.adam_step(p, grads[0], m, v, None, step=1, grad_mul=mul, **h)
    ep, _, _ = _reference_step("adam", h, np.ones(1000, dtype), grads_host[0], {"m": np.zeros(1000, dtype),
                               "v": np.zeros(1000, dtype), "v_max": np.zeros(1000, dtype)}, 1,
                               grad_mul=float(host(mul)[0]))
    assert_close(host(p), ep, dtype, "param")


# ---------------------------------------------------------------------------------------------
# batch normalization


BN_SHAPES = [((5, 3), 1), ((4, 3, 5), 1), ((2, 3, 4, 5), 1), ((4, 5, 3), 2), ((2, 4, 5, 3), 3), ((2, 3, 2100), 1),
             ((3, 2500), 1), ((2, 4, 3, 5), 2), ((64, 40), 1), ((3, 70, 7, 7), 1)]
# many chunks per channel, tiles of channels, rows longer than a block; too large to keep every
# pre-activation away from the ReLU kink, so ReLU is tested on the shapes above
BN_MEDIUM_SHAPES = [((16, 8, 64, 64), 1), ((16, 64, 64, 8), 3), ((7, 3, 5001), 1), ((1, 2, 50001), 1),
                    ((4096, 33), 1), ((64, 1000), 1), ((256, 70, 7, 7), 1)]


def _bn_id(item):
    shape, axis = item
    return "x".join(map(str, shape)) + f"-axis{axis}"


def _bn_run_gpu(backend, case, dtype, *, training, relu, axis, running=True, offset=0):
    """Forward then backward on the cupy backend, every output poisoned first."""
    import cupy

    def dev(a):
        return None if a is None else device(a, dtype, offset)

    x = dev(case["x"])
    channels = x.shape[axis]
    weight, bias = dev(case["weight"]), dev(case["bias"])
    rm = dev(case["running_mean"]) if running else None
    rv = dev(case["running_var"]) if running else None
    y = device(np.full(x.shape, np.nan), dtype, offset)
    saved_mean, saved_invstd = cupy.full(channels, np.nan, dtype), cupy.full(channels, np.nan, dtype)
    backend.batchnorm_forward(x, weight, bias, rm, rv, y, saved_mean, saved_invstd, training=training, momentum=0.1,
                              eps=1e-5, channel_axis=axis, relu=relu)
    dx = device(np.full(x.shape, np.nan), dtype, offset)
    dweight, dbias = cupy.full(channels, np.nan, dtype), cupy.full(channels, np.nan, dtype)
    backend.batchnorm_backward(dev(case["dy"]), x, weight, bias, saved_mean, saved_invstd, dx, dweight, dbias,
                               training=training, channel_axis=axis, relu=relu)
    out = dict(y=y, saved_mean=saved_mean, saved_invstd=saved_invstd, running_mean=rm, running_var=rv, dx=dx,
               dweight=dweight, dbias=dbias)
    return {k: None if v is None else host(v) for k, v in out.items()}


@gpu
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case_shape", BN_SHAPES, ids=_bn_id)
def test_batchnorm_matches_float64_reference(case_shape, dtype, training, relu, affine, backend, rng):
    from test_batchnorm import compare_all, magnitudes, make_case, run

    shape, axis = case_shape
    case = make_case(rng, shape, axis, dtype, relu=relu, affine=affine)
    ref = run(case, backend="numpy", dtype=np.float64, training=training, relu=relu, axis=axis)
    got = _bn_run_gpu(backend, case, dtype, training=training, relu=relu, axis=axis, offset=int(shape[0] % 2))
    compare_all(got, ref, magnitudes(case, ref, training=training, relu=relu, axis=axis), dtype)


@gpu
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case_shape", BN_MEDIUM_SHAPES, ids=_bn_id)
def test_batchnorm_medium_shapes_match_float64_reference(case_shape, dtype, training, backend, rng):
    from test_batchnorm import compare_all, magnitudes, make_case, run

    shape, axis = case_shape
    case = make_case(rng, shape, axis, dtype, relu=False)
    ref = run(case, backend="numpy", dtype=np.float64, training=training, relu=False, axis=axis)
    got = _bn_run_gpu(backend, case, dtype, training=training, relu=False, axis=axis)
    compare_all(got, ref, magnitudes(case, ref, training=training, relu=False, axis=axis), dtype)


@gpu
@pytest.mark.parametrize("dtype, mean, limit", [(np.float32, 1e4, 1e-3), (np.float64, 1e8, 1e-6)],
                         ids=["float32-mean1e4", "float64-mean1e8"])
@pytest.mark.parametrize("case_shape", [((64, 3, 9, 9), 1), ((64, 9, 9, 3), 3)], ids=_bn_id)
def test_batchnorm_large_mean_small_spread(case_shape, dtype, mean, limit, backend, rng):
    """No catastrophic cancellation: a channel with mean 1e4 (float32) or 1e8 (float64), std 1."""
    shape, axis = case_shape
    channels = shape[axis]
    view = [1] * len(shape)
    view[axis] = channels
    x = (rng.standard_normal(shape) + (mean * np.array([1.0, -1.0, 0.5])).reshape(view)).astype(dtype)
    case = dict(x=x, weight=rng.uniform(0.5, 1.5, channels).astype(dtype),
                bias=rng.normal(0, 0.5, channels).astype(dtype), running_mean=np.zeros(channels, dtype),
                running_var=np.ones(channels, dtype), dy=rng.standard_normal(shape).astype(dtype))
    got = _bn_run_gpu(backend, case, dtype, training=True, relu=False, axis=axis)
    y64, mean64, invstd64 = np.empty(shape), np.empty(channels), np.empty(channels)
    rm64, rv64 = np.zeros(channels), np.ones(channels)
    reference.batchnorm_forward(x.astype(np.float64), case["weight"].astype(np.float64),
                                case["bias"].astype(np.float64), rm64, rv64, y64, mean64, invstd64, training=True,
                                momentum=0.1, eps=1e-5, channel_axis=axis, relu=False)
    assert np.max(np.abs(got["y"] - y64)) / np.max(np.abs(y64)) <= limit
    assert np.max(np.abs(got["saved_mean"] - mean64) * invstd64) <= limit
    assert np.max(np.abs(got["saved_invstd"] - invstd64) / invstd64) <= limit
    assert np.max(np.abs(got["running_var"] - rv64) / rv64) <= limit


@gpu
@pytest.mark.parametrize("dtype, value", [(np.float32, 3.7), (np.float32, 1e4 + 0.1), (np.float64, 0.1),
                                          (np.float64, 1e8 + 0.1)], ids=["f32-3.7", "f32-1e4", "f64-0.1", "f64-1e8"])
@pytest.mark.parametrize("case_shape", [((8, 3, 5, 5), 1), ((8, 5, 5, 3), 3)], ids=_bn_id)
def test_batchnorm_constant_channel_gives_bias(case_shape, dtype, value, backend, rng):
    """The groups' two-pass means reproduce a constant exactly: μ = the constant, σ² = 0, y = β."""
    shape, axis = case_shape
    x = rng.standard_normal(shape)
    np.moveaxis(x, axis, 0)[1] = value
    case = dict(x=x.astype(dtype), weight=np.array([1.0, 2.0, 0.5], dtype), bias=np.array([0.1, -0.7, 0.3], dtype),
                running_mean=np.zeros(3, dtype), running_var=np.ones(3, dtype),
                dy=rng.standard_normal(shape).astype(dtype))
    got = _bn_run_gpu(backend, case, dtype, training=True, relu=False, axis=axis)
    assert (np.moveaxis(got["y"], axis, 0)[1] == case["bias"][1]).all()
    assert got["saved_mean"][1] == dtype(value)
    assert all(np.isfinite(got[k]).all() for k in ("saved_invstd", "running_var", "dx", "dweight", "dbias"))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_batchnorm_without_running_statistics_and_empty_batches(dtype, backend, cp, rng):
    from test_batchnorm import compare_all, magnitudes, make_case, run

    shape, axis = (6, 4, 9), 1
    case = make_case(rng, shape, axis, dtype, relu=False)
    ref = run(case, backend="numpy", dtype=np.float64, training=True, relu=False, axis=axis, running=False)
    got = _bn_run_gpu(backend, case, dtype, training=True, relu=False, axis=axis, running=False)
    compare_all(got, ref, magnitudes(case, ref, training=True, relu=False, axis=axis), dtype)
    for empty_shape, empty_axis in (((0, 3, 4), 1), ((0, 5), 1), ((2, 3, 0), 1)):
        x = cp.empty(empty_shape, dtype)
        channels = empty_shape[empty_axis]
        rm, rv = cp.zeros(channels, dtype), cp.ones(channels, dtype)
        sm, si = cp.zeros(channels, dtype), cp.zeros(channels, dtype)
        backend.batchnorm_forward(x, None, None, rm, rv, cp.empty_like(x), sm, si, training=True, momentum=0.1,
                                  eps=1e-5, channel_axis=empty_axis, relu=False)
        assert np.isnan(host(sm)).all() and np.isnan(host(si)).all()
        assert (host(rm) == 0).all() and (host(rv) == 1).all()
        dw, db = cp.full(channels, np.nan, dtype), cp.full(channels, np.nan, dtype)
        backend.batchnorm_backward(cp.empty_like(x), x, None, None, sm, si, cp.empty_like(x), dw, db, training=True,
                                   channel_axis=empty_axis, relu=False)
        assert (host(dw) == 0).all() and (host(db) == 0).all()


@gpu
def test_batchnorm_is_deterministic(backend, rng):
    from test_batchnorm import make_case

    for shape, axis in (((16, 8, 64, 64), 1), ((16, 64, 64, 8), 3)):
        case = make_case(rng, shape, axis, np.float32, relu=False)  # the kink does not matter here
        first = _bn_run_gpu(backend, case, np.float32, training=True, relu=True, axis=axis)
        second = _bn_run_gpu(backend, case, np.float32, training=True, relu=True, axis=axis)
        for key, value in first.items():
            if value is not None:
                np.testing.assert_array_equal(value.view(np.uint32), second[key].view(np.uint32), err_msg=key)


# ---------------------------------------------------------------------------------------------
# array helpers and other kinds of device arrays


@gpu
def test_array_helpers_return_the_kind_of_the_input(backend, cp):
    assert backend.unavailable_reason() == ""
    a = cp.arange(6, dtype=np.float32).reshape(2, 3)
    assert backend.owns(a) and not backend.owns(np.zeros(3))
    z = backend.zeros_like(a)
    assert isinstance(z, cp.ndarray) and z.shape == a.shape and z.dtype == a.dtype and not host(z).any()
    f = backend.full_like(a, 2.5)
    assert isinstance(f, cp.ndarray) and f.dtype == a.dtype and (host(f) == 2.5).all()
    c = backend.from_numpy(np.arange(4.0), a)
    assert isinstance(c, cp.ndarray) and c.dtype == np.float64 and (host(c) == np.arange(4.0)).all()
    e = backend.empty_like(a)
    assert isinstance(e, cp.ndarray) and e.shape == a.shape and e.dtype == a.dtype
    e = backend.empty((4,), np.float64, a)
    assert isinstance(e, cp.ndarray) and e.shape == (4,) and e.dtype == np.float64
    np.testing.assert_array_equal(backend.to_numpy(a), host(a))


@gpu
def test_torch_tensors_in_torch_tensors_out(backend, cp, rng):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    dtype = np.float32
    h = functional.SPECS["adam"].check(lr=1e-2, amsgrad=True)
    start, g = rng.standard_normal(5003).astype(dtype), rng.standard_normal(5003).astype(dtype)
    results = []
    for make in (lambda a: device(a, dtype), lambda a: torch.as_tensor(a, device="cuda")):
        p, grad = make(start), make(g)
        m, v, vmax = backend.zeros_like(p), backend.zeros_like(p), backend.zeros_like(p)
        backend.adam_step(p, grad, m, v, vmax, step=1, **h)
        results.append((backend.to_numpy(p), backend.to_numpy(vmax)))
        if isinstance(p, torch.Tensor):
            assert all(isinstance(s, torch.Tensor) and s.is_cuda for s in (m, v, vmax))
            sumsq = backend.grad_sumsq([grad, p])
            assert isinstance(sumsq, torch.Tensor) and sumsq.dtype == torch.float64 and sumsq.is_cuda
            mul = backend.grad_multiplier(sumsq, 1.0, 1.0, dtype)
            assert isinstance(mul, torch.Tensor) and mul.dtype == torch.float32
            out = backend.empty((3,), np.float64, p)
            assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    x = torch.randn(4, 3, 5, 5, device="cuda")
    y, sm, si = torch.empty_like(x), torch.empty(3, device="cuda"), torch.empty(3, device="cuda")
    backend.batchnorm_forward(x, None, None, None, None, y, sm, si, training=True, momentum=0.1, eps=1e-5,
                              channel_axis=1, relu=False)
    expected = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


@gpu
def test_numba_device_arrays_are_accepted(backend, rng):
    cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    a = rng.standard_normal(1000).astype(np.float32)
    p, g = cuda.to_device(a), cuda.to_device(a)
    h = functional.SPECS["sgd"].check(lr=0.5)
    backend.sgd_step(p, g, None, **h)
    cuda.synchronize()
    np.testing.assert_array_equal(p.copy_to_host(), a - np.float32(0.5) * a)
    z = backend.zeros_like(p)
    assert type(z).__module__.startswith("numba") and not backend.to_numpy(z).any()


_ = TOLERANCE  # the dtype-keyed tolerances assert_close uses


@gpu
def test_copy_from_numpy_and_native_from_numpy(backend, cp):
    a = cp.zeros((2, 3), np.float32)
    backend.copy_from_numpy(a, np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(host(a), np.arange(6.0, dtype=np.float32).reshape(2, 3))
    native = backend.from_numpy(np.ones(3))
    assert isinstance(native, cp.ndarray) and (host(native) == 1.0).all()


@gpu
def test_public_api_on_cupy_arrays(backend, cp, rng):
    """The optimizer with the extras, clip_grad_norm_ and the BatchNorm layer, through the public
    API on CuPy arrays, against the same calls on float64 NumPy arrays with backend='numpy'."""
    import fastopt

    start = [rng.standard_normal(s) for s in [(1000,), (3, 5), (0,)]]
    params = [cp.asarray(p.astype(np.float32)) for p in start]
    expected = [p.copy() for p in start]
    options = dict(lr=1e-2, weight_decay=0.01, clip_grad_norm=1.0, polyak=0.9, nonfinite="skip")
    opt, ref = fastopt.AdamW(params, **options), fastopt.AdamW(expected, **options, backend="numpy")
    for t in range(3):
        grads = [(3.0 * rng.standard_normal(p.shape)).astype(np.float32) for p in start]
        if t == 1:
            grads[0][5] = np.nan  # skipped, bit for bit
        opt.step([cp.asarray(g) for g in grads])
        ref.step([g.astype(np.float64) for g in grads])
    assert (opt.steps, opt.skipped_steps) == (ref.steps, ref.skipped_steps) == (2, 1)
    for actual, wanted in zip(params + opt.averaged_params(), expected + ref.averaged_params()):
        np.testing.assert_allclose(host(actual), wanted, rtol=2e-5, atol=2e-6)
    grads = [cp.asarray(rng.standard_normal(5).astype(np.float32) * 10)]
    norm = fastopt.clip_grad_norm_(grads, 1.0)
    assert isinstance(norm, float) and abs(float(cp.linalg.norm(grads[0])) - 1.0) < 1e-5

    layer = fastopt.BatchNorm(3, backend="cupy")
    layer_ref = fastopt.BatchNorm(3, dtype=np.float64, backend="numpy")
    assert isinstance(layer.weight, cp.ndarray)
    x = (rng.standard_normal((8, 3, 6)) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, y_ref = layer(cp.asarray(x)), layer_ref(x.astype(np.float64))
    dx, dx_ref = layer.backward(cp.asarray(dy)), layer_ref.backward(dy.astype(np.float64))
    np.testing.assert_allclose(host(y), y_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(host(dx), dx_ref, rtol=2e-5, atol=2e-5)
    weight = layer.weight
    layer.load_state_dict({**layer.state_dict(), "running_var": np.full(3, 2.0)})
    assert layer.weight is weight and (host(layer.running_var) == 2.0).all()


# ---------------------------------------------------------------------------------------------
# the hyperparameter sweep (tests/sweep.py) through the public API on CuPy arrays


def _to_cupy(a):
    import cupy

    return cupy.asarray(a)


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("variant", sweep.VARIANTS, ids=sweep.case_id)
def test_functional_sweep(variant, dtype):
    sweep.run_functional(variant, "cupy", dtype, to_dev=_to_cupy, to_host=host)


@gpu
@pytest.mark.parametrize("extras", [(), sweep.EXTRAS], ids=["plain", "extras"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("variant", sweep.VARIANTS, ids=sweep.case_id)
def test_optimizer_sweep(variant, dtype, extras):
    sweep.run_optimizer(variant, "cupy", dtype, extras=extras, to_dev=_to_cupy, to_host=host)
