"""fastopt.torch's batch-norm modules are drop-ins for torch.nn's: outputs, gradients and running
statistics match in training and eval, contiguous and channels-last; gradcheck passes in float64;
state_dicts cross both ways; convert() swaps modules in place and fuses a following ReLU."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from conftest import torch_or_skip

torch = torch_or_skip()
import fastopt.torch as ft  # noqa: E402

pytestmark = pytest.mark.torch

SHAPES = {1: [(6, 4), (5, 3, 7)], 2: [(4, 3, 5, 6)], 3: [(3, 2, 4, 3, 5)]}
CASES = [(dims, shape, fmt) for dims, shapes in SHAPES.items() for shape in shapes
         for fmt in (["contiguous", "channels_last"] if len(shape) >= 4 else ["contiguous"])]
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _input(shape, fmt, rng, dtype=torch.float64):
    x = torch.from_numpy(rng.standard_normal(shape) * 2 + 0.5).to(dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=FORMATS[len(shape)])
    return x


def _pair(dims, relu, channels, **kw):
    theirs = getattr(torch.nn, f"BatchNorm{dims}d")(channels, dtype=torch.float64, **kw)
    ours = getattr(ft, f"BatchNorm{'ReLU' if relu else ''}{dims}d")(channels, dtype=torch.float64, **kw)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _close(a, b, what, rtol=1e-10):
    np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=rtol, atol=rtol * 1e-2, err_msg=what)


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("dims,shape,fmt", CASES, ids=[f"{d}d-{'x'.join(map(str, s))}-{f}" for d, s, f in CASES])
def test_matches_torch_in_training_then_eval(dims, shape, fmt, relu, rng):
    theirs, ours = _pair(dims, relu, shape[1], momentum=0.2)
    for mode in ("train", "train", "eval"):
        theirs.train(mode == "train")
        ours.train(mode == "train")
        x = _input(shape, fmt, rng)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = theirs(xa)
        ya = torch.relu(ya) if relu else ya
        yb = ours(xb)
        if fmt == "channels_last":
            assert yb.is_contiguous(memory_format=FORMATS[len(shape)])
        dy = torch.from_numpy(rng.standard_normal(shape))
        ya.backward(dy)
        yb.backward(dy)
        _close(ya, yb, f"{mode} output")
        _close(xa.grad, xb.grad, f"{mode} input gradient")
        _close(theirs.weight.grad, ours.weight.grad, f"{mode} weight gradient")
        _close(theirs.bias.grad, ours.bias.grad, f"{mode} bias gradient")
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            _close(getattr(theirs, name), getattr(ours, name), f"{mode} {name}")
        theirs.zero_grad()
        ours.zero_grad()


@pytest.mark.parametrize("kw", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False)],
                         ids=["cumulative", "no-affine", "no-running-stats"])
def test_constructor_options_match_torch(kw, rng):
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64, **kw)
    ours = ft.BatchNorm2d(3, dtype=torch.float64, **kw)
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    for mode in ("train", "train", "eval"):
        theirs.train(mode == "train")
        ours.train(mode == "train")
        x = _input((4, 3, 2, 5), "contiguous", rng)
        _close(theirs(x), ours(x), mode)
    for a, b in zip(theirs.buffers(), ours.buffers()):
        _close(a, b, "buffer")


def test_gradcheck_in_float64(rng):
    x = _input((5, 3, 4), "contiguous", rng).requires_grad_()
    weight = torch.from_numpy(rng.uniform(0.5, 1.5, 3)).requires_grad_()
    bias = torch.from_numpy(rng.standard_normal(3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: ft.batch_norm(x, None, None, w, b, training=True),
                                    (x, weight, bias))
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w, b: ft.batch_norm(x, running_mean, running_var, w, b, training=False), (x, weight, bias))


def test_state_dict_crosses_both_ways(rng):
    theirs, ours = _pair(2, False, 3)
    theirs.train()
    theirs(_input((4, 3, 2, 2), "contiguous", rng))
    ours.load_state_dict(theirs.state_dict())
    for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)
    ours(_input((4, 3, 2, 2), "contiguous", rng))
    back = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    back.load_state_dict(ours.state_dict())
    for a, b in zip(back.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)


def test_convert_swaps_in_place_and_fuses_a_following_relu(rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(48)),
                                torch.nn.Linear(48, 2)).double()
    reference = copy.deepcopy(model)
    weight = model[1].weight
    x = _input((4, 2, 6, 6), "contiguous", rng)
    converted = ft.convert(model)
    assert converted is model
    assert type(model[1]) is ft.BatchNormReLU2d and type(model[2]) is torch.nn.Identity
    assert type(model[3][1]) is ft.BatchNorm1d
    assert model[1].weight is weight  # the same Parameter: an optimizer built before keeps working
    _close(reference(x), model(x), "converted model output")
    _close(reference[1].running_mean, model[1].running_mean, "running mean")


def test_float32_and_mismatched_dtype(rng):
    bn = ft.BatchNorm1d(3)
    x = torch.from_numpy(rng.standard_normal((5, 3)).astype(np.float32))
    y = bn(x)
    assert y.dtype == torch.float32
    before = bn.running_mean.clone()
    with pytest.raises(TypeError, match="dtype"):
        bn(x.double())
    assert torch.equal(bn.running_mean, before)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["numba-cuda", "cupy"])
def test_cuda_batchnorm_matches_torch(backend, rng):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from fastopt import dispatch
    if not dispatch.backends()[backend].available:
        pytest.skip(f"backend {backend} unavailable: {dispatch.backends()[backend].reason}")
    theirs = torch.nn.BatchNorm2d(3, dtype=torch.float64, device="cuda")
    ours = ft.BatchNormReLU2d(3, dtype=torch.float64, device="cuda", backend=backend)
    x = _input((4, 3, 5, 5), "channels_last", rng).cuda()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = torch.relu(theirs(xa)), ours(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.cuda.synchronize()
    for a, b in ((ya, yb), (xa.grad, xb.grad), (theirs.weight.grad, ours.weight.grad),
                 (theirs.running_var, ours.running_var)):
        _close(a.cpu(), b.cpu(), "cuda")
