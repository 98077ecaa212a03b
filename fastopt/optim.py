"""Optimizer classes: parameter groups, per-parameter state, and one fused update per array.

Each class checks its hyperparameters, gathers the arrays, and calls the backend function that
``fastopt.functional`` documents. ``step(grads)`` checks every parameter, gradient and
hyperparameter of every group before it updates anything, so a bad call leaves parameters and
state bit-identical.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import dispatch
from ._checks import CONVENTIONS, check_array, check_disjoint, check_like, check_real
from .functional import SPECS

__all__ = ["Optimizer", "SGD", "AdaGrad", "RMSProp", "AdaDelta", "Adam", "AdamW", "DeltaBarDelta"]


def _as_groups(params) -> list[dict]:
    if isinstance(params, (np.ndarray, dict)) or not hasattr(params, "__iter__"):
        raise TypeError(
            "params must be a list of arrays or of param-group dicts with a 'params' key, "
            f"got {type(params).__name__}"
        )
    params = list(params)
    if not params:
        raise ValueError("params must not be empty")
    if all(isinstance(p, dict) for p in params):
        groups = []
        for i, group in enumerate(params):
            if "params" not in group:
                raise ValueError(f"params[{i}] is a param group without a 'params' key")
            arrays = group["params"]
            arrays = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
            groups.append({**group, "params": arrays})
        return groups
    if any(isinstance(p, dict) for p in params):
        raise TypeError("params must be all arrays or all param-group dicts, not a mix")
    return [{"params": params}]


class Optimizer:
    """Base class: ``param_groups`` (torch-style dicts), ``state`` (one dict per parameter, in
    group order), ``step(grads)``, ``state_dict()`` and ``load_state_dict()``.

    Subclasses set ``_spec`` (a key of ``fastopt.functional.SPECS``) and may override
    ``_hyper`` (group -> keywords of the spec's check) and ``_initial_state``.
    """

    _spec: str

    def __init__(self, params, defaults: dict, *, convention: str = "textbook", backend: str | None = None):
        dispatch.check_backend_name(backend)
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.defaults = dict(defaults)
        self.convention = convention
        self.backend = backend
        groups = _as_groups(params)
        for i, group in enumerate(groups):
            for key in group:
                if key != "params" and key not in self.defaults:
                    raise ValueError(
                        f"param group {i} has unknown key {key!r}; allowed: 'params', "
                        + ", ".join(map(repr, self.defaults))
                    )
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.param_groups = groups
        flat = self._params()
        for k, p in enumerate(flat):
            check_array(f"params[{k}]", p, writeable=True)
        check_disjoint({f"params[{k}]": p for k, p in enumerate(flat)})
        if backend is not None:  # an explicitly named backend must be usable now, not at the first step
            dispatch.resolve(backend, flat[0])
        for i, group in enumerate(groups):
            self._check_group(i, group)
        self.state: list[dict] = [{"step": 0} for _ in flat]

    # -- hooks -------------------------------------------------------------------------------

    def _hyper(self, group: dict) -> dict:
        """The keywords of the spec's check function, read from one param group."""
        return {key: group[key] for key in self.defaults}

    def _initial_state(self, name: str, param: np.ndarray, group: dict) -> np.ndarray:
        return np.zeros_like(param)

    # -- machinery ---------------------------------------------------------------------------

    def _params(self) -> list:
        return [p for group in self.param_groups for p in group["params"]]

    def _check_group(self, index: int, group: dict) -> dict:
        try:
            return SPECS[self._spec].check(**self._hyper(group), convention=self.convention)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param group {index}: {exc}") from None
        except KeyError as exc:
            raise ValueError(f"param group {index} lacks hyperparameter {exc}") from None

    def step(self, grads) -> None:
        """Update every parameter in place from ``grads``, aligned with the parameters in group
        order. Everything is checked before anything is written."""
        spec = SPECS[self._spec]
        params = self._params()
        if isinstance(grads, np.ndarray) or not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list of arrays, one per param, got {type(grads).__name__}")
        if len(grads) != len(params):
            raise ValueError(f"grads must have one array per param ({len(params)}, in group order), got {len(grads)}")
        if len(self.state) != len(params):
            raise ValueError(
                f"the param groups now hold {len(params)} params but the state was made for {len(self.state)}; "
                "build a new optimizer to change the parameters"
            )
        written, read, plan = {}, {}, []
        k = 0
        for i, group in enumerate(self.param_groups):
            hyper = self._check_group(i, group)
            used = spec.uses(hyper)
            for param in group["params"]:
                grad = grads[k]
                check_array(f"params[{k}]", param, writeable=True)
                check_array(f"grads[{k}]", grad, writeable=False)
                check_like(f"grads[{k}]", grad, f"params[{k}]", param)
                written[f"params[{k}]"] = param
                read[f"grads[{k}]"] = grad
                for name in spec.state:
                    if name in self.state[k]:
                        written[f"state[{k}][{name!r}]"] = self.state[k][name]
                plan.append((k, param, grad, group, hyper, used))
                k += 1
        check_disjoint(written, read)
        module = dispatch.resolve(self.backend, params[0])
        kernel = getattr(module, spec.kernel)
        for k, param, grad, group, hyper, used in plan:
            state = self.state[k]
            for name in used:
                if name not in state:
                    state[name] = self._initial_state(name, param, group)
            extra = {"step": state["step"] + 1} if spec.step_count else {}
            kernel(param, grad, *(state.get(name) for name in spec.state), **hyper, **extra)
            state["step"] += 1

    def state_dict(self) -> dict:
        """A copy of the hyperparameters and state; ``load_state_dict`` restores it exactly."""
        groups, k = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**{key: group[key] for key in self.defaults}, "params": list(range(k, k + n))})
            k += n
        state = {
            k: {name: (value.copy() if isinstance(value, np.ndarray) else value) for name, value in s.items()}
            for k, s in enumerate(self.state)
        }
        return {"optimizer": type(self).__name__, "convention": self.convention,
                "param_groups": groups, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters and state saved by ``state_dict``; checks everything first."""
        spec = SPECS[self._spec]
        if not isinstance(state_dict, dict) or not {"param_groups", "state"} <= state_dict.keys():
            raise TypeError("state_dict must be a dict with 'param_groups' and 'state', as state_dict() returns")
        if state_dict.get("optimizer", type(self).__name__) != type(self).__name__:
            raise ValueError(f"state_dict is for {state_dict['optimizer']}, not {type(self).__name__}")
        if state_dict.get("convention", self.convention) != self.convention:
            raise ValueError(f"state_dict has convention {state_dict['convention']!r}, this optimizer {self.convention!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}")
        new_groups = []
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(f"state_dict param group {i} has {len(saved.get('params', ()))} params, "
                                 f"this optimizer {len(group['params'])}")
            unknown = set(saved) - set(self.defaults) - {"params"}
            if unknown:
                raise ValueError(f"state_dict param group {i} has unknown keys {sorted(unknown)}")
            new_group = {**group, **{key: saved[key] for key in self.defaults if key in saved}}
            self._check_group(i, new_group)
            new_groups.append(new_group)
        params = self._params()
        saved_state = state_dict["state"]
        if set(saved_state) - set(range(len(params))):
            raise ValueError(f"state_dict state has entries for params that do not exist: {sorted(set(saved_state) - set(range(len(params))))}")
        new_state = []
        for k, param in enumerate(params):
            entry = saved_state.get(k, {"step": 0})
            step = entry.get("step")
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"state_dict state[{k}]['step'] must be an int >= 0, got {step!r}")
            restored = {"step": int(step)}
            for name, value in entry.items():
                if name == "step":
                    continue
                if name not in spec.state:
                    raise ValueError(f"state_dict state[{k}] has unknown entry {name!r}; expected {spec.state}")
                if not isinstance(value, np.ndarray):
                    raise TypeError(f"state_dict state[{k}][{name!r}] must be a numpy.ndarray, got {type(value).__name__}")
                check_like(f"state_dict state[{k}][{name!r}]", value, f"params[{k}]", param)
                restored[name] = np.array(value, order="C", copy=True)
            new_state.append(restored)
        self.param_groups = new_groups
        self.state = new_state


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    Textbook: v ← αv − εg; θ ← θ + v (Nesterov, look-ahead form: θ ← θ + αv − εg).
    Torch: b ← αb + g; θ ← θ − εb (Nesterov: θ ← θ − ε(g + αb)). State: ``velocity``.
    """

    _spec = "sgd"

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, *,
                 convention="textbook", backend=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay),
                         convention=convention, backend=backend)


class AdaGrad(Optimizer):
    """AdaGrad: r ← r + g⊙g; θ ← θ − εg/(δ + √r). State: ``accumulator``."""

    _spec = "adagrad"

    def __init__(self, params, lr, eps=1e-7, initial_accumulator_value=0.0, weight_decay=0.0, *,
                 convention="textbook", backend=None):
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value,
                                      weight_decay=weight_decay), convention=convention, backend=backend)

    def _hyper(self, group):
        check_real("initial_accumulator_value", group["initial_accumulator_value"], low=0.0)
        return {key: group[key] for key in ("lr", "eps", "weight_decay")}

    def _initial_state(self, name, param, group):
        return np.full_like(param, group["initial_accumulator_value"])


class RMSProp(Optimizer):
    """RMSProp, optionally centered, with momentum or (textbook only) Nesterov momentum.

    r ← ρr + (1−ρ)g⊙g; textbook θ ← θ − εg/√(δ + r), torch θ ← θ − εg/(√r + δ).
    State: ``square_avg``, ``grad_avg`` (centered), ``velocity`` (momentum).
    """

    _spec = "rmsprop"

    def __init__(self, params, lr, rho=0.9, eps=1e-6, momentum=0.0, nesterov=False, centered=False,
                 weight_decay=0.0, *, convention="textbook", backend=None):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, momentum=momentum, nesterov=nesterov,
                                      centered=centered, weight_decay=weight_decay),
                         convention=convention, backend=backend)


class AdaDelta(Optimizer):
    """AdaDelta: r ← ρr + (1−ρ)g⊙g; Δ ← √(u+δ)/√(r+δ)⊙g; θ ← θ − εΔ; u ← ρu + (1−ρ)(εΔ)²
    (torch: (1−ρ)Δ²). State: ``square_avg``, ``acc_delta``."""

    _spec = "adadelta"

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, convention="textbook",
                 backend=None):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay),
                         convention=convention, backend=backend)


class Adam(Optimizer):
    """Adam with bias correction, optional AMSGrad and L2 weight decay. State: ``m``, ``v``,
    ``v_max`` (amsgrad) and the per-parameter ``step``."""

    _spec = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 convention="textbook", backend=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad),
                         convention=convention, backend=backend)

    def _hyper(self, group):
        betas = group["betas"]
        if isinstance(betas, np.ndarray) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        hyper = {key: group[key] for key in self.defaults if key != "betas"}
        return {**hyper, "beta1": betas[0], "beta2": betas[1]}


class AdamW(Adam):
    """Adam with decoupled weight decay: θ ← θ − ελθ, then Adam's update without L2."""

    _spec = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 convention="textbook", backend=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         convention=convention, backend=backend)


class DeltaBarDelta(Optimizer):
    """Delta-bar-delta: per-parameter rates e (initially ``lr``) and gradient average δ̄.

    θ ← θ − e⊙g; e ← e + κ where δ̄⊙g > 0, e ← e − φe where δ̄⊙g < 0; δ̄ ← (1−γ)g + γδ̄.
    ``lr`` is only the initial rate: changing a group's ``lr`` after its first step changes
    nothing, since from then on each element's rate is state. Textbook convention only.
    """

    _spec = "delta_bar_delta"

    def __init__(self, params, lr, kappa, phi, gamma, *, convention="textbook", backend=None):
        super().__init__(params, dict(lr=lr, kappa=kappa, phi=phi, gamma=gamma),
                         convention=convention, backend=backend)

    def _hyper(self, group):
        check_real("lr", group["lr"], low=0.0)
        return {key: group[key] for key in ("kappa", "phi", "gamma")}

    def _initial_state(self, name, param, group):
        if name == "rates":
            return np.full_like(param, group["lr"])
        return np.zeros_like(param)
