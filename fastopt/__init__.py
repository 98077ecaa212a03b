"""fastopt: fused, compiled optimizer-update and batch-normalization kernels.

Optimizer classes (``SGD``, ``AdaGrad``, ``RMSProp``, ``AdaDelta``, ``Adam``, ``AdamW``,
``DeltaBarDelta``) update NumPy arrays in place through one fused pass per array; the same updates
are plain functions in ``fastopt.functional``. Batch normalization is ``batchnorm_forward``,
``batchnorm_backward`` and the ``BatchNorm`` layer. Every operation runs on a backend: ``"numba"``
(parallel CPU kernels, the default for NumPy arrays) or ``"numpy"`` (the reference);
``backends()`` says which are available here. Around the update, optimizers fuse gradient
clipping, loss scaling, a non-finite policy and Polyak averaging (``fastopt.schedules`` holds
learning-rate schedules, ``LossScaler`` dynamic loss scaling, ``clip_grad_norm_`` standalone
clipping). ``quantize_blockwise`` and ``dequantize_blockwise`` are the block-wise 8-bit quantizer
that 8-bit optimizer state will use (issue 13).
"""

from . import functional, schedules
from .batchnorm import BatchNorm, batchnorm_backward, batchnorm_forward
from .clip import clip_grad_norm_
from .dispatch import BackendUnavailableError, backends
from .optim import SGD, AdaDelta, AdaGrad, Adam, AdamW, DeltaBarDelta, Optimizer, RMSProp
from .quantize import dequantize_blockwise, quantize_blockwise
from .scaling import LossScaler

__version__ = "0.1.0"

__all__ = [
    "AdaDelta",
    "AdaGrad",
    "Adam",
    "AdamW",
    "BackendUnavailableError",
    "BatchNorm",
    "DeltaBarDelta",
    "LossScaler",
    "Optimizer",
    "RMSProp",
    "SGD",
    "backends",
    "batchnorm_backward",
    "batchnorm_forward",
    "clip_grad_norm_",
    "dequantize_blockwise",
    "functional",
    "quantize_blockwise",
    "schedules",
]
