"""Under mpiexec: low precision with comm=. Every rank passes bfloat16 (or float16) gradients of
its share of the batch; the step reduces them in float32 and updates the float32 master copies
(sharded or replicated), and every rank ends with the same 16-bit parameters. 8-bit and bfloat16
optimizer state run replicated and sharded (each rank quantizing whole blocks of its pieces). One process on the same backend is given what the ranks reduce:
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


COMPACT_SHAPES = [(40, 30), (700,), (3, 4, 5), (1,)]  # 1961 elements: rank cuts fall inside parameters


def compact_gradients(dtype, step, rank):
    rng = np.random.default_rng(1000 * step + rank)
    return [(0.1 * rng.standard_normal(shape)).astype(dtype) for shape in COMPACT_SHAPES]


def compact_sharded(dtype_name, state_dtype, rounding="nearest"):
    """8-bit or bfloat16 state, sharded: each rank keeps its pieces' codes and absmax (8-bit
    pieces start on a block of 256), and the whole equals one process given the summed gradients
    (bit for bit at 2 ranks; at 3 the sums may round differently: within a code)."""
    dtype = DTYPES.get(dtype_name, np.dtype(np.float32))
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(shape).astype(dtype) for shape in COMPACT_SHAPES]
    reference = [p.copy() for p in params]
    options = dict(lr=0.01, state_dtype=state_dtype, min_8bit_size=64, clip_grad_norm=1.0, polyak=0.9)
    if rounding == "stochastic":
        options.update(master_weights=False, rounding="stochastic", seed=3)
    opt = fastopt.Adam(params, **options, backend=BACKEND, comm=COMM, bucket_bytes=1024)  # sharded: the default
    ref = fastopt.Adam(reference, **options, backend=BACKEND)
    for step in range(8):
        opt.step(compact_gradients(dtype, step, RANK))
        total = [sum(g.astype(np.float32) for g in parts)
                 for parts in zip(*(compact_gradients(dtype, step, r) for r in range(N)))]
        ref.step(total, grad_scale=N)
        assert_identical_on_all_ranks(params, f"step {step}")
    pieces = list(opt._dist._all_pieces())
    if state_dtype == "int8":
        assert all(p.start % 256 == 0 for p in pieces), [(p.k, p.start) for p in pieces]
    cut_inside = COMM.allgather(any(p.start > 0 for p in pieces))
    assert any(cut_inside), "no rank owns a piece that starts inside a parameter"
    assert all(p.state["m"].size == p.stop - p.start for p in pieces)
    for k, (p, r) in enumerate(zip(params, reference)):
        if N == 2:
            assert p.tobytes() == r.tobytes(), f"params[{k}]"
        assert np.allclose(p.astype(np.float64), r.astype(np.float64), rtol=1e-2, atol=1e-3), f"params[{k}]"
    whole = fastopt.distributed.consolidate_state_dict(opt, 0)
    if RANK == 0:
        expected = ref.state_dict()["state"]
        for k, entry in expected.items():
            names = sorted(n for n, v in entry.items() if isinstance(v, np.ndarray))
            assert names == sorted(n for n, v in whole["state"][k].items() if isinstance(v, np.ndarray)), names
            for name in names:
                a, e = whole["state"][k][name], entry[name]
                assert a.dtype == e.dtype and a.shape == e.shape, (k, name, a.dtype, e.dtype, a.shape, e.shape)
                if N == 2:
                    assert a.tobytes() == e.tobytes(), f"state[{k}][{name!r}]"
                elif a.dtype == np.uint8:
                    assert np.abs(a.astype(np.int64) - e.astype(np.int64)).max() <= 1, f"state[{k}][{name!r}]"
                else:
                    assert np.allclose(a.astype(np.float64), e.astype(np.float64), rtol=1e-2, atol=1e-6), name
        single = fastopt.Adam([p.copy() for p in reference], **options, backend=BACKEND)
        single.load_state_dict(whole)  # the consolidated state is an ordinary single-process one
    replicated = sum(v.nbytes for s in ref.state for v in s.values() if isinstance(v, np.ndarray))
    assert opt._dist.state_bytes() < replicated / N + 2048, (opt._dist.state_bytes(), replicated)


def compact_checkpoint():
    """8-bit state, sharded: save → load into a new optimizer over other arrays → the same next
    steps, bit for bit; and the list of every rank's state dicts loads at this world size."""
    params = [np.random.default_rng(0).standard_normal(shape).astype(np.float32) for shape in COMPACT_SHAPES]
    options = dict(lr=0.01, state_dtype="int8", min_8bit_size=64, backend=BACKEND, comm=COMM, bucket_bytes=1024)
    opt = fastopt.Adam(params, **options)
    for step in range(3):
        opt.step(compact_gradients(np.float32, step, RANK))
    path = COMM.bcast(tempfile.mkdtemp() if RANK == 0 else None)
    fastopt.distributed.save(path, opt, params)
    every = COMM.allgather(opt.state_dict())
    other = [np.zeros_like(p) for p in params]
    resumed = fastopt.Adam(other, **options)
    fastopt.distributed.load(path, resumed, other)
    again = fastopt.Adam([p.copy() for p in params], **options)
    again.load_state_dict(every)
    for step in range(3, 6):
        grads = compact_gradients(np.float32, step, RANK)
        opt.step(grads)
        resumed.step(grads)
        again.step(grads)
    for a, b in zip(other, params):
        assert a.tobytes() == b.tobytes()
    mine, theirs = opt.state_dict()["shard"]["pieces"], resumed.state_dict()["shard"]["pieces"]
    for x, y in zip(mine, theirs):
        assert sorted(x["state"]) == sorted(y["state"])
        assert all(x["state"][n].tobytes() == y["state"][n].tobytes() for n in x["state"])


def compact_bad_piece():
    """A rank's own sharded state dict whose 8-bit codes have the wrong dtype is refused on every
    rank, and nothing changes."""
    params = [np.random.default_rng(0).standard_normal(shape).astype(np.float32) for shape in COMPACT_SHAPES]
    opt = fastopt.Adam(params, lr=0.01, state_dtype="int8", min_8bit_size=64, backend=BACKEND, comm=COMM,
                       bucket_bytes=1024)
    opt.step(compact_gradients(np.float32, 0, RANK))
    state = opt.state_dict()
    bad = opt.state_dict()
    if RANK == 0:
        piece = bad["shard"]["pieces"][0]
        piece["state"]["m"] = piece["state"]["m"].astype(np.float32)
    try:
        opt.load_state_dict(bad)
    except (ValueError, RuntimeError) as exc:
        if RANK == 0:
            assert isinstance(exc, ValueError) and "'m'" in str(exc) and "uint8" in str(exc), exc
    else:
        raise AssertionError("float32 codes were accepted")
    after = opt.state_dict()
    for x, y in zip(after["shard"]["pieces"], state["shard"]["pieces"]):
        assert all(x["state"][n].tobytes() == y["state"][n].tobytes() for n in x["state"])


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
    checks.run("int8 state sharded", compact_sharded, "float32", "int8")
    checks.run("int8 state sharded, bfloat16 stochastic rounding", compact_sharded, "bfloat16", "int8",
               rounding="stochastic")
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
checks.run("int8 state sharded, float32 parameters", compact_sharded, "float32", "int8")
checks.run("int8 state sharded, bfloat16 parameters, stochastic rounding", compact_sharded, "bfloat16", "int8",
           rounding="stochastic")
checks.run("bfloat16 state sharded, float16 parameters", compact_sharded, "float16", "bfloat16")
checks.run("int8 state sharded: checkpoint", compact_checkpoint)
checks.run("int8 state sharded: a bad piece refused", compact_bad_piece)
checks.run("a float16 gradient for a bfloat16 parameter on one rank", bad_gradient_on_one_rank)
