"""Choosing a backend: array type + requested name -> the module that implements the operation.

A backend is a module exposing the operations under their public names (``adam_step``,
``batchnorm_forward``, ...) with the keyword-only signatures documented in
``fastopt.functional`` and ``fastopt.batchnorm``. Backends receive validated arguments only.

Backend names: ``"numpy"`` (the reference), ``"numba"`` (CPU kernels); ``"numba-cuda"`` and
``"cupy"`` are reserved for the GPU kernels. An explicitly requested backend that is unknown
raises ``ValueError``; one that is known but unavailable raises ``BackendUnavailableError``.
There is no silent fallback.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import numpy as np

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


# name -> (module to import, array type it works on, reason when it is not implemented yet)
_MODULES: dict[str, tuple[str | None, str, str]] = {
    "numpy": ("fastopt.reference", "numpy.ndarray", ""),
    "numba": ("fastopt.kernels.numba_cpu", "numpy.ndarray", ""),
    "numba-cuda": (None, "device array", "not implemented in this release"),
    "cupy": (None, "cupy.ndarray", "not implemented in this release"),
}
BACKEND_NAMES = tuple(_MODULES)

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
    except ImportError as exc:
        _failed[name] = f"importing {module_name} failed: {exc}"
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {_failed[name]}") from exc
    _loaded[name] = module
    return module


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


def resolve(backend: str | None, array) -> ModuleType:
    """The backend module for ``array`` (the operation's first array argument).

    ``backend=None`` picks by array type: NumPy arrays go to ``"numba"``. A named backend must
    be available and must accept the array's type.
    """
    check_backend_name(backend)
    if not isinstance(array, np.ndarray):
        raise TypeError(f"arrays must be numpy.ndarray, got {type(array).__module__}.{type(array).__name__}")
    name = "numba" if backend is None else backend
    module = _load(name)
    if _MODULES[name][1] != "numpy.ndarray":
        raise TypeError(f"backend {name!r} works on {_MODULES[name][1]}, got numpy.ndarray")
    return module
