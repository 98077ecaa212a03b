"""Dynamic loss scaling on top of an optimizer's ``nonfinite="skip"`` policy.

Mixed-precision training multiplies the loss by a scale s so that small gradients survive in
low precision, and divides the gradients by s before the update. ``LossScaler.step`` passes
``grad_scale=s`` to the optimizer, whose fused pass does the division; a step whose gradients
overflowed (NaN/Inf) is skipped by the optimizer and the scale backs off; after
``growth_interval`` applied steps in a row the scale grows. The same rule as
``torch.amp.GradScaler``.
"""

from __future__ import annotations

import numbers

from ._checks import check_real

__all__ = ["LossScaler"]


class LossScaler:
    """s ← s·backoff_factor after a skipped step; s ← s·growth_factor after ``growth_interval``
    applied steps in a row. Use ``loss * scaler.scale`` in the backward pass, then
    ``scaler.step(opt, grads)``."""

    def __init__(self, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.scale = check_real("init_scale", init_scale, low=0.0, low_open=True)
        self.growth_factor = check_real("growth_factor", growth_factor, low=1.0, low_open=True)
        self.backoff_factor = check_real("backoff_factor", backoff_factor, low=0.0, high=1.0,
                                         low_open=True, high_open=True)
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, numbers.Integral):
            raise TypeError(f"growth_interval must be an int, got {type(growth_interval).__name__}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.growth_interval = int(growth_interval)
        self.good_steps = 0  # applied steps since the last change of scale

    def step(self, optimizer, grads, **step_options) -> bool:
        """``optimizer.step(grads, grad_scale=scale)``, then update the scale. Returns whether the
        step was applied (False: skipped for non-finite gradients)."""
        if getattr(optimizer, "nonfinite", None) != "skip":
            raise ValueError("LossScaler needs an optimizer built with nonfinite='skip', got "
                             f"nonfinite={getattr(optimizer, 'nonfinite', None)!r}")
        if "grad_scale" in step_options:
            raise TypeError("LossScaler.step sets grad_scale itself; do not pass it")
        skipped_before = optimizer.skipped_steps
        optimizer.step(grads, grad_scale=self.scale, **step_options)
        applied = optimizer.skipped_steps == skipped_before
        if not applied:
            self.scale *= self.backoff_factor
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0
        return applied

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        scale = check_real("state['scale']", state["scale"], low=0.0, low_open=True)
        good = state["good_steps"]
        if isinstance(good, bool) or not isinstance(good, numbers.Integral) or good < 0:
            raise ValueError(f"state['good_steps'] must be an int >= 0, got {good!r}")
        self.scale, self.good_steps = scale, int(good)
