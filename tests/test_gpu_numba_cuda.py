"""The numba-cuda backend on a real GPU: every kernel against the float64 reference, large sizes.

Marked ``gpu``; skipped with the reason when numba-cuda finds no usable CUDA device (and under the
CUDA simulator, which tests/cudasim covers with small sizes). The comparisons are those of the
simulator suite (``tests/cudasim/helpers.py``): the float64 reference on NumPy copies, the
dtype-keyed tolerance table of ``tests/conftest.py``, outputs NaN-poisoned before a kernel runs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from numba import cuda  # noqa: E402

import fastopt.kernels.numba_cuda as backend  # noqa: E402
import fastopt.reference as reference  # noqa: E402
from fastopt import functional  # noqa: E402

from conftest import assert_close  # noqa: E402
from cudasim import test_api as api  # noqa: E402  (the public-API tests, run here on the GPU)
from cudasim.helpers import bn_case, bn_compare, device, host, run_batchnorm, step_and_compare  # noqa: E402
from optim_cases import CASES, case_id, initial_state  # noqa: E402
import sweep  # noqa: E402


def _skip_reason() -> str:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1: the simulator is not a GPU (tests/cudasim covers it)"
    return backend.unavailable_reason()


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_REASON), reason=f"no GPU: {_REASON}")]

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["float32", "float64"]
SHAPES = [(0,), (1,), (7,), (1000,), (2**20 + 3,), (3, 5, 7)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_update_matches_reference(case, dtype, shape, rng):
    name, hyper = case
    step_and_compare(name, hyper, dtype, shape, rng, steps=3)


@pytest.mark.parametrize("extras", ["host_mul", "device_mul", "clip", "avg", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_step_extras_match_reference(case, dtype, extras, rng):
    name, hyper = case
    options = {
        "host_mul": dict(grad_mul=0.37),
        "device_mul": dict(grad_mul=0.37, device_grad_mul=True),
        "clip": dict(grad_clip=0.3),
        "avg": dict(avg_weight=0.25),
        "all": dict(grad_mul=2.5, device_grad_mul=True, grad_clip=0.8, avg_weight=1.0),
    }[extras]
    step_and_compare(name, hyper, dtype, (100_003,), rng, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_multi_step_matches_reference(case, dtype, rng):
    """50 tensors from empty to more than one chunk (65536), one launch."""
    name, hyper = case
    spec = functional.SPECS[name]
    checked = spec.check(**hyper)
    used = spec.uses(checked)
    step_kw = {"step": 4} if spec.step_count else {}
    shapes = [(int(n),) for n in rng.integers(0, 3000, 45)] + [(0,), (1,), (65536,), (65537,), (300, 700)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
    if checked.get("weight_decay"):
        grads = [np.copysign(g, p) for g, p in zip(grads, params)]
    states = [initial_state(name, s, dtype, rng) for s in shapes]
    for st in states:
        for k in used:
            st[k] += np.abs(rng.standard_normal(st[k].shape)).astype(dtype) * 0.1
        if "grad_avg" in used:
            # centered: v − ḡ² at least 0.01, so that v − ḡ² never cancels (a float32 kernel cannot
            # follow the float64 reference there: seen on an H200, 2e-4 apart in 1 of 65,536)
            st["square_avg"] += st["grad_avg"] ** 2 + dtype(0.01)
    avgs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    common = dict(grad_mul=0.5, grad_clip=0.9, avg_weight=0.3)

    d_params = [device(p) for p in params]
    d_states = [tuple(device(st[k]) if k in used else None for k in spec.state) for st in states]
    d_avgs = [device(a) for a in avgs]
    backend.multi_step(spec.kernel, d_params, [device(g) for g in grads], d_states, d_avgs,
                       **dict(common, grad_mul=device(np.array([0.5], dtype))), **checked, **step_kw)

    e_params = [p.astype(np.float64) for p in params]
    e_states = [tuple(st[k].astype(np.float64) if k in used else None for k in spec.state) for st in states]
    e_avgs = [a.astype(np.float64) for a in avgs]
    reference.multi_step(spec.kernel, e_params, [g.astype(np.float64) for g in grads], e_states, e_avgs,
                         **common, **checked, **step_kw)
    # the scale includes each array before the step: an update that cancels leaves an error of its
    # inputs' size, which a small result alone cannot show
    for k in range(len(shapes)):
        assert_close(host(d_params[k]), e_params[k], dtype, f"param {k}", before=params[k])
        assert_close(host(d_avgs[k]), e_avgs[k], dtype, f"avg {k}", before=avgs[k])
        for j, state_name in enumerate(spec.state):
            if state_name in used:
                assert_close(host(d_states[k][j]), e_states[k][j], dtype, f"{state_name} {k}",
                             before=states[k][state_name])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reductions_match_reference(dtype, rng):
    shapes = [(0,), (1,), (1000,), (2**20 + 3,), (300, 700), (65537,)]
    grads = [(rng.standard_normal(s) * 3).astype(dtype) for s in shapes]
    d_grads = [device(g) for g in grads]
    sumsq = backend.grad_sumsq(d_grads)
    expected = reference.grad_sumsq(grads)
    np.testing.assert_allclose(host(sumsq)[0], expected, rtol=1e-12)
    for max_norm in (None, 1.0, 1e9):
        mul = backend.grad_multiplier(sumsq, max_norm, 0.25, dtype)
        ref_mul = reference.grad_multiplier(expected, max_norm, 0.25, dtype)
        np.testing.assert_allclose(host(mul)[0], np.dtype(dtype).type(ref_mul), rtol=1e-6 if dtype == np.float32 else 1e-12)
    backend.scale_grads_(d_grads, device(np.array([0.3], dtype)))
    for g, d in zip(grads, d_grads):
        assert_close(host(d), g.astype(np.float64) * float(np.dtype(dtype).type(0.3)), dtype, "scaled")
    grads[3][12345] = np.nan
    assert np.isnan(host(backend.grad_sumsq([device(g) for g in grads]))[0])


BN_SHAPES = [
    ((64, 16), 1),                # rank 2, channels last
    ((4096, 256), 1),             # large N, many channels
    ((65536, 3), 1),              # large N, few channels
    ((8, 16, 64, 64), 1),         # NCHW
    ((2, 3, 512, 512), 1),        # small N, large H·W: each channel split over many blocks
    ((8, 64, 64, 16), -1),        # NHWC
    ((256, 7, 7, 40), -1),        # NHWC, C not a power of two, more than 32 channels
    ((32, 24, 100), 1),           # rank 3
    ((4, 6, 5, 7), 2),            # channel axis in the middle
]
BN_COMBOS = [(True, False, True), (True, True, True), (False, True, True), (False, False, False),
             (True, False, False)]


@pytest.mark.parametrize("combo", BN_COMBOS, ids=lambda c: "-".join(
    ["train" if c[0] else "eval", "relu" if c[1] else "linear", "affine" if c[2] else "plain"]))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case_shape", BN_SHAPES, ids=lambda c: "x".join(map(str, c[0])) + f"-axis{c[1]}")
def test_batchnorm_matches_reference(case_shape, dtype, combo, rng):
    shape, axis = case_shape
    training, relu, affine = combo
    case = bn_case(rng, shape, axis, dtype, relu=relu, affine=affine)
    ref = run_batchnorm(reference, case, np.float64, training=training, relu=relu, axis=axis, on_device=False)
    got = run_batchnorm(backend, case, dtype, training=training, relu=relu, axis=axis)
    bn_compare(got, ref, case, dtype, relu=relu, axis=axis)


def test_batchnorm_large_mean_float32(rng):
    case = bn_case(rng, (16, 8, 32, 32), 1, np.float32, relu=False, offset_scale=1e4)
    ref = run_batchnorm(reference, case, np.float64, training=True, relu=False, axis=1, on_device=False)
    got = run_batchnorm(backend, case, np.float32, training=True, relu=False, axis=1)
    bn_compare(got, ref, case, np.float32, relu=False, axis=1)


def test_results_are_the_same_on_every_run(rng):
    """No atomics: reductions give bitwise equal results run after run."""
    case = bn_case(rng, (2, 3, 512, 512), 1, np.float32, relu=False)
    first = run_batchnorm(backend, case, np.float32, training=True, relu=False, axis=1)
    second = run_batchnorm(backend, case, np.float32, training=True, relu=False, axis=1)
    for key in first:
        if first[key] is not None:
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    g = device(rng.standard_normal(3_000_001).astype(np.float32))
    assert host(backend.grad_sumsq([g]))[0] == host(backend.grad_sumsq([g]))[0]


def test_other_array_kinds_stay_of_their_kind(rng):
    """torch CUDA tensors and CuPy arrays in -> the same kind out (each skipped when absent)."""
    ran = False
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        p = torch.randn(1000, device="cuda", dtype=torch.float32)
        g = torch.randn(1000, device="cuda", dtype=torch.float32)
        expected = p.cpu().numpy().astype(np.float64)
        backend.sgd_step(p, g, None, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
                         convention="textbook")
        expected -= 0.1 * g.cpu().numpy()
        assert_close(p.cpu().numpy(), expected, np.float32, "torch param")
        for out in (backend.zeros_like(p), backend.empty_like(p), backend.full_like(p, 1.5),
                    backend.grad_sumsq([g]), backend.from_numpy(np.ones(3, np.float32), p)):
            assert isinstance(out, torch.Tensor) and out.is_cuda
        ran = True
    try:
        import cupy
    except ImportError:
        cupy = None
    if cupy is not None:
        p = cupy.asarray(rng.standard_normal(1000))
        g = cupy.asarray(rng.standard_normal(1000))
        expected = p.get() - 0.1 * g.get()
        backend.sgd_step(p, g, None, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
                         convention="textbook")
        assert_close(p.get(), expected, np.float64, "cupy param")
        for out in (backend.zeros_like(p), backend.empty_like(p), backend.grad_sumsq([g])):
            assert isinstance(out, cupy.ndarray)
        ran = True
    if not ran:
        pytest.skip("neither torch with CUDA nor CuPy is installed")


def test_available():
    assert backend.unavailable_reason() == "" and cuda.is_available()


def test_the_launched_kernels_round_every_product_as_written():
    """The PTX of the dispatchers the backend launches (not only compile_ptx's, which
    tests/test_numba_cuda_ptx.py checks) holds no fused multiply-add: NVVM's fma=0 reached them."""
    import re

    import numba

    from fastopt.kernels.numba_cuda._jit import KERNELS

    for name in ("optim.adam", "optim.rmsprop.multi", "batchnorm.stats_partial"):
        for dtype in (numba.float32, numba.float64):
            dispatcher = KERNELS[name][dtype]
            # link-time optimization would generate the code again in nvJitLink, contracting
            assert dispatcher.targetoptions.get("lto") is False, f"{name}: {dispatcher.targetoptions}"
            for overload in dispatcher.overloads.values():
                # the PTX bind() linked: the current device's, compiled with the dispatcher
                # (inspect_asm() would compile another, for a plain "compute_90" outside the option)
                ptx = overload.library.get_asm_str()
                assert ".entry" in ptx and not re.search(r"\bfma\.", ptx), f"{name} {dtype}"


# ---------------------------------------------------------------------------------------------
# the public API (tests/cudasim/test_api.py's tests, on numba device arrays on the GPU)


@pytest.mark.parametrize("options", api.OPTIONS, ids=api.options_id)
@pytest.mark.parametrize("case", api.OPTIMIZERS, ids=api.optimizer_id)
def test_public_api_optimizer_step_with_extras(case, options, rng):
    api.test_optimizer_step_with_extras_matches_the_reference(case, options, rng)


@pytest.mark.parametrize("name", ["test_skip_leaves_everything_and_later_steps_ignore_the_bad_one",
                                  "test_raise_names_the_bad_tensor_and_changes_nothing",
                                  "test_groups_update_only_the_named_groups",
                                  "test_host_and_device_arrays_cannot_be_mixed_and_nothing_changes",
                                  "test_loss_scaler_backs_off_on_overflow_and_divides_by_the_scale",
                                  "test_batchnorm_layer_on_the_device_trains_with_an_optimizer"])
def test_public_api(name, rng):
    getattr(api, name)(rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_public_api_clip_grad_norm(dtype, rng):
    api.test_clip_grad_norm_rewrites_device_gradients_and_returns_the_norm(dtype, rng)


@pytest.mark.parametrize("channel_axis", [1, -1], ids=["channel-first", "channels-last"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_public_api_batchnorm_functions(channel_axis, relu, rng):
    api.test_batchnorm_functions_match_the_reference(channel_axis, relu, rng)


# ---------------------------------------------------------------------------------------------
# the hyperparameter sweep (tests/sweep.py) at the host backends' sizes


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", sweep.VARIANTS, ids=sweep.case_id)
def test_functional_sweep(variant, dtype):
    sweep.run_functional(variant, "numba-cuda", dtype, to_dev=device, to_host=host)


@pytest.mark.parametrize("extras", [(), sweep.EXTRAS], ids=["plain", "extras"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", sweep.VARIANTS, ids=sweep.case_id)
def test_optimizer_sweep(variant, dtype, extras):
    sweep.run_optimizer(variant, "numba-cuda", dtype, extras=extras, to_dev=device, to_host=host)
