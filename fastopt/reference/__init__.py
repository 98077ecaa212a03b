"""The ``"numpy"`` backend: the reference implementation, and fastopt's specification.

Written straight from the equations in ``docs/algorithms.md`` with plain NumPy expressions. It
shares no code with the kernels, so comparing a kernel with it means something. It is a real
backend: ``backend="numpy"`` runs it, in place, in the arrays' own dtype.
"""

from .batchnorm import batchnorm_backward, batchnorm_forward
from .optim import (
    adadelta_step,
    adagrad_step,
    adam_step,
    delta_bar_delta_step,
    rmsprop_step,
    sgd_step,
)

__all__ = [
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "batchnorm_backward",
    "batchnorm_forward",
    "delta_bar_delta_step",
    "rmsprop_step",
    "sgd_step",
]
