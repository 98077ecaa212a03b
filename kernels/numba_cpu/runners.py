"""Part runners: an update loop compiled once, as a C function, and one launcher for all of them.

The optimizer kernels all have one shape: cut the flat element range of a tensor list into parts
(``multi.parts_for``), then run every part with the same loop, in parallel (``prange``) or, for a
small list, in order on the calling thread. Compiled as a numba kernel per update, that shape cost
each update its loop three times: the part runner, the parallel shell with the runner linked in
(numba's parfor lowering, then LLVM over the runner's code again) and the serial twin. 1.5-3 s
per (update, variant, dtype), 124 s of ``fastopt compile --all``'s 182 s.

Here the loop is compiled once per (update, variant, dtype), as a C function (``numba.cfunc``,
cached on disk under the package stamp of ``_cache``) of one fixed signature:

    run(part, parts, table, rows, offsets, count, hyper)
        part, parts   int64: which of ``parts`` parts to run
        table         int64*: the tensor table, ``rows`` × ``multi.COLUMNS`` addresses
        offsets       int64*: the ``count`` = rows + 1 flat offsets
        hyper         T*: the update's host scalars in the arrays' dtype T

``launch_parts(runner, table, offsets, hyper)`` runs the parts, calling the runner through its
address (an integer argument, so the launcher's compiled code holds no address and caches). It is
one house kernel (``_jit``) for every update, with float32 and float64 signatures (the dtype of
``hyper``) and its serial twin: four small compiles in all instead of two kernels per update.

A call through a pointer costs a few nanoseconds per part (at most ``multi.PARTS_MAX`` of them);
the loop inside the runner is the same code as before, optimized by LLVM on its own.
"""

from __future__ import annotations

import types as pytypes

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import sigutils
from numba.core.ccallback import CFunc
from numba.extending import intrinsic

from ._cache import FunctionCache
from ._jit import _compile_lock, kernel
from .multi import parts_for

__all__ = ["Launched", "Runner", "flag", "launch_parts", "runner_signature", "variant_runner"]

_I64 = types.int64


def runner_signature(dtype) -> types.Signature:
    """The C signature of a part runner whose scalars are of numba type ``dtype``."""
    return types.void(_I64, _I64, types.CPointer(_I64), _I64, types.CPointer(_I64), _I64,
                      types.CPointer(dtype))


@intrinsic
def _call_runner(typingctx, runner, part, parts, table, rows, offsets, count, hyper):
    """Call the part runner at address ``runner`` (C ABI, ``runner_signature``; every argument
    passes as a 64-bit integer, as pointers do on the platforms numba targets)."""
    signature = types.void(runner, part, parts, table, rows, offsets, count, hyper)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        function_type = ir.FunctionType(ir.VoidType(), [i64] * 7)
        builder.call(builder.inttoptr(args[0], function_type.as_pointer()), args[1:])
        return context.get_dummy_value()

    return signature, codegen


@kernel([types.void(_I64, _I64[:, ::1], _I64[::1], dtype[::1]) for dtype in (types.float32, types.float64)])
def launch_parts(runner, table, offsets, hyper):
    """Run every part of the tensor list (``offsets[-1]`` elements) with the part runner at
    address ``runner``; ``hyper`` is the runner's scalars, in the arrays' dtype."""
    count = offsets.shape[0]
    parts = parts_for(offsets[count - 1])
    for part in prange(parts):
        _call_runner(runner, part, parts, table.ctypes.data, table.shape[0], offsets.ctypes.data, count,
                     hyper.ctypes.data)


class _Stats:
    def __init__(self, cache_hits: int, cache_misses: int):
        self.cache_hits, self.cache_misses = cache_hits, cache_misses


class _Compiled:
    """A compiled runner: its C function, its address, and ``stats`` as a numba dispatcher has
    them (``fastopt compile`` reports whether it came from the disk cache)."""

    def __init__(self, cfunc: CFunc):
        self.cfunc = cfunc
        self.address = cfunc.address
        hits = cfunc.cache_hits
        self.stats = _Stats(hits, 0 if hits else 1)

    def inspect_llvm(self) -> str:
        return self.cfunc.inspect_llvm()


class Runner:
    """A part runner under the house protocol of ``_jit`` (``compile``, ``dtypes``,
    ``dispatchers``, ``py_func``, ``serial``): the function ``template`` with the module-level
    names of ``constants`` bound to their values (numba freezes globals as compile-time
    constants), under its own qualified name ``name``, compiled as a C function per dtype at its
    first use and cached on disk.

    The constants are bound as globals, not as closure cells: numba keys a closure's disk cache
    with the pickled cell contents, which for a jitted function differ in every process. Every
    runner shares the template's bytecode, so its own qualified name is what keeps it apart: numba
    names a function's cache files and its compiled symbols after it (plus a per-process counter
    for the symbols), and two runners of one name, compiled in different processes and loaded
    from the cache into one, could bind to each other's code."""

    parallel = False

    def __init__(self, template, name: str, constants: dict, dtypes=("float32", "float64")):
        py_func = pytypes.FunctionType(template.__code__, {**template.__globals__, **constants}, name,
                                       template.__defaults__, template.__closure__)
        py_func.__qualname__ = name
        py_func.__module__ = template.__module__
        py_func.__doc__ = template.__doc__
        self.py_func = py_func
        self.__name__ = name
        self.serial = self
        self._keys = [np.dtype(d) for d in dtypes]
        self.signatures = [runner_signature(numba.from_dtype(key)) for key in self._keys]
        self._compiled: list[_Compiled | None] = [None] * len(self._keys)
        self._address: dict = {}  # dtype -> the runner's address

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(str(k) for k in self._keys)

    def _compile_one(self, index: int) -> _Compiled:
        compiled = self._compiled[index]
        if compiled is None:
            with _compile_lock:
                compiled = self._compiled[index]
                if compiled is None:
                    cfunc = CFunc(self.py_func, sigutils.normalize_signature(self.signatures[index]), locals={},
                                  options={"nopython": True, "error_model": "numpy"})
                    cfunc._cache = FunctionCache(self.py_func)  # what CFunc.enable_caching() does
                    cfunc.compile()
                    compiled = self._compiled[index] = _Compiled(cfunc)
                    self._address[self._keys[index]] = compiled.address
        return compiled

    def compile(self, dtype=None) -> list[_Compiled]:
        """Compile (or load from the disk cache) the runner for ``dtype`` (every declared dtype
        when None). Returns the compiled runners."""
        wanted = None if dtype is None else np.dtype(dtype)
        return [self._compile_one(i) for i, key in enumerate(self._keys) if wanted is None or key == wanted]

    @property
    def dispatchers(self) -> dict:
        """The runners compiled so far, by dtype name."""
        return {str(self._keys[i]): c for i, c in enumerate(self._compiled) if c is not None}

    def address(self, dtype: np.dtype) -> int:
        """The address of the runner for arrays of ``dtype``, compiled at the first call.
        Raises TypeError for a dtype the runner is not declared for."""
        try:
            return self._address[dtype]
        except KeyError:
            pass
        for index, key in enumerate(self._keys):
            if key == dtype:
                return self._compile_one(index).address
        raise TypeError(f"{self.__name__}: no runner for dtype {dtype} (declared: {', '.join(self.dtypes)})")


class Launched:
    """A part runner run by ``launch_parts`` under the kernel protocol the host code uses: called as
    ``kernel(table, offsets, hyper)``, it launches the runner's address for ``hyper``'s dtype over
    the parts in parallel; ``.serial`` is the same with the launcher's serial twin. The launcher
    is the one every float32 optimizer step has compiled already, so a new runner costs its own
    compile and nothing more."""

    def __init__(self, runner: Runner, launch=None):
        self.runner = runner
        self._launch = launch_parts if launch is None else launch
        self.parallel = self._launch.parallel
        self.__name__ = runner.__name__
        self.__doc__ = runner.py_func.__doc__
        self.serial = Launched(runner, launch_parts.serial) if self.parallel else self

    def __call__(self, table, offsets, hyper):
        self._launch(self.runner.address(hyper.dtype), table, offsets, hyper)


def flag(on: bool):
    """A variant's flag as a compile-time constant: True, or None when off (numba prunes the
    branches on ``x is None`` before typing, and helpers take None for "off" as their argument)."""
    return True if on else None


def variant_runner(template, name: str, key: tuple, constants: dict, doc: str | None) -> Launched:
    """One variant of a family of float32 part runners: ``template`` with ``constants`` bound,
    named ``<name>_run_<key>`` (the key's flags as 0/1 digits: a disk cache of its own), run by
    ``launch_parts``."""
    tag = "".join(str(int(on)) for on in key)
    runner = Runner(template, f"{name}_run_{tag}", constants, dtypes=("float32",))
    runner.py_func.__doc__ = doc
    return Launched(runner)
