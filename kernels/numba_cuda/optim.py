"""Optimizer updates of the ``"numba-cuda"`` backend: fused, single-pass CUDA kernels.

Each host function (``sgd_step`` ... ``delta_bar_delta_step``, the backend contract of
``docs/backends.md``) computes the per-step scalars once in float64, rounds them to the arrays'
dtype and launches one kernel that streams the arrays once: every element of θ, g, the state and
the Polyak average is read once and θ, the state and the average are written once; g is only read.
The equations are those of ``docs/algorithms.md``, in its notation; the variants and their
scalars are those of the CPU backend (``fastopt.kernels.numba_cpu.optim``).

Each variant is one element-wise device function (value in, values out) shared by two kernels:

    optim.<variant>         one tensor: a grid-stride loop over its elements
    optim.<variant>.multi   a tensor list (``multi_step``): one launch for all tensors, through a
                            table of device addresses (see ``_tensors``)

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

Training-step extras, fused into every kernel (``docs/backends.md``): per element

    g ← g · grad_mul;  g ← clamp(g, −grad_clip, grad_clip);  the update;  θ̂ ← θ̂ + w (θ − θ̂)

``grad_mul`` is a host float or a device array of shape (1,) (``reduce.grad_multiplier``'s
result), read by each thread from device memory, so a norm never travels to the host. The
defaults (1, ∞, no average) leave g exactly as it is (g·1 and the clamp to ±∞ are exact), so
they reproduce the plain update; there is no separate kernel without the extras.

Float32 kernels compute in float32 only: every scalar arrives typed as the arrays' dtype, the only
literal is the integer 0 in comparisons (a float32 compare), ``math.sqrt`` of a float32 is a float32
square root (``tests/test_numba_cuda_ptx.py`` checks the PTX has no ``.f64`` instruction). No
fastmath, so divisions and square roots are IEEE-rounded; NVVM contracts a·b + c into a fused
multiply-add (its default, as in CUDA C), so results may differ from the CPU backend in the last bit.

Many tensors (``multi_step``): numba-cuda kernels cannot take a list of arrays, so the tensor-list
kernels take an int64 device table of raw device addresses and sizes, one row per tensor, and turn
an address back into an array inside the kernel (an ``inttoptr`` intrinsic). One launch covers
every tensor of one dtype and configuration, balanced by elements (chunks of ``_tensors.CHUNK``);
the table is uploaded asynchronously the first time a tensor list is seen and cached by its
addresses afterwards. Limits (see ``_tensors``): one dtype per call, C-contiguous arrays, tensors
must not overlap, and the arrays must stay alive until the kernel has run.

Launches: a grid-stride grid of at most ``BLOCKS_PER_SM`` blocks per multiprocessor; nothing is
synchronized or copied to or from the host (apart from that asynchronous table upload).
"""

from __future__ import annotations

import math

from numba import cuda, types

from . import _tensors
from ._arrays import address, dtype_of, flat, shape_of, stream_of
from ._jit import THREADS, blocks_for, kernel
from .reduce import multiplier

__all__ = [
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "delta_bar_delta_step",
    "multi_step",
    "rmsprop_step",
    "sgd_step",
]

# ---------------------------------------------------------------------------------------------
# the fused extras around every update


@cuda.jit(device=True)
def _transformed_grad(g, mul, clip):
    """g · grad_mul, clamped to ±grad_clip (NaN compares false both ways and passes through)."""
    g = g * mul
    if g > clip:
        return clip
    if g < -clip:
        return -clip
    return g


@cuda.jit(device=True)
def _averaged(a, p, weight):
    """θ̂ + w (θ − θ̂), θ the new parameter."""
    return a + weight * (p - a)


@cuda.jit(device=True)
def _l2(g, p, weight_decay):
    """g + λθ, the gradient of the L2-penalized objective; g itself when λ = 0, so that λ = 0
    never turns an infinite θ into NaN."""
    if weight_decay != 0:
        return g + weight_decay * p
    return g


# ---------------------------------------------------------------------------------------------
# element-wise updates: (θ, g, state..., scalars...) -> θ' or (θ', state'...)


@cuda.jit(device=True)
def _sgd(p, g, lr, weight_decay):
    """SGD without momentum (both conventions): g ← g + λθ (λ ≠ 0); θ ← θ − εg."""
    g = _l2(g, p, weight_decay)
    return p - lr * g


@cuda.jit(device=True)
def _sgd_momentum(p, g, v, momentum, c, k, weight_decay):
    """SGD with momentum, both conventions: g ← g + λθ; v ← αv + c g; θ ← θ + k v.

    textbook (c = −ε, k = 1): v ← αv − εg; θ ← θ + v.  torch (c = 1, k = −ε): b ← αb + g; θ ← θ − εb.
    """
    g = _l2(g, p, weight_decay)
    v = momentum * v + c * g
    return p + k * v, v


@cuda.jit(device=True)
def _sgd_nesterov(p, g, v, lr, momentum, weight_decay):
    """SGD with Nesterov momentum, textbook: g ← g + λθ; v ← αv − εg; θ ← θ + αv − εg."""
    g = _l2(g, p, weight_decay)
    step = lr * g
    v = momentum * v - step
    return p + momentum * v - step, v


@cuda.jit(device=True)
def _sgd_nesterov_torch(p, g, b, lr, momentum, weight_decay):
    """SGD with Nesterov momentum, torch: g ← g + λθ; b ← αb + g; θ ← θ − ε(g + αb)."""
    g = _l2(g, p, weight_decay)
    b = momentum * b + g
    return p - lr * (g + momentum * b), b


@cuda.jit(device=True)
def _adagrad(p, g, r, lr, eps, weight_decay):
    """AdaGrad: g ← g + λθ; r ← r + g ⊙ g; θ ← θ − εg / (δ + √r)."""
    g = _l2(g, p, weight_decay)
    r = r + g * g
    return p - lr * g / (eps + math.sqrt(r)), r


# RMSProp: the denominator of both conventions is d = √(δ_in + r) + δ_out (centered:
# √(δ_in + r − s⊙s) + δ_out): textbook δ_in = δ, δ_out = 0; torch δ_in = 0, δ_out = δ.


@cuda.jit(device=True)
def _rmsprop(p, g, r, lr, rho, one_minus_rho, eps_in, eps_out, weight_decay):
    """RMSProp, α = 0: g ← g + λθ; r ← ρr + (1 − ρ) g ⊙ g; θ ← θ − εg / (√(δ_in + r) + δ_out)."""
    g = _l2(g, p, weight_decay)
    r = rho * r + one_minus_rho * g * g
    d = math.sqrt(eps_in + r) + eps_out
    return p - lr * g / d, r


@cuda.jit(device=True)
def _rmsprop_centered(p, g, r, s, lr, rho, one_minus_rho, eps_in, eps_out, weight_decay):
    """Centered RMSProp, α = 0: r ← ρr + (1 − ρ) g ⊙ g; s ← ρs + (1 − ρ) g;
    θ ← θ − εg / (√(δ_in + r − s ⊙ s) + δ_out)."""
    g = _l2(g, p, weight_decay)
    r = rho * r + one_minus_rho * g * g
    s = rho * s + one_minus_rho * g
    d = math.sqrt(eps_in + r - s * s) + eps_out
    return p - lr * g / d, r, s


@cuda.jit(device=True)
def _rmsprop_momentum(p, g, r, v, rho, one_minus_rho, eps_in, eps_out, momentum, c, k, weight_decay):
    """RMSProp with momentum: r ← ρr + (1 − ρ) g ⊙ g; d = √(δ_in + r) + δ_out; v ← αv + c g / d;
    θ ← θ + k v  (textbook c = −ε, k = 1; torch c = 1, k = −ε)."""
    g = _l2(g, p, weight_decay)
    r = rho * r + one_minus_rho * g * g
    d = math.sqrt(eps_in + r) + eps_out
    v = momentum * v + c * g / d
    return p + k * v, r, v


@cuda.jit(device=True)
def _rmsprop_momentum_centered(p, g, r, s, v, rho, one_minus_rho, eps_in, eps_out, momentum, c, k,
                               weight_decay):
    """Centered RMSProp with momentum: as _rmsprop_momentum with d = √(δ_in + r − s ⊙ s) + δ_out,
    s ← ρs + (1 − ρ) g."""
    g = _l2(g, p, weight_decay)
    r = rho * r + one_minus_rho * g * g
    s = rho * s + one_minus_rho * g
    d = math.sqrt(eps_in + r - s * s) + eps_out
    v = momentum * v + c * g / d
    return p + k * v, r, s, v


@cuda.jit(device=True)
def _rmsprop_nesterov(p, g, r, v, lr, rho, one_minus_rho, eps, momentum, weight_decay):
    """RMSProp with Nesterov momentum, textbook: r ← ρr + (1 − ρ) g ⊙ g; u = εg / √(δ + r);
    v ← αv − u; θ ← θ + αv − u."""
    g = _l2(g, p, weight_decay)
    r = rho * r + one_minus_rho * g * g
    u = lr * g / math.sqrt(eps + r)
    v = momentum * v - u
    return p + momentum * v - u, r, v


@cuda.jit(device=True)
def _rmsprop_nesterov_centered(p, g, r, s, v, lr, rho, one_minus_rho, eps, momentum, weight_decay):
    """Centered RMSProp with Nesterov momentum, textbook: as _rmsprop_nesterov with
    u = εg / √(δ + r − s ⊙ s), s ← ρs + (1 − ρ) g."""
    g = _l2(g, p, weight_decay)
    r = rho * r + one_minus_rho * g * g
    s = rho * s + one_minus_rho * g
    u = lr * g / math.sqrt(eps + r - s * s)
    v = momentum * v - u
    return p + momentum * v - u, r, s, v


@cuda.jit(device=True)
def _adadelta(p, g, r, u, lr, rho, one_minus_rho, eps, c, weight_decay):
    """AdaDelta: r ← ρr + (1 − ρ) g ⊙ g; Δ ← √(u + δ) / √(r + δ) ⊙ g; θ ← θ − εΔ;
    u ← ρu + (1 − ρ)(cΔ) ⊙ (cΔ)  (textbook c = ε, torch c = 1)."""
    g = _l2(g, p, weight_decay)
    r = rho * r + one_minus_rho * g * g
    delta = math.sqrt(u + eps) / math.sqrt(r + eps) * g
    w = c * delta
    return p - lr * delta, r, rho * u + one_minus_rho * w * w


@cuda.jit(device=True)
def _adam(p, g, m, v, step_size, inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
          weight_decay, decay):
    """Adam (λ = weight_decay, L2) and AdamW (decay = ελ, decoupled):
    θ ← θ − ελθ (AdamW); g ← g + λθ (Adam); m ← β1 m + (1 − β1) g; v ← β2 v + (1 − β2) g ⊙ g;
    θ ← θ − (ε / (1 − β1ᵗ)) m / (δ + √v / √(1 − β2ᵗ))."""
    if decay != 0:
        p = p - decay * p
    g = _l2(g, p, weight_decay)
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    return p - step_size * m / (eps + math.sqrt(v) * inv_sqrt_bc2), m, v


@cuda.jit(device=True)
def _adam_amsgrad(p, g, m, v, v_max, step_size, inv_sqrt_bc2, beta1, one_minus_beta1, beta2,
                  one_minus_beta2, eps, weight_decay, decay):
    """Adam / AdamW with amsgrad: as _adam, then v_max ← max(v_max, v) (NaN propagates, as
    numpy.maximum) replaces v in the denominator."""
    if decay != 0:
        p = p - decay * p
    g = _l2(g, p, weight_decay)
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    if v > v_max or v != v:
        v_max = v
    return p - step_size * m / (eps + math.sqrt(v_max) * inv_sqrt_bc2), m, v, v_max


@cuda.jit(device=True)
def _delta_bar_delta(p, g, e, delta_bar, kappa, phi, gamma, one_minus_gamma):
    """Delta-bar-delta: θ ← θ − e ⊙ g; e ← e + κ where δ̄ ⊙ g > 0, e − φe where δ̄ ⊙ g < 0;
    δ̄ ← (1 − γ) g + γ δ̄ (δ̄ and e from the previous step on the right)."""
    p = p - e * g
    agreement = delta_bar * g
    new_e = e
    if agreement > 0:
        new_e = e + kappa
    elif agreement < 0:
        new_e = e - phi * e
    return p, new_e, one_minus_gamma * g + gamma * delta_bar


# ---------------------------------------------------------------------------------------------
# kernels: one tensor (grid-stride) and a tensor list (table), one pair per state count


def _one_tensor_kernel(update, states):
    """The one-tensor kernel of an update with ``states`` state arrays (0 to 3)."""
    if states == 0:
        def one_tensor(param, grad, avg, mul_array, use_mul_array, mul, clip, avg_weight, has_avg,
                       hyper):
            m = mul_array[0] if use_mul_array else mul
            for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
                p = update(param[i], _transformed_grad(grad[i], m, clip), *hyper)
                param[i] = p
                if has_avg:
                    avg[i] = _averaged(avg[i], p, avg_weight)
    elif states == 1:
        def one_tensor(param, grad, s0, avg, mul_array, use_mul_array, mul, clip, avg_weight,
                       has_avg, hyper):
            m = mul_array[0] if use_mul_array else mul
            for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
                p, a = update(param[i], _transformed_grad(grad[i], m, clip), s0[i], *hyper)
                param[i] = p
                s0[i] = a
                if has_avg:
                    avg[i] = _averaged(avg[i], p, avg_weight)
    elif states == 2:
        def one_tensor(param, grad, s0, s1, avg, mul_array, use_mul_array, mul, clip, avg_weight,
                       has_avg, hyper):
            m = mul_array[0] if use_mul_array else mul
            for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
                p, a, b = update(param[i], _transformed_grad(grad[i], m, clip), s0[i], s1[i], *hyper)
                param[i] = p
                s0[i] = a
                s1[i] = b
                if has_avg:
                    avg[i] = _averaged(avg[i], p, avg_weight)
    else:
        def one_tensor(param, grad, s0, s1, s2, avg, mul_array, use_mul_array, mul, clip, avg_weight,
                       has_avg, hyper):
            m = mul_array[0] if use_mul_array else mul
            for i in range(cuda.grid(1), param.shape[0], cuda.gridsize(1)):
                p, a, b, c = update(param[i], _transformed_grad(grad[i], m, clip), s0[i], s1[i],
                                    s2[i], *hyper)
                param[i] = p
                s0[i] = a
                s1[i] = b
                s2[i] = c
                if has_avg:
                    avg[i] = _averaged(avg[i], p, avg_weight)
    return one_tensor


_CHUNK = _tensors.CHUNK
_view = _tensors.view
_find = _tensors.find


def _tensor_list_kernel(update, states):
    """The tensor-list kernel of an update with ``states`` state arrays: blocks stride over
    chunks of ``_CHUNK`` elements, threads over a chunk's elements. Table row t holds
    (n, first_chunk, θ, g, state..., θ̂ or 0)."""
    if states == 0:
        def tensor_list(table, like, mul_array, use_mul_array, mul, clip, avg_weight, chunks, hyper):
            m = mul_array[0] if use_mul_array else mul
            for q in range(cuda.blockIdx.x, chunks, cuda.gridDim.x):
                t = _find(table, q)
                n = table[t, 0]
                start = (q - table[t, 1]) * _CHUNK
                stop = min(start + _CHUNK, n)
                param = _view(table[t, 2], n, like)
                grad = _view(table[t, 3], n, like)
                has_avg = table[t, 4] != 0
                avg = _view(table[t, 4] if has_avg else table[t, 2], n, like)
                for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
                    p = update(param[i], _transformed_grad(grad[i], m, clip), *hyper)
                    param[i] = p
                    if has_avg:
                        avg[i] = _averaged(avg[i], p, avg_weight)
    elif states == 1:
        def tensor_list(table, like, mul_array, use_mul_array, mul, clip, avg_weight, chunks, hyper):
            m = mul_array[0] if use_mul_array else mul
            for q in range(cuda.blockIdx.x, chunks, cuda.gridDim.x):
                t = _find(table, q)
                n = table[t, 0]
                start = (q - table[t, 1]) * _CHUNK
                stop = min(start + _CHUNK, n)
                param = _view(table[t, 2], n, like)
                grad = _view(table[t, 3], n, like)
                s0 = _view(table[t, 4], n, like)
                has_avg = table[t, 5] != 0
                avg = _view(table[t, 5] if has_avg else table[t, 2], n, like)
                for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
                    p, a = update(param[i], _transformed_grad(grad[i], m, clip), s0[i], *hyper)
                    param[i] = p
                    s0[i] = a
                    if has_avg:
                        avg[i] = _averaged(avg[i], p, avg_weight)
    elif states == 2:
        def tensor_list(table, like, mul_array, use_mul_array, mul, clip, avg_weight, chunks, hyper):
            m = mul_array[0] if use_mul_array else mul
            for q in range(cuda.blockIdx.x, chunks, cuda.gridDim.x):
                t = _find(table, q)
                n = table[t, 0]
                start = (q - table[t, 1]) * _CHUNK
                stop = min(start + _CHUNK, n)
                param = _view(table[t, 2], n, like)
                grad = _view(table[t, 3], n, like)
                s0 = _view(table[t, 4], n, like)
                s1 = _view(table[t, 5], n, like)
                has_avg = table[t, 6] != 0
                avg = _view(table[t, 6] if has_avg else table[t, 2], n, like)
                for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
                    p, a, b = update(param[i], _transformed_grad(grad[i], m, clip), s0[i], s1[i],
                                     *hyper)
                    param[i] = p
                    s0[i] = a
                    s1[i] = b
                    if has_avg:
                        avg[i] = _averaged(avg[i], p, avg_weight)
    else:
        def tensor_list(table, like, mul_array, use_mul_array, mul, clip, avg_weight, chunks, hyper):
            m = mul_array[0] if use_mul_array else mul
            for q in range(cuda.blockIdx.x, chunks, cuda.gridDim.x):
                t = _find(table, q)
                n = table[t, 0]
                start = (q - table[t, 1]) * _CHUNK
                stop = min(start + _CHUNK, n)
                param = _view(table[t, 2], n, like)
                grad = _view(table[t, 3], n, like)
                s0 = _view(table[t, 4], n, like)
                s1 = _view(table[t, 5], n, like)
                s2 = _view(table[t, 6], n, like)
                has_avg = table[t, 7] != 0
                avg = _view(table[t, 7] if has_avg else table[t, 2], n, like)
                for i in range(start + cuda.threadIdx.x, stop, cuda.blockDim.x):
                    p, a, b, c = update(param[i], _transformed_grad(grad[i], m, clip), s0[i], s1[i],
                                        s2[i], *hyper)
                    param[i] = p
                    s0[i] = a
                    s1[i] = b
                    s2[i] = c
                    if has_avg:
                        avg[i] = _averaged(avg[i], p, avg_weight)
    return tensor_list


def _one_tensor_signature(states, scalars):
    def signature(dt):
        array = dt[::1]
        return types.void(*[array] * (2 + states), array, array, types.boolean, dt, dt, dt,
                          types.boolean, types.UniTuple(dt, scalars))
    return signature


def _tensor_list_signature(scalars):
    def signature(dt):
        array = dt[::1]
        return types.void(types.int64[:, ::1], array, array, types.boolean, dt, dt, dt, types.int64,
                          types.UniTuple(dt, scalars))
    return signature


# variant -> (element update, state arrays, scalars)
_VARIANTS = {
    "sgd": (_sgd, 0, 2),
    "sgd_momentum": (_sgd_momentum, 1, 4),
    "sgd_nesterov": (_sgd_nesterov, 1, 3),
    "sgd_nesterov_torch": (_sgd_nesterov_torch, 1, 3),
    "adagrad": (_adagrad, 1, 3),
    "rmsprop": (_rmsprop, 1, 6),
    "rmsprop_centered": (_rmsprop_centered, 2, 6),
    "rmsprop_momentum": (_rmsprop_momentum, 2, 8),
    "rmsprop_momentum_centered": (_rmsprop_momentum_centered, 3, 8),
    "rmsprop_nesterov": (_rmsprop_nesterov, 2, 6),
    "rmsprop_nesterov_centered": (_rmsprop_nesterov_centered, 3, 6),
    "adadelta": (_adadelta, 2, 6),
    "adam": (_adam, 2, 9),
    "adam_amsgrad": (_adam_amsgrad, 3, 9),
    "delta_bar_delta": (_delta_bar_delta, 2, 4),
}

ONE_TENSOR = {}
TENSOR_LIST = {}
for _name, (_update, _states, _scalars) in _VARIANTS.items():
    ONE_TENSOR[_name] = kernel(_one_tensor_signature(_states, _scalars), name=f"optim.{_name}")(
        _one_tensor_kernel(_update, _states))
    TENSOR_LIST[_name] = kernel(_tensor_list_signature(_scalars), name=f"optim.{_name}.multi")(
        _tensor_list_kernel(_update, _states))
del _name, _update, _states, _scalars


# ---------------------------------------------------------------------------------------------
# host side: which variant a configuration uses, its state arrays and its scalars
#
# A plan is (variant, indices of the used state arrays in the op's state order, scalars as
# Python floats in the kernel's argument order).


def _plan_sgd(*, lr, momentum, nesterov, weight_decay, convention):
    if momentum == 0:
        return "sgd", (), (lr, weight_decay)
    if nesterov:
        variant = "sgd_nesterov" if convention == "textbook" else "sgd_nesterov_torch"
        return variant, (0,), (lr, momentum, weight_decay)
    c, k = (-lr, 1.0) if convention == "textbook" else (1.0, -lr)
    return "sgd_momentum", (0,), (momentum, c, k, weight_decay)


def _plan_adagrad(*, lr, eps, weight_decay):
    return "adagrad", (0,), (lr, eps, weight_decay)


def _plan_rmsprop(*, lr, rho, eps, momentum, nesterov, centered, weight_decay, convention):
    one_minus_rho = 1.0 - rho
    eps_in, eps_out = (eps, 0.0) if convention == "textbook" else (0.0, eps)
    r, s = (0,), ((1,) if centered else ())
    if momentum == 0:
        variant = "rmsprop_centered" if centered else "rmsprop"
        return variant, r + s, (lr, rho, one_minus_rho, eps_in, eps_out, weight_decay)
    if nesterov:
        variant = "rmsprop_nesterov_centered" if centered else "rmsprop_nesterov"
        return variant, r + s + (2,), (lr, rho, one_minus_rho, eps, momentum, weight_decay)
    c, k = (-lr, 1.0) if convention == "textbook" else (1.0, -lr)
    variant = "rmsprop_momentum_centered" if centered else "rmsprop_momentum"
    return variant, r + s + (2,), (rho, one_minus_rho, eps_in, eps_out, momentum, c, k, weight_decay)


def _plan_adadelta(*, lr, rho, eps, weight_decay, convention):
    c = lr if convention == "textbook" else 1.0
    return "adadelta", (0, 1), (lr, rho, 1.0 - rho, eps, c, weight_decay)


def _plan_adam(*, step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad):
    step_size = lr / (1.0 - beta1 ** step)
    inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - beta2 ** step)
    l2, decay = (0.0, lr * weight_decay) if decoupled_weight_decay else (weight_decay, 0.0)
    scalars = (step_size, inv_sqrt_bc2, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, l2, decay)
    return ("adam_amsgrad", (0, 1, 2), scalars) if amsgrad else ("adam", (0, 1), scalars)


def _plan_delta_bar_delta(*, kappa, phi, gamma):
    return "delta_bar_delta", (0, 1), (kappa, phi, gamma, 1.0 - gamma)


_PLANS = {
    "sgd_step": _plan_sgd,
    "adagrad_step": _plan_adagrad,
    "rmsprop_step": _plan_rmsprop,
    "adadelta_step": _plan_adadelta,
    "adam_step": _plan_adam,
    "delta_bar_delta_step": _plan_delta_bar_delta,
}


def _step(plan, param, grad, states, grad_mul, grad_clip, avg, avg_weight) -> None:
    """Launch the one-tensor kernel of ``plan`` on ``param`` (any shape, viewed flat)."""
    variant, used, scalars = plan
    dtype = dtype_of(param)
    p = flat(param)
    n = p.shape[0]
    if n == 0:
        return
    t = dtype.type
    stream = stream_of(param, grad, *(states[k] for k in used), avg, grad_mul)
    mul_array, use_mul_array, mul = multiplier(grad_mul, dtype, stream, p)
    arrays = [p, flat(grad)] + [flat(states[k]) for k in used]
    arrays.append(p if avg is None else flat(avg))
    ONE_TENSOR[variant][dtype][blocks_for(n), THREADS, stream](
        *arrays, mul_array, use_mul_array, t(mul), t(grad_clip), t(avg_weight), avg is not None,
        tuple(t(s) for s in scalars))


# ---------------------------------------------------------------------------------------------
# the backend contract


def sgd_step(param, grad, velocity, *, lr, momentum, nesterov, weight_decay, convention,
             grad_mul=1.0, grad_clip=math.inf, avg=None, avg_weight=0.0):
    """SGD, optionally with (Nesterov) momentum, in place; ``velocity`` is ignored when α = 0."""
    plan = _plan_sgd(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                     convention=convention)
    _step(plan, param, grad, (velocity,), grad_mul, grad_clip, avg, avg_weight)


def adagrad_step(param, grad, accumulator, *, lr, eps, weight_decay, grad_mul=1.0,
                 grad_clip=math.inf, avg=None, avg_weight=0.0):
    """AdaGrad in place."""
    plan = _plan_adagrad(lr=lr, eps=eps, weight_decay=weight_decay)
    _step(plan, param, grad, (accumulator,), grad_mul, grad_clip, avg, avg_weight)


def rmsprop_step(param, grad, square_avg, grad_avg, velocity, *, lr, rho, eps, momentum, nesterov,
                 centered, weight_decay, convention, grad_mul=1.0, grad_clip=math.inf, avg=None,
                 avg_weight=0.0):
    """RMSProp in place; ``grad_avg`` is ignored unless centered, ``velocity`` when α = 0."""
    plan = _plan_rmsprop(lr=lr, rho=rho, eps=eps, momentum=momentum, nesterov=nesterov,
                         centered=centered, weight_decay=weight_decay, convention=convention)
    _step(plan, param, grad, (square_avg, grad_avg, velocity), grad_mul, grad_clip, avg, avg_weight)


def adadelta_step(param, grad, square_avg, acc_delta, *, lr, rho, eps, weight_decay, convention,
                  grad_mul=1.0, grad_clip=math.inf, avg=None, avg_weight=0.0):
    """AdaDelta in place."""
    plan = _plan_adadelta(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, convention=convention)
    _step(plan, param, grad, (square_avg, acc_delta), grad_mul, grad_clip, avg, avg_weight)


def adam_step(param, grad, m, v, v_max, *, step, lr, beta1, beta2, eps, weight_decay,
              decoupled_weight_decay, amsgrad, grad_mul=1.0, grad_clip=math.inf, avg=None,
              avg_weight=0.0):
    """Adam or AdamW (``decoupled_weight_decay``) in place; ``v_max`` is ignored unless amsgrad."""
    plan = _plan_adam(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                      decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad)
    _step(plan, param, grad, (m, v, v_max), grad_mul, grad_clip, avg, avg_weight)


def delta_bar_delta_step(param, grad, rates, delta_bar, *, kappa, phi, gamma, grad_mul=1.0,
                         grad_clip=math.inf, avg=None, avg_weight=0.0):
    """Delta-bar-delta in place."""
    plan = _plan_delta_bar_delta(kappa=kappa, phi=phi, gamma=gamma)
    _step(plan, param, grad, (rates, delta_bar), grad_mul, grad_clip, avg, avg_weight)


def multi_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf, avg_weight=0.0,
               **hyper) -> None:
    """``op`` (an update name above) on every tensor of the lists, in one kernel launch.

    ``params`` and ``grads`` are lists of arrays of one dtype (shapes may differ), ``states`` one
    tuple per tensor in the op's state order, ``avgs`` a list of arrays (or None entries) or None.
    Same result as calling ``op`` once per tensor. See ``_tensors`` for the table and its limits.
    """
    variant, used, scalars = _PLANS[op](**hyper)
    if not params:
        return
    dtype = dtype_of(params[0])
    t = dtype.type
    stream = stream_of(*params, *grads, *(s for st in states for s in st), *(avgs or ()), grad_mul)
    rows = []
    for k, param in enumerate(params):
        n = math.prod(shape_of(param))
        if n == 0:
            continue
        avg = None if avgs is None else avgs[k]
        rows.append((n, address(param), address(grads[k]), *(address(states[k][j]) for j in used),
                     0 if avg is None else address(avg)))
    table, chunks = _tensors.table(rows, stream)
    if chunks == 0:
        return
    like = flat(params[0])
    mul_array, use_mul_array, mul = multiplier(grad_mul, dtype, stream, like)
    TENSOR_LIST[variant][dtype][blocks_for(chunks, threads=1), THREADS, stream](
        table, like, mul_array, use_mul_array, t(mul), t(grad_clip), t(avg_weight), chunks,
        tuple(t(s) for s in scalars))
