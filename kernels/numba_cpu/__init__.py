"""The ``"numba"`` backend: parallel CPU kernels compiled with numba.

Exposes every operation of the backend contract (``docs/backends.md``) under its public name:
the optimizer updates with the training-step extras and ``multi_step`` (``optim``, over the tensor
lists of ``multi``), the gradient reductions (``reduce``), batch normalization (``batchnorm``), and
the array helpers of the NumPy-array backends (``fastopt._host_arrays``).
"""

from ..._host_arrays import (
    copy_from_numpy,
    empty,
    empty_like,
    from_numpy,
    full_like,
    owns,
    to_numpy,
    zeros_like,
)
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
