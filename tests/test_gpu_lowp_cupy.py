"""The "cupy" backend's low-precision functions (``kernels/cupy/lowp.cu``, ``lowp.py``): 16-bit
parameters (``mixed_step``, ``mixed_sumsq``) and 8-bit state (``state8_step``).

Tests marked ``gpu`` run the kernels on a real GPU against ``fastopt.reference`` (the same checks
as tests/test_mixed_precision.py and tests/test_state8.py make for the CPU backend) and skip with
the reason elsewhere. The others run anywhere: the generated tables and keys against the CPU
backend's, the 8-bit rules against the reference's, the PTX conversions, and the host wrappers'
launches with the loader and the stream placement replaced by recorders (no CuPy needed).
The NVRTC compilation itself (no warnings, no spills, no float64 in float kernels) is
tests/test_cuda_sources.py's, for every module of ``_sources.MODULES`` including "lowp".
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import pytest

import fastopt.kernels.cupy as cupy_backend
import fastopt.reference as reference
from fastopt import functional
from fastopt.kernels.cupy import _sources as S
from fastopt.kernels.cupy import lowp
from fastopt.reference import lowp as reference_lowp
from fastopt.reference import state8 as reference8

from conftest import assert_close
from optim_cases import CASES, case_id, initial_state

NO_GPU = cupy_backend.unavailable_reason() or None
F16 = np.dtype(np.float16)


def gpu(test):
    """A GPU test: marked ``gpu``, skipped with the reason where no GPU can run it."""
    return pytest.mark.gpu(pytest.mark.skipif(NO_GPU is not None, reason=NO_GPU or "")(test))


# ---------------------------------------------------------------------------------------------
# anywhere: tables, keys, rules, PTX


def test_state8_tables_are_the_quantizers():
    from fastopt.kernels.numba_cpu import quantize

    for signed in (True, False):
        np.testing.assert_array_equal(S.map8(signed).view(np.uint32), quantize.MAP[signed].view(np.uint32))
        np.testing.assert_array_equal(S.thresholds8(signed).view(np.uint32),
                                      quantize.THRESHOLDS[(signed, np.dtype(np.float32))].view(np.uint32))
    assert "fo_zero8[2] = {0, 127}" in S.state8_tables()
    assert [quantize.ZERO[False], quantize.ZERO[True]] == [0, 127]


def test_tensor_keys_are_the_cpu_backends():
    rng = np.random.default_rng(3)
    for _ in range(200):
        seed, step, k = int(rng.integers(0, 2 ** 63)), int(rng.integers(0, 10 ** 6)), int(rng.integers(0, 1000))
        assert lowp.tensor_key(seed, step, k) == reference_lowp.tensor_key(seed, step, k)


_RULE_CASES = [
    ("adam_step", dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                       amsgrad=False, step=1)),
    ("adam_step", dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                       amsgrad=True, step=1)),
    ("sgd_step", dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, convention="textbook")),
    ("sgd_step", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0, convention="torch")),
    ("adagrad_step", dict(lr=0.1, eps=1e-10, weight_decay=0.0)),
    ("rmsprop_step", dict(lr=0.01, rho=0.99, eps=1e-8, momentum=0.0, nesterov=False, centered=True,
                          weight_decay=0.0, convention="textbook")),
    ("rmsprop_step", dict(lr=0.01, rho=0.99, eps=1e-8, momentum=0.9, nesterov=True, centered=False,
                          weight_decay=0.0, convention="torch")),
    ("rmsprop_step", dict(lr=0.01, rho=0.99, eps=1e-8, momentum=0.9, nesterov=False, centered=False,
                          weight_decay=0.0, convention="torch")),
    ("adadelta_step", dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, convention="textbook")),
    ("adam_step", dict(lr=1e-3)),
]


@pytest.mark.parametrize("op, hyper", _RULE_CASES)
def test_state8_rules_are_the_references(op, hyper):
    assert lowp.state8_supported(op, **hyper) == reference8.state8_supported(op, **hyper)
    if reference8.state8_supported(op, **hyper) is None:
        assert lowp.state8_layout(op, **hyper) == reference8.state8_layout(op, **hyper)
    else:
        with pytest.raises(ValueError):
            lowp.state8_layout(op, **hyper)


@functools.lru_cache(maxsize=None)
def _ptx():
    from test_cuda_sources import compile_source, ptx_entries

    result = compile_source(S.source("lowp"), S.name_expressions("lowp"), "compute_90")
    assert result.ok, result.log
    entries = ptx_entries(result.output)
    return {name: entries[mangled] for name, mangled in result.lowered.items()}


def test_mixed_kernels_round_with_the_ptx_conversions():
    bodies = _ptx()
    for variant in S.UPDATES:
        half = bodies[S.mixed_kernel(variant, "float16")]
        bf16 = bodies[S.mixed_kernel(variant, "bfloat16")]
        assert "cvt.rn.f16.f32" in half and "cvt.f32.f16" in half, variant
        assert "cvt.rn.bf16.f32" in bf16 and "cvt.rn.f16" not in bf16, variant


def test_state8_kernels_reduce_by_shuffles_and_search_in_shared_memory():
    bodies = _ptx()
    for variant in S.STATE8_UPDATES:
        body = bodies[S.state8_kernel(variant)]
        assert "shfl.sync.bfly" in body and "ld.shared.f32" in body, variant


# ---------------------------------------------------------------------------------------------
# anywhere: the host wrappers, with the loader and the placement recorded


class Fake:
    """A device-array stand-in: ``__cuda_array_interface__`` with a made-up address."""

    _next = [0x10000]

    def __init__(self, shape, dtype):
        self.shape = tuple(shape) if isinstance(shape, tuple) else (shape,)
        self.dtype = np.dtype(dtype)
        self.address = Fake._next[0]
        Fake._next[0] += 0x10000

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.address, False), "version": 2}


@pytest.fixture
def launches(monkeypatch):
    from fastopt.kernels.cupy import _device, _loader

    calls = []

    @contextlib.contextmanager
    def place(like, *others):
        yield type("Where", (), {"stream": None})()

    monkeypatch.setattr(_device, "place", place)
    monkeypatch.setattr(_loader, "grid", lambda module, name, units, block: max(1, -(-units // block)))
    monkeypatch.setattr(_loader, "resident", lambda module, name, block: 1000)
    monkeypatch.setattr(_loader, "launch", lambda *args: calls.append(args))
    return calls


ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False)


def test_mixed_step_packs_pointers_keys_and_flags(launches):
    sizes = (5, 0, 300)
    params = [Fake(n, np.float16) for n in sizes]
    grads = [Fake(n, np.float32) for n in sizes]
    states = [(Fake(n, np.float32), Fake(n, np.float32), None) for n in sizes]
    lowp.mixed_step("adam_step", params, grads, None, states, None, rounding="stochastic", seed=7, counter=3,
                    indices=[4, 5, 6], grad_clip=2.0, step=3, **ADAM)
    (module, name, grid, block, args, stream), = launches
    assert (module, name, block, stream) == ("lowp", S.mixed_kernel("adam", "float16"), S.BLOCK, None)
    scalars, packed, mul, mul_ptr, clip, avg_weight, grad32, stochastic = args
    assert scalars.dtype == S.scalars_dtype("adam", np.float32) and packed.dtype == S.aux_list_dtype(6)
    assert packed["count"][0] == 2  # the empty tensor is skipped
    rows = packed["ptr"][0, :2].tolist()
    for row, t in zip(rows, (0, 2)):
        assert row == [params[t].address, grads[t].address, 0, 0, states[t][0].address, states[t][1].address]
    assert packed["aux"][0, :2].tolist() == [lowp.tensor_key(7, 3, 4), lowp.tensor_key(7, 3, 6)]
    assert packed["n"][0, :2].tolist() == [5, 300]
    assert (float(mul), int(mul_ptr), float(clip), int(grad32), int(stochastic)) == (1.0, 0, 2.0, 1, 1)
    assert mul.dtype == clip.dtype == avg_weight.dtype == np.float32


def test_mixed_step_names_a_dtype_it_cannot_store():
    with pytest.raises(TypeError, match="float32"):
        lowp.mixed_step("sgd_step", [Fake(3, np.float32)], [Fake(3, np.float32)], None, [(None,)], None,
                        lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, convention="textbook")
    with pytest.raises(TypeError, match="float64"):
        lowp.mixed_step("sgd_step", [Fake(3, np.float16)], [Fake(3, np.float64)], None, [(None,)], None,
                        lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, convention="textbook")


def test_state8_step_packs_block_offsets_and_maps(launches):
    sizes = (1, 600, 256)
    params = [Fake(n, np.float32) for n in sizes]
    grads = [Fake(n, np.float32) for n in sizes]
    states = [((Fake(n, np.uint8), Fake(-(-n // 256), np.float32)), (Fake(n, np.uint8), Fake(-(-n // 256), np.float32)),
               None) for n in sizes]
    lowp.state8_step("adam_step", params, grads, states, None, step=2, **ADAM)
    (module, name, grid, block, args, stream), = launches
    assert name == S.state8_kernel("adam") and grid == 1 + 3 + 1
    scalars, packed, blocks, qblock, *_, signed0, signed1 = args
    assert int(blocks) == 5 and int(qblock) == 256 and (int(signed0), int(signed1)) == (1, 0)
    assert packed["aux"][0, :3].tolist() == [0, 1, 4]
    assert scalars["bc1"][0] == np.float32(1 - 0.9 ** 2) and scalars["bc2"][0] == np.float32(1 - 0.999 ** 2)
    with pytest.raises(ValueError, match="block"):
        lowp.state8_step("adam_step", params, grads, states, None, step=2, block=512, **ADAM)
    with pytest.raises(ValueError, match="amsgrad"):
        lowp.state8_step("adam_step", params, grads, states, None, step=2, **{**ADAM, "amsgrad": True})


# ---------------------------------------------------------------------------------------------
# on a GPU: against the reference


def _mixed_run(module, name, hyper, grad_dtype, master, rounding, sizes, steps, to_device):
    spec = functional.SPECS[name]
    checked = spec.check(**hyper)
    rng = np.random.default_rng(5)
    params = [to_device(rng.standard_normal(n).astype(F16)) for n in sizes]
    masters = [to_device(_host(p).astype(np.float32)) for p in params] if master else None
    states = [{k: to_device(v) for k, v in initial_state(name, (n,), np.float32, rng).items()} for n in sizes]
    avgs = [to_device(np.zeros(n, np.float32)) for n in sizes]
    for step in range(1, steps + 1):
        grads = [to_device(rng.standard_normal(n).astype(grad_dtype)) for n in sizes]
        keywords = dict(checked, step=step) if spec.step_count else dict(checked)
        module.mixed_step(spec.kernel, params, grads, masters, [tuple(s[k] for k in spec.state) for s in states],
                          avgs, rounding=rounding, seed=11, counter=step, indices=list(range(len(sizes))),
                          grad_mul=0.5, grad_clip=1.5, avg_weight=0.25, **keywords)
    return ([_host(p) for p in params], None if masters is None else [_host(m) for m in masters],
            [{k: _host(v) for k, v in s.items()} for s in states], [_host(a) for a in avgs])


def _host(a):
    if isinstance(a, np.ndarray):
        return a
    import cupy

    return cupy.asnumpy(a)


def _device_copy(a):
    import cupy

    return cupy.asarray(a)


def _codes_apart(a, b) -> int:
    def line(x):
        bits = x.view(np.uint16).astype(np.int64)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)
    return int(np.max(np.abs(line(a) - line(b)), initial=0))


MIXED_SIZES = (1, 7, 1000, 70_001)


@gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("grad_dtype, master, rounding", [(F16, True, "nearest"), (np.float32, False, "nearest"),
                                                          (F16, False, "stochastic")])
def test_mixed_step_matches_the_reference(case, grad_dtype, master, rounding):
    name, hyper = case
    got = _mixed_run(cupy_backend, name, hyper, grad_dtype, master, rounding, MIXED_SIZES, 3, _device_copy)
    want = _mixed_run(reference, name, hyper, grad_dtype, master, rounding, MIXED_SIZES, 3, lambda a: a)
    params, masters, states, avgs = got
    ref_params, ref_masters, ref_states, ref_avgs = want
    for t, (p, q) in enumerate(zip(params, ref_params)):
        assert p.dtype == F16
        # the float32 update may differ from the reference's in its last bits (and, in this
        # backend, float32 subnormals are flushed), which can move a rounding by one code
        assert _codes_apart(p, q) <= 1, f"params[{t}]"
        if master:
            assert_close(masters[t], ref_masters[t], np.float32, f"masters[{t}]")
            np.testing.assert_array_equal(p.view(np.uint16), reference_lowp.round_nearest(masters[t], F16).view(np.uint16))
        for key in states[t]:
            assert_close(states[t][key], ref_states[t][key], np.float32, f"state[{t}][{key}]")
        assert_close(avgs[t], ref_avgs[t], np.float32, f"avgs[{t}]")


@gpu
def test_mixed_sumsq_matches_the_reference():
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal(n).astype(F16) for n in (0, 1, 1000, 300_000)]
    got = cupy_backend.mixed_sumsq([_device_copy(g) for g in grads])
    want = reference.mixed_sumsq(grads) if hasattr(reference, "mixed_sumsq") else sum(
        float(np.sum(g.astype(np.float64) ** 2)) for g in grads)
    assert isinstance(got, float) and math.isclose(got, want, rel_tol=1e-12)


@gpu
@pytest.mark.parametrize("averaged", [False, True])
def test_state8_step_matches_the_reference_bit_for_bit(averaged):
    import test_state8 as T

    for op, hyper in T.CONFIGS:
        rng = np.random.default_rng(13)
        sizes = T.SIZES + [70_000]
        params = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        states = T.initial_state(rng, op, hyper, sizes)
        avgs = [p.copy() for p in params] if averaged else None
        params_ref, states_ref = [p.copy() for p in params], T.copied(states)
        avgs_ref = None if avgs is None else [a.copy() for a in avgs]
        d_params = [_device_copy(p) for p in params]
        d_states = [tuple(None if s is None else (_device_copy(s[0]), _device_copy(s[1])) for s in st) for st in states]
        d_avgs = None if avgs is None else [_device_copy(a) for a in avgs]
        extras = dict(grad_mul=0.5, grad_clip=3.0, avg_weight=0.25 if averaged else 0.0)
        for step in range(1, 4):
            grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(np.float32) for n in sizes]
            cupy_backend.state8_step(op, d_params, [_device_copy(g) for g in grads], d_states, d_avgs, **extras,
                                     **T.with_step(op, hyper, step))
            reference8.state8_step(op, params_ref, grads, states_ref, avgs_ref, **extras, **T.with_step(op, hyper, step))
        T.assert_same([_host(p) for p in d_params], params_ref,
                      [tuple(None if s is None else (_host(s[0]), _host(s[1])) for s in st) for st in d_states],
                      states_ref, None if d_avgs is None else [_host(a) for a in d_avgs], avgs_ref)
