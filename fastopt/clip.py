"""Standalone gradient clipping by global norm, for loops that clip outside an optimizer.

Optimizers take ``clip_grad_norm=`` and fuse the scaling into their update instead (the gradient
arrays are then never written); this function is for code that needs the clipped gradients
themselves, like ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import math

import numpy as np

from . import dispatch
from ._checks import check_array, check_disjoint, check_real, check_same_kind, dtype_of, is_device_array

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(grads, max_norm, *, backend=None) -> float:
    """Scale ``grads`` in place by min(1, max_norm/(‖g‖ + 1e-6)) and return ‖g‖.

    ‖g‖ is the L2 norm over every element of every array, accumulated in float64 (NaN or Inf
    when a gradient holds one; the arrays then become NaN/Inf as in torch). One read pass for the
    norm, one read-write pass for the scaling. On a GPU the scale is computed on the device;
    returning ‖g‖ as a float waits for it.
    """
    dispatch.check_backend_name(backend)
    if isinstance(grads, np.ndarray) or is_device_array(grads):
        grads = [grads]
    if not isinstance(grads, (list, tuple)):
        raise TypeError(f"grads must be a list of arrays, got {type(grads).__name__}")
    max_norm = check_real("max_norm", max_norm, low=0.0, low_open=True)
    for k, g in enumerate(grads):
        check_array(f"grads[{k}]", g, writeable=True)
        check_same_kind(f"grads[{k}]", g, "grads[0]", grads[0])
    check_disjoint({f"grads[{k}]": g for k, g in enumerate(grads)})
    if not grads:
        return 0.0
    module = dispatch.resolve(backend, grads[0])
    sumsq = module.grad_sumsq(list(grads))
    multipliers = {}
    for g in grads:
        if dtype_of(g) not in multipliers:
            multipliers[dtype_of(g)] = module.grad_multiplier(sumsq, max_norm, 1.0, dtype_of(g))
    for dtype, grad_mul in multipliers.items():
        module.scale_grads_([g for g in grads if dtype_of(g) == dtype], grad_mul)
    if not isinstance(sumsq, float):  # a GPU backend's (1,) device array
        sumsq = float(module.to_numpy(sumsq).reshape(-1)[0])
    return math.sqrt(sumsq)
