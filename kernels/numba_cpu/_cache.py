"""numba's disk cache, stamped with every kernel source instead of one file.

numba keys a function's cache index with a SHA-256 of the source file that defines the function,
and nothing else it reads. A kernel that calls helpers from another module (the bit conversions of
``lowbits.py``, the tensor-list walk of ``multi.py``, the shared support rules) has those helpers
compiled into its own machine code, so a change to a helper alone left the kernel's stamp as it
was: the next process loaded the kernel's old code from the cache and ran the old helper.

Here the stamp is the pair (numba's own stamp, a SHA-256 over the relative path and bytes of every
``.py`` file of the ``fastopt.kernels`` package that a CPU kernel can compile in: the package's own
modules and ``numba_cpu``, not the GPU backends' ``cupy`` and ``numba_cuda``). Any change to such a
source, helper or not, invalidates every cached kernel; a reinstall that rewrites the same bytes
(another mtime, another checkout) keeps them. The digest is computed once per process.

Everything else is numba's: where the cache lives (``NUMBA_CACHE_DIR``, or ``__pycache__`` next
to the source), the index key (signature, CPU, bytecode), and the file format.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numba
from numba.core import caching, typeinfer

__all__ = ["njit", "has_cached_code", "sources_digest", "package_digest"]

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the fastopt.kernels package


GPU_SUBPACKAGES = ("cupy", "numba_cuda")  # no CPU kernel imports from these


def sources_digest(root: Path) -> str:
    """SHA-256 over the relative path and the bytes of every ``.py`` file under ``root``, except
    those of the ``GPU_SUBPACKAGES``."""
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*.py")):
        if path.relative_to(root).parts[0] in GPU_SUBPACKAGES:
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def package_digest() -> str:
    """``sources_digest`` of the installed ``fastopt.kernels`` package, once per process."""
    return sources_digest(PACKAGE_ROOT)


def _stamped(locator_class):
    """``locator_class`` with the package digest added to its source stamp."""

    class Stamped(locator_class):
        def get_source_stamp(self):
            return (super().get_source_stamp(), package_digest())

    Stamped.__name__ = Stamped.__qualname__ = "PackageStamped" + locator_class.__name__
    return Stamped


class _CacheImpl(caching.CompileResultCacheImpl):
    # numba's own search order, minus the IPython locator (no kernel lives in a notebook)
    _locator_classes = [_stamped(c) for c in (caching.UserProvidedCacheLocator,
                                              caching.InTreeCacheLocator,
                                              caching.UserWideCacheLocator,
                                              caching.ZipCacheLocator)]


class FunctionCache(caching.FunctionCache):
    """numba's per-function cache with the package-wide source stamp."""

    _impl_class = _CacheImpl


def has_cached_code(py_func) -> bool:
    """Whether the disk cache holds compiled code of ``py_func`` under the current stamp (for any
    signature and CPU): reads the function's index file, compiles nothing. A cheap sign that the
    cache was filled before by this version of the kernels."""
    return bool(FunctionCache(py_func)._cache_file._load_index())


def njit(sigs=None, **options):
    """``numba.njit(sigs, cache=True, **options)`` with the package-wide stamp: a decorator.

    With ``sigs``, compiles (or loads) them at once and then refuses other signatures, as
    ``numba.njit`` does with explicit signatures.
    """
    if "cache" in options:
        raise TypeError("njit: the cache is always on; do not pass cache=")

    def wrap(py_func):
        dispatcher = numba.njit(**options)(py_func)
        dispatcher._cache = FunctionCache(py_func)  # what Dispatcher.enable_caching() does
        if sigs is not None:
            with typeinfer.register_dispatcher(dispatcher):  # as numba.njit does
                for sig in sigs:
                    dispatcher.compile(sig)
            dispatcher.disable_compile()
        return dispatcher

    return wrap
