"""Under mpiexec -n 2: bad input on one rank makes every rank raise (the failing rank its own
error, the others RuntimeError naming it), none hangs, and nothing is modified anywhere."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

import fastopt
from cases import LOCAL_BATCH, gradients, initial_params
from rank_checks import COMM, Checks, assert_identical_on_all_ranks, digest

N, RANK = COMM.size, COMM.rank
MINE = slice(RANK * LOCAL_BATCH, (RANK + 1) * LOCAL_BATCH)
BAD = 1  # the rank that gets the bad input


def expect(exc_type, fn, *, on_bad=None, everywhere=False, words=()):
    """``fn()`` raises ``on_bad`` on rank BAD (``exc_type`` on all ranks with ``everywhere``) and
    RuntimeError naming rank BAD on the others."""
    expected = exc_type if (everywhere or RANK == BAD) else RuntimeError
    try:
        fn()
    except Exception as exc:
        assert type(exc) is expected or (on_bad is None and isinstance(exc, expected)), \
            f"rank {RANK}: expected {expected.__name__}, got {type(exc).__name__}: {exc}"
        if expected is RuntimeError:
            assert f"rank {BAD}" in str(exc), str(exc)
            return
        for word in words:  # the failing rank's own message
            assert word in str(exc), f"{word!r} not in {exc}"
        return
    raise AssertionError(f"rank {RANK}: nothing raised, expected {expected.__name__}")


def snapshot(opt, params):
    arrays = list(params)
    for entry in opt.state_dict()["state"].values():
        arrays += [v for v in entry.values() if isinstance(v, np.ndarray)]
    if "shard" in opt.state_dict():
        for piece in opt.state_dict()["shard"]["pieces"]:
            arrays += list(piece["state"].values())
    return digest(arrays), opt.steps, opt.skipped_steps, repr(sorted((k, e.get("step")) for k, e in opt.state_dict()["state"].items()))


def bad_step(shard, corrupt, exc_type, everywhere=False, **options):
    params = initial_params([np.float64] * 4)
    opt = fastopt.Adam(params, lr=0.01, backend="numpy", comm=COMM, shard_state=shard, **options)
    opt.step(gradients(params, 0, N, MINE))  # state exists
    before = snapshot(opt, params)
    grads = gradients(params, 1, N, MINE)
    if RANK == BAD or everywhere:
        grads = corrupt(grads)
    expect(exc_type, lambda: opt.step(grads), everywhere=everywhere)
    assert snapshot(opt, params) == before, "the failed step modified something"
    opt.step(gradients(params, 1, N, MINE))  # the job goes on: no rank is left inside a collective
    assert_identical_on_all_ranks(params, "after the recovered step")


def wrong_shape(grads):
    grads[2] = np.zeros((4, 5, 7))
    return grads


def wrong_dtype(grads):
    grads[0] = grads[0].astype(np.float32)
    return grads


def wrong_length(grads):
    return grads[:-1]


def local_nan(grads):
    grads[3][0] = np.nan
    return grads


def nan_on_one_rank(shard):
    """A NaN in one rank's gradient is in the sum: with nonfinite='raise' every rank raises."""
    params = initial_params([np.float64] * 4)
    opt = fastopt.Adam(params, lr=0.01, backend="numpy", comm=COMM, shard_state=shard, nonfinite="raise")
    opt.step(gradients(params, 0, N, MINE))
    before = snapshot(opt, params)
    grads = gradients(params, 1, N, MINE)
    if RANK == BAD:
        grads = local_nan(grads)
    try:
        opt.step(grads)
    except FloatingPointError as exc:
        assert "grads[3]" in str(exc), str(exc)
    else:
        raise AssertionError("no FloatingPointError")
    assert snapshot(opt, params) == before


def build_mismatch(change, exc_type, words, everywhere=False):
    params = initial_params([np.float64] * 4)
    hyper = dict(lr=0.01)
    if RANK == BAD:
        params, hyper = change(params, hyper)
    expect(exc_type, lambda: fastopt.Adam(params, **hyper, backend="numpy", comm=COMM), everywhere=everywhere,
           words=words)


def other_shape(params, hyper):
    params[2] = np.zeros((4, 6, 5))
    return params, hyper


def other_lr(params, hyper):
    return params, {**hyper, "lr": 0.02}


def int_param(params, hyper):
    params[0] = np.zeros((13, 9), np.int64)
    return params, hyper


def bad_load(shard):
    params = initial_params([np.float64] * 4)
    opt = fastopt.Adam(params, lr=0.01, backend="numpy", comm=COMM, shard_state=shard)
    opt.step(gradients(params, 0, N, MINE))
    saved = opt.state_dict()
    opt.step(gradients(params, 1, N, MINE))
    before = snapshot(opt, params)
    if RANK == BAD:
        saved = {**saved, "steps": -1}
    expect(ValueError, lambda: opt.load_state_dict(saved))
    assert snapshot(opt, params) == before


checks = Checks()
for shard in (True, False):
    checks.run(f"wrong gradient shape shard={shard}", bad_step, shard, wrong_shape, ValueError)
    checks.run(f"wrong gradient dtype shard={shard}", bad_step, shard, wrong_dtype, TypeError)
    checks.run(f"wrong gradient count shard={shard}", bad_step, shard, wrong_length, ValueError)
    checks.run(f"NaN on one rank, nonfinite='raise', shard={shard}", nan_on_one_rank, shard)
    checks.run(f"bad state dict on one rank shard={shard}", bad_load, shard)
checks.run("a parameter of another shape on one rank", build_mismatch, other_shape, ValueError,
           ("params[2]", "rank 1"), everywhere=True)
checks.run("another lr on one rank", build_mismatch, other_lr, ValueError, ("lr", "rank 1"), everywhere=True)
checks.run("an int parameter on one rank", build_mismatch, int_param, TypeError, ("params[0]",))
checks.run("a GPU backend with comm=", lambda: expect(
    TypeError, lambda: fastopt.Adam(initial_params([np.float64] * 4), backend="numba-cuda", comm=COMM),
    everywhere=True, words=("device arrays are not yet supported for comm=",)))
checks.run("comm that is not a communicator", lambda: expect(
    TypeError, lambda: fastopt.Adam(initial_params([np.float64] * 4), comm=object()), everywhere=True,
    words=("comm must be an mpi4py.MPI.Comm",)))
checks.run("shard_state without comm", lambda: expect(
    ValueError, lambda: fastopt.Adam(initial_params([np.float64] * 4), shard_state=True), everywhere=True,
    words=("need comm=",)))
