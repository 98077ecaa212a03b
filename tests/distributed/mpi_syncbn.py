"""Under mpiexec -n 3: synchronized batch norm against single-process batch norm (the reference
backend) on the concatenated batch: NCHW and channels-last, float32 and float64, with and without
the ReLU and the affine parameters, even, uneven and empty local batches; forward, backward,
running statistics; bad input on one rank. Argument: the backend of half the cases (the other
half runs "numba", whose one-pass local statistics are ``kernels/numba_cpu/bnstats.py``)."""

from __future__ import annotations

import sys

import numpy as np

import fastopt
from fastopt.distributed import syncbn
from rank_checks import COMM, Checks

N, RANK = COMM.size, COMM.rank
BACKEND = sys.argv[2]
C = 5
TOL = {np.dtype(np.float32): (1e-4, 1e-5), np.dtype(np.float64): (1e-11, 1e-13)}


def close(actual, expected, dtype, what):
    rtol, atol = TOL[np.dtype(dtype)]
    expected = np.asarray(expected, np.float64)
    finite = expected[np.isfinite(expected)]
    scale = float(np.sqrt(np.mean(finite ** 2))) if finite.size else 0.0
    assert np.asarray(actual).dtype == np.dtype(dtype), (what, np.asarray(actual).dtype)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol * max(scale, 1.0),
                               err_msg=what)


def case(sizes, dtype, channels_last, relu, affine, seed, backend):
    rng = np.random.default_rng(seed)
    spatial = (3, 2)
    total = sum(sizes)
    shape = (total, *spatial, C) if channels_last else (total, C, *spatial)
    axis = -1 if channels_last else 1
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    weight = rng.uniform(0.5, 1.5, C).astype(dtype) if affine else None
    bias = rng.standard_normal(C).astype(dtype) if affine else None
    start = sum(sizes[:RANK])
    mine = slice(start, start + sizes[RANK])
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)

    ref_rm, ref_rv = rm.copy(), rv.copy()
    y_ref, mean_ref, invstd_ref = fastopt.batchnorm_forward(x, weight, bias, ref_rm, ref_rv, channel_axis=axis,
                                                            relu=relu, backend="numpy")
    my_rm, my_rv = rm.copy(), rv.copy()
    x_local = np.ascontiguousarray(x[mine])
    y, mean, invstd = syncbn.batchnorm_forward(x_local, weight, bias, my_rm, my_rv, comm=COMM, channel_axis=axis,
                                               relu=relu, backend=backend)
    close(y, y_ref[mine], dtype, "y")
    close(mean, mean_ref, dtype, "saved_mean")
    close(invstd, invstd_ref, dtype, "saved_invstd")
    close(my_rm, ref_rm, dtype, "running_mean")
    close(my_rv, ref_rv, dtype, "running_var")

    dx_ref, dw_ref, db_ref = fastopt.batchnorm_backward(dy, x, weight, mean_ref, invstd_ref, bias=bias,
                                                        channel_axis=axis, relu=relu, backend="numpy")
    dx, dw, db = syncbn.batchnorm_backward(np.ascontiguousarray(dy[mine]), x_local, weight, mean, invstd, bias=bias,
                                           comm=COMM, channel_axis=axis, relu=relu, backend=backend)
    close(dx, dx_ref[mine], dtype, "dx")
    close(COMM.allreduce(dw.astype(np.float64)).astype(dtype), dw_ref, dtype, "dweight summed over ranks")
    close(COMM.allreduce(db.astype(np.float64)).astype(dtype), db_ref, dtype, "dbias summed over ranks")


def empty_global_batch():
    x = np.zeros((0, C, 2), np.float64)
    rm, rv = np.zeros(C), np.ones(C)
    y, mean, invstd = syncbn.batchnorm_forward(x, None, None, rm, rv, comm=COMM)
    assert y.shape == x.shape and np.isnan(mean).all() and np.isnan(invstd).all()
    assert (rm == 0).all() and (rv == 1).all()


def one_value_in_all():
    x = np.ones((1 if RANK == 0 else 0, C), np.float64)
    try:
        syncbn.batchnorm_forward(x, None, None, None, None, comm=COMM)
    except ValueError as exc:
        assert "more than 1 value per channel over all ranks" in str(exc)
    else:
        raise AssertionError("no ValueError")


def bad_channels_on_one_rank():
    x = np.ones((4, C + (RANK == 1), 2), np.float64)
    weight = np.ones(C)
    rm, rv = np.zeros(C), np.ones(C)
    try:
        syncbn.batchnorm_forward(x, weight, None, rm, rv, comm=COMM)
    except (ValueError, RuntimeError) as exc:
        assert type(exc) is (ValueError if RANK == 1 else RuntimeError), repr(exc)
        assert RANK == 1 or "rank 1" in str(exc)
    else:
        raise AssertionError("no error")
    assert (rm == 0).all() and (rv == 1).all()


def layer():
    """fastopt.BatchNorm(comm=) with uneven local batches, then bad channels on one rank."""
    rng = np.random.default_rng(99)
    sizes = [4, 1, 3]
    x = rng.standard_normal((sum(sizes), C, 3)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    mine = slice(sum(sizes[:RANK]), sum(sizes[:RANK + 1]))
    bn = fastopt.BatchNorm(C, relu=True, comm=COMM, backend=BACKEND)
    ref = fastopt.BatchNorm(C, relu=True, backend="numpy")
    for layer_ in (bn, ref):
        layer_.weight[...] = np.linspace(0.5, 1.5, C)
        layer_.bias[...] = np.linspace(-0.2, 0.2, C)
    y = bn.forward(np.ascontiguousarray(x[mine]))
    dx = bn.backward(np.ascontiguousarray(dy[mine]))
    y_ref = ref.forward(x)
    dx_ref = ref.backward(dy)
    close(y, y_ref[mine], np.float32, "layer y")
    close(dx, dx_ref[mine], np.float32, "layer dx")
    close(bn.running_var, ref.running_var, np.float32, "layer running_var")
    close(COMM.allreduce(bn.grad_weight.astype(np.float64)).astype(np.float32), ref.grad_weight, np.float32,
          "layer grad_weight summed")
    before = bn.running_mean.copy()
    bad = np.ones((2, C + (RANK == 1), 3), np.float32)
    try:
        bn.forward(bad)
    except (ValueError, RuntimeError) as exc:
        assert type(exc) is (ValueError if RANK == 1 else RuntimeError), repr(exc)
    else:
        raise AssertionError("no error")
    assert np.array_equal(bn.running_mean, before)


checks = Checks()
seed = 0
for sizes in ([2, 2, 2], [3, 0, 2], [1, 4, 0]):
    for dtype in (np.float64, np.float32):
        for channels_last in (False, True):
            seed += 1
            relu, affine = seed % 2 == 0, seed % 3 != 0
            backend = BACKEND if seed % 4 < 2 else "numba"  # the local statistics of both host backends
            checks.run(f"sizes={sizes} {np.dtype(dtype).name} channels_last={channels_last} relu={relu} "
                       f"affine={affine} backend={backend}", case, sizes, dtype, channels_last, relu, affine, seed,
                       backend)
checks.run("empty global batch", empty_global_batch)
checks.run("one value per channel over all ranks", one_value_in_all)
checks.run("bad channels on one rank", bad_channels_on_one_rank)
checks.run("the BatchNorm layer with comm=", layer)
