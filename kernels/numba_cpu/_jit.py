"""The house policy for compiling numba CPU kernels, in one place.

Every kernel is compiled the same way: ``njit(signatures, parallel=..., cache=True)`` with the
float32 and float64 signatures declared, so a call with a wrong type raises instead of
compiling a float64-promoted variant. Compilation is deferred to the first call, so importing
fastopt compiles nothing.

Threading: numba's default ``workqueue`` layer aborts the process when two Python threads run
parallel kernels at once. fastopt asks numba for a thread-safe layer (OpenMP or TBB) unless the
user chose one with ``NUMBA_THREADING_LAYER``. If the layer in use still turns out to be
``workqueue`` (neither is installed, or the user forced it), every kernel call is serialized
behind one lock instead, so concurrent ``step()`` calls stay correct.
"""

from __future__ import annotations

import os
import threading

import numba

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


class _Kernel:
    """A numba kernel compiled on first call under the house policy."""

    def __init__(self, py_func, signatures, parallel: bool):
        self.py_func = py_func
        self.signatures = signatures
        self.parallel = parallel
        self._compiled = None
        self.__name__ = py_func.__name__
        self.__doc__ = py_func.__doc__
        self.__wrapped__ = py_func

    @property
    def compiled(self):
        """The numba dispatcher, compiling (or loading from cache) on first access."""
        if self._compiled is None:
            with _compile_lock:
                if self._compiled is None:
                    self._compiled = numba.njit(
                        self.signatures, parallel=self.parallel, cache=True, nogil=True
                    )(self.py_func)
        return self._compiled

    def __call__(self, *args):
        global _serialize
        compiled = self.compiled
        if _serialize is False:
            return compiled(*args)
        with _call_lock:
            result = compiled(*args)
            if _serialize is None and self.parallel:
                _serialize = numba.threading_layer() == "workqueue"
            return result


def kernel(signatures, *, parallel: bool = True):
    """Decorate a kernel: declared ``signatures`` (list of numba signature strings), cache=True."""

    def wrap(py_func):
        return _Kernel(py_func, signatures, parallel)

    return wrap
