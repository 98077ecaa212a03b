"""Every optimizer configuration on every backend and dtype, step by step against the float64 reference.

At each step the float64 reference starts from a float64 copy of the backend's current state and
gradient, so each step's error is measured on its own and a float32 run cannot drift away from
the comparison over many steps. At the parallel kernels' size the numba backend runs float64 for
``optim_cases.FLOAT64_PARALLEL`` only (one or two configurations per family; see there).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt.reference as reference
from fastopt import functional

from conftest import assert_close
from optim_cases import CASES, case_grid, case_id, initial_state

PARALLEL = (2**17 + 3,)  # the parallel kernels, 16 parts (float64: optim_cases.FLOAT64_PARALLEL)
SHAPES = [(0,), (1,), (7,), (1000,), PARALLEL, (3, 5, 7)]
STEPS = 10


@pytest.mark.parametrize("case, backend, dtype, shape", case_grid(
    [np.float32, np.float64], SHAPES, lambda backend, shape: backend == "numba" and shape == PARALLEL,
    backends=("numpy", "numba")))
def test_backend_matches_float64_reference(case, backend, dtype, shape, rng):
    name, hyper = case
    spec = functional.SPECS[name]
    step_fn = getattr(functional, f"{name}_step")
    ref_fn = getattr(reference, spec.kernel)
    ref_hyper = spec.check(**hyper)

    param = rng.standard_normal(shape).astype(dtype)
    state = initial_state(name, shape, dtype, rng)
    for t in range(1, STEPS + 1):
        grad = rng.standard_normal(shape).astype(dtype)
        if hyper.get("weight_decay"):
            # g with θ's sign, so g + λθ never cancels: a float32 sum that cancels to ~δ makes
            # δ-sensitive updates (torch's centered RMSProp) ill-conditioned, which would measure
            # float32 rounding of the inputs rather than the kernel.
            grad = np.copysign(grad, param)
        grad_before = grad.copy()
        expected_param = param.astype(np.float64)
        expected_state = {k: v.astype(np.float64) for k, v in state.items()}
        before = {"param": param.copy(), **{k: v.copy() for k, v in state.items()}}
        step_kw = {"step": t} if spec.step_count else {}
        ref_fn(expected_param, grad.astype(np.float64), *(expected_state[k] for k in spec.state),
               **ref_hyper, **step_kw)

        step_fn(param, grad, **state, **hyper, **step_kw, backend=backend)

        assert param.dtype == dtype and all(v.dtype == dtype for v in state.values())
        np.testing.assert_array_equal(grad, grad_before, err_msg="the gradient was modified")
        assert_close(param, expected_param, dtype, f"param after step {t}", before=before["param"])
        for k in spec.uses(ref_hyper):
            assert_close(state[k], expected_state[k], dtype, f"{k} after step {t}", before=before[k])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_numba_float64_trajectory_matches_reference(case, rng):
    """Over many steps in float64 the kernel and the reference stay together (no per-step reset)."""
    name, hyper = case
    spec = functional.SPECS[name]
    step_fn = getattr(functional, f"{name}_step")
    shape = (513,)
    param = rng.standard_normal(shape)
    state = initial_state(name, shape, np.float64, rng)
    ref_param, ref_state = param.copy(), {k: v.copy() for k, v in state.items()}
    for t in range(1, 31):
        grad = rng.standard_normal(shape)
        step_kw = {"step": t} if spec.step_count else {}
        step_fn(param, grad, **state, **hyper, **step_kw, backend="numba")
        step_fn(ref_param, grad, **ref_state, **hyper, **step_kw, backend="numpy")
    np.testing.assert_allclose(param, ref_param, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("name, hyper", [("sgd", dict(lr=0.1, momentum=0.9)), ("adagrad", dict(lr=0.1)),
                                         ("rmsprop", dict(lr=0.01, centered=True, momentum=0.5)),
                                         ("adadelta", dict()), ("adam", dict(lr=0.01, amsgrad=True))],
                         ids=["sgd", "adagrad", "rmsprop", "adadelta", "adam"])
def test_zero_weight_decay_keeps_an_infinite_param_out_of_the_state(name, hyper, backend, dtype, rng):
    """With λ = 0 the L2 term is skipped, not added as g + 0·θ: an infinite θ stays infinite and
    its state stays finite (0·∞ would put NaN into the velocity, accumulators or moments)."""
    spec = functional.SPECS[name]
    param = rng.standard_normal(7).astype(dtype)
    param[[1, 4]] = [np.inf, -np.inf]
    state = initial_state(name, (7,), dtype, rng)
    step = {"step": 1} if spec.step_count else {}
    getattr(functional, f"{name}_step")(param, rng.standard_normal(7).astype(dtype), **state, **hyper, **step,
                                        backend=backend)
    assert param[1] == np.inf and param[4] == -np.inf
    for k in spec.uses(spec.check(**hyper)):
        assert np.isfinite(state[k]).all(), f"{k}: {state[k]}"
