"""The house policy for compiling numba-cuda kernels, and the registry of every kernel.

Every kernel is a plain Python function registered here with a function that gives its signature
for a dtype (float32 or float64). Nothing is compiled at import: ``KERNELS[name][dtype]`` compiles
the kernel for that dtype's declared signature on first use (``cuda.jit(signature)``), so a call
with wrongly typed arguments raises instead of compiling a float64-promoted variant, and importing
the backend works on a machine without a GPU. ``KERNELS`` lists every (kernel, dtype) pair, which
is what ``tests/test_numba_cuda_ptx.py`` compiles with ``numba.cuda.compile_ptx``.

A kernel that does float64 arithmetic on purpose for float32 data (the batch-norm statistics and
the gradient-norm reductions accumulate in float64) says so with ``float64="why"``; every other
float32 kernel must compile to PTX without a single ``.f64`` instruction.

Every product rounds as written, as in the reference and the cupy backend (``--fmad=false``):
kernels compile with NVVM's fma=0 (``rounding_as_written``) and without link-time optimization,
whose final code generation would contract products into fused multiply-adds again.

Launch geometry lives here too: ``THREADS`` threads per block and grids capped at a few blocks per
multiprocessor (grid-stride loops cover the rest). Under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``), where every thread is a Python thread, blocks and grids are tiny
(``THREADS = 64``, at most ``SIM_BLOCKS`` blocks) so that grid-stride loops, several blocks and
cross-block merges are still exercised on inputs of a few hundred elements. The simulator ignores
signatures, so there every launch's argument types are checked against the declared signature
(``_SignatureChecked``), as the compiled dispatcher would.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable

import numba
import numpy as np
from numba import cuda, types

__all__ = ["KERNELS", "SIMULATOR", "THREADS", "Kernel", "blocks_for", "kernel", "multiprocessors",
           "numba_dtype", "rounding_as_written"]

SIMULATOR = bool(cuda.config.ENABLE_CUDASIM)

THREADS = 64 if SIMULATOR else 256  # threads per block of the 1-D kernels (a multiple of 32)
BLOCKS_PER_SM = 8  # grid cap of the grid-stride kernels, per multiprocessor
SIM_BLOCKS = 3  # grid cap under the simulator

_DTYPES = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64}

_compile_lock = threading.Lock()


def numba_dtype(dtype):
    """numba's float32/float64 for a NumPy dtype (or a numba type, returned as is)."""
    if isinstance(dtype, types.Float):
        return dtype
    return _DTYPES[np.dtype(dtype)]


class Kernel:
    """A CUDA kernel compiled lazily, one dispatcher per dtype, each with one declared signature.

    ``signature(dt)`` gives the numba signature for the numba float type ``dt``. ``float64`` is
    None for a kernel whose float32 variant computes in float32 only, else the reason it does
    float64 arithmetic.
    """

    def __init__(self, name: str, py_func: Callable, signature: Callable, float64: str | None,
                 dtypes: tuple = (types.float32, types.float64)):
        self.name = name
        self.py_func = py_func
        self._signature = signature
        self.float64 = float64
        self.dtypes = dtypes  # the dtypes the kernel is compiled for
        self._compiled: dict = {}
        self.__doc__ = py_func.__doc__

    def signature(self, dtype):
        return self._signature(numba_dtype(dtype))

    def __getitem__(self, dtype):
        """The dispatcher for ``dtype`` (compiled on first use); index it with [grid, block, stream]."""
        dt = numba_dtype(dtype)
        if dt not in self.dtypes:
            raise TypeError(f"{self.name} exists for {', '.join(map(str, self.dtypes))}, not {dt}")
        compiled = self._compiled.get(dt)
        if compiled is None:
            with _compile_lock:
                compiled = self._compiled.get(dt)
                if compiled is None:
                    if SIMULATOR:  # no NVVM, no linking: the simulator runs the Python function
                        compiled = _SignatureChecked(self.name, cuda.jit(self._signature(dt))(self.py_func),
                                                     self._signature(dt))
                    else:
                        # lto=False: with link-time optimization (numba-cuda's default where
                        # nvJitLink is installed) nvJitLink generates the code from NVVM IR and
                        # contracts products into FMA whatever NVVM was told; the PTX path keeps
                        # the .rn instructions rounding_as_written gives, which ptxas never fuses
                        with rounding_as_written():
                            compiled = cuda.jit(self._signature(dt), lto=False)(self.py_func)
                    self._compiled[dt] = compiled
        return compiled

    def __repr__(self):
        return f"<numba-cuda kernel {self.name}>"


_local = threading.local()
_install_lock = threading.Lock()


@contextlib.contextmanager
def rounding_as_written():
    """NVVM compiles what this thread compiles inside the block with ``fma=0``: every product
    rounded as written, never contracted with an addition into one fused multiply-add.

    NVVM contracts a·b + c by default, and ``cuda.jit`` has no option to stop it. The reference,
    the CPU backends and the cupy backend (``--fmad=false``) round every product. On an H200 the
    contracted kernels left elements of ill-conditioned updates (centered RMSProp, a gradient
    cancelled by its weight decay) up to 1e-3 (relative) from the reference in float32 and 1e-11
    in float64. The option is added where numba-cuda calls NVVM (``nvvm.compile_ir``), for this thread and
    this block only: other code's kernels compile as numba-cuda compiles them. With fma=0 NVVM
    writes ``mul.rn``/``add.rn``, which ptxas never contracts either; the kernels are built
    without link-time optimization (``Kernel``), whose final code generation in nvJitLink
    would contract them again (seen on the H200: g + λθ rounded once)."""
    _install_fma_option()
    previous = getattr(_local, "no_fma", False)
    _local.no_fma = True
    try:
        yield
    finally:
        _local.no_fma = previous


def _install_fma_option() -> None:
    import numba.cuda.codegen as codegen
    from numba.cuda.cudadrv import nvvm

    # the module numba-cuda's code libraries call NVVM through, and the one by its import name
    # (one object where numba.cuda is numba-cuda itself; patch both if they ever differ)
    modules = {id(m): m for m in (codegen.nvvm, nvvm)}.values()
    with _install_lock:
        for module in modules:
            original = module.compile_ir
            if getattr(original, "fastopt_fma_option", False):
                continue

            def compile_ir(llvmir, _original=original, **options):
                if getattr(_local, "no_fma", False):
                    if options.get("fastmath"):
                        raise RuntimeError("fastopt compiles its kernels without fastmath, which would set fma=1")
                    options["fma"] = False
                return _original(llvmir, **options)

            functools.update_wrapper(compile_ir, original)
            compile_ir.fastopt_fma_option = True
            module.compile_ir = compile_ir


class _SignatureChecked:
    """Under the simulator, which ignores signatures: check every launch's argument types against
    the declared signature, as the compiled dispatcher would, so a mismatch fails in the simulator
    suite instead of first on a GPU."""

    def __init__(self, name, simulated, signature):
        self.name = name
        self.simulated = simulated
        self.signature = signature

    def __getitem__(self, configuration):
        launch = self.simulated[configuration]

        def checked(*args):
            given = tuple(numba.typeof(a) for a in args)
            if given != tuple(self.signature.args):
                raise TypeError(f"{self.name}: launched with {given}, declared {self.signature.args}")
            return launch(*args)

        return checked


KERNELS: dict[str, Kernel] = {}


def kernel(signature: Callable, *, name: str | None = None, float64: str | None = None,
           dtypes: tuple = (types.float32, types.float64)):
    """Register a kernel: ``signature(dt)`` -> numba signature for dtype ``dt`` (float32/float64).

    ``name`` defaults to "<module>.<function name without leading underscore>"; ``dtypes`` are
    the dtypes it exists for (both by default)."""

    def wrap(py_func):
        module = py_func.__module__.rsplit(".", 1)[-1]
        key = name or f"{module}.{py_func.__name__.lstrip('_')}"
        if key in KERNELS:
            raise RuntimeError(f"kernel {key} registered twice")
        KERNELS[key] = Kernel(key, py_func, signature, float64, tuple(dtypes))
        return KERNELS[key]

    return wrap


_sm_count: int | None = None


def multiprocessors() -> int:
    """The current device's multiprocessor count (1 under the simulator); asked once."""
    global _sm_count
    if _sm_count is None:
        _sm_count = 1 if SIMULATOR else int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    return _sm_count


def blocks_for(work_items: int, threads: int = THREADS, per_sm: int = BLOCKS_PER_SM) -> int:
    """Blocks of a grid-stride launch over ``work_items`` items: enough for one item per thread,
    capped at ``per_sm`` blocks per multiprocessor (``SIM_BLOCKS`` under the simulator)."""
    cap = SIM_BLOCKS if SIMULATOR else per_sm * multiprocessors()
    return max(1, min(-(-work_items // threads), cap))
