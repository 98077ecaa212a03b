"""The house policy for compiling numba CPU kernels, in one place.

Every kernel is compiled the same way: ``njit(signature, parallel=..., cache=True, nogil=True)``
with its float32 and float64 signatures declared, so a call with a wrong type raises instead of
compiling a float64-promoted variant. Nothing compiles at import, and a call compiles only what it
needs: each declared signature has its own dispatcher, compiled (or loaded from numba's disk
cache) at the first call that needs it. A float32 training run never compiles the float64 code.

Which signature a call needs is read from one argument: the first one whose type differs between
the declared signatures (for one signature, the first float array or scalar). The ``dtype`` of that
argument picks the dispatcher with one dictionary look-up, and the dispatcher, which holds one
declared signature, checks every argument's type as numba always does (no ``numba.typeof`` per
call). A call whose argument matches no declared dtype raises ``TypeError``. ``kernel.compile()``
compiles ahead of time (``fastopt compile`` fills the disk cache that way).

Serial twins: a parallel kernel (``parallel=True``, the default) has ``kernel.serial``, the same
Python function compiled with ``parallel=False`` (``prange`` runs as ``range`` on the calling
thread). Host code launches the twin below a size threshold of its own, where a parallel region
costs more than it saves: opening and joining one costs microseconds on a quiet machine and
milliseconds when another process holds a core the team must wait for. The twin also compiles in
a fraction of the time (numba's parfor lowering dominates a parallel kernel's compile), so a
program on small arrays never pays for the parallel code. The twin is a copy of the function
under its own qualified name (``<name>_serial``): numba names a function's disk-cache files after
its qualified name, and its cache index does not record the ``parallel`` flag, so one name for
both would let either load the other's code.

Threading: numba's default ``workqueue`` layer aborts the process when two Python threads run
parallel kernels at once. fastopt asks numba for a thread-safe layer (OpenMP or TBB) unless the
user chose one with ``NUMBA_THREADING_LAYER``. If the layer in use still turns out to be
``workqueue`` (neither is installed, or the user forced it), every kernel call is serialized
behind one lock instead, so concurrent ``step()`` calls stay correct.
"""

from __future__ import annotations

import os
import threading
import types as pytypes

import numba
import numpy as np
from numba import types
from numba.core import errors, sigutils
from numba.np.numpy_support import as_dtype

from ._cache import njit as cached_njit

__all__ = ["kernel", "calls_serialized"]

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"
    try:  # "threadsafe" fails at the first launch when neither layer can load; fall back up front.
        import numba.np.ufunc.omppool  # noqa: F401
    except ImportError:
        try:
            import numba.np.ufunc.tbbpool  # noqa: F401
        except ImportError:
            numba.config.THREADING_LAYER = "default"

_compile_lock = threading.Lock()
_call_lock = threading.Lock()
_serialize: bool | None = None  # unknown until the first parallel launch has picked a layer


def calls_serialized() -> bool | None:
    """True when kernel calls are serialized (workqueue layer); None before the first call."""
    return _serialize


def _dtype(numba_type) -> np.dtype | None:
    """The NumPy dtype of an array or scalar numba type (None for others)."""
    try:
        return as_dtype(numba_type.dtype if isinstance(numba_type, types.Array) else numba_type)
    except (NotImplementedError, TypeError, errors.NumbaError):
        return None


def _selector(arg_types: list[tuple]) -> int:
    """The position of the argument whose dtype tells the declared signatures apart: the first
    position where they differ, or, for one signature, the first float array or scalar."""
    for at, column in enumerate(zip(*arg_types)):
        if len(set(column)) > 1:
            return at
    for at, t in enumerate(arg_types[0]):
        dtype = _dtype(t)
        if dtype is not None and dtype.kind == "f":
            return at
    return 0


def _renamed(py_func, suffix: str):
    """A copy of ``py_func`` (same code, globals and closure) named ``<name><suffix>``."""
    copy = pytypes.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__ + suffix,
                                py_func.__defaults__, py_func.__closure__)
    copy.__qualname__ = py_func.__qualname__ + suffix
    copy.__module__ = py_func.__module__
    copy.__doc__ = py_func.__doc__
    copy.__kwdefaults__ = py_func.__kwdefaults__
    return copy


class _Kernel:
    """A numba kernel under the house policy: one dispatcher per declared signature, each compiled
    (or loaded from the disk cache) at the first call that needs it, or by ``compile()``."""

    def __init__(self, py_func, signatures, parallel: bool, options: dict | None = None):
        self.py_func = py_func
        self.signatures = signatures
        self.parallel = parallel
        self.options = dict(options or {})
        self.__name__ = py_func.__name__
        self.__doc__ = py_func.__doc__
        self.__wrapped__ = py_func
        arg_types = [sigutils.normalize_signature(s)[0] for s in signatures]
        self._at = _selector(arg_types)
        keys = [_dtype(args[self._at]) if len(args) > self._at else None for args in arg_types]
        if len(signatures) > 1 and (any(k is None for k in keys) or len(set(keys)) < len(keys)):
            raise ValueError(f"{self.__name__}: the declared signatures must differ in the dtype of "
                             f"one argument, got {signatures}")
        self._keys = keys  # the dtype of argument ``_at`` in each declared signature
        self._dispatchers = [None] * len(signatures)
        self._by_dtype: dict = {}  # dtype of argument ``_at`` -> its signature's dispatcher
        self._addresses: dict = {}  # dtype of argument ``_at`` -> its native entry point
        # the serial twin (see the module docstring); a serial kernel is its own
        self.serial = _Kernel(_renamed(py_func, "_serial"), signatures, False, options) if parallel else self

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtype of each declared signature, by name ("float32", "float64")."""
        return tuple(str(k) for k in self._keys)

    def _dispatcher(self, index: int):
        """The dispatcher of declared signature ``index``, compiling it (or loading it from the
        cache) the first time."""
        dispatcher = self._dispatchers[index]
        if dispatcher is None:
            with _compile_lock:
                dispatcher = self._dispatchers[index]
                if dispatcher is None:
                    dispatcher = cached_njit([self.signatures[index]], parallel=self.parallel,
                                             nogil=True, **self.options)(self.py_func)
                    self._dispatchers[index] = dispatcher
                    key = self._keys[index]
                    if key is not None:
                        self._by_dtype[key] = dispatcher
        return dispatcher

    def compile(self, dtype=None) -> list:
        """Compile (or load from numba's disk cache) the declared signature for ``dtype`` (a NumPy
        dtype or its name; none when the kernel has no such signature), or every declared signature
        when ``dtype`` is None. Returns the dispatchers."""
        wanted = None if dtype is None else np.dtype(dtype)
        return [self._dispatcher(i) for i, key in enumerate(self._keys)
                if wanted is None or (key is not None and key == wanted)]

    def address(self, dtype) -> int:
        """The native entry point (numba's calling convention, not the Python wrapper) of the
        declared signature for arrays of ``dtype``, compiled at the first call: what
        ``tasks.call_tasks`` calls. Raises TypeError for an undeclared dtype."""
        address = self._addresses.get(dtype)
        if address is None:
            dispatchers = self.compile(dtype)
            if not dispatchers:
                raise TypeError(f"{self.__name__}: no declared signature for dtype {dtype}")
            compiled = dispatchers[0].overloads[dispatchers[0].signatures[0]]
            address = compiled.library.get_pointer_to_function(compiled.fndesc.llvm_func_name)
            self._addresses[np.dtype(dtype)] = address
        return address

    @property
    def dispatchers(self) -> dict:
        """The dispatchers compiled so far, by dtype name."""
        return {str(self._keys[i]): d for i, d in enumerate(self._dispatchers) if d is not None}

    def _resolve(self, args):
        """The dispatcher for ``args`` when the look-up by dtype missed (first call of a signature,
        or an argument without a dtype such as a Python float)."""
        if len(self.signatures) == 1:
            return self._dispatcher(0)  # its own type check raises for wrong arguments
        value = args[self._at] if len(args) > self._at else None
        dtype = getattr(value, "dtype", None)
        if not isinstance(dtype, np.dtype):
            try:
                dtype = _dtype(numba.typeof(value))
            except ValueError:  # numba cannot type it: no signature matches
                dtype = None
        for index, key in enumerate(self._keys):
            if dtype is not None and key == dtype:  # (np.dtype(...) == None compares with float64)
                return self._dispatcher(index)
        raise TypeError(f"{self.__name__}: no declared signature for argument types "
                        f"({', '.join(_typename(a) for a in args)}); declared: "
                        f"{'; '.join(map(str, self.signatures))}") from None

    def __call__(self, *args):
        global _serialize
        try:
            compiled = self._by_dtype[args[self._at].dtype]
        except (AttributeError, IndexError, KeyError, TypeError):
            compiled = self._resolve(args)
        if _serialize is False or not self.parallel:  # a serial kernel never enters the thread pool
            return compiled(*args)
        with _call_lock:
            result = compiled(*args)
            if _serialize is None and self.parallel:
                _serialize = numba.threading_layer() == "workqueue"
            return result


def _typename(value) -> str:
    try:
        return str(numba.typeof(value))
    except Exception:  # numba cannot type it: its Python type is the news
        return type(value).__name__


def kernel(signatures, *, parallel: bool = True, **options):
    """Decorate a kernel: declared ``signatures`` (list of numba signature strings or objects,
    differing in one argument's dtype), cache=True, each compiled at its first call; ``options``
    go to ``numba.njit`` (``error_model``, ...)."""

    def wrap(py_func):
        return _Kernel(py_func, signatures, parallel, options)

    return wrap
