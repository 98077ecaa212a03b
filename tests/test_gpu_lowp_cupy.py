"""The "cupy" backend's low-precision functions (``kernels/cupy/lowp.cu``, ``lowp.py``,
``convert.cu``, ``bn_lowp.py``): 16-bit parameters (``mixed_step``, ``mixed_sumsq``), 8-bit state
(``state8_step``, float32 or 16-bit parameters) and 16-bit batch norm (``batchnorm_forward_lowp``,
``batchnorm_backward_lowp``).

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


def test_piece_keys_draw_the_whole_parameters_stream():
    """A piece starting at element s, element j, draws what element s + j of the parameter draws
    (``mixed_step(..., starts=)``, as the CPU backend's keys)."""
    from fastopt.kernels.numba_cpu import mixed

    for seed, step, k, start in ((7, 3, 4, 0), (2 ** 63 + 5, 10, 2, 1000), (1, 1, 0, 2 ** 40)):
        key = lowp.piece_key(seed, step, k, start)
        whole = reference_lowp.tensor_key(seed, step, k)
        np.testing.assert_array_equal(reference_lowp.uniform(key, np.arange(50)),
                                      reference_lowp.uniform(whole, start + np.arange(50)))
        assert key == int(mixed._keys(seed, step, [k], [start])[0])


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
def _ptx(module="lowp"):
    """{name expression: PTX body} of ``module`` for compute_90 (test_cuda_sources' compilation,
    shared with its tests when they run in the same process)."""
    from test_cuda_sources import compiled, ptx_entries

    result = compiled(module, "compute_90")
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
        for low in (None, *S.LOW_FORMATS):
            body = bodies[S.state8_kernel(variant, low)]
            assert "shfl.sync.bfly" in body and "ld.shared.f32" in body, (variant, low)


def test_state8_kernels_of_16bit_params_round_with_the_ptx_conversions():
    """Every (update, format) has its kernel: float16 θ decoded and rounded by cvt, bfloat16 θ
    rounded by cvt.rn.bf16.f32; the float32 kernels convert nothing."""
    bodies = _ptx()
    names = set(S.name_expressions("lowp"))
    for variant in S.STATE8_UPDATES:
        half, bf16 = S.state8_kernel(variant, "float16"), S.state8_kernel(variant, "bfloat16")
        assert {half, bf16} <= names
        assert "cvt.rn.f16.f32" in bodies[half] and "cvt.f32.f16" in bodies[half], variant
        assert "cvt.rn.bf16.f32" in bodies[bf16] and "cvt.rn.f16" not in bodies[bf16], variant
        assert "cvt.rn.f16" not in bodies[S.state8_kernel(variant)], variant


def test_bf16_state_kernels_round_the_state_with_the_ptx_conversion():
    """Every (update, θ format) has its bfloat16-state kernel (bf16_state_update<Op> for float32 θ,
    bf16_state_update_low<Op, H>): the states stored by cvt.rn.bf16.f32, decoded by a shift, one
    thread per element (no shuffles, no shared memory); float16 θ decoded and rounded by cvt."""
    bodies = _ptx()
    names = set(S.name_expressions("lowp"))
    for variant in S.STATE8_UPDATES:
        f32, half, bf16 = (S.bf16_state_kernel(variant, low) for low in (None, "float16", "bfloat16"))
        assert {f32, half, bf16} <= names
        for name in (f32, half, bf16):
            body = bodies[name]
            assert "cvt.rn.bf16.f32" in body and "shl.b32" in body, name
            assert "shfl.sync" not in body and ".shared" not in body, name
        assert "cvt.rn.f16.f32" in bodies[half] and "cvt.f32.f16" in bodies[half], variant
        assert "cvt.rn.f16" not in bodies[f32] and "cvt.rn.f16" not in bodies[bf16], variant


def test_convert_kernels_are_the_ptx_conversions():
    bodies = _ptx("convert")
    assert set(bodies) == {S.convert_kernel(k, low) for k in ("decode16", "encode16") for low in S.LOW_FORMATS}
    assert "cvt.f32.f16" in bodies[S.convert_kernel("decode16", "float16")]
    assert "cvt.rn.f16.f32" in bodies[S.convert_kernel("encode16", "float16")]
    assert "cvt.rn.bf16.f32" in bodies[S.convert_kernel("encode16", "bfloat16")]
    decode_bf16 = bodies[S.convert_kernel("decode16", "bfloat16")]
    assert "cvt.f32" not in decode_bf16 and "shl.b32" in decode_bf16  # exact: a shift


def test_keyed_list_layout():
    dtype = S.keyed_list_dtype(S.STATE8_LOW_SLOTS)
    capacity = S.keyed_list_capacity(S.STATE8_LOW_SLOTS)
    assert dtype.itemsize == (8 * S.STATE8_LOW_SLOTS + 24) * capacity + 8 <= S.LIST_BYTES
    assert f"sizeof(fo::KeyedList<{S.STATE8_LOW_SLOTS}>) == {dtype.itemsize}" in S.layout_checks("lowp")


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
                    indices=[4, 5, 6], starts=[0, 0, 9], grad_clip=2.0, step=3, **ADAM)
    (module, name, grid, block, args, stream), = launches
    assert (module, name, block, stream) == ("lowp", S.mixed_kernel("adam", "float16"), S.BLOCK, None)
    scalars, packed, mul, mul_ptr, clip, avg_weight, grad32, stochastic = args
    assert scalars.dtype == S.scalars_dtype("adam", np.float32) and packed.dtype == S.aux_list_dtype(6)
    assert packed["count"][0] == 2  # the empty tensor is skipped
    rows = packed["ptr"][0, :2].tolist()
    for row, t in zip(rows, (0, 2)):
        assert row == [params[t].address, grads[t].address, 0, 0, states[t][0].address, states[t][1].address]
    assert packed["aux"][0, :2].tolist() == [lowp.tensor_key(7, 3, 4), lowp.piece_key(7, 3, 6, 9)]
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
    sizes = (1, 600, 256, 2304)
    params = [Fake(n, np.float32) for n in sizes]
    grads = [Fake(n, np.float32) for n in sizes]
    states = [((Fake(n, np.uint8), Fake(-(-n // 256), np.float32)), (Fake(n, np.uint8), Fake(-(-n // 256), np.float32)),
               None) for n in sizes]
    lowp.state8_step("adam_step", params, grads, states, None, step=2, **ADAM)
    (module, name, grid, block, args, stream), = launches
    # 1 + 3 + 1 + 9 quantization blocks, one warp each: two CUDA blocks of 8 warps
    assert name == S.state8_kernel("adam") and block == 256 and grid == 2
    scalars, packed, blocks, qblock, *_, signed0, signed1 = args
    assert int(blocks) == 14 and int(qblock) == 256 and (int(signed0), int(signed1)) == (1, 0)
    assert packed["aux"][0, :4].tolist() == [0, 1, 4, 5]
    assert scalars["bc1"][0] == np.float32(1 - 0.9 ** 2) and scalars["bc2"][0] == np.float32(1 - 0.999 ** 2)
    with pytest.raises(ValueError, match="block"):
        lowp.state8_step("adam_step", params, grads, states, None, step=2, block=512, **ADAM)
    with pytest.raises(ValueError, match="amsgrad"):
        lowp.state8_step("adam_step", params, grads, states, None, step=2, **{**ADAM, "amsgrad": True})


def _state8_lists(sizes, param_dtype, grad_dtype, *, master, averaged=False, block=256):
    params = [Fake(n, param_dtype) for n in sizes]
    grads = [Fake(n, grad_dtype) for n in sizes]
    masters = [Fake(n, np.float32) for n in sizes] if master else None
    avgs = [Fake(n, np.float32) for n in sizes] if averaged else None
    states = [((Fake(n, np.uint8), Fake(-(-n // block), np.float32)),
               (Fake(n, np.uint8), Fake(-(-n // block), np.float32)), None) for n in sizes]
    return params, grads, masters, states, avgs


def test_state8_step_takes_the_cpu_backends_keywords():
    from fastopt import precision
    from fastopt.kernels import numba_cpu

    import inspect

    cpu = inspect.signature(numba_cpu.state8_step).parameters
    gpu = inspect.signature(lowp.state8_step).parameters
    assert list(cpu) == list(gpu)
    for k in gpu:
        assert (gpu[k].kind, gpu[k].default) == (cpu[k].kind, cpu[k].default), k
    # fastopt.precision routes 16-bit params with 8-bit or bfloat16 state here (by the signature)
    assert precision.compact_module(cupy_backend, "cupy", low=True) is cupy_backend
    assert precision.compact_module(cupy_backend, "cupy", state_dtype="bfloat16", low=True) is cupy_backend


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_state8_step_of_16bit_params_packs_masters_keys_and_flags(launches, low):
    import ml_dtypes

    dtype = np.float16 if low == "float16" else ml_dtypes.bfloat16
    sizes = (1, 0, 600)
    params, grads, masters, states, avgs = _state8_lists(sizes, dtype, dtype, master=True, averaged=True)
    lowp.state8_step("adam_step", params, grads, states, avgs, masters=masters, rounding="stochastic", seed=9,
                     counter=4, indices=[7, 8, 9], grad_mul=0.5, grad_clip=2.0, avg_weight=0.25, step=4, **ADAM)
    (module, name, grid, block, args, stream), = launches
    # 1 + 3 quantization blocks, one warp each: one CUDA block
    assert (module, name, block) == ("lowp", S.state8_kernel("adam", low), S.BLOCK) and grid == 1
    scalars, packed, blocks, qblock, mul, mul_ptr, clip, avg_weight, signed0, signed1, grad32, stochastic = args
    assert packed.dtype == S.keyed_list_dtype(8) and int(packed["count"][0]) == 2  # the empty tensor skipped
    for row, t in zip(packed["ptr"][0, :2].tolist(), (0, 2)):
        (c0, a0), (c1, a1), _ = states[t]
        assert row == [params[t].address, grads[t].address, avgs[t].address, c0.address, a0.address, c1.address,
                       a1.address, masters[t].address]
    assert packed["n"][0, :2].tolist() == [1, 600] and packed["aux"][0, :2].tolist() == [0, 1]
    assert packed["key"][0, :2].tolist() == [lowp.tensor_key(9, 4, 7), lowp.tensor_key(9, 4, 9)]
    assert (int(blocks), int(qblock), int(signed0), int(signed1)) == (4, 256, 1, 0)
    assert (float(mul), int(mul_ptr), float(clip), float(avg_weight)) == (0.5, 0, 2.0, 0.25)
    assert (int(grad32), int(stochastic)) == (0, 1)
    assert grad32.dtype == stochastic.dtype == np.int32 and clip.dtype == np.float32


def test_state8_step_of_16bit_params_defaults_and_chunks(launches):
    """float32 gradients, no masters, rounding to nearest: null master slots, zero keys, flags
    (1, 0); more tensors than a KeyedList holds: one launch per capacity, block offsets per launch."""
    capacity = S.keyed_list_capacity(S.STATE8_LOW_SLOTS)
    sizes = [300] * (capacity + 3)
    params, grads, _, states, _ = _state8_lists(sizes, np.float16, np.float32, master=False)
    lowp.state8_step("sgd_step", params, grads, states, None, lr=0.1, momentum=0.9, nesterov=False,
                     weight_decay=0.0, convention="textbook")
    assert [a[1] for a in launches] == [S.state8_kernel("sgd_momentum", "float16")] * 2
    first, second = (a[4] for a in launches)
    assert int(first[1]["count"][0]) == capacity and int(second[1]["count"][0]) == 3
    assert int(first[2]) == 2 * capacity and int(second[2]) == 6
    assert second[1]["aux"][0, :3].tolist() == [0, 2, 4]
    assert not first[1]["key"].any() and not first[1]["ptr"][0, :, 7].any()
    assert first[-2:] == (1, 0)


def _adam8_state(n, codes=np.uint8, blocks=None, second=None):
    """Adam's state tuple (m, v, v_max) with 8-bit m and v (``second`` replaces v's pair)."""
    blocks = -(-n // 256) if blocks is None else blocks
    v = (Fake(n, np.uint8), Fake(-(-n // 256), np.float32)) if second is None else second
    return ((Fake(n, codes), Fake(blocks, np.float32)), v, None)


def _bad_state8_cases():
    n = 300
    good = dict(params=lambda: [Fake(n, np.float16)], grads=lambda: [Fake(n, np.float16)],
                masters=lambda: [Fake(n, np.float32)], states=lambda: [_adam8_state(n)])
    cases = [
        ("params float64", dict(params=[Fake(n, np.float64)]), TypeError, r"params\[0\].*float64"),
        ("params mixed formats", dict(params=[Fake(n, np.float16), Fake(n, np.float32)],
                                      grads=[Fake(n, np.float16)] * 2, masters=None,
                                      states=[_adam8_state(n)] * 2),
         TypeError, r"params\[1\]: expected dtype float16, got float32"),
        ("grads float64", dict(grads=[Fake(n, np.float64)]), TypeError, r"grads\[0\].*float64"),
        ("grads size", dict(grads=[Fake(n + 1, np.float16)]), ValueError, r"grads\[0\]: expected 300 elements"),
        ("masters float16", dict(masters=[Fake(n, np.float16)]), TypeError, r"masters\[0\]: expected dtype float32"),
        ("masters count", dict(masters=[]), ValueError, "masters has 0 entries, params has 1"),
        ("masters with float32 params", dict(params=[Fake(n, np.float32)], grads=[Fake(n, np.float32)]),
         ValueError, "masters are float32 copies of 16-bit params"),
        ("codes dtype", dict(states=[_adam8_state(n, codes=np.int8)]), TypeError,
         r"states\[0\]\[0\]\[0\] \(codes\): expected dtype uint8"),
        ("absmax size", dict(states=[_adam8_state(n, blocks=1)]), ValueError,
         r"states\[0\]\[0\]\[1\] \(absmax\): expected 2 elements"),
        ("state not a pair", dict(states=[_adam8_state(n, second=Fake(n, np.float32))]), ValueError,
         r"states\[0\]\[1\] must be a pair"),
        ("state too short", dict(states=[_adam8_state(n)[:1]]), ValueError, r"states\[0\] must be a tuple"),
        ("rounding", dict(rounding="up"), ValueError, "rounding must be 'nearest' or 'stochastic'"),
        ("indices count", dict(indices=[0, 1]), ValueError, "indices has 2 entries"),
        ("block", dict(block=512), ValueError, "block must be an int"),
        ("amsgrad", dict(amsgrad=True), ValueError, "amsgrad"),
    ]
    return good, cases


def _state8_call(changes):
    good, _ = _bad_state8_cases()
    kwargs = {k: make() for k, make in good.items()}
    hyper = {**ADAM, "step": 1}
    for key, value in changes.items():
        (hyper if key == "amsgrad" else kwargs)[key] = value
    params, grads, states = kwargs.pop("params"), kwargs.pop("grads"), kwargs.pop("states")
    lowp.state8_step("adam_step", params, grads, states, None, **kwargs, **hyper)


@pytest.mark.parametrize("what", [c[0] for c in _bad_state8_cases()[1]])
def test_state8_step_rejects_bad_input_before_launching(launches, what):
    _, changes, exc, message = next(c for c in _bad_state8_cases()[1] if c[0] == what)
    with pytest.raises(exc, match=message):
        _state8_call(changes)
    assert launches == []
    _state8_call({})  # the same call with good arguments launches
    assert len(launches) == 1


def test_state8_step_keys_pieces_by_starts(launches):
    """``starts=``: tensor t is the piece of a parameter beginning at element starts[t]; its key is
    piece_key(seed, counter, indices[t], starts[t]) (= tensor_key at 0), as mixed_step's."""
    sizes = (5, 0, 300)
    params, grads, _, states, _ = _state8_lists(sizes, np.float16, np.float16, master=False)
    lowp.state8_step("adam_step", params, grads, states, None, rounding="stochastic", seed=7, counter=3,
                     indices=[4, 4, 4], starts=[0, 5, 5], step=3, **ADAM)
    (_, name, _, _, args, _), = launches
    assert name == S.state8_kernel("adam", "float16")
    assert args[1]["key"][0, :2].tolist() == [lowp.tensor_key(7, 3, 4), lowp.piece_key(7, 3, 4, 5)]
    assert lowp.piece_key(7, 3, 4, 0) == lowp.tensor_key(7, 3, 4)
    launches.clear()
    lowp.state8_step("adam_step", params, grads, states, None, rounding="nearest", seed=7, counter=3,
                     indices=[4, 4, 4], starts=[0, 5, 5], step=3, **ADAM)
    assert not launches[0][4][1]["key"].any() and int(launches[0][4][-1]) == 0  # no keys when rounding to nearest


def _bf16_states(sizes, slots=(0, 1), length=3, dtype=np.uint16, shapes=None):
    """Per tensor a state tuple of ``length`` with one bfloat16-bits array per slot of ``slots``."""
    shapes = [(n,) for n in sizes] if shapes is None else shapes
    return [tuple(Fake(shape, dtype) if k in slots else None for k in range(length)) for shape in shapes]


def test_state8_step_with_bfloat16_state_of_float32_params_picks_the_bf16_kernel(launches):
    """float32 θ, state_dtype="bfloat16": one launch of bf16_state_update<Op> over an AuxList<6>
    (θ, g, θ̂, s₀, s₁, null master), one thread per element (no quantization blocks: ``block``
    changes nothing), no rounding flags."""
    sizes = (1, 0, 600)
    params = [Fake(n, np.float32) for n in sizes]
    grads = [Fake(n, np.float32) for n in sizes]
    avgs = [Fake(n, np.float32) for n in sizes]
    states = _bf16_states(sizes)
    for block in (256, 7):
        launches.clear()
        lowp.state8_step("adam_step", params, grads, states, avgs, state_dtype="bfloat16", block=block,
                         grad_mul=0.5, grad_clip=2.0, avg_weight=0.25, step=2, **ADAM)
        (module, name, grid, threads, args, stream), = launches
        assert (module, name, threads) == ("lowp", S.bf16_state_kernel("adam"), S.BLOCK)
        assert grid == -(-601 // S.BLOCK)  # the loader's grid over the elements
        scalars, packed, mul, mul_ptr, clip, avg_weight = args
        assert scalars.dtype == S.state8_scalars_dtype("adam") and scalars["bc1"][0] == np.float32(1 - 0.9 ** 2)
        assert packed.dtype == S.aux_list_dtype(S.BF16_STATE_SLOTS) and int(packed["count"][0]) == 2
        for row, t in zip(packed["ptr"][0, :2].tolist(), (0, 2)):
            assert row == [params[t].address, grads[t].address, avgs[t].address, states[t][0].address,
                           states[t][1].address, 0]
        assert packed["n"][0, :2].tolist() == [1, 600] and not packed["aux"].any()
        assert (float(mul), int(mul_ptr), float(clip), float(avg_weight)) == (0.5, 0, 2.0, 0.25)
        assert mul.dtype == clip.dtype == avg_weight.dtype == np.float32


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_state8_step_with_bfloat16_state_of_16bit_params_packs_masters_keys_and_flags(launches, low):
    import ml_dtypes

    dtype = np.float16 if low == "float16" else ml_dtypes.bfloat16
    sizes = (1, 0, 600)
    params, grads, masters, _, avgs = _state8_lists(sizes, dtype, dtype, master=True, averaged=True)
    states = _bf16_states(sizes, slots=(0, 2))  # RMSProp with momentum: square_avg, velocity
    hyper = dict(lr=0.01, rho=0.99, eps=1e-8, momentum=0.9, nesterov=False, centered=False, weight_decay=0.0,
                 convention="textbook")
    lowp.state8_step("rmsprop_step", params, grads, states, avgs, masters=masters, rounding="stochastic", seed=9,
                     counter=4, indices=[7, 8, 9], starts=[0, 3, 12], state_dtype="bfloat16", **hyper)
    (module, name, grid, threads, args, stream), = launches
    assert (module, name, threads) == ("lowp", S.bf16_state_kernel("rmsprop_momentum", low), S.BLOCK)
    scalars, packed, mul, mul_ptr, clip, avg_weight, grad32, stochastic = args
    assert packed.dtype == S.aux_list_dtype(S.BF16_STATE_SLOTS) and int(packed["count"][0]) == 2
    for row, t in zip(packed["ptr"][0, :2].tolist(), (0, 2)):
        assert row == [params[t].address, grads[t].address, avgs[t].address, states[t][0].address,
                       states[t][2].address, masters[t].address]
    assert packed["aux"][0, :2].tolist() == [lowp.tensor_key(9, 4, 7), lowp.piece_key(9, 4, 9, 12)]
    assert (int(grad32), int(stochastic)) == (0, 1) and grad32.dtype == stochastic.dtype == np.int32
    assert math.isinf(float(clip)) and float(mul) == 1.0


def test_state8_step_with_bfloat16_state_defaults_one_state_and_chunks(launches):
    """float16 θ, float32 g, no masters, rounding to nearest, SGD's one state (slot 4 null): zero
    keys, flags (1, 0); more tensors than an AuxList<6> holds: one launch per capacity."""
    capacity = S.list_capacity(S.BF16_STATE_SLOTS)
    sizes = [300] * (capacity + 3)
    params, grads, _, _, _ = _state8_lists(sizes, np.float16, np.float32, master=False)
    states = _bf16_states(sizes, slots=(0,), length=1)
    lowp.state8_step("sgd_step", params, grads, states, None, state_dtype="bfloat16", lr=0.1, momentum=0.9,
                     nesterov=False, weight_decay=0.0, convention="textbook")
    assert [a[1] for a in launches] == [S.bf16_state_kernel("sgd_momentum", "float16")] * 2
    first, second = (a[4] for a in launches)
    assert int(first[1]["count"][0]) == capacity and int(second[1]["count"][0]) == 3
    assert [a[2] for a in launches] == [-(-300 * capacity // S.BLOCK), -(-900 // S.BLOCK)]
    assert second[1]["ptr"][0, 2].tolist() == [params[capacity + 2].address, grads[capacity + 2].address, 0,
                                                states[capacity + 2][0].address, 0, 0]
    assert not first[1]["aux"].any() and not first[1]["ptr"][0, :, 5].any() and not first[1]["ptr"][0, :, 4].any()
    assert [int(v) for v in first[-2:]] == [1, 0]


def test_state8_step_takes_recognizable_bfloat16_state_arrays(launches):
    """A state array of a bfloat16 dtype (a torch bfloat16 tensor, ml_dtypes) is taken as its bits."""
    import ml_dtypes

    params, grads, _, _, _ = _state8_lists((40,), np.float32, np.float32, master=False)
    states = _bf16_states((40,), slots=(0,), length=1, dtype=ml_dtypes.bfloat16)
    lowp.state8_step("adagrad_step", params, grads, states, None, state_dtype="bfloat16", lr=0.1, eps=1e-10,
                     weight_decay=0.0)
    (_, name, _, _, args, _), = launches
    assert name == S.bf16_state_kernel("adagrad") and args[1]["ptr"][0, 0, 3] == states[0][0].address


def _bad_bf16_state_cases():
    n = 300
    pair = (Fake(n, np.uint8), Fake(2, np.float32))
    return [
        ("state float16", [(Fake(n, np.float16), Fake(n, np.uint16), None)], {}, TypeError,
         r"states\[0\]\[0\] \(bfloat16 state\): expected dtype uint16 \(bfloat16 bits\) or bfloat16, got float16"),
        ("state uint8", [(Fake(n, np.uint16), Fake(n, np.uint8), None)], {}, TypeError,
         r"states\[0\]\[1\] \(bfloat16 state\): expected dtype uint16"),
        ("state size", [(Fake(n + 1, np.uint16), Fake(n, np.uint16), None)], {}, ValueError,
         r"states\[0\]\[0\] \(bfloat16 state\): expected shape \(300,\)"),
        ("state shape", [(Fake((n // 3, 3), np.uint16), Fake(n, np.uint16), None)], {}, ValueError,
         r"states\[0\]\[0\] \(bfloat16 state\): expected shape \(300,\) \(the parameter's\), got \(100, 3\)"),
        ("a pair", [(Fake(n, np.uint16), pair, None)], {}, ValueError,
         r"states\[0\]\[1\] \(bfloat16 state\) must be one array"),
        ("a missing state", [(Fake(n, np.uint16), None, None)], {}, ValueError,
         r"states\[0\]\[1\] \(bfloat16 state\) must be one array"),
        ("state too short", [(Fake(n, np.uint16),)], {}, ValueError, r"states\[0\] must be a tuple"),
        ("state_dtype", None, dict(state_dtype="float16"), ValueError,
         "state_dtype must be 'int8' or 'bfloat16', got 'float16'"),
        ("block", None, dict(block=512), ValueError, "block must be an int"),
        ("starts count", None, dict(starts=[0, 1]), ValueError, "starts has 2 entries, params has 1"),
        ("starts negative", None, dict(starts=[-1]), ValueError, r"starts\[0\] must be an int ≥ 0"),
        ("starts float", None, dict(starts=[1.5]), ValueError, r"starts\[0\] must be an int ≥ 0"),
        ("int8 pairs expected", [(Fake(n, np.uint16), Fake(n, np.uint16), None)], dict(state_dtype="int8"),
         ValueError, r"states\[0\]\[0\] must be a pair \(codes, absmax\)"),
    ]


def _bf16_state_call(states=None, **changes):
    n = 300
    states = [(Fake(n, np.uint16), Fake(n, np.uint16), None)] if states is None else states
    kwargs = dict(masters=[Fake(n, np.float32)], rounding="stochastic", starts=[0], state_dtype="bfloat16")
    kwargs.update(changes)
    lowp.state8_step("adam_step", [Fake(n, np.float16)], [Fake(n, np.float16)], states, None, **kwargs,
                     step=1, **ADAM)


@pytest.mark.parametrize("what", [c[0] for c in _bad_bf16_state_cases()])
def test_state8_step_with_bfloat16_state_rejects_bad_input_before_launching(launches, what):
    _, states, changes, exc, message = next(c for c in _bad_bf16_state_cases() if c[0] == what)
    with pytest.raises(exc, match=message):
        _bf16_state_call(states, **changes)
    assert launches == []
    _bf16_state_call()  # the same call with good arguments launches
    assert [c[1] for c in launches] == [S.bf16_state_kernel("adam", "float16")]


# ---------------------------------------------------------------------------------------------
# anywhere: 16-bit batch norm's host side (decode, the float32 kernels, encode)


class _Calls(list):
    """Recorded launches, and the scratch arrays the Place handed out (``scratch``)."""

    def __init__(self):
        super().__init__()
        self.scratch = []


@pytest.fixture
def bn_launches(launches, monkeypatch):
    """``launches`` with scratch memory: a Place whose scratch arrays are Fakes (recorded)."""
    from fastopt.kernels.cupy import _device, _loader

    calls = _Calls()

    class Where:
        stream = None

        def scratch(self, shape, dtype):
            calls.scratch.append(Fake(tuple(shape), dtype))
            return calls.scratch[-1]

    @contextlib.contextmanager
    def place(like, *others):
        yield Where()

    monkeypatch.setattr(_device, "place", place)
    monkeypatch.setattr(_loader, "launch", lambda *args: calls.append(args))
    return calls


def _float32_launches(calls, forbidden):
    """The batch-norm launches between the conversions: float32 kernels none of which touches a
    16-bit array (its address is not among the arguments)."""
    middle = [c for c in calls if c[0] == "batchnorm"]
    for module, name, grid, block, args, stream in middle:
        assert "<float" in name, name
        assert not {a.address for a in forbidden} & {int(v) for v in args if isinstance(v, np.uint64)}, name
    return middle


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape, axis", [((4, 3, 5), 1), ((6, 3), 1)])
def test_batchnorm_lowp_decodes_runs_float32_and_encodes(bn_launches, low, shape, axis):
    import ml_dtypes

    dtype = np.float16 if low == "float16" else ml_dtypes.bfloat16
    C, n = shape[axis], math.prod(shape)
    x, y, dy, dx = (Fake(shape, dtype) for _ in range(4))
    weight, bias, rm, rv, sm, si, dw, db = (Fake(C, np.float32) for _ in range(8))
    cupy_backend.batchnorm_forward_lowp(x, weight, bias, rm, rv, y, sm, si, training=True, momentum=0.1, eps=1e-5,
                                        channel_axis=axis, relu=False)
    x32, y32 = bn_launches.scratch[:2]
    assert x32.shape == y32.shape == shape and x32.dtype == y32.dtype == np.float32
    first, last = bn_launches[0], bn_launches[-1]
    assert first[:2] == ("convert", S.convert_kernel("decode16", low))
    assert [int(v) for v in first[4]] == [x.address, x32.address, n]
    assert last[:2] == ("convert", S.convert_kernel("encode16", low))
    assert [int(v) for v in last[4]] == [y32.address, y.address, n]
    middle = _float32_launches(bn_launches, (x, y))
    assert len(middle) == len(bn_launches) - 2 == 3
    assert middle[0][4][0] == x32.address and y32.address in [int(v) for v in middle[-1][4] if isinstance(v, np.uint64)]

    bn_launches.clear()
    bn_launches.scratch.clear()
    cupy_backend.batchnorm_backward_lowp(dy, x, weight, bias, sm, si, dx, dw, db, training=True, channel_axis=axis,
                                         relu=False)
    dy32, x32, dx32 = bn_launches.scratch[:3]
    assert [(c[1], [int(v) for v in c[4]]) for c in bn_launches[:2]] == [
        (S.convert_kernel("decode16", low), [dy.address, dy32.address, n]),
        (S.convert_kernel("decode16", low), [x.address, x32.address, n])]
    assert bn_launches[-1][1] == S.convert_kernel("encode16", low)
    assert [int(v) for v in bn_launches[-1][4]] == [dx32.address, dx.address, n]
    assert len(_float32_launches(bn_launches, (dy, x, dx))) == len(bn_launches) - 3 == 3


def test_batchnorm_lowp_empty_batch_and_bad_dtypes(bn_launches):
    x, y = Fake((0, 3), np.float16), Fake((0, 3), np.float16)
    sm, si = Fake(3, np.float32), Fake(3, np.float32)
    keywords = dict(training=True, momentum=0.1, eps=1e-5, channel_axis=1, relu=False)
    cupy_backend.batchnorm_forward_lowp(x, None, None, None, None, y, sm, si, **keywords)
    assert [c[1] for c in bn_launches] == [S.bn_kernel("fill", np.float32)] * 2  # NaN statistics, no conversion
    bn_launches.clear()
    x = Fake((2, 3), np.float16)
    with pytest.raises(TypeError, match="x: 16-bit batch norm takes bfloat16 or float16 x and dy, got dtype float32"):
        cupy_backend.batchnorm_forward_lowp(Fake((2, 3), np.float32), None, None, None, None, y, sm, si, **keywords)
    with pytest.raises(TypeError, match="y: expected x's dtype float16, got float32"):
        cupy_backend.batchnorm_forward_lowp(x, None, None, None, None, Fake((2, 3), np.float32), sm, si, **keywords)
    with pytest.raises(TypeError, match="dy: expected x.s dtype float16, got float32"):
        cupy_backend.batchnorm_backward_lowp(Fake((2, 3), np.float32), x, None, None, sm, si, Fake((2, 3), np.float16),
                                             sm, si, training=True, channel_axis=1, relu=False)
    assert bn_launches == []


def test_batchnorm_lowp_has_the_cpu_backends_signatures():
    import inspect

    from fastopt.kernels import numba_cpu

    for name in ("batchnorm_forward_lowp", "batchnorm_backward_lowp"):
        assert inspect.signature(getattr(cupy_backend, name)) == inspect.signature(getattr(numba_cpu, name)), name


# ---------------------------------------------------------------------------------------------
# on a GPU: against the reference


def _mixed_lockstep(name, hyper, grad_dtype, master, rounding, sizes, steps, compare):
    """``steps`` mixed steps on the GPU and in the reference, each from the same inputs:
    ``compare(step, got, want)`` after each step, then the reference continues from the GPU's
    results. Without master weights a one-code difference in θ changes the next step's inputs,
    and such differences compound (seen on an H200: 2 and 8 codes after 3 steps near θ = 0,
    where float16 codes are dense), so only a step from the same inputs is held to one code."""
    spec = functional.SPECS[name]
    checked = spec.check(**hyper)
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(n).astype(F16) for n in sizes]
    masters = [p.astype(np.float32) for p in params] if master else None
    states = [initial_state(name, (n,), np.float32, rng) for n in sizes]
    avgs = [np.zeros(n, np.float32) for n in sizes]
    d_params = [_device_copy(p) for p in params]
    d_masters = None if masters is None else [_device_copy(m) for m in masters]
    d_states = [{k: _device_copy(v) for k, v in s.items()} for s in states]
    d_avgs = [_device_copy(a) for a in avgs]
    for step in range(1, steps + 1):
        grads = [rng.standard_normal(n).astype(grad_dtype) for n in sizes]
        keywords = dict(checked, step=step) if spec.step_count else dict(checked)
        keywords.update(rounding=rounding, seed=11, counter=step, indices=list(range(len(sizes))), grad_mul=0.5,
                        grad_clip=1.5, avg_weight=0.25)
        cupy_backend.mixed_step(spec.kernel, d_params, [_device_copy(g) for g in grads], d_masters,
                                [tuple(s[k] for k in spec.state) for s in d_states], d_avgs, **keywords)
        reference.mixed_step(spec.kernel, params, grads, masters, [tuple(s[k] for k in spec.state) for s in states],
                             avgs, **keywords)
        got = ([_host(p) for p in d_params], None if d_masters is None else [_host(m) for m in d_masters],
               [{k: _host(v) for k, v in s.items()} for s in d_states], [_host(a) for a in d_avgs])
        compare(step, got, (params, masters, states, avgs))
        for mine, theirs in ((params, got[0]), (masters or [], got[1] or []), (avgs, got[3])):
            for a, b in zip(mine, theirs):
                a[...] = b
        for s, t in zip(states, got[2]):
            for k in s:
                s[k][...] = t[k]


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

    def compare(step, got, want):
        params, masters, states, avgs = got
        ref_params, ref_masters, ref_states, ref_avgs = want
        for t, (p, q) in enumerate(zip(params, ref_params)):
            what = f"step {step} tensor {t}"
            assert p.dtype == F16
            # the float32 update may differ from the reference's in its last bits (and, in this
            # backend, float32 subnormals are flushed), which can move a rounding by one code
            assert _codes_apart(p, q) <= 1, f"{what}: params"
            if master:
                assert_close(masters[t], ref_masters[t], np.float32, f"{what}: masters")
                np.testing.assert_array_equal(p.view(np.uint16),
                                              reference_lowp.round_nearest(masters[t], F16).view(np.uint16))
            for key in states[t]:
                assert_close(states[t][key], ref_states[t][key], np.float32, f"{what}: state {key}")
            assert_close(avgs[t], ref_avgs[t], np.float32, f"{what}: avgs")

    _mixed_lockstep(name, hyper, grad_dtype, master, rounding, MIXED_SIZES, 3, compare)


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


def _state8_low_run(op, hyper, sizes, grad_dtype, master, rounding, to_device, step_fn):
    """Three steps of ``step_fn`` (a backend's state8_step) on float16 params with 8-bit state;
    returns host copies of (params, masters, states, avgs)."""
    import test_state8 as T

    rng = np.random.default_rng(17)
    params = [to_device(rng.standard_normal(n).astype(F16)) for n in sizes]
    masters = [to_device(_host(p).astype(np.float32)) for p in params] if master else None
    states = [tuple(None if s is None else (to_device(s[0]), to_device(s[1])) for s in st)
              for st in T.initial_state(rng, op, hyper, sizes)]
    avgs = [to_device(_host(p).astype(np.float32)) for p in params]
    for step in range(1, 4):
        grads = [to_device((rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(grad_dtype))
                 for n in sizes]
        step_fn(op, params, grads, states, avgs, masters=masters, rounding=rounding, seed=5, counter=step,
                indices=[3 + t for t in range(len(sizes))], grad_mul=0.5, grad_clip=3.0, avg_weight=0.25,
                **T.with_step(op, hyper, step))
    return ([_host(p) for p in params], None if masters is None else [_host(m) for m in masters],
            [tuple(None if s is None else (_host(s[0]), _host(s[1])) for s in st) for st in states],
            [_host(a) for a in avgs])


@gpu
@pytest.mark.parametrize("grad_dtype, master, rounding", [(F16, True, "nearest"), (np.float32, False, "stochastic"),
                                                          (F16, False, "nearest")])
def test_state8_step_of_16bit_params_matches_the_reference_bit_for_bit(grad_dtype, master, rounding):
    """float16 θ (CuPy has no bfloat16 arrays; the bfloat16 kernels differ only in H, checked
    offline) with 8-bit state: θ, masters, codes, absmax and θ̂ equal the reference's, as the
    float32-θ kernel's do (same expressions, same rounding, same keys)."""
    import test_state8 as T

    sizes = T.SIZES + [70_000]
    for op, hyper in T.CONFIGS:
        got = _state8_low_run(op, hyper, sizes, grad_dtype, master, rounding, _device_copy, cupy_backend.state8_step)
        want = _state8_low_run(op, hyper, sizes, grad_dtype, master, rounding, lambda a: a, reference8.state8_step)
        for t in range(len(sizes)):
            where = f"{op} {hyper} tensor {t}"
            np.testing.assert_array_equal(got[0][t].view(np.uint16), want[0][t].view(np.uint16), err_msg=f"θ, {where}")
            if master:
                np.testing.assert_array_equal(got[1][t].view(np.uint32), want[1][t].view(np.uint32),
                                              err_msg=f"master, {where}")
            np.testing.assert_array_equal(got[3][t].view(np.uint32), want[3][t].view(np.uint32), err_msg=f"θ̂, {where}")
        T.assert_same([], [], got[2], want[2])


# bfloat16 state: the device holds each state as a uint16 array of bfloat16 bits; the reference
# takes ml_dtypes bfloat16 arrays. A "where" is how a run puts host arrays on its side and back.


class _Reference:
    """Host arrays as they are; bfloat16 states as ml_dtypes arrays."""

    array = state = staticmethod(lambda a: a)
    host = staticmethod(lambda a: a)
    state_host = staticmethod(lambda a: a.view(np.uint16))
    step = staticmethod(reference8.state8_step)


class _CuPy:
    """CuPy arrays; bfloat16 states as uint16 CuPy arrays of their bits."""

    array = staticmethod(lambda a: _device_copy(a))
    state = staticmethod(lambda a: _device_copy(a.view(np.uint16)))
    host = staticmethod(lambda a: _host(a))
    state_host = staticmethod(lambda a: _host(a))
    step = staticmethod(cupy_backend.state8_step)


def _bf16_initial_state(rng, op, hyper, sizes):
    """Per tensor the op's state tuple: random states over several decades (second moments
    positive), rounded to bfloat16 (ml_dtypes arrays)."""
    import ml_dtypes

    import test_state8 as T

    states = []
    for n in sizes:
        state = [None] * T.STATE_LENGTH[op]
        for slot, signed in reference8.state8_layout(op, **T.with_step(op, hyper, 1)):
            x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0, n)).astype(np.float32)
            state[slot] = reference_lowp.round_nearest(x if signed else np.abs(x) * 1e-3, ml_dtypes.bfloat16)
        states.append(tuple(state))
    return states


def _bf16_state_run(op, hyper, sizes, param_dtype, grad_dtype, master, rounding, where, *, steps=3):
    """``steps`` steps of ``where.step`` with state_dtype="bfloat16" on params of ``param_dtype``
    (float32: no masters, no rounding keywords); host copies of (params, masters, states as uint16
    bits, avgs)."""
    import test_state8 as T

    rng = np.random.default_rng(29)
    low = np.dtype(param_dtype) != np.float32
    params = [where.array(rng.standard_normal(n).astype(param_dtype)) for n in sizes]
    masters = [where.array(where.host(p).astype(np.float32)) for p in params] if master else None
    states = [tuple(None if s is None else where.state(s) for s in st)
              for st in _bf16_initial_state(rng, op, hyper, sizes)]
    avgs = [where.array(where.host(p).astype(np.float32)) for p in params]
    for step in range(1, steps + 1):
        grads = [where.array((rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(grad_dtype))
                 for n in sizes]
        keywords = dict(masters=masters, rounding=rounding, seed=5, counter=step,
                        indices=[3 + t for t in range(len(sizes))]) if low else {}
        where.step(op, params, grads, states, avgs, state_dtype="bfloat16", grad_mul=0.5, grad_clip=3.0,
                   avg_weight=0.25, **keywords, **T.with_step(op, hyper, step))
    return ([where.host(p) for p in params], None if masters is None else [where.host(m) for m in masters],
            [tuple(None if s is None else where.state_host(s) for s in st) for st in states],
            [where.host(a) for a in avgs])


def _assert_bf16_runs_equal(got, want, where):
    params, masters, states, avgs = got
    for t in range(len(params)):
        bits = np.uint16 if params[t].dtype.itemsize == 2 else np.uint32
        np.testing.assert_array_equal(params[t].view(bits), want[0][t].view(bits), err_msg=f"θ, {where} tensor {t}")
        if masters is not None:
            np.testing.assert_array_equal(masters[t].view(np.uint32), want[1][t].view(np.uint32),
                                          err_msg=f"master, {where} tensor {t}")
        np.testing.assert_array_equal(avgs[t].view(np.uint32), want[3][t].view(np.uint32),
                                      err_msg=f"θ̂, {where} tensor {t}")
        for slot, (s, r) in enumerate(zip(states[t], want[2][t])):
            assert (s is None) == (r is None), (where, t, slot)
            if s is not None:
                assert s.dtype == np.uint16
                np.testing.assert_array_equal(s, r, err_msg=f"bfloat16 state {slot}, {where} tensor {t}")


@gpu
def test_state8_step_with_bfloat16_state_of_float32_params_matches_the_reference_bit_for_bit():
    """float32 θ, bfloat16 state (uint16 bits on the device): θ, θ̂ and the state bits equal the
    reference's (fastopt.reference.state8, state_dtype="bfloat16"), for every supported
    configuration (Adam/AdamW, SGD momentum/Nesterov, AdaGrad, RMSProp plain/momentum/Nesterov)."""
    import test_state8 as T

    sizes = T.SIZES + [70_000]
    for op, hyper in T.CONFIGS:
        got = _bf16_state_run(op, hyper, sizes, np.float32, np.float32, False, "nearest", _CuPy)
        want = _bf16_state_run(op, hyper, sizes, np.float32, np.float32, False, "nearest", _Reference)
        _assert_bf16_runs_equal(got, want, f"{op} {hyper}")


@gpu
@pytest.mark.parametrize("grad_dtype, master, rounding", [(F16, True, "nearest"), (np.float32, False, "stochastic"),
                                                          (F16, False, "nearest"), (F16, True, "stochastic")])
def test_state8_step_with_bfloat16_state_of_16bit_params_matches_the_reference_bit_for_bit(grad_dtype, master,
                                                                                          rounding):
    """float16 θ with bfloat16 state: θ, masters, θ̂ and the state bits equal the reference's."""
    import test_state8 as T

    sizes = T.SIZES + [70_000]
    for op, hyper in T.CONFIGS:
        got = _bf16_state_run(op, hyper, sizes, F16, grad_dtype, master, rounding, _CuPy)
        want = _bf16_state_run(op, hyper, sizes, F16, grad_dtype, master, rounding, _Reference)
        _assert_bf16_runs_equal(got, want, f"{op} {hyper}")


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


@gpu
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_state8_step_with_bfloat16_state_of_bfloat16_params_matches_the_reference(rounding):
    """bfloat16 θ (torch CUDA tensors; CuPy has none) with bfloat16 state given as torch bfloat16
    tensors (a recognizable bfloat16 dtype): bit for bit the reference's."""
    import ml_dtypes

    import test_state8 as T

    torch = _torch_cuda()
    if torch is None:
        pytest.skip("bfloat16 parameters on the device need torch with CUDA")
    BF16 = np.dtype(ml_dtypes.bfloat16)

    def to_torch(a):
        if a.dtype == BF16:
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).cuda()
        return torch.from_numpy(a.copy()).cuda()

    def from_torch(t):
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).cpu().numpy().view(BF16)
        return t.cpu().numpy()

    class Torch:
        array = state = staticmethod(to_torch)
        host = staticmethod(from_torch)
        state_host = staticmethod(lambda t: from_torch(t).view(np.uint16))
        step = staticmethod(cupy_backend.state8_step)

    sizes = [1, 255, 257, 1000, 70_000]
    for op, hyper in T.CONFIGS[::2]:
        for master in (False, True):
            got = _bf16_state_run(op, hyper, sizes, BF16, np.float32, master, rounding, Torch)
            want = _bf16_state_run(op, hyper, sizes, BF16, np.float32, master, rounding, _Reference)
            _assert_bf16_runs_equal(got, want, f"{op} {hyper} master={master}")
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_state8_step_pieces_round_like_the_whole_parameter(state_dtype):
    """A float16 parameter updated as three pieces (contiguous device views, ``starts`` their first
    elements, one index for all) rounds stochastically exactly as the reference rounds the whole
    parameter: the pieces draw the whole parameter's uniforms. (int8 state: pieces cut at
    quantization-block boundaries, so the blocks are the whole parameter's.)"""
    import test_state8 as T

    n, cuts = 70_000, ((0, 1024), (1024, 50_176), (50_176, 70_000))
    if state_dtype == "bfloat16":
        cuts = ((0, 999), (999, 50_001), (50_001, 70_000))
    op, hyper = T.CONFIGS[0]  # Adam
    rng = np.random.default_rng(31)
    param = rng.standard_normal(n).astype(F16)
    master = param.astype(np.float32)
    if state_dtype == "bfloat16":
        ref_state = _bf16_initial_state(rng, op, hyper, [n])[0]
        d_state = tuple(None if s is None else _device_copy(s.view(np.uint16)) for s in ref_state)
    else:
        ref_state = T.initial_state(rng, op, hyper, [n])[0]
        d_state = tuple(None if s is None else (_device_copy(s[0]), _device_copy(s[1])) for s in ref_state)
        ref_state = T.copied([ref_state])[0]
    d_param, d_master = _device_copy(param), _device_copy(master)
    ref_param, ref_master = param.copy(), master.copy()

    def piece_state(a, b):
        if state_dtype == "bfloat16":
            return tuple(None if s is None else s[a:b] for s in d_state)
        return tuple(None if s is None else (s[0][a:b], s[1][a // 256:-(-b // 256)]) for s in d_state)

    for step in range(1, 4):
        grad = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(F16)
        d_grad = _device_copy(grad)
        common = dict(rounding="stochastic", seed=123, counter=step, state_dtype=state_dtype,
                      **T.with_step(op, hyper, step))
        cupy_backend.state8_step(op, [d_param[a:b] for a, b in cuts], [d_grad[a:b] for a, b in cuts],
                                 [piece_state(a, b) for a, b in cuts], None,
                                 masters=[d_master[a:b] for a, b in cuts], indices=[6] * len(cuts),
                                 starts=[a for a, _ in cuts], **common)
        reference8.state8_step(op, [ref_param], [grad], [ref_state], None, masters=[ref_master], indices=[6],
                               **common)
    np.testing.assert_array_equal(_host(d_param).view(np.uint16), ref_param.view(np.uint16))
    np.testing.assert_array_equal(_host(d_master).view(np.uint32), ref_master.view(np.uint32))
    for slot, (s, r) in enumerate(zip(d_state, ref_state)):
        if s is None:
            continue
        if state_dtype == "bfloat16":
            np.testing.assert_array_equal(_host(s), r.view(np.uint16), err_msg=f"state {slot}")
        else:
            np.testing.assert_array_equal(_host(s[0]), r[0], err_msg=f"codes {slot}")
            np.testing.assert_array_equal(_host(s[1]).view(np.uint32), r[1].view(np.uint32), err_msg=f"absmax {slot}")
    # and without starts every piece would restart the stream at 0: a different rounding
    assert lowp.piece_key(123, 3, 6, cuts[1][0]) != lowp.tensor_key(123, 3, 6)


@gpu
def test_convert_kernels_match_the_reference_roundings():
    """decode16: every 16-bit pattern decoded exactly; encode16: float32 patterns of every kind
    (normal, subnormal, ±0, ±Inf, NaNs with payloads, halfway cases) rounded as the CPU backend's
    conversions (kernels/numba_cpu/bn_lowp.py, lowbits: NumPy's astype keeps other NaN payloads)."""
    import ml_dtypes

    from fastopt.kernels.cupy import _device, bn_lowp
    from fastopt.kernels.numba_cpu import bn_lowp as cpu

    rng = np.random.default_rng(1)
    every = np.arange(1 << 16, dtype=np.uint16)
    values = np.concatenate([rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32),
                             (np.arange(1 << 16, dtype=np.uint32) << 16) | 0x8000,  # bfloat16 ties
                             np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 1], np.uint32)]).view(np.float32)
    for low, dtype in (("float16", np.dtype(np.float16)), ("bfloat16", np.dtype(ml_dtypes.bfloat16))):
        bits, out = _device_copy(every), _device_copy(np.full(every.size, np.nan, np.float32))
        encoded, source = _device_copy(np.zeros(values.size, np.uint16)), _device_copy(values)
        with _device.place(bits) as where:
            bn_lowp._convert(where, "decode16", low, bits, out)
            bn_lowp._convert(where, "encode16", low, source, encoded)
        decoded, rounded = np.empty(every.size, np.float32), np.empty(values.size, dtype)
        cpu._decode(every.view(dtype), decoded)
        cpu._encode(values, rounded)
        np.testing.assert_array_equal(_host(out).view(np.uint32), decoded.view(np.uint32), err_msg=f"decode {low}")
        np.testing.assert_array_equal(_host(encoded), rounded.view(np.uint16), err_msg=f"encode {low}")


@gpu
@pytest.mark.parametrize("shape, axis", [((8, 5, 7, 3), 1), ((300, 6), 1), ((4, 9, 33), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_lowp_is_the_float32_batchnorm_of_the_decoded_input(shape, axis, training):
    """float16 x, dy: y and dx equal the float32 kernels' results on the decoded arrays rounded to
    nearest (bit for bit: the same float32 kernels), the float32 outputs equal theirs."""
    import cupy

    rng = np.random.default_rng(4)
    ax = axis % len(shape)
    C = shape[ax]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(F16)
    dy = rng.standard_normal(shape).astype(F16)
    weight, bias = (rng.standard_normal(C) + 1).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    rm, rv = rng.standard_normal(C).astype(np.float32), (rng.random(C) + 0.5).astype(np.float32)
    results = {}
    for name, xs, dys in (("low", x, dy), ("f32", x.astype(np.float32), dy.astype(np.float32))):
        d = [cupy.asarray(a) for a in (xs, dys, weight, bias, rm, rv)]
        y, dx = cupy.full(shape, np.nan, xs.dtype), cupy.full(shape, np.nan, xs.dtype)
        sm, si, dw, db = (cupy.full(C, np.nan, np.float32) for _ in range(4))
        forward = cupy_backend.batchnorm_forward_lowp if name == "low" else cupy_backend.batchnorm_forward
        backward = cupy_backend.batchnorm_backward_lowp if name == "low" else cupy_backend.batchnorm_backward
        forward(d[0], d[2], d[3], d[4], d[5], y, sm, si, training=training, momentum=0.1, eps=1e-5,
                channel_axis=ax, relu=True)
        backward(d[1], d[0], d[2], d[3], sm, si, dx, dw, db, training=training, channel_axis=ax, relu=True)
        results[name] = [cupy.asnumpy(a) for a in (y, dx, sm, si, dw, db, d[4], d[5])]
    low, f32 = results["low"], results["f32"]
    for k, what in enumerate(("y", "dx")):
        assert low[k].dtype == F16
        np.testing.assert_array_equal(low[k].view(np.uint16), reference_lowp.round_nearest(f32[k], F16).view(np.uint16),
                                      err_msg=what)
    for k, what in enumerate(("saved_mean", "saved_invstd", "dweight", "dbias", "running_mean", "running_var"), 2):
        np.testing.assert_array_equal(low[k].view(np.uint32), f32[k].view(np.uint32), err_msg=what)


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_an_optimizer_with_bfloat16_state_on_cupy_equals_the_host_one(dtype):
    """``fastopt.Adam(..., state_dtype="bfloat16", backend="cupy")``: the state lives on the device
    as uint16 bits (``precision.device_bfloat16``), parameters and state equal the reference
    optimizer's bit for bit, and ``state_dict``/``load_state_dict`` carry it as bfloat16 on the host."""
    import cupy
    import ml_dtypes

    import fastopt

    rng = np.random.default_rng(8)
    shapes = [(7, 9), (3000,)]
    host_params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    params = [cupy.asarray(p) for p in host_params]
    options = dict(lr=0.01, state_dtype="bfloat16", polyak=0.9)
    opt = fastopt.Adam(params, backend="cupy", **options)
    ref = fastopt.Adam(host_params, backend="numpy", **options)
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        opt.step([cupy.asarray(g) for g in grads])
        ref.step(grads)
    assert opt.state[1]["m"].dtype == np.uint16
    for p, q in zip(params, host_params):
        np.testing.assert_array_equal(p.get().view(np.uint8), q.view(np.uint8))
    saved, expected = opt.state_dict(), ref.state_dict()
    for k, entry in expected["state"].items():
        for name, value in entry.items():
            if isinstance(value, np.ndarray):
                assert saved["state"][k][name].dtype == value.dtype, (k, name)
                np.testing.assert_array_equal(saved["state"][k][name].view(np.uint8), value.view(np.uint8))
    assert saved["state"][0]["m"].dtype == np.dtype(ml_dtypes.bfloat16)
    again = fastopt.Adam([cupy.asarray(p) for p in host_params], backend="cupy", **options)
    again.load_state_dict(saved)
    np.testing.assert_array_equal(again.state[0]["v"].get(), expected["state"][0]["v"].view(np.uint16))
