"""Optimizer updates of the ``"numba"`` backend: fused, parallel, single-pass CPU kernels.

Each host function (``sgd_step`` ... ``delta_bar_delta_step``, the backend contract of
``fastopt.functional``) computes the per-step scalars once in float64, rounds them to the arrays'
dtype and launches one kernel that streams the arrays once: every element of θ, g and the state
is read once and θ and the state are written once; g is only read (L2 weight decay g + λθ is
formed in a register). The equations are those of ``docs/algorithms.md``, in its notation.

Kernels, one per state set (the variant a configuration uses is picked on the host):

    _sgd                         θ                      α = 0, both conventions
    _sgd_momentum                θ, v                   momentum, both conventions (scalars c, k)
    _sgd_nesterov                θ, v                   Nesterov, textbook
    _sgd_nesterov_torch          θ, b                   Nesterov, torch
    _adagrad                     θ, r
    _rmsprop                     θ, r                   α = 0, both conventions (δ_in, δ_out)
    _rmsprop_centered            θ, r, s
    _rmsprop_momentum            θ, r, v                momentum, both conventions (δ_in, δ_out, c, k)
    _rmsprop_momentum_centered   θ, r, s, v
    _rmsprop_nesterov            θ, r, v                Nesterov, textbook
    _rmsprop_nesterov_centered   θ, r, s, v
    _adadelta                    θ, r, u                both conventions (scalar c)
    _adam                        θ, m, v                Adam and AdamW
    _adam_amsgrad                θ, m, v, v_max
    _delta_bar_delta             θ, e, δ̄

Memory traffic per element, with b the dtype's size in bytes (4 or 8): a kernel with k state
arrays reads θ, g and the k states and writes θ and the k states, (2k + 3)·b bytes: 3b for SGD,
5b for SGD with momentum, AdaGrad and plain RMSProp, 7b for AdaDelta, Adam, delta-bar-delta and
RMSProp centered or with momentum, 9b for centered RMSProp with momentum and Adam with amsgrad.

Float32 kernels compute in float32 only: every scalar arrives typed as the arrays' dtype, the
only literal is the integer 0 in comparisons (which compiles to a float32 compare), and
``math.sqrt`` of a float32 is a float32 square root. Divisions in the parallel loops follow IEEE
rules (x/0 gives ±inf or NaN and raises nothing). No fastmath, so results round as written.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange, types

from ._jit import kernel

__all__ = [
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "delta_bar_delta_step",
    "rmsprop_step",
    "sgd_step",
]


def _signatures(arrays: int, scalars: int) -> list:
    """float32 and float64 signatures of a kernel taking ``arrays`` 1-D arrays, then ``scalars``.

    The second array is the gradient, typed read-only: the kernels never write it, and a caller
    may pass a read-only gradient.
    """
    signatures = []
    for dtype in (types.float32, types.float64):
        written = types.Array(dtype, 1, "C")
        read = types.Array(dtype, 1, "C", readonly=True)
        signatures.append(types.void(written, read, *[written] * (arrays - 2), *[dtype] * scalars))
    return signatures


@numba.njit(inline="always")
def _l2(g, p, weight_decay):
    """g + λθ, the gradient of the L2-penalized objective; g itself when λ = 0, so that λ = 0
    never turns an infinite θ into NaN. Inlined into every kernel that takes weight decay."""
    if weight_decay != 0:
        return g + weight_decay * p
    return g


# ---------------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------------


@kernel(_signatures(2, 2))
def _sgd(param, grad, lr, weight_decay):
    """SGD without momentum (both conventions):

    g ← g + λθ   (when λ ≠ 0)
    θ ← θ − εg
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        param[i] = p - lr * g


@kernel(_signatures(3, 4))
def _sgd_momentum(param, grad, velocity, momentum, c, k, weight_decay):
    """SGD with momentum, both conventions through the scalars c and k:

    g ← g + λθ   (when λ ≠ 0)
    v ← αv + c g
    θ ← θ + k v

    textbook (c = −ε, k = 1):  v ← αv − εg;  θ ← θ + v
    torch    (c = 1, k = −ε):  b ← αb + g;   θ ← θ − εb
    Multiplying by ±1 and adding a negated product are exact, so each convention rounds as its
    own equations.
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        v = momentum * velocity[i] + c * g
        velocity[i] = v
        param[i] = p + k * v


@kernel(_signatures(3, 3))
def _sgd_nesterov(param, grad, velocity, lr, momentum, weight_decay):
    """SGD with Nesterov momentum, textbook (look-ahead reparametrization):

    g ← g + λθ   (when λ ≠ 0)
    v ← αv − εg
    θ ← θ + αv − εg      (v the new velocity)
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        step = lr * g
        v = momentum * velocity[i] - step
        velocity[i] = v
        param[i] = p + momentum * v - step


@kernel(_signatures(3, 3))
def _sgd_nesterov_torch(param, grad, velocity, lr, momentum, weight_decay):
    """SGD with Nesterov momentum, torch (``velocity`` holds b):

    g ← g + λθ   (when λ ≠ 0)
    b ← αb + g
    θ ← θ − ε(g + αb)    (b the new buffer)
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        b = momentum * velocity[i] + g
        velocity[i] = b
        param[i] = p - lr * (g + momentum * b)


def sgd_step(param, grad, velocity, *, lr, momentum, nesterov, weight_decay, convention):
    """SGD, optionally with (Nesterov) momentum, in place; ``velocity`` is ignored when α = 0."""
    t = param.dtype.type
    p = param.reshape(-1)
    g = grad.reshape(-1)
    if momentum == 0:
        _sgd(p, g, t(lr), t(weight_decay))
        return
    v = velocity.reshape(-1)
    if nesterov:
        nesterov_kernel = _sgd_nesterov if convention == "textbook" else _sgd_nesterov_torch
        nesterov_kernel(p, g, v, t(lr), t(momentum), t(weight_decay))
        return
    c, k = (-lr, 1.0) if convention == "textbook" else (1.0, -lr)
    _sgd_momentum(p, g, v, t(momentum), t(c), t(k), t(weight_decay))


# ---------------------------------------------------------------------------------------------
# AdaGrad
# ---------------------------------------------------------------------------------------------


@kernel(_signatures(3, 3))
def _adagrad(param, grad, accumulator, lr, eps, weight_decay):
    """AdaGrad (both conventions):

    g ← g + λθ   (when λ ≠ 0)
    r ← r + g ⊙ g
    θ ← θ − εg / (δ + √r)
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        r = accumulator[i] + g * g
        accumulator[i] = r
        param[i] = p - lr * g / (eps + math.sqrt(r))


def adagrad_step(param, grad, accumulator, *, lr, eps, weight_decay):
    """AdaGrad in place."""
    t = param.dtype.type
    _adagrad(param.reshape(-1), grad.reshape(-1), accumulator.reshape(-1),
             t(lr), t(eps), t(weight_decay))


# ---------------------------------------------------------------------------------------------
# RMSProp
#
# The denominator of both conventions is d = √(δ_in + r) + δ_out (centered: √(δ_in + r − s⊙s)
# + δ_out): textbook δ_in = δ, δ_out = 0, i.e. √(δ + r); torch δ_in = 0, δ_out = δ, i.e. √r + δ.
# Adding the zero is exact.
# ---------------------------------------------------------------------------------------------


@kernel(_signatures(3, 6))
def _rmsprop(param, grad, square_avg, lr, rho, one_minus_rho, eps_in, eps_out, weight_decay):
    """RMSProp without momentum, both conventions:

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    d = √(δ_in + r) + δ_out     (textbook √(δ + r), torch √r + δ)
    θ ← θ − εg / d
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        r = rho * square_avg[i] + one_minus_rho * g * g
        square_avg[i] = r
        d = math.sqrt(eps_in + r) + eps_out
        param[i] = p - lr * g / d


@kernel(_signatures(4, 6))
def _rmsprop_centered(param, grad, square_avg, grad_avg, lr, rho, one_minus_rho, eps_in, eps_out,
                      weight_decay):
    """Centered RMSProp without momentum, both conventions:

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    s ← ρs + (1 − ρ) g
    d = √(δ_in + r − s ⊙ s) + δ_out     (textbook √(δ + r − s⊙s), torch √(r − s⊙s) + δ)
    θ ← θ − εg / d
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        r = rho * square_avg[i] + one_minus_rho * g * g
        s = rho * grad_avg[i] + one_minus_rho * g
        square_avg[i] = r
        grad_avg[i] = s
        d = math.sqrt(eps_in + r - s * s) + eps_out
        param[i] = p - lr * g / d


@kernel(_signatures(4, 8))
def _rmsprop_momentum(param, grad, square_avg, velocity, rho, one_minus_rho, eps_in, eps_out,
                      momentum, c, k, weight_decay):
    """RMSProp with momentum, both conventions through δ_in, δ_out, c and k:

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    d = √(δ_in + r) + δ_out
    v ← αv + c g / d
    θ ← θ + k v

    textbook (c = −ε, k = 1):  d = √(δ + r); u = εg/d;  v ← αv − u;       θ ← θ + v
    torch    (c = 1, k = −ε):  d = √r + δ;              b ← αb + g / d;   θ ← θ − εb
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        r = rho * square_avg[i] + one_minus_rho * g * g
        square_avg[i] = r
        d = math.sqrt(eps_in + r) + eps_out
        v = momentum * velocity[i] + c * g / d
        velocity[i] = v
        param[i] = p + k * v


@kernel(_signatures(5, 8))
def _rmsprop_momentum_centered(param, grad, square_avg, grad_avg, velocity, rho, one_minus_rho,
                               eps_in, eps_out, momentum, c, k, weight_decay):
    """Centered RMSProp with momentum, both conventions through δ_in, δ_out, c and k:

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    s ← ρs + (1 − ρ) g
    d = √(δ_in + r − s ⊙ s) + δ_out
    v ← αv + c g / d
    θ ← θ + k v

    textbook (c = −ε, k = 1):  d = √(δ + r − s⊙s); u = εg/d;  v ← αv − u;      θ ← θ + v
    torch    (c = 1, k = −ε):  d = √(r − s⊙s) + δ;            b ← αb + g / d;  θ ← θ − εb
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        r = rho * square_avg[i] + one_minus_rho * g * g
        s = rho * grad_avg[i] + one_minus_rho * g
        square_avg[i] = r
        grad_avg[i] = s
        d = math.sqrt(eps_in + r - s * s) + eps_out
        v = momentum * velocity[i] + c * g / d
        velocity[i] = v
        param[i] = p + k * v


@kernel(_signatures(4, 6))
def _rmsprop_nesterov(param, grad, square_avg, velocity, lr, rho, one_minus_rho, eps, momentum,
                      weight_decay):
    """RMSProp with Nesterov momentum, textbook only (look-ahead reparametrization):

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    u = εg / √(δ + r)
    v ← αv − u
    θ ← θ + αv − u      (v the new velocity)
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        r = rho * square_avg[i] + one_minus_rho * g * g
        square_avg[i] = r
        u = lr * g / math.sqrt(eps + r)
        v = momentum * velocity[i] - u
        velocity[i] = v
        param[i] = p + momentum * v - u


@kernel(_signatures(5, 6))
def _rmsprop_nesterov_centered(param, grad, square_avg, grad_avg, velocity, lr, rho, one_minus_rho,
                               eps, momentum, weight_decay):
    """Centered RMSProp with Nesterov momentum, textbook only (look-ahead reparametrization):

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    s ← ρs + (1 − ρ) g
    u = εg / √(δ + r − s ⊙ s)
    v ← αv − u
    θ ← θ + αv − u      (v the new velocity)
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        r = rho * square_avg[i] + one_minus_rho * g * g
        s = rho * grad_avg[i] + one_minus_rho * g
        square_avg[i] = r
        grad_avg[i] = s
        u = lr * g / math.sqrt(eps + r - s * s)
        v = momentum * velocity[i] - u
        velocity[i] = v
        param[i] = p + momentum * v - u


def rmsprop_step(param, grad, square_avg, grad_avg, velocity, *, lr, rho, eps, momentum, nesterov,
                 centered, weight_decay, convention):
    """RMSProp in place; ``grad_avg`` is ignored unless centered, ``velocity`` when α = 0.

    ``nesterov`` is textbook only (the API rejects it with convention="torch").
    """
    t = param.dtype.type
    p = param.reshape(-1)
    g = grad.reshape(-1)
    r = square_avg.reshape(-1)
    s = (grad_avg.reshape(-1),) if centered else ()
    one_minus_rho = 1.0 - rho
    eps_in, eps_out = (eps, 0.0) if convention == "textbook" else (0.0, eps)
    if momentum == 0:
        plain_kernel = _rmsprop_centered if centered else _rmsprop
        plain_kernel(p, g, r, *s, t(lr), t(rho), t(one_minus_rho), t(eps_in), t(eps_out),
                     t(weight_decay))
        return
    v = velocity.reshape(-1)
    if nesterov:
        nesterov_kernel = _rmsprop_nesterov_centered if centered else _rmsprop_nesterov
        nesterov_kernel(p, g, r, *s, v, t(lr), t(rho), t(one_minus_rho), t(eps), t(momentum),
                        t(weight_decay))
        return
    c, k = (-lr, 1.0) if convention == "textbook" else (1.0, -lr)
    momentum_kernel = _rmsprop_momentum_centered if centered else _rmsprop_momentum
    momentum_kernel(p, g, r, *s, v, t(rho), t(one_minus_rho), t(eps_in), t(eps_out), t(momentum),
                    t(c), t(k), t(weight_decay))


# ---------------------------------------------------------------------------------------------
# AdaDelta
# ---------------------------------------------------------------------------------------------


@kernel(_signatures(4, 6))
def _adadelta(param, grad, square_avg, acc_delta, lr, rho, one_minus_rho, eps, c, weight_decay):
    """AdaDelta, both conventions through the scalar c:

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    Δ ← √(u + δ) / √(r + δ) ⊙ g
    θ ← θ − εΔ
    u ← ρu + (1 − ρ) (cΔ) ⊙ (cΔ)

    textbook c = ε (the squared step applied to θ), torch c = 1 (the step before ε).
    """
    for i in prange(param.shape[0]):
        p = param[i]
        g = _l2(grad[i], p, weight_decay)
        r = rho * square_avg[i] + one_minus_rho * g * g
        square_avg[i] = r
        u = acc_delta[i]
        delta = math.sqrt(u + eps) / math.sqrt(r + eps) * g
        param[i] = p - lr * delta
        w = c * delta
        acc_delta[i] = rho * u + one_minus_rho * w * w


def adadelta_step(param, grad, square_avg, acc_delta, *, lr, rho, eps, weight_decay, convention):
    """AdaDelta in place."""
    t = param.dtype.type
    c = lr if convention == "textbook" else 1.0
    _adadelta(param.reshape(-1), grad.reshape(-1), square_avg.reshape(-1), acc_delta.reshape(-1),
              t(lr), t(rho), t(1.0 - rho), t(eps), t(c), t(weight_decay))


# ---------------------------------------------------------------------------------------------
# Adam and AdamW
#
# The host passes step_size = ε / (1 − β1ᵗ) and inv_sqrt_bc2 = 1 / √(1 − β2ᵗ); the kernel
# evaluates θ ← θ − step_size m / (δ + √v · inv_sqrt_bc2), which is θ − ε m̂ / (δ + √v̂).
# ---------------------------------------------------------------------------------------------


@kernel(_signatures(4, 9))
def _adam(param, grad, m, v, step_size, inv_sqrt_bc2, beta1, one_minus_beta1, beta2,
          one_minus_beta2, eps, weight_decay, decay):
    """Adam (λ = weight_decay, L2) and AdamW (decay = ελ, decoupled); the host zeroes the other:

    θ ← θ − ελθ                 (AdamW, when ελ ≠ 0)
    g ← g + λθ                  (Adam, when λ ≠ 0)
    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) g ⊙ g
    θ ← θ − (ε / (1 − β1ᵗ)) m / (δ + √v / √(1 − β2ᵗ))
    """
    for i in prange(param.shape[0]):
        p = param[i]
        if decay != 0:
            p = p - decay * p
        g = _l2(grad[i], p, weight_decay)
        mi = beta1 * m[i] + one_minus_beta1 * g
        vi = beta2 * v[i] + one_minus_beta2 * g * g
        m[i] = mi
        v[i] = vi
        param[i] = p - step_size * mi / (eps + math.sqrt(vi) * inv_sqrt_bc2)


@kernel(_signatures(5, 9))
def _adam_amsgrad(param, grad, m, v, v_max, step_size, inv_sqrt_bc2, beta1, one_minus_beta1, beta2,
                  one_minus_beta2, eps, weight_decay, decay):
    """Adam / AdamW with amsgrad (λ = weight_decay, L2; decay = ελ, decoupled):

    θ ← θ − ελθ                 (AdamW, when ελ ≠ 0)
    g ← g + λθ                  (Adam, when λ ≠ 0)
    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) g ⊙ g
    v_max ← max(v_max, v)       (NaN propagates, as numpy.maximum)
    θ ← θ − (ε / (1 − β1ᵗ)) m / (δ + √v_max / √(1 − β2ᵗ))
    """
    for i in prange(param.shape[0]):
        p = param[i]
        if decay != 0:
            p = p - decay * p
        g = _l2(grad[i], p, weight_decay)
        mi = beta1 * m[i] + one_minus_beta1 * g
        vi = beta2 * v[i] + one_minus_beta2 * g * g
        vmax = np.maximum(v_max[i], vi)
        m[i] = mi
        v[i] = vi
        v_max[i] = vmax
        param[i] = p - step_size * mi / (eps + math.sqrt(vmax) * inv_sqrt_bc2)


def adam_step(param, grad, m, v, v_max, *, step, lr, beta1, beta2, eps, weight_decay,
              decoupled_weight_decay, amsgrad):
    """Adam or AdamW (``decoupled_weight_decay``) in place; ``v_max`` is ignored unless amsgrad."""
    t = param.dtype.type
    step_size = lr / (1.0 - beta1 ** step)
    inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - beta2 ** step)
    if decoupled_weight_decay:
        l2, decay = 0.0, lr * weight_decay
    else:
        l2, decay = weight_decay, 0.0
    scalars = (t(step_size), t(inv_sqrt_bc2), t(beta1), t(1.0 - beta1), t(beta2), t(1.0 - beta2),
               t(eps), t(l2), t(decay))
    arrays = (param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1))
    if amsgrad:
        _adam_amsgrad(*arrays, v_max.reshape(-1), *scalars)
    else:
        _adam(*arrays, *scalars)


# ---------------------------------------------------------------------------------------------
# Delta-bar-delta
# ---------------------------------------------------------------------------------------------


@kernel(_signatures(4, 4))
def _delta_bar_delta(param, grad, rates, delta_bar, kappa, phi, gamma, one_minus_gamma):
    """Delta-bar-delta (textbook), in this order:

    θ ← θ − e ⊙ g                       (the rates before this step's change)
    e ← e + Δe,   Δe = κ    where δ̄ ⊙ g > 0
                       −φe  where δ̄ ⊙ g < 0
                       0    otherwise   (δ̄ from the previous step)
    δ̄ ← (1 − γ) g + γ δ̄
    """
    for i in prange(param.shape[0]):
        g = grad[i]
        e = rates[i]
        db = delta_bar[i]
        param[i] = param[i] - e * g
        agreement = db * g
        new_e = e
        if agreement > 0:
            new_e = e + kappa
        elif agreement < 0:
            new_e = e - phi * e
        rates[i] = new_e
        delta_bar[i] = one_minus_gamma * g + gamma * db


def delta_bar_delta_step(param, grad, rates, delta_bar, *, kappa, phi, gamma):
    """Delta-bar-delta in place."""
    t = param.dtype.type
    _delta_bar_delta(param.reshape(-1), grad.reshape(-1), rates.reshape(-1), delta_bar.reshape(-1),
                     t(kappa), t(phi), t(gamma), t(1.0 - gamma))
