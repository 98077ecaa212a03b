"""The array helpers of the backend contract (``docs/backends.md``) for the backends whose arrays
are NumPy arrays, ``"numpy"`` and ``"numba"``. Allocation and copies only, no arithmetic: the
reference and the kernels still share no code that computes anything."""

from __future__ import annotations

import numpy as np

__all__ = ["copy_from_numpy", "empty", "empty_like", "from_numpy", "full_like", "owns", "to_numpy", "zeros_like"]


def owns(array) -> bool:
    """The backend works on NumPy arrays."""
    return isinstance(array, np.ndarray)


def zeros_like(array):
    return np.zeros_like(array)


def full_like(array, value):
    return np.full_like(array, value)


def empty_like(array):
    return np.empty_like(array)


def empty(shape, dtype, like):
    return np.empty(shape, dtype)


def to_numpy(array):
    return np.array(array, copy=True)


def from_numpy(host, like=None):
    """A C-contiguous NumPy copy of the host array ``host`` (``like`` is a NumPy array too)."""
    return np.array(host, order="C", copy=True)


def copy_from_numpy(array, host):
    """Write the host array ``host`` (same shape) into ``array`` in place."""
    np.copyto(array, host, casting="same_kind")
