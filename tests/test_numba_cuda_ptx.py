"""Every numba-cuda kernel compiles to PTX for sm_90, and float32 kernels compute in float32.

No GPU is needed: ``numba.cuda.compile_ptx`` runs NVVM from the pip packages (numba-cuda[cu12]).
Kernels are enumerated from the backend's registry (``_jit.KERNELS``: every variant, each dtype it
exists for). A float64 literal or scalar in a float32 kernel would show up as ``.f64`` registers or
instructions (``cvt.f32.f64``, ``add.f64``, …) in its PTX. The kernels whose module docstrings say
they accumulate in float64 on purpose (``Kernel.float64`` gives the reason) are exempt, and are
checked to really contain float64 arithmetic, so the exemption list stays exact. No kernel's PTX
holds an ``fma`` instruction: the backend compiles with NVVM's fma=0 (``_jit.rounding_as_written``)
so that every product rounds as in the reference.

numba-cuda compiles a kernel's device functions for "the current device"; without a GPU there is
none, so these tests report compute capability 9.0 for it (the kernels themselves are compiled for
``cc=(9, 0)`` explicitly).

The test extra requires numba-cuda[cu12], which brings NVVM (libnvvm, in the nvidia-cuda-nvcc-cu12
wheel), so a missing numba-cuda or an NVVM that cannot be loaded fails these tests, naming the fix;
they never skip for it. They skip only under the simulator (``NUMBA_ENABLE_CUDASIM=1``), another
mode of the process, which compiles nothing (the simulator tests cover it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import types as pytypes

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compile_ptx needs the real numba-cuda target, not the simulator (NUMBA_ENABLE_CUDASIM=1)",
                allow_module_level=True)

FIX = "the test extra requires numba-cuda[cu12], which brings NVVM: pip install -e '.[test]'"
MISSING = "" if importlib.util.find_spec("numba_cuda") else f"numba-cuda is not installed; {FIX}"

CC = (9, 0)
if MISSING:  # one case, failing with MISSING, instead of none (an empty parameter set skips)
    KERNELS, CASES = {}, [("numba-cuda is not installed", None)]
else:
    import numba
    from numba import cuda

    from fastopt.kernels.numba_cuda._jit import KERNELS

    CASES = [(name, dt) for name, k in KERNELS.items() for dt in k.dtypes]


# float32 kernels that only move float32 values as bits (integer operations), so their PTX need not
# hold a .f32 instruction: the name and why
BITS_ONLY = {"bn_lowp.encode_f16": "float32 → float16 rounding is integer arithmetic on the bit pattern"}


def require(nvvm: bool = True) -> None:
    """Fail, never skip, when numba-cuda is missing or (``nvvm``) NVVM cannot be loaded."""
    problem = MISSING or (_nvvm_problem() if nvvm else "")
    if problem:
        pytest.fail(problem, pytrace=False)


@functools.cache
def _nvvm_problem() -> str:
    try:
        from numba.cuda.cudadrv import nvvm

        nvvm.NVVM()
    except Exception as exc:  # noqa: BLE001 - any failure to load NVVM
        return f"NVVM cannot be loaded ({type(exc).__name__}: {' '.join(str(exc).split())}); {FIX}"
    return ""


@pytest.fixture(scope="module")
def device_for_device_functions():
    """Device functions compile for the current device; give them cc 9.0 when there is no GPU."""
    if MISSING or cuda.is_available():  # without numba-cuda, the test fails on its first line
        yield
        return
    import numba.cuda.dispatcher as dispatcher

    original = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=CC)
    try:
        yield
    finally:
        dispatcher.get_current_device = original


def compile_ptx(py_func, signature, *, as_the_backend: bool = True) -> str:
    """PTX for ``CC``; ``as_the_backend``: with the options the backend compiles its kernels with
    (``_jit.rounding_as_written``: NVVM's fma=0)."""
    from fastopt.kernels.numba_cuda._jit import rounding_as_written

    with rounding_as_written() if as_the_backend else contextlib.nullcontext():
        ptx, _ = cuda.compile_ptx(py_func, signature, cc=CC)
    return ptx


def fused_lines(ptx: str) -> list[str]:
    return [line.strip() for line in ptx.splitlines() if re.search(r"\bfma\.", line)]


def float64_lines(ptx: str) -> list[str]:
    return [line.strip() for line in ptx.splitlines() if ".f64" in line]


def test_every_kernel_is_registered():
    require(nvvm=False)
    names = set(KERNELS)
    assert len([n for n in names if n.startswith("optim.")]) == 30  # 15 variants, one tensor and a list
    assert {"batchnorm.stats_partial", "batchnorm.stats_finalize", "batchnorm.eval_coefficients",
            "batchnorm.normalize", "batchnorm.grad_partial", "batchnorm.grad_finalize",
            "batchnorm.input_grad", "reduce.sumsq_partial", "reduce.sumsq_total", "reduce.multiplier",
            "reduce.scale", "reduce.convert", "arrays.fill"} <= names


STATE8_SUFFIXES = ("_f16", "_bf16state", "_f16_bf16state")  # float16 θ; bfloat16 state, float32 and float16 θ


def test_the_low_precision_variants_are_registered():
    """float16 θ with 8-bit state, and bfloat16 state with float32 and with float16 θ (one kernel
    each per state8 variant), and the float16 batch-norm conversions are in the registry, so the
    parametrized test above compiles each for sm_90 and checks its float32 PTX for float64."""
    require(nvvm=False)
    state8 = {n for n in KERNELS if n.startswith("state8.") and not n.endswith(STATE8_SUFFIXES)}
    assert len(state8) == 8
    low = [f"{n}{suffix}" for n in sorted(state8) for suffix in STATE8_SUFFIXES]
    assert set(low) <= set(KERNELS)
    assert len([n for n in KERNELS if n.startswith("state8.")]) == 8 * (1 + len(STATE8_SUFFIXES))
    assert {"bn_lowp.decode_f16", "bn_lowp.encode_f16"} <= set(KERNELS)
    for name in low + ["bn_lowp.decode_f16", "bn_lowp.encode_f16"]:
        assert KERNELS[name].float64 is None and KERNELS[name].dtypes == (numba.float32,), name


def test_the_bfloat16_state_kernels_convert_in_integers_and_compute_in_float32(device_for_device_functions):
    """The bfloat16-state kernels move the state as 16-bit words (``ld``/``st`` ``.u16``), do the
    update in float32 (``.f32``) and nothing in float64, for float32 and float16 θ."""
    require()
    for name in ("state8.adam_bf16state", "state8.adam_f16_bf16state", "state8.sgd_momentum_bf16state",
                 "state8.rmsprop_nesterov_f16_bf16state"):
        kernel = KERNELS[name]
        ptx = compile_ptx(kernel.py_func, kernel.signature(numba.float32))
        assert ".u16" in ptx and ".f32" in ptx, name
        assert not float64_lines(ptx), f"{name}: {float64_lines(ptx)[:5]}"


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_kernel_compiles_and_float32_computes_in_float32(name, dtype, device_for_device_functions):
    require()
    kernel = KERNELS[name]
    ptx = compile_ptx(kernel.py_func, kernel.signature(dtype))
    assert ".entry" in ptx and ".target sm_90" in ptx
    # every product rounded as written, as in the reference (_jit.rounding_as_written)
    assert not fused_lines(ptx), f"{name}: contracted into FMA: {fused_lines(ptx)[:3]}"
    if dtype != numba.float32:
        return
    lines = float64_lines(ptx)
    if name in BITS_ONLY:  # reads float32 as bits: no float instruction at all, float64 least of all
        assert ".u16" in ptx and not lines, f"{name}: {lines[:5]}"
    elif kernel.float64 is None:
        assert ".f32" in ptx, f"{name}: no float32 arithmetic at all"
        assert not lines, f"{name}: float64 in the float32 kernel: {lines[:5]}"
    else:
        assert lines, f"{name} is exempt ({kernel.float64}) but its float32 PTX has no float64"


def test_the_check_catches_a_float64_literal(device_for_device_functions):
    """The inspection is not vacuous: a float32 kernel with a Python float literal has .f64."""
    require()

    def promoted(x):
        i = cuda.grid(1)
        if i < x.shape[0]:
            x[i] = x[i] * 0.1 + 1e-8

    def clean(x):
        i = cuda.grid(1)
        if i < x.shape[0]:
            x[i] = x[i] * x[i]

    signature = numba.void(numba.float32[::1])
    assert float64_lines(compile_ptx(promoted, signature))
    assert not float64_lines(compile_ptx(clean, signature))


def test_the_check_catches_a_contracted_product(device_for_device_functions):
    """The FMA inspection is not vacuous: NVVM contracts a·b + c unless the backend's option is
    set, and the option reaches only the compilations inside ``rounding_as_written``."""
    require()

    def axpy(x, y):
        i = cuda.grid(1)
        if i < x.shape[0]:
            x[i] = x[i] * y[i] + y[i]

    signature = numba.void(numba.float32[::1], numba.float32[::1])
    assert fused_lines(compile_ptx(axpy, signature, as_the_backend=False))
    assert not fused_lines(compile_ptx(axpy, signature))
    assert fused_lines(compile_ptx(axpy, signature, as_the_backend=False))


def test_kernels_are_built_without_link_time_optimization(monkeypatch):
    """``_jit.Kernel`` compiles with ``lto=False`` inside ``rounding_as_written``: with LTO,
    nvJitLink generates the final code from NVVM IR and contracts products into FMA again
    (seen on an H200), whatever NVVM's fma=0 said."""
    require(nvvm=False)
    from fastopt.kernels.numba_cuda import _jit

    seen = []

    class FakeCuda:
        @staticmethod
        def jit(signature, **options):
            seen.append((signature, options, getattr(_jit._local, "no_fma", False)))
            return lambda py_func: py_func

    monkeypatch.setattr(_jit, "cuda", FakeCuda)
    monkeypatch.setattr(_jit, "_install_fma_option", lambda: None)
    kernel = _jit.Kernel("test.identity", lambda x: None, lambda dt: numba.void(dt[::1]), None)
    kernel[numba.float32]
    assert seen == [(numba.void(numba.float32[::1]), {"lto": False}, True)]
