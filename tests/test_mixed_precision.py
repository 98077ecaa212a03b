"""16-bit parameters (bfloat16, float16) in every optimizer: the "numba" kernels against the
reference, master weights, stochastic rounding, resume, and bad input (fastopt.precision)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fastopt
import fastopt.reference as reference
from fastopt import functional
from fastopt.kernels import numba_cpu
from fastopt.kernels.numba_cpu import multi
from fastopt.reference import lowp

from conftest import assert_close
from optim_cases import CASES, OPTIMIZER_CLASSES, case_id, initial_state

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
SIZES = (1, 7, 1000)


def _codes_apart(a, b) -> int:
    """The largest distance between the bit patterns of two arrays of one 16-bit format, counted
    in representable values (both signs on one line)."""
    def line(x):
        bits = x.view(np.uint16).astype(np.int64)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)
    return int(np.max(np.abs(line(a) - line(b)), initial=0))


def _run(module, name, hyper, dtype, grad_dtype, master, rounding, sizes, steps, seed=0):
    """``steps`` calls of ``module.mixed_step`` on a fixed problem; returns params, masters, states."""
    spec = functional.SPECS[name]
    checked = spec.check(**hyper)
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(n).astype(dtype) for n in sizes]
    masters = [p.astype(np.float32) for p in params] if master else None
    states = [initial_state(name, (n,), np.float32, rng) for n in sizes]
    for step in range(1, steps + 1):
        grads = [rng.standard_normal(n).astype(grad_dtype) for n in sizes]
        keywords = dict(checked, step=step) if spec.step_count else dict(checked)
        module.mixed_step(spec.kernel, params, grads, masters, [tuple(s[k] for k in spec.state) for s in states],
                          None, rounding=rounding, seed=11, counter=step, indices=list(range(len(sizes))),
                          grad_mul=0.5, grad_clip=1.5, **keywords)
    return params, masters, states


def _compare(name, got, want, dtype, master):
    params, masters, states = got
    ref_params, ref_masters, ref_states = want
    for t, (p, q) in enumerate(zip(params, ref_params)):
        assert p.dtype == dtype
        # the float32 update may differ from the reference's in its last bit, which can move a
        # rounding by one code; never more
        assert _codes_apart(p, q) <= 1, f"params[{t}]"
        if master:
            assert_close(masters[t], ref_masters[t], np.float32, f"masters[{t}]")
            np.testing.assert_array_equal(p.view(np.uint16), lowp.round_nearest(masters[t], dtype).view(np.uint16),
                                          err_msg="the parameter is not its master copy rounded to nearest")
        for key in states[t]:
            assert_close(states[t][key], ref_states[t][key], np.float32, f"state[{t}][{key}]")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_optimizer_on_bfloat16_parameters_with_master_weights(case):
    name, hyper = case
    got = _run(numba_cpu, name, hyper, BF16, BF16, True, "nearest", SIZES, 4)
    want = _run(reference, name, hyper, BF16, BF16, True, "nearest", SIZES, 4)
    _compare(name, got, want, BF16, True)


VARIANTS = [  # (param dtype, grad dtype, master weights, rounding)
    (BF16, np.float32, True, "nearest"),
    (BF16, BF16, False, "nearest"),
    (BF16, BF16, False, "stochastic"),
    (F16, F16, True, "nearest"),
    (F16, np.float32, False, "stochastic"),
]


@pytest.mark.parametrize("variant, sizes", [(v, SIZES) for v in VARIANTS] + [(VARIANTS[-1], (40000, 3))],
                         ids=[f"serial-{v[0]}-{v[1].__name__ if isinstance(v[1], type) else v[1]}-{v[2]}-{v[3]}"
                              for v in VARIANTS] + ["parallel"])
def test_adam_variants_match_the_reference(variant, sizes):
    dtype, grad_dtype, master, rounding = variant
    hyper = dict(lr=1e-2, weight_decay=0.01)
    got = _run(numba_cpu, "adam", hyper, dtype, grad_dtype, master, rounding, sizes, 3)
    want = _run(reference, "adam", hyper, dtype, grad_dtype, master, rounding, sizes, 3)
    _compare("adam", got, want, dtype, master)
    if rounding == "stochastic":  # the same key and index give the same draw: the codes agree where
        # the float32 values do
        same = [g.view(np.uint16) == w.view(np.uint16) for g, w in zip(got[0], want[0])]
        assert np.mean(np.concatenate(same)) > 0.99


@pytest.mark.parametrize("dtype, spacing", [(BF16, 2.0**-8), (F16, 2.0**-11)], ids=["bfloat16", "float16"])
def test_stochastic_rounding_moves_parameters_that_nearest_rounding_leaves_stuck(dtype, spacing):
    """SGD steps below half the spacing of the format under 1.0: rounded to nearest, θ never
    moves; rounded stochastically, its mean follows the exact trajectory within its standard error."""
    n, lr, steps = 30_000, 1e-4, 10
    results = {}
    for rounding in ("nearest", "stochastic"):
        param = np.ones(n, dtype)
        opt = fastopt.SGD([param], lr=lr, master_weights=False, rounding=rounding, seed=5)
        for _ in range(steps):
            opt.step([np.ones(n, np.float32)])
        results[rounding] = param.astype(np.float64)
    assert np.all(results["nearest"] == 1.0)
    exact = 1.0 - steps * lr
    sr = results["stochastic"]
    # each step rounds independently with variance ≤ spacing²/4
    bound = 5 * np.sqrt(steps * spacing**2 / 4 / n)
    assert abs(sr.mean() - exact) < bound, (sr.mean(), exact, bound)


def test_stochastic_rounding_repeats_and_resumes_bit_for_bit():
    def build(seed):
        rng = np.random.default_rng(0)
        params = [rng.standard_normal(n).astype(BF16) for n in (300, 5000)]
        return params, fastopt.Adam(params, lr=1e-2, master_weights=False, rounding="stochastic", seed=seed)

    grads = [[np.random.default_rng(s).standard_normal(n).astype(BF16) for n in (300, 5000)] for s in range(6)]
    a, opt_a = build(7)
    for g in grads:
        opt_a.step(g)
    b, opt_b = build(7)
    for g in grads[:3]:
        opt_b.step(g)
    saved = opt_b.state_dict()
    c, opt_c = build(7)
    for p, q in zip(c, b):
        p[...] = q
    opt_c.load_state_dict(saved)
    for g in grads[3:]:
        opt_c.step(g)
    for p, q in zip(a, c):
        np.testing.assert_array_equal(p.view(np.uint16), q.view(np.uint16))
    d, opt_d = build(8)
    for g in grads:
        opt_d.step(g)
    assert any((p.view(np.uint16) != q.view(np.uint16)).any() for p, q in zip(a, d))


@pytest.mark.parametrize("module", [reference, numba_cpu], ids=["numpy", "numba"])
def test_pieces_with_starts_round_as_the_whole_parameter(module):
    """``starts``: pieces of a parameter stepped apart (as the data-parallel step does) draw the
    stochastic-rounding stream of their places in the whole parameter, so they end bit for bit
    where one step of the whole parameter does; without ``starts`` they do not."""
    rng = np.random.default_rng(3)
    param = rng.standard_normal(3001).astype(BF16)
    grad = rng.standard_normal(3001).astype(np.float32)
    cuts = (0, 1000, 1001, 3001)

    def step(pieces, starts):
        p = param.copy()
        m, v = np.zeros(3001, np.float32), np.zeros(3001, np.float32)
        views = [(p[a:b], grad[a:b], (m[a:b], v[a:b], None)) for a, b in pieces]
        module.mixed_step("adam_step", [x[0] for x in views], [x[1] for x in views], None, [x[2] for x in views],
                          None, rounding="stochastic", seed=5, counter=3, indices=[2] * len(views), starts=starts,
                          step=3, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                          decoupled_weight_decay=False, amsgrad=False)
        return p.view(np.uint16)

    whole = step([(0, 3001)], None)
    pieces = list(zip(cuts[:-1], cuts[1:]))
    np.testing.assert_array_equal(step(pieces, list(cuts[:-1])), whole)
    assert (step(pieces, None) != whole).any()


@pytest.mark.parametrize("module", [reference, numba_cpu], ids=["numpy", "numba"])
def test_8_bit_state_pieces_with_starts_round_as_the_whole_parameter(module):
    """``state8_step``'s ``starts``, as ``mixed_step``'s: pieces cut on blocks of 256 and stepped
    apart end where one step of the whole parameter does (parameter, codes and absmax), and
    without ``starts`` the parameter does not."""
    rng = np.random.default_rng(5)
    n = 3001
    param = rng.standard_normal(n).astype(BF16)
    grad = rng.standard_normal(n).astype(np.float32)
    cuts = (0, 512, 768, n)

    def step(pieces, starts):
        p = param.copy()
        m, v = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
        blocks = -(-n // 256)
        am, av = np.zeros(blocks, np.float32), np.zeros(blocks, np.float32)
        reference.quantize_blockwise(np.zeros(n, np.float32), m, am, signed=True, block=256)
        reference.quantize_blockwise(np.zeros(n, np.float32), v, av, signed=False, block=256)
        views = [(p[a:b], grad[a:b], ((m[a:b], am[a // 256:-(-b // 256)]), (v[a:b], av[a // 256:-(-b // 256)]), None))
                 for a, b in pieces]
        module.state8_step("adam_step", [x[0] for x in views], [x[1] for x in views], [x[2] for x in views], None,
                           rounding="stochastic", seed=5, counter=3, indices=[2] * len(views), starts=starts,
                           step=3, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                           decoupled_weight_decay=False, amsgrad=False)
        return p.view(np.uint16), m, v, am, av

    whole = step([(0, n)], None)
    pieces = list(zip(cuts[:-1], cuts[1:]))
    for got, want in zip(step(pieces, list(cuts[:-1])), whole):
        np.testing.assert_array_equal(got, want)
    assert (step(pieces, None)[0] != whole[0]).any()


@pytest.mark.parametrize("cls, hyper", OPTIMIZER_CLASSES, ids=[c for c, _ in OPTIMIZER_CLASSES])
def test_optimizer_classes_keep_float32_master_weights_and_state(cls, hyper):
    rng = np.random.default_rng(1)
    param = rng.standard_normal(500).astype(BF16)
    start = param.copy()
    opt = getattr(fastopt, cls)([param], **hyper)
    for _ in range(3):
        opt.step([rng.standard_normal(500).astype(BF16)])
    state = opt.state[0]
    assert state["master"].dtype == np.float32
    assert all(v.dtype == np.float32 for k, v in state.items() if k not in ("step", "avg_steps"))
    np.testing.assert_array_equal(param.view(np.uint16), lowp.round_nearest(state["master"], BF16).view(np.uint16))
    assert (param.view(np.uint16) != start.view(np.uint16)).any()


def test_polyak_average_of_a_16_bit_parameter_is_float32_and_matches_the_reference():
    results = []
    for backend in ("numba", "numpy"):
        rng = np.random.default_rng(4)
        param = rng.standard_normal(300).astype(BF16)
        opt = fastopt.Adam([param], lr=1e-2, polyak=0.9, backend=backend)
        for _ in range(3):
            opt.step([rng.standard_normal(300).astype(BF16)])
        results.append(opt.averaged_params()[0])
    assert results[0].dtype == np.float32
    assert_close(results[0], results[1], np.float32, "averaged params")


def test_master_weights_resume_bit_for_bit_from_a_state_dict():
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(800).astype(np.float32) for _ in range(4)]
    first = rng.standard_normal(800).astype(BF16)
    param_a = first.copy()
    opt_a = fastopt.AdamW([param_a], lr=1e-2)
    for g in grads:
        opt_a.step([g])
    param_b = first.copy()
    opt_b = fastopt.AdamW([param_b], lr=1e-2)
    for g in grads[:2]:
        opt_b.step([g])
    saved = opt_b.state_dict()
    assert saved["state"][0]["master"].dtype == np.float32
    param_c = param_b.copy()
    opt_c = fastopt.AdamW([param_c], lr=1e-2)
    opt_c.load_state_dict(saved)
    for g in grads[2:]:
        opt_c.step([g])
    np.testing.assert_array_equal(param_a.view(np.uint16), param_c.view(np.uint16))
    np.testing.assert_array_equal(opt_a.state[0]["master"], opt_c.state[0]["master"])


@pytest.mark.parametrize("dtype", [BF16, np.float16])
def test_16_bit_sum_of_squares_adds_its_parts_in_order(dtype):
    """Each part's Σg² in element order, then the parts' sums in part order (as ``grad_sumsq``): a
    result that depends on the list's shapes only, emulated here with sequential sums."""
    rng = np.random.default_rng(4)
    grads = [(rng.standard_normal(n) * 3).astype(dtype) for n in (70_001, 13, 5_000)]  # 9 parts
    squares = np.concatenate([g.astype(np.float64) for g in grads]) ** 2
    parts = multi.parts_on_host(squares.size)
    assert parts == 9
    cuts = [squares.size * p // parts for p in range(parts + 1)]
    part_sums = [np.cumsum(squares[lo:hi])[-1] for lo, hi in zip(cuts, cuts[1:])]  # cumsum adds in order
    assert numba_cpu.mixed_sumsq(grads) == np.cumsum(part_sums)[-1]


def test_norm_clipping_and_nonfinite_skip_read_16_bit_gradients():
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(n).astype(BF16) * 10 for n in (100, 2000)]
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert np.isclose(numba_cpu.mixed_sumsq(grads), norm**2, rtol=1e-12)
    results = []
    for backend in ("numba", "numpy"):
        params = [np.zeros(g.shape, BF16) for g in grads]
        opt = fastopt.SGD(params, lr=1.0, backend=backend, clip_grad_norm=1.0, nonfinite="skip", master_weights=False)
        opt.step(grads)
        results.append(np.sqrt(sum(float(np.sum(p.astype(np.float64) ** 2)) for p in params)))
        bad = [g.copy() for g in grads]
        bad[1][5] = np.nan
        before = [p.copy() for p in params]
        opt.step(bad)
        assert opt.skipped_steps == 1
        for p, q in zip(params, before):
            np.testing.assert_array_equal(p.view(np.uint16), q.view(np.uint16))
    assert results[0] == pytest.approx(1.0, rel=1e-2) and results[1] == pytest.approx(1.0, rel=1e-2)


def test_bad_input_raises_and_modifies_nothing():
    param = np.ones(10, BF16)
    opt = fastopt.Adam([param], lr=0.1)
    opt.step([np.ones(10, BF16)])
    before = (param.copy(), {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt.state[0].items()})
    with pytest.raises(TypeError, match=r"grads\[0\] must have the dtype of params\[0\] \(bfloat16 or float32\), got float16"):
        opt.step([np.ones(10, np.float16)])
    with pytest.raises(TypeError, match="float64"):
        opt.step([np.ones(10, np.float64)])
    np.testing.assert_array_equal(param.view(np.uint16), before[0].view(np.uint16))
    for key, value in before[1].items():
        np.testing.assert_array_equal(opt.state[0][key], value)
    with pytest.raises(ValueError, match="rounding='stochastic'.*master_weights=False"):
        fastopt.Adam([np.ones(3, BF16)], rounding="stochastic")
    with pytest.raises(ValueError, match="rounding must be one of"):
        fastopt.Adam([np.ones(3, BF16)], rounding="up")
    with pytest.raises(TypeError, match="master_weights must be"):
        fastopt.Adam([np.ones(3, BF16)], master_weights="yes")
    with pytest.raises(ValueError, match="seed must be"):
        fastopt.Adam([np.ones(3, BF16)], master_weights=False, rounding="stochastic", seed=-1)
    with pytest.raises(TypeError, match="bfloat16 or float16 on the host"):
        fastopt.Adam([np.ones(3, np.int16)])
    # the functional steps take float32 and float64 only
    with pytest.raises(TypeError, match="float32 or float64"):
        fastopt.functional.sgd_step(np.ones(3, BF16), np.ones(3, BF16), lr=0.1)


class _DeviceHalf:
    """A stand-in CUDA array of float16 (only its interface is read)."""

    __cuda_array_interface__ = {"shape": (4,), "typestr": "<f2", "data": (1 << 20, False), "version": 3,
                                "strides": None}


def test_a_16_bit_array_on_a_backend_that_cannot_take_it_raises(monkeypatch):
    from fastopt import dispatch

    class NoHalf:  # a backend module without mixed_step
        __name__ = "fastopt.kernels.stand_in"

    monkeypatch.setattr(dispatch, "resolve", lambda backend, array: NoHalf())
    with pytest.raises(TypeError, match="backend 'numba-cuda' does not take bfloat16 or float16 parameters"):
        fastopt.SGD([_DeviceHalf()], lr=0.1)
    with pytest.raises(TypeError, match="has no 8-bit optimizer state"):
        fastopt.Adam([np.zeros(5000, np.float32)], state_dtype="int8")

    class Int8Only:  # a backend whose 8-bit step takes float32 parameters and int8 state only
        __name__ = "fastopt.kernels.stand_in"

        @staticmethod
        def state8_step(op, params, grads, states, avgs, *, block=256, **hyper):
            raise AssertionError("not reached")

        @staticmethod
        def state8_supported(op, **hyper):
            return None

        mixed_step = state8_step

    monkeypatch.setattr(dispatch, "resolve", lambda backend, array: Int8Only())
    with pytest.raises(TypeError, match="has no bfloat16 optimizer state"):
        fastopt.Adam([np.zeros(5000, np.float32)], state_dtype="bfloat16")
    with pytest.raises(TypeError, match="has no int8 state for 16-bit parameters"):
        fastopt.Adam([np.zeros(5000, BF16)], state_dtype="int8")
    monkeypatch.undo()
    with pytest.raises(TypeError, match="works on"):
        fastopt.SGD([np.ones(3, BF16)], lr=0.1, backend="numba-cuda")


def test_the_16_bit_kernels_compute_in_float32_only():
    """No float64 in the LLVM of low-precision variants (decode, update, both encodes), compiled
    afresh here: numba returns no IR for code it loaded from its disk cache."""
    from fastopt.kernels.numba_cpu import mixed, optim
    from test_kernel_float32 import native_ir

    for key in [(False, False, True, True, True), (True, True, False, False, False)]:
        runner = mixed.mixed_kernel(optim._adam).variant(*key).runner  # the loop (``runners.py``)
        functions = native_ir(runner, runner.signatures[0])
        assert any(" float " in f or "x float>" in f for f in functions)
        for f in functions:
            assert "double" not in f, f"{key}: float64 in {f.splitlines()[0][:100]}"


@pytest.mark.parametrize("dtype, state_dtype, options", [
    (np.float32, "int8", {}),
    (BF16, "int8", dict(master_weights=False, rounding="stochastic", seed=9)),
    (np.float16, "bfloat16", dict(clip_grad_norm=1.0, polyak=0.9)),
], ids=["float32-int8", "bfloat16-int8-stochastic", "float16-bfloat16-state"])
def test_sharded_compact_state_on_one_rank_equals_one_process(dtype, state_dtype, options):
    """comm= with shard_state=True on one rank steps the parameters piece by piece, one bucket of
    256 elements at a time (bucket_bytes=1024), cut inside the parameters: 8-bit pieces start on
    blocks (``partition.aligned``) and stochastic rounding numbers each piece's elements from its
    start, so parameters and (consolidated) state equal one process's bit for bit."""
    mpi = pytest.importorskip("mpi4py.MPI", reason="the mpi extra is not installed")
    import fastopt.distributed

    rng = np.random.default_rng(2)
    shapes = [(30, 40), (700,), (100,), (3, 5)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    alone = [p.copy() for p in params]
    # the engine's cuts and keys are what is tested: the reference backend, which compiles nothing
    # (the numba backend's sharded steps: tests/distributed/mpi_lowp.py)
    hyper = dict(lr=0.01, state_dtype=state_dtype, min_8bit_size=64, backend="numpy", **options)
    opt = fastopt.Adam(params, comm=mpi.COMM_SELF, shard_state=True, bucket_bytes=1024, **hyper)
    ref = fastopt.Adam(alone, **hyper)
    for _ in range(4):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        opt.step(grads)
        ref.step(grads)
    starts = sorted({(p.k, p.start) for p in opt._dist._all_pieces()})
    assert (0, 512) in starts or (0, 256) in starts, starts
    for p, q in zip(params, alone):
        np.testing.assert_array_equal(p.view(np.uint8), q.view(np.uint8))
    whole, expected = fastopt.distributed.consolidate_state_dict(opt), ref.state_dict()
    for k, entry in expected["state"].items():
        arrays = {n: v for n, v in entry.items() if isinstance(v, np.ndarray)}
        assert sorted(arrays) == sorted(n for n, v in whole["state"][k].items() if isinstance(v, np.ndarray))
        for name, value in arrays.items():
            assert whole["state"][k][name].dtype == value.dtype, (k, name)
            np.testing.assert_array_equal(whole["state"][k][name].view(np.uint8), value.view(np.uint8))
    if state_dtype == "int8":
        assert expected["state"][0]["m"].dtype == np.uint8