"""float32 kernels compute in float32: their compiled code has no double-precision value in it.

A Python float literal or a float64 scalar inside a kernel silently promotes the arithmetic to
float64; this inspects the LLVM IR numba generates for each kernel's float32 signature. The
kernel is compiled here without ``parallel`` so the loop body sits in one function (the parallel
build runs the same body); the CPython wrapper, which unboxes Python floats as doubles, is
excluded.
"""

from __future__ import annotations

import re

import numba
import pytest

import fastopt.kernels.numba_cpu.optim as optim_kernels
from fastopt.kernels.numba_cpu._jit import _Kernel

KERNELS = [(name, k) for name, k in vars(optim_kernels).items() if isinstance(k, _Kernel)]


def native_function_ir(kernel: _Kernel, signature) -> str:
    compiled = numba.njit(signature, parallel=False)(kernel.py_func)
    ir = compiled.inspect_llvm(compiled.signatures[0])
    bodies = [f for f in re.split(r"\n(?=define )", ir) if f.startswith("define")]
    native = [f for f in bodies if f"{kernel.__name__}B" in f.splitlines()[0]
              and "@_ZN7cpython" not in f.splitlines()[0] and "@cfunc." not in f.splitlines()[0]]
    assert len(native) == 1, [b.splitlines()[0][:120] for b in bodies]
    return native[0]


def test_every_optimizer_kernel_is_inspected():
    assert len(KERNELS) >= 10


@pytest.mark.parametrize("name, kernel", KERNELS, ids=[n for n, _ in KERNELS])
def test_float32_kernel_has_no_float64_arithmetic(name, kernel):
    float32_signatures = [s for s in kernel.signatures if s.args[0].dtype == numba.float32]
    assert len(float32_signatures) == 1 and len(kernel.signatures) == 2, kernel.signatures
    ir = native_function_ir(kernel, float32_signatures[0])
    assert "float" in ir  # the arithmetic is there, in single precision
    assert "double" not in ir, f"{name}: float64 values in the float32 kernel"
    assert "fpext" not in ir, f"{name}: float32 promoted to float64"


def test_the_check_catches_a_float64_literal():
    """The inspection is not vacuous: a kernel with a Python float literal fails it."""

    def promoted(x):
        for i in range(x.shape[0]):
            x[i] = x[i] * 0.5 + 1e-8

    signature = numba.void(numba.float32[::1])
    kernel = _Kernel(promoted, [signature], parallel=False)
    assert "fpext" in native_function_ir(kernel, signature)
