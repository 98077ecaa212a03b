"""Optimizers with 8-bit state (``docs/algorithms.md``, "Optimizers with 8-bit state"): the fused
numba kernels (``kernels/numba_cpu/state8.py``) against the reference (``fastopt/reference/state8.py``:
dequantize, reference float32 update, requantize) over several steps, θ and θ̂ bit for bit and codes
and absmax equal; unsupported configurations rejected before anything is written; and 8-bit Adam
against float32 Adam on a least-squares problem, within the bound derived in the docs.

Small sizes, plus one list just above ``multi.SERIAL_BELOW`` for the parallel kernel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastopt.kernels.numba_cpu import multi
from fastopt.kernels.numba_cpu import state8 as kernel8
from fastopt.reference import optim as reference_optim
from fastopt.reference import quantize as reference_quantize
from fastopt.reference import state8 as reference8

ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
            amsgrad=False)
SGD = dict(lr=1e-2, momentum=0.9, nesterov=False, weight_decay=0.0, convention="textbook")
RMSPROP = dict(lr=1e-2, rho=0.99, eps=1e-8, momentum=0.0, nesterov=False, centered=False,
               weight_decay=0.0, convention="textbook")

# (op, hyperparameters): every supported configuration
CONFIGS = [
    ("adam_step", ADAM),
    ("adam_step", {**ADAM, "weight_decay": 0.1}),
    ("adam_step", {**ADAM, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("sgd_step", SGD),
    ("sgd_step", {**SGD, "convention": "torch", "weight_decay": 0.01}),
    ("sgd_step", {**SGD, "nesterov": True}),
    ("sgd_step", {**SGD, "nesterov": True, "convention": "torch"}),
    ("adagrad_step", dict(lr=1e-2, eps=1e-10, weight_decay=0.01)),
    ("rmsprop_step", RMSPROP),
    ("rmsprop_step", {**RMSPROP, "convention": "torch"}),
    ("rmsprop_step", {**RMSPROP, "momentum": 0.9}),
    ("rmsprop_step", {**RMSPROP, "momentum": 0.9, "convention": "torch", "weight_decay": 0.01}),
    ("rmsprop_step", {**RMSPROP, "momentum": 0.9, "nesterov": True}),
]
IDS = [f"{op}-{i}" for i, (op, _) in enumerate(CONFIGS)]
UNSUPPORTED = [
    ("adam_step", {**ADAM, "amsgrad": True}),
    ("sgd_step", {**SGD, "momentum": 0.0}),
    ("rmsprop_step", {**RMSPROP, "centered": True}),
    ("rmsprop_step", {**RMSPROP, "centered": True, "momentum": 0.9}),
    ("rmsprop_step", {**RMSPROP, "momentum": 0.9, "nesterov": True, "convention": "torch"}),
    ("adadelta_step", dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, convention="torch")),
    ("delta_bar_delta_step", dict(kappa=0.01, phi=0.1, gamma=0.7)),
    ("adam_step", {**ADAM, "momentum": 0.9}),  # a keyword the op does not take
]
STATE_LENGTH = {"adam_step": 3, "sgd_step": 1, "adagrad_step": 1, "rmsprop_step": 3}
SIZES = [1, 255, 257, 1000]


def with_step(op, hyper, step):
    return {**hyper, "step": step} if op == "adam_step" else hyper


def initial_state(rng, op, hyper, sizes, block=256):
    """Per tensor, the op's state tuple: random states over several decades, quantized by the
    reference (so the first step already dequantizes something nontrivial)."""
    layout = reference8.state8_layout(op, **with_step(op, hyper, 1))
    states = []
    for n in sizes:
        state = [None] * STATE_LENGTH[op]
        for slot, signed in layout:
            x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0, n)).astype(np.float32)
            if not signed:
                x = np.abs(x) * 1e-3
            codes = np.empty(n, np.uint8)
            absmax = np.empty(-(-n // block), np.float32)
            reference_quantize.quantize_blockwise(x, codes, absmax, signed=signed, block=block)
            state[slot] = (codes, absmax)
        states.append(tuple(state))
    return states


def copied(states):
    return [tuple(None if s is None else (s[0].copy(), s[1].copy()) for s in state) for state in states]


def assert_same(params, params_ref, states, states_ref, avgs=None, avgs_ref=None):
    for t, (p, q) in enumerate(zip(params, params_ref)):
        np.testing.assert_array_equal(p.view(np.uint32), q.view(np.uint32), err_msg=f"θ of tensor {t}")
        if avgs is not None:
            np.testing.assert_array_equal(avgs[t].view(np.uint32), avgs_ref[t].view(np.uint32),
                                          err_msg=f"θ̂ of tensor {t}")
    for t, (state, state_ref) in enumerate(zip(states, states_ref)):
        for slot, (s, r) in enumerate(zip(state, state_ref)):
            if s is None:
                assert r is None
                continue
            np.testing.assert_array_equal(s[0], r[0], err_msg=f"codes of tensor {t}, state {slot}")
            np.testing.assert_array_equal(s[1].view(np.uint32), r[1].view(np.uint32),
                                          err_msg=f"absmax of tensor {t}, state {slot}")


def run_both(rng, op, hyper, sizes, steps, *, averaged=False, grad_mul=1.0, grad_clip=math.inf,
             nan_at=None):
    params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    states = initial_state(rng, op, hyper, sizes)
    avgs = [p.copy() for p in params] if averaged else None
    params_ref, states_ref = [p.copy() for p in params], copied(states)
    avgs_ref = None if avgs is None else [a.copy() for a in avgs]
    extras = dict(grad_mul=grad_mul, grad_clip=grad_clip, avg_weight=0.25 if averaged else 0.0)
    for step in range(1, steps + 1):
        grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(np.float32) for n in sizes]
        if nan_at is not None and step == 2:
            grads[nan_at[0]][nan_at[1]] = np.nan
        kernel8.state8_step(op, params, grads, states, avgs, **extras, **with_step(op, hyper, step))
        reference8.state8_step(op, params_ref, grads, states_ref, avgs_ref, **extras,
                               **with_step(op, hyper, step))
        assert_same(params, params_ref, states, states_ref, avgs, avgs_ref)
    return params, states


@pytest.mark.parametrize("op, hyper", CONFIGS, ids=IDS)
def test_kernel_matches_reference(op, hyper):
    rng = np.random.default_rng(13)
    run_both(rng, op, hyper, SIZES, steps=4)


@pytest.mark.parametrize("op, hyper, averaged", [(*CONFIGS[0], True), (*CONFIGS[4], False),
                                                 (*CONFIGS[11], False)], ids=["adam", "sgd", "rmsprop"])
def test_extras_match_reference(op, hyper, averaged):
    """grad_mul and grad_clip (which clamps some of the large gradients), and the Polyak average
    (one op only: each averaged kernel is one more compile)."""
    rng = np.random.default_rng(14)
    run_both(rng, op, hyper, SIZES, steps=3, averaged=averaged, grad_mul=0.5, grad_clip=2.0)


def test_nan_gradient_poisons_its_block_only():
    rng = np.random.default_rng(15)
    params, states = run_both(rng, "adam_step", ADAM, [300, 600], steps=3, nan_at=(1, 260))
    m_absmax = states[1][0][1]
    assert np.isnan(m_absmax[1]) and np.isfinite(m_absmax[[0, 2]]).all()
    assert np.isfinite(states[0][0][1]).all()


def test_parallel_kernel_matches_reference():
    """A list above multi.SERIAL_BELOW runs the parallel kernel (several parts)."""
    rng = np.random.default_rng(16)
    sizes = [multi.SERIAL_BELOW - 300, 1001]
    assert sum(sizes) >= multi.SERIAL_BELOW
    run_both(rng, "adam_step", ADAM, sizes, steps=2)


def test_empty_lists_and_tensors():
    rng = np.random.default_rng(17)
    run_both(rng, "adam_step", ADAM, [0, 5, 0], steps=2)
    kernel8.state8_step("adam_step", [], [], [], None, step=1, **ADAM)


@pytest.mark.parametrize("op, hyper", UNSUPPORTED, ids=[f"{op}-{i}" for i, (op, _) in enumerate(UNSUPPORTED)])
@pytest.mark.parametrize("backend", [kernel8, reference8], ids=["numba", "numpy"])
def test_unsupported_raises_before_writing(backend, op, hyper):
    n = 300
    params = [np.ones(n, np.float32)]
    grads = [np.ones(n, np.float32)]
    pair = (np.full(n, 200, np.uint8), np.ones(2, np.float32))
    states = [(pair, (pair[0].copy(), pair[1].copy()), (pair[0].copy(), pair[1].copy()))]
    before = copied(states)
    hyper = with_step(op, hyper, 1)
    assert backend.state8_supported(op, **hyper) is not None
    with pytest.raises(ValueError):
        backend.state8_step(op, params, grads, states, None, **hyper)
    assert (params[0] == 1).all()
    assert_same(params, [np.ones(n, np.float32)], states, before)


@pytest.mark.parametrize("backend", [kernel8, reference8], ids=["numba", "numpy"])
def test_bad_array_raises_before_writing(backend):
    """The second tensor's absmax is too short: nothing of the first tensor is written either."""
    sizes = [300, 300]
    rng = np.random.default_rng(18)
    params = [np.ones(n, np.float32) for n in sizes]
    states = initial_state(rng, "adam_step", ADAM, sizes)
    states[1] = ((states[1][0][0], states[1][0][1][:1]), states[1][1], None)
    before = copied(states)
    with pytest.raises(ValueError, match="absmax"):
        backend.state8_step("adam_step", params, [p.copy() for p in params], states, None, step=1, **ADAM)
    assert_same(params, [np.ones(n, np.float32) for n in sizes], states, before)


def test_support_rules_agree():
    assert kernel8.SUPPORTED == reference8.SUPPORTED
    for op, hyper in CONFIGS + UNSUPPORTED:
        hyper = with_step(op, hyper, 1)
        assert kernel8.state8_supported(op, **hyper) == reference8.state8_supported(op, **hyper)
        if kernel8.state8_supported(op, **hyper) is None:
            assert kernel8.state8_layout(op, **hyper) == reference8.state8_layout(op, **hyper)
            # the kernel plan quantizes the states the shared rules allocate, with their maps
            assert kernel8._PLANS[op](**hyper)[1] == kernel8.state8_layout(op, **hyper)


def test_float32_kernel_has_no_float64_arithmetic():
    from test_kernel_float32 import native_ir

    k = kernel8._adam8.averaged.runner  # the part runner: the launcher only calls it (``runners.py``)
    functions = native_ir(k, k.signatures[0])
    assert any("llvm.sqrt.f32" in f or "@sqrtf(float" in f for f in functions)
    for f in functions:
        assert "double" not in f and "fpext" not in f, f.splitlines()[0][:100]


# ---------------------------------------------------------------------------------------------
# 8-bit Adam against float32 Adam (docs/algorithms.md, "Optimizers with 8-bit state", "Error")
# ---------------------------------------------------------------------------------------------


def top_decade_relative_half_gap(signed: bool) -> float:
    """max |x − y| / |x| over |x| ∈ [a/10, a] (y = x's decoded value): the largest gap of the map
    among values ≥ 0.1, halved, over 0.1."""
    m = reference_quantize.dynamic_map(signed).astype(np.float64)
    top = m[m >= 0.1 - 1e-9]
    return float(np.max(np.diff(top))) / 2 / 0.1


def test_8bit_adam_tracks_float32_adam():
    """Least squares with 10,000 parameters: 100 independent groups of 100 parameters, each
    ½‖A_k θ_k − b_k‖² with a 200 × 100 Gaussian A_k (overdetermined, well conditioned), θ₀ = 0.
    500 steps of float32 Adam (reference) and 8-bit Adam (kernel), lr 1e-3, the same problem.
    Bound (first order, see the docs): ‖θ₈ − θ₃₂‖ / ‖θ₃₂‖ ≤ ρ · P with ρ = r_m + r_v / 2 from the
    maps and P = (path length of the float32 run) / ‖θ₃₂ − θ₀‖, measured."""
    rng = np.random.default_rng(2022)
    groups, rows, cols = 100, 200, 100
    a = (rng.standard_normal((groups, rows, cols)) / np.sqrt(rows)).astype(np.float32)
    target = (0.1 * rng.standard_normal((groups, cols))).astype(np.float32)
    b = np.einsum("kij,kj->ki", a, target)

    def grad(theta):
        residual = np.einsum("kij,kj->ki", a, theta.reshape(groups, cols)) - b
        return np.einsum("kij,ki->kj", a, residual).reshape(-1).astype(np.float32)

    n, steps, hyper = groups * cols, 500, {**ADAM, "lr": 1e-3}
    theta32, m32, v32 = (np.zeros(n, np.float32) for _ in range(3))
    theta8 = np.zeros(n, np.float32)
    blocks = -(-n // 256)
    state = ((np.full(n, 127, np.uint8), np.zeros(blocks, np.float32)),
             (np.zeros(n, np.uint8), np.zeros(blocks, np.float32)), None)
    path = 0.0
    for step in range(1, steps + 1):
        before = theta32.copy()
        reference_optim.adam_step(theta32, grad(theta32), m32, v32, None, step=step, **hyper)
        path += float(np.linalg.norm((theta32 - before).astype(np.float64)))
        kernel8.state8_step("adam_step", [theta8], [grad(theta8)], [state], None, step=step, **hyper)
    error = float(np.linalg.norm((theta8 - theta32).astype(np.float64)) / np.linalg.norm(theta32.astype(np.float64)))
    rho = top_decade_relative_half_gap(True) + top_decade_relative_half_gap(False) / 2
    bound = rho * path / float(np.linalg.norm(theta32.astype(np.float64)))
    print(f"8-bit vs float32 Adam after {steps} steps: relative error {error:.5f}, bound {bound:.5f} "
          f"(rho {rho:.5f}, path ratio {bound / rho:.4f})")
    assert 0 < error <= bound
    # both runs solved the problem: the 8-bit run's loss within 10% of the float32 run's
    loss32, loss8 = (float(np.linalg.norm(grad(x))) for x in (theta32, theta8))
    assert loss8 <= 1.1 * loss32 + 1e-6, (loss8, loss32)
