"""Stochastic curriculum learning, after the lecture notes' "Curriculum Learning":

    "In the stochastic curriculum learning the rates of easy and hard examples are changed.
     Initially the mix has few hard examples and then later many more."

Which examples are easy is decided by a simple model: ``confidence`` trains a softmax regression
(a linear model, with fastopt's Adam) on the training set and returns the probability it gives
each example's true label. ``CurriculumSampler`` then

1. ranks the examples by that confidence, most confident first, and splits the ranking: the first
   ``easy_fraction`` of the examples (rounded) are the easy pool E, the rest the hard pool H. The
   data's own hard share is h* = |H|/N.
2. gives every epoch t = 0, 1, ... a hard share that grows linearly from ``start_hard`` (few hard
   examples) to h* over the first ``ramp_epochs`` epochs and stays at h* afterwards:

       h_t = start_hard + (h* − start_hard)·min(1, t / ramp_epochs)

3. draws each epoch as N indices: n_H = round(h_t·N) distinct hard examples, a random subset of
   H, and n_E = N − n_H easy ones: every example of E ⌊n_E/|E|⌋ times plus a random subset of
   n_E mod |E| of them once more. The epoch's N indices are then shuffled together.

Early epochs therefore see mostly easy examples (some of them twice) and a few random hard ones;
from epoch ``ramp_epochs`` on, n_H = |H|, n_E = |E|, and every epoch is a plain shuffled pass
over the data. Epochs are drawn independently of each other.
"""

from __future__ import annotations

import numpy as np

from ..optim import Adam

__all__ = ["CurriculumSampler", "confidence"]


def confidence(x: np.ndarray, y: np.ndarray, classes: int, *, steps: int = 100, lr: float = 0.1,
               backend=None) -> np.ndarray:
    """The probability a softmax regression, fit to (x, y) with ``steps`` full-batch Adam steps,
    gives each example's true label: high for easy (typical) examples, low for hard ones."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.zeros((x.shape[1], classes), np.float32)
    b = np.zeros(classes, np.float32)
    opt = Adam([w, b], lr=lr, backend=backend)
    rows = np.arange(len(y))

    def probabilities():
        z = x @ w + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    for _ in range(steps):
        g = probabilities()
        g[rows, y] -= 1.0
        g /= len(y)
        opt.step([x.T @ g, g.sum(axis=0)])
    return probabilities()[rows, y].astype(np.float64)


class CurriculumSampler:
    """Epochs of indices whose share of hard examples grows from ``start_hard`` to the data's
    own share over ``ramp_epochs`` epochs (see the module docstring for the exact rule)."""

    def __init__(self, confidence: np.ndarray, *, ramp_epochs: int, rng, start_hard: float = 0.1,
                 easy_fraction: float = 0.5):
        confidence = np.asarray(confidence, dtype=np.float64)
        if confidence.ndim != 1 or len(confidence) < 2:
            raise ValueError(f"confidence must be a 1-D array of at least 2 scores, got shape {confidence.shape}")
        if not 0.0 < easy_fraction < 1.0:
            raise ValueError(f"easy_fraction must be in (0, 1), got {easy_fraction!r}")
        if int(ramp_epochs) < 1:
            raise ValueError(f"ramp_epochs must be >= 1, got {ramp_epochs!r}")
        self.n = len(confidence)
        # most confident first; a stable sort keeps ties in index order
        self.ranking = np.argsort(-confidence, kind="stable")
        n_easy = min(max(round(easy_fraction * self.n), 1), self.n - 1)
        self.easy = self.ranking[:n_easy]
        self.hard = self.ranking[n_easy:]
        self.natural_hard = len(self.hard) / self.n
        if not 0.0 <= start_hard <= self.natural_hard:
            raise ValueError(f"start_hard must be in [0, {self.natural_hard:g}] (the data's own hard share), "
                             f"got {start_hard!r}")
        self.start_hard = float(start_hard)
        self.ramp_epochs = int(ramp_epochs)
        self.rng = np.random.default_rng(rng)

    def hard_share(self, epoch: int) -> float:
        """h_t for epoch t (0-based)."""
        progress = min(1.0, epoch / self.ramp_epochs)
        return self.start_hard + (self.natural_hard - self.start_hard) * progress

    def hard_count(self, epoch: int) -> int:
        """n_H = round(h_t·N), the number of hard indices in epoch t."""
        return min(round(self.hard_share(epoch) * self.n), len(self.hard))

    def _subset(self, members: np.ndarray, count: int) -> np.ndarray:
        """``count`` indices from ``members``: every member count // len times, plus a random
        subset of count % len of them once more."""
        whole, part = divmod(count, len(members))
        return np.concatenate([np.tile(members, whole), self.rng.choice(members, size=part, replace=False)])

    def epoch(self, epoch: int) -> np.ndarray:
        """The N shuffled example indices of epoch t (0-based)."""
        n_hard = self.hard_count(epoch)
        indices = np.concatenate([self._subset(self.hard, n_hard), self._subset(self.easy, self.n - n_hard)])
        return self.rng.permutation(indices)
