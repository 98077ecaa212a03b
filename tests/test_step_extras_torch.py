"""The training-step extras against torch: clip_grad_norm_ + the optimizer, AveragedModel, and
the standalone clip_grad_norm_."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from conftest import torch_or_skip

pytestmark = pytest.mark.torch

SHAPES = [(64,), (8, 9), (1,), (33,)]
TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def _module_of(torch, arrays):
    """A torch module whose parameters are copies of ``arrays`` (for AveragedModel)."""
    module = torch.nn.Module()
    module.params = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(a.copy())) for a in arrays])
    return module


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("polyak", ["mean", 0.9])
def test_clip_adamw_and_averaging_match_torch(polyak, backend, dtype, rng):
    torch = torch_or_skip()
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    start = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    params = [a.copy() for a in start]
    ours = fastopt.AdamW(params, lr=1e-2, weight_decay=0.05, clip_grad_norm=1.0, polyak=polyak,
                         convention="torch", backend=backend)
    model = _module_of(torch, start)
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    averaged = (AveragedModel(model) if polyak == "mean"
                else AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(polyak)))
    for _ in range(30):
        grads = [(3.0 * rng.standard_normal(s)).astype(dtype) for s in SHAPES]  # norm ≫ 1: clipping acts
        for p, g in zip(model.params, grads):
            p.grad = torch.tensor(g.copy())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
        theirs.step()
        averaged.update_parameters(model)
        ours.step(grads)
    for k, (p, q) in enumerate(zip(params, model.params)):
        np.testing.assert_allclose(p, q.detach().numpy(), err_msg=f"params[{k}]", **TOL[dtype])
    for k, (a, q) in enumerate(zip(ours.averaged_params(), averaged.module.params)):
        np.testing.assert_allclose(a, q.detach().numpy(), err_msg=f"average {k}", **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_standalone_clip_grad_norm_matches_torch(max_norm, backend, dtype, rng):
    torch = torch_or_skip()
    grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    tensors = [torch.nn.Parameter(torch.zeros(s, dtype=getattr(torch, np.dtype(dtype).name))) for s in SHAPES]
    for t, g in zip(tensors, grads):
        t.grad = torch.tensor(g.copy())
    expected_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm, foreach=False)
    norm = fastopt.clip_grad_norm_(grads, max_norm, backend=backend)
    assert isinstance(norm, float)
    assert norm == pytest.approx(float(expected_norm), rel=1e-6 if dtype == np.float32 else 1e-12)
    for g, t in zip(grads, tensors):
        np.testing.assert_allclose(g, t.grad.numpy(), **TOL[dtype])
