"""Every optimizer configuration, the training-step extras and multi_step, on the simulator."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt.kernels.numba_cuda as backend
import fastopt.reference as reference
from fastopt import functional

from conftest import assert_close
from optim_cases import CASES, case_id, initial_state

from .helpers import device, host, step_and_compare

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["float32", "float64"]
# 0 and 1; odd, and more than the simulated grid's 3 x 64 threads (so the grid-stride loop turns)
SHAPES = [(0,), (1,), (3, 67)]

# a few configurations covering every state count, both conventions and both Adam kinds
EXTRAS_CASES = [CASES[i] for i in (2, 5, 7, 14, 16, 21, 22)]


# every case in both dtypes at 0 and (3, 67); the single element (one thread of one block works, the
# grid's other threads start past the end) in one dtype per case, alternating, so every kernel meets
# it and each dtype does
_UPDATE_TABLE = [(case, dtype, shape) for k, case in enumerate(CASES) for dtype in DTYPES for shape in SHAPES
                 if shape != (1,) or dtype == DTYPES[k % 2]]


@pytest.mark.parametrize("case, dtype, shape", _UPDATE_TABLE,
                         ids=[f"{case_id(c)}-{np.dtype(d).name}-{'x'.join(map(str, s))}" for c, d, s in _UPDATE_TABLE])
def test_update_matches_reference(case, dtype, shape, rng):
    name, hyper = case
    step_and_compare(name, hyper, dtype, shape, rng)


@pytest.mark.parametrize("extras", ["host_mul", "device_mul", "clip", "avg", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", EXTRAS_CASES, ids=case_id)
def test_step_extras_match_reference(case, dtype, extras, rng):
    name, hyper = case
    options = {
        "host_mul": dict(grad_mul=0.37),
        "device_mul": dict(grad_mul=0.37, device_grad_mul=True),
        "clip": dict(grad_clip=0.3),
        "avg": dict(avg_weight=0.25),
        "all": dict(grad_mul=2.5, device_grad_mul=True, grad_clip=0.8, avg_weight=1.0),
    }[extras]
    # one block: the extras are per element (the grid-stride geometry is test_update_matches_reference's)
    step_and_compare(name, hyper, dtype, (61,), rng, **options)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_default_extras_are_the_plain_update_bit_for_bit(dtype, rng):
    name, hyper = CASES[19]  # adam with weight decay and amsgrad
    spec = functional.SPECS[name]
    checked = spec.check(**hyper)
    param = rng.standard_normal(100).astype(dtype)
    grad = rng.standard_normal(100).astype(dtype)
    state = initial_state(name, (100,), dtype, rng)
    results = []
    for extras in ({}, dict(grad_mul=1.0, grad_clip=np.inf, avg=None, avg_weight=0.0)):
        d_param, d_state = device(param), [device(state[k]) for k in spec.state]
        backend.adam_step(d_param, device(grad), *d_state, step=3, **checked, **extras)
        results.append([host(d_param)] + [host(s) for s in d_state])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_device_grad_mul_of_the_other_dtype_is_converted(dtype, rng):
    other = np.float64 if dtype == np.float32 else np.float32
    param = rng.standard_normal(50).astype(dtype)
    grad = rng.standard_normal(50).astype(dtype)
    d_param = device(param)
    backend.sgd_step(d_param, device(grad), None, lr=0.5, momentum=0.0, nesterov=False, weight_decay=0.0,
                     convention="textbook", grad_mul=device(np.array([0.25], other)))
    expected = param.astype(np.float64)
    reference.sgd_step(expected, grad.astype(np.float64), None, lr=0.5, momentum=0.0, nesterov=False,
                       weight_decay=0.0, convention="textbook", grad_mul=0.25)
    assert_close(host(d_param), expected, dtype, "param")


# shapes of one multi_step call: empty tensors, one element, several chunks of the simulated
# chunk size (24), a 2-D tensor
MULTI_SHAPES = [(37,), (0,), (1,), (5, 7), (0, 3), (60,), (24,)]


# every case in both dtypes, once with the extras (device grad_mul, clip, averages but for one tensor)
# and once without (host grad_mul 1, no averages), alternating which dtype takes the extras, so every
# tensor-list kernel runs in both dtypes and with both values of each of its flags
_MULTI_TABLE = [(case, dtype, (j + k) % 2 == 1) for k, case in enumerate(CASES) for j, dtype in enumerate(DTYPES)]


@pytest.mark.parametrize("case, dtype, with_extras", _MULTI_TABLE,
                         ids=[f"{case_id(c)}-{np.dtype(d).name}-{'extras' if e else 'plain'}"
                              for c, d, e in _MULTI_TABLE])
def test_multi_step_matches_reference(case, dtype, with_extras, rng):
    name, hyper = case
    spec = functional.SPECS[name]
    checked = spec.check(**hyper)
    used = spec.uses(checked)
    step_kw = {"step": 2} if spec.step_count else {}
    params = [rng.standard_normal(s).astype(dtype) for s in MULTI_SHAPES]
    grads = [rng.standard_normal(s).astype(dtype) for s in MULTI_SHAPES]
    if checked.get("weight_decay"):
        grads = [np.copysign(g, p) for g, p in zip(grads, params)]
    states = [initial_state(name, s, dtype, rng) for s in MULTI_SHAPES]
    for st in states:  # a state that is not all zero, as after a few steps
        for k in used:
            st[k] += np.abs(rng.standard_normal(st[k].shape)).astype(dtype) * 0.1
        if "grad_avg" in used:  # keep r − s ⊙ s > 0, as a real run does
            st["square_avg"] += st["grad_avg"] ** 2
    avgs = [rng.standard_normal(s).astype(dtype) for s in MULTI_SHAPES] if with_extras else None
    if with_extras:
        avgs[3] = None  # one tensor without an average
    common = dict(grad_mul=0.5, grad_clip=0.9, avg_weight=0.3) if with_extras else {}

    d_params = [device(p) for p in params]
    d_grads = [device(g) for g in grads]
    d_states = [tuple(device(st[k]) if k in used else None for k in spec.state) for st in states]
    d_avgs = None if avgs is None else [None if a is None else device(a) for a in avgs]
    d_common = dict(common)
    if with_extras:
        d_common["grad_mul"] = device(np.array([0.5], dtype))
    backend.multi_step(spec.kernel, d_params, d_grads, d_states, d_avgs, **d_common, **checked, **step_kw)

    e_params = [p.astype(np.float64) for p in params]
    e_states = [tuple(st[k].astype(np.float64) if k in used else None for k in spec.state) for st in states]
    e_avgs = None if avgs is None else [None if a is None else a.astype(np.float64) for a in avgs]
    reference.multi_step(spec.kernel, e_params, [g.astype(np.float64) for g in grads], e_states, e_avgs,
                         **common, **checked, **step_kw)
    for k, shape in enumerate(MULTI_SHAPES):
        assert_close(host(d_params[k]), e_params[k], dtype, f"param {k} {shape}", before=params[k])
        np.testing.assert_array_equal(host(d_grads[k]), grads[k])
        for j, state_name in enumerate(spec.state):
            if state_name in used:
                assert_close(host(d_states[k][j]), e_states[k][j], dtype, f"{state_name} {k} {shape}",
                             before=states[k][state_name])
        if avgs is not None and avgs[k] is not None:
            assert_close(host(d_avgs[k]), e_avgs[k], dtype, f"avg {k} {shape}", before=avgs[k])


def test_multi_step_of_an_empty_list_does_nothing():
    backend.multi_step("sgd_step", [], [], [], None, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
                       convention="textbook")


def test_multi_step_reuses_the_table_of_the_same_tensors(rng):
    from fastopt.kernels.numba_cuda import _tensors

    params = [device(rng.standard_normal(s)) for s in ((30,), (7,))]
    grads = [device(rng.standard_normal(s)) for s in ((30,), (7,))]
    hyper = dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, convention="textbook")
    backend.multi_step("sgd_step", params, grads, [(None,), (None,)], None, **hyper)
    cached = len(_tensors._cache)
    backend.multi_step("sgd_step", params, grads, [(None,), (None,)], None, **hyper)
    assert len(_tensors._cache) == cached
