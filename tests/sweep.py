"""A seeded sweep of every optimizer configuration at randomized, non-default hyperparameters.

Used by ``tests/test_sweep_optim.py`` (the ``"numpy"`` and ``"numba"`` backends) and by
``tests/cudasim/test_sweep.py`` (``"numba-cuda"`` under the simulator). Each case is one
optimizer variant (operation, convention, the switches nesterov/centered/amsgrad, momentum on or
off) with every hyperparameter it takes drawn away from its default, stepped several times with the
learning rate changed between steps, through the public API:

* ``run_functional``: ``fastopt.functional.<op>_step`` on one tensor with state arrays that start
  as after some training (non-zero, so ρ, β and friends matter from the first step);
* ``run_optimizer``: the optimizer class on two param groups with their own hyperparameters
  (three tensors, so the tensor-list kernel runs), optionally with every training-step extra
  (``clip_grad_norm``, ``clip_grad_value``, a Polyak EMA).

Each step is compared with the ``"numpy"`` backend in float64, started from float64 copies of the
backend's current state (so a float32 run cannot drift away from its comparison).

**Every drawn value must matter.** At every step the float64 reference is also run with one value
replaced: each hyperparameter by its default (``lr`` by the previous step's value), each switch
flipped, the convention swapped. A replacement must move some checked array beyond the tolerance at
one step at least; otherwise the sweep fails, since a kernel that ignored that value would have
passed. This is what makes the sweep able to catch a kernel that hard-codes ρ = 0.9. torch's
options are drawn too (``maximize`` on or off, SGD's ``dampening``, AdaGrad's ``lr_decay``): the
reference implements them from their equations and the kernels get them lowered to their scalars
(``functional.with_host_options``), so the sweep checks the lowering on every backend.

State arrays the configuration does not use hold random values and must come back bit for bit.
"""

from __future__ import annotations

import inspect
import math
import zlib

import numpy as np

import fastopt
from fastopt import functional

from conftest import assert_close, tolerance

STEPS = 4

# (operation, convention, switches); momentum is drawn > 0 where "momentum" or "nesterov" is on.
VARIANTS: list[tuple[str, str, tuple[str, ...]]] = (
    [("sgd", c, m) for c in ("textbook", "torch") for m in ((), ("momentum",), ("momentum", "nesterov"))]
    + [("adagrad", c, ()) for c in ("textbook", "torch")]
    + [("rmsprop", "textbook", ctr + m) for ctr in ((), ("centered",))
       for m in ((), ("momentum",), ("momentum", "nesterov"))]
    + [("rmsprop", "torch", ctr + m) for ctr in ((), ("centered",)) for m in ((), ("momentum",))]
    + [("adadelta", c, ()) for c in ("textbook", "torch")]
    + [(op, c, a) for op in ("adam", "adamw") for c in ("textbook", "torch") for a in ((), ("amsgrad",))]
    + [("delta_bar_delta", "textbook", ())]
)

CLASSES = {"sgd": "SGD", "adagrad": "AdaGrad", "rmsprop": "RMSProp", "adadelta": "AdaDelta", "adam": "Adam",
           "adamw": "AdamW", "delta_bar_delta": "DeltaBarDelta"}

# Ranges the values are drawn from: away from the defaults and from the usual hard-coded constants
# (0.9, 0.99, 0.999, 1e-8), and large enough to move the result beyond the float32 tolerance.
UNIFORM = {
    "momentum": (0.3, 0.8),
    "weight_decay": (0.05, 0.3),
    "rho": (0.5, 0.8),
    "beta1": (0.5, 0.85),
    "beta2": (0.9, 0.98),
    "kappa": (2e-3, 1e-2),
    "phi": (0.1, 0.5),
    "gamma": (0.3, 0.8),
}
LOG_UNIFORM = {  # eps per operation: where δ competes with √r, √v or √u of the data below
    ("eps", "adagrad"): (1e-2, 1e-1),
    ("eps", "rmsprop"): (1e-2, 1e-1),
    ("eps", "adadelta"): (1e-4, 1e-2),
    ("eps", "adam"): (1e-2, 1e-1),
    ("eps", "adamw"): (1e-2, 1e-1),
}
LR = {"sgd": (0.02, 0.2), "adagrad": (0.01, 0.1), "rmsprop": (1e-3, 1e-2), "adadelta": (0.2, 0.8),
      "adam": (1e-3, 1e-2), "adamw": (1e-3, 1e-2), "delta_bar_delta": (0.005, 0.05)}


def case_id(variant) -> str:
    op, convention, switches = variant
    return "-".join((op, convention, *switches)) if switches else f"{op}-{convention}-plain"


def case_rng(*parts) -> np.random.Generator:
    """A generator seeded from the test's parameters, so every run draws the same values and a
    failure replays exactly."""
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


def _log_uniform(rng, low, high) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def draw_lr(op, rng) -> float:
    return float(rng.uniform(*LR[op]))


def draw_hyper(variant, rng) -> dict:
    """The functional keywords of ``variant`` except ``lr``, each drawn away from its default;
    with torch's options (``functional.HOST_OPTIONS``): ``maximize`` on or off at random,
    SGD's ``dampening`` with plain momentum, AdaGrad's ``lr_decay``."""
    op, convention, switches = variant
    names = [n for n in inspect.signature(functional.SPECS[op].check).parameters if n not in ("lr", "convention")]
    hyper = {"convention": convention}
    host = functional.HOST_OPTIONS.get(op, ())
    if "maximize" in host:
        hyper["maximize"] = bool(rng.integers(2))
    if "dampening" in host and "momentum" in switches and "nesterov" not in switches:
        hyper["dampening"] = float(rng.uniform(0.2, 0.7))
    if "lr_decay" in host:
        hyper["lr_decay"] = float(rng.uniform(0.1, 0.5))
    for name in names:
        if name in ("nesterov", "centered", "amsgrad"):
            hyper[name] = name in switches
        elif name == "momentum":
            hyper[name] = float(rng.uniform(*UNIFORM[name])) if "momentum" in switches else 0.0
        elif name in UNIFORM:
            hyper[name] = float(rng.uniform(*UNIFORM[name]))
        else:
            hyper[name] = _log_uniform(rng, *LOG_UNIFORM[(name, op)])
    return hyper


def defaults(op) -> dict:
    """Each functional keyword's default (``lr`` excluded: it is compared with the previous lr)."""
    params = inspect.signature(getattr(functional, f"{op}_step")).parameters
    return {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}


def _alternatives(op, hyper: dict, previous_lr: float | None) -> dict:
    """name -> the keywords with that one value replaced (default, flipped, swapped); only the
    replacements that are valid configurations."""
    out = {}
    base = defaults(op)
    for name, value in hyper.items():
        if name == "lr":
            if previous_lr is None:
                continue
            other = previous_lr
        elif name == "step":
            other = 1 if value != 1 else 2  # a kernel that ignores t (bias correction at t = 1)
        elif name == "convention":
            if op in ("adagrad", "adam", "adamw", "delta_bar_delta") or (op == "sgd" and not hyper["momentum"]):
                continue  # the same update under both conventions, by design
            other = "torch" if value == "textbook" else "textbook"
        elif isinstance(value, bool):
            other = not value
        elif name == "momentum" and value == 0.0:
            continue  # "momentum off" is a variant of its own
        elif name not in base:
            other = 0.0  # required (delta-bar-delta's κ, φ, γ): a kernel that drops the term
        else:
            other = base[name]
            if name == "weight_decay" and other == value:
                other = 0.0
        changed = dict(hyper, **{name: other})
        try:
            checked = functional.SPECS[op].check(**_algorithm_keywords(op, changed))
            functional.check_host_options(op, checked, **_host_keywords(op, changed))
        except ValueError:
            continue  # e.g. nesterov with the torch convention of RMSProp
        out[name] = changed
    return out


def _host_keywords(op, hyper: dict) -> dict:
    """torch's options among ``hyper``."""
    return {k: v for k, v in hyper.items() if k in functional.HOST_OPTIONS.get(op, ())}


def _algorithm_keywords(op, hyper: dict) -> dict:
    """``hyper`` without the step count and torch's options: what ``SPECS[op].check`` takes."""
    return {k: v for k, v in hyper.items() if k != "step" and k not in functional.HOST_OPTIONS.get(op, ())}


# ---------------------------------------------------------------------------------------------
# initial state and gradients


def _initial_state(op, shape, dtype, rng) -> dict:
    """State arrays as after some training: accumulators positive, averages non-zero."""
    u = lambda lo, hi: rng.uniform(lo, hi, shape)  # noqa: E731
    n = lambda s: s * rng.standard_normal(shape)  # noqa: E731
    state = {
        "sgd": lambda: {"velocity": n(0.1)},
        "adagrad": lambda: {"accumulator": u(0.1, 1.0)},
        "rmsprop": lambda: {"square_avg": u(0.05, 0.5), "grad_avg": n(0.1), "velocity": n(0.01)},
        "adadelta": lambda: {"square_avg": u(0.05, 0.5), "acc_delta": u(1e-4, 1e-2)},
        "adam": lambda: {"m": n(0.1), "v": u(1e-3, 0.1), "v_max": u(1e-3, 0.2)},
        "adamw": lambda: {"m": n(0.1), "v": u(1e-3, 0.1), "v_max": u(1e-3, 0.2)},
        "delta_bar_delta": lambda: {"rates": u(0.005, 0.05), "delta_bar": n(0.5)},
    }[op]()
    if op == "rmsprop":
        state["square_avg"] += state["grad_avg"] ** 2  # r − s ⊙ s > 0, as in a real run
    return {k: v.astype(dtype) for k, v in state.items()}


def _grad(rng, param, hyper):
    grad = rng.standard_normal(param.shape).astype(param.dtype)
    if hyper.get("weight_decay"):  # g + λθ never cancels (see tests/test_optim_backends.py); −g with maximize
        grad = np.copysign(grad, -param if hyper.get("maximize") else param)
    return grad


def _close(a: np.ndarray, b: np.ndarray, dtype) -> bool:
    return bool(np.allclose(a, b, equal_nan=True, **tolerance(b, dtype)))


class Sensitivity:
    """Which replaced values moved some checked array beyond the tolerance, over all steps."""

    def __init__(self):
        self.tried: set[str] = set()
        self.mattered: set[str] = set()

    def record(self, name: str, expected: dict, replaced: dict, dtype) -> None:
        """``expected`` and ``replaced``: array name -> float64 array, compared on common names."""
        self.tried.add(name)
        if any(not _close(replaced[k], expected[k], dtype) for k in expected.keys() & replaced.keys()):
            self.mattered.add(name)

    def check(self, what: str) -> None:
        idle = sorted(self.tried - self.mattered)
        assert not idle, (f"{what}: replacing {idle} by the default (lr: by the previous step's; switches: "
                          f"flipped) never moved the reference beyond the tolerance, so a kernel ignoring "
                          f"them would pass; draw values that matter")


# ---------------------------------------------------------------------------------------------
# the functional API


def run_functional(variant, backend: str, dtype, *, shape=(5003,), steps=STEPS, to_dev=lambda a: a,
                   to_host=lambda a: a, seed=0) -> None:
    op, convention, switches = variant
    rng = case_rng("functional", case_id(variant), np.dtype(dtype).name, seed)
    spec = functional.SPECS[op]
    step_fn = getattr(functional, f"{op}_step")
    hyper = draw_hyper(variant, rng)
    used = spec.uses(spec.check(**_algorithm_keywords(op, hyper), **({} if op == "delta_bar_delta" else {"lr": 1.0})))
    first_step = int(rng.integers(1, 20))

    param = rng.standard_normal(shape).astype(dtype)
    state = _initial_state(op, shape, dtype, rng)
    unused = {k: v.copy() for k, v in state.items() if k not in used}
    d_param, d_state = to_dev(param), {k: to_dev(v) for k, v in state.items()}
    sensitivity = Sensitivity()
    lr = None
    for t in range(first_step, first_step + steps):
        previous_lr, lr = lr, draw_lr(op, rng)
        keywords = dict(hyper) if op == "delta_bar_delta" else dict(hyper, lr=lr)
        if spec.step_count or "dampening" in hyper or "lr_decay" in hyper:
            keywords["step"] = t
        grad = _grad(rng, to_host(d_param), hyper)
        start_param = to_host(d_param).astype(np.float64)
        start_state = {k: to_host(v).astype(np.float64) for k, v in d_state.items()}

        def reference(kw):
            p, s = start_param.copy(), {k: v.copy() for k, v in start_state.items()}
            step_fn(p, grad.astype(np.float64), **s, **kw, backend="numpy")
            return {"param": p, **{k: s[k] for k in used}}

        expected = reference(keywords)
        for name, changed in _alternatives(op, keywords, previous_lr).items():
            sensitivity.record(name, expected, reference(changed), dtype)

        d_grad = to_dev(grad)
        step_fn(d_param, d_grad, **d_state, **keywords, backend=backend)

        np.testing.assert_array_equal(to_host(d_grad), grad, err_msg="the gradient was modified")
        assert_close(to_host(d_param), expected["param"], dtype, f"param after step {t} ({keywords})",
                     before=start_param)
        for k in used:
            assert_close(to_host(d_state[k]), expected[k], dtype, f"{k} after step {t} ({keywords})",
                         before=start_state[k])
        for k, before in unused.items():
            np.testing.assert_array_equal(to_host(d_state[k]), before,
                                          err_msg=f"{k} is unused with {keywords} but was written")
    sensitivity.check(f"{case_id(variant)} {hyper}")


# ---------------------------------------------------------------------------------------------
# the optimizer classes


GROUP_SHAPES = [[(2003,)], [(3, 67), (1,)]]  # group 0: one tensor; group 1: two


def _class_keywords(op, hyper: dict, lr: float, rng) -> dict:
    """Functional keywords -> the class's group keywords (betas, AdaGrad's initial value, DBD's
    initial rate)."""
    kw = {k: v for k, v in hyper.items() if k != "convention"}
    if "beta1" in kw:
        kw["betas"] = (kw.pop("beta1"), kw.pop("beta2"))
    if op == "adagrad":
        kw["initial_accumulator_value"] = float(rng.uniform(0.05, 0.5))
    kw["lr"] = lr
    return kw


def _class_alternatives(op, convention, group: dict, previous_lr) -> dict:
    """name -> the group's keywords with that one value replaced (the convention is the
    optimizer's, not a group's: it is swapped only in the functional sweep)."""
    flat = {k: v for k, v in group.items() if k not in ("params", "betas")}
    if "betas" in group:
        flat["beta1"], flat["beta2"] = group["betas"]
    extra = {k: flat.pop(k) for k in ("initial_accumulator_value",) if k in flat}
    out = {}
    if op == "delta_bar_delta":
        rate = flat.pop("lr")
        out["lr (initial rate)"] = dict(group, lr=2 * rate)
        previous_lr = None
    for name, changed in _alternatives(op, dict(flat, convention=convention), previous_lr).items():
        if name == "convention" or (name == "amsgrad" and not flat["amsgrad"]):
            # amsgrad switched on at a state without v_max starts v_max at 0: max(0, v) = v
            continue
        new = {k: v for k, v in changed.items() if k != "convention"}
        if "beta1" in new:
            new["betas"] = (new.pop("beta1"), new.pop("beta2"))
        if op == "delta_bar_delta":
            new["lr"] = group["lr"]
        out[name] = dict(group, **new, **extra)
    if extra:
        out["initial_accumulator_value"] = dict(group, initial_accumulator_value=0.0)
    return out


def _state64(opt) -> dict:
    """The optimizer's state in float64, without the groups' hyperparameters (the reference
    optimizers bring their own)."""
    sd = opt.state_dict()
    sd["param_groups"] = [{"params": g["params"]} for g in sd["param_groups"]]
    for entry in sd["state"].values():
        for k, v in entry.items():
            if isinstance(v, np.ndarray):
                entry[k] = v.astype(np.float64)
    return sd


EXTRAS = ("clip_grad_norm", "clip_grad_value", "polyak")


def run_optimizer(variant, backend: str, dtype, *, extras=(), to_dev=lambda a: a, to_host=lambda a: a,
                  group_shapes=GROUP_SHAPES, steps=STEPS, seed=0) -> None:
    op, convention, switches = variant
    rng = case_rng("optimizer", case_id(variant), np.dtype(dtype).name, bool(extras), seed)
    cls = getattr(fastopt, CLASSES[op])
    hypers = [draw_hyper(variant, rng) for _ in group_shapes]
    groups_host = [[rng.standard_normal(s).astype(dtype) for s in shapes] for shapes in group_shapes]
    size = sum(p.size for g in groups_host for p in g)
    # ``extras``: names from EXTRAS. Norm clipping scales the step's gradients to 0.3-0.8 of their
    # norm, value clipping then clamps their tails; the EMA weight is away from 0 and 1.
    drawn = dict(clip_grad_norm=float(rng.uniform(0.3, 0.8)) * math.sqrt(size),
                 clip_grad_value=float(rng.uniform(0.5, 1.0)), polyak=float(rng.uniform(0.3, 0.8)))
    options = {name: drawn[name] for name in extras}
    lrs = [draw_lr(op, rng) for _ in group_shapes]
    spec_groups = [dict(params=[to_dev(p) for p in g], **_class_keywords(op, h, lr, rng))
                   for g, h, lr in zip(groups_host, hypers, lrs)]
    # the constructor's defaults are group 0's values (lr, κ, φ, γ are required); each group
    # carries its own values anyway
    first = {k: v for k, v in spec_groups[0].items() if k != "params"}
    opt = cls(spec_groups, **first, convention=convention, backend=backend, **options)

    def ref_opt(groups_kw, opts):
        params64 = [[to_host(p).astype(np.float64) for p in g["params"]] for g in opt.param_groups]
        groups = [dict({k: v for k, v in gk.items() if k != "params"}, params=p) for gk, p in zip(groups_kw, params64)]
        return cls(groups, **first, convention=convention, backend="numpy", **opts)

    sensitivity = Sensitivity()
    previous = [None] * len(group_shapes)
    for t in range(steps):
        if t and op != "delta_bar_delta":  # DBD's lr is only the initial rate
            for i, group in enumerate(opt.param_groups):
                previous[i] = group["lr"]
                group["lr"] = draw_lr(op, rng)
        grads = [_grad(rng, to_host(p), h) for g, h in zip(opt.param_groups, hypers) for p in g["params"]]
        saved = _state64(opt)
        params_before = [to_host(p).astype(np.float64) for p in opt._params()]
        group_kw = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

        def reference(groups_kw, opts):
            ref = ref_opt(groups_kw, opts)
            ref.load_state_dict(saved)
            ref.step([g.astype(np.float64) for g in grads])
            out = {f"params[{k}]": p for k, p in enumerate(ref._params())}
            for k, entry in enumerate(ref.state):
                out.update({f"state[{k}][{n}]": v for n, v in entry.items() if isinstance(v, np.ndarray)})
            return out, ref

        expected, ref = reference(group_kw, options)
        for i, group in enumerate(group_kw):
            for name, changed in _class_alternatives(op, convention, group, previous[i]).items():
                replaced = [changed if j == i else g for j, g in enumerate(group_kw)]
                sensitivity.record(f"group {i} {name}", expected, reference(replaced, options)[0], dtype)
        for name in options:
            sensitivity.record(name, expected, reference(group_kw, dict(options, **{name: None}))[0], dtype)

        d_grads = [to_dev(g) for g in grads]
        opt.step(d_grads)

        for k, (p, e) in enumerate(zip(opt._params(), ref._params())):
            assert_close(to_host(p), e, dtype, f"params[{k}] after step {t + 1}", before=params_before[k])
        for k, (entry, ref_entry) in enumerate(zip(opt.state, ref.state)):
            assert entry.keys() == ref_entry.keys(), f"state[{k}] holds {sorted(entry)}, the reference {sorted(ref_entry)}"
            for name, value in ref_entry.items():
                if isinstance(value, np.ndarray):
                    assert_close(to_host(entry[name]), value, dtype, f"state[{k}][{name!r}] after step {t + 1}",
                                 before=saved["state"].get(k, {}).get(name))
                else:
                    assert entry[name] == value, f"state[{k}][{name!r}] after step {t + 1}"
        for g, grad in zip(d_grads, grads):
            np.testing.assert_array_equal(to_host(g), grad, err_msg="a gradient was modified")
    sensitivity.check(f"{case_id(variant)} {hypers} {options}")
