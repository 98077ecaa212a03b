"""convention="torch" reproduces torch.optim over 50 steps, with param groups and a mid-run lr change."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from conftest import torch_or_skip

pytestmark = pytest.mark.torch

# (fastopt class, torch class name, fastopt kwargs, torch kwargs for the same hyperparameters)
PAIRS = [
    ("SGD", "SGD", dict(lr=0.05), dict(lr=0.05)),
    ("SGD", "SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01), dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("SGD", "SGD", dict(lr=0.05, momentum=0.8, nesterov=True), dict(lr=0.05, momentum=0.8, nesterov=True)),
    ("AdaGrad", "Adagrad", dict(lr=0.1, eps=1e-10, initial_accumulator_value=0.2, weight_decay=0.01),
     dict(lr=0.1, eps=1e-10, initial_accumulator_value=0.2, weight_decay=0.01)),
    ("RMSProp", "RMSprop", dict(lr=0.01, rho=0.95, eps=1e-8), dict(lr=0.01, alpha=0.95, eps=1e-8)),
    ("RMSProp", "RMSprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
     dict(lr=0.01, alpha=0.9, eps=1e-6, momentum=0.9, centered=True, weight_decay=0.01)),
    ("AdaDelta", "Adadelta", dict(lr=0.5, rho=0.9, eps=1e-6, weight_decay=0.01),
     dict(lr=0.5, rho=0.9, eps=1e-6, weight_decay=0.01)),
    ("Adam", "Adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.01),
     dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.01)),
    ("Adam", "Adam", dict(lr=1e-2, amsgrad=True), dict(lr=1e-2, amsgrad=True)),
    ("AdamW", "AdamW", dict(lr=1e-2, weight_decay=0.1), dict(lr=1e-2, weight_decay=0.1)),
    ("AdamW", "AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True), dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
]

TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-11, atol=1e-12)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-" + "-".join(f"{k}={v}" for k, v in p[2].items()))
def test_matches_torch_optim(pair, backend, dtype, rng):
    torch = torch_or_skip()
    ours_name, torch_name, ours_kw, torch_kw = pair
    shapes = [(64,), (8, 9), (1,), (33,)]
    start = [rng.standard_normal(s).astype(dtype) for s in shapes]
    params = [a.copy() for a in start]
    tparams = [torch.tensor(a.copy(), requires_grad=False) for a in start]

    # two groups: the second overrides lr (and, for torch, the same override)
    ours = getattr(fastopt, ours_name)(
        [{"params": params[:2]}, {"params": params[2:], "lr": ours_kw["lr"] * 0.5}],
        **ours_kw, convention="torch", backend=backend,
    )
    theirs = getattr(torch.optim, torch_name)(
        [{"params": tparams[:2]}, {"params": tparams[2:], "lr": torch_kw["lr"] * 0.5}],
        **torch_kw, foreach=False,
    )
    for t in range(50):
        if t == 25:  # a learning-rate change mid-run takes effect at the next step in both
            for g_ours, g_theirs in zip(ours.param_groups, theirs.param_groups):
                g_ours["lr"] *= 0.3
                g_theirs["lr"] *= 0.3
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g.copy())
        theirs.step()
        ours.step(grads)
        for k, (p, tp) in enumerate(zip(params, tparams)):
            np.testing.assert_allclose(p, tp.numpy(), err_msg=f"param {k} at step {t + 1}", **TOL[dtype])
