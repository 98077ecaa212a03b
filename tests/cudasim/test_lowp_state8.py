"""float16 parameters with 8-bit optimizer state (``state8_step`` with ``masters``, ``rounding``,
``seed``, ``counter``, ``indices``, ``starts``), and bfloat16 state (``state_dtype="bfloat16"``) for
float32 and float16 parameters, of the numba-cuda backend against ``fastopt.reference``, under the
CUDA simulator (tiny sizes: a tensor of two quantization blocks of 256 with a tail, one of a few
elements, an empty one).

The runners (``run_state8_f16``, ``run_state8_bf16``, ``run_pieces``) are shared with
``tests/test_gpu_lowp_numba_cuda.py``, which runs them at large sizes on a GPU. Comparisons, after
every step:

* codes and absmax equal to the reference's (NaN absmax where the reference's is NaN), as for
  float32 parameters (``test_lowp.run_state8``);
* ``exact`` (the simulator, which does no FMA, like the kernel's ``__f*_rn`` arithmetic): float16
  θ and the float32 masters bit for bit the reference's, stochastic rounding included (NaN where
  the reference has NaN); else θ within one code of the reference's, bitwise equal wherever the
  master copies agree and in at least 98% of the elements of a large tensor, as ``run_mixed``;
* Polyak averages within float32 tolerance;
* bfloat16 state (one uint16 device array of bfloat16 bits per state; the reference's are
  ml_dtypes.bfloat16 arrays): the states bit for bit (``.view(np.uint16)``, any NaN matching any
  NaN), θ and masters as above, the averages bitwise, for every configuration of the int8 tests,
  float32 and float16 θ, with and without averaging; on the GPU the states within one code.

``starts``: a float16 parameter stepped (stochastic rounding) as one tensor and as pieces with
their first elements as ``starts`` gives the same θ, masters and states bit for bit (bfloat16
state: cut anywhere; 8-bit: on block boundaries), and without ``starts`` it does not.

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

from .helpers import code_line
from .test_lowp import STATE8_CASES, _close, _device, _host, _quantized, _state8_id, run_state8

SHAPES = [(300,), (5,), (0,)]
_LENGTH = {"adam_step": 3, "sgd_step": 1, "adagrad_step": 1, "rmsprop_step": 3}


def _assert_f16(what, got, want):
    """Bitwise equal float16 arrays, any NaN matching any NaN."""
    assert got.dtype == np.float16 and got.shape == want.shape, what
    same = (got.view(np.uint16) == want.view(np.uint16)) | (np.isnan(got) & np.isnan(want))
    assert same.all(), f"{what}: {np.count_nonzero(~same)} float16 patterns differ, e.g. {got[~same][:3]} " \
                       f"against {want[~same][:3]}"


def _compare_f16(what, got, want, got_master, want_master, exact):
    """float16 θ (and float32 masters, or None) against the reference's: bitwise when ``exact``,
    else θ within one code, bitwise where the masters agree and in at least 98% of a large tensor."""
    if exact:
        _assert_f16(f"{what} θ", got, want)
        if want_master is not None:
            np.testing.assert_array_equal(got_master, want_master, err_msg=f"{what} master")
        return
    finite = ~(np.isnan(got) & np.isnan(want))  # NaN signs and payloads may differ
    bits = code_line(got)[finite]
    wanted = code_line(want)[finite]
    assert np.all(np.abs(bits - wanted) <= 1), f"{what}: θ more than one code from the reference"
    if bits.size >= 256:
        assert np.mean(bits != wanted) <= 0.02, f"{what}: θ bits differ in {np.mean(bits != wanted):.1%}"
    if want_master is not None:
        _close(got_master, want_master, f"{what} master")
        same = (got_master == want_master)[finite]
        np.testing.assert_array_equal(bits[same], wanted[same], err_msg=f"{what}: θ bits")


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
            _compare_f16(what, got, params[k], got_master, None if masters is None else masters[k], exact)
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
    ("starts-type", lambda d: dict(d, starts=[0.0]), TypeError, r"starts\[0\]"),
    ("starts-negative", lambda d: dict(d, starts=[-1]), ValueError, r"starts\[0\]"),
    ("starts-length", lambda d: dict(d, starts=[0, 1]), ValueError, "starts has 2 entries"),
    ("state-dtype", lambda d: dict(d, state_dtype="float16"), ValueError, "state_dtype"),
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
    its ``state8_step`` has ``masters``, and for bfloat16 state when it has ``state_dtype``."""
    from fastopt import precision

    assert precision.compact_module(backend, "numba-cuda", "int8", low=True) is backend
    assert precision.compact_module(backend, "numba-cuda", "bfloat16", low=True) is backend
    assert precision.compact_module(backend, "numba-cuda", "bfloat16") is backend


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


# ---------------------------------------------------------------------------------------------
# bfloat16 state (state_dtype="bfloat16"): one uint16 device array of bfloat16 bits per state

BF16 = np.dtype(ml_dtypes.bfloat16)


def _assert_bf16(what, got, want, exact):
    """uint16 bfloat16 bits ``got`` against the reference's bfloat16 ``want``: bitwise, any NaN
    matching any NaN (``exact``), else within one code and bitwise in at least 98% of a large tensor."""
    assert got.dtype == np.uint16 and got.shape == want.shape, what
    wanted = want.view(np.uint16)
    nan = np.isnan(got.view(BF16).astype(np.float32)) & np.isnan(want.astype(np.float32))
    if exact:
        same = (got == wanted) | nan
        assert same.all(), f"{what}: {np.count_nonzero(~same)} bfloat16 patterns differ, e.g. " \
                           f"{got[~same][:3]} against {wanted[~same][:3]}"
        return
    bits = code_line(got)[~nan]
    wanted = code_line(wanted)[~nan]
    assert np.all(np.abs(bits - wanted) <= 1), f"{what}: more than one bfloat16 code from the reference"
    if bits.size >= 256:
        assert np.mean(bits != wanted) <= 0.02, f"{what}: bits differ in {np.mean(bits != wanted):.1%}"


def _bf16_states(op, layout, shapes, rng):
    """The reference's bfloat16 states (signed ones of either sign, unsigned ones ≥ 0) and the
    device's uint16 copies of their bits."""
    states = []
    for s in shapes:
        st = [None] * _LENGTH[op]
        for slot, signed in layout:
            x = rng.standard_normal(s).astype(np.float32) * 0.1
            st[slot] = (x if signed else np.abs(x)).astype(BF16)
        states.append(st)
    d_states = [tuple(None if x is None else _device(x.view(np.uint16)) for x in st) for st in states]
    return states, d_states


def run_state8_bf16(op, hyper, shapes, rng, *, low, master=False, rounding="nearest", grad32=True, avg=False,
                    steps=1, grad_mul=1.0, grad_clip=math.inf, nan_grad=False, exact=True):
    """``steps`` bfloat16-state steps on float32 (``low`` False) or float16 θ on the device and in
    the reference (whose states are ml_dtypes.bfloat16 arrays), compared after each: the states
    bit for bit (``.view(np.uint16)``), θ and the masters as ``run_state8`` / ``run_state8_f16``,
    the averages bitwise (``exact``) or within float32 tolerance."""
    full = dict(hyper, step=1) if op == "adam_step" else dict(hyper)
    layout = ref_state8.state8_layout(op, **full)
    params = [rng.standard_normal(s).astype(np.float16 if low else np.float32) for s in shapes]
    masters = [p.astype(np.float32) for p in params] if master else None
    states, d_states = _bf16_states(op, layout, shapes, rng)
    avgs = [rng.standard_normal(s).astype(np.float32) for s in shapes] if avg else None
    d_params = [_device(p) for p in params]
    d_masters = None if masters is None else [_device(m) for m in masters]
    d_avgs = None if avgs is None else [_device(a) for a in avgs]
    extras = dict(grad_mul=grad_mul, grad_clip=grad_clip, avg_weight=0.25 if avg else 0.0, state_dtype="bfloat16",
                  rounding=rounding, seed=11, indices=list(range(3, 3 + len(shapes))))
    gdt = np.float32 if grad32 or not low else np.float16
    for t in range(1, steps + 1):
        grads = [rng.standard_normal(s).astype(gdt) for s in shapes]
        if nan_grad and grads[0].size:
            grads[0].reshape(-1)[-1] = np.nan  # NaN θ and states at that element, kept NaN
        kw = dict(hyper, step=t) if op == "adam_step" else dict(hyper)
        ref_state8.state8_step(op, params, grads, [tuple(st) for st in states], avgs, masters=masters,
                               counter=t, **extras, **kw)
        backend.state8_step(op, d_params, [_device(g) for g in grads], d_states, d_avgs, masters=d_masters,
                            counter=t, **extras, **kw)
        for k, shape in enumerate(shapes):
            what = f"{op} {hyper} low={low} {rounding} step {t} tensor {k}"
            got = _host(d_params[k])
            assert got.shape == shape, what
            if low:
                got_master = None if masters is None else _host(d_masters[k])
                _compare_f16(what, got, params[k], got_master, None if masters is None else masters[k], exact)
            elif exact:
                assert got.dtype == np.float32, what
                np.testing.assert_array_equal(got, params[k], err_msg=f"{what} θ")
            else:
                _close(got, params[k], f"{what} θ")
            for slot, _ in layout:
                got_state = _host(d_states[k][slot])
                _assert_bf16(f"{what} state {slot}", got_state, states[k][slot], exact)
                states[k][slot][...] = got_state.view(BF16)  # the next step starts from the device's values
            if avgs is not None:
                got_avg = _host(d_avgs[k])
                if exact:
                    np.testing.assert_array_equal(got_avg, avgs[k], err_msg=f"{what} avg")
                else:
                    _close(got_avg, avgs[k], f"{what} avg")
                avgs[k][...] = got_avg
            params[k][...] = got
            if masters is not None:
                masters[k][...] = got_master


F32_OPTIONS = [dict(), dict(avg=True, grad_mul=0.5, grad_clip=1.0)]
# every configuration of the int8 tests once, alternately with float32 θ (averaged or not) and with
# float16 θ (every float16 option set); the simulator is slow, and the GPU tests run them all
BF16_TABLE = [(case, dict(low=False, **F32_OPTIONS[(i // 2) % len(F32_OPTIONS)]) if i % 2 == 0
               else dict(low=True, **OPTIONS[(i // 2) % len(OPTIONS)]))
              for i, case in enumerate(STATE8_CASES)]
# the GPU tests: every configuration with float32 θ and with float16 θ
BF16_TABLE_ALL = ([(case, dict(low=False, **F32_OPTIONS[i % len(F32_OPTIONS)])) for i, case in enumerate(STATE8_CASES)]
                  + [(case, dict(low=True, **OPTIONS[i % len(OPTIONS)])) for i, case in enumerate(STATE8_CASES)])


def _bf16_ids(table):
    return [_state8_id(c) + "-" + "-".join(f"{k}={v}" for k, v in o.items()) for c, o in table]


BF16_IDS, BF16_IDS_ALL = _bf16_ids(BF16_TABLE), _bf16_ids(BF16_TABLE_ALL)


@pytest.mark.parametrize("case, options", BF16_TABLE, ids=BF16_IDS)
def test_state8_bf16_state_matches_reference(case, options, rng):
    op, hyper = case
    run_state8_bf16(op, hyper, SHAPES, rng, **options)


@pytest.mark.parametrize("options", [dict(low=False, nan_grad=True, steps=2),
                                     dict(low=True, master=True, rounding="stochastic", grad32=False, nan_grad=True),
                                     dict(low=True, rounding="stochastic", grad32=False, avg=True, steps=2)],
                         ids=["float32-nan-two-steps", "float16-nan", "float16-two-steps"])
def test_state8_bf16_state_options(options, rng):
    op, hyper = STATE8_CASES[0]
    run_state8_bf16(op, hyper, [(70,), (3, 5), (0,)], rng, **options)


@pytest.mark.parametrize("kind", ["int8-float32", "int8-float16", "bfloat16-float32", "bfloat16-float16"])
def test_state8_a_first_tensor_without_elements(kind, rng):
    """The kernels' array types come from the first tensor with elements (an empty array need not
    be typed C-contiguous)."""
    op, hyper = STATE8_CASES[7]  # RMSProp
    shapes = [(0,), (30,), (0,)]
    if kind == "int8-float32":
        run_state8(op, hyper, shapes, rng, steps=1)
    elif kind == "int8-float16":
        run_state8_f16(op, hyper, shapes, rng, master=True, rounding="stochastic", grad32=False, steps=1)
    else:
        run_state8_bf16(op, hyper, shapes, rng, low=kind.endswith("float16"), grad32=False)


def test_state8_bf16_state_rounds_to_nearest_even_and_keeps_nan():
    """SGD momentum with v = −ε g exactly (α = 0 would be unsupported: v = 0 · v + c g with
    ``v`` 0): the stored state is ``−lr · g`` rounded to nearest even, ties included, Inf and NaN
    kept."""
    op, hyper = "sgd_step", dict(lr=1.0, momentum=0.5, nesterov=False, weight_decay=0.0, convention="torch")
    # g: bfloat16 ties (1 + 2⁻⁸: to even, down; 1 + 3·2⁻⁸: up), past the largest finite (to Inf), Inf, NaN
    g = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, np.inf, np.nan, -np.nan, 1e-40], np.float32)
    state = np.zeros(g.size, BF16)
    params = [np.zeros(g.size, np.float32)]
    d_state = _device(state.view(np.uint16))
    ref_state8.state8_step(op, params, [g], [(state,)], None, state_dtype="bfloat16", **hyper)
    backend.state8_step(op, [_device(np.zeros(g.size, np.float32))], [_device(g)], [(d_state,)], None,
                        state_dtype="bfloat16", **hyper)
    got = _host(d_state)
    _assert_bf16("velocity", got, state, exact=True)
    assert got[:3].view(BF16).astype(np.float32).tolist() == [1.0, 1 + 2**-6, -1.0]
    assert np.isinf(got[3:5].view(BF16).astype(np.float32)).all() and np.isnan(got[5:7].view(BF16).astype(np.float32)).all()


# starts: a parameter stepped in pieces rounds as the whole parameter


def _pieces_step(op, hyper, theta, grad, masters, states, cuts, starts, state_dtype, block):
    """One stochastic step of float16 ``theta`` cut at ``cuts`` into pieces (one tensor each, all
    with the parameter's index 7), on the device and in the reference: (θ, masters, states) of each
    side, the pieces joined again."""
    bounds = list(zip([0, *cuts], [*cuts, theta.size]))
    low = dict(rounding="stochastic", seed=5, counter=2, indices=[7] * len(bounds), starts=starts,
               block=block, state_dtype=state_dtype, **hyper)

    def piece(x, a, b):
        if state_dtype == "int8":  # (codes, absmax): the pieces begin on block boundaries
            return (x[0][a:b].copy(), x[1][a // block:-(-b // block)].copy())
        return x[a:b].copy()

    host = [theta[a:b].copy() for a, b in bounds]
    host_masters = [masters[a:b].copy() for a, b in bounds]
    host_states = [tuple(None if x is None else piece(x, a, b) for x in states) for a, b in bounds]

    def device_state(x):
        if x is None:
            return None
        if state_dtype == "int8":
            return (_device(x[0]), _device(x[1]))
        return _device(x.view(np.uint16))

    d_params = [_device(p) for p in host]
    d_masters = [_device(m) for m in host_masters]
    d_states = [tuple(device_state(x) for x in st) for st in host_states]
    grads = [grad[a:b].copy() for a, b in bounds]
    ref_state8.state8_step(op, host, grads, host_states, None, masters=host_masters, **low)
    backend.state8_step(op, d_params, [_device(g) for g in grads], d_states, None, masters=d_masters, **low)

    def join(parts):
        return np.concatenate([np.asarray(x).reshape(-1) for x in parts])

    def states_of(side):
        out = []
        for slot in range(len(states)):
            if states[slot] is None:
                continue
            if state_dtype == "int8":
                out.append(join([_host(st[slot][0]) if side else st[slot][0] for st in (d_states if side else host_states)]))
                out.append(join([_host(st[slot][1]) if side else st[slot][1] for st in (d_states if side else host_states)]))
            else:
                out.append(join([_host(st[slot]) if side else st[slot].view(np.uint16)
                                 for st in (d_states if side else host_states)]))
        return out

    device = (join([_host(p) for p in d_params]), join([_host(m) for m in d_masters]), states_of(True))
    reference = (join(host), join(host_masters), states_of(False))
    return device, reference


def run_pieces(state_dtype, n, cuts, block, rng, *, exact=True):
    """float16 θ of ``n`` elements with stochastic rounding and masters, stepped (Adam) as one
    tensor and as pieces cut at ``cuts`` (the same index, ``starts`` the pieces' first elements):
    on the device and in the reference, the pieces give the whole tensor's θ, masters and states
    bit for bit; the pieces without ``starts`` round differently. The device's whole step against
    the reference's: bitwise (``exact``), else as ``run_state8_f16`` / ``run_state8_bf16``."""
    op, hyper = STATE8_CASES[0]
    hyper = dict(hyper, step=1)
    theta = rng.standard_normal(n).astype(np.float16)
    grad = rng.standard_normal(n).astype(np.float16)
    masters = theta.astype(np.float32) + rng.standard_normal(n).astype(np.float32) * 1e-3  # not float16 values
    layout = ref_state8.state8_layout(op, **hyper)
    states = [None] * _LENGTH[op]
    for slot, signed in layout:
        x = rng.standard_normal(n).astype(np.float32) * 0.1
        x = x if signed else np.abs(x)
        states[slot] = _quantized(x, signed, block) if state_dtype == "int8" else x.astype(BF16)
    whole, whole_ref = _pieces_step(op, hyper, theta, grad, masters, states, [], None, state_dtype, block)
    pieces, pieces_ref = _pieces_step(op, hyper, theta, grad, masters, states, cuts, [0, *cuts], state_dtype,
                                      block)
    shifted, _ = _pieces_step(op, hyper, theta, grad, masters, states, cuts, None, state_dtype, block)
    for side, want in ((pieces, whole), (pieces_ref, whole_ref)) + (((whole_ref, whole),) if exact else ()):
        np.testing.assert_array_equal(side[0].view(np.uint16), want[0].view(np.uint16), err_msg="θ")
        np.testing.assert_array_equal(side[1], want[1], err_msg="masters")
        for got, wanted in zip(side[2], want[2], strict=True):
            np.testing.assert_array_equal(got, wanted, err_msg="states")
    if not exact:
        _compare_f16("whole", whole[0], whole_ref[0], whole[1], whole_ref[1], exact=False)
        for got, wanted in zip(whole[2], whole_ref[2], strict=True):
            if state_dtype == "int8":
                np.testing.assert_array_equal(got, wanted, err_msg="codes or absmax")
            else:
                _assert_bf16("whole states", got, wanted.view(BF16), exact=False)
    np.testing.assert_array_equal(shifted[1], whole[1])  # the same float32 values ...
    assert np.any(shifted[0][cuts[0]:].view(np.uint16) != whole[0][cuts[0]:].view(np.uint16))  # ... other draws


@pytest.mark.parametrize("state_dtype, cuts", [("bfloat16", [37, 40]), ("int8", [64])], ids=["bfloat16", "int8"])
def test_state8_starts_make_pieces_round_as_the_whole_parameter(state_dtype, cuts, rng):
    """96 elements cut anywhere (bfloat16 state, element by element) or on a block boundary (int8,
    blocks of 32, so the pieces quantize as the whole)."""
    run_pieces(state_dtype, 96, cuts, 32, rng)


# bad input: raises, naming the argument, before anything is written (two tensors, the second bad)


def _bf16_inputs(rng, low=True):
    """An SGD-momentum configuration on two float16 (or float32) tensors of 40 and 7 elements with
    bfloat16 state (device arrays), and host copies of θ and the states' bits."""
    op, hyper = STATE8_CASES[2]
    pdt = np.float16 if low else np.float32
    params = [rng.standard_normal(n).astype(pdt) for n in (40, 7)]
    bits = [rng.standard_normal(n).astype(np.float32).astype(BF16).view(np.uint16) for n in (40, 7)]
    d = dict(params=[_device(p) for p in params], grads=[_device(rng.standard_normal(n).astype(pdt)) for n in (40, 7)],
             states=[(_device(b),) for b in bits], state_dtype="bfloat16")
    return op, hyper, d, (params, bits)


def _second(d, key, value):
    return dict(d, **{key: [d[key][0], value]})


BAD_BF16 = [
    ("state-dtype", True, lambda d: dict(d, state_dtype="bf16"), ValueError, "state_dtype"),
    ("state-dtype-float32", True, lambda d: dict(d, state_dtype="float32"), ValueError, "state_dtype"),
    ("pair", True, lambda d: _second(d, "states", ((_device(np.zeros(7, np.uint8)), _device(np.zeros(1, np.float32))),)),
     ValueError, r"states\[1\]\[0\] must be one uint16 device array"),
    ("float32-state", True, lambda d: _second(d, "states", (_device(np.zeros(7, np.float32)),)), ValueError,
     r"states\[1\]\[0\] \(bfloat16 bits\) must be .* uint16"),
    ("int16-state", False, lambda d: _second(d, "states", (_device(np.zeros(7, np.int16)),)), ValueError,
     r"states\[1\]\[0\] \(bfloat16 bits\)"),
    ("state-shape", True, lambda d: _second(d, "states", (_device(np.zeros(8, np.uint16)),)), ValueError,
     r"states\[1\]\[0\] \(bfloat16 bits\) .* shape \(7,\)"),
    ("state-none", False, lambda d: _second(d, "states", (None,)), ValueError, r"states\[1\]\[0\]"),
    ("state-tuple", True, lambda d: _second(d, "states", ()), ValueError, r"states\[1\] must be a tuple"),
    ("grads-dtype", True, lambda d: _second(d, "grads", _device(np.zeros(7, np.float64))), TypeError, r"grads\[1\]"),
    ("grads-float16", False, lambda d: _second(d, "grads", _device(np.zeros(7, np.float16))), ValueError,
     r"grads\[1\]"),
    ("masters", True, lambda d: dict(d, masters=[_device(np.zeros(40, np.float32)), _device(np.zeros(6, np.float32))]),
     ValueError, r"masters\[1\]"),
    ("masters-float32-params", False, lambda d: dict(d, masters=[None, None]), ValueError, "masters"),
    ("avgs", False, lambda d: dict(d, avgs=[_device(np.zeros(40, np.float32)), _device(np.zeros(7, np.float16))]),
     ValueError, r"avgs\[1\]"),
    ("starts", True, lambda d: dict(d, starts=[0, "3"]), TypeError, r"starts\[1\]"),
    ("starts-negative", True, lambda d: dict(d, starts=[0, -3]), ValueError, r"starts\[1\]"),
    ("indices", True, lambda d: dict(d, indices=[0, None]), TypeError, r"indices\[1\]"),
    ("block", False, lambda d: dict(d, block=4096), ValueError, "block"),
]


@pytest.mark.parametrize("what, low, change, error, match", BAD_BF16, ids=[b[0] for b in BAD_BF16])
def test_state8_bf16_state_bad_input_raises_before_writing(what, low, change, error, match, rng):
    op, hyper, d, (params, bits) = _bf16_inputs(rng, low)
    args = change(d)
    with pytest.raises(error, match=match):
        backend.state8_step(op, args.pop("params"), args.pop("grads"), args.pop("states"), args.pop("avgs", None),
                            **args, **hyper)
    for k in range(2):
        np.testing.assert_array_equal(_host(d["params"][k]).view(np.uint8), params[k].view(np.uint8))
        np.testing.assert_array_equal(_host(d["states"][k][0]), bits[k])


@pytest.mark.parametrize("dtype", [np.float16], ids=["float16"])  # float32 θ: the GPU tests
def test_an_optimizer_with_bfloat16_state_on_the_device_equals_the_host_one(dtype):
    """``fastopt.Adam(..., state_dtype="bfloat16", backend="numba-cuda")``: the state lives on the
    device as uint16 bits (``precision.device_bfloat16``), the parameters and state equal the
    reference optimizer's bit for bit, ``state_dict`` returns bfloat16 host arrays, and
    ``load_state_dict`` puts them back as bits."""
    import fastopt

    rng = np.random.default_rng(8)
    shapes = [(7, 9), (300,)]
    host_params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    params = [_device(p) for p in host_params]
    options = dict(lr=0.01, state_dtype="bfloat16", polyak=0.9)
    opt = fastopt.Adam(params, backend="numba-cuda", **options)
    ref = fastopt.Adam(host_params, backend="numpy", **options)
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        opt.step([_device(g) for g in grads])
        ref.step(grads)
    assert opt.state[1]["m"].dtype == np.uint16
    for p, q in zip(params, host_params):
        np.testing.assert_array_equal(_host(p).view(np.uint8), q.view(np.uint8))
    saved, expected = opt.state_dict(), ref.state_dict()
    bf16 = np.dtype(ml_dtypes.bfloat16)
    for k, entry in expected["state"].items():
        for name, value in entry.items():
            if isinstance(value, np.ndarray):
                assert saved["state"][k][name].dtype == value.dtype, (k, name)
                np.testing.assert_array_equal(saved["state"][k][name].view(np.uint8), value.view(np.uint8))
    assert saved["state"][0]["m"].dtype == bf16
    again = fastopt.Adam([_device(p) for p in host_params], backend="numba-cuda", **options)
    again.load_state_dict(saved)
    assert again.state[0]["v"].dtype == np.uint16
    np.testing.assert_array_equal(_host(again.state[0]["v"]), expected["state"][0]["v"].view(np.uint16))
