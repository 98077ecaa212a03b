"""A synthetic data-parallel problem for the MPI tests, and the optimizer configurations.

Sample i of the global batch at step s carries a scale c_i (> 0) and a target t_i shaped like
every parameter; the per-sample loss ½ Σ c_i (θ − t_i)² has gradient c_i ⊙ (θ − t_i). Rank r of N
holds samples [r·b, (r+1)·b) and passes the mean gradient over them; the single-process reference
passes the mean over all N·b samples. With grad_reduce="mean" the two runs must agree.
"""

from __future__ import annotations

import numpy as np

import fastopt

# 13·9 + 31 + 4·5·6 + 1 = 269 elements: not divisible by 3, and with N = 3 the first and third
# tensors straddle rank boundaries
SHAPES = [(13, 9), (31,), (4, 5, 6), (1,)]
LOCAL_BATCH = 3
STEPS = 20
NAN_STEP = 7  # with nonfinite="skip", one rank's gradient holds a NaN at this step

CONFIGS = {
    "sgd-nesterov": (fastopt.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "sgd-torch": (fastopt.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01, convention="torch")),
    "adagrad": (fastopt.AdaGrad, dict(lr=0.1)),
    "rmsprop-centered": (fastopt.RMSProp, dict(lr=0.01, momentum=0.5, centered=True)),
    "adadelta": (fastopt.AdaDelta, dict(lr=1.0)),
    "adam-amsgrad": (fastopt.Adam, dict(lr=0.01, amsgrad=True)),
    "adamw": (fastopt.AdamW, dict(lr=0.01)),
    "delta-bar-delta": (fastopt.DeltaBarDelta, dict(lr=0.01, kappa=0.001, phi=0.1, gamma=0.7)),
}
EXTRAS = dict(clip_grad_norm=1.0, polyak=0.9, nonfinite="skip")


def initial_params(dtypes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for shape, dtype in zip(SHAPES, dtypes)]


def batch(step, world, seed=1, total=None):
    """(scales, targets) of the global batch at ``step``: lists over parameters of (n, *shape),
    n = ``total`` or N·b."""
    rng = np.random.default_rng([seed, step])
    n = total or world * LOCAL_BATCH
    scales = [rng.uniform(0.5, 1.5, (n, *shape)) for shape in SHAPES]
    targets = [rng.standard_normal((n, *shape)) for shape in SHAPES]
    return scales, targets


def gradients(params, step, world, samples: slice, nan=False, total=None):
    """The mean gradient over ``samples`` of the global batch, in each parameter's dtype."""
    scales, targets = batch(step, world, total=total)
    out = []
    for p, c, t in zip(params, scales, targets):
        g = (c[samples] * (p.astype(np.float64) - t[samples])).mean(axis=0)
        out.append(g.astype(p.dtype))
    if nan:
        out[1][3] = np.nan
    return out
