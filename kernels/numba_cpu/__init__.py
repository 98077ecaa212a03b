"""The ``"numba"`` backend: parallel CPU kernels compiled with numba.

Exposes every operation of the backend contract (``docs/backends.md``) under its public name:
the optimizer updates with the training-step extras and ``multi_step`` (``optim``, over the tensor
lists of ``multi``), the gradient reductions (``reduce``), batch normalization (``batchnorm``), and
the array helpers below.
"""

import numpy as np

from .batchnorm import batchnorm_backward, batchnorm_forward
from .optim import (
    adadelta_step,
    adagrad_step,
    adam_step,
    delta_bar_delta_step,
    multi_step,
    rmsprop_step,
    sgd_step,
)
from .reduce import grad_multiplier, grad_sumsq, scale_grads_

__all__ = [
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "batchnorm_backward",
    "batchnorm_forward",
    "copy_from_numpy",
    "delta_bar_delta_step",
    "empty",
    "empty_like",
    "from_numpy",
    "full_like",
    "grad_multiplier",
    "grad_sumsq",
    "multi_step",
    "owns",
    "rmsprop_step",
    "scale_grads_",
    "sgd_step",
    "to_numpy",
    "zeros_like",
]


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
    """A C-contiguous copy of the host array ``host`` (this backend's arrays are NumPy arrays)."""
    return np.array(host, order="C", copy=True)


def copy_from_numpy(array, host):
    """Write the host array ``host`` (same shape) into ``array`` in place."""
    np.copyto(array, host, casting="same_kind")
