"""Optimizer updates of the ``"numpy"`` backend, written straight from ``docs/algorithms.md``.

One function per algorithm, each a few NumPy expressions in the notation of the doc (θ ``param``,
g ``grad``, ε ``lr``, λ ``weight_decay``, δ ``eps``, α ``momentum``, ρ ``rho``, t ``step``).
Readability comes before speed: temporaries are fine here. Nothing is shared with the kernels.

Arguments arrive validated (see ``fastopt.functional``): arrays of one shape and dtype (float32 or
float64), C-contiguous, writeable, not overlapping; hyperparameters are Python scalars. Every
function updates ``param`` and its state in place and returns ``None``; ``grad`` is only read.

Dtype: arithmetic stays in the arrays' dtype. Python floats and ints are "weak" scalars in NumPy 2,
so ``lr * g`` with a float32 ``g`` is float32. NumPy scalars (``np.float64``) are not weak, so any
scalar computed here is a Python float (``math`` module or ``float()``), never a NumPy scalar.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "delta_bar_delta_step",
    "rmsprop_step",
    "sgd_step",
]


def _ascent(grad, maximize):
    """−g when maximizing (torch's ``maximize``: the update ascends), else g itself."""
    return -grad if maximize else grad


def _l2(grad, param, weight_decay):
    """g + λθ as a new array (the L2 penalty (λ/2)‖θ‖²); ``grad`` itself when λ = 0."""
    if weight_decay == 0:
        return grad
    return grad + weight_decay * param


def sgd_step(param, grad, velocity, *, lr, momentum, nesterov, weight_decay, convention, maximize=False,
             dampening=0.0, step=1):
    """SGD with optional momentum or Nesterov momentum, after g ← −g (``maximize``) and g ← g + λθ.

    plain (α = 0):       θ ← θ − εg
    textbook momentum:   v ← αv − εg;  θ ← θ + v
    textbook nesterov:   v ← αv − εg;  θ ← θ + αv − εg     (look-ahead reparametrization)
    torch momentum:      b ← αb + g;   θ ← θ − εb
    torch nesterov:      b ← αb + g;   θ ← θ − ε(g + αb)

    ``velocity`` holds v (textbook) or b (torch); it is not touched when α = 0.

    ``dampening`` τ (torch's, with momentum, not Nesterov): from update ``step`` = 2 on, g in the
    velocity's update is (1 − τ)g (the first update copies g into b = 0 undamped):
    textbook v ← αv − ε(1 − τ)g, torch b ← αb + (1 − τ)g.
    """
    g = _l2(_ascent(grad, maximize), param, weight_decay)
    if momentum == 0:
        param[...] = param - lr * g
        return
    if dampening != 0 and step > 1:
        g = (1 - dampening) * g
    if convention == "textbook":
        velocity[...] = momentum * velocity - lr * g
        if nesterov:
            param[...] = param + momentum * velocity - lr * g
        else:
            param[...] = param + velocity
    else:  # torch
        velocity[...] = momentum * velocity + g
        if nesterov:
            param[...] = param - lr * (g + momentum * velocity)
        else:
            param[...] = param - lr * velocity


def adagrad_step(param, grad, accumulator, *, lr, eps, weight_decay, maximize=False, lr_decay=0.0, step=1):
    """AdaGrad, after g ← g + λθ (both conventions):

    r ← r + g ⊙ g
    θ ← θ − ε g / (δ + √r)

    g is −g first with ``maximize``; with ``lr_decay`` κ, update ``step`` = t (1 on the first) uses
    ε/(1 + (t − 1)κ) for ε (torch's rule).
    """
    g = _l2(_ascent(grad, maximize), param, weight_decay)
    lr = lr / (1 + (int(step) - 1) * float(lr_decay))
    accumulator[...] = accumulator + g * g
    param[...] = param - lr * g / (eps + np.sqrt(accumulator))


def rmsprop_step(param, grad, square_avg, grad_avg, velocity, *, lr, rho, eps, momentum, nesterov,
                 centered, weight_decay, convention, maximize=False):
    """RMSProp, optionally centered and with momentum, after g ← −g (``maximize``) and g ← g + λθ.

    r ← ρr + (1 − ρ) g ⊙ g
    s ← ρs + (1 − ρ) g                      (centered only; ``grad_avg`` holds s)

    textbook: d = √(δ + r)   (centered: √(δ + r − s ⊙ s)),  u = εg / d
        θ ← θ − u                            (α = 0)
        v ← αv − u;  θ ← θ + v               (momentum)
        v ← αv − u;  θ ← θ + αv − u          (nesterov)
    torch:    d = √r + δ     (centered: √(r − s ⊙ s) + δ)
        θ ← θ − εg / d                       (α = 0)
        b ← αb + g / d;  θ ← θ − εb          (momentum; ``velocity`` holds b)
    """
    g = _l2(_ascent(grad, maximize), param, weight_decay)
    square_avg[...] = rho * square_avg + (1 - rho) * g * g
    r = square_avg
    if centered:
        grad_avg[...] = rho * grad_avg + (1 - rho) * g
        s = grad_avg

    if convention == "textbook":
        if centered:
            d = np.sqrt(eps + r - s * s)
        else:
            d = np.sqrt(eps + r)
        u = lr * g / d
        if momentum == 0:
            param[...] = param - u
        else:
            velocity[...] = momentum * velocity - u
            if nesterov:
                param[...] = param + momentum * velocity - u
            else:
                param[...] = param + velocity
    else:  # torch
        if centered:
            d = np.sqrt(r - s * s) + eps
        else:
            d = np.sqrt(r) + eps
        if momentum == 0:
            param[...] = param - lr * g / d
        else:
            velocity[...] = momentum * velocity + g / d
            param[...] = param - lr * velocity


def adadelta_step(param, grad, square_avg, acc_delta, *, lr, rho, eps, weight_decay, convention, maximize=False):
    """AdaDelta, after g ← −g (``maximize``) and g ← g + λθ (``square_avg`` holds r, ``acc_delta``
    holds u):

    r ← ρr + (1 − ρ) g ⊙ g
    Δ ← √(u + δ) / √(r + δ) ⊙ g
    θ ← θ − εΔ
    textbook: u ← ρu + (1 − ρ) (εΔ) ⊙ (εΔ)     (the squared step actually applied)
    torch:    u ← ρu + (1 − ρ) Δ ⊙ Δ
    """
    g = _l2(_ascent(grad, maximize), param, weight_decay)
    square_avg[...] = rho * square_avg + (1 - rho) * g * g
    delta = np.sqrt(acc_delta + eps) / np.sqrt(square_avg + eps) * g
    param[...] = param - lr * delta
    if convention == "textbook":
        applied = lr * delta
        acc_delta[...] = rho * acc_delta + (1 - rho) * applied * applied
    else:  # torch
        acc_delta[...] = rho * acc_delta + (1 - rho) * delta * delta


def adam_step(param, grad, m, v, v_max, *, step, lr, beta1, beta2, eps, weight_decay,
              decoupled_weight_decay, amsgrad, maximize=False):
    """Adam (L2 weight decay g ← g + λθ) or AdamW (decoupled: θ ← θ − ελθ first, g as is), after
    g ← −g with ``maximize``.

    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) g ⊙ g
    v_max ← max(v_max, v)                (amsgrad only; then v_max replaces v below)
    m̂ = m / (1 − β1ᵗ),   v̂ = v / (1 − β2ᵗ)
    θ ← θ − ε m̂ / (δ + √v̂)

    ``step`` is t, 1 on the first update.
    """
    grad = _ascent(grad, maximize)
    if decoupled_weight_decay:
        if weight_decay != 0:
            param[...] = param - lr * weight_decay * param
        g = grad
    else:
        g = _l2(grad, param, weight_decay)

    m[...] = beta1 * m + (1 - beta1) * g
    v[...] = beta2 * v + (1 - beta2) * g * g
    if amsgrad:
        np.maximum(v_max, v, out=v_max)
        second = v_max
    else:
        second = v

    # Python floats (weak scalars): the bias corrections must not turn float32 arrays into float64.
    bias_correction1 = float(1 - beta1 ** int(step))
    bias_correction2 = float(1 - beta2 ** int(step))
    m_hat = m / bias_correction1
    v_hat = second / bias_correction2
    param[...] = param - lr * m_hat / (eps + np.sqrt(v_hat))


def delta_bar_delta_step(param, grad, rates, delta_bar, *, kappa, phi, gamma):
    """Delta-bar-delta (``rates`` holds e, ``delta_bar`` holds δ̄), in this order:

    θ ← θ − e ⊙ g                           (with the rates before this step's change)
    e ← e + Δe,   Δe = κ    where δ̄ ⊙ g > 0
                       −φe  where δ̄ ⊙ g < 0
                       0    otherwise          (δ̄ from the previous step)
    δ̄ ← (1 − γ) g + γ δ̄
    """
    param[...] = param - rates * grad
    agreement = delta_bar * grad
    rates[...] = np.where(agreement > 0, rates + kappa,
                          np.where(agreement < 0, rates - phi * rates, rates))
    delta_bar[...] = (1 - gamma) * grad + gamma * delta_bar
