"""Synchronized batch normalization: training-mode statistics over the global batch of all ranks.

Each rank holds its own part of the batch, m_r values per channel (any m_r ≥ 0: the last, uneven
batch may leave a rank with none). With x̂ = (x − μ)·invstd and g = dy (masked by the ReLU):

forward (training)
    1. each rank's per-channel (m_r, μ_r, M2_r), M2_r = Σ (x − μ_r)², from its own values, by the
       backend's ``batchnorm_statistics`` (float64 accumulation; the numba backend reads x once,
       block by block, and merges the blocks with Chan's formula below);
    2. one ``Allgather`` of those 2C + 1 numbers per rank, then every rank merges them in rank
       order with Chan et al.'s pairwise formula (ranks with m_r = 0 skipped)
           m = m_a + m_b,  δ = μ_b − μ_a,  μ = μ_a + δ·m_b/m,  M2 = M2_a + M2_b + δ²·m_a·m_b/m
       which is numerically stable and, done in the same order on every rank, gives the same
       μ and σ² = M2/m on every rank;
    3. y = γ(x − μ)·invstd + β (ReLU'd), invstd = 1/√(σ² + δ), by the backend's eval-mode
       forward with (μ, σ²) as its statistics;
    4. running_mean ← (1 − α)·running_mean + α·μ, running_var ← (1 − α)·running_var + α·σ²·m/(m − 1).
backward (training)
    1. the backend's constant-statistics backward gives this rank's Σg, Σg·x̂ and γ·invstd·g;
    2. one ``Allreduce`` of (Σg, Σg·x̂) per channel;
    3. dx = γ·invstd·(g − Σg/m − x̂·Σg·x̂/m) with the global sums and m.
    ``dweight``/``dbias`` are this rank's own sums Σg·x̂ and Σg, as in torch's SyncBatchNorm: the
    optimizer's reduction over the ranks adds them up (their sum is the single-process value).

So dx, y and the running statistics equal single-process batch norm on the concatenated batch
(within the batch-norm tolerances). Eval mode needs no communication. Every argument is checked on
every rank before the first collective, and the ranks agree on the outcome (``comm.Agreement``).
"""

from __future__ import annotations

import math

import numpy as np

from .. import dispatch
from .._checks import check_bool, check_disjoint, check_real, shape_of
from .comm import Agreement, check_comm, mpi

__all__ = ["batchnorm_backward", "batchnorm_forward", "check_layer", "merge_statistics"]


def check_layer(comm, backend) -> None:
    """``BatchNorm(comm=)``: an mpi4py communicator, and a CPU backend (host arrays)."""
    check_comm(comm)
    if backend not in (None, "numpy", "numba"):
        raise TypeError(f"device arrays are not yet supported for comm=: synchronized batch norm runs on NumPy "
                        f"arrays (backend None, 'numpy' or 'numba'), got backend={backend!r}")


def merge_statistics(table: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan et al.'s pairwise merge of per-rank rows (m_r, μ_r[C], M2_r[C]) in row order:
    (m, μ, M2) of the union (μ and M2 NaN when m = 0)."""
    channels = (table.shape[1] - 1) // 2
    m = 0
    mean = np.full(channels, np.nan)
    m2 = np.full(channels, np.nan)
    for row in table:
        m_b = int(row[0])
        if m_b == 0:
            continue
        mean_b, m2_b = row[1:1 + channels], row[1 + channels:]
        if m == 0:
            m, mean, m2 = m_b, mean_b.copy(), m2_b.copy()
            continue
        total = m + m_b
        delta = mean_b - mean
        mean = mean + delta * (m_b / total)
        m2 = m2 + m2_b + delta * delta * (m * m_b / total)
        m = total
    return m, mean, m2


def _layout(x, axis):
    axes = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return axes, tuple(shape), math.prod(x.shape[a] for a in axes)


def _local_row(x, axis, backend) -> np.ndarray:
    """(m_r, μ_r[C], M2_r[C]) of this rank's values in float64: the backend's
    ``batchnorm_statistics`` writes μ_r and M2_r straight into the row (one pass over x with the
    numba backend; zeros when m_r = 0, a row the merge skips)."""
    module = dispatch.resolve(backend, x)  # on every rank, an empty one too: a bad backend fails everywhere
    _, _, m = _layout(x, axis)
    channels = x.shape[axis]
    row = np.zeros(1 + 2 * channels)
    row[0] = m
    if m:
        module.batchnorm_statistics(x, row[1:1 + channels], row[1 + channels:], channel_axis=axis)
    return row


def _validate_forward(x, weight, bias, running_mean, running_var, momentum, eps, channel_axis, relu, out):
    from .. import batchnorm as bn

    bn._check_x("x", x)
    axis = bn._check_channel_axis(channel_axis, len(shape_of(x)))
    relu = check_bool("relu", relu)
    momentum = check_real("momentum", momentum, low=0.0, high=1.0)
    eps = check_real("eps", eps, low=0.0, low_open=True)
    for name, array in (("weight", weight), ("bias", bias)):
        if array is not None:
            bn._check_channels(name, array, x, axis, writeable=False)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if running_mean is not None:
        bn._check_channels("running_mean", running_mean, x, axis, writeable=True)
        bn._check_channels("running_var", running_var, x, axis, writeable=True)
    y, saved_mean, saved_invstd = bn._split_out(out, ("y", "saved_mean", "saved_invstd"), x, axis)
    check_disjoint({"y": y, "saved_mean": saved_mean, "saved_invstd": saved_invstd,
                    "running_mean": running_mean, "running_var": running_var},
                   {"x": x, "weight": weight, "bias": bias})
    if not isinstance(x, np.ndarray):
        raise TypeError("device arrays are not yet supported for comm=: synchronized batch norm runs on NumPy arrays")
    return axis, relu, momentum, eps


def batchnorm_forward(x, weight, bias, running_mean, running_var, *, comm, training=True, momentum=0.1,
                      eps=1e-5, channel_axis=1, relu=False, backend=None, out=None):
    """``fastopt.batchnorm_forward`` with training statistics over every rank of ``comm``
    (a collective in training mode); returns ``(y, saved_mean, saved_invstd)``."""
    from .. import batchnorm as bn

    if not check_bool("training", training):
        return bn.batchnorm_forward(x, weight, bias, running_mean, running_var, training=False, momentum=momentum,
                                    eps=eps, channel_axis=channel_axis, relu=relu, backend=backend, out=out)
    check_comm(comm)
    error = None
    try:
        axis, relu, momentum, eps = _validate_forward(x, weight, bias, running_mean, running_var, momentum, eps,
                                                      channel_axis, relu, out)
        row = _local_row(x, axis, backend)
    except Exception as exc:  # agreed on below
        error = exc
    Agreement(comm)(error, "batchnorm_forward")
    table = np.empty((comm.Get_size(), row.size))
    comm.Allgather(row, table)
    m, mean, m2 = merge_statistics(table)
    if m == 1:
        raise ValueError("training needs more than 1 value per channel over all ranks to compute a variance, got 1")
    channels = x.shape[axis]
    dtype = x.dtype
    if m == 0:  # an empty global batch: as single-process batch norm, NaN statistics, running ones kept
        y, saved_mean, saved_invstd = (None, None, None) if out is None else out
        y = np.empty_like(x) if y is None else y
        saved_mean = np.empty(channels, dtype) if saved_mean is None else saved_mean
        saved_invstd = np.empty(channels, dtype) if saved_invstd is None else saved_invstd
        saved_mean[...] = np.nan
        saved_invstd[...] = np.nan
        return y, saved_mean, saved_invstd
    var = m2 / m
    y, saved_mean, saved_invstd = bn.batchnorm_forward(
        x, weight, bias, mean.astype(dtype), var.astype(dtype), training=False, eps=eps, channel_axis=axis,
        relu=relu, backend=backend, out=out)
    saved_invstd[...] = 1.0 / np.sqrt(var + eps)  # from the float64 variance, as single-process training
    if running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
        running_var[...] = (1.0 - momentum) * running_var.astype(np.float64) + momentum * var * (m / (m - 1))
    return y, saved_mean, saved_invstd


def batchnorm_backward(dy, x, weight, saved_mean, saved_invstd, *, comm, bias=None, training=True, channel_axis=1,
                       relu=False, backend=None, out=None):
    """``fastopt.batchnorm_backward`` through the global statistics (a collective in training
    mode); returns ``(dx, dweight, dbias)``, dweight/dbias this rank's sums (module docstring).
    ``bias`` is forward's β, needed with ``relu`` (``fastopt.batchnorm_backward`` says how)."""
    from .. import batchnorm as bn

    if not check_bool("training", training):
        return bn.batchnorm_backward(dy, x, weight, saved_mean, saved_invstd, bias=bias, training=False,
                                     channel_axis=channel_axis, relu=relu, backend=backend, out=out)
    check_comm(comm)
    error = None
    try:
        if bias is getattr(bn, "_UNSET", None):
            if check_bool("relu", relu):
                raise TypeError("bias must be passed with relu=True: the ReLU mask is recomputed from "
                                "weight·x̂ + bias (pass bias=None if the forward had no bias)")
            bias = None
    except Exception as exc:  # agreed on below, with the other checks
        error = exc
    return _sync_backward(dy, x, weight, saved_mean, saved_invstd, comm, bias, channel_axis, relu, backend, out,
                          error)


def _sync_backward(dy, x, weight, saved_mean, saved_invstd, comm, bias, channel_axis, relu, backend, out, error):
    """Training-mode backward after the bias check (``error``: that check's failure, or None)."""
    from .. import batchnorm as bn

    try:
        if error is not None:
            raise error
        bn._check_x("x", x)
        axis = bn._check_channel_axis(channel_axis, len(shape_of(x)))
        bn._check_like_x("dy", dy, x, writeable=False)
        check_bool("relu", relu)
        for name, array in (("weight", weight), ("bias", bias)):
            if array is not None:
                bn._check_channels(name, array, x, axis, writeable=False)
        bn._check_channels("saved_mean", saved_mean, x, axis, writeable=False)
        bn._check_channels("saved_invstd", saved_invstd, x, axis, writeable=False)
        dx, dweight, dbias = bn._split_out(out, ("dx", "dweight", "dbias"), x, axis)
        check_disjoint({"dx": dx, "dweight": dweight, "dbias": dbias},
                       {"dy": dy, "x": x, "weight": weight, "bias": bias, "saved_mean": saved_mean,
                        "saved_invstd": saved_invstd})
        if not isinstance(x, np.ndarray):
            raise TypeError("device arrays are not yet supported for comm=: synchronized batch norm runs on NumPy arrays")
    except Exception as exc:  # agreed on below
        error = exc
    Agreement(comm)(error, "batchnorm_backward")
    dx, dweight, dbias = bn.batchnorm_backward(dy, x, weight, saved_mean, saved_invstd, bias=bias, training=False,
                                               channel_axis=axis, relu=relu, backend=backend, out=out)
    axes, shape, m_local = _layout(x, axis)
    channels = x.shape[axis]
    sums = np.empty(2 * channels + 1)
    sums[:channels] = dbias
    sums[channels:2 * channels] = dweight
    sums[-1] = m_local
    comm.Allreduce(mpi().IN_PLACE, sums, op=mpi().SUM)
    m = int(sums[-1])
    if m_local == 0 or m == 0:
        return dx, dweight, dbias
    gamma = np.ones(channels) if weight is None else weight.astype(np.float64)
    invstd = saved_invstd.astype(np.float64)
    scale = gamma * invstd
    # dx = γ·invstd·g − γ·invstd·(Σg/m) − (x − μ)·invstd·γ·invstd·(Σg·x̂/m)
    offset = (scale * sums[:channels] / m).astype(x.dtype).reshape(shape)
    slope = (scale * invstd * sums[channels:2 * channels] / m).astype(x.dtype).reshape(shape)
    dx -= (x - saved_mean.reshape(shape)) * slope + offset
    return dx, dweight, dbias
