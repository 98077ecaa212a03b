"""A small convolutional network on the scikit-learn digits, trained in torch with fastopt's AdamW
and batch norm (``examples/torch_cnn.py`` and ``fastopt train --framework torch`` run it).

The network (``cnn``): Conv(1→16, 3×3, pad 1) → BatchNorm2d → ReLU → Conv(16→32, 3×3, pad 1) →
BatchNorm2d → ReLU → MaxPool 2 → Flatten → Linear(512→10). ``fastopt=True`` swaps the batch norms
(``convert``: each is followed by a ReLU, so they become ``BatchNormReLU2d``) and uses
``fastopt.torch.AdamW``; ``fastopt=False`` is the same run on plain torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import convert
from .optim import AdamW

__all__ = ["CnnResult", "cnn", "train_cnn"]


def cnn(channels=(16, 32), classes: int = 10) -> nn.Sequential:
    """The example network for 1×8×8 images (torch modules; ``convert`` makes it fastopt's)."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * 4 * 4, classes),
    )


@dataclass
class CnnResult:
    test_accuracy: float
    seconds: float
    losses: list = field(default_factory=list)  # mean training loss per epoch


def train_cnn(*, epochs: int = 8, batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 1e-2,
              fastopt: bool = True, seed: int = 0, data=None, log=None) -> CnnResult:
    """Train ``cnn()`` on the digits' training split and return its accuracy on the test split."""
    from ..demo.data import load_digits

    data = load_digits() if data is None else data
    torch.manual_seed(seed)
    x_train = torch.from_numpy(data.x_train.astype(np.float32)).reshape(-1, 1, 8, 8)
    y_train = torch.from_numpy(data.y_train.astype(np.int64))
    x_test = torch.from_numpy(data.x_test.astype(np.float32)).reshape(-1, 1, 8, 8)
    y_test = torch.from_numpy(data.y_test.astype(np.int64))
    model = cnn()
    if fastopt:
        convert(model)
        opt = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    losses = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        total, batches = 0.0, 0
        for i in range(0, len(order) - 1, batch_size):  # a last batch of 1 has no variance: skipped
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
        losses.append(total / batches)
        if log is not None:
            log(f"epoch {epoch + 1}: loss {losses[-1]:.4f}")
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return CnnResult(accuracy, time.perf_counter() - start, losses)
