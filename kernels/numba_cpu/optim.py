"""Optimizer updates of the ``"numba"`` backend: fused, parallel, single-pass CPU kernels.

Each host function (``sgd_step`` ... ``delta_bar_delta_step`` and ``multi_step``, the backend
contract of ``docs/backends.md``) computes the per-step scalars once in float64, rounds them to
the arrays' dtype and launches one kernel over a list of tensors (``multi.py``; a single-tensor
step is a list of one) that streams every array once: θ, g and the state are read once, θ and the
state written once; g is only read. The equations are those of ``docs/algorithms.md``.

Per element, every kernel runs the training-step extras of ``docs/backends.md`` around its
update, in the arrays' dtype:

    g ← g · grad_mul                          (exact for grad_mul = 1)
    g ← c if g > c, −c if g < −c, else g      (c = grad_clip; NaN passes; no-op for c = ∞)
    θ ← update(θ, g, state)                   (L2 weight decay g + λθ uses this g)
    θ̂ ← θ̂ + w (θ − θ̂)                        (averaged variant only, θ the new parameter)

so the defaults reproduce the plain update bit for bit.

Structure (the loop is written once, in ``_run_part``, for all updates and both variants):

* ``@_update(k)`` on ``_X(p, g, s, i, h)``, one optimizer's element update with its equations in
  its docstring: p and g are θᵢ and the transformed gᵢ, ``s`` the tuple of three state pointers
  (unused ones null), ``h`` the tuple of its k host scalars; it reads and writes ``s[j][i]`` and
  returns the new θᵢ. The decorator makes ``_X`` an ``_UpdateKernel``: the element update, and
  its part runner in two variants (``.plain``, ``.averaged``).
* A part runner (``runners.py``) is ``_run_part`` with the element update, its scalar count and
  the variant bound as compile-time constants, compiled at its first use as a C function per
  dtype (float32, float64) and cached on disk. It walks one contiguous part of the tensor list
  and runs the extras and the inlined element update in a simple inner loop per tensor piece,
  started at θ's first 64-byte aligned element (``multi.aligned_split``). The plain variant
  neither branches on the average nor touches θ̂.
* One kernel launches every runner: ``runners.launch_parts``, a ``prange`` over the parts calling
  the runner through its address. For a list of fewer than ``multi.SERIAL_BELOW`` (32,768)
  elements ``multi_step`` launches its serial twin (``_jit``): the parts run in order on the
  calling thread with no parallel region to open and join, and a program on small arrays never
  compiles the parallel launcher. So an update's loop compiles once per variant and dtype, in
  about 0.5 s, and nothing else compiles per update.

Kernels, one per state set (the one a configuration uses is picked on the host by ``_PLANS``):

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
arrays reads θ, g and the k states and writes θ and the k states, (2k + 3)·b bytes (3b for SGD, 5b
for SGD with momentum, AdaGrad and plain RMSProp, 7b for AdaDelta, Adam, delta-bar-delta and RMSProp
centered or with momentum, 9b for centered RMSProp with momentum and Adam with amsgrad); the
averaged variant adds 2b (θ̂ read and written).

Float32 kernels compute in float32 only: every scalar arrives typed as the arrays' dtype, the
only literal is the integer 0 in comparisons (which compiles to a float32 compare), and
``math.sqrt`` of a float32 is a float32 square root. Divisions follow IEEE rules (x/0 gives ±inf
or NaN and raises nothing: ``error_model="numpy"``). No fastmath, so results round as written.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .multi import (AVG, COLUMNS, GRAD, PARAM, SERIAL_BELOW, STATE, aligned_split, array_at, gather,
                    last_at_most, next_span, part_range, pointer, tuple_at)
from .runners import Runner, launch_parts

__all__ = [
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "delta_bar_delta_step",
    "multi_step",
    "rmsprop_step",
    "sgd_step",
]

_element = numba.njit(inline="always", error_model="numpy")


class _UpdateKernel:
    """One optimizer update: its element update (``element``, inlined wherever it runs; ``scalars``
    host scalars) and its part runner (``runners.Runner``) in two variants, each compiled per
    dtype on first use: ``plain`` and ``averaged`` (with the Polyak average)."""

    def __init__(self, element, scalars: int):
        name = element.__name__
        self.__name__ = name
        self.__doc__ = element.__doc__
        self.element = numba.njit(inline="always", error_model="numpy")(element)
        self.scalars = scalars
        constants = {"_ELEMENT": self.element, "_SCALARS": scalars}
        self.plain = Runner(_run_part, f"{name}_run", {**constants, "_AVERAGED": False})
        self.averaged = Runner(_run_part, f"{name}_run_averaged", {**constants, "_AVERAGED": True})

    @property
    def variants(self):
        return (self.plain, self.averaged)


def _update(scalars: int):
    """Declare an element update ``element(p, g, s, i, h) -> new θᵢ`` taking ``scalars`` host
    scalars: an ``_UpdateKernel`` under the element's name."""
    return lambda element: _UpdateKernel(element, scalars)


@_element
def _l2(g, p, weight_decay):
    """g + λθ, the gradient of the L2-penalized objective; g itself when λ = 0, so that λ = 0
    never turns an infinite θ into NaN."""
    if weight_decay != 0:
        return g + weight_decay * p
    return g


@_element
def _transformed(g, grad_mul, grad_clip):
    """g · grad_mul clamped to ±grad_clip; NaN passes through (both comparisons are false)."""
    g = g * grad_mul
    if g > grad_clip:
        g = grad_clip
    elif g < -grad_clip:
        g = -grad_clip
    return g


# Bound per update and variant by ``runners.Runner`` (compile-time constants):
_ELEMENT = _SCALARS = _AVERAGED = None


def _run_part(part, parts, table_at, rows, offsets_at, count, hyper_at):
    """Part ``part`` of ``parts`` of the tensor list: the extras and the inlined element update
    ``_ELEMENT`` over each tensor piece in the part, in a simple inner loop started at θ's first
    64-byte aligned element (``multi.aligned_split``). ``hyper`` holds the ``_SCALARS`` scalars,
    grad_mul, grad_clip and, when ``_AVERAGED``, the average's weight w. The template of every
    optimizer's part runner (C signature: ``runners.runner_signature``)."""
    table = array_at(table_at, (rows, COLUMNS))
    offsets = array_at(offsets_at, count)
    hyper = array_at(hyper_at, _SCALARS + 3 if _AVERAGED else _SCALARS + 2)
    h = tuple_at(hyper_at, _SCALARS)
    grad_mul = hyper[_SCALARS]
    grad_clip = hyper[_SCALARS + 1]
    lo, hi = part_range(part, parts, offsets[count - 1])
    t = last_at_most(offsets, lo)
    while lo < hi:
        i0, i1, lo = next_span(offsets, t, lo, hi)
        param = pointer(table[t, PARAM], grad_mul)
        grad = pointer(table[t, GRAD], grad_mul)
        state = (pointer(table[t, STATE], grad_mul), pointer(table[t, STATE + 1], grad_mul),
                 pointer(table[t, STATE + 2], grad_mul))
        split = aligned_split(table[t, PARAM], i0, i1, grad_mul)
        for piece in range(2):  # up to one cache line, then from θ's first aligned element
            j0, j1 = (i0, split) if piece == 0 else (split, i1)
            if not _AVERAGED:
                for i in range(j0, j1):
                    g = _transformed(grad[i], grad_mul, grad_clip)
                    param[i] = _ELEMENT(param[i], g, state, i, h)
            else:
                avg_weight = hyper[_SCALARS + 2]
                avg = pointer(table[t, AVG], grad_mul)
                for i in range(j0, j1):
                    g = _transformed(grad[i], grad_mul, grad_clip)
                    p = _ELEMENT(param[i], g, state, i, h)
                    param[i] = p
                    a = avg[i]
                    avg[i] = a + avg_weight * (p - a)
        t += 1


# ---------------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------------


@_update(2)
def _sgd(p, g, s, i, h):
    """SGD without momentum (both conventions):

    g ← g + λθ   (when λ ≠ 0)
    θ ← θ − εg
    """
    lr, weight_decay = h
    return p - lr * _l2(g, p, weight_decay)



@_update(4)
def _sgd_momentum(p, g, s, i, h):
    """SGD with momentum, both conventions through the scalars c and k:

    g ← g + λθ   (when λ ≠ 0)
    v ← αv + c g
    θ ← θ + k v

    textbook (c = −ε, k = 1):  v ← αv − εg;  θ ← θ + v
    torch    (c = 1, k = −ε):  b ← αb + g;   θ ← θ − εb
    Multiplying by ±1 and adding a negated product are exact, so each convention rounds as its
    own equations.
    """
    momentum, c, k, weight_decay = h
    velocity = s[0]
    g = _l2(g, p, weight_decay)
    v = momentum * velocity[i] + c * g
    velocity[i] = v
    return p + k * v



@_update(3)
def _sgd_nesterov(p, g, s, i, h):
    """SGD with Nesterov momentum, textbook (look-ahead reparametrization):

    g ← g + λθ   (when λ ≠ 0)
    v ← αv − εg
    θ ← θ + αv − εg      (v the new velocity)
    """
    lr, momentum, weight_decay = h
    velocity = s[0]
    step = lr * _l2(g, p, weight_decay)
    v = momentum * velocity[i] - step
    velocity[i] = v
    return p + momentum * v - step



@_update(3)
def _sgd_nesterov_torch(p, g, s, i, h):
    """SGD with Nesterov momentum, torch (``velocity`` holds b):

    g ← g + λθ   (when λ ≠ 0)
    b ← αb + g
    θ ← θ − ε(g + αb)    (b the new buffer)
    """
    lr, momentum, weight_decay = h
    velocity = s[0]
    g = _l2(g, p, weight_decay)
    b = momentum * velocity[i] + g
    velocity[i] = b
    return p - lr * (g + momentum * b)



def _sgd_plan(*, lr, momentum, nesterov, weight_decay, convention):
    if momentum == 0:
        return _sgd, (), (lr, weight_decay)
    if nesterov:
        nesterov_kernel = _sgd_nesterov if convention == "textbook" else _sgd_nesterov_torch
        return nesterov_kernel, (0,), (lr, momentum, weight_decay)
    c, k = (-lr, 1.0) if convention == "textbook" else (1.0, -lr)
    return _sgd_momentum, (0,), (momentum, c, k, weight_decay)


# ---------------------------------------------------------------------------------------------
# AdaGrad
# ---------------------------------------------------------------------------------------------


@_update(3)
def _adagrad(p, g, s, i, h):
    """AdaGrad (both conventions):

    g ← g + λθ   (when λ ≠ 0)
    r ← r + g ⊙ g
    θ ← θ − εg / (δ + √r)
    """
    lr, eps, weight_decay = h
    accumulator = s[0]
    g = _l2(g, p, weight_decay)
    r = accumulator[i] + g * g
    accumulator[i] = r
    return p - lr * g / (eps + math.sqrt(r))



def _adagrad_plan(*, lr, eps, weight_decay):
    return _adagrad, (0,), (lr, eps, weight_decay)


# ---------------------------------------------------------------------------------------------
# RMSProp
#
# The denominator of both conventions is d = √(δ_in + r) + δ_out (centered: √(δ_in + r − s⊙s)
# + δ_out): textbook δ_in = δ, δ_out = 0, i.e. √(δ + r); torch δ_in = 0, δ_out = δ, i.e. √r + δ.
# Adding the zero is exact.
# ---------------------------------------------------------------------------------------------


@_update(6)
def _rmsprop(p, g, s, i, h):
    """RMSProp without momentum, both conventions:

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    d = √(δ_in + r) + δ_out     (textbook √(δ + r), torch √r + δ)
    θ ← θ − εg / d
    """
    lr, rho, one_minus_rho, eps_in, eps_out, weight_decay = h
    square_avg = s[0]
    g = _l2(g, p, weight_decay)
    r = rho * square_avg[i] + one_minus_rho * g * g
    square_avg[i] = r
    return p - lr * g / (math.sqrt(eps_in + r) + eps_out)



@_update(6)
def _rmsprop_centered(p, g, s, i, h):
    """Centered RMSProp without momentum, both conventions:

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    s ← ρs + (1 − ρ) g
    d = √(δ_in + r − s ⊙ s) + δ_out     (textbook √(δ + r − s⊙s), torch √(r − s⊙s) + δ)
    θ ← θ − εg / d
    """
    lr, rho, one_minus_rho, eps_in, eps_out, weight_decay = h
    square_avg, grad_avg = s[0], s[1]
    g = _l2(g, p, weight_decay)
    r = rho * square_avg[i] + one_minus_rho * g * g
    a = rho * grad_avg[i] + one_minus_rho * g
    square_avg[i] = r
    grad_avg[i] = a
    return p - lr * g / (math.sqrt(eps_in + r - a * a) + eps_out)



@_update(8)
def _rmsprop_momentum(p, g, s, i, h):
    """RMSProp with momentum, both conventions through δ_in, δ_out, c and k:

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    d = √(δ_in + r) + δ_out
    v ← αv + c g / d
    θ ← θ + k v

    textbook (c = −ε, k = 1):  d = √(δ + r); u = εg/d;  v ← αv − u;       θ ← θ + v
    torch    (c = 1, k = −ε):  d = √r + δ;              b ← αb + g / d;   θ ← θ − εb
    """
    rho, one_minus_rho, eps_in, eps_out, momentum, c, k, weight_decay = h
    square_avg, velocity = s[0], s[1]
    g = _l2(g, p, weight_decay)
    r = rho * square_avg[i] + one_minus_rho * g * g
    square_avg[i] = r
    d = math.sqrt(eps_in + r) + eps_out
    v = momentum * velocity[i] + c * g / d
    velocity[i] = v
    return p + k * v



@_update(8)
def _rmsprop_momentum_centered(p, g, s, i, h):
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
    rho, one_minus_rho, eps_in, eps_out, momentum, c, k, weight_decay = h
    square_avg, grad_avg, velocity = s
    g = _l2(g, p, weight_decay)
    r = rho * square_avg[i] + one_minus_rho * g * g
    a = rho * grad_avg[i] + one_minus_rho * g
    square_avg[i] = r
    grad_avg[i] = a
    d = math.sqrt(eps_in + r - a * a) + eps_out
    v = momentum * velocity[i] + c * g / d
    velocity[i] = v
    return p + k * v



@_update(6)
def _rmsprop_nesterov(p, g, s, i, h):
    """RMSProp with Nesterov momentum, textbook only (look-ahead reparametrization):

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    u = εg / √(δ + r)
    v ← αv − u
    θ ← θ + αv − u      (v the new velocity)
    """
    lr, rho, one_minus_rho, eps, momentum, weight_decay = h
    square_avg, velocity = s[0], s[1]
    g = _l2(g, p, weight_decay)
    r = rho * square_avg[i] + one_minus_rho * g * g
    square_avg[i] = r
    u = lr * g / math.sqrt(eps + r)
    v = momentum * velocity[i] - u
    velocity[i] = v
    return p + momentum * v - u



@_update(6)
def _rmsprop_nesterov_centered(p, g, s, i, h):
    """Centered RMSProp with Nesterov momentum, textbook only (look-ahead reparametrization):

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    s ← ρs + (1 − ρ) g
    u = εg / √(δ + r − s ⊙ s)
    v ← αv − u
    θ ← θ + αv − u      (v the new velocity)
    """
    lr, rho, one_minus_rho, eps, momentum, weight_decay = h
    square_avg, grad_avg, velocity = s
    g = _l2(g, p, weight_decay)
    r = rho * square_avg[i] + one_minus_rho * g * g
    a = rho * grad_avg[i] + one_minus_rho * g
    square_avg[i] = r
    grad_avg[i] = a
    u = lr * g / math.sqrt(eps + r - a * a)
    v = momentum * velocity[i] - u
    velocity[i] = v
    return p + momentum * v - u



def _rmsprop_plan(*, lr, rho, eps, momentum, nesterov, centered, weight_decay, convention):
    """``nesterov`` is textbook only (the API rejects it with convention="torch")."""
    one_minus_rho = 1.0 - rho
    eps_in, eps_out = (eps, 0.0) if convention == "textbook" else (0.0, eps)
    if momentum == 0:
        plain_kernel = _rmsprop_centered if centered else _rmsprop
        slots = (0, 1) if centered else (0,)
        return plain_kernel, slots, (lr, rho, one_minus_rho, eps_in, eps_out, weight_decay)
    slots = (0, 1, 2) if centered else (0, 2)
    if nesterov:
        nesterov_kernel = _rmsprop_nesterov_centered if centered else _rmsprop_nesterov
        return nesterov_kernel, slots, (lr, rho, one_minus_rho, eps, momentum, weight_decay)
    c, k = (-lr, 1.0) if convention == "textbook" else (1.0, -lr)
    momentum_kernel = _rmsprop_momentum_centered if centered else _rmsprop_momentum
    return momentum_kernel, slots, (rho, one_minus_rho, eps_in, eps_out, momentum, c, k,
                                    weight_decay)


# ---------------------------------------------------------------------------------------------
# AdaDelta
# ---------------------------------------------------------------------------------------------


@_update(6)
def _adadelta(p, g, s, i, h):
    """AdaDelta, both conventions through the scalar c:

    g ← g + λθ   (when λ ≠ 0)
    r ← ρr + (1 − ρ) g ⊙ g
    Δ ← √(u + δ) / √(r + δ) ⊙ g
    θ ← θ − εΔ
    u ← ρu + (1 − ρ) (cΔ) ⊙ (cΔ)

    textbook c = ε (the squared step applied to θ), torch c = 1 (the step before ε).
    """
    lr, rho, one_minus_rho, eps, c, weight_decay = h
    square_avg, acc_delta = s[0], s[1]
    g = _l2(g, p, weight_decay)
    r = rho * square_avg[i] + one_minus_rho * g * g
    square_avg[i] = r
    u = acc_delta[i]
    delta = math.sqrt(u + eps) / math.sqrt(r + eps) * g
    w = c * delta
    acc_delta[i] = rho * u + one_minus_rho * w * w
    return p - lr * delta



def _adadelta_plan(*, lr, rho, eps, weight_decay, convention):
    c = lr if convention == "textbook" else 1.0
    return _adadelta, (0, 1), (lr, rho, 1.0 - rho, eps, c, weight_decay)


# ---------------------------------------------------------------------------------------------
# Adam and AdamW
#
# The host passes step_size = ε / (1 − β1ᵗ) and inv_sqrt_bc2 = 1 / √(1 − β2ᵗ); the kernel
# evaluates θ ← θ − step_size m / (δ + √v · inv_sqrt_bc2), which is θ − ε m̂ / (δ + √v̂).
# ---------------------------------------------------------------------------------------------


@_update(9)
def _adam(p, g, s, i, h):
    """Adam (λ = weight_decay, L2) and AdamW (decay = ελ, decoupled); the host zeroes the other:

    θ ← θ − ελθ                 (AdamW, when ελ ≠ 0)
    g ← g + λθ                  (Adam, when λ ≠ 0)
    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) g ⊙ g
    θ ← θ − (ε / (1 − β1ᵗ)) m / (δ + √v / √(1 − β2ᵗ))
    """
    step_size, inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay = h
    m, v = s[0], s[1]
    if decay != 0:
        p = p - decay * p
    g = _l2(g, p, l2)
    mi = beta1 * m[i] + one_minus_beta1 * g
    vi = beta2 * v[i] + one_minus_beta2 * g * g
    m[i] = mi
    v[i] = vi
    return p - step_size * mi / (eps + math.sqrt(vi) * inv_sqrt_bc2)



@_update(9)
def _adam_amsgrad(p, g, s, i, h):
    """Adam / AdamW with amsgrad (λ = weight_decay, L2; decay = ελ, decoupled):

    θ ← θ − ελθ                 (AdamW, when ελ ≠ 0)
    g ← g + λθ                  (Adam, when λ ≠ 0)
    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) g ⊙ g
    v_max ← max(v_max, v)       (NaN propagates, as numpy.maximum)
    θ ← θ − (ε / (1 − β1ᵗ)) m / (δ + √v_max / √(1 − β2ᵗ))
    """
    step_size, inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay = h
    m, v, v_max = s
    if decay != 0:
        p = p - decay * p
    g = _l2(g, p, l2)
    mi = beta1 * m[i] + one_minus_beta1 * g
    vi = beta2 * v[i] + one_minus_beta2 * g * g
    vmax = np.maximum(v_max[i], vi)
    m[i] = mi
    v[i] = vi
    v_max[i] = vmax
    return p - step_size * mi / (eps + math.sqrt(vmax) * inv_sqrt_bc2)



def _adam_plan(*, step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad):
    step_size = lr / (1.0 - beta1 ** step)
    inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - beta2 ** step)
    if decoupled_weight_decay:
        l2, decay = 0.0, lr * weight_decay
    else:
        l2, decay = weight_decay, 0.0
    scalars = (step_size, inv_sqrt_bc2, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, l2, decay)
    if amsgrad:
        return _adam_amsgrad, (0, 1, 2), scalars
    return _adam, (0, 1), scalars


# ---------------------------------------------------------------------------------------------
# Delta-bar-delta
# ---------------------------------------------------------------------------------------------


@_update(4)
def _delta_bar_delta(p, g, s, i, h):
    """Delta-bar-delta (textbook), in this order:

    θ ← θ − e ⊙ g                       (the rates before this step's change)
    e ← e + Δe,   Δe = κ    where δ̄ ⊙ g > 0
                       −φe  where δ̄ ⊙ g < 0
                       0    otherwise   (δ̄ from the previous step)
    δ̄ ← (1 − γ) g + γ δ̄
    """
    kappa, phi, gamma, one_minus_gamma = h
    rates, delta_bar = s[0], s[1]
    e = rates[i]
    db = delta_bar[i]
    agreement = db * g
    new_e = e
    if agreement > 0:
        new_e = e + kappa
    elif agreement < 0:
        new_e = e - phi * e
    rates[i] = new_e
    delta_bar[i] = one_minus_gamma * g + gamma * db
    return p - e * g



def _delta_bar_delta_plan(*, kappa, phi, gamma):
    return _delta_bar_delta, (0, 1), (kappa, phi, gamma, 1.0 - gamma)


# ---------------------------------------------------------------------------------------------
# Host functions: the backend contract
# ---------------------------------------------------------------------------------------------

# op -> plan(**hyperparameters) -> (kernel, the state-tuple entries it uses, in its order, scalars)
_PLANS = {
    "sgd_step": _sgd_plan,
    "adagrad_step": _adagrad_plan,
    "rmsprop_step": _rmsprop_plan,
    "adadelta_step": _adadelta_plan,
    "adam_step": _adam_plan,
    "delta_bar_delta_step": _delta_bar_delta_plan,
}
_PAD = (-1, -1, -1)


def multi_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf,
               avg_weight=0.0, **hyper):
    """``op`` (``"adam_step"``, ...) on every tensor of the lists, in one kernel call.

    ``params``, ``grads``: equal-length lists of arrays of one dtype (shapes may differ);
    ``states``: one tuple per param in the op's state order (``None`` for unused entries);
    ``avgs``: a list of Polyak-average arrays or ``None``. Same results, bit for bit, as calling
    ``op`` once per tensor. Limits: see ``multi.py`` (C-contiguous, one dtype, arrays alive and
    unmodified during the call).
    """
    _launch(_PLANS[op], params, grads, states, avgs, grad_mul, grad_clip, avg_weight, hyper)


def _launch(plan, params, grads, states, avgs, grad_mul, grad_clip, avg_weight, hyper):
    if len(params) == 0:
        return
    dtype = params[0].dtype
    update, slots, scalars = plan(**hyper)
    if grads is None or (states is None and slots):  # the table would hold null addresses
        raise TypeError("multi_step needs grads, and states for this configuration")
    table, offsets = gather(params, grads, states, avgs, (slots + _PAD)[:3])
    if avgs is None:
        runner = update.plain.address(dtype)
        hyper_array = np.array((*scalars, grad_mul, grad_clip), dtype)
    else:
        runner = update.averaged.address(dtype)
        hyper_array = np.array((*scalars, grad_mul, grad_clip, avg_weight), dtype)
    launch = launch_parts if offsets[-1] >= SERIAL_BELOW else launch_parts.serial  # multi.SERIAL_BELOW
    launch(runner, table, offsets, hyper_array)


def _one(op, param, grad, state, grad_mul, grad_clip, avg, avg_weight, hyper):
    _launch(_PLANS[op], [param], [grad], [state], None if avg is None else [avg], grad_mul,
            grad_clip, avg_weight, hyper)


def sgd_step(param, grad, velocity, *, grad_mul=1.0, grad_clip=math.inf, avg=None, avg_weight=0.0,
             **hyper):
    """SGD, optionally with (Nesterov) momentum, in place; ``velocity`` is ignored when α = 0.
    ``hyper``: lr, momentum, nesterov, weight_decay, convention."""
    _one("sgd_step", param, grad, (velocity,), grad_mul, grad_clip, avg, avg_weight, hyper)


def adagrad_step(param, grad, accumulator, *, grad_mul=1.0, grad_clip=math.inf, avg=None,
                 avg_weight=0.0, **hyper):
    """AdaGrad in place. ``hyper``: lr, eps, weight_decay."""
    _one("adagrad_step", param, grad, (accumulator,), grad_mul, grad_clip, avg, avg_weight, hyper)


def rmsprop_step(param, grad, square_avg, grad_avg, velocity, *, grad_mul=1.0, grad_clip=math.inf,
                 avg=None, avg_weight=0.0, **hyper):
    """RMSProp in place; ``grad_avg`` is ignored unless centered, ``velocity`` when α = 0.
    ``hyper``: lr, rho, eps, momentum, nesterov (textbook only), centered, weight_decay,
    convention."""
    _one("rmsprop_step", param, grad, (square_avg, grad_avg, velocity), grad_mul, grad_clip, avg,
         avg_weight, hyper)


def adadelta_step(param, grad, square_avg, acc_delta, *, grad_mul=1.0, grad_clip=math.inf,
                  avg=None, avg_weight=0.0, **hyper):
    """AdaDelta in place. ``hyper``: lr, rho, eps, weight_decay, convention."""
    _one("adadelta_step", param, grad, (square_avg, acc_delta), grad_mul, grad_clip, avg,
         avg_weight, hyper)


def adam_step(param, grad, m, v, v_max, *, grad_mul=1.0, grad_clip=math.inf, avg=None,
              avg_weight=0.0, **hyper):
    """Adam or AdamW (``decoupled_weight_decay``) in place; ``v_max`` is ignored unless amsgrad.
    ``hyper``: step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad."""
    _one("adam_step", param, grad, (m, v, v_max), grad_mul, grad_clip, avg, avg_weight, hyper)


def delta_bar_delta_step(param, grad, rates, delta_bar, *, grad_mul=1.0, grad_clip=math.inf,
                         avg=None, avg_weight=0.0, **hyper):
    """Delta-bar-delta in place. ``hyper``: kappa, phi, gamma."""
    _one("delta_bar_delta_step", param, grad, (rates, delta_bar), grad_mul, grad_clip, avg,
         avg_weight, hyper)
