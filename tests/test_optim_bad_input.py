"""Bad input raises ValueError/TypeError naming the argument, before anything is modified."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import functional


def setup(rng, cls=fastopt.Adam, **kw):
    params = [rng.standard_normal(6), rng.standard_normal((2, 3))]
    opt = cls(params, **({"lr": 0.1} | kw))
    opt.step([rng.standard_normal(6), rng.standard_normal((2, 3))])  # state exists
    return opt, params


def snapshot(opt, params):
    return [p.copy() for p in params], opt.state_dict()


def assert_unchanged(opt, params, snap):
    old_params, old = snap
    for p, q in zip(params, old_params):
        np.testing.assert_array_equal(p, q)
    new = opt.state_dict()
    assert new["param_groups"] == old["param_groups"]
    assert new["state"].keys() == old["state"].keys()
    for k, entry in old["state"].items():
        assert new["state"][k].keys() == entry.keys()
        for name, value in entry.items():
            np.testing.assert_array_equal(new["state"][k][name], value)


def good_grads(rng):
    return [rng.standard_normal(6), rng.standard_normal((2, 3))]


STEP_CASES = {
    "too few grads": (lambda g, p: g[:1], ValueError, "grads must have one array per param"),
    "too many grads": (lambda g, p: g + [g[0]], ValueError, "grads must have one array per param"),
    "grads not a list": (lambda g, p: g[0], TypeError, "grads must be a list"),
    "None grad": (lambda g, p: [g[0], None], TypeError, r"grads\[1\] must be a numpy.ndarray or a CUDA device array, got None"),
    "list grad": (lambda g, p: [g[0], g[1].tolist()], TypeError, r"grads\[1\] must be a numpy.ndarray"),
    "shape mismatch": (lambda g, p: [g[0], g[1].reshape(3, 2)], ValueError, r"grads\[1\] must have the shape"),
    "dtype mismatch": (lambda g, p: [g[0], g[1].astype(np.float32)], TypeError, r"grads\[1\] must have the dtype"),
    "integer grad": (lambda g, p: [g[0], g[1].astype(np.int64)], TypeError, r"grads\[1\] must have dtype float32 or float64"),
    "non-contiguous grad": (lambda g, p: [g[0], np.asfortranarray(g[1])], ValueError, r"grads\[1\] must be C-contiguous"),
    "grad is the param": (lambda g, p: [g[0], p[1]], ValueError, r"must not share memory"),
    "grad is a param's state": (lambda g, p: g, None, None),  # filled in below
}


@pytest.mark.parametrize("case", [c for c in STEP_CASES if c != "grad is a param's state"])
def test_bad_grads_raise_and_change_nothing(case, rng):
    make_grads, error, message = STEP_CASES[case]
    opt, params = setup(rng)
    snap = snapshot(opt, params)
    with pytest.raises(error, match=message):
        opt.step(make_grads(good_grads(rng), params))
    assert_unchanged(opt, params, snap)


def test_grad_aliasing_state_raises(rng):
    opt, params = setup(rng)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="must not share memory"):
        opt.step([good_grads(rng)[0], opt.state[1]["m"]])
    assert_unchanged(opt, params, snap)


@pytest.mark.parametrize(
    "key, value, error, message",
    [
        ("lr", -0.1, ValueError, "lr must be >= 0"),
        ("lr", float("nan"), ValueError, "lr must be finite"),
        ("lr", "0.1", TypeError, "lr must be a real number"),
        ("betas", (0.9, 1.0), ValueError, "beta2 must be < 1"),
        ("betas", (-0.1, 0.9), ValueError, "beta1 must be >= 0"),
        ("betas", 0.9, TypeError, "betas must be a pair"),
        ("eps", 0.0, ValueError, "eps must be > 0"),
        ("eps", -1e-8, ValueError, "eps must be > 0"),
        ("weight_decay", -1.0, ValueError, "weight_decay must be >= 0"),
        ("amsgrad", 1, TypeError, "amsgrad must be a bool"),
    ],
)
def test_bad_hyperparameter_in_a_later_group_raises_before_any_update(key, value, error, message, rng):
    params = [rng.standard_normal(4), rng.standard_normal(4)]
    opt = fastopt.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    opt.step([rng.standard_normal(4), rng.standard_normal(4)])
    snap = snapshot(opt, params)
    opt.param_groups[1][key] = value
    with pytest.raises(error, match=f"param group 1: {message}"):
        opt.step([rng.standard_normal(4), rng.standard_normal(4)])
    opt.param_groups[1][key] = snap[1]["param_groups"][1][key]
    assert_unchanged(opt, params, snap)


@pytest.mark.parametrize(
    "cls, kwargs, error, message",
    [
        (fastopt.SGD, dict(lr=-1.0), ValueError, "lr must be >= 0"),
        (fastopt.SGD, dict(lr=0.1, momentum=1.0), ValueError, "momentum must be < 1"),
        (fastopt.SGD, dict(lr=0.1, nesterov=True), ValueError, "nesterov=True requires momentum > 0"),
        (fastopt.SGD, dict(lr=0.1, momentu=0.9), TypeError, "momentu"),
        (fastopt.Adam, dict(betas=(0.9, 1.5)), ValueError, "beta2 must be < 1"),
        (fastopt.Adam, dict(eps=0.0), ValueError, "eps must be > 0"),
        (fastopt.AdaGrad, dict(lr=0.1, initial_accumulator_value=-1.0), ValueError, "initial_accumulator_value"),
        (fastopt.RMSProp, dict(lr=0.1, rho=1.0), ValueError, "rho must be < 1"),
        (fastopt.RMSProp, dict(lr=0.1, momentum=0.9, nesterov=True, convention="torch"), ValueError, "no Nesterov"),
        (fastopt.AdaDelta, dict(eps=float("inf")), ValueError, "eps must be finite"),
        (fastopt.DeltaBarDelta, dict(lr=0.1, kappa=0.1, phi=1.5, gamma=0.5), ValueError, "phi must be <= 1"),
        (fastopt.DeltaBarDelta, dict(lr=0.1, kappa=0.1, phi=0.5, gamma=0.5, convention="torch"), ValueError,
         "only with convention='textbook'"),
        (fastopt.Adam, dict(convention="keras"), ValueError, "convention must be one of"),
        (fastopt.Adam, dict(backend="tpu"), ValueError, "backend must be one of"),
        (fastopt.Adam, dict(backend=3), TypeError, "backend must be a str"),
    ],
)
def test_bad_constructor_arguments(cls, kwargs, error, message, rng):
    with pytest.raises(error, match=message):
        cls([rng.standard_normal(3)], **kwargs)


@pytest.mark.parametrize(
    "params, error, message",
    [
        (lambda rng: [np.arange(3)], TypeError, r"params\[0\] must have dtype float32 or float64"),
        (lambda rng: [rng.standard_normal((4, 4))[:, ::2]], ValueError, r"params\[0\] must be C-contiguous"),
        (lambda rng: [np.frombuffer(bytes(24), dtype=np.float64)], ValueError, r"params\[0\] must be writeable"),
        (lambda rng: [[1.0, 2.0]], TypeError, r"params\[0\] must be a numpy.ndarray"),
        (lambda rng: np.zeros(3), TypeError, "params must be a list"),
        (lambda rng: [], ValueError, "params must not be empty"),
        (lambda rng: (lambda a: [a, a])(np.zeros(3)), ValueError, "must not share memory"),
        (lambda rng: (lambda a: [a[:2], a[1:]])(np.zeros(3)), ValueError, "must not share memory"),
    ],
)
def test_bad_params(params, error, message, rng):
    with pytest.raises(error, match=message):
        fastopt.SGD(params(rng), lr=0.1)


def test_functional_bad_input_changes_nothing(rng):
    p, g, m, v = (rng.standard_normal(5) for _ in range(4))
    before = [a.copy() for a in (p, g, m, v)]
    with pytest.raises(ValueError, match="step must be >= 1"):
        functional.adam_step(p, g, m, v, step=0, lr=0.1)
    with pytest.raises(TypeError, match="v_max must be a numpy.ndarray with these options"):
        functional.adam_step(p, g, m, v, step=1, lr=0.1, amsgrad=True)
    with pytest.raises(TypeError, match="velocity must be a numpy.ndarray"):
        functional.sgd_step(p, g, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="m and param must not share memory|param and m must not share memory"):
        functional.adam_step(p, g, p, v, step=1, lr=0.1)
    with pytest.raises(ValueError, match="v must have the shape of param"):
        functional.adam_step(p, g, m, v[:4], step=1, lr=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'beta'"):
        functional.adam_step(p, g, m, v, step=1, lr=0.1, beta=0.9)
    for a, b in zip((p, g, m, v), before):
        np.testing.assert_array_equal(a, b)


def test_read_only_grad_is_accepted_but_read_only_state_is_not(rng):
    p, m, v = (rng.standard_normal(5) for _ in range(3))
    g = rng.standard_normal(5)
    g.flags.writeable = False
    functional.adam_step(p, g, m, v, step=1, lr=0.1)
    m.flags.writeable = False
    with pytest.raises(ValueError, match="m must be writeable"):
        functional.adam_step(p, g, m, v, step=2, lr=0.1)


def test_nan_gradients_propagate(rng):
    """No NaN policy yet (documented): a NaN gradient element makes that parameter element NaN."""
    p = rng.standard_normal(4)
    g = rng.standard_normal(4)
    g[2] = np.nan
    fastopt.Adam([p], lr=0.1).step([g])
    assert np.isnan(p[2]) and np.isfinite(np.delete(p, 2)).all()
