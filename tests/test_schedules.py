"""Learning-rate schedules: the equations of docs/algorithms.md, torch's schedulers, bad input."""

from __future__ import annotations

import math

import pytest

from conftest import torch_or_skip
from fastopt import schedules


def test_linear_decay_is_the_seeds_equation_then_constant():
    s = schedules.linear_decay(0.1, 0.001, tau=100)
    for k in (0, 1, 37, 99, 100):
        a = k / 100
        assert s(k) == pytest.approx((1 - a) * 0.1 + a * 0.001, rel=1e-15)
    assert s(100) == s(101) == s(10_000) == 0.001


def test_step_exponential_cosine_warmup_by_hand():
    assert [schedules.step_decay(1.0, 3, 0.5)(k) for k in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert schedules.exponential(2.0, 0.9)(3) == pytest.approx(2.0 * 0.9**3)
    c = schedules.cosine(1.0, 4, lr_min=0.2)
    assert [c(k) for k in (0, 2, 4, 9)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    w = schedules.linear_warmup(0.5, 4, start_factor=0.2)
    assert [w(k) for k in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5])


def test_chain_restarts_each_schedule_at_its_milestone():
    s = schedules.chain([schedules.linear_warmup(1.0, 2), schedules.exponential(1.0, 0.5),
                         schedules.step_decay(0.1, 1, 1.0)], [2, 4])
    assert [s(k) for k in range(7)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.1, 0.1, 0.1])


# torch scheduler -> (our schedule, torch scheduler factory)
TORCH_PAIRS = {
    "LinearLR": (lambda: schedules.linear_warmup(0.1, 5, start_factor=0.25),
                 lambda torch, opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=5)),
    "CosineAnnealingLR": (lambda: schedules.cosine(0.1, 10, lr_min=0.001),
                          lambda torch, opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.001)),
    "StepLR": (lambda: schedules.step_decay(0.1, 3, 0.3),
               lambda torch, opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.3)),
    "ExponentialLR": (lambda: schedules.exponential(0.1, 0.8),
                      lambda torch, opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)),
}


@pytest.mark.torch
@pytest.mark.parametrize("name", TORCH_PAIRS)
def test_matches_torch_scheduler(name):
    torch = torch_or_skip()
    ours, theirs = TORCH_PAIRS[name]
    schedule = ours()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = theirs(torch, opt)
    for k in range(11):  # k ≤ T: past T_max torch's cosine rises again, ours stays at lr_min
        assert schedule(k) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), f"k={k}"
        opt.step()
        scheduler.step()


@pytest.mark.parametrize("make, error, match", [
    (lambda: schedules.linear_decay(0.1, 0.01, 0), ValueError, "tau must be >= 1"),
    (lambda: schedules.linear_decay(-0.1, 0.01, 10), ValueError, "lr0 must be >= 0"),
    (lambda: schedules.step_decay(0.1, 2.0), TypeError, "step_size must be an int"),
    (lambda: schedules.cosine(0.1, 10, lr_min=math.nan), ValueError, "lr_min must be finite"),
    (lambda: schedules.linear_warmup(0.1, 3, start_factor=1.5), ValueError, "start_factor must be <= 1"),
    (lambda: schedules.chain([], []), ValueError, "schedules must not be empty"),
    (lambda: schedules.chain([schedules.exponential(1, 1), 0.1], [3]), TypeError, r"schedules\[1\] must be callable"),
    (lambda: schedules.chain([schedules.exponential(1, 1)] * 3, [3]), ValueError, "milestones must have"),
    (lambda: schedules.chain([schedules.exponential(1, 1)] * 3, [3, 3]), ValueError, "strictly increasing"),
    (lambda: schedules.exponential(0.1, 0.5)(-1), ValueError, "k must be >= 0"),
    (lambda: schedules.exponential(0.1, 0.5)(1.5), TypeError, "k must be an int"),
])
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()
