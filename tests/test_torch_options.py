"""torch's maximize, SGD's dampening and Adagrad's lr_decay as options of the NumPy-level
optimizers and functions (convention="torch"), on every CPU backend: the same trajectory as
torch.optim over 50 steps in float64 (relative 1e-10), also with the training-step extras."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt import functional
from conftest import torch_or_skip

torch = torch_or_skip()

pytestmark = pytest.mark.torch

# (fastopt class, torch class, shared kwargs, fastopt-only kwargs, torch-only kwargs)
CASES = [
    ("SGD", "SGD", dict(lr=1e-3, momentum=0.9, dampening=0.5), {}, {}),
    ("SGD", "SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1, maximize=True), {}, {}),
    ("SGD", "SGD", dict(lr=0.05, weight_decay=0.1, maximize=True), {}, {}),
    ("SGD", "SGD", dict(lr=0.05, momentum=0.5, dampening=1.0), {}, {}),
    ("AdaGrad", "Adagrad", dict(lr=0.1, lr_decay=0.5, weight_decay=0.1, eps=1e-10), {}, {}),
    ("AdaGrad", "Adagrad", dict(lr=0.1, weight_decay=0.1, maximize=True, eps=1e-10), {}, {}),
    ("RMSProp", "RMSprop", dict(lr=0.01, weight_decay=0.1, centered=True, momentum=0.1, maximize=True, eps=1e-8),
     dict(rho=0.99), dict(alpha=0.99)),
    ("AdaDelta", "Adadelta", dict(weight_decay=0.1, maximize=True), {}, {}),
    ("Adam", "Adam", dict(lr=0.01, weight_decay=0.1, maximize=True, amsgrad=True), {}, {}),
    ("AdamW", "AdamW", dict(lr=0.01, weight_decay=0.1, maximize=True), {}, {}),
]
SHAPES = [(4, 3), (6,)]


def _ids(case):
    return f"{case[0]}-" + "-".join(f"{k}={v}" for k, v in case[2].items())


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_options_match_torch_optim(case, backend, rng):
    ours_name, torch_name, shared, ours_only, torch_only = case
    start = [rng.standard_normal(s) for s in SHAPES]
    ours_p = [a.copy() for a in start]
    theirs_p = [torch.tensor(a.copy()) for a in start]
    ours = getattr(fastopt, ours_name)(ours_p, **shared, **ours_only, convention="torch", backend=backend)
    theirs = getattr(torch.optim, torch_name)(theirs_p, **shared, **torch_only, foreach=False)
    for _ in range(50):
        grads = [rng.standard_normal(s) for s in SHAPES]
        for p, g in zip(theirs_p, grads):
            p.grad = torch.tensor(g)
        theirs.step()
        ours.step(grads)
    for k, (a, b) in enumerate(zip(ours_p, theirs_p)):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-10, atol=1e-13, err_msg=f"param {k}")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_dampening_and_maximize_with_clip_value_and_norm(backend, rng):
    """The clamp sees the unscaled gradient: clip, then torch's step with dampening and maximize."""
    start = [rng.standard_normal(s) * 3 for s in SHAPES]
    ours_p = [a.copy() for a in start]
    theirs_p = [torch.tensor(a.copy()) for a in start]
    kw = dict(lr=0.05, momentum=0.9, dampening=0.4, weight_decay=0.1, maximize=True)
    ours = fastopt.SGD(ours_p, **kw, convention="torch", backend=backend, clip_grad_norm=2.0, clip_grad_value=0.3)
    theirs = torch.optim.SGD(theirs_p, **kw, foreach=False)
    for _ in range(50):
        grads = [rng.standard_normal(s) * 2 for s in SHAPES]
        for p, g in zip(theirs_p, grads):
            p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(theirs_p, 2.0)
        torch.nn.utils.clip_grad_value_(theirs_p, 0.3)
        theirs.step()
        ours.step(grads)
    for a, b in zip(ours_p, theirs_p):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-10, atol=1e-13)


def test_options_are_in_param_groups_and_state_dict():
    w = np.zeros(3)
    opt = fastopt.SGD([{"params": [w], "dampening": 0.2}], lr=0.1, momentum=0.9, maximize=True)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["maximize"] is True
    assert saved["param_groups"][0]["dampening"] == 0.2
    plain = fastopt.SGD([np.zeros(3)], lr=0.1, momentum=0.9)  # unset options stay out of the groups
    assert not {"maximize", "dampening"} & set(plain.state_dict()["param_groups"][0])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_functional_options_match_the_class(backend, rng):
    """sgd_step(dampening, step=t) and adagrad_step(lr_decay, step=t) reproduce the classes."""
    start = rng.standard_normal(7)
    by_class, by_function = start.copy(), start.copy()
    sgd = fastopt.SGD([by_class], lr=0.1, momentum=0.8, dampening=0.5, maximize=True, convention="torch",
                      backend=backend)
    velocity = np.zeros(7)
    for t in range(1, 6):
        g = rng.standard_normal(7)
        sgd.step([g])
        functional.sgd_step(by_function, g, velocity, lr=0.1, momentum=0.8, dampening=0.5, maximize=True,
                            step=t, convention="torch", backend=backend)
    np.testing.assert_array_equal(by_function, by_class)
    start = rng.standard_normal(7)
    by_class, by_function = start.copy(), start.copy()
    ada = fastopt.AdaGrad([by_class], lr=0.1, lr_decay=0.3, convention="torch", backend=backend)
    accumulator = np.zeros(7)
    for t in range(1, 6):
        g = rng.standard_normal(7)
        ada.step([g])
        functional.adagrad_step(by_function, g, accumulator, lr=0.1, lr_decay=0.3, step=t, backend=backend)
    np.testing.assert_array_equal(by_function, by_class)


@pytest.mark.parametrize("call,match", [
    (lambda p, g: functional.sgd_step(p, g, np.zeros(3), lr=0.1, momentum=0.9, dampening=0.5), "step"),
    (lambda p, g: functional.adagrad_step(p, g, np.zeros(3), lr=0.1, lr_decay=0.5), "step"),
    (lambda p, g: functional.sgd_step(p, g, np.zeros(3), lr=0.1, momentum=0.9, nesterov=True, dampening=0.5, step=1),
     "dampening"),
    (lambda p, g: functional.sgd_step(p, g, np.zeros(3), lr=0.1, momentum=0.9, dampening=1.5, step=1), "dampening"),
    (lambda p, g: functional.adagrad_step(p, g, np.zeros(3), lr=0.1, lr_decay=-1.0, step=1), "lr_decay"),
    (lambda p, g: functional.adam_step(p, g, np.zeros(3), np.zeros(3), step=1, maximize=1), "maximize"),
    (lambda p, g: functional.rmsprop_step(p, g, np.zeros(3), lr=0.1, lr_decay=0.1), "lr_decay"),
])
def test_bad_options_raise_before_anything_changes(call, match):
    param, grad = np.ones(3), np.full(3, 0.5)
    with pytest.raises((TypeError, ValueError), match=match):
        call(param, grad)
    np.testing.assert_array_equal(param, np.ones(3))


def test_bad_option_in_a_class_raises_at_construction():
    with pytest.raises(ValueError, match="dampening"):
        fastopt.SGD([np.zeros(3)], lr=0.1, momentum=0.9, nesterov=True, dampening=0.1)
    with pytest.raises(ValueError, match="lr_decay"):
        fastopt.AdaGrad([np.zeros(3)], lr=0.1, lr_decay=-0.1)


def test_options_join_param_groups_only_when_set():
    """A group may set an option the constructor left at its default; state_dict keeps it."""
    a, b = np.zeros(3), np.zeros(3)
    opt = fastopt.SGD([{"params": [a]}, {"params": [b], "maximize": True}], lr=0.1, convention="torch")
    assert "maximize" not in opt.param_groups[0] and opt.param_groups[1]["maximize"] is True
    opt.step([np.ones(3), np.ones(3)])
    np.testing.assert_array_equal(a, np.full(3, -0.1))
    np.testing.assert_array_equal(b, np.full(3, 0.1))
    again = fastopt.SGD([{"params": [a.copy()]}, {"params": [b.copy()]}], lr=0.1, convention="torch")
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[1]["maximize"] is True
