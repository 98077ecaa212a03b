"""The training-step extras of the ``"numpy"`` backend, and its array helpers.

Written from ``docs/algorithms.md`` (section "Training-step extras") and ``docs/backends.md``:
around any update, the gradient is scaled and clamped before the update reads it, and the Polyak
average is moved toward the new parameters after it:

    g ← g · grad_mul                    (loss-scale and clip-by-norm factor)
    g ← clamp(g, −grad_clip, grad_clip) (NaN passes through unchanged)
    θ ← update(θ, g, state)
    θ̂ ← θ̂ + w (θ − θ̂)                  (when an average array is given)

Here the three steps are three separate NumPy expressions; the kernels fuse them into one pass.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .._host_arrays import (
    copy_from_numpy,
    empty,
    empty_like,
    from_numpy,
    full_like,
    owns,
    to_numpy,
    zeros_like,
)

__all__ = [
    "copy_from_numpy",
    "empty",
    "empty_like",
    "from_numpy",
    "full_like",
    "grad_multiplier",
    "grad_sumsq",
    "multi_step",
    "owns",
    "scale_grads_",
    "to_numpy",
    "with_step_extras",
    "zeros_like",
]


def _transformed_grad(grad, grad_mul, grad_clip):
    g = grad
    if grad_mul != 1.0:
        g = g * grad.dtype.type(grad_mul)
    if grad_clip != math.inf:
        c = grad.dtype.type(grad_clip)
        # np.clip keeps NaN; written out so that the equation is visible
        g = np.where(g > c, c, np.where(g < -c, -c, g))
    return g


def with_step_extras(update):
    """Give a plain update function the ``grad_mul``, ``grad_clip``, ``avg``, ``avg_weight``
    keywords of the backend contract."""

    @functools.wraps(update)
    def step(param, grad, *state, grad_mul=1.0, grad_clip=math.inf, avg=None, avg_weight=0.0, **hyper):
        update(param, _transformed_grad(grad, grad_mul, grad_clip), *state, **hyper)
        if avg is not None:
            avg[...] = avg + param.dtype.type(avg_weight) * (param - avg)

    return step


def multi_step(op, params, grads, states, avgs, **keywords):
    """``op`` once per tensor (the reference has no reason to fuse tensors)."""
    from . import optim

    update = with_step_extras(getattr(optim, op))
    for k, (param, grad, state) in enumerate(zip(params, grads, states)):
        update(param, grad, *state, avg=None if avgs is None else avgs[k], **keywords)


def grad_sumsq(grads) -> float:
    """Σ g² over all elements of all gradients, in float64 (non-finite iff some g is)."""
    total = 0.0
    for g in grads:
        g64 = g.astype(np.float64).ravel()
        total += float(np.dot(g64, g64))
    return total


def grad_multiplier(sumsq, max_norm, inv_scale, dtype) -> float:
    """inv_scale · min(1, max_norm / (‖g‖·inv_scale + 1e-6)), ‖g‖ = √sumsq; inv_scale without max_norm."""
    if max_norm is None:
        return float(inv_scale)
    coef = max_norm / (math.sqrt(sumsq) * inv_scale + 1e-6)
    if math.isnan(coef):  # a NaN gradient: the factor is NaN too (min() would drop it), as in torch
        return math.nan
    return inv_scale * min(1.0, coef)


def scale_grads_(grads, grad_mul) -> None:
    for g in grads:
        g *= g.dtype.type(grad_mul)
