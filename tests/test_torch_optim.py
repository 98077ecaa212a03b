"""fastopt.torch optimizers are drop-ins for torch.optim: the same trajectory over 50 steps in
float64 (relative 1e-10) for every CPU configuration torch's own test_optim uses
(torch/testing/_internal/common_optimizers.py, optim_inputs_func_*), and torch's habits: param
groups, schedulers, closure, skipped None grads, state_dict through torch.save in both directions."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

from conftest import torch_or_skip

torch = torch_or_skip()
import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402

pytestmark = pytest.mark.torch

# torch's CPU configurations (optim_inputs_func_<name>, without the CUDA-only "capturable" ones);
# a tensor lr is given in float64 (a float32 tensor makes torch round its step size to float32).
TORCH_CONFIGS = {
    "SGD": [{}, {"lr": 1e-2}, {"lr": "tensor(0.001)"}, {"weight_decay": 0.5}, {"momentum": 0.9},
            {"weight_decay": 0.1, "maximize": True}, {"momentum": 0.9, "dampening": 0.5},
            {"momentum": 0.9, "weight_decay": 0.1}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}],
    "Adagrad": [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "maximize": True}, {"lr": 0.1},
                {"initial_accumulator_value": 0.1, "weight_decay": 0.1},
                {"lr": 0.1, "lr_decay": 0.5, "weight_decay": 0.1}, {"lr": "tensor(0.001)"}],
    "RMSprop": [{}, {"lr": 1e-3}, {"weight_decay": 0.1}, {"maximize": True},
                {"weight_decay": 0.1, "centered": True}, {"maximize": True, "weight_decay": 0.1},
                {"weight_decay": 0.1, "centered": True, "momentum": 0.1},
                {"weight_decay": 0.1, "centered": True, "momentum": 0.1, "maximize": True}],
    "Adadelta": [{}, {"lr": 0.01}, {"weight_decay": 0.1}, {"maximize": True},
                 {"weight_decay": 0.1, "maximize": True}, {"rho": 0.95, "weight_decay": 0.9}],
    "Adam": [{}, {"lr": 0.01}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "maximize": True},
             {"weight_decay": 0.1, "amsgrad": True}, {"lr": "tensor(0.01)"}],
}
TORCH_CONFIGS["AdamW"] = TORCH_CONFIGS["Adam"]
CASES = [(name, kw) for name, configs in TORCH_CONFIGS.items() for kw in configs]
CASES += [("Adam", {"weight_decay": 0.1, "decoupled_weight_decay": True})]  # torch 2.13's Adam option


def _kwargs(kw):
    return {k: torch.tensor(float(v[7:-1]), dtype=torch.float64) if isinstance(v, str) else v
            for k, v in kw.items()}


def _pair(shapes, rng):
    start = [torch.from_numpy(rng.standard_normal(s)) for s in shapes]
    return ([torch.nn.Parameter(t.clone()) for t in start], [torch.nn.Parameter(t.clone()) for t in start])


def _set_grads(params_list, rng, skip=()):
    for k in range(len(params_list[0])):
        g = None if k in skip else torch.from_numpy(rng.standard_normal(tuple(params_list[0][k].shape)))
        for params in params_list:
            params[k].grad = None if g is None else g.clone()


def _assert_same(theirs, ours, rtol=1e-10, what=""):
    for k, (a, b) in enumerate(zip(theirs, ours)):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=rtol, atol=rtol * 1e-3,
                                   err_msg=f"{what} param {k}")


def _assert_same_state(theirs, ours, rtol=1e-10):
    for (pa, sa), (pb, sb) in zip(theirs.state.items(), ours.state.items()):
        keys = {k for k in sa if k != "momentum_buffer" or sa[k] is not None}
        assert keys <= set(sb), f"state keys {sorted(sb)} lack some of torch's {sorted(keys)}"
        for key in keys:
            np.testing.assert_allclose(torch.as_tensor(sb[key]).numpy(), torch.as_tensor(sa[key]).numpy(),
                                       rtol=rtol, atol=rtol * 1e-3, err_msg=key)


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
                                                 for n, kw in CASES])
def test_matches_torch_optim_for_torch_test_configs(name, kw, rng):
    theirs_p, ours_p = _pair([(4, 3), (5,), (1,)], rng)
    theirs = getattr(torch.optim, name)(theirs_p, **_kwargs(kw), foreach=False)
    ours = getattr(ft, name)(ours_p, **_kwargs(kw))
    assert isinstance(ours, getattr(torch.optim, name))
    for t in range(50):
        _set_grads([theirs_p, ours_p], rng, skip={2} if t % 7 == 3 else ())  # a None grad is skipped
        theirs.step()
        ours.step()
    _assert_same(theirs_p, ours_p, what=name)
    _assert_same_state(theirs, ours)


def test_param_groups_schedulers_and_closure(rng):
    theirs_p, ours_p = _pair([(3, 2), (4,), (2, 2)], rng)

    def build(cls, params):
        opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.05, "momentum": 0.5}],
                  lr=0.1, momentum=0.9, weight_decay=0.01)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)

    theirs, theirs_sched = build(torch.optim.SGD, theirs_p)
    ours, ours_sched = build(ft.SGD, ours_p)
    target = torch.from_numpy(rng.standard_normal(4))
    for _ in range(20):
        losses = []
        for opt, params in ((theirs, theirs_p), (ours, ours_p)):
            def closure(params=params, opt=opt):
                opt.zero_grad()
                loss = ((params[1] - target) ** 2).sum() + (params[0] ** 2).sum() + params[2].sum()
                loss.backward()
                return loss
            losses.append(opt.step(closure).item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-10)
        theirs_sched.step()
        ours_sched.step()
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"] == 0.1 * 0.5 ** 4
    _assert_same(theirs_p, ours_p)


def test_add_param_group_steps_the_new_group(rng):
    theirs_p, ours_p = _pair([(3,), (2,)], rng)
    theirs = torch.optim.Adam(theirs_p[:1], lr=0.01)
    ours = ft.Adam(ours_p[:1], lr=0.01)
    for t in range(10):
        if t == 4:
            theirs.add_param_group({"params": theirs_p[1:], "lr": 0.1, "amsgrad": True})
            ours.add_param_group({"params": ours_p[1:], "lr": 0.1, "amsgrad": True})
        _set_grads([theirs_p, ours_p], rng)
        theirs.step()
        ours.step()
    _assert_same(theirs_p, ours_p)
    _assert_same_state(theirs, ours)


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
def test_state_dict_crosses_torch_save_both_ways(direction, rng):
    theirs_p, ours_p = _pair([(4, 3), (5,)], rng)
    first_cls, second_cls = ((torch.optim.AdamW, ft.AdamW) if direction == "torch->fastopt"
                             else (ft.AdamW, torch.optim.AdamW))
    reference = torch.optim.AdamW(theirs_p, lr=0.01, amsgrad=True)
    first = first_cls(ours_p, lr=0.01, amsgrad=True)
    for _ in range(5):
        _set_grads([theirs_p, ours_p], rng)
        reference.step()
        first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = second_cls(ours_p, lr=0.5, amsgrad=True)  # the checkpoint's lr must win
    second.load_state_dict(torch.load(buffer))
    assert second.param_groups[0]["lr"] == 0.01
    for _ in range(5):
        _set_grads([theirs_p, ours_p], rng)
        reference.step()
        second.step()
    _assert_same(theirs_p, ours_p)
    _assert_same_state(reference, second)


def test_sparse_gradient_raises_before_any_update(rng):
    _, params = _pair([(4,), (3,)], rng)
    opt = ft.Adam(params, lr=0.1)
    params[0].grad = torch.ones(4, dtype=torch.float64)
    params[1].grad = torch.ones(3, dtype=torch.float64).to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert not opt.state or all("exp_avg" not in s for s in opt.state.values())


def test_a_parameter_that_is_not_dense_is_refused():
    param = torch.nn.Parameter(torch.zeros(4, 6, dtype=torch.float64)[:, ::2])
    with pytest.raises(ValueError, match="dense"):
        ft.SGD([param], lr=0.1)


def test_channels_last_parameters_step_in_their_layout(rng):
    """A dense non-contiguous parameter (a channels-last conv weight) and its gradient and state,
    all of the same strides, update element by element as torch's."""
    start = torch.from_numpy(rng.standard_normal((4, 3, 2, 5)))
    theirs_p = [torch.nn.Parameter(start.clone().contiguous(memory_format=torch.channels_last))]
    ours_p = [torch.nn.Parameter(start.clone().contiguous(memory_format=torch.channels_last))]
    theirs = torch.optim.AdamW(theirs_p, lr=0.01, amsgrad=True, foreach=False)
    ours = ft.AdamW(ours_p, lr=0.01, amsgrad=True)
    for _ in range(10):
        g = torch.from_numpy(rng.standard_normal((4, 3, 2, 5))).contiguous(memory_format=torch.channels_last)
        theirs_p[0].grad, ours_p[0].grad = g.clone(memory_format=torch.preserve_format), g
        theirs.step()
        ours.step()
    assert ours.state[ours_p[0]]["exp_avg"].stride() == ours_p[0].stride()
    _assert_same(theirs_p, ours_p)
    _assert_same_state(theirs, ours)
    ours_p[0].grad = torch.zeros(4, 3, 2, 5, dtype=torch.float64)  # contiguous: another layout
    before = ours_p[0].detach().clone()
    with pytest.raises(ValueError, match="strides"):
        ours.step()
    assert torch.equal(ours_p[0].detach(), before)


def test_step_hooks_run(rng):
    _, params = _pair([(3,)], rng)
    opt = ft.SGD(params, lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    opt.register_step_post_hook(lambda *args: calls.append("post"))
    params[0].grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert calls == ["pre", "post"]


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_capturable_and_differentiable_raise(flag):
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=flag):
        ft.Adam([param], **{flag: True})


@pytest.mark.parametrize("kw", [dict(foreach=True), dict(fused=True), dict(foreach=False, fused=False)])
def test_foreach_and_fused_are_accepted_and_change_nothing(kw, rng):
    theirs_p, ours_p = _pair([(6,)], rng)
    theirs = torch.optim.AdamW(theirs_p, lr=0.01, foreach=False)
    ours = ft.AdamW(ours_p, lr=0.01, **kw)
    for _ in range(3):
        _set_grads([theirs_p, ours_p], rng)
        theirs.step()
        ours.step()
    _assert_same(theirs_p, ours_p)


def test_bad_dampening_raises_naming_it():
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="dampening"):
        ft.SGD([param], lr=0.1, momentum=0.9, nesterov=True, dampening=0.5)


def test_clip_grad_norm_matches_torch_clip_then_step(rng):
    theirs_p, ours_p = _pair([(5, 2), (3,)], rng)
    theirs = torch.optim.SGD(theirs_p, lr=0.1, momentum=0.9)
    ours = ft.SGD(ours_p, lr=0.1, momentum=0.9, clip_grad_norm=0.5)
    for _ in range(10):
        _set_grads([theirs_p, ours_p], rng)
        torch.nn.utils.clip_grad_norm_(theirs_p, 0.5)
        theirs.step()
        ours.step()
    _assert_same(theirs_p, ours_p)


def test_float32_parameters_step_in_float32(rng):
    start = [torch.from_numpy(rng.standard_normal((7, 3)).astype(np.float32))]
    theirs_p = [torch.nn.Parameter(start[0].clone())]
    ours_p = [torch.nn.Parameter(start[0].clone())]
    theirs = torch.optim.AdamW(theirs_p, lr=0.01, foreach=False)
    ours = ft.AdamW(ours_p, lr=0.01)
    for _ in range(10):
        g = torch.from_numpy(rng.standard_normal((7, 3)).astype(np.float32))
        theirs_p[0].grad, ours_p[0].grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
    assert ours_p[0].dtype == torch.float32 and ours.state[ours_p[0]]["exp_avg"].dtype == torch.float32
    np.testing.assert_allclose(ours_p[0].detach().numpy(), theirs_p[0].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_importing_fastopt_does_not_import_torch():
    code = "import sys, fastopt, fastopt.optim, fastopt.functional; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_delta_bar_delta_matches_the_numpy_level_class(rng):
    start = rng.standard_normal((4, 5))
    param = torch.nn.Parameter(torch.from_numpy(start.copy()))
    array = start.copy()
    ours = ft.DeltaBarDelta([param], lr=0.05, kappa=0.01, phi=0.3, gamma=0.7)
    plain = fastopt.DeltaBarDelta([array], lr=0.05, kappa=0.01, phi=0.3, gamma=0.7, backend="numpy")
    for _ in range(20):
        g = rng.standard_normal((4, 5))
        param.grad = torch.from_numpy(g.copy())
        ours.step()
        plain.step([g])
    np.testing.assert_allclose(param.detach().numpy(), array, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ours.state[param]["rates"].numpy(), plain.state[0]["rates"], rtol=1e-12, atol=1e-14)


def test_polyak_average_and_nonfinite_skip_match_the_numpy_level_class(rng):
    start = rng.standard_normal(6)
    param = torch.nn.Parameter(torch.from_numpy(start.copy()))
    array = start.copy()
    kw = dict(lr=0.1, momentum=0.9, polyak=0.5, nonfinite="skip")
    ours = ft.SGD([param], **kw)
    plain = fastopt.SGD([array], **kw, convention="torch", backend="numpy")
    for t in range(8):
        g = rng.standard_normal(6)
        if t == 3:
            g[2] = np.nan
        param.grad = torch.from_numpy(g.copy())
        before = param.detach().clone()
        ours.step()
        plain.step([g])
        if t == 3:
            assert torch.equal(param.detach(), before)
    assert ours.skipped_steps == plain.skipped_steps == 1
    np.testing.assert_allclose(param.detach().numpy(), array, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ours.averaged_params()[0].numpy(), plain.averaged_params()[0], rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["numba-cuda", "cupy"])
@pytest.mark.parametrize("name,kw", [("SGD", {"momentum": 0.9, "dampening": 0.5}), ("Adagrad", {"lr_decay": 0.5}),
                                     ("RMSprop", {"centered": True, "momentum": 0.1, "maximize": True}),
                                     ("Adadelta", {"weight_decay": 0.1}), ("AdamW", {"amsgrad": True})])
def test_cuda_tensors_match_torch_optim(name, kw, backend, rng):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from fastopt import dispatch
    if not dispatch.backends()[backend].available:
        pytest.skip(f"backend {backend} unavailable: {dispatch.backends()[backend].reason}")
    start = [torch.from_numpy(rng.standard_normal(s)).cuda() for s in [(40, 3), (5,)]]
    theirs_p = [torch.nn.Parameter(t.clone()) for t in start]
    ours_p = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = getattr(torch.optim, name)(theirs_p, **kw, foreach=False)
    ours = getattr(ft, name)(ours_p, **kw, backend=backend)
    for _ in range(50):
        for a, b in zip(theirs_p, ours_p):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
    torch.cuda.synchronize()
    _assert_same([p.cpu() for p in theirs_p], [p.cpu() for p in ours_p])
