"""Learning-rate schedules: callables k ↦ ε_k, where k is the number of steps already taken.

An optimizer accepts any callable as ``lr`` (a group's ``lr`` too) and calls it once per step on
the host with k = the number of updates it has applied so far (0 for the first; skipped steps do
not count). Every schedule here is a small immutable object with that call signature; ``chain``
joins them end to end. The equations are in ``docs/algorithms.md`` ("Learning-rate schedules").

    linear_decay(lr0, lr_tau, tau)   ε_k = (1 − k/τ)ε_0 + (k/τ)ε_τ for k ≤ τ, ε_τ after (the seed's)
    step_decay(lr0, step_size, gamma)   ε_k = ε_0 γ^⌊k/step_size⌋
    exponential(lr0, gamma)          ε_k = ε_0 γ^k
    cosine(lr0, T, lr_min=0)         ε_k = ε_min + (ε_0 − ε_min)(1 + cos(πk/T))/2 for k ≤ T, ε_min after
    linear_warmup(lr0, warmup, start_factor=0)
                                     ε_k = ε_0 (f + (1 − f)k/W) for k < W, ε_0 after
    chain([s1, s2, ...], [k1, k2, ...])  s1 for k < k1, then s2(k − k1) for k1 ≤ k < k2, ...
"""

from __future__ import annotations

import bisect
import math
import numbers
from dataclasses import dataclass

from ._checks import check_real

__all__ = ["Schedule", "chain", "cosine", "exponential", "linear_decay", "linear_warmup", "step_decay"]


def _count(name: str, value, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


class Schedule:
    """Base of the schedules: ``schedule(k)`` is the learning rate of the step after k steps."""

    def __call__(self, k: int) -> float:
        k = _count("k", k, low=0)
        return self._lr(k)

    def _lr(self, k: int) -> float:  # pragma: no cover - every schedule overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class _LinearDecay(Schedule):
    lr0: float
    lr_tau: float
    tau: int

    def _lr(self, k):
        if k >= self.tau:
            return self.lr_tau
        a = k / self.tau
        return (1.0 - a) * self.lr0 + a * self.lr_tau


def linear_decay(lr0, lr_tau, tau) -> Schedule:
    """The seed's linear decay: ε_k = (1 − k/τ)ε_0 + (k/τ)ε_τ until k = τ, then constant ε_τ."""
    return _LinearDecay(check_real("lr0", lr0, low=0.0), check_real("lr_tau", lr_tau, low=0.0),
                        _count("tau", tau, low=1))


@dataclass(frozen=True)
class _StepDecay(Schedule):
    lr0: float
    step_size: int
    gamma: float

    def _lr(self, k):
        return self.lr0 * self.gamma ** (k // self.step_size)


def step_decay(lr0, step_size, gamma=0.1) -> Schedule:
    """ε_k = ε_0 γ^⌊k/step_size⌋ (torch's ``StepLR``)."""
    return _StepDecay(check_real("lr0", lr0, low=0.0), _count("step_size", step_size, low=1),
                      check_real("gamma", gamma, low=0.0))


@dataclass(frozen=True)
class _Exponential(Schedule):
    lr0: float
    gamma: float

    def _lr(self, k):
        return self.lr0 * self.gamma ** k


def exponential(lr0, gamma) -> Schedule:
    """ε_k = ε_0 γ^k (torch's ``ExponentialLR``)."""
    return _Exponential(check_real("lr0", lr0, low=0.0), check_real("gamma", gamma, low=0.0))


@dataclass(frozen=True)
class _Cosine(Schedule):
    lr0: float
    T: int
    lr_min: float

    def _lr(self, k):
        if k >= self.T:
            return self.lr_min
        return self.lr_min + (self.lr0 - self.lr_min) * (1.0 + math.cos(math.pi * k / self.T)) / 2.0


def cosine(lr0, T, lr_min=0.0) -> Schedule:
    """ε_k = ε_min + (ε_0 − ε_min)(1 + cos(πk/T))/2 for k ≤ T, ε_min after (torch's
    ``CosineAnnealingLR`` over its first half-period, with ``T_max = T``, ``eta_min = lr_min``)."""
    return _Cosine(check_real("lr0", lr0, low=0.0), _count("T", T, low=1), check_real("lr_min", lr_min, low=0.0))


@dataclass(frozen=True)
class _LinearWarmup(Schedule):
    lr0: float
    warmup: int
    start_factor: float

    def _lr(self, k):
        if k >= self.warmup:
            return self.lr0
        f = self.start_factor
        return self.lr0 * (f + (1.0 - f) * k / self.warmup)


def linear_warmup(lr0, warmup, start_factor=0.0) -> Schedule:
    """ε_k = ε_0 (f + (1 − f)k/W) for k < W, then ε_0 (torch's ``LinearLR`` with
    ``start_factor = f``, ``end_factor = 1``, ``total_iters = W``)."""
    return _LinearWarmup(check_real("lr0", lr0, low=0.0), _count("warmup", warmup, low=1),
                         check_real("start_factor", start_factor, low=0.0, high=1.0))


@dataclass(frozen=True)
class _Chain(Schedule):
    schedules: tuple
    milestones: tuple

    def _lr(self, k):
        index = bisect.bisect_right(self.milestones, k)  # milestones passed so far
        start = self.milestones[index - 1] if index else 0
        return float(self.schedules[index](k - start))


def chain(schedules, milestones) -> Schedule:
    """Run ``schedules[0]`` for k < milestones[0], then ``schedules[1]`` restarted at 0 until
    milestones[1], and so on; the last runs forever (torch's ``SequentialLR``).

    ``len(milestones) == len(schedules) − 1``, strictly increasing, all > 0.
    """
    schedules = tuple(schedules)
    milestones = tuple(milestones)
    if not schedules:
        raise ValueError("schedules must not be empty")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"schedules[{i}] must be callable k -> lr, got {type(s).__name__}")
    if len(milestones) != len(schedules) - 1:
        raise ValueError(f"milestones must have len(schedules) - 1 = {len(schedules) - 1} entries, got {len(milestones)}")
    milestones = tuple(_count(f"milestones[{i}]", m, low=1) for i, m in enumerate(milestones))
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ValueError(f"milestones must be strictly increasing, got {list(milestones)}")
    return _Chain(schedules, milestones)
