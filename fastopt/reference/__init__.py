"""The ``"numpy"`` backend: the reference implementation, and fastopt's specification.

Written straight from the equations in ``docs/algorithms.md`` with plain NumPy expressions. It
shares no code with the kernels, so comparing a kernel with it means something. It is a real
backend: ``backend="numpy"`` runs it, in place, in the arrays' own dtype. The update functions
take the training-step extras of ``docs/backends.md`` (``grad_mul``, ``grad_clip``, ``avg``,
``avg_weight``) through ``extras.with_step_extras``.
"""

from . import optim as _optim
from .quantize import dequantize_blockwise, dynamic_map, quantize_blockwise
from .mixed import mixed_step, mixed_sumsq
from .state8 import state8_layout, state8_step, state8_supported
from .batchnorm import batchnorm_backward, batchnorm_forward, batchnorm_statistics
from .batchnorm import batchnorm_backward_lowp, batchnorm_forward_lowp
from .extras import (
    copy_from_numpy,
    empty,
    empty_like,
    from_numpy,
    full_like,
    grad_multiplier,
    grad_sumsq,
    multi_step,
    owns,
    scale_grads_,
    to_numpy,
    with_step_extras,
    zeros_like,
)

# The update functions implement torch's maximize, dampening and lr_decay from their equations;
# the kernel backends get them lowered to their scalars (fastopt.functional.with_host_options).
takes_host_options = True

sgd_step = with_step_extras(_optim.sgd_step)
adagrad_step = with_step_extras(_optim.adagrad_step)
rmsprop_step = with_step_extras(_optim.rmsprop_step)
adadelta_step = with_step_extras(_optim.adadelta_step)
adam_step = with_step_extras(_optim.adam_step)
delta_bar_delta_step = with_step_extras(_optim.delta_bar_delta_step)

__all__ = [
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "batchnorm_backward",
    "batchnorm_backward_lowp",
    "batchnorm_forward",
    "batchnorm_forward_lowp",
    "batchnorm_statistics",
    "copy_from_numpy",
    "delta_bar_delta_step",
    "dequantize_blockwise",
    "dynamic_map",
    "empty",
    "empty_like",
    "from_numpy",
    "full_like",
    "grad_multiplier",
    "grad_sumsq",
    "mixed_step",
    "mixed_sumsq",
    "multi_step",
    "owns",
    "quantize_blockwise",
    "rmsprop_step",
    "scale_grads_",
    "sgd_step",
    "state8_layout",
    "state8_step",
    "state8_supported",
    "to_numpy",
    "zeros_like",
]
