"""Drop-in replacements for ``torch.optim`` optimizers, stepping with fastopt's fused kernels.

Each class subclasses the ``torch.optim`` class of the same name (so ``isinstance`` holds, torch
checks the arguments, and ``state_dict``/``load_state_dict``, ``add_param_group``, ``zero_grad``,
hooks and every ``torch.optim.lr_scheduler`` work unchanged, in torch's own checkpoint format)
and replaces ``step`` (``fastopt.torch._step.FusedStep``). The update is torch's rule
(``convention="torch"`` in ``docs/algorithms.md``), including ``maximize``, SGD's ``dampening``
and Adagrad's ``lr_decay``.

torch's implementation switches: ``foreach`` and ``fused`` are accepted with any of torch's
values and change nothing (fastopt always runs one fused tensor-list kernel per bucket of
tensors); ``capturable=True`` and ``differentiable=True`` raise ``ValueError``.

fastopt's extras, keyword-only: ``clip_grad_norm``, ``clip_grad_value``, ``nonfinite``,
``polyak`` (as in ``fastopt.Optimizer``) and ``backend`` (``"numba"`` or ``"numpy"`` for CPU
tensors, ``"numba-cuda"`` (default) or ``"cupy"`` for CUDA tensors).
"""

from __future__ import annotations

import torch

from .._checks import check_real
from ._step import FusedStep, scalar

__all__ = ["SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "DeltaBarDelta"]


def _betas(group):
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return scalar("betas[0]", betas[0]), scalar("betas[1]", betas[1])


class SGD(FusedStep, torch.optim.SGD):
    """torch.optim.SGD on fastopt's kernels: b ← αb + (1 − τ)(g + λθ) (b ← g + λθ on a parameter's
    first step), θ ← θ − εb (Nesterov: θ ← θ − ε(g + λθ + αb)); −g with ``maximize``.
    State: ``momentum_buffer`` (with momentum)."""

    _state_keys = {"velocity": "momentum_buffer"}
    _has_step = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, backend=None,
                 clip_grad_norm=None, clip_grad_value=None, nonfinite="propagate", polyak=None):
        self._init_fastopt(backend, clip_grad_norm, clip_grad_value, nonfinite, polyak)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)

    def _spec_of(self, group):
        return "sgd"

    def _fastopt_hyper(self, group):
        return (dict(lr=scalar("lr", group["lr"]), momentum=group["momentum"], nesterov=group["nesterov"],
                     weight_decay=group["weight_decay"]),
                dict(maximize=group["maximize"], dampening=group["dampening"]))


class Adagrad(FusedStep, torch.optim.Adagrad):
    """torch.optim.Adagrad on fastopt's kernels: r ← r + g⊙g; θ ← θ − ε_t g/(√r + δ) with
    ε_t = ε/(1 + (t − 1)·lr_decay). State: ``step``, ``sum``."""

    _state_keys = {"accumulator": "sum"}

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None, backend=None,
                 clip_grad_norm=None, clip_grad_value=None, nonfinite="propagate", polyak=None):
        self._init_fastopt(backend, clip_grad_norm, clip_grad_value, nonfinite, polyak)
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps, foreach=foreach,
                         maximize=maximize, differentiable=differentiable, fused=fused)

    def _spec_of(self, group):
        return "adagrad"

    def _fastopt_hyper(self, group):
        return (dict(lr=scalar("lr", group["lr"]), eps=group["eps"], weight_decay=group["weight_decay"]),
                dict(maximize=group["maximize"], lr_decay=group["lr_decay"]))

    def _initial_value(self, name, group):
        return float(group["initial_accumulator_value"])


class RMSprop(FusedStep, torch.optim.RMSprop):
    """torch.optim.RMSprop on fastopt's kernels (``alpha`` is fastopt's ρ): r ← αr + (1 − α)g⊙g;
    d = √r + δ (centered: √(r − s⊙s) + δ); θ ← θ − εg/d, or b ← μb + g/d; θ ← θ − εb.
    State: ``step``, ``square_avg``, ``grad_avg`` (centered), ``momentum_buffer`` (momentum)."""

    _state_keys = {"square_avg": "square_avg", "grad_avg": "grad_avg", "velocity": "momentum_buffer"}

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, backend=None,
                 clip_grad_norm=None, clip_grad_value=None, nonfinite="propagate", polyak=None):
        self._init_fastopt(backend, clip_grad_norm, clip_grad_value, nonfinite, polyak)
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered, capturable=capturable, foreach=foreach, maximize=maximize,
                         differentiable=differentiable)

    def _spec_of(self, group):
        return "rmsprop"

    def _fastopt_hyper(self, group):
        return (dict(lr=scalar("lr", group["lr"]), rho=group["alpha"], eps=group["eps"],
                     momentum=group["momentum"], centered=group["centered"], weight_decay=group["weight_decay"]),
                dict(maximize=group["maximize"]))


class Adadelta(FusedStep, torch.optim.Adadelta):
    """torch.optim.Adadelta on fastopt's kernels: r ← ρr + (1 − ρ)g⊙g; Δ = √(u + δ)/√(r + δ)⊙g;
    θ ← θ − εΔ; u ← ρu + (1 − ρ)Δ⊙Δ. State: ``step``, ``square_avg``, ``acc_delta``."""

    _state_keys = {"square_avg": "square_avg", "acc_delta": "acc_delta"}

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *, capturable=False,
                 maximize=False, differentiable=False, backend=None, clip_grad_norm=None, clip_grad_value=None,
                 nonfinite="propagate", polyak=None):
        self._init_fastopt(backend, clip_grad_norm, clip_grad_value, nonfinite, polyak)
        super().__init__(params, lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, foreach=foreach,
                         capturable=capturable, maximize=maximize, differentiable=differentiable)

    def _spec_of(self, group):
        return "adadelta"

    def _fastopt_hyper(self, group):
        return (dict(lr=scalar("lr", group["lr"]), rho=group["rho"], eps=group["eps"],
                     weight_decay=group["weight_decay"]),
                dict(maximize=group["maximize"]))


class Adam(FusedStep, torch.optim.Adam):
    """torch.optim.Adam on fastopt's kernels: m ← β1m + (1 − β1)g; v ← β2v + (1 − β2)g⊙g;
    θ ← θ − ε m̂/(√v̂ + δ) (AMSGrad: the running max of v); L2 weight decay, or decoupled with
    ``decoupled_weight_decay=True``. State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``."""

    _state_keys = {"m": "exp_avg", "v": "exp_avg_sq", "v_max": "max_exp_avg_sq"}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, backend=None, clip_grad_norm=None, clip_grad_value=None,
                 nonfinite="propagate", polyak=None):
        self._init_fastopt(backend, clip_grad_norm, clip_grad_value, nonfinite, polyak)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=decoupled_weight_decay)

    def _spec_of(self, group):
        return "adamw" if group.get("decoupled_weight_decay", False) else "adam"

    def _fastopt_hyper(self, group):
        beta1, beta2 = _betas(group)
        return (dict(lr=scalar("lr", group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], amsgrad=group["amsgrad"]),
                dict(maximize=group["maximize"]))


class AdamW(FusedStep, torch.optim.AdamW):
    """torch.optim.AdamW on fastopt's kernels: θ ← θ − ελθ, then Adam's update without L2.
    State: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad)."""

    _state_keys = Adam._state_keys

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, backend=None,
                 clip_grad_norm=None, clip_grad_value=None, nonfinite="propagate", polyak=None):
        self._init_fastopt(backend, clip_grad_norm, clip_grad_value, nonfinite, polyak)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)

    def _spec_of(self, group):
        return "adamw"

    _fastopt_hyper = Adam._fastopt_hyper


class DeltaBarDelta(FusedStep, torch.optim.Optimizer):
    """Delta-bar-delta (fastopt's; torch has none): θ ← θ − e⊙g; e ← e + κ where δ̄⊙g > 0,
    e ← e − φe where δ̄⊙g < 0; δ̄ ← (1 − γ)g + γδ̄. ``lr`` is each element's initial rate.
    State: ``step``, ``rates``, ``delta_bar``."""

    _state_keys = {"rates": "rates", "delta_bar": "delta_bar"}
    _convention = "textbook"

    def __init__(self, params, lr, kappa, phi, gamma, *, backend=None, clip_grad_norm=None, clip_grad_value=None,
                 nonfinite="propagate", polyak=None):
        self._init_fastopt(backend, clip_grad_norm, clip_grad_value, nonfinite, polyak)
        super().__init__(params, dict(lr=lr, kappa=kappa, phi=phi, gamma=gamma))

    def _spec_of(self, group):
        return "delta_bar_delta"

    def _fastopt_hyper(self, group):
        check_real("lr", scalar("lr", group["lr"]), low=0.0)  # the initial rate
        return dict(kappa=group["kappa"], phi=group["phi"], gamma=group["gamma"]), {}

    def _initial_value(self, name, group):
        return float(scalar("lr", group["lr"])) if name == "rates" else 0.0
