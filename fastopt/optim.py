"""Optimizer classes: parameter groups, per-parameter state, and one fused update per array.

Each class checks its hyperparameters, gathers the arrays, and calls the backend function that
``fastopt.functional`` documents. ``step(grads)`` checks every parameter, gradient and
hyperparameter of every group before it updates anything, so a bad call leaves parameters and
state bit-identical.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np

from . import dispatch, precision
from ._checks import CONVENTIONS, check_array, check_disjoint, check_real, check_same_kind, dtype_of, shape_of
from .functional import HOST_OPTIONS, SPECS, check_host_options, with_host_options

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


NONFINITE_POLICIES = ("propagate", "skip", "raise")


def _host_float(module, value) -> float:
    """A backend's scalar result as a Python float (on a GPU backend this waits for the device)."""
    if isinstance(value, float):
        return value
    return float(module.to_numpy(value).reshape(-1)[0])


class _Multipliers(dict):
    """dtype -> the backend's gradient multiplier for that dtype, made on first use."""

    def __init__(self, module, sumsq, max_norm, inv_scale):
        super().__init__()
        self._args = (module, sumsq, max_norm, inv_scale)

    def __missing__(self, dtype):
        module, sumsq, max_norm, inv_scale = self._args
        value = self[dtype] = module.grad_multiplier(sumsq, max_norm, inv_scale, dtype)
        return value


def polyak_weight(polyak, avg_steps: int) -> float:
    """w in θ̂ ← θ̂ + w(θ − θ̂) for the ``avg_steps``-th averaged iterate (1 on the first):
    1/avg_steps for ``polyak="mean"``, 1 − α for an EMA with ``polyak=α``."""
    if avg_steps == 1:
        return 1.0
    if polyak == "mean":
        return 1.0 / avg_steps
    return 1.0 - polyak


def _check_options(clip_grad_norm, clip_grad_value, nonfinite, polyak) -> dict:
    """The training-step options every optimizer takes (see ``Optimizer``)."""
    if clip_grad_norm is not None:
        clip_grad_norm = check_real("clip_grad_norm", clip_grad_norm, low=0.0, low_open=True)
    if clip_grad_value is not None:
        clip_grad_value = check_real("clip_grad_value", clip_grad_value, low=0.0, low_open=True)
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if polyak is not None and polyak != "mean":
        if isinstance(polyak, str):
            raise ValueError(f"polyak must be None, 'mean' or a float alpha in [0, 1), got {polyak!r}")
        polyak = check_real("polyak", polyak, low=0.0, high=1.0, high_open=True)
    return dict(clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value, nonfinite=nonfinite, polyak=polyak)


class Optimizer:
    """Base class: ``param_groups`` (torch-style dicts), ``state`` (one dict per parameter, in
    group order), ``step(grads)``, ``state_dict()`` and ``load_state_dict()``.

    Training-step options, keyword-only on every optimizer (equations in ``docs/algorithms.md``,
    "Training-step extras"); each is fused into the update's single pass over the arrays:

    * ``clip_grad_norm=max_norm``: scale all gradients of the step by
      min(1, max_norm/(‖g‖ + 1e-6)), ‖g‖ the global L2 norm over every gradient of the step
      (one extra read-only pass computes it). The caller's gradient arrays are never written.
    * ``clip_grad_value=c``: clamp each gradient element to [−c, c] (after the norm scaling).
    * ``nonfinite``: what a step does when a gradient holds NaN or ±Inf. ``"propagate"`` (the
      default, as in torch: no check, no extra pass) lets them reach the parameters; ``"skip"``
      leaves parameters, state and ``steps`` bit-identical and counts ``skipped_steps``;
      ``"raise"`` raises ``FloatingPointError`` naming the first bad gradient, nothing modified.
      Both share the clipping pass when clipping is on.
    * ``polyak``: ``None``, ``"mean"`` (θ̂ = the mean of the iterates after each step) or a float
      α in [0, 1) (θ̂ ← αθ̂ + (1 − α)θ); θ̂ starts at the parameters after the first step.
      ``averaged_params()`` returns θ̂.

    ``lr`` (in ``defaults`` or a group) may be a callable k ↦ ε (``fastopt.schedules``), called
    with k = ``steps``, the number of applied steps so far.

    Checks: the parameters are checked when the optimizer is built and whenever the param lists
    change; each step checks every gradient of the step against its parameter. The state arrays
    belong to the optimizer: replace them only through ``load_state_dict``.

    Subclasses set ``_spec`` (a key of ``fastopt.functional.SPECS``) and may override
    ``_hyper`` (group -> keywords of the spec's check) and ``_initial_value``.
    """

    _spec: str
    _counters = ("step", "avg_steps")  # the state entries that are ints; all others are arrays

    _dist = None  # the data-parallel side (fastopt.distributed.engine.DataParallel) with comm=

    def __init__(self, params, defaults: dict, *, convention: str = "textbook", backend: str | None = None,
                 clip_grad_norm=None, clip_grad_value=None, nonfinite="propagate", polyak=None,
                 master_weights=None, rounding="nearest", seed=0, state_dtype="float32", min_8bit_size=4096,
                 comm=None, shard_state=None, grad_reduce="mean", bucket_bytes=None):
        if comm is not None:  # every rank builds, then all agree (docs/distributed.md); imports mpi4py
            from .distributed.engine import attach

            params = _as_groups(params)  # (a list from here: the ranks' build reads it again)
            attach(self, lambda: Optimizer.__init__(
                self, params, defaults, convention=convention, backend=backend, clip_grad_norm=clip_grad_norm,
                clip_grad_value=clip_grad_value, nonfinite=nonfinite, polyak=polyak, master_weights=master_weights,
                rounding=rounding, seed=seed, state_dtype=state_dtype, min_8bit_size=min_8bit_size),
                comm, shard_state, grad_reduce, bucket_bytes, backend)
            return
        if (shard_state, grad_reduce, bucket_bytes) != (None, "mean", None):
            raise ValueError("shard_state, grad_reduce and bucket_bytes need comm= (an mpi4py communicator)")
        dispatch.check_backend_name(backend)
        self.precision = precision.check_options(self._spec, master_weights, rounding, seed, state_dtype, min_8bit_size)
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        options = _check_options(clip_grad_norm, clip_grad_value, nonfinite, polyak)
        # torch's options (maximize, dampening, lr_decay) join the param groups only when set, so
        # that the groups of an optimizer without them hold exactly the algorithm's hyperparameters
        self._host_keys = HOST_OPTIONS[self._spec]
        self.defaults = {key: value for key, value in defaults.items()
                         if not (key in self._host_keys and type(value) in (bool, int, float) and not value)}
        self.convention = convention
        self.backend = backend
        self.clip_grad_norm = options["clip_grad_norm"]
        self.clip_grad_value = options["clip_grad_value"]
        self.nonfinite = options["nonfinite"]
        self.polyak = options["polyak"]
        self.steps = 0  # applied steps: the k that lr schedules receive
        self.skipped_steps = 0
        groups = _as_groups(params)
        for i, group in enumerate(groups):
            for key in group:
                if key != "params" and key not in self.defaults and key not in self._host_keys:
                    raise ValueError(
                        f"param group {i} has unknown key {key!r}; allowed: 'params', "
                        + ", ".join(map(repr, self.defaults))
                    )
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.param_groups = groups
        flat = self._params()
        for k, p in enumerate(flat):
            check_array(f"params[{k}]", p, writeable=True, low_precision=True)
            check_same_kind(f"params[{k}]", p, "params[0]", flat[0])
        check_disjoint({f"params[{k}]": p for k, p in enumerate(flat)})
        if backend is not None:  # an explicitly named backend must be usable now, not at the first step
            dispatch.resolve(backend, flat[0])
        if any(precision.is_low(dtype_of(p)) for p in flat):  # 16-bit parameters: a host backend that takes them
            precision.mixed_module(dispatch.resolve(backend, flat[0]), backend or dispatch.default_backend(flat[0]))
        if any(self.precision.compact(p) for p in flat):
            precision.compact_module(dispatch.resolve(backend, flat[0]), backend or dispatch.default_backend(flat[0]),
                                     state_dtype, any(precision.is_low(dtype_of(p)) for p in flat))
            for k, p in enumerate(flat):
                if self.precision.compact(p):
                    precision.check_compact_param(f"params[{k}]", p, state_dtype)
        for i, group in enumerate(groups):
            self._check_compact(i, self._check_group(i, group, 0)[0])
        self.state: list[dict] = [{"step": 0} for _ in flat]
        self._layout = None  # see _grads_plainly_fine
        self._bucket_cache: dict[int, tuple] = {}  # see _buckets

    # -- hooks -------------------------------------------------------------------------------

    def _hyper(self, group: dict) -> dict:
        """The keywords of the spec's check function, read from one param group."""
        return {key: group[key] for key in self.defaults}

    def _initial_value(self, name: str, group: dict) -> float:
        """The value a state array starts at (zeros unless the optimizer says otherwise)."""
        return 0.0

    # -- machinery ---------------------------------------------------------------------------

    def _params(self) -> list:
        return [p for group in self.param_groups for p in group["params"]]

    def _check_group(self, index: int, group: dict, k: int) -> tuple[dict, object]:
        """The group's validated backend keywords, with a schedule ``lr`` evaluated at step k, and
        its ``functional.HostOptions`` (None when maximize, dampening and lr_decay are off)."""
        try:
            hyper = self._hyper(group)
            host = {key: group[key] for key in self._host_keys if key in group}
            for key in host:
                hyper.pop(key, None)
            if callable(hyper.get("lr")):
                lr = hyper["lr"](k)
                try:
                    hyper["lr"] = check_real("lr", lr, low=0.0)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"the lr schedule returned a bad value at k={k}: {exc}") from None
            checked = SPECS[self._spec].check(**hyper, convention=self.convention)
            return checked, check_host_options(self._spec, checked, **host)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param group {index}: {exc}") from None
        except KeyError as exc:
            raise ValueError(f"param group {index} lacks hyperparameter {exc}") from None

    def _check_compact(self, index: int, hyper: dict) -> None:
        """With ``state_dtype="int8"`` or ``"bfloat16"``: the group's configuration must have such
        state, if any of its parameters gets it."""
        if self.precision.state_dtype == "float32":
            return
        params = self.param_groups[index]["params"]
        if any(self.precision.compact(p) for p in params):
            module = dispatch.resolve(self.backend, params[0])
            spec = SPECS[self._spec]
            precision.check_compact(module, spec.kernel, dict(hyper, step=1) if spec.step_count else hyper, index,
                                    self.precision.state_dtype)

    def _selected(self, groups) -> list[int]:
        if groups is None:
            return list(range(len(self.param_groups)))
        if isinstance(groups, (str, bytes)) or not hasattr(groups, "__iter__"):
            raise TypeError(f"groups must be a list of param-group indices or None, got {type(groups).__name__}")
        selected = list(groups)
        if not selected:
            raise ValueError("groups must name at least one param group, got an empty list")
        for i in selected:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"groups must hold int indices, got {type(i).__name__} {i!r}")
            if not 0 <= i < len(self.param_groups):
                raise ValueError(f"groups holds {i}, but the optimizer has param groups 0..{len(self.param_groups) - 1}")
        if len(set(selected)) != len(selected):
            raise ValueError(f"groups must not repeat an index, got {selected}")
        return sorted(int(i) for i in selected)

    def _avg_weight(self, avg_steps: int) -> float:
        return polyak_weight(self.polyak, avg_steps)

    def step(self, grads, *, grad_scale=None, groups=None) -> None:
        """Update the parameters in place from ``grads``, aligned with the parameters in group
        order. Everything is checked before anything is written.

        ``grad_scale=s`` divides every gradient by s inside the fused pass (loss scaling; the
        norm for ``clip_grad_norm`` is that of the unscaled gradients). ``groups=[i, ...]`` updates
        only those param groups (block coordinate descent); the gradients of the other groups are
        ignored and may be ``None``, and their parameters and state are not touched.

        With ``comm=`` this is a collective: every rank calls it with its own gradients, which are
        summed (``grad_reduce="sum"``) or averaged (``"mean"``) over the ranks (docs/distributed.md).
        """
        if self._dist is not None:  # with comm=: reduce over the ranks, then update (collective)
            return self._dist.step(grads, grad_scale=grad_scale, groups=groups)
        return self._step_local(grads, grad_scale=grad_scale, groups=groups)

    def grad_buffers(self) -> list:
        """With ``comm=``: one view per parameter (group order) of a flat gradient buffer per dtype.
        Write the gradients into them and pass this list to ``step``: the collectives then run on
        that memory, with no packing copy."""
        if self._dist is None:
            raise RuntimeError("grad_buffers() needs an optimizer built with comm=")
        return self._dist.grad_buffers()

    def _step_local(self, grads, *, grad_scale=None, groups=None) -> None:
        """The single-process step (``step`` without ``comm=``)."""
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
        selected = self._selected(groups)
        inv_scale = 1.0
        if grad_scale is not None:
            inv_scale = 1.0 / check_real("grad_scale", grad_scale, low=0.0, low_open=True)
            if not math.isfinite(inv_scale) or inv_scale == 0.0:
                raise ValueError(f"grad_scale must have a finite nonzero reciprocal, got {grad_scale!r}")
        first = [0]
        for group in self.param_groups:
            first.append(first[-1] + len(group["params"]))
        plan = []
        for i in selected:
            hyper, host = self._check_group(i, self.param_groups[i], self.steps)
            self._check_compact(i, hyper)
            plan.append((i, self.param_groups[i], hyper, host, spec.uses(hyper)))
        ranges = [(first[i], first[i + 1]) for i in selected]
        if not self._grads_plainly_fine(params, grads, ranges):
            self._check_arrays(spec, params, grads, [k for lo, hi in ranges for k in range(lo, hi)])
        module = dispatch.resolve(self.backend, params[0])
        grad_mul = inv_scale
        if self.clip_grad_norm is not None or self.nonfinite != "propagate":
            stepped = [k for lo, hi in ranges for k in range(lo, hi)]
            sumsq = precision.sumsq(module, [grads[k] for k in stepped])
            if self.nonfinite != "propagate" and not math.isfinite(_host_float(module, sumsq)):
                if self.nonfinite == "skip":
                    self.skipped_steps += 1
                    return
                bad = next(k for k in stepped if not math.isfinite(_host_float(module, precision.sumsq(module, [grads[k]]))))
                raise FloatingPointError(f"grads[{bad}] contains NaN or Inf (nonfinite='raise'); nothing was updated")
            if self.clip_grad_norm is not None:
                grad_mul = _Multipliers(module, sumsq, self.clip_grad_norm, inv_scale)
        grad_clip = math.inf if self.clip_grad_value is None else self.clip_grad_value
        for i, group, hyper, host, used in plan:
            self._update_group(module, spec, i, group, range(first[i], first[i + 1]), params, grads, hyper, used,
                               grad_mul, grad_clip, host)
        self.steps += 1

    def _check_arrays(self, spec, params, grads, stepped) -> None:
        """Every check of the step's arrays, with the error messages of ``fastopt._checks``."""
        written, read = {}, {}
        for k in stepped:
            param, grad = params[k], grads[k]
            check_array(f"params[{k}]", param, writeable=True, low_precision=True)
            precision.check_grad(f"grads[{k}]", grad, f"params[{k}]", param)
            read[f"grads[{k}]"] = grad
        for k, param in enumerate(params):
            written[f"params[{k}]"] = param
            for name, value in self.state[k].items():
                if name not in self._counters:
                    written[f"state[{k}][{name!r}]"] = value
        check_disjoint(written, read)

    def _grads_plainly_fine(self, params, grads, ranges) -> bool:
        """A fast test that passes only when ``_check_arrays`` would: for every k in the index
        ``ranges``, grads[k] a NumPy array alike params[k] whose bytes meet no parameter or state
        array (compiled, a few ns per gradient: ``grads_match``). False sends the step through the
        full checks (which then raise, or pass)."""
        layout = self._layout
        if layout is None or len(layout[0]) != len(params) or not all(map(operator.is_, params, layout[0])):
            layout = self._layout = self._make_layout(params)
        if layout[1] is None:
            return False
        grads_match, intervals = layout[1]
        return all(grads_match(params, grads, lo, hi, intervals) for lo, hi in ranges)

    def _make_layout(self, params):
        """(params, (``grads_match``, the sorted byte intervals of the parameter and state arrays),
        or None when some is not a NumPy array), rebuilt when the parameters or the state arrays
        change. The parameters are checked again here: the layout is what lets later steps skip
        those checks."""
        written = {}
        for k, p in enumerate(params):
            check_array(f"params[{k}]", p, writeable=True, low_precision=True)
            check_same_kind(f"params[{k}]", p, "params[0]", params[0])
            written[f"params[{k}]"] = p
            for name, value in self.state[k].items():
                if name not in self._counters:
                    written[f"state[{k}][{name!r}]"] = value
        check_disjoint(written)
        arrays = [a for a in written.values() if a is not None]
        if not all(type(a) is np.ndarray for a in arrays):
            return (list(params), None)
        try:  # the compiled object reader loads with the "numba" backend, not with fastopt
            from .kernels.numba_cpu.multi import grads_match, written_intervals
        except ImportError:
            return (list(params), None)
        return (list(params), (grads_match, written_intervals(arrays)))

    def _update_group(self, module, spec, i, group, indices, params, grads, hyper, used, grad_mul, grad_clip,
                      host=None):
        """One fused pass per tensor, batched: tensors that share dtype, step and averaging count go
        to the backend's ``multi_step`` together. ``host`` (``functional.HostOptions``) turns
        maximize, dampening and lr_decay into the kernels' scalars for the bucket's step."""
        for ks, dtype, plist, states, avgs in self._buckets(module, spec, i, group, indices, params, used):
            first = self.state[ks[0]]
            keywords = dict(hyper)
            if spec.step_count:
                keywords["step"] = first["step"] + 1
            keywords["grad_mul"] = grad_mul if isinstance(grad_mul, float) else grad_mul[dtype]
            keywords["grad_clip"] = grad_clip
            if avgs is not None:
                keywords["avg_weight"] = self._avg_weight(first["avg_steps"] + 1)
            keywords = with_host_options(module, host, keywords, first["step"] + 1,
                                         lambda multiplier: _host_float(module, multiplier))
            if precision.is_low(dtype) or self.precision.compact(plist[0]):
                self._low_precision_update(module, spec, ks, plist, [grads[k] for k in ks], states, avgs, keywords)
            elif len(ks) == 1:
                getattr(module, spec.kernel)(plist[0], grads[ks[0]], *states[0],
                                             avg=None if avgs is None else avgs[0], **keywords)
            else:
                module.multi_step(spec.kernel, plist, [grads[k] for k in ks], states, avgs, **keywords)
            for k in ks:
                state = self.state[k]
                state["step"] += 1
                if avgs is not None:
                    state["avg_steps"] += 1

    def _low_precision_update(self, module, spec, ks, plist, grads, states, avgs, keywords) -> None:
        """One bucket of 16-bit parameters or of 8-bit state (``fastopt.precision``): the
        backend's ``state8_step`` (8-bit state, float32 or 16-bit parameters) or ``mixed_step``,
        with the float32 master copies or the rounding of 16-bit parameters themselves."""
        options = self.precision
        low = precision.is_low(dtype_of(plist[0]))
        extra = {}
        if low:
            masters = [self.state[k]["master"] for k in ks] if options.master(dtype_of(plist[0])) else None
            extra = dict(masters=masters, rounding=options.rounding, seed=options.seed,
                         counter=self.state[ks[0]]["step"] + 1, indices=ks)
        if options.compact(plist[0]):
            if options.state_dtype != "int8":
                extra["state_dtype"] = options.state_dtype
            module.state8_step(spec.kernel, plist, grads, states, avgs, block=precision.BLOCK, **extra, **keywords)
        else:
            masters = extra.pop("masters")
            precision.mixed_module(module, self.backend).mixed_step(
                spec.kernel, plist, grads, masters, states, avgs, **extra, **keywords)

    def _buckets(self, module, spec, i, group, indices, params, used) -> list:
        """The group's tensors bucketed by (dtype, step, avg_steps), with their state arrays
        (created here on first use). Cached until the layout changes: tensors of a bucket are
        always stepped together, so their counts stay equal."""
        cached = self._bucket_cache.get(i)
        members = [params[k] for k in indices]
        if (cached is not None and cached[0] == used and len(cached[1]) == len(members)
                and all(map(operator.is_, members, cached[1]))):
            return cached[2]
        keyed: dict[tuple, list[int]] = {}
        for k in indices:
            param, state = params[k], self.state[k]
            compact = self.precision.compact(param)
            signed = {}
            if compact:
                hyper = self._check_group(i, group, self.steps)[0]
                layout = module.state8_layout(spec.kernel, **(dict(hyper, step=1) if spec.step_count else hyper))
                signed = {spec.state[slot]: sign for slot, sign in layout}
            for name in used:
                if name not in state:
                    value = self._initial_value(name, group)
                    if name in signed and self.precision.state_dtype == "bfloat16":
                        state[name] = precision.bfloat16_state(module, param, value)
                    elif name in signed:
                        state[name], state[name + precision.ABSMAX] = precision.quantized_state(
                            module, param, value, signed[name])
                    else:
                        state[name] = precision.state_array(module, param, value)
            if self.precision.master(dtype_of(param)) and "master" not in state:
                state["master"] = precision.master_copy(module, param)
            if self.polyak is not None and "avg" not in state:
                # θ̂ starts at the first averaged iterate; a zero start makes the first lerp exact
                state["avg"] = precision.state_array(module, param, 0.0)
                state["avg_steps"] = 0
            keyed.setdefault((dtype_of(param), state["step"], state.get("avg_steps", 0), compact), []).append(k)
        buckets = [
            (ks, key[0], [params[k] for k in ks],
             [tuple(self._state_entry(self.state[k], name) for name in spec.state) for k in ks],
             [self.state[k]["avg"] for k in ks] if self.polyak is not None else None)
            for key, ks in keyed.items()
        ]
        self._layout = None  # state arrays may be new: the next step rebuilds the layout
        self._bucket_cache[i] = (used, members, buckets)
        return buckets

    @staticmethod
    def _state_entry(state: dict, name: str):
        """A state array as the backend takes it: the array, or (codes, absmax) when quantized."""
        if name + precision.ABSMAX in state:
            return (state[name], state[name + precision.ABSMAX])
        return state.get(name)

    def averaged_params(self) -> list:
        """The Polyak averages θ̂, one per parameter in group order (the parameter itself for one
        that has not been stepped yet). Requires ``polyak``. Sharded (``comm=``): a collective."""
        if self.polyak is None:
            raise RuntimeError("averaged_params() needs polyak averaging: build the optimizer with polyak='mean' or a float alpha")
        if self._dist is not None and self._dist.sharded:
            return self._dist.averaged_params()
        return [state.get("avg", param) for state, param in zip(self.state, self._params())]

    def state_dict(self) -> dict:
        """A copy of the hyperparameters and state; ``load_state_dict`` restores it exactly.

        State arrays are NumPy copies, also for parameters on a GPU (copied to the host, which
        waits for the device). Sharded (``comm=``): this rank's slice and where it sits
        (``fastopt.distributed.state``)."""
        if self._dist is not None:
            return self._dist.state_dict(self._state_dict_local())
        return self._state_dict_local()

    def _state_dict_local(self) -> dict:
        module = dispatch.resolve(self.backend, self._params()[0])
        groups, k = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**{key: group[key] for key in (*self.defaults, *self._host_keys) if key in group},
                           "params": list(range(k, k + n))})
            k += n
        state = {
            k: {name: (value if name in self._counters else precision.host_array(module, value))
                for name, value in s.items()}
            for k, s in enumerate(self.state)
        }
        return {"optimizer": type(self).__name__, "convention": self.convention,
                "steps": self.steps, "skipped_steps": self.skipped_steps,
                "param_groups": groups, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters and state saved by ``state_dict``; checks everything first.
        With ``comm=`` (a collective) it also reshards (``fastopt.distributed.state``)."""
        if self._dist is not None:
            return self._dist.load_state_dict(state_dict, self._load_state_dict_local)
        return self._load_state_dict_local(state_dict)

    def _load_state_dict_local(self, state_dict: dict) -> None:
        spec = SPECS[self._spec]
        if not isinstance(state_dict, dict) or not {"param_groups", "state"} <= state_dict.keys():
            raise TypeError("state_dict must be a dict with 'param_groups' and 'state', as state_dict() returns")
        if state_dict.get("optimizer", type(self).__name__) != type(self).__name__:
            raise ValueError(f"state_dict is for {state_dict['optimizer']}, not {type(self).__name__}")
        if state_dict.get("convention", self.convention) != self.convention:
            raise ValueError(f"state_dict has convention {state_dict['convention']!r}, this optimizer {self.convention!r}")
        steps = state_dict.get("steps", 0)
        skipped = state_dict.get("skipped_steps", 0)
        for name, value in (("steps", steps), ("skipped_steps", skipped)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"state_dict[{name!r}] must be an int >= 0, got {value!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer {len(self.param_groups)}")
        new_groups = []
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(f"state_dict param group {i} has {len(saved.get('params', ()))} params, "
                                 f"this optimizer {len(group['params'])}")
            unknown = set(saved) - set(self.defaults) - set(self._host_keys) - {"params"}
            if unknown:
                raise ValueError(f"state_dict param group {i} has unknown keys {sorted(unknown)}")
            new_group = {**group, **{key: saved[key] for key in (*self.defaults, *self._host_keys) if key in saved}}
            self._check_group(i, new_group, steps)
            new_groups.append(new_group)
        params = self._params()
        module = dispatch.resolve(self.backend, params[0])
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
            if "avg" in entry:
                avg_steps = entry.get("avg_steps")
                if isinstance(avg_steps, bool) or not isinstance(avg_steps, numbers.Integral) or avg_steps < 0:
                    raise ValueError(f"state_dict state[{k}]['avg_steps'] must be an int >= 0, got {avg_steps!r}")
                restored["avg_steps"] = int(avg_steps)
            elif "avg_steps" in entry:
                raise ValueError(f"state_dict state[{k}] has 'avg_steps' but no 'avg'")
            for name, value in entry.items():
                if name in ("step", "avg_steps"):
                    continue
                low = precision.is_low(dtype_of(param))
                eight_bit = self.precision.compact(param) and self.precision.state_dtype == "int8"
                bf16_state = self.precision.state_dtype == "bfloat16"
                absmax = tuple(n + precision.ABSMAX for n in spec.state) if eight_bit else ()
                if name not in (*spec.state, "avg", *(("master",) if low else ()), *absmax):
                    raise ValueError(f"state_dict state[{k}] has unknown entry {name!r}; expected {spec.state}"
                                     + (" (with float32 state: saved with state_dtype='int8'?)"
                                        if name.endswith(precision.ABSMAX) else ""))
                if not isinstance(value, np.ndarray):
                    raise TypeError(f"state_dict state[{k}][{name!r}] must be a numpy.ndarray, got {type(value).__name__}")
                # a 16-bit parameter's state is float32; an 8-bit state is uint8 codes and float32 absmax
                wanted, shape = (np.dtype(np.float32) if low else dtype_of(param)), shape_of(param)
                if name in absmax:
                    wanted, shape = np.dtype(np.float32), (-(-int(np.prod(shape)) // precision.BLOCK),)
                elif bf16_state and name in spec.state:
                    wanted = precision.bfloat16_dtype()
                elif name + precision.ABSMAX in absmax and name != "avg":
                    if name + precision.ABSMAX not in entry:
                        raise ValueError(f"state_dict state[{k}][{name!r}] is float32 state, but this optimizer keeps "
                                         f"it in 8 bits (state_dtype='int8'): its codes and {name + precision.ABSMAX!r}")
                    wanted = np.dtype(np.uint8)
                if shape_of(value) != shape or dtype_of(value) != wanted:
                    hint = " (saved with state_dtype='int8'?)" if value.dtype == np.uint8 else ""
                    raise ValueError(f"state_dict state[{k}][{name!r}] must have shape {shape} and dtype "
                                     f"{wanted}, got ({value.shape}, {value.dtype}){hint}")
                if wanted == precision.bfloat16_dtype():
                    restored[name] = precision.device_bfloat16(module, np.ascontiguousarray(value), param)
                else:
                    restored[name] = module.from_numpy(np.ascontiguousarray(value), param)
            new_state.append(restored)
        self.param_groups = new_groups
        self.state = new_state
        self._layout = None
        self._bucket_cache = {}
        self.steps = int(steps)
        self.skipped_steps = int(skipped)


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    Textbook: v ← αv − εg; θ ← θ + v (Nesterov, look-ahead form: θ ← θ + αv − εg).
    Torch: b ← αb + g; θ ← θ − εb (Nesterov: θ ← θ − ε(g + αb)). State: ``velocity``.
    ``maximize`` ascends (g ← −g); ``dampening`` τ adds (1 − τ)(g + λθ) to the velocity from each
    parameter's second step on (torch's rule; not with Nesterov).
    """

    _spec = "sgd"

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, *,
                 convention="textbook", backend=None, maximize=False, dampening=0.0, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      maximize=maximize, dampening=dampening),
                         convention=convention, backend=backend, **options)


class AdaGrad(Optimizer):
    """AdaGrad: r ← r + g⊙g; θ ← θ − εg/(δ + √r). State: ``accumulator``. ``maximize`` ascends
    (g ← −g); ``lr_decay`` uses ε/(1 + (t − 1)·lr_decay) at a parameter's t-th step (torch's rule)."""

    _spec = "adagrad"

    def __init__(self, params, lr, eps=1e-7, initial_accumulator_value=0.0, weight_decay=0.0, *,
                 convention="textbook", backend=None, maximize=False, lr_decay=0.0, **options):
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value,
                                      weight_decay=weight_decay, maximize=maximize, lr_decay=lr_decay),
                         convention=convention, backend=backend, **options)

    def _hyper(self, group):
        check_real("initial_accumulator_value", group["initial_accumulator_value"], low=0.0)
        return {key: group[key] for key in ("lr", "eps", "weight_decay")}

    def _initial_value(self, name, group):
        return float(group["initial_accumulator_value"])


class RMSProp(Optimizer):
    """RMSProp, optionally centered, with momentum or (textbook only) Nesterov momentum.

    r ← ρr + (1−ρ)g⊙g; textbook θ ← θ − εg/√(δ + r), torch θ ← θ − εg/(√r + δ).
    State: ``square_avg``, ``grad_avg`` (centered), ``velocity`` (momentum).
    """

    _spec = "rmsprop"

    def __init__(self, params, lr, rho=0.9, eps=1e-6, momentum=0.0, nesterov=False, centered=False,
                 weight_decay=0.0, *, convention="textbook", backend=None, maximize=False, **options):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, momentum=momentum, nesterov=nesterov,
                                      centered=centered, weight_decay=weight_decay, maximize=maximize),
                         convention=convention, backend=backend, **options)


class AdaDelta(Optimizer):
    """AdaDelta: r ← ρr + (1−ρ)g⊙g; Δ ← √(u+δ)/√(r+δ)⊙g; θ ← θ − εΔ; u ← ρu + (1−ρ)(εΔ)²
    (torch: (1−ρ)Δ²). State: ``square_avg``, ``acc_delta``."""

    _spec = "adadelta"

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, *, convention="textbook",
                 backend=None, maximize=False, **options):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize),
                         convention=convention, backend=backend, **options)


class Adam(Optimizer):
    """Adam with bias correction, optional AMSGrad and L2 weight decay. State: ``m``, ``v``,
    ``v_max`` (amsgrad) and the per-parameter ``step``."""

    _spec = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 convention="textbook", backend=None, maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize),
                         convention=convention, backend=backend, **options)

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
                 convention="textbook", backend=None, maximize=False, **options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         convention=convention, backend=backend, maximize=maximize, **options)


class DeltaBarDelta(Optimizer):
    """Delta-bar-delta: per-parameter rates e (initially ``lr``) and gradient average δ̄.

    θ ← θ − e⊙g; e ← e + κ where δ̄⊙g > 0, e ← e − φe where δ̄⊙g < 0; δ̄ ← (1−γ)g + γδ̄.
    ``lr`` is only the initial rate: changing a group's ``lr`` after its first step changes
    nothing, since from then on each element's rate is state. Textbook convention only.
    """

    _spec = "delta_bar_delta"

    def __init__(self, params, lr, kappa, phi, gamma, *, convention="textbook", backend=None, **options):
        super().__init__(params, dict(lr=lr, kappa=kappa, phi=phi, gamma=gamma),
                         convention=convention, backend=backend, **options)

    def _hyper(self, group):
        if callable(group["lr"]):
            raise TypeError("lr must be a real number for DeltaBarDelta: it is only the initial per-element "
                            "rate, so a schedule cannot apply")
        check_real("lr", group["lr"], low=0.0)
        return {key: group[key] for key in ("kappa", "phi", "gamma")}

    def _initial_value(self, name, group):
        return float(group["lr"]) if name == "rates" else 0.0
