"""float16 parameters (``mixed_step``, ``mixed_sumsq``) and 8-bit optimizer state (``state8_step``)
of the numba-cuda backend against ``fastopt.reference``, under the CUDA simulator (tiny sizes: a
tensor of two quantization blocks of 256 with a tail, one of a few elements, an empty one).

The runners (``run_mixed``, ``run_state8``) are shared with ``tests/test_gpu_lowp_numba_cuda.py``,
which runs them at large sizes on a GPU. Comparisons:

* mixed: float32 state, masters and averages within float32 tolerance of the reference; each
  float16 θ within one code (one bit pattern) of the reference's, bitwise equal wherever the
  float32 value it was rounded from agrees (the master copies, when there are any), and bitwise
  equal in at least 98% of the elements of a large tensor (a wrong stochastic-rounding key still
  lands within one code, but on the other code in a good share of the elements).
* state8: codes and absmax equal to the reference's (NaN absmax where the reference's is NaN),
  θ within float32 tolerance (in the simulator, which does no FMA, bitwise).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numba import cuda

import fastopt.kernels.numba_cuda as backend
from fastopt import functional
from fastopt.reference import mixed as ref_mixed
from fastopt.reference import state8 as ref_state8
from fastopt.reference.quantize import quantize_blockwise

from optim_cases import CASES, case_id, initial_state

from .helpers import code_line

SHAPES = [(300,), (5,), (0,)]  # two blocks of 256 with a tail under state8; a small and an empty tensor


def _device(array):
    return cuda.to_device(np.ascontiguousarray(array))


def _host(array):
    return backend.to_numpy(array)


def _close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-6, equal_nan=True, err_msg=what)


# ---------------------------------------------------------------------------------------------
# mixed_step


def run_mixed(name, hyper, shapes, rng, *, master, rounding, grad32, avg, steps=2, grad_mul=1.0,
              grad_clip=math.inf):
    """``steps`` mixed steps on the device and in the reference, compared after each."""
    spec = functional.SPECS[name]
    checked = spec.check(**hyper)
    op = spec.kernel
    gdt = np.float32 if grad32 else np.float16
    params = [rng.standard_normal(s).astype(np.float16) for s in shapes]
    masters = [p.astype(np.float32) for p in params] if master else None
    states = [initial_state(name, s, np.float32, rng) for s in shapes]
    avgs = [rng.standard_normal(s).astype(np.float32) for s in shapes] if avg else None
    d_params = [_device(p) for p in params]
    d_masters = None if masters is None else [_device(m) for m in masters]
    d_states = [tuple(_device(st[k]) for k in spec.state) for st in states]
    d_avgs = None if avgs is None else [_device(a) for a in avgs]
    r_states = [tuple(st[k].copy() for k in spec.state) for st in states]
    indices = list(range(3, 3 + len(shapes)))
    extras = dict(grad_mul=grad_mul, grad_clip=grad_clip, avg_weight=0.25 if avg else 0.0)
    for t in range(1, steps + 1):
        grads = [rng.standard_normal(s).astype(gdt) for s in shapes]
        step_kw = {"step": t} if spec.step_count else {}
        kw = dict(rounding=rounding, seed=11, counter=t, indices=indices, **extras, **checked,
                  **step_kw)
        ref_mixed.mixed_step(op, params, grads, masters, r_states, avgs, **kw)
        backend.mixed_step(op, d_params, [_device(g) for g in grads], d_masters, d_states, d_avgs,
                           **kw)
        for k, shape in enumerate(shapes):
            what = f"{name} {op} step {t} tensor {k}"
            got = _host(d_params[k])
            assert got.dtype == np.float16 and got.shape == shape
            bits, want = code_line(got), code_line(params[k])
            assert np.all(np.abs(bits - want) <= 1), f"{what}: θ more than one code from the reference"
            if bits.size >= 256:  # a code apart only where the float32 values differ: rarely
                assert np.mean(bits != want) <= 0.02, f"{what}: θ bits differ in {np.mean(bits != want):.1%}"
            if masters is not None:
                got_master = _host(d_masters[k])
                _close(got_master, masters[k], f"{what} master")
                same = got_master == masters[k]
                np.testing.assert_array_equal(bits[same], want[same], err_msg=f"{what}: θ bits")
            for j, s in enumerate(spec.state):
                if d_states[k][j] is not None and s in spec.uses(checked):
                    _close(_host(d_states[k][j]), r_states[k][j], f"{what} {s}")
            if avgs is not None:
                _close(_host(d_avgs[k]), avgs[k], f"{what} avg")
            # the next step starts from the same θ on both sides (θ may be a code apart)
            params[k][...] = got
            if masters is not None:
                masters[k][...] = _host(d_masters[k])
            for j in range(len(spec.state)):
                r_states[k][j][...] = _host(d_states[k][j])
            if avgs is not None:
                avgs[k][...] = _host(d_avgs[k])


MIXED_CASES = [CASES[i] for i in (0, 3, 5, 8, 12, 14, 15, 19, 21, 22)]
MIXED_OPTIONS = [
    dict(master=False, rounding="nearest", grad32=False, avg=False),
    dict(master=True, rounding="nearest", grad32=True, avg=True, grad_mul=0.5, grad_clip=1.0),
    dict(master=False, rounding="stochastic", grad32=False, avg=False),
    dict(master=False, rounding="stochastic", grad32=True, avg=True, grad_clip=1.5),
]


# each configuration with one set of options, every option set with several configurations
MIXED_TABLE = [(case, MIXED_OPTIONS[i % len(MIXED_OPTIONS)]) for i, case in enumerate(MIXED_CASES)]


@pytest.mark.parametrize("case, options", MIXED_TABLE,
                         ids=[case_id(c) + "-" + "-".join(f"{k}={v}" for k, v in o.items())
                              for c, o in MIXED_TABLE])
def test_mixed_step_matches_reference(case, options, rng):
    name, hyper = case
    run_mixed(name, hyper, SHAPES, rng, **options)


@pytest.mark.parametrize("starts", [None, [1000]], ids=["whole", "piece"])
def test_stochastic_rounding_is_bitwise_the_reference(starts):
    """θ from float32 masters of known values: the stochastic bits equal the reference's exactly,
    including ties, subnormals, overflow, ±Inf and NaN (SGD with lr = 0 keeps p = m); also for a
    piece that starts at element 1000 of its parameter (``starts=``)."""
    values = np.array([1.0, 1.0 + 2.0 ** -11, -3.14159, 65504.0, 65519.0, 70000.0, -70000.0,
                       2.0 ** -20, -2.0 ** -25, 6e-8, 0.0, np.inf, -np.inf, np.nan] * 20, np.float32)
    with np.errstate(over="ignore"):
        params = values.astype(np.float16)
    d_params, d_master = _device(params), _device(values)
    grads = np.zeros_like(values)
    hyper = dict(lr=0.0, momentum=0.0, nesterov=False, weight_decay=0.0, convention="textbook")
    kw = dict(rounding="stochastic", seed=7, counter=9, indices=[4], starts=starts, **hyper)
    ref_mixed.mixed_step("sgd_step", [params], [grads], [values.copy()], [(None,)], None, **kw)
    backend.mixed_step("sgd_step", [d_params], [_device(grads)], [d_master], [(None,)], None, **kw)
    np.testing.assert_array_equal(_host(d_params).view(np.uint16), params.view(np.uint16))


def test_mixed_sumsq_matches_reference(rng):
    grads = [rng.standard_normal(s).astype(np.float16) for s in SHAPES]
    got = backend.mixed_sumsq([_device(g) for g in grads])
    assert isinstance(got, float)
    assert got == pytest.approx(ref_mixed.mixed_sumsq(grads), rel=1e-12)
    assert backend.mixed_sumsq([]) == 0.0


def test_mixed_step_rejects_other_parameter_dtypes():
    p = _device(np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="float16"):
        backend.mixed_step("sgd_step", [p], [p], None, [(None,)], None, lr=0.1, momentum=0.0,
                           nesterov=False, weight_decay=0.0, convention="textbook")


# ---------------------------------------------------------------------------------------------
# state8_step


def _quantized(x, signed, block):
    codes = np.empty(x.shape, np.uint8)
    absmax = np.empty(-(-x.size // block), np.float32)
    quantize_blockwise(x, codes, absmax, signed=signed, block=block)
    return codes, absmax


def run_state8(op, hyper, shapes, rng, *, block=256, steps=2, grad_mul=1.0, grad_clip=math.inf,
               avg=False, nan_grad=False, exact=True):
    """``steps`` 8-bit-state steps on the device and in the reference, compared after each."""
    full = dict(hyper, step=1) if op == "adam_step" else dict(hyper)
    layout = ref_state8.state8_layout(op, **full)
    assert backend.state8_layout(op, **full) == layout
    length = {"adam_step": 3, "sgd_step": 1, "adagrad_step": 1, "rmsprop_step": 3}[op]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    states = []
    for s in shapes:
        st = [None] * length
        for slot, signed in layout:
            x = rng.standard_normal(s).astype(np.float32) * 0.1
            st[slot] = _quantized(x if signed else np.abs(x), signed, block)
        states.append(st)
    avgs = [rng.standard_normal(s).astype(np.float32) for s in shapes] if avg else None
    d_params = [_device(p) for p in params]
    d_states = [tuple(None if p is None else (_device(p[0]), _device(p[1])) for p in st) for st in states]
    d_avgs = None if avgs is None else [_device(a) for a in avgs]
    extras = dict(grad_mul=grad_mul, grad_clip=grad_clip, avg_weight=0.25 if avg else 0.0, block=block)
    for t in range(1, steps + 1):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if nan_grad and grads[0].size:
            grads[0].reshape(-1)[-1] = np.nan  # the last block goes non-finite: NaN absmax, zero codes
        kw = dict(hyper, step=t) if op == "adam_step" else dict(hyper)
        ref_state8.state8_step(op, params, grads, [tuple(st) for st in states], avgs, **extras, **kw)
        backend.state8_step(op, d_params, [_device(g) for g in grads], d_states, d_avgs, **extras, **kw)
        for k in range(len(shapes)):
            what = f"{op} {hyper} step {t} tensor {k}"
            got = _host(d_params[k])
            if exact:
                np.testing.assert_array_equal(got, params[k], err_msg=f"{what} θ")
            else:
                _close(got, params[k], f"{what} θ")
            for slot, _ in layout:
                np.testing.assert_array_equal(_host(d_states[k][slot][0]), states[k][slot][0],
                                              err_msg=f"{what} codes of state {slot}")
                np.testing.assert_array_equal(_host(d_states[k][slot][1]), states[k][slot][1],
                                              err_msg=f"{what} absmax of state {slot}")
            if avgs is not None:
                _close(_host(d_avgs[k]), avgs[k], f"{what} avg")
            params[k][...] = got


STATE8_CASES = [
    ("adam_step", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                       decoupled_weight_decay=False, amsgrad=False)),
    ("adam_step", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                       decoupled_weight_decay=True, amsgrad=False)),
    ("sgd_step", dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.01, convention="textbook")),
    ("sgd_step", dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0, convention="torch")),
    ("sgd_step", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, convention="textbook")),
    ("sgd_step", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0, convention="torch")),
    ("adagrad_step", dict(lr=0.1, eps=1e-10, weight_decay=0.01)),
    ("rmsprop_step", dict(lr=0.01, rho=0.99, eps=1e-8, momentum=0.0, nesterov=False, centered=False,
                          weight_decay=0.0, convention="torch")),
    ("rmsprop_step", dict(lr=0.01, rho=0.99, eps=1e-8, momentum=0.9, nesterov=False, centered=False,
                          weight_decay=0.01, convention="textbook")),
    ("rmsprop_step", dict(lr=0.01, rho=0.99, eps=1e-8, momentum=0.9, nesterov=True, centered=False,
                          weight_decay=0.0, convention="textbook")),
]


def _state8_id(case):
    op, hyper = case
    return op + "".join(f"-{k}={v}" for k, v in hyper.items() if k in ("decoupled_weight_decay",
                                                                          "nesterov", "convention",
                                                                          "momentum"))


@pytest.mark.parametrize("case", STATE8_CASES, ids=_state8_id)
def test_state8_step_matches_reference(case, rng):
    op, hyper = case
    run_state8(op, hyper, SHAPES, rng)


@pytest.mark.parametrize("options", [dict(grad_mul=0.5, grad_clip=1.0, avg=True),
                                     dict(nan_grad=True), dict(block=64)],
                         ids=["extras", "nan-block", "block64"])
def test_state8_step_options(options, rng):
    op, hyper = STATE8_CASES[1]
    run_state8(op, hyper, SHAPES, rng, steps=1, **options)


def test_state8_rejects_what_the_cpu_backend_rejects():
    hyper = dict(STATE8_CASES[0][1], amsgrad=True, step=1)
    assert backend.state8_supported("adam_step", **hyper) is not None
    p = _device(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="amsgrad"):
        backend.state8_step("adam_step", [p], [p], [(None, None, None)], None, **hyper)
    with pytest.raises(ValueError, match="block"):
        backend.state8_step("adam_step", [p], [p], [(None, None, None)], None, block=4096,
                            step=1, **STATE8_CASES[0][1])
