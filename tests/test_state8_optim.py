"""state_dtype="int8" in the optimizer classes: which tensors get 8-bit state, the "numba" step
against the reference, resume, memory, and bad input (fastopt.precision)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fastopt

SIZES = (5000, 100, 4096)  # 8-bit, float32 (below min_8bit_size), 8-bit exactly at the threshold


def _build(cls, backend, hyper, seed=0, **options):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(np.float32) for n in SIZES]
    return params, getattr(fastopt, cls)(params, **hyper, backend=backend, state_dtype="int8", **options)


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return [rng.standard_normal(n).astype(np.float32) for n in SIZES]


CONFIGS = [
    ("Adam", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("AdaGrad", dict(lr=0.1, initial_accumulator_value=0.1)),
    ("RMSProp", dict(lr=0.01, momentum=0.5)),
]


@pytest.mark.parametrize("cls, hyper", CONFIGS, ids=[c for c, _ in CONFIGS])
def test_large_tensors_keep_8_bit_state_and_match_the_reference_bit_for_bit(cls, hyper):
    runs = {}
    for backend in ("numba", "numpy"):
        params, opt = _build(cls, backend, hyper)
        for step in range(3):
            opt.step(_grads(step))
        runs[backend] = params, opt
    (got, opt), (want, ref) = runs["numba"], runs["numpy"]
    for k in (0, 2):  # the 8-bit tensors: the fused kernel equals dequantize → update → requantize
        np.testing.assert_array_equal(got[k], want[k])
        for name, value in opt.state[k].items():
            np.testing.assert_array_equal(value, ref.state[k][name], err_msg=f"state[{k}][{name!r}]")
        quantized = [name for name, value in opt.state[k].items() if getattr(value, "dtype", None) == np.uint8]
        assert quantized and all(f"{name}_absmax" in opt.state[k] for name in quantized)
    assert all(getattr(v, "dtype", np.float32) == np.float32 for v in opt.state[1].values())  # below the threshold


def test_adam_state_takes_about_2_bytes_per_parameter():
    n = 256 * 64
    param = np.zeros(n, np.float32)
    opt = fastopt.Adam([param], state_dtype="int8")
    opt.step([np.ones(n, np.float32)])
    state_bytes = sum(v.nbytes for v in opt.state[0].values() if isinstance(v, np.ndarray))
    assert state_bytes / n == 2 + 2 * 4 / 256  # m and v codes, one float32 absmax each per 256 elements
    ref = fastopt.Adam([np.zeros(n, np.float32)])
    ref.step([np.ones(n, np.float32)])
    assert sum(v.nbytes for v in ref.state[0].values() if isinstance(v, np.ndarray)) / n == 8


def test_resume_from_a_state_dict_is_bit_identical():
    params_a, opt_a = _build("Adam", "numba", dict(lr=1e-2))
    for step in range(4):
        opt_a.step(_grads(step))
    params_b, opt_b = _build("Adam", "numba", dict(lr=1e-2))
    for step in range(2):
        opt_b.step(_grads(step))
    saved = opt_b.state_dict()
    assert saved["state"][0]["m"].dtype == np.uint8 and saved["state"][0]["m_absmax"].dtype == np.float32
    params_c, opt_c = _build("Adam", "numba", dict(lr=1e-2))
    for p, q in zip(params_c, params_b):
        p[...] = q
    opt_c.load_state_dict(saved)
    for step in range(2, 4):
        opt_c.step(_grads(step))
    for p, q in zip(params_a, params_c):
        np.testing.assert_array_equal(p, q)
    plain = fastopt.Adam([np.zeros(n, np.float32) for n in SIZES])  # float32 state cannot take 8-bit codes
    with pytest.raises(ValueError, match=r"state\[0\]\['m'\] must have .* float32, got .*uint8.*state_dtype='int8'"):
        plain.load_state_dict(saved)


def test_min_8bit_size_picks_the_tensors():
    params, opt = _build("Adam", "numba", dict(lr=1e-2), min_8bit_size=0)
    opt.step(_grads(0))
    assert all(opt.state[k]["m"].dtype == np.uint8 for k in range(3))


def test_bad_input_raises_before_anything_changes():
    with pytest.raises(ValueError, match="state_dtype='int8' is for SGD with momentum.*not adadelta"):
        fastopt.AdaDelta([np.zeros(5000, np.float32)], state_dtype="int8")
    with pytest.raises(ValueError, match="not delta_bar_delta"):
        fastopt.DeltaBarDelta([np.zeros(5000, np.float32)], lr=0.1, kappa=0.1, phi=0.1, gamma=0.5, state_dtype="int8")
    with pytest.raises(ValueError, match="amsgrad"):
        fastopt.Adam([np.zeros(5000, np.float32)], amsgrad=True, state_dtype="int8")
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        fastopt.Adam([np.zeros(5000, np.float32)], state_dtype="int4")
    with pytest.raises(ValueError, match="min_8bit_size"):
        fastopt.Adam([np.zeros(5000, np.float32)], state_dtype="int8", min_8bit_size=-1)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype float64: state_dtype='int8' is for float32, bfloat16"):
        fastopt.Adam([np.zeros(5000, np.float64)], state_dtype="int8")
    # a configuration changed to one without 8-bit state: the step raises and nothing is written
    params = [np.ones(5000, np.float32), np.ones(5000, np.float32)]
    opt = fastopt.Adam([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1, state_dtype="int8")
    opt.step([np.ones(5000, np.float32)] * 2)
    before = [p.copy() for p in params], [{k: np.copy(v) for k, v in s.items()} for s in opt.state]
    opt.param_groups[1]["amsgrad"] = True
    with pytest.raises(ValueError, match="param group 1: state_dtype='int8': amsgrad"):
        opt.step([np.ones(5000, np.float32)] * 2)
    for p, q in zip(params, before[0]):
        np.testing.assert_array_equal(p, q)
    for s, t in zip(opt.state, before[1]):
        for key in t:
            np.testing.assert_array_equal(s[key], t[key])


def test_the_functional_8_bit_step_is_the_optimizer_s_step():
    rng = np.random.default_rng(5)
    n = 1000
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    param = p0.copy()
    state = {key: fastopt.quantize_blockwise(np.zeros(n, np.float32), signed=signed)
             for key, signed in (("m", True), ("v", False))}
    for t, g in enumerate(grads, 1):
        fastopt.functional.step_8bit("adamw", param, g, state, step=t, lr=1e-2)
    twin = p0.copy()
    opt = fastopt.AdamW([twin], lr=1e-2, state_dtype="int8", min_8bit_size=0)
    for g in grads:
        opt.step([g])
    np.testing.assert_array_equal(param, twin)
    np.testing.assert_array_equal(state["m"][0], opt.state[0]["m"])
    np.testing.assert_array_equal(state["v"][1], opt.state[0]["v_absmax"])


def test_the_functional_8_bit_step_checks_before_writing():
    param = np.ones(300, np.float32)
    state = {"m": fastopt.quantize_blockwise(np.zeros(300, np.float32), signed=True),
             "v": fastopt.quantize_blockwise(np.zeros(300, np.float32), signed=False)}
    before = param.copy(), {k: (c.copy(), a.copy()) for k, (c, a) in state.items()}
    g = np.ones(300, np.float32)
    with pytest.raises(ValueError, match="name must be one of"):
        fastopt.functional.step_8bit("adadelta", param, g, state)
    with pytest.raises(ValueError, match=r"state must map \['m', 'v'\]"):
        fastopt.functional.step_8bit("adam", param, g, {"m": state["m"]}, step=1)
    with pytest.raises(ValueError, match="amsgrad"):
        fastopt.functional.step_8bit("adam", param, g, state, step=1, amsgrad=True)
    with pytest.raises(ValueError, match=r"state\['v'\] absmax must have dtype float32 and shape \(2,\)"):
        fastopt.functional.step_8bit("adam", param, g, {"m": state["m"], "v": (state["v"][0], np.zeros(3, np.float32))},
                                     step=1)
    with pytest.raises(ValueError, match="must not share memory"):
        fastopt.functional.step_8bit("adam", param, g, {"m": state["m"], "v": (state["v"][0], state["m"][1])}, step=1)
    with pytest.raises(TypeError, match="float32"):
        fastopt.functional.step_8bit("adam", param.astype(np.float64), g.astype(np.float64), state, step=1)
    np.testing.assert_array_equal(param, before[0])
    for key, (c, a) in before[1].items():
        np.testing.assert_array_equal(state[key][0], c)
        np.testing.assert_array_equal(state[key][1], a)


BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("options, grad_dtype", [
    (dict(), BF16),
    (dict(master_weights=False, rounding="stochastic", seed=3), np.float32),
    (dict(master_weights=False), BF16),
], ids=["master", "stochastic-float32-grads", "nearest"])
def test_16_bit_parameters_with_8_bit_state_match_the_reference(options, grad_dtype):
    """One fused pass: decode θ (or read its master copy), dequantize, update, requantize, encode θ.
    Two tensors take the 8-bit kernel (each rounds stochastically with its own key) and match bit
    for bit; the third takes the float32-state kernel (``test_mixed_precision.py`` checks it)."""
    runs = {}
    for backend in ("numba", "numpy"):
        rng = np.random.default_rng(7)
        params = [rng.standard_normal(n).astype(BF16) for n in (5000, 4500, 300)]
        opt = fastopt.Adam(params, lr=1e-2, backend=backend, state_dtype="int8", **options)
        for step in range(3):
            opt.step([np.random.default_rng(50 + step).standard_normal(p.shape).astype(grad_dtype) for p in params])
        runs[backend] = params, opt
    (got, opt), (want, ref) = runs["numba"], runs["numpy"]
    assert opt.state[1]["m"].dtype == np.uint8 and opt.state[2]["m"].dtype == np.float32
    for k in range(2):
        np.testing.assert_array_equal(got[k].view(np.uint16), want[k].view(np.uint16), err_msg=f"param {k}")
        for name, value in opt.state[k].items():
            np.testing.assert_array_equal(value, ref.state[k][name], err_msg=f"{name} of param {k}")
    if options.get("master_weights", True):
        assert opt.state[0]["master"].dtype == np.float32


@pytest.mark.parametrize("cls, hyper, param_dtype", [
    (*CONFIGS[0], np.float32), (*CONFIGS[0], BF16), (*CONFIGS[2], np.float32), (*CONFIGS[4], np.float32),
], ids=["Adam-float32", "Adam-bfloat16", "SGD-float32", "RMSProp-float32"])
def test_bfloat16_state_matches_the_reference_bit_for_bit(cls, hyper, param_dtype):
    runs = {}
    for backend in ("numba", "numpy"):
        rng = np.random.default_rng(8)
        params = [rng.standard_normal(n).astype(param_dtype) for n in (700, 3)]
        opt = getattr(fastopt, cls)(params, **hyper, backend=backend, state_dtype="bfloat16")
        for step in range(3):
            opt.step([np.random.default_rng(60 + step).standard_normal(p.shape).astype(param_dtype) for p in params])
        runs[backend] = params, opt
    (got, opt), (want, ref) = runs["numba"], runs["numpy"]
    for k in range(2):  # every size: bfloat16 state has no minimum
        np.testing.assert_array_equal(got[k].view(np.uint8), want[k].view(np.uint8))
        states = {n: v for n, v in opt.state[k].items() if n not in ("step", "master")}
        assert states and all(v.dtype == BF16 for v in states.values())
        for name, value in opt.state[k].items():
            np.testing.assert_array_equal(np.asarray(value).view(np.uint8) if isinstance(value, np.ndarray) else value,
                                          np.asarray(ref.state[k][name]).view(np.uint8)
                                          if isinstance(value, np.ndarray) else ref.state[k][name])


def test_bfloat16_state_takes_4_bytes_per_adam_parameter_and_resumes():
    n = 2048
    param = np.zeros(n, np.float32)
    opt = fastopt.Adam([param], lr=0.1, state_dtype="bfloat16")
    opt.step([np.ones(n, np.float32)])
    assert sum(v.nbytes for v in opt.state[0].values() if isinstance(v, np.ndarray)) / n == 4
    twin = param.copy()
    other = fastopt.Adam([twin], lr=0.1, state_dtype="bfloat16")
    other.load_state_dict(opt.state_dict())
    g = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    opt.step([g])
    other.step([g])
    np.testing.assert_array_equal(param, twin)
    float32_state = fastopt.Adam([np.zeros(n, np.float32)])
    float32_state.step([np.ones(n, np.float32)])
    with pytest.raises(ValueError, match=r"state\[0\]\['m'\] must have shape \(2048,\) and dtype bfloat16"):
        fastopt.Adam([np.zeros(n, np.float32)], state_dtype="bfloat16").load_state_dict(float32_state.state_dict())
