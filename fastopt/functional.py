"""The fused optimizer updates as plain functions on explicit state arrays.

Each function checks its arguments, picks a backend (``fastopt.dispatch``) and runs one fused
pass that updates ``param`` and its state arrays in place. The optimizer classes in
``fastopt.optim`` call the same checks and the same backend functions.

The update each function performs is written out in ``docs/algorithms.md``.

Backend contract: a backend module implements, for every operation here, a function of the same
name taking ``(param, grad, *state, **hyperparameters)``, where ``state`` is the operation's
state arrays in the order of ``SPECS[name].state`` (``None`` for an array the configuration does
not use) and the hyperparameters are the validated keyword arguments that ``SPECS[name].check``
returns, plus ``step`` for Adam. ``adam_step`` and ``adamw_step`` share the backend function
``adam_step`` (``decoupled_weight_decay`` tells them apart).

Arrays: NumPy ``float32`` or ``float64``, C-contiguous; ``param`` and state writeable; all of one
shape and dtype; no two sharing memory. ``grad`` is only read. NaN and Inf in ``grad`` propagate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import dispatch
from ._checks import (
    check_bool,
    check_convention,
    check_disjoint,
    check_real,
    check_step,
    check_same_kind,
    check_update_arrays,
    dtype_of,
    shape_of,
)

__all__ = [
    "SPECS",
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "adamw_step",
    "delta_bar_delta_step",
    "rmsprop_step",
    "sgd_step",
    "step_8bit",
]


def _lr(lr):
    return check_real("lr", lr, low=0.0)


def _eps(eps):
    return check_real("eps", eps, low=0.0, low_open=True)


def _unit(name, value):
    return check_real(name, value, low=0.0, high=1.0, high_open=True)


def _weight_decay(weight_decay):
    return check_real("weight_decay", weight_decay, low=0.0)


def _momentum_options(momentum, nesterov):
    momentum = _unit("momentum", momentum)
    nesterov = check_bool("nesterov", nesterov)
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov=True requires momentum > 0, got momentum=0.0")
    return momentum, nesterov


def check_sgd(*, lr, momentum=0.0, nesterov=False, weight_decay=0.0, convention="textbook"):
    momentum, nesterov = _momentum_options(momentum, nesterov)
    return dict(lr=_lr(lr), momentum=momentum, nesterov=nesterov,
                weight_decay=_weight_decay(weight_decay), convention=check_convention(convention))


def check_adagrad(*, lr, eps=1e-7, weight_decay=0.0, convention="textbook"):
    check_convention(convention)  # AdaGrad is the same under both conventions
    return dict(lr=_lr(lr), eps=_eps(eps), weight_decay=_weight_decay(weight_decay))


def check_rmsprop(*, lr, rho=0.9, eps=1e-6, momentum=0.0, nesterov=False, centered=False,
                  weight_decay=0.0, convention="textbook"):
    momentum, nesterov = _momentum_options(momentum, nesterov)
    convention = check_convention(convention)
    if nesterov and convention == "torch":
        raise ValueError("nesterov=True is not available with convention='torch': torch.optim.RMSprop has no Nesterov momentum")
    return dict(lr=_lr(lr), rho=_unit("rho", rho), eps=_eps(eps), momentum=momentum, nesterov=nesterov,
                centered=check_bool("centered", centered), weight_decay=_weight_decay(weight_decay),
                convention=convention)


def check_adadelta(*, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, convention="textbook"):
    return dict(lr=_lr(lr), rho=_unit("rho", rho), eps=_eps(eps),
                weight_decay=_weight_decay(weight_decay), convention=check_convention(convention))


def _check_adam(decoupled, *, lr, beta1, beta2, eps, weight_decay, amsgrad, convention):
    check_convention(convention)  # Adam is the same under both conventions
    return dict(lr=_lr(lr), beta1=_unit("beta1", beta1), beta2=_unit("beta2", beta2), eps=_eps(eps),
                weight_decay=_weight_decay(weight_decay), decoupled_weight_decay=decoupled,
                amsgrad=check_bool("amsgrad", amsgrad))


def check_adam(*, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
               convention="textbook"):
    return _check_adam(False, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       amsgrad=amsgrad, convention=convention)


def check_adamw(*, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False,
                convention="textbook"):
    return _check_adam(True, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       amsgrad=amsgrad, convention=convention)


def check_delta_bar_delta(*, kappa, phi, gamma, convention="textbook"):
    if check_convention(convention) != "textbook":
        raise ValueError("delta-bar-delta exists only with convention='textbook': torch.optim has no such optimizer")
    return dict(kappa=check_real("kappa", kappa, low=0.0), phi=check_real("phi", phi, low=0.0, high=1.0),
                gamma=_unit("gamma", gamma))


@dataclass(frozen=True)
class Spec:
    """What one operation needs: its backend function, state arrays, and hyperparameter check."""

    kernel: str  # name of the backend function
    state: tuple[str, ...]  # state array names, in the backend's argument order
    check: Callable[..., dict]  # keyword hyperparameters -> validated backend keywords
    uses: Callable[[dict], tuple[str, ...]]  # validated keywords -> the state arrays this configuration reads
    step_count: bool = False  # the backend function takes ``step``


SPECS: dict[str, Spec] = {
    "sgd": Spec("sgd_step", ("velocity",), check_sgd,
                lambda h: ("velocity",) if h["momentum"] else ()),
    "adagrad": Spec("adagrad_step", ("accumulator",), check_adagrad, lambda h: ("accumulator",)),
    "rmsprop": Spec("rmsprop_step", ("square_avg", "grad_avg", "velocity"), check_rmsprop,
                    lambda h: ("square_avg",) + (("grad_avg",) if h["centered"] else ())
                    + (("velocity",) if h["momentum"] else ())),
    "adadelta": Spec("adadelta_step", ("square_avg", "acc_delta"), check_adadelta,
                     lambda h: ("square_avg", "acc_delta")),
    "adam": Spec("adam_step", ("m", "v", "v_max"), check_adam,
                 lambda h: ("m", "v") + (("v_max",) if h["amsgrad"] else ()), step_count=True),
    "adamw": Spec("adam_step", ("m", "v", "v_max"), check_adamw,
                  lambda h: ("m", "v") + (("v_max",) if h["amsgrad"] else ()), step_count=True),
    "delta_bar_delta": Spec("delta_bar_delta_step", ("rates", "delta_bar"), check_delta_bar_delta,
                            lambda h: ("rates", "delta_bar")),
}


# The torch options the kernels have no scalar for, applied on the host (see ``HostOptions``):
# the option names each operation accepts.
HOST_OPTIONS: dict[str, tuple[str, ...]] = {
    "sgd": ("maximize", "dampening"),
    "adagrad": ("maximize", "lr_decay"),
    "rmsprop": ("maximize",),
    "adadelta": ("maximize",),
    "adam": ("maximize",),
    "adamw": ("maximize",),
    "delta_bar_delta": (),
}


@dataclass(frozen=True)
class HostOptions:
    """torch's ``maximize``, SGD's ``dampening`` τ and AdaGrad's ``lr_decay``, carried out through
    the scalars the kernels already take (``docs/algorithms.md``, "Host-side options"). With f the
    gradient factor (−1 when maximizing, times (1 − τ) from the second momentum step on):

        grad_mul ← f · grad_mul;  grad_clip ← |f| · grad_clip     (clamp(f·x, |f|c) = f·clamp(x, c))
        λ ← (1 − τ) λ                                              (dampening, from step 2 on)
        ε ← ε / (1 + (t − 1) · lr_decay)                           (AdaGrad)

    The kernels compute g ← clamp(g · grad_mul, ±grad_clip), then g + λθ, then the update, so
    these give torch's b ← αb + (1 − τ)(g + λθ) (b ← g + λθ on the first step) and −g for maximize.
    """

    maximize: bool = False
    dampening: float = 0.0
    lr_decay: float = 0.0

    def keywords(self, step: int) -> dict:
        """The options as keywords of a backend that implements them itself (the reference), for
        update number ``step``."""
        options: dict = {"maximize": True} if self.maximize else {}
        if self.dampening:
            options.update(dampening=self.dampening, step=step)
        if self.lr_decay:
            options.update(lr_decay=self.lr_decay, step=step)
        return options

    def lower(self, hyper: dict, step: int) -> tuple[dict, float]:
        """(the kernel keywords for update number ``step`` (1 on the first), the factor f)."""
        factor = -1.0 if self.maximize else 1.0
        if self.dampening and hyper.get("momentum") and step > 1:
            factor *= 1.0 - self.dampening
            hyper = {**hyper, "weight_decay": hyper["weight_decay"] * (1.0 - self.dampening)}
        if self.lr_decay:
            hyper = {**hyper, "lr": hyper["lr"] / (1.0 + (step - 1) * self.lr_decay)}
        return hyper, factor


def scaled_extras(factor: float, grad_mul: float, grad_clip: float) -> tuple[float, float]:
    """``grad_mul`` and ``grad_clip`` for a gradient factor f (``HostOptions.lower``)."""
    if factor == 1.0:
        return grad_mul, grad_clip
    return factor * grad_mul, grad_clip if grad_clip == math.inf else abs(factor) * grad_clip


def with_host_options(module, host: HostOptions | None, keywords: dict, step: int, read=None) -> dict:
    """The keywords of one update launch on ``module`` with the host options ``host``, for update
    number ``step``: as they are for a backend that implements them (``takes_host_options``: the
    NumPy reference, written from the equations, so comparing it with the kernels checks the
    lowering too), lowered to the kernels' scalars for the others. ``keywords`` may hold
    ``grad_mul`` (a float, or a device scalar that ``read`` turns into one) and ``grad_clip``."""
    if host is None:
        return keywords
    if getattr(module, "takes_host_options", False):
        return {**keywords, **host.keywords(step)}
    lowered, factor = host.lower(dict(keywords), step)
    if factor != 1.0:
        multiplier = lowered.get("grad_mul", 1.0)
        if not isinstance(multiplier, (int, float)):
            multiplier = read(multiplier)  # one device read per step (docs/algorithms.md)
        lowered["grad_mul"], lowered["grad_clip"] = scaled_extras(factor, float(multiplier),
                                                                  lowered.get("grad_clip", math.inf))
    return lowered


def check_host_options(name: str, hyper: dict, **options) -> HostOptions | None:
    """Validate the host options of operation ``name`` against its validated keywords ``hyper``;
    None when every option has its default (the plain update, no host work)."""
    allowed = HOST_OPTIONS[name]
    for key in options:
        if key not in allowed:
            raise TypeError(f"{name} has no option {key!r}; its host options are {allowed}")
    maximize = check_bool("maximize", options.get("maximize", False))
    dampening = check_real("dampening", options.get("dampening", 0.0), low=0.0, high=1.0)
    lr_decay = check_real("lr_decay", options.get("lr_decay", 0.0), low=0.0)
    if dampening and hyper.get("nesterov"):
        raise ValueError(f"nesterov=True requires dampening=0 (as in torch.optim.SGD), got dampening={dampening!r}")
    if not (maximize or dampening or lr_decay):
        return None
    return HostOptions(maximize, dampening, lr_decay)


def require_state(hyper: dict, spec: Spec, state: dict) -> None:
    """Every state array the configuration uses is given (the others may be None)."""
    for name in spec.uses(hyper):
        if state[name] is None:
            raise TypeError(f"{name} must be a numpy.ndarray with these options, got None")


def _run(spec_name: str, param, grad, state: dict, hyper: dict, backend, step=None, **options) -> None:
    spec = SPECS[spec_name]
    hyper = spec.check(**hyper)
    host = check_host_options(spec_name, hyper, **options)
    dispatch.check_backend_name(backend)
    if spec.step_count:
        hyper["step"] = check_step("step", step)
    elif host is not None and (host.dampening or host.lr_decay):
        step = check_step("step", step)  # which update this is decides the host scalars
    require_state(hyper, spec, state)
    check_update_arrays(param, grad, state)
    module = dispatch.resolve(backend, param)
    hyper = with_host_options(module, host, hyper, step if step is not None else 1)
    getattr(module, spec.kernel)(param, grad, *(state[name] for name in spec.state), **hyper)


def sgd_step(param, grad, velocity=None, *, lr, momentum=0.0, nesterov=False, weight_decay=0.0,
             convention="textbook", backend=None, maximize=False, dampening=0.0, step=None) -> None:
    """SGD, with optional (Nesterov) momentum and L2 weight decay, in place.

    Textbook: v ← αv − εg; θ ← θ + v (Nesterov: θ ← θ + αv − εg). Torch: b ← αb + g; θ ← θ − εb
    (Nesterov: θ ← θ − ε(g + αb)). ``velocity`` (v or b) is required when ``momentum > 0``.
    ``maximize`` uses −g; ``dampening`` τ scales g + λθ by (1 − τ) in the velocity from the second
    update on, so it needs ``step`` (1 on the first update), and excludes Nesterov.
    """
    _run("sgd", param, grad, {"velocity": velocity},
         dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, convention=convention),
         backend, step, maximize=maximize, dampening=dampening)


def adagrad_step(param, grad, accumulator, *, lr, eps=1e-7, weight_decay=0.0, convention="textbook",
                 backend=None, maximize=False, lr_decay=0.0, step=None) -> None:
    """AdaGrad in place: r ← r + g⊙g; θ ← θ − εg/(δ + √r). ``maximize`` uses −g; ``lr_decay``
    uses ε/(1 + (t − 1)·lr_decay) at update t = ``step`` (required with it)."""
    _run("adagrad", param, grad, {"accumulator": accumulator},
         dict(lr=lr, eps=eps, weight_decay=weight_decay, convention=convention), backend, step,
         maximize=maximize, lr_decay=lr_decay)


def rmsprop_step(param, grad, square_avg, grad_avg=None, velocity=None, *, lr, rho=0.9, eps=1e-6,
                 momentum=0.0, nesterov=False, centered=False, weight_decay=0.0, convention="textbook",
                 backend=None, maximize=False) -> None:
    """RMSProp in place: r ← ρr + (1−ρ)g⊙g; textbook θ ← θ − εg/√(δ + r), torch θ ← θ − εg/(√r + δ).

    ``grad_avg`` is required when ``centered``; ``velocity`` when ``momentum > 0``.
    """
    _run("rmsprop", param, grad, {"square_avg": square_avg, "grad_avg": grad_avg, "velocity": velocity},
         dict(lr=lr, rho=rho, eps=eps, momentum=momentum, nesterov=nesterov, centered=centered,
              weight_decay=weight_decay, convention=convention), backend, maximize=maximize)


def adadelta_step(param, grad, square_avg, acc_delta, *, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0,
                  convention="textbook", backend=None, maximize=False) -> None:
    """AdaDelta in place: r ← ρr + (1−ρ)g⊙g; Δ ← √(u+δ)/√(r+δ)⊙g; θ ← θ − εΔ; u ← ρu + (1−ρ)(εΔ)²
    (torch: u ← ρu + (1−ρ)Δ²)."""
    _run("adadelta", param, grad, {"square_avg": square_avg, "acc_delta": acc_delta},
         dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, convention=convention), backend,
         maximize=maximize)


def adam_step(param, grad, m, v, v_max=None, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, amsgrad=False, convention="textbook", backend=None, maximize=False) -> None:
    """Adam in place, with L2 weight decay; ``step`` is t, 1 on the first update.

    m ← β1m + (1−β1)g; v ← β2v + (1−β2)g⊙g; θ ← θ − ε (m/(1−β1ᵗ)) / (δ + √(v/(1−β2ᵗ))).
    With ``amsgrad``, ``v_max`` ← max(v_max, v) replaces v in the last line.
    """
    _run("adam", param, grad, {"m": m, "v": v, "v_max": v_max},
         dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
              convention=convention), backend, step, maximize=maximize)


def adamw_step(param, grad, m, v, v_max=None, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=1e-2, amsgrad=False, convention="textbook", backend=None, maximize=False) -> None:
    """AdamW in place: θ ← θ − ελθ (decoupled weight decay), then Adam's update without L2."""
    _run("adamw", param, grad, {"m": m, "v": v, "v_max": v_max},
         dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
              convention=convention), backend, step, maximize=maximize)


def delta_bar_delta_step(param, grad, rates, delta_bar, *, kappa, phi, gamma, convention="textbook",
                         backend=None) -> None:
    """Delta-bar-delta in place: θ ← θ − e⊙g; e ← e + Δe (κ where δ̄⊙g > 0, −φe where < 0);
    δ̄ ← (1−γ)g + γδ̄."""
    _run("delta_bar_delta", param, grad, {"rates": rates, "delta_bar": delta_bar},
         dict(kappa=kappa, phi=phi, gamma=gamma, convention=convention), backend)


def step_8bit(name: str, param, grad, state: dict, *, step=None, backend=None, **hyperparameters) -> None:
    """One update of optimizer ``name`` (``"sgd"``, ``"adagrad"``, ``"rmsprop"``, ``"adam"``,
    ``"adamw"``) with 8-bit block-wise quantized state, in place, in one fused pass
    (``docs/algorithms.md``, "Optimizers with 8-bit state").

    ``state`` maps each state array the configuration keeps in 8 bits to its ``(codes, absmax)``
    pair (``fastopt.quantize_blockwise`` makes one; codes uint8 with ``param``'s shape, absmax
    float32, one per block of 256): Adam ``{"m": ..., "v": ...}``, SGD ``{"velocity": ...}``,
    AdaGrad ``{"accumulator": ...}``, RMSProp ``{"square_avg": ...}`` (and ``"velocity"`` with
    momentum). ``param`` and ``grad``: float32. ``hyperparameters``: those of ``name``'s step
    function; ``step`` (t, 1 on the first update) for Adam. Configurations without 8-bit state
    (amsgrad, centered RMSProp, SGD without momentum) raise ``ValueError``; nothing is written
    before every check has passed.
    """
    from .precision import BLOCK, EIGHT_BIT

    if name not in EIGHT_BIT:
        raise ValueError(f"name must be one of {', '.join(map(repr, EIGHT_BIT))}, got {name!r}")
    spec = SPECS[name]
    dispatch.check_backend_name(backend)
    hyper = spec.check(**hyperparameters)
    if spec.step_count:
        hyper["step"] = check_step("step", step)
    elif step is not None:
        raise TypeError(f"step is for adam and adamw, not {name}")
    check_update_arrays(param, grad, {})
    if dtype_of(param) != np.float32:
        raise TypeError(f"param must have dtype float32 for 8-bit state, got {dtype_of(param)}")
    module = dispatch.resolve(backend, param)
    if not hasattr(module, "state8_step"):
        raise TypeError(f"backend {backend or dispatch.default_backend(param)!r} has no 8-bit optimizer state")
    reason = module.state8_supported(spec.kernel, **hyper)
    if reason is not None:
        raise ValueError(reason)
    layout = module.state8_layout(spec.kernel, **hyper)
    wanted = {spec.state[slot] for slot, _ in layout}
    if not isinstance(state, dict) or set(state) != wanted:
        raise ValueError(f"state must map {sorted(wanted)} to (codes, absmax) pairs for this configuration, "
                         f"got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
    blocks = -(-int(np.prod(shape_of(param))) // BLOCK)
    arrays = {}
    for key in sorted(wanted):
        pair = state[key]
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"state[{key!r}] must be a (codes, absmax) pair, got {type(pair).__name__}")
        codes, absmax = pair
        for what, array, dtype, shape in ((f"state[{key!r}] codes", codes, np.uint8, shape_of(param)),
                                          (f"state[{key!r}] absmax", absmax, np.float32, (blocks,))):
            if array is None or not hasattr(array, "shape"):
                raise TypeError(f"{what} must be an array, got {type(array).__name__}")
            check_same_kind(what, array, "param", param)
            if dtype_of(array) != dtype or shape_of(array) != shape:
                raise ValueError(f"{what} must have dtype {np.dtype(dtype)} and shape {shape}, "
                                 f"got {dtype_of(array)} {shape_of(array)}")
            if isinstance(array, np.ndarray) and not (array.flags.c_contiguous and array.flags.writeable):
                raise ValueError(f"{what} must be C-contiguous and writeable")
            arrays[what] = array
    check_disjoint({"param": param, **arrays}, {"grad": grad})
    states = tuple(state.get(key) for key in spec.state)
    module.state8_step(spec.kernel, [param], [grad], [states], None, block=BLOCK, **hyper)
