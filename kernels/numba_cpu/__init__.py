"""The ``"numba"`` backend: parallel CPU kernels compiled with numba.

Exposes every operation under its public name with the backend signature documented in
``fastopt.functional`` (optimizers) and ``fastopt.batchnorm`` (batch normalization).
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
