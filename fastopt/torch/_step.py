"""The fused step shared by every ``fastopt.torch`` optimizer: torch's param groups and state in,
fastopt's tensor-list kernels (``multi_step`` of the backend contract) over the tensors' memory.

A class mixes ``FusedStep`` in front of the ``torch.optim`` class it replaces, so that torch's own
constructor checks the arguments and sets the defaults, and torch's ``state_dict``,
``load_state_dict``, ``add_param_group``, ``zero_grad``, hooks and learning-rate schedulers work as
they do for torch's optimizer. ``FusedStep`` replaces only ``step``.

Per step, for each param group: the parameters whose ``.grad`` is not None are bucketed by
(device, dtype, step count, Polyak count); each bucket is one ``multi_step`` call with the
group's hyperparameters read from ``param_groups`` (so schedulers and edits take effect at the
next step), then the bucket's step counts grow by one. A bucket's parameter and state views are
cached until the parameters with gradients, their storage, or the state change
(``load_state_dict`` and ``add_param_group`` drop the cache). Everything is checked before
anything is written.

The ``step`` counts are torch's: a 0-dim float tensor per parameter (float32, or float64 when that
is torch's default dtype), on the CPU. fastopt keeps the tensors of one bucket as views into one
small tensor so that one addition counts a step for all of them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..functional import SPECS, check_host_options, with_host_options
from ..optim import _check_options, _host_float, _Multipliers, polyak_weight
from ._arrays import as_array, backend_module, check_tensor

__all__ = ["FusedStep"]

NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def scalar(name: str, value) -> float:
    """A hyperparameter as a Python float: torch allows 1-element tensors for ``lr`` and ``betas``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        return float(value.item())
    return value


def check_torch_flags(where: str, group: dict) -> None:
    """torch's implementation switches: fastopt always runs its own fused kernels, so ``foreach``
    and ``fused`` may take any of torch's values; ``capturable`` and ``differentiable`` must be
    False (fastopt reads step counts on the host and its kernels are not differentiable)."""
    for key in ("foreach", "fused"):
        value = group.get(key)
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{where}: {key} must be None or a bool, got {value!r}")
    for key in ("capturable", "differentiable"):
        if group.get(key, False):
            raise ValueError(f"{where}: {key}=True is not available in fastopt.torch: "
                             + ("its kernels read the step count on the host, so a step cannot be captured in a "
                                "CUDA graph" if key == "capturable" else
                                "its kernels update in place outside autograd"))


class _Bucket:
    """Tensors of one group stepped by one kernel call, with their backend arrays."""

    __slots__ = ("module", "members", "params", "states", "avgs", "avg_states", "counts", "first", "avg_steps",
                 "dtype")

    def __init__(self, module, members, params, states, avgs, avg_states, counts, first, avg_steps, dtype):
        self.module = module
        self.members = members  # positions in the group's list of parameters with gradients
        self.params = params  # backend arrays of the parameters
        self.states = states  # per parameter: the state arrays in the spec's order (None unused)
        self.avgs = avgs  # Polyak averages, or None
        self.avg_states = avg_states  # the state dicts holding them (their "avg_steps" counts)
        self.dtype = dtype  # NumPy dtype of the arrays
        self.counts = counts  # NumPy view of the step counts (views of it are state["step"]), or None
        self.first = first  # no state yet (SGD's first momentum step)
        self.avg_steps = avg_steps


class FusedStep:
    """Mixin: ``step`` on fastopt's kernels for a ``torch.optim`` optimizer class.

    A class defines ``_spec_of(group)`` (the ``fastopt.functional.SPECS`` key),
    ``_fastopt_hyper(group)`` (the spec's keywords and host options), ``_state_keys`` (fastopt state
    name -> torch state key) and may override ``_initial_value`` and ``_has_step``.
    """

    _state_keys: dict[str, str]
    _has_step = True
    _convention = "torch"  # torch.optim's update rules; DeltaBarDelta has only the textbook one

    def _init_fastopt(self, backend, clip_grad_norm, clip_grad_value, nonfinite, polyak) -> dict:
        """Check fastopt's own options (before torch's constructor runs) and keep them."""
        from .. import dispatch

        dispatch.check_backend_name(backend)
        options = _check_options(clip_grad_norm, clip_grad_value, nonfinite, polyak)
        self.backend = backend
        self.clip_grad_norm = options["clip_grad_norm"]
        self.clip_grad_value = options["clip_grad_value"]
        self.nonfinite = options["nonfinite"]
        self.polyak = options["polyak"]
        self.skipped_steps = 0
        self._plans = {}
        return options

    # -- torch hooks that change the layout -------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if isinstance(params, set):  # torch's own error: parameters need an order
            return super().add_param_group(param_group)
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for k, p in enumerate(params):
            tensor = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # torch's (name, tensor) pairs
            check_tensor(f"params[{k}] of the new param group", tensor)
            backend_module(getattr(self, "backend", None), tensor)
        param_group = {**param_group, "params": params}
        self._check_group(len(self.param_groups), {**self.defaults, **param_group})
        super().add_param_group(param_group)
        self._plans = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._plans = {}

    def _initial_value(self, name: str, group: dict) -> float:
        return 0.0

    # -- the step ---------------------------------------------------------------------------------

    def _check_group(self, index: int, group: dict):
        """(spec, validated kernel keywords, HostOptions or None) for one param group."""
        where = f"param group {index}"
        check_torch_flags(where, group)
        try:
            name = self._spec_of(group)
            kernel, host = self._fastopt_hyper(group)
            checked = SPECS[name].check(**kernel, convention=self._convention)
            return name, checked, check_host_options(name, checked, **host)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a ``.grad`` (the others are skipped, as in torch).
        Returns ``closure()`` when given (evaluated with gradients enabled, before the update)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        checked_groups = []
        for i, group in enumerate(self.param_groups):
            members = [p for p in group["params"] if p.grad is not None]
            if not members:
                continue
            name, checked, host = self._check_group(i, group)
            grads = [p.grad for p in members]
            for p, g in zip(members, grads):
                if (g.layout is not torch.strided or not g.is_contiguous() or g.dtype != p.dtype
                        or g.device != p.device or not p.is_contiguous()):
                    check_tensor(f"the grad of a parameter in param group {i}", g, like=p)
            checked_groups.append((i, group, name, checked, host, members, grads))
        if not checked_groups:
            return loss
        work, modules = [], set()
        for i, group, name, checked, host, members, grads in checked_groups:
            plan = self._plan(i, group, name, checked, members)
            modules.update(id(b.module) for b in plan)
            work.append((group, name, checked, host, plan, grads))
        grad_mul = 1.0
        if self.clip_grad_norm is not None or self.nonfinite != "propagate":
            if len(modules) != 1:
                raise ValueError("clip_grad_norm and nonfinite='skip'/'raise' need every parameter on one device "
                                 "and backend: the global norm is one reduction")
            module = work[0][4][0].module
            all_grads = [as_array(g) for *_, grads in work for g in grads]
            sumsq = module.grad_sumsq(all_grads)
            if self.nonfinite != "propagate" and not math.isfinite(_host_float(module, sumsq)):
                if self.nonfinite == "skip":
                    self.skipped_steps += 1
                    return loss
                raise FloatingPointError("a gradient contains NaN or Inf (nonfinite='raise'); nothing was updated")
            if self.clip_grad_norm is not None:
                grad_mul = _Multipliers(module, sumsq, self.clip_grad_norm, 1.0)
        grad_clip = math.inf if self.clip_grad_value is None else self.clip_grad_value
        for group, name, checked, host, plan, grads in work:
            self._update(name, checked, host, plan, grads, grad_mul, grad_clip)
        return loss

    def _update(self, name, checked, host, plan, grads, grad_mul, grad_clip) -> None:
        spec = SPECS[name]
        for bucket in plan:
            if bucket.counts is not None:
                t = int(bucket.counts[0]) + 1
            else:
                t = 1 if bucket.first else 2
            keywords = dict(checked)
            if spec.step_count:
                keywords["step"] = t
            keywords["grad_mul"] = grad_mul if isinstance(grad_mul, float) else grad_mul[bucket.dtype]
            keywords["grad_clip"] = grad_clip
            if bucket.avgs is not None:
                keywords["avg_weight"] = polyak_weight(self.polyak, bucket.avg_steps + 1)
            keywords = with_host_options(bucket.module, host, keywords, t,
                                         lambda multiplier: _host_float(bucket.module, multiplier))
            bucket.module.multi_step(spec.kernel, bucket.params, [as_array(grads[j]) for j in bucket.members],
                                     bucket.states, bucket.avgs, **keywords)
            if bucket.counts is not None:
                bucket.counts += 1
            if bucket.avgs is not None:
                bucket.avg_steps += 1
                for state in bucket.avg_states:
                    state["avg_steps"] = bucket.avg_steps
        if any(b.first for b in plan):
            self._plans = {}  # SGD's buffers exist now: the next step is not a first step

    def _plan(self, index, group, name, checked, members) -> list:
        """The group's buckets for these parameters with gradients (cached, see the module doc)."""
        spec = SPECS[name]
        used = spec.uses(checked)
        cached = self._plans.get(index)
        if (cached is not None and cached[0] == (name, used) and len(cached[1]) == len(members)
                and all(p is q and p.data_ptr() == ptr for p, q, ptr in zip(members, cached[1], cached[2]))):
            return cached[3]
        scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        keyed: dict[tuple, list[int]] = {}
        for j, p in enumerate(members):
            state = self.state[p]
            step = int(state["step"]) if "step" in state else 0
            first = bool(used) and all(state.get(self._state_keys[n]) is None for n in used)
            key = (p.device, p.dtype, step, state.get("avg_steps", 0), first)
            keyed.setdefault(key, []).append(j)
        buckets = []
        for (device, dtype, step, avg_steps, first), js in keyed.items():
            module = backend_module(self.backend, members[js[0]])
            states, avgs, avg_states = [], [] if self.polyak is not None else None, []
            for j in js:
                p = members[j]
                state = self.state[p]
                for n in used:
                    key = self._state_keys[n]
                    if key not in state or state[key] is None:
                        value = self._initial_value(n, group)
                        state[key] = torch.full_like(p, value, memory_format=torch.preserve_format).detach()
                    check_tensor(f"state[{key!r}]", state[key], like=p)
                states.append(tuple(as_array(state[self._state_keys[n]]) if n in used else None for n in spec.state))
                if avgs is not None:
                    if "avg" not in state:
                        state["avg"] = torch.zeros_like(p, memory_format=torch.preserve_format).detach()
                        state["avg_steps"] = 0
                    avgs.append(as_array(state["avg"]))
                    avg_states.append(state)
            counts = None
            if self._has_step:
                shared = torch.full((len(js),), float(step), dtype=scalar_dtype)
                for k, j in enumerate(js):
                    self.state[members[j]]["step"] = shared[k]
                counts = shared.numpy()
            buckets.append(_Bucket(module, js, [as_array(members[j]) for j in js], states, avgs, avg_states, counts,
                                   first, avg_steps, NUMPY_DTYPES[dtype]))
        self._plans[index] = ((name, used), list(members), [p.data_ptr() for p in members], buckets)
        return buckets

    def averaged_params(self) -> list:
        """The Polyak averages θ̂ (``polyak=``), one tensor per parameter in group order (the
        parameter itself before its first step)."""
        if self.polyak is None:
            raise RuntimeError("averaged_params() needs polyak averaging: build the optimizer with polyak='mean' or a float alpha")
        return [self.state[p]["avg"] if "avg" in self.state[p] else p
                for group in self.param_groups for p in group["params"]]

