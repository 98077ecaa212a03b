"""Under mpiexec: N ranks × local batch b against 1 process × batch N·b, every optimizer,
sharded and replicated, with and without clipping/Polyak/non-finite skipping; bit-identical
parameters on every rank after every step; sharded state memory ≈ 1/N. Argument: the backend."""

from __future__ import annotations

import sys

import numpy as np

import fastopt
import fastopt.distributed
from cases import CONFIGS, EXTRAS, LOCAL_BATCH, NAN_STEP, STEPS, gradients, initial_params
from rank_checks import COMM, Checks, assert_close, assert_identical_on_all_ranks

BACKEND = sys.argv[2]
N, RANK = COMM.size, COMM.rank
MINE = slice(RANK * LOCAL_BATCH, (RANK + 1) * LOCAL_BATCH)


def trajectory(name, dtypes, shard, extras, flat, buffers, bucket_bytes=None):
    # the global clip norm couples the dtypes: a float32 gradient's rounding reaches float64 params
    tolerance_dtype = np.float32 if np.float32 in dtypes else np.float64
    cls, hyper = CONFIGS[name]
    # Polyak: an EMA for half of the optimizers, the running mean for the other half
    options = {**EXTRAS, "polyak": "mean" if list(CONFIGS).index(name) % 2 else EXTRAS["polyak"]} if extras else {}
    params = initial_params(dtypes)
    if flat:
        params = fastopt.distributed.flat_arrays(params)
    reference = [p.copy() for p in params]
    opt = cls(params, **hyper, **options, backend=BACKEND, comm=COMM, shard_state=shard, bucket_bytes=bucket_bytes)
    ref = cls(reference, **hyper, **options, backend="numpy")
    for step in range(STEPS):
        nan = extras and step == NAN_STEP
        local = gradients(params, step, N, MINE, nan=nan and RANK == N - 1)
        if buffers:
            views = opt.grad_buffers()
            for view, g in zip(views, local):
                view[...] = g
            local = views
        opt.step(local)
        ref.step(gradients(reference, step, N, slice(None), nan=nan))
        assert_identical_on_all_ranks(params, f"{name} step {step}")
    assert opt.steps == ref.steps and opt.skipped_steps == ref.skipped_steps == (1 if extras else 0)
    for k, (p, r) in enumerate(zip(params, reference)):
        assert_close(p, r, p.dtype, f"{name} params[{k}]", rtol_of=tolerance_dtype)
    if extras:
        for k, (a, r) in enumerate(zip(opt.averaged_params(), ref.averaged_params())):
            assert_close(a, r, a.dtype, f"{name} averaged_params()[{k}]", rtol_of=tolerance_dtype)
    return opt


def state_memory(dtype):
    """Sharded Adam holds m and v for its range of ⌊T/N⌋ or ⌈T/N⌉ elements, one bucket or many,
    counted from its arrays."""
    params = initial_params([dtype] * 4)
    total = sum(p.size for p in params)
    for bucket_bytes in (None, 64 * np.dtype(dtype).itemsize):
        opt = fastopt.Adam(params, backend=BACKEND, comm=COMM, bucket_bytes=bucket_bytes)
        opt.step(gradients(params, 0, N, MINE))
        held = opt._dist.state_bytes() // (2 * np.dtype(dtype).itemsize)
        assert held == total * (RANK + 1) // N - total * RANK // N, (held, total, N, bucket_bytes)
        assert COMM.allreduce(held) == total  # the ranges cover the space exactly once
        replicated = fastopt.Adam(params, backend=BACKEND, comm=COMM, shard_state=False)
        replicated.step(gradients(params, 0, N, MINE))
        assert replicated._dist.state_bytes() == 2 * total * np.dtype(dtype).itemsize


def owned_ranges():
    """With several buckets (of 7 and 25 float64 elements: smaller than T/N, ending inside ranks'
    ranges, some holding parts of two ranks, some of one), rank r's pieces, bucket after bucket,
    cover exactly [⌊T·r/N⌋, ⌊T·(r+1)/N⌋) of each dtype's space, with no gap; every bucket's counts
    are the sizes of each rank's part of it; the ranks' ranges tile the space in rank order."""
    params = initial_params([np.float32, np.float64] * 2)
    for bucket_elems in (7, 25):
        opt = fastopt.Adam(params, backend=BACKEND, comm=COMM, bucket_bytes=8 * bucket_elems)
        for space in opt._dist.spaces:
            total = space.total
            lo, hi = total * RANK // N, total * (RANK + 1) // N
            elems = max(1, 8 * bucket_elems // space.dtype.itemsize)
            assert len(space.buckets) == -(-total // elems) > 1, (len(space.buckets), total, elems)
            at = lo
            for bucket in space.buckets:
                part = (min(max(lo, bucket.lo), bucket.hi), max(min(hi, bucket.hi), bucket.lo))
                assert (bucket.my_lo, bucket.my_hi) == (part[0], max(part)), (bucket.lo, bucket.hi, part)
                assert bucket.counts[RANK] == bucket.my_hi - bucket.my_lo
                assert bucket.lo + bucket.displs[RANK] == bucket.my_lo or bucket.counts[RANK] == 0
                assert sum(bucket.counts) == bucket.hi - bucket.lo
                for piece in bucket.pieces:
                    assert piece.flat == at, (piece.flat, at, bucket_elems)
                    at += piece.stop - piece.start
            assert at == hi, (at, hi, bucket_elems)
            assert space.recv.size == hi - lo
            ranges = COMM.allgather((lo, hi))
            assert [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]] and ranges[-1][1] == total


def groups_sum_and_scale(shard):
    """Two param groups (lr of their own), ``groups=`` stepping one of them on odd steps,
    ``grad_reduce="sum"`` with ``grad_scale``, torch's ``maximize``: against one process given
    the summed gradient's equivalent (the mean, with grad_scale divided by N)."""
    params = initial_params([np.float64] * 4)
    reference = [p.copy() for p in params]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.003}]
    opt = fastopt.Adam(groups(params), lr=0.01, maximize=True, backend=BACKEND, comm=COMM, shard_state=shard,
                       grad_reduce="sum", bucket_bytes=256)
    ref = fastopt.Adam(groups(reference), lr=0.01, maximize=True, backend="numpy")
    for step in range(STEPS):
        which = [1] if step % 2 else None
        opt.step(gradients(params, step, N, MINE), grad_scale=2.0, groups=which)
        ref.step(gradients(reference, step, N, slice(None)), grad_scale=2.0 / N, groups=which)
        assert_identical_on_all_ranks(params, f"step {step}")
    for k, (p, r) in enumerate(zip(params, reference)):
        assert_close(p, r, p.dtype, f"params[{k}]")
    assert [s["step"] for s in opt.state] == [s["step"] for s in ref.state]


def loss_scaler(shard):
    """fastopt.LossScaler over a data-parallel optimizer: an overflow on one rank skips the step
    on every rank, and every rank's scale follows the single-process one."""
    params = initial_params([np.float64] * 4)
    reference = [p.copy() for p in params]
    opt = fastopt.Adam(params, lr=0.01, nonfinite="skip", backend=BACKEND, comm=COMM, shard_state=shard)
    ref = fastopt.Adam(reference, lr=0.01, nonfinite="skip", backend="numpy")
    scaler, ref_scaler = (fastopt.LossScaler(init_scale=8.0, growth_interval=3) for _ in range(2))
    for step in range(8):
        nan = step == 2
        scaled = [g * scaler.scale for g in gradients(params, step, N, MINE, nan=nan and RANK == N - 1)]
        ref_scaled = [g * ref_scaler.scale for g in gradients(reference, step, N, slice(None), nan=nan)]
        assert scaler.step(opt, scaled) == ref_scaler.step(ref, ref_scaled) == (not nan)
    assert COMM.allgather(scaler.scale) == [ref_scaler.scale] * N
    for k, (p, r) in enumerate(zip(params, reference)):
        assert_close(p, r, p.dtype, f"params[{k}]")


checks = Checks()
f64, f32 = [np.float64] * 4, [np.float32] * 4
if "--quick" in sys.argv:  # the numba job: one optimizer, both modes, both step paths
    for shard in (True, False):
        for extras in (True, False):
            checks.run(f"adamw shard={shard} extras={extras} float32", trajectory, "adamw", f32, shard, extras,
                       flat=shard, buffers=extras, bucket_bytes=None if extras else 256)
    checks.run("sharded state memory float32", state_memory, np.float32)
    sys.exit(0)
for i, name in enumerate(CONFIGS):
    for shard in (True, False):
        for extras in (True, False):
            variant = (i + shard + extras) % 2
            checks.run(f"{name} shard={shard} extras={extras} float64", trajectory, name, f64, shard, extras,
                       flat=bool(variant), buffers=not variant, bucket_bytes=None if variant else 200)
for name in ("adam-amsgrad", "sgd-nesterov"):
    for shard in (True, False):
        checks.run(f"{name} shard={shard} float32", trajectory, name, f32, shard, True, flat=shard, buffers=True)
checks.run("adamw mixed float32/float64, 3 buckets", trajectory, "adamw", [np.float32, np.float64] * 2, True, True,
           flat=True, buffers=False, bucket_bytes=512)
checks.run("sharded state memory float64", state_memory, np.float64)
checks.run("owned range: one contiguous 1/N of the space, several buckets", owned_ranges)
for shard in (True, False):
    checks.run(f"groups=, grad_reduce='sum', grad_scale, maximize shard={shard}", groups_sum_and_scale, shard)
    checks.run(f"LossScaler shard={shard}", loss_scaler, shard)
