"""Low-precision parameters, written from ``docs/algorithms.md`` ("Low-precision parameters").

A bfloat16 or float16 parameter is updated in float32, and stored back rounded:

    p ← m                     (master weights: the float32 copy)   or   p ← f32(θ)
    p ← update(p, f32(g), state)   (the float32 update of ``optim.py``, with the step extras)
    m ← p                     (master weights)
    θ ← rn(p)  or  θ ← sr(p, uniform(key, i))     (``lowp.round_nearest`` / ``round_stochastic``)

Temporaries are fine here; nothing is shared with the kernels.
"""

from __future__ import annotations

import math

import numpy as np

from . import lowp, optim
from .extras import grad_sumsq, with_step_extras

__all__ = ["mixed_step", "mixed_sumsq"]


def mixed_step(op, params, grads, masters, states, avgs, *, rounding="nearest", seed=0, counter=0, indices=None,
               starts=None, grad_mul=1.0, grad_clip=math.inf, avg_weight=0.0, **hyper) -> None:
    """``op`` on each low-precision parameter: see the module docstring. ``masters`` a list of
    float32 copies or None; stochastic rounding keys tensor t by ``lowp.tensor_key(seed,
    counter, indices[t])`` and numbers its elements from ``starts[t]`` (0 without ``starts``):
    tensor t is then the piece of a parameter that begins there."""
    update = with_step_extras(getattr(optim, op))
    for t, (param, grad, state) in enumerate(zip(params, grads, states)):
        p = masters[t] if masters is not None else param.astype(np.float32)
        update(p, grad.astype(np.float32), *state, grad_mul=grad_mul, grad_clip=grad_clip,
               avg=None if avgs is None else avgs[t], avg_weight=avg_weight, **hyper)
        if rounding == "stochastic":
            first = 0 if starts is None else int(starts[t])
            index = np.arange(first, first + p.size, dtype=np.int64).reshape(p.shape)
            key = lowp.tensor_key(seed, counter, indices[t])
            param[...] = lowp.round_stochastic(p, param.dtype, key, index)
        else:
            param[...] = lowp.round_nearest(p, param.dtype)


def mixed_sumsq(grads) -> float:
    """Σ g² over low-precision gradients, in float64."""
    return grad_sumsq(grads)
