"""float32 kernels compute in float32: their compiled code has no double-precision value in it.

A Python float literal or a float64 scalar inside a kernel silently promotes the arithmetic to
float64; this inspects the LLVM IR numba generates for each kernel's float32 signature: every
optimizer update's part runner in both variants (plain, and with the Polyak average and the
gradient extras; ``runners.py``), and the gradient-scaling part runner. Each is compiled here again,
without the disk cache (numba cannot inspect cached code) and without ``parallel``, so the whole
loop sits in the module's own functions (the parallel build runs the same code); the CPython and
cfunc wrappers, which unbox Python floats as doubles, are excluded. (``grad_sumsq`` accumulates
in float64 on purpose and is not checked.)
"""

from __future__ import annotations

import re

import numba
import pytest

import fastopt.kernels.numba_cpu.optim as optim_kernels
import fastopt.kernels.numba_cpu.reduce as reduce_kernels
from fastopt.kernels.numba_cpu._jit import _Kernel
from fastopt.kernels.numba_cpu.runners import Runner

UPDATE_KERNELS = [(name, k) for name, k in vars(optim_kernels).items()
                  if isinstance(k, optim_kernels._UpdateKernel)]
KERNELS = [(f"{name}.{variant}", getattr(k, variant)) for name, k in UPDATE_KERNELS
           for variant in ("plain", "averaged")] + [("scale", reduce_kernels._scale.runner)]


def is_float32(signature) -> bool:
    """The signature takes float32 data (a float32 scalar or array)."""
    return any(getattr(arg, "dtype", arg) == numba.float32 for arg in signature.args)


def native_ir(kernel: _Kernel | Runner, signature) -> list[str]:
    """The LLVM IR of every function of the compiled kernel except the Python-facing wrappers."""
    if isinstance(kernel, Runner):
        ir = numba.cfunc(signature, error_model="numpy")(kernel.py_func).inspect_llvm()
    else:
        compiled = numba.njit(signature, parallel=False)(kernel.py_func)
        ir = compiled.inspect_llvm(compiled.signatures[0])
    bodies = [f for f in re.split(r"\n(?=define )", ir) if f.startswith("define")]
    native = [f for f in bodies if "@_ZN7cpython" not in f.splitlines()[0]
              and "@cfunc." not in f.splitlines()[0]]
    assert any(f"{kernel.__name__}B" in f.splitlines()[0] for f in native), \
        [b.splitlines()[0][:120] for b in bodies]
    return native


def test_every_optimizer_kernel_is_inspected():
    assert len(UPDATE_KERNELS) == 15
    assert len(KERNELS) == 31


@pytest.mark.parametrize("name, kernel", KERNELS, ids=[n for n, _ in KERNELS])
def test_float32_kernel_has_no_float64_arithmetic(name, kernel):
    float32_signatures = [s for s in kernel.signatures if is_float32(s)]
    assert len(float32_signatures) == 1 and len(kernel.signatures) == 2, kernel.signatures
    functions = native_ir(kernel, float32_signatures[0])
    assert any(" float " in f or "<16 x float>" in f or "x float>" in f for f in functions)
    for f in functions:
        head = f.splitlines()[0][:100]
        assert "double" not in f, f"{name}: float64 values in the float32 kernel ({head})"
        assert "fpext" not in f, f"{name}: float32 promoted to float64 ({head})"


def test_the_check_catches_a_float64_literal():
    """The inspection is not vacuous: a kernel with a Python float literal fails it."""

    def promoted(x):
        for i in range(x.shape[0]):
            x[i] = x[i] * 0.5 + 1e-8

    signature = numba.void(numba.float32[::1])
    kernel = _Kernel(promoted, [signature], parallel=False)
    assert any("fpext" in f for f in native_ir(kernel, signature))


def test_the_check_sees_the_update_loop():
    """The update's arithmetic (Adam's square root) is among the inspected functions, not lost
    in a function the filter dropped."""
    kernel = optim_kernels._adam.averaged
    signature = [s for s in kernel.signatures if is_float32(s)][0]
    assert any("llvm.sqrt.f32" in f or "llvm.sqrt.v" in f for f in native_ir(kernel, signature))
