"""float16 parameters with 8-bit optimizer state (``state8_step`` with ``masters``, ``rounding``,
``seed``, ``counter``, ``indices``) of the numba-cuda backend against ``fastopt.reference``, under
the CUDA simulator (tiny sizes: a tensor of two quantization blocks of 256 with a tail, one of a few
elements, an empty one).

The runner (``run_state8_f16``) is shared with ``tests/test_gpu_lowp_numba_cuda.py``, which runs
it at large sizes on a GPU. Comparisons, after every step:

* codes and absmax equal to the reference's (NaN absmax where the reference's is NaN), as for
  float32 parameters (``test_lowp.run_state8``);
* ``exact`` (the simulator, which does no FMA, like the kernel's ``__f*_rn`` arithmetic): float16
  θ and the float32 masters bit for bit the reference's, stochastic rounding included (NaN where
  the reference has NaN); else θ within one code of the reference's, bitwise equal wherever the
  master copies agree and in at least 98% of the elements of a large tensor, as ``run_mixed``;
* Polyak averages within float32 tolerance.

Each step starts both sides from the device's values (one step per configuration here, two in the
optimizer test, three on the GPU). The table covers every kernel variant once, and each option
(masters, rounding, float16/float32 gradients, averages and the gradient extras, a non-finite
block, another block size) in more than one configuration; masters with stochastic rounding is a
combination ``fastopt.optim`` does not make, but ``state8_step`` defines it (the stored θ is the
master rounded stochastically), as the reference and the CPU backend do. Bad input raises, naming
the argument, before anything is written; the optimizer classes reach this ``state8_step``.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import fastopt.kernels.numba_cuda as backend
from fastopt.reference import state8 as ref_state8

from .test_lowp import STATE8_CASES, _close, _device, _host, _quantized, _state8_id

SHAPES = [(300,), (5,), (0,)]
_LENGTH = {"adam_step": 3, "sgd_step": 1, "adagrad_step": 1, "rmsprop_step": 3}


def _assert_f16(what, got, want):
    """Bitwise equal float16 arrays, any NaN matching any NaN."""
    assert got.dtype == np.float16 and got.shape == want.shape, what
    same = (got.view(np.uint16) == want.view(np.uint16)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), f"{what}: {np.count_nonzero(~same)} float16 patterns differ, e.g. {got[~same][:3]} " \
                       f"against {want[~same][:3]}"


def run_state8_f16(op, hyper, shapes, rng, *, master, rounding, grad32, avg=False, block=256, steps=2,
                   grad_mul=1.0, grad_clip=math.inf, nan_grad=False, exact=True):
    """``steps`` 8-bit-state steps on float16 θ on the device and in the reference, compared after each."""
    full = dict(hyper, step=1) if op == "adam_step" else dict(hyper)
    layout = ref_state8.state8_layout(op, **full)
    params = [rng.standard_normal(s).astype(np.float16) for s in shapes]
    masters = [p.astype(np.float32) for p in params] if master else None
    states = []
    for s in shapes:
        st = [None] * _LENGTH[op]
        for slot, signed in layout:
            x = rng.standard_normal(s).astype(np.float32) * 0.1
            st[slot] = _quantized(x if signed else np.abs(x), signed, block)
        states.append(st)
    avgs = [rng.standard_normal(s).astype(np.float32) for s in shapes] if avg else None
    d_params = [_device(p) for p in params]
    d_masters = None if masters is None else [_device(m) for m in masters]
    d_states = [tuple(None if p is None else (_device(p[0]), _device(p[1])) for p in st) for st in states]
    d_avgs = None if avgs is None else [_device(a) for a in avgs]
    indices = list(range(3, 3 + len(shapes)))
    extras = dict(grad_mul=grad_mul, grad_clip=grad_clip, avg_weight=0.25 if avg else 0.0, block=block)
    gdt = np.float32 if grad32 else np.float16
    for t in range(1, steps + 1):
        grads = [rng.standard_normal(s).astype(gdt) for s in shapes]
        if nan_grad and grads[0].size:
            grads[0].reshape(-1)[-1] = np.nan  # the last block goes non-finite: NaN absmax, zero codes
        kw = dict(hyper, step=t) if op == "adam_step" else dict(hyper)
        low = dict(rounding=rounding, seed=11, counter=t, indices=indices)
        ref_state8.state8_step(op, params, grads, [tuple(st) for st in states], avgs, masters=masters,
                               **low, **extras, **kw)
        backend.state8_step(op, d_params, [_device(g) for g in grads], d_states, d_avgs, masters=d_masters,
                            **low, **extras, **kw)
        for k, shape in enumerate(shapes):
            what = f"{op} {hyper} {rounding} step {t} tensor {k}"
            got = _host(d_params[k])
            assert got.dtype == np.float16 and got.shape == shape, what
            got_master = None if masters is None else _host(d_masters[k])
            if exact:
                _assert_f16(f"{what} θ", got, params[k])
                if masters is not None:
                    np.testing.assert_array_equal(got_master, masters[k], err_msg=f"{what} master")
            else:
                finite = ~(np.isnan(got) & np.isnan(params[k]))  # NaN signs and payloads may differ
                bits = got.view(np.int16).astype(np.int32)[finite]
                want = params[k].view(np.int16).astype(np.int32)[finite]
                assert np.all(np.abs(bits - want) <= 1), f"{what}: θ more than one code from the reference"
                if bits.size >= 256:
                    assert np.mean(bits != want) <= 0.02, f"{what}: θ bits differ in {np.mean(bits != want):.1%}"
                if masters is not None:
                    _close(got_master, masters[k], f"{what} master")
                    same = (got_master == masters[k])[finite]
                    np.testing.assert_array_equal(bits[same], want[same], err_msg=f"{what}: θ bits")
            for slot, _ in layout:
                np.testing.assert_array_equal(_host(d_states[k][slot][0]), states[k][slot][0],
                                              err_msg=f"{what} codes of state {slot}")
                np.testing.assert_array_equal(_host(d_states[k][slot][1]), states[k][slot][1],
                                              err_msg=f"{what} absmax of state {slot}")
            if avgs is not None:
                _close(_host(d_avgs[k]), avgs[k], f"{what} avg")
            params[k][...] = got  # the next step starts from the device's values
            if masters is not None:
                masters[k][...] = got_master
            if avgs is not None:
                avgs[k][...] = _host(d_avgs[k])


OPTIONS = [
    dict(master=False, rounding="nearest", grad32=False),
    dict(master=True, rounding="stochastic", grad32=True, avg=True, grad_mul=0.5, grad_clip=1.0),
    dict(master=False, rounding="stochastic", grad32=False),
    dict(master=True, rounding="nearest", grad32=False, avg=True),
]
# every variant (STATE8_CASES[2:4] share sgd_momentum) with one option set, each set several times
TABLE = [(case, OPTIONS[i % len(OPTIONS)]) for i, case in enumerate(STATE8_CASES) if i != 3]


@pytest.mark.parametrize("case, options", TABLE,
                         ids=[_state8_id(c) + "-" + "-".join(f"{k}={v}" for k, v in o.items()) for c, o in TABLE])
def test_state8_f16_matches_reference(case, options, rng):
    op, hyper = case
    run_state8_f16(op, hyper, SHAPES, rng, steps=1, **options)


@pytest.mark.parametrize("options", [dict(master=True, rounding="stochastic", grad32=False, nan_grad=True, steps=1),
                                     dict(master=False, rounding="nearest", grad32=True, block=64, steps=1)],
                         ids=["nan-block", "block64"])
def test_state8_f16_options(options, rng):
    op, hyper = STATE8_CASES[0]
    run_state8_f16(op, hyper, SHAPES, rng, **options)


# ---------------------------------------------------------------------------------------------
# bad input: raises, naming the argument, before anything is written


def _inputs(rng):
    """An SGD-momentum configuration on float16 θ of 40 elements: (hyper, θ, g, masters, states)
    as device arrays, and host copies of θ, the master and the codes to check nothing was written."""
    op, hyper = STATE8_CASES[2]
    p = rng.standard_normal(40).astype(np.float16)
    codes, absmax = _quantized(rng.standard_normal(40).astype(np.float32), True, 256)
    d = dict(params=[_device(p)], grads=[_device(rng.standard_normal(40).astype(np.float16))],
             masters=[_device(p.astype(np.float32))], states=[((_device(codes), _device(absmax)),)])
    return op, hyper, d, (p, p.astype(np.float32), codes)


BAD = [
    ("masters", lambda d: dict(d, masters=[_device(np.zeros(41, np.float32))]), ValueError, r"masters\[0\]"),
    ("masters-dtype", lambda d: dict(d, masters=[_device(np.zeros(40, np.float16))]), ValueError, r"masters\[0\]"),
    ("masters-length", lambda d: dict(d, masters=[]), ValueError, "masters has 0 entries"),
    ("grads-dtype", lambda d: dict(d, grads=[_device(np.zeros(40, np.float64))]), TypeError, r"grads\[0\]"),
    ("grads-shape", lambda d: dict(d, grads=[_device(np.zeros(39, np.float16))]), ValueError, r"grads\[0\]"),
    ("codes", lambda d: dict(d, states=[((_device(np.zeros(40, np.int8)), d["states"][0][0][1]),)]),
     ValueError, r"states\[0\]\[0\]\[0\]"),
    ("rounding", lambda d: dict(d, rounding="up"), ValueError, "rounding"),
    ("indices-length", lambda d: dict(d, indices=[0, 1]), ValueError, "indices has 2 entries"),
    ("indices-type", lambda d: dict(d, indices=[1.5]), TypeError, r"indices\[0\]"),
    ("bfloat16", lambda d: dict(d, params=[_device(np.zeros(40, ml_dtypes.bfloat16))]), TypeError,
     "numba-cuda.*float16 only"),
]


@pytest.mark.parametrize("what, change, error, match", BAD, ids=[b[0] for b in BAD])
def test_state8_f16_bad_input_raises_before_writing(what, change, error, match, rng):
    op, hyper, d, (p, master, codes) = _inputs(rng)
    args = change(d)
    with pytest.raises(error, match=match):
        backend.state8_step(op, args.pop("params"), args.pop("grads"), args.pop("states"), None, **args, **hyper)
    np.testing.assert_array_equal(_host(d["params"][0]).view(np.uint16), p.view(np.uint16))
    np.testing.assert_array_equal(_host(d["masters"][0]), master)
    np.testing.assert_array_equal(_host(d["states"][0][0][0]), codes)


def test_state8_float32_params_take_no_masters(rng):
    op, hyper = STATE8_CASES[2]
    p = _device(np.zeros(4, np.float32))
    codes, absmax = _quantized(np.zeros(4, np.float32), True, 256)
    with pytest.raises(ValueError, match="masters"):
        backend.state8_step(op, [p], [p], [((_device(codes), _device(absmax)),)], None, masters=[p], **hyper)


def test_the_precision_module_routes_float16_params_here():
    """``fastopt.precision.compact_module`` takes a backend for 16-bit params + 8-bit state when
    its ``state8_step`` has ``masters``; bfloat16 state (``state_dtype``) stays unsupported."""
    from fastopt import precision

    assert precision.compact_module(backend, "numba-cuda", "int8", low=True) is backend
    with pytest.raises(TypeError, match="numba-cuda"):
        precision.compact_module(backend, "numba-cuda", "bfloat16", low=True)


def test_the_optimizer_steps_float16_device_params_with_8_bit_state_as_the_reference():
    """``fastopt.Adam(..., state_dtype="int8")`` on float16 device arrays goes through this
    ``state8_step`` (stochastic rounding, counter = step, indices = tensor ids) and gives
    the reference backend's θ and 8-bit state bit for bit."""
    import fastopt

    rng = np.random.default_rng(7)
    host = [rng.standard_normal(n).astype(np.float16) for n in (300, 7)]
    params = [_device(p) for p in host]
    options = dict(lr=1e-2, state_dtype="int8", min_8bit_size=0, master_weights=False, rounding="stochastic", seed=3)
    opt = fastopt.Adam(params, **options)
    ref = fastopt.Adam(host, backend="numpy", **options)
    for step in range(2):
        grads = [rng.standard_normal(p.shape).astype(np.float16) for p in host]
        opt.step([_device(g) for g in grads])
        ref.step(grads)
    for k in range(len(host)):
        _assert_f16(f"θ {k}", _host(params[k]), host[k])
        for name, value in ref.state[k].items():
            got = opt.state[k][name]
            np.testing.assert_array_equal(got if isinstance(got, (int, float)) else _host(got), value,
                                          err_msg=f"state[{k}][{name!r}]")
