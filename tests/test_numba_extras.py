"""The ``"numba"`` backend's training-step extras, tensor lists and gradient reductions, at the
backend level (no API layer), against the NumPy reference ``fastopt.reference``.

* every configuration of ``optim_cases`` with grad_mul ≠ 1, a finite grad_clip with NaN/±inf in
  g, and a Polyak average (avg_weight 1.0, then 0.3), step by step against the float64 reference
  (at the parallel kernels' size, float64 for ``optim_cases.FLOAT64_PARALLEL`` only);
* the defaults (grad_mul = 1, grad_clip = inf, avg = None) give bit for bit what the element update
  gives without the extras;
* ``multi_step`` over lists of mixed sizes (0-size tensors, several shapes, parts crossing tensor
  boundaries) gives bit for bit what per-tensor calls give, through the compiled table builder and
  through its Python fallback (float64 for ``FLOAT64_PARALLEL`` only: the list runs the parallel
  kernels);
* ``grad_sumsq`` (float64 accumulation, non-finite detection, thread-count independence),
  ``grad_multiplier`` and ``scale_grads_``.
"""

from __future__ import annotations

import math

import ml_dtypes
import numba
import numpy as np
import pytest

import fastopt.kernels.numba_cpu as numba_backend
import fastopt.reference as reference
from fastopt import functional
from fastopt._checks import check_array, check_disjoint, check_like
from fastopt.precision import check_grad
from fastopt.kernels.numba_cpu import multi, optim as optim_kernels

from conftest import assert_close
from optim_cases import case_grid, initial_state

PARALLEL = 2**17 + 3  # above multi.SERIAL_BELOW: the parallel kernel, 16 parts
SIZES = [0, 1, 7, 1000, PARALLEL]
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["float32", "float64"]
GRID = case_grid(DTYPES, SIZES, lambda backend, size: size == PARALLEL)  # float64: optim_cases.FLOAT64_PARALLEL
# Mixed list for multi_step: 0-size tensors first, between and last; shapes of several ranks; a
# total far above multi.PART_MIN, so parts start and end inside tensors.
LIST_SHAPES = [(0,), (1,), (7,), (1000,), (0,), (3, 5, 7), (2**16 + 5,), (2,), (129, 130), (0, 4),
               (9000,), (31,)]


def hyper_for(case, step=None):
    name, hyper = case
    spec = functional.SPECS[name]
    checked = spec.check(**hyper)
    if spec.step_count:
        checked["step"] = step
    return spec, checked


def planted_grad(rng, shape, dtype, param, hyper):
    """A standard normal gradient with NaN, +inf and -inf planted (when there is room)."""
    grad = rng.standard_normal(shape).astype(dtype)
    if hyper.get("weight_decay"):
        grad = np.copysign(grad, param)  # g + λθ never cancels (see test_optim_backends)
    flat = grad.reshape(-1)
    if flat.size >= 7:
        flat[[1, 3, 5]] = [np.nan, np.inf, -np.inf]
    elif flat.size >= 1:
        flat[0] = np.inf
    return grad


# ---------------------------------------------------------------------------------------------
# Extras against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, dtype, size", GRID)
def test_extras_match_float64_reference(case, dtype, size, rng):
    name, raw = case
    shape = (size,)
    param = rng.standard_normal(shape).astype(dtype)
    state = initial_state(name, shape, dtype, rng)
    avg = rng.standard_normal(shape).astype(dtype)
    for t, avg_weight in enumerate([1.0, 0.3], start=1):
        spec, hyper = hyper_for(case, t)
        grad = planted_grad(rng, shape, dtype, param, raw)
        grad_before = grad.copy()
        common = dict(grad_mul=0.75, grad_clip=0.9, avg_weight=avg_weight)
        expected_param = param.astype(np.float64)
        expected_state = {k: v.astype(np.float64) for k, v in state.items()}
        expected_avg = avg.astype(np.float64)
        before = {"param": param.copy(), "avg": avg.copy(), **{k: v.copy() for k, v in state.items()}}
        getattr(reference, spec.kernel)(
            expected_param, grad.astype(np.float64), *(expected_state[k] for k in spec.state),
            avg=expected_avg, **common, **hyper)

        getattr(numba_backend, spec.kernel)(param, grad, *(state[k] for k in spec.state), avg=avg,
                                            **common, **hyper)

        np.testing.assert_array_equal(grad, grad_before, err_msg="the gradient was modified")
        assert_close(param, expected_param, dtype, f"param after step {t}", before=before["param"])
        assert_close(avg, expected_avg, dtype, f"avg after step {t} (avg_weight {avg_weight})", before=before["avg"])
        for k in spec.uses(hyper):
            assert_close(state[k], expected_state[k], dtype, f"{k} after step {t}", before=before[k])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_clip_passes_nan_and_clamps_infinities(dtype):
    """g·grad_mul clamped to ±c elementwise, NaN kept, seen through plain SGD (θ ← θ − g)."""
    grad = np.array([np.nan, np.inf, -np.inf, 3.0, -3.0, 0.5, -0.0, 2.0], dtype)
    param = np.zeros_like(grad)
    numba_backend.sgd_step(param, grad, None, grad_mul=0.5, grad_clip=1.0, lr=1.0, momentum=0.0,
                           nesterov=False, weight_decay=0.0, convention="textbook")
    expected = -np.array([np.nan, 1.0, -1.0, 1.0, -1.0, 0.25, -0.0, 1.0], dtype)
    np.testing.assert_array_equal(param, expected)


# ---------------------------------------------------------------------------------------------
# Defaults reproduce the plain update bit for bit
# ---------------------------------------------------------------------------------------------


@numba.njit
def _plain_loop(element, param, grad, s0, s1, s2, hyper):
    """The element update alone over whole arrays: no grad_mul, no clamp, no average, no parts."""
    like = hyper[0]
    state = (multi.pointer(s0.ctypes.data, like), multi.pointer(s1.ctypes.data, like),
             multi.pointer(s2.ctypes.data, like))
    for i in range(param.shape[0]):
        param[i] = element(param[i], grad[i], state, i, hyper)


def plain_update(param, grad, state_tuple, hyper):
    """What the element update of the planned kernel alone gives, on copies."""
    kernel, slots, scalars = optim_kernels._PLANS[hyper.pop("op")](**hyper)
    element = kernel.element
    t = param.dtype.type
    p = param.reshape(-1).copy()
    states = [state_tuple[j].reshape(-1).copy() for j in slots]
    arrays = states + [np.zeros(1, param.dtype)] * (3 - len(states))
    _plain_loop(element, p, grad.reshape(-1), *arrays, tuple(t(x) for x in scalars))
    return p.reshape(param.shape), states, slots


@pytest.mark.parametrize("case, dtype, size", GRID)
def test_defaults_are_bit_identical_to_the_plain_update(case, dtype, size, rng):
    name, raw = case
    shape = (size,)
    spec, hyper = hyper_for(case, 3)
    param = rng.standard_normal(shape).astype(dtype)
    grad = planted_grad(rng, shape, dtype, param, raw)
    state = initial_state(name, shape, dtype, rng)
    for array in state.values():  # non-trivial state
        array[...] = np.abs(rng.standard_normal(shape)).astype(dtype)
    state_tuple = tuple(state[k] for k in spec.state)
    expected_param, expected_states, slots = plain_update(param, grad, state_tuple,
                                                          dict(hyper, op=spec.kernel))

    explicit = [param.copy(), tuple(s.copy() for s in state_tuple)]
    implicit = [param.copy(), tuple(s.copy() for s in state_tuple)]
    averaged = [param.copy(), tuple(s.copy() for s in state_tuple)]
    avg = rng.standard_normal(shape).astype(dtype)
    kernel = getattr(numba_backend, spec.kernel)
    kernel(explicit[0], grad, *explicit[1], grad_mul=1.0, grad_clip=math.inf, avg=None,
           avg_weight=0.0, **hyper)
    kernel(implicit[0], grad, *implicit[1], **hyper)
    kernel(averaged[0], grad, *averaged[1], grad_mul=1.0, grad_clip=math.inf, avg=avg,
           avg_weight=0.25, **hyper)
    for what, (p, states) in [("explicit defaults", explicit), ("no extras", implicit),
                              ("with an average", averaged)]:
        assert p.tobytes() == expected_param.tobytes(), f"{what}: param differs from the plain update"
        for j, expected in zip(slots, expected_states):
            assert states[j].reshape(-1).tobytes() == expected.tobytes(), f"{what}: state {j}"


# ---------------------------------------------------------------------------------------------
# multi_step == per-tensor calls, bit for bit
# ---------------------------------------------------------------------------------------------


def make_tensors(case, dtype, rng, shapes=LIST_SHAPES):
    name, raw = case
    spec = functional.SPECS[name]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [planted_grad(rng, s, dtype, p, raw) for s, p in zip(shapes, params)]
    states = []
    for s in shapes:
        state = initial_state(name, s, dtype, rng)
        states.append(tuple(state[k] for k in spec.state))
    avgs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return params, grads, states, avgs


def copies(tensors):
    params, grads, states, avgs = tensors
    return ([p.copy() for p in params], grads, [tuple(a.copy() for a in st) for st in states],
            [a.copy() for a in avgs])


@pytest.mark.parametrize("case, dtype, extras", case_grid(  # the list runs the parallel kernels
    DTYPES, [False, True], lambda backend, extras: True, size_ids=["defaults", "extras"]))
def test_multi_step_equals_per_tensor_calls(case, dtype, extras, rng):
    spec, hyper = hyper_for(case, 2)
    tensors = make_tensors(case, dtype, rng)
    common = dict(grad_mul=1.25, grad_clip=0.8, avg_weight=0.3) if extras else {}
    one, many = copies(tensors), copies(tensors)
    kernel = getattr(numba_backend, spec.kernel)
    for p, g, st, a in zip(*one):
        kernel(p, g, *st, avg=a if extras else None, **common, **hyper)
    numba_backend.multi_step(spec.kernel, many[0], many[1], many[2], many[3] if extras else None,
                             **common, **hyper)
    assert_bitwise_equal(one, many, spec, hyper, extras)


def assert_bitwise_equal(one, many, spec, hyper, averaged):
    for k, (p1, p2) in enumerate(zip(one[0], many[0])):
        assert p1.tobytes() == p2.tobytes(), f"params[{k}] differ"
        for j, (s1, s2) in enumerate(zip(one[2][k], many[2][k])):
            if spec.state[j] in spec.uses(hyper):
                assert s1.tobytes() == s2.tobytes(), f"states[{k}][{j}] differ"
        if averaged:
            assert one[3][k].tobytes() == many[3][k].tobytes(), f"avgs[{k}] differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_multi_step_python_table_equals_compiled_table(dtype, rng, monkeypatch):
    """The Python fallback of the table builder gives the same table, hence the same results."""
    case = ("adam", dict(lr=1e-2, weight_decay=0.01, amsgrad=True))
    spec, hyper = hyper_for(case, 4)
    tensors = make_tensors(case, dtype, rng)
    params, grads, states, avgs = tensors
    fast = multi.gather(params, grads, states, avgs, (0, 1, 2))
    slow = multi._gather_python(params, grads, states, avgs, (0, 1, 2), True, params[0].dtype)
    if multi.FAST_GATHER:
        np.testing.assert_array_equal(fast[0], slow[0])
        np.testing.assert_array_equal(fast[1], slow[1])
    one, many = copies(tensors), copies(tensors)
    numba_backend.multi_step(spec.kernel, *one, grad_mul=0.5, grad_clip=1.0, avg_weight=0.5, **hyper)
    monkeypatch.setattr(multi, "FAST_GATHER", False)
    numba_backend.multi_step(spec.kernel, *many, grad_mul=0.5, grad_clip=1.0, avg_weight=0.5,
                             **hyper)
    assert_bitwise_equal(one, many, spec, hyper, True)


def test_object_layout_is_checked_and_used_here():
    """On CPython with NumPy's struct layout the compiled table builder is active."""
    assert multi.FAST_GATHER == (multi.sys.implementation.name == "cpython")


def test_multi_step_takes_state_lists_subclasses_and_read_only_grads(rng):
    """Inputs the compiled builder does not take (an ndarray subclass, a read-only gradient view is
    fine) go through the Python builder with the same results."""

    class Sub(np.ndarray):
        pass

    case = ("sgd", dict(lr=0.1, momentum=0.9))
    spec, hyper = hyper_for(case)
    shapes = [(5,), (40000,), (0,)]
    tensors = make_tensors(case, np.float32, rng, shapes)
    one, many = copies(tensors), copies(tensors)
    for p, g, st in zip(one[0], one[1], one[2]):
        numba_backend.sgd_step(p, g, *st, **hyper)
    many[0][1] = many[0][1].view(Sub)
    grads = [g.copy() for g in many[1]]
    for g in grads:
        g.flags.writeable = False
    states = [list(st) for st in many[2]]
    numba_backend.multi_step("sgd_step", many[0], grads, states, None, **hyper)
    for k in range(3):
        assert np.asarray(many[0][k]).tobytes() == one[0][k].tobytes()
        assert states[k][0].tobytes() == one[2][k][0].tobytes()


def test_gather_rejects_what_the_kernels_cannot_take():
    """Backend input is validated by the API; the table builder still refuses, with a clear
    message, arrays it cannot hand to a kernel (instead of reading the wrong memory)."""
    p = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        multi.gather([p[:, ::2]], [np.zeros(12, np.float32)])
    with pytest.raises(ValueError, match="elements"):
        multi.gather([p], [np.zeros(23, np.float32)])
    with pytest.raises(ValueError, match="dtype"):
        multi.gather([p], [np.zeros(24, np.float64)])
    read_only = p.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        multi.gather([read_only], [p])
    with pytest.raises(ValueError, match="dtype"):
        multi.gather([p], [p.astype(">f4")])


def _float_grad(name, grad, param_name, param) -> None:
    check_array(name, grad, writeable=False)
    check_like(name, grad, param_name, param)


def _full_checks_pass(params, grads, written, check=_float_grad) -> bool:
    """What ``grads_match`` stands in for: the API's checks of a step's gradients (``check`` each
    gradient against its parameter, then no gradient meets a written array)."""
    try:
        for k, (p, g) in enumerate(zip(params, grads)):
            check(f"grads[{k}]", g, f"params[{k}]", p)
        check_disjoint({f"w{k}": a for k, a in enumerate(written)},
                       {f"grads[{k}]": g for k, g in enumerate(grads)})
    except (TypeError, ValueError):
        return False
    return True


def test_grads_match_agrees_with_the_full_checks(rng):
    """The compiled fast test of a step's gradients passes exactly where the full checks pass,
    except for ndarray subclasses, which it leaves to the full checks; the caller's lists and
    arrays are left as they were."""

    class Sub(np.ndarray):
        pass

    buffer = np.zeros(64, np.float32)
    params = [buffer[:12].reshape(3, 4), np.zeros(5, np.float32), np.zeros(0, np.float32)]
    state = [buffer[40:52], np.zeros(5, np.float32)]
    written = params + state
    intervals = multi.written_intervals(written)
    good = [np.ones((3, 4), np.float32), np.ones(5, np.float32), np.ones(0, np.float32)]
    cases = {
        "fresh arrays": good,
        "a tuple, the same arrays": tuple(good),
        "same buffer, between param and state": [buffer[20:32].reshape(3, 4), good[1], good[2]],
        "same buffer, right after the state": [buffer[52:64].reshape(3, 4), good[1], good[2]],
        "a 0-size gradient anywhere in a written buffer": [good[0], good[1], buffer[3:3]],
        "grad is a param": [params[0], good[1], good[2]],
        "grad overlaps a param's last element": [buffer[11:23].reshape(3, 4), good[1], good[2]],
        "grad overlaps a state's first element": [buffer[29:41].reshape(3, 4), good[1], good[2]],
        "grad is a state array": [good[0], state[1], good[2]],
        "other shape, same size": [np.ones(12, np.float32), good[1], good[2]],
        "other shape": [good[0], np.ones(6, np.float32), good[2]],
        "other rank": [good[0], np.ones((5, 1), np.float32), good[2]],
        "float64": [good[0], np.ones(5), good[2]],
        "big-endian": [good[0], np.ones(5, ">f4"), good[2]],
        "not C-contiguous": [np.ones((4, 3), np.float32).T, good[1], good[2]],
        "an ndarray subclass": [good[0].view(Sub), good[1], good[2]],
        "None": [good[0], None, good[2]],
        "a list": [good[0], [1.0] * 5, good[2]],
        "too short": good[:2],
    }
    for name, grads in cases.items():
        before = [None if g is None else np.array(g, copy=True) for g in grads]
        full = len(grads) == len(params) and _full_checks_pass(params, grads, written)
        expected = full and name != "an ndarray subclass"
        assert multi.grads_match(params, grads, 0, len(params), intervals) is expected, name
        assert all((a is None and b is None) or np.array_equal(a, b) for a, b in zip(before, grads)), name
    assert _full_checks_pass(params, cases["an ndarray subclass"], written)
    assert multi.grads_match(params, good, 1, 1, intervals)  # an empty range checks nothing
    bad = [params[0], good[1], good[2]]
    assert multi.grads_match(params, bad, 1, 3, intervals)  # only [lo, hi) is looked at
    assert not multi.grads_match(params, bad, 0, 3, intervals)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16], ids=["bfloat16", "float16"])
def test_grads_match_agrees_with_the_full_checks_for_16_bit_parameters(dtype):
    """A 16-bit parameter's gradient is of its dtype or float32; the compiled test passes exactly
    where the full checks of ``fastopt.precision`` pass, with the bytes counted at the gradient's
    own width."""
    other = np.float16 if dtype is ml_dtypes.bfloat16 else ml_dtypes.bfloat16
    buffer = np.zeros(64, dtype)  # 128 bytes; params[0] is bytes [64, 88)
    master = np.zeros(40, np.float32)
    params = [buffer[32:44].reshape(3, 4), np.zeros(5, dtype)]
    written = params + [master, np.zeros(5, np.uint8)]  # a master copy, 8-bit codes
    intervals = multi.written_intervals(written)
    good = [np.ones((3, 4), dtype), np.ones(5, dtype)]
    cases = {
        "its dtype": good,
        "float32": [np.ones((3, 4), np.float32), np.ones(5, np.float32)],
        "16-bit and float32 in one list": [good[0], np.ones(5, np.float32)],
        "16-bit, right after the param": [buffer[44:56].reshape(3, 4), good[1]],
        "16-bit, on the param's last element": [buffer[43:55].reshape(3, 4), good[1]],
        # bytes [24, 72): at 2 bytes an element it would end at 48, before the param
        "float32, its last elements on the param": [buffer[12:36].view(np.float32).reshape(3, 4), good[1]],
        "float32, right before the param": [buffer[8:32].view(np.float32).reshape(3, 4), good[1]],
        "float32 inside the master copy": [master[10:22].reshape(3, 4), good[1]],
        "float64": [np.ones((3, 4)), good[1]],
        "the other 16-bit dtype": [good[0], np.ones(5, other)],
        "big-endian float32": [good[0], np.ones(5, ">f4")],
        "other shape": [good[0], np.ones(6, dtype)],
        "not C-contiguous": [np.ones((4, 3), dtype).T, good[1]],
    }
    for name, grads in cases.items():
        expected = _full_checks_pass(params, grads, written, check_grad)
        assert multi.grads_match(params, grads, 0, len(params), intervals) is expected, name
    passing = {name for name, grads in cases.items() if _full_checks_pass(params, grads, written, check_grad)}
    assert passing == {"its dtype", "float32", "16-bit and float32 in one list", "16-bit, right after the param",
                       "float32, right before the param"}


def test_grads_match_says_no_without_the_object_reader(monkeypatch):
    """Where the compiled reader is not active, the fast test never passes (the full checks run)."""
    params = [np.zeros(3, np.float32)]
    intervals = multi.written_intervals(params)
    assert multi.grads_match(params, [np.ones(3, np.float32)], 0, 1, intervals)
    monkeypatch.setattr(multi, "FAST_GATHER", False)
    assert not multi.grads_match(params, [np.ones(3, np.float32)], 0, 1, intervals)


def test_multi_step_refuses_missing_lists_instead_of_reading_address_zero():
    p = [np.zeros(3, np.float32)]
    with pytest.raises(TypeError):
        numba_backend.multi_step("sgd_step", p, None, [(None,)], None, lr=0.1, momentum=0.0,
                                 nesterov=False, weight_decay=0.0, convention="textbook")
    with pytest.raises(TypeError):
        numba_backend.multi_step("sgd_step", p, p, None, None, lr=0.1, momentum=0.9,
                                 nesterov=False, weight_decay=0.0, convention="textbook")
    with pytest.raises((IndexError, TypeError, ValueError)):  # shorter lists than params
        numba_backend.multi_step("sgd_step", p + p, p, [(p[0],)] * 2, None, lr=0.1, momentum=0.0,
                                 nesterov=False, weight_decay=0.0, convention="textbook")


def test_multi_step_of_nothing_is_a_no_op():
    numba_backend.multi_step("adam_step", [], [], [], None, step=1, lr=1e-3, beta1=0.9, beta2=0.999,
                             eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False)


# ---------------------------------------------------------------------------------------------
# Gradient reductions
# ---------------------------------------------------------------------------------------------


def float64_sumsq(grads) -> float:
    return math.fsum(float(v) ** 2 for g in grads for v in g.astype(np.float64).reshape(-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grad_sumsq_accumulates_in_float64(dtype, rng):
    grads = [rng.standard_normal(s).astype(dtype) for s in LIST_SHAPES]
    grads[3] *= dtype(1e4)  # large and small terms: a float32 sum would lose the small ones
    expected = sum(float(np.dot(g.astype(np.float64).ravel(), g.astype(np.float64).ravel()))
                   for g in grads)
    result = numba_backend.grad_sumsq(grads)
    assert isinstance(result, float)
    assert result == pytest.approx(expected, rel=1e-12)
    small = [rng.standard_normal(s).astype(dtype) for s in [(3,), (0,), (10,)]]
    assert numba_backend.grad_sumsq(small) == pytest.approx(float64_sumsq(small), rel=1e-15)
    assert numba_backend.grad_sumsq([]) == 0.0
    assert numba_backend.grad_sumsq([np.zeros(0, dtype)]) == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bad, expected", [(np.inf, math.inf), (-np.inf, math.inf),
                                           (np.nan, math.nan)], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["first", "last", "middle-of-large"])
def test_grad_sumsq_is_non_finite_exactly_when_an_element_is(dtype, bad, expected, where, rng):
    grads = [rng.standard_normal(s).astype(dtype) for s in LIST_SHAPES]
    assert math.isfinite(numba_backend.grad_sumsq(grads))
    k, i = {"first": (1, 0), "last": (len(grads) - 1, -1), "middle-of-large": (6, 40000)}[where]
    grads[k].reshape(-1)[i] = bad
    result = numba_backend.grad_sumsq(grads)
    reference_result = reference.grad_sumsq(grads)
    if math.isnan(expected):
        assert math.isnan(result) and math.isnan(reference_result)
    else:
        assert result == expected == reference_result


def test_grad_sumsq_nan_wins_over_inf(rng):
    grads = [rng.standard_normal(100000).astype(np.float32) for _ in range(3)]
    grads[0][5] = np.inf
    grads[2][99999] = np.nan
    assert math.isnan(numba_backend.grad_sumsq(grads))


def test_grad_sumsq_float32_squares_beyond_float32_range_stay_finite():
    """3e38² overflows float32 but not float64: the sum is finite (and right)."""
    big = np.float32(3e38)
    grads = [np.full(1000, big, np.float32), np.array([-big], np.float32)]
    result = numba_backend.grad_sumsq(grads)
    assert math.isfinite(result)
    assert result == pytest.approx(1001 * float(big) ** 2, rel=1e-12)
    assert result == pytest.approx(reference.grad_sumsq(grads), rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grad_sumsq_does_not_depend_on_the_thread_count(dtype, rng):
    grads = [rng.standard_normal(s).astype(dtype) for s in LIST_SHAPES + [(2**20 + 3,)]]
    threads = numba.get_num_threads()
    results = []
    try:
        for n in sorted({1, threads}):
            numba.set_num_threads(n)
            results.append(numba_backend.grad_sumsq(grads))
            results.append(numba_backend.grad_sumsq(grads))
    finally:
        numba.set_num_threads(threads)
    assert len(set(results)) == 1, results


def test_grad_sumsq_mixed_dtypes(rng):
    grads = [rng.standard_normal(10).astype(np.float32), rng.standard_normal(20)]
    assert numba_backend.grad_sumsq(grads) == pytest.approx(float64_sumsq(grads), rel=1e-13)


@pytest.mark.parametrize("sumsq, max_norm, inv_scale", [
    (4.0, 1.0, 1.0), (4.0, 10.0, 1.0), (4.0, 1.0, 0.125), (0.0, 1.0, 1.0), (math.inf, 1.0, 1.0),
    (math.nan, 1.0, 1.0), (4.0, None, 0.25), (math.nan, None, 1.0), (1e300, 2.0, 1e-3),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grad_multiplier_matches_reference(sumsq, max_norm, inv_scale, dtype):
    result = numba_backend.grad_multiplier(sumsq, max_norm, inv_scale, np.dtype(dtype))
    expected = reference.grad_multiplier(sumsq, max_norm, inv_scale, np.dtype(dtype))
    assert isinstance(result, float)
    assert result == expected or (math.isnan(result) and math.isnan(expected))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("grad_mul", [0.1, 1.0, math.nan, 3.0])
def test_scale_grads_in_place(dtype, grad_mul, rng):
    grads = [rng.standard_normal(s).astype(dtype) for s in LIST_SHAPES]
    grads[2][0] = np.inf
    expected = [g * dtype(grad_mul) for g in grads]
    reference_grads = [g.copy() for g in grads]
    reference.scale_grads_(reference_grads, grad_mul)
    numba_backend.scale_grads_(grads, grad_mul)
    for g, e, r in zip(grads, expected, reference_grads):
        assert g.dtype == dtype
        assert g.tobytes() == e.tobytes() == r.tobytes()


def test_scale_grads_mixed_dtypes_and_empty(rng):
    grads = [rng.standard_normal(10).astype(np.float32), rng.standard_normal(20), np.zeros(0)]
    expected = [g * g.dtype.type(0.5) for g in grads]
    numba_backend.scale_grads_(grads, 0.5)
    numba_backend.scale_grads_([], 0.5)
    for g, e in zip(grads, expected):
        assert g.tobytes() == e.tobytes()


def test_array_helpers():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert numba_backend.owns(a) and not numba_backend.owns([1.0])
    assert np.array_equal(numba_backend.zeros_like(a), np.zeros_like(a))
    full = numba_backend.full_like(a, 0.5)
    assert full.dtype == a.dtype and np.all(full == 0.5)
    assert numba_backend.empty_like(a).shape == a.shape
    assert numba_backend.empty((4,), np.float64, a).dtype == np.float64
    copy = numba_backend.to_numpy(a)
    assert copy is not a and np.array_equal(copy, a)
    again = numba_backend.from_numpy(a.T, a)
    assert again.flags.c_contiguous and np.array_equal(again, a.T)


# ---------------------------------------------------------------------------------------------
# On-disk cache: kernels compiled in different processes, loaded together
# ---------------------------------------------------------------------------------------------

_CACHE_SCRIPT = """
import sys
import numpy as np
import fastopt.kernels.numba_cpu as nb
import fastopt.reference as ref
H = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
         decoupled_weight_decay=False, amsgrad=False)
S = dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, convention="textbook")
if sys.argv[1:] == ["gather"]:  # compile (and cache) the table builder only
    nb.multi.gather([np.zeros(3, np.float32)], [np.zeros(3, np.float32)])
for op in sys.argv[1:] if sys.argv[1:] != ["gather"] else []:
    results = []
    for backend in (nb, ref):
        p = np.linspace(-1, 1, 40, dtype=np.float32)
        g = np.linspace(0.5, -0.5, 40, dtype=np.float32)
        m, v = np.full(40, 0.1, np.float32), np.full(40, 0.2, np.float32)
        if op == "adam":
            backend.adam_step(p, g, m, v, None, **H)
        else:
            backend.sgd_step(p, g, None, **S)
        results.append(p)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7, err_msg=op)
"""


def test_kernels_cached_by_different_processes_load_together(tmp_path):
    """Every update's part runner is one template with its own constants and name
    (``runners.Runner``); compiled in separate processes and loaded from the disk cache into one,
    they must not be mistaken for one another (their symbol names must differ by more than
    numba's per-process counter)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "step.py"
    script.write_text(_CACHE_SCRIPT)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    # with the table builder cached first, the sgd-only and adam-only processes compile their
    # kernels in the same order, so numba numbers their functions alike
    for ops in (["gather"], ["sgd"], ["adam"], ["sgd", "adam"], ["adam", "sgd"]):
        run = subprocess.run([sys.executable, str(script), *ops], env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, f"{ops}: {run.stderr[-2000:]}"


def test_part_runners_have_distinct_names():
    """The cheap half of the check above: every part runner has its own qualified name."""
    runners = [r for _, k in vars(optim_kernels).items() if isinstance(k, optim_kernels._UpdateKernel)
               for r in k.variants]
    assert len({r.py_func.__qualname__ for r in runners}) == len(runners) == 30
