"""Under mpiexec: low precision with comm=. Every rank passes bfloat16 (or float16) gradients of
its share of the batch; the step reduces them in float32 and updates the float32 master copies
(sharded or replicated), and every rank ends with the same 16-bit parameters. 8-bit and bfloat16
optimizer state run replicated. One process on the same backend is given what the ranks reduce:
the float32 sum of the ranks' gradients, with grad_scale = N for the mean. Argument: the backend
(and --quick for the compiled kernels' short job)."""

from __future__ import annotations

import sys
import tempfile

import ml_dtypes
import numpy as np

import fastopt
import fastopt.distributed
from cases import LOCAL_BATCH, STEPS, gradients, initial_params
from rank_checks import COMM, Checks, assert_close, assert_identical_on_all_ranks

BACKEND = sys.argv[2]
N, RANK = COMM.size, COMM.rank
MINE = slice(RANK * LOCAL_BATCH, (RANK + 1) * LOCAL_BATCH)
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def summed_gradients(params, step):
    """What the ranks' reduction computes: Σ over ranks of f32(rank r's 16-bit mean gradient)."""
    total = None
    for r in range(N):
        local = [g.astype(np.float32) for g in gradients(params, step, N, slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH))]
        total = local if total is None else [t + g for t, g in zip(total, local)]
    return total


def close_16bit(actual, expected, what):
    """Equal up to one unit in the last place of the 16-bit format: N = 3 ranks may sum the three
    float32 gradients in another order than the reference."""
    assert actual.dtype == expected.dtype, what
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    mantissa = {"bfloat16": 7, "float16": 10}[expected.dtype.name]
    ulp = np.spacing(np.abs(e).astype(np.float32)).astype(np.float64) * 2.0 ** (23 - mantissa)
    assert np.all(np.abs(a - e) <= ulp), f"{what}: max difference {np.max(np.abs(a - e))}"


def trajectory(dtype_name, shard, master_weights=None, extras=False, rounding="nearest"):
    dtype = DTYPES[dtype_name]
    params = [p.astype(dtype) for p in initial_params([np.float32] * 4)]
    reference = [p.copy() for p in params]
    options = dict(clip_grad_norm=1.0, polyak=0.9) if extras else {}
    if rounding == "stochastic":
        options.update(master_weights=False, rounding="stochastic", seed=7)
    else:
        options.update(master_weights=master_weights)
    opt = fastopt.Adam(params, lr=0.01, **options, backend=BACKEND, comm=COMM, shard_state=shard, bucket_bytes=256)
    ref = fastopt.Adam(reference, lr=0.01, **options, backend=BACKEND)  # one process, same kernels
    for step in range(STEPS):
        views = opt.grad_buffers()
        assert all(v.dtype == np.float32 for v in views), [v.dtype for v in views]
        local = gradients(params, step, N, MINE)
        if step % 2:  # the buffers (float32 views) and separate 16-bit arrays: both paths
            for view, g in zip(views, local):
                view[...] = g
            local = views
        opt.step(local)
        ref.step(summed_gradients(reference, step), grad_scale=N)
        assert_identical_on_all_ranks(params, f"step {step}")
    for k, (p, r) in enumerate(zip(params, reference)):
        if N == 2:  # two float32 gradients sum the same in any order: the ranks compute what one process does
            assert p.tobytes() == r.tobytes(), f"params[{k}]"
        close_16bit(p, r, f"params[{k}]")
    whole = fastopt.distributed.consolidate_state_dict(opt, 0)
    if RANK == 0:
        for k, entry in ref.state_dict()["state"].items():
            names = {n for n, v in entry.items() if isinstance(v, np.ndarray)}
            assert names == {n for n, v in whole["state"][k].items() if isinstance(v, np.ndarray)}, (k, names)
            assert ("master" in names) == (options["master_weights"] is not False), names
            for name in names:
                assert_close(whole["state"][k][name], entry[name], np.float32, f"state[{k}][{name!r}]")
    if extras:
        for k, (a, r) in enumerate(zip(opt.averaged_params(), ref.averaged_params())):
            assert_close(a, r, np.float32, f"averaged_params()[{k}]")


def compact_state(dtype_name, state_dtype):
    """8-bit or bfloat16 state, replicated: every rank steps the whole parameters on the reduced
    gradients, as one process given their sum does (bit for bit at 2 ranks)."""
    dtype = DTYPES.get(dtype_name, np.dtype(np.float32))
    params = [p.astype(dtype) for p in initial_params([np.float32] * 4)]
    reference = [p.copy() for p in params]
    options = dict(lr=0.01, state_dtype=state_dtype, min_8bit_size=64, clip_grad_norm=1.0, polyak=0.9)
    opt = fastopt.Adam(params, **options, backend=BACKEND, comm=COMM, shard_state=False, bucket_bytes=256)
    ref = fastopt.Adam(reference, **options, backend=BACKEND)  # one process, same kernels
    for step in range(8):
        opt.step(gradients(params, step, N, MINE))
        ref.step(summed_gradients(reference, step), grad_scale=N)
        assert_identical_on_all_ranks(params, f"step {step}")
    for k, (p, r) in enumerate(zip(params, reference)):
        if N == 2:
            assert p.tobytes() == r.tobytes(), f"params[{k}]"
        assert np.allclose(p.astype(np.float64), r.astype(np.float64), rtol=1e-2, atol=1e-3), f"params[{k}]"
    state, expected = opt.state_dict()["state"], ref.state_dict()["state"]
    for k in expected:
        names = sorted(n for n, v in expected[k].items() if isinstance(v, np.ndarray))
        assert names == sorted(n for n, v in state[k].items() if isinstance(v, np.ndarray)), names
        if state_dtype == "int8" and params[k].size >= 64:
            assert state[k]["m"].dtype == np.uint8 and "m_absmax" in names, names


def checkpoint_resumes(shard):
    """save → load into a new optimizer over other arrays → the same next steps, bit for bit."""
    dtype = DTYPES["bfloat16"]
    params = [p.astype(dtype) for p in initial_params([np.float32] * 4)]
    opt = fastopt.Adam(params, lr=0.01, backend=BACKEND, comm=COMM, shard_state=shard, bucket_bytes=256)
    for step in range(3):
        opt.step(gradients(params, step, N, MINE))
    path = COMM.bcast(tempfile.mkdtemp() if RANK == 0 else None)
    fastopt.distributed.save(path, opt, params)
    other = [np.zeros_like(p) for p in params]
    resumed = fastopt.Adam(other, lr=0.01, backend=BACKEND, comm=COMM, shard_state=shard, bucket_bytes=256)
    fastopt.distributed.load(path, resumed, other)
    for a, b in zip(other, params):
        assert a.dtype == dtype and a.tobytes() == b.tobytes()
    for step in range(3, 6):
        opt.step(gradients(params, step, N, MINE))
        resumed.step(gradients(other, step, N, MINE))
    for a, b in zip(other, params):
        assert a.tobytes() == b.tobytes()


def refused():
    """Compact state with sharding (the default with several ranks) raises on every rank, before
    anything is built."""
    params = [p.astype(DTYPES["bfloat16"]) for p in initial_params([np.float32] * 4)]
    for options in (dict(state_dtype="int8"), dict(state_dtype="bfloat16", shard_state=True)):
        try:
            fastopt.Adam(params, lr=0.01, comm=COMM, backend=BACKEND, **options)
        except ValueError as exc:
            assert "needs shard_state=False" in str(exc), exc
        else:
            raise AssertionError(f"{options} was accepted with comm=")


def bad_gradient_on_one_rank():
    """A float16 gradient for a bfloat16 parameter on the last rank: that rank raises TypeError and
    the others RuntimeError naming it, before any collective, and nothing changes anywhere."""
    params = [p.astype(DTYPES["bfloat16"]) for p in initial_params([np.float32] * 4)]
    opt = fastopt.Adam(params, lr=0.01, backend=BACKEND, comm=COMM, bucket_bytes=256)
    opt.step(gradients(params, 0, N, MINE))
    before = [p.copy() for p in params]
    state = opt.state_dict()
    grads = gradients(params, 1, N, MINE)
    if RANK == N - 1:
        grads[2] = grads[2].astype(np.float16)
    try:
        opt.step(grads)
    except (TypeError, RuntimeError) as exc:  # the rank with the bad input names it; the others defer to it
        if RANK == N - 1:
            assert isinstance(exc, TypeError) and "grads[2]" in str(exc), exc
        else:
            assert isinstance(exc, RuntimeError) and f"rank {N - 1}" in str(exc), exc
    else:
        raise AssertionError("a float16 gradient for a bfloat16 parameter was accepted")
    assert all(a.tobytes() == b.tobytes() for a, b in zip(params, before))
    after = opt.state_dict()
    assert after["shard"]["pieces"].__repr__() == state["shard"]["pieces"].__repr__() and opt.steps == 1


checks = Checks()
if "--quick" in sys.argv:  # the numba job
    checks.run("bfloat16 sharded", trajectory, "bfloat16", True, extras=True)
    checks.run("bfloat16 stochastic rounding sharded", trajectory, "bfloat16", True, rounding="stochastic")
    checks.run("int8 state replicated", compact_state, "float32", "int8")
    sys.exit(0)
for shard in (True, False):
    checks.run(f"bfloat16 shard={shard}", trajectory, "bfloat16", shard, extras=shard)
    checks.run(f"float16 shard={shard}", trajectory, "float16", shard, extras=not shard)
    checks.run(f"bfloat16 master_weights=False shard={shard}", trajectory, "bfloat16", shard, master_weights=False)
    checks.run(f"float16 stochastic rounding shard={shard}", trajectory, "float16", shard, rounding="stochastic")
    checks.run(f"bfloat16 checkpoint shard={shard}", checkpoint_resumes, shard)
checks.run("int8 state replicated, float32 parameters", compact_state, "float32", "int8")
checks.run("int8 state replicated, bfloat16 parameters", compact_state, "bfloat16", "int8")
checks.run("bfloat16 state replicated, float16 parameters", compact_state, "float16", "bfloat16")
checks.run("compact state with sharding refused", refused)
checks.run("a float16 gradient for a bfloat16 parameter on one rank", bad_gradient_on_one_rank)
