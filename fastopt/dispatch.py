"""Choosing a backend: array type + requested name -> the module that implements the operation.

A backend is a module exposing the operations under their public names (``adam_step``,
``batchnorm_forward``, ...) with the keyword-only signatures documented in
``fastopt.functional`` and ``fastopt.batchnorm``. Backends receive validated arguments only.

Backend names: ``"numpy"`` (the reference) and ``"numba"`` (CPU kernels) work on NumPy arrays;
``"cupy"`` (CUDA C kernels through CuPy) and ``"numba-cuda"`` (numba-cuda kernels) on CUDA device
arrays: CuPy arrays, numba device arrays, and anything exposing ``__cuda_array_interface__``
(torch CUDA tensors). With ``backend=None``: NumPy arrays go to ``"numba"``, CuPy arrays to
``"cupy"``, other device arrays to ``"numba-cuda"``. An explicitly requested backend that is
unknown raises ``ValueError``; one that is known but unavailable raises
``BackendUnavailableError``; a host array given to a GPU backend (or the reverse) raises
``TypeError``. There is no silent fallback and no hidden copy.

A GPU backend module may define ``unavailable_reason() -> str`` ("" when usable): importing it
works on any machine, and this says whether a CUDA device is present. A backend that cannot be
imported because the package it is built on is missing (numba-cuda) is reported as not installed,
with the pip command.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from ._checks import is_device_array

__all__ = ["BACKEND_NAMES", "BackendInfo", "BackendUnavailableError", "backends", "resolve"]


class BackendUnavailableError(RuntimeError):
    """A backend that fastopt knows of cannot be used on this machine."""


@dataclass(frozen=True)
class BackendInfo:
    """Whether one backend can be used here, and why not if it cannot."""

    name: str
    available: bool
    reason: str
    array_type: str


HOST, DEVICE = "numpy.ndarray", "CUDA device array"

# name -> (module to import, array type it works on, reason when it is not implemented yet)
_MODULES: dict[str, tuple[str | None, str, str]] = {
    "numpy": ("fastopt.reference", HOST, ""),
    "numba": ("fastopt.kernels.numba_cpu", HOST, ""),
    "numba-cuda": ("fastopt.kernels.numba_cuda", DEVICE, ""),
    "cupy": ("fastopt.kernels.cupy", DEVICE, ""),
}
BACKEND_NAMES = tuple(_MODULES)

# name -> (the package the backend is built on, its top-level module, how to install it). When importing
# the backend fails and that module is not installed, the reason names the package: numba has a
# ``numba.cuda`` of its own without numba-cuda, so the import then fails on some missing name instead.
_PACKAGES: dict[str, tuple[str, str, str]] = {
    "numba-cuda": ("numba-cuda", "numba_cuda", "pip install 'numba-cuda[cu12]'"),
}

_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


def _load(name: str) -> ModuleType:
    if name in _loaded:
        return _loaded[name]
    module_name, _, not_implemented = _MODULES[name]
    if module_name is None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {not_implemented}")
    if name in _failed:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {_failed[name]}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a missing package, or a dependency that breaks while importing
        # (numba-cuda 0.30.4 under NumPy 2.5 raises AttributeError for np.row_stack, seen on an H200)
        if isinstance(exc, ImportError):
            _failed[name] = _not_installed(name) or f"importing {module_name} failed: {exc}"
        else:
            _failed[name] = f"importing {module_name} failed: {type(exc).__name__}: {exc}"
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {_failed[name]}") from exc
    reason = module.unavailable_reason() if hasattr(module, "unavailable_reason") else ""
    if reason:  # e.g. no CUDA device: checked again on the next call, a device may appear
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    _loaded[name] = module
    return module


def _not_installed(name: str) -> str:
    """Why backend ``name`` cannot be imported when the package it is built on is not installed
    (its module cannot be found), else ""."""
    if name not in _PACKAGES:
        return ""
    package, module, install = _PACKAGES[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return "" if found else f"{package} is not installed (no module named {module!r}); {install}"


def allocating_module(backend: str | None) -> ModuleType | None:
    """The module that allocates an object's own arrays for ``backend``: a GPU backend's (its
    arrays on the current CUDA device; ``BackendUnavailableError`` when it cannot run here), or
    None for NumPy arrays (``backend`` None or a CPU backend)."""
    check_backend_name(backend)
    if backend is None or _MODULES[backend][1] == HOST:
        return None
    return _load(backend)


def backends() -> dict[str, BackendInfo]:
    """Report every backend fastopt knows, whether it is available here, and why not."""
    report = {}
    for name, (_, array_type, _) in _MODULES.items():
        try:
            _load(name)
        except BackendUnavailableError as exc:
            report[name] = BackendInfo(name, False, str(exc).split(": ", 1)[1], array_type)
        else:
            report[name] = BackendInfo(name, True, "", array_type)
    return report


def check_backend_name(backend: str | None) -> None:
    """Raise ``ValueError``/``TypeError`` for a backend argument that names no backend."""
    if backend is None:
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend not in _MODULES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))} or None, got {backend!r}")


def default_backend(array) -> str:
    """The backend ``backend=None`` picks for an array of this kind."""
    if isinstance(array, np.ndarray):
        return "numba"
    if type(array).__module__.split(".")[0] == "cupy":
        return "cupy"
    return "numba-cuda"


def resolve(backend: str | None, array) -> ModuleType:
    """The backend module for ``array`` (the operation's first array argument, already checked).

    ``backend=None`` picks by array kind (see the module docstring). A named backend must be
    available and must work on the array's kind.
    """
    check_backend_name(backend)
    host = isinstance(array, np.ndarray)
    if not host and not is_device_array(array):
        raise TypeError(f"arrays must be numpy.ndarray or CUDA device arrays, got "
                        f"{type(array).__module__}.{type(array).__name__}")
    name = default_backend(array) if backend is None else backend
    works_on = _MODULES[name][1]
    if (works_on == HOST) != host:
        given = HOST if host else f"a {DEVICE} ({type(array).__module__}.{type(array).__name__})"
        raise TypeError(f"backend {name!r} works on {works_on}s, got {given}; fastopt never copies "
                        "between host and device")
    return _load(name)
