"""Optimizer updates of the ``"cupy"`` backend: host side of ``optim.cu``.

Each host function (``sgd_step`` ... ``delta_bar_delta_step``, the backend contract of
``docs/backends.md``) picks the kernel variant of the configuration, computes its per-step scalars
once in float64 exactly as ``kernels/numba_cpu/optim.py`` does, rounds them to the arrays' dtype
(packed in a struct of that dtype, in the order of ``_sources.UPDATES``) and launches one fused
kernel over the arrays, with the training-step extras:

    g ← g·grad_mul;  g ← clamp(g, −grad_clip, grad_clip);  update;  θ̂ ← θ̂ + w·(θ − θ̂)

``grad_mul`` is a Python number, or a device array of shape (1,) and the arrays' dtype (the
result of ``grad_multiplier``), which the kernel reads: the factor never travels to the host.

Vectorization: when every pointer of a call (θ, g, the states used, θ̂) is 16-byte aligned the
single-tensor kernel moves 16 bytes per load (float4 / double2) with a scalar tail; otherwise it
runs element by element. ``multi_step`` decides per tensor.

``multi_step`` launches the tensor-list kernel: each launch takes up to
``_sources.list_capacity(k + 3)`` tensors (k the variant's state arrays; slots θ, g, states, θ̂)
in one struct passed by value in the kernel's parameters (``_sources.LIST_BYTES`` = 3584 bytes, so
with the scalars and extras a launch stays under the 4 KiB parameter limit of every CUDA 12
driver): 89 tensors per launch for plain SGD, 74 with one state, 63 with two (Adam), 55 with
three (amsgrad, centered RMSProp with momentum). More tensors take ⌈count / capacity⌉ launches; tensors with no elements are skipped.
Nothing is copied to the device for the list and nothing synchronizes.
"""

from __future__ import annotations

import math

import numpy as np

from . import _device, _loader, _sources

__all__ = [
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "delta_bar_delta_step",
    "multi_step",
    "rmsprop_step",
    "sgd_step",
]

_BLOCK = _sources.BLOCK


# ---------------------------------------------------------------------------------------------
# configurations: (variant, scalars in struct order, indices of the state arguments it uses)


def _sgd(*, lr, momentum, nesterov, weight_decay, convention):
    if momentum == 0:
        return "sgd", (lr, weight_decay), ()
    if nesterov:
        variant = "sgd_nesterov" if convention == "textbook" else "sgd_nesterov_torch"
        return variant, (lr, momentum, weight_decay), (0,)
    c, k = (-lr, 1.0) if convention == "textbook" else (1.0, -lr)
    return "sgd_momentum", (momentum, c, k, weight_decay), (0,)


def _adagrad(*, lr, eps, weight_decay):
    return "adagrad", (lr, eps, weight_decay), (0,)


def _rmsprop(*, lr, rho, eps, momentum, nesterov, centered, weight_decay, convention):
    one_minus_rho = 1.0 - rho
    eps_in, eps_out = (eps, 0.0) if convention == "textbook" else (0.0, eps)
    states = (0, 1) if centered else (0,)  # square_avg, grad_avg
    if momentum == 0:
        variant = "rmsprop_centered" if centered else "rmsprop"
        return variant, (lr, rho, one_minus_rho, eps_in, eps_out, weight_decay), states
    states += (2,)  # velocity
    if nesterov:
        variant = "rmsprop_nesterov_centered" if centered else "rmsprop_nesterov"
        return variant, (lr, rho, one_minus_rho, eps, momentum, weight_decay), states
    c, k = (-lr, 1.0) if convention == "textbook" else (1.0, -lr)
    variant = "rmsprop_momentum_centered" if centered else "rmsprop_momentum"
    return variant, (rho, one_minus_rho, eps_in, eps_out, momentum, c, k, weight_decay), states


def _adadelta(*, lr, rho, eps, weight_decay, convention):
    c = lr if convention == "textbook" else 1.0
    return "adadelta", (lr, rho, 1.0 - rho, eps, c, weight_decay), (0, 1)


def _adam(*, step, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad):
    step_size = lr / (1.0 - beta1 ** step)
    inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - beta2 ** step)
    l2, decay = (0.0, lr * weight_decay) if decoupled_weight_decay else (weight_decay, 0.0)
    scalars = (step_size, inv_sqrt_bc2, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, l2, decay)
    if amsgrad:
        return "adam_amsgrad", scalars, (0, 1, 2)
    return "adam", scalars, (0, 1)


def _delta_bar_delta(*, kappa, phi, gamma):
    return "delta_bar_delta", (kappa, phi, gamma, 1.0 - gamma), (0, 1)


_CONFIGURE = {
    "sgd_step": _sgd,
    "adagrad_step": _adagrad,
    "rmsprop_step": _rmsprop,
    "adadelta_step": _adadelta,
    "adam_step": _adam,
    "delta_bar_delta_step": _delta_bar_delta,
}


def _scalars(variant: str, dtype: np.dtype, values) -> np.ndarray:
    """The variant's scalars, each rounded once from float64 to ``dtype``, as a size-1 NumPy struct
    (CuPy passes it by value as the kernel's first argument)."""
    packed = np.empty(1, _sources.scalars_dtype(variant, dtype))
    packed[0] = tuple(float(v) for v in values)
    return packed


def grad_mul_args(grad_mul, dtype: np.dtype) -> tuple:
    """(host value, device pointer) kernel arguments for ``grad_mul``: a number, or a device array
    of shape (1,) read by the kernel (pointer 0: use the value)."""
    if isinstance(grad_mul, (int, float, np.integer, np.floating)):
        return dtype.type(grad_mul), np.uint64(0)
    return dtype.type(1.0), np.uint64(_device.pointer(grad_mul))


# ---------------------------------------------------------------------------------------------
# one tensor


def _step(op: str, param, grad, states, grad_mul, grad_clip, avg, avg_weight, hyper) -> None:
    n = _device.size_of(param)
    if n == 0:
        return
    variant, values, used = _CONFIGURE[op](**hyper)
    dtype = _device.dtype_of(param)
    t = dtype.type
    pointers = [_device.pointer(param), _device.pointer(grad)]
    pointers += [_device.pointer(states[i]) for i in used]
    if avg is not None:
        pointers.append(_device.pointer(avg))
    width = _sources.vector_width(dtype) if all(map(_sources.is_aligned, pointers)) else 1
    state_pointers = pointers[2:2 + len(used)] + [0] * (3 - len(used))
    avg_pointer = pointers[-1] if avg is not None else 0
    mul_value, mul_pointer = grad_mul_args(grad_mul, dtype)
    args = (_scalars(variant, dtype, values), np.uint64(pointers[0]), np.uint64(pointers[1]),
            *(np.uint64(p) for p in state_pointers), np.uint64(avg_pointer), mul_value, mul_pointer,
            t(grad_clip), t(avg_weight), np.int64(n))
    units = max(n // width, n % width)
    name = _sources.update_kernel(variant, dtype, width)
    with _device.place(param, grad, *(states[i] for i in used), avg, grad_mul) as where:
        _loader.launch("optim", name, _loader.grid("optim", name, units, _BLOCK), _BLOCK, args, where.stream)


def sgd_step(param, grad, velocity, *, grad_mul=1.0, grad_clip=math.inf, avg=None, avg_weight=0.0, **hyper):
    """SGD, optionally with (Nesterov) momentum, in place; ``velocity`` is ignored when α = 0."""
    _step("sgd_step", param, grad, (velocity,), grad_mul, grad_clip, avg, avg_weight, hyper)


def adagrad_step(param, grad, accumulator, *, grad_mul=1.0, grad_clip=math.inf, avg=None, avg_weight=0.0,
                 **hyper):
    """AdaGrad in place."""
    _step("adagrad_step", param, grad, (accumulator,), grad_mul, grad_clip, avg, avg_weight, hyper)


def rmsprop_step(param, grad, square_avg, grad_avg, velocity, *, grad_mul=1.0, grad_clip=math.inf, avg=None,
                 avg_weight=0.0, **hyper):
    """RMSProp in place; ``grad_avg`` is ignored unless centered, ``velocity`` when α = 0."""
    _step("rmsprop_step", param, grad, (square_avg, grad_avg, velocity), grad_mul, grad_clip, avg, avg_weight,
          hyper)


def adadelta_step(param, grad, square_avg, acc_delta, *, grad_mul=1.0, grad_clip=math.inf, avg=None,
                  avg_weight=0.0, **hyper):
    """AdaDelta in place."""
    _step("adadelta_step", param, grad, (square_avg, acc_delta), grad_mul, grad_clip, avg, avg_weight, hyper)


def adam_step(param, grad, m, v, v_max, *, grad_mul=1.0, grad_clip=math.inf, avg=None, avg_weight=0.0, **hyper):
    """Adam or AdamW (``decoupled_weight_decay``) in place; ``v_max`` is ignored unless amsgrad."""
    _step("adam_step", param, grad, (m, v, v_max), grad_mul, grad_clip, avg, avg_weight, hyper)


def delta_bar_delta_step(param, grad, rates, delta_bar, *, grad_mul=1.0, grad_clip=math.inf, avg=None,
                         avg_weight=0.0, **hyper):
    """Delta-bar-delta in place."""
    _step("delta_bar_delta_step", param, grad, (rates, delta_bar), grad_mul, grad_clip, avg, avg_weight, hyper)


# ---------------------------------------------------------------------------------------------
# many tensors


def pack_lists(rows: list[list[int]], sizes: list[int], slots: int, width: int):
    """Yield (TensorList struct, work units) per launch: ``rows`` holds each tensor's ``slots``
    pointers (0 for a missing optional one), ``sizes`` its element count. A tensor is vectorized
    (nvec = n // width) when all its non-null pointers are 16-byte aligned."""
    capacity = _sources.list_capacity(slots)
    dtype = _sources.list_dtype(slots)
    for start in range(0, len(rows), capacity):
        chunk = rows[start:start + capacity]
        n = np.asarray(sizes[start:start + capacity], dtype=np.int64)
        aligned = np.array([all(p % _sources.VEC_BYTES == 0 for p in row) for row in chunk])
        nvec = np.where(aligned, n // width, 0)
        packed = np.zeros(1, dtype)
        packed["ptr"][0, :len(chunk)] = np.asarray(chunk, dtype=np.uint64)
        packed["n"][0, :len(chunk)] = n
        packed["nvec"][0, :len(chunk)] = nvec
        packed["count"] = len(chunk)
        yield packed, int(np.sum(nvec + (n - nvec * width)))


def multi_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf, avg_weight=0.0, **hyper):
    """``op`` (an update's backend name, e.g. "adam_step") over many tensors of one dtype, in
    ⌈tensors / capacity⌉ launches of the tensor-list kernel. Same semantics as calling ``op`` once
    per tensor."""
    variant, values, used = _CONFIGURE[op](**hyper)
    slots = _sources.UPDATES[variant].states + 3
    rows, sizes = [], []
    for k, (param, grad) in enumerate(zip(params, grads)):
        n = _device.size_of(param)
        if n == 0:
            continue
        avg = None if avgs is None else avgs[k]
        rows.append([_device.pointer(param), _device.pointer(grad)]
                    + [_device.pointer(states[k][i]) for i in used]
                    + [0 if avg is None else _device.pointer(avg)])
        sizes.append(n)
    if not rows:
        return
    first = next(p for p in params if _device.size_of(p) > 0)
    dtype = _device.dtype_of(first)
    t = dtype.type
    width = _sources.vector_width(dtype)
    scalars = _scalars(variant, dtype, values)
    mul_value, mul_pointer = grad_mul_args(grad_mul, dtype)
    name = _sources.update_kernel(variant, dtype, None)
    with _device.place(first, *params, *grads, *(s for st in states for s in st), *(avgs or ()), grad_mul) as where:
        for packed, units in pack_lists(rows, sizes, slots, width):
            _loader.launch("optim", name, _loader.grid("optim", name, units, _BLOCK), _BLOCK,
                           (scalars, packed, mul_value, mul_pointer, t(grad_clip), t(avg_weight)), where.stream)
