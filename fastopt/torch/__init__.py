"""fastopt for PyTorch users: ``torch.optim`` optimizers and ``torch.nn`` batch-norm modules on
fastopt's fused kernels, working in place on the tensors' memory (no copies).

    import fastopt.torch
    opt = fastopt.torch.AdamW(model.parameters(), lr=1e-3)     # a torch.optim.AdamW
    fastopt.torch.convert(model)                                 # BatchNorm*d -> fastopt's

Needs the ``torch`` extra (``pip install 'fastopt[torch]'``). ``import fastopt`` never imports
torch; only ``import fastopt.torch`` does.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fastopt.torch needs PyTorch: pip install 'fastopt[torch]'") from exc

from .batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
    batch_norm,
    convert,
)
from .optim import SGD, Adadelta, Adagrad, Adam, AdamW, DeltaBarDelta, RMSprop

__all__ = [
    "SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "DeltaBarDelta",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d",
    "batch_norm", "convert",
]
