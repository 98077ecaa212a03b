"""Verification: every kernel on every available backend against the float64 reference.

``run`` (behind ``fastopt verify``) draws fresh random inputs, runs each operation on a backend in
float32 or float64 for several sizes and several steps, and compares every output with
``fastopt.reference`` run in float64 on the same inputs. At each step the reference starts from a
float64 copy of the backend's current state (parameters, optimizer state, running statistics),
so each step's error is measured on its own and float32 rounding cannot accumulate into a drift.

Error measure, per element, with the dtype's tolerance (rtol, atol):

    e = |actual − reference| / (|reference| + s·atol/rtol)

with s the root mean square of the output's finite reference values: a relative error whose
denominator never falls below s·atol/rtol, so values near zero are judged on their absolute error
measured against the size of the data (a fixed atol would pass any value of a state that is
itself smaller than atol, such as AdaDelta's accumulated squared steps). An element passes when
e ≤ rtol, i.e. |actual − reference| ≤ s·atol + rtol·|reference| (the test suite's rule). NaN or a
wrong shape or dtype is an infinite error.
The reported error of an (operation, backend, dtype) row is the largest e over its cases, sizes,
steps and outputs.

Low precision (``LOW_PRECISION``, rows beside float32 and float64): ``bfloat16`` and ``float16``
run each optimizer case on 16-bit parameters with float32 master weights (the backend's
``mixed_step``): the master copy and the state are compared with the float64 reference as float32
outputs are, and the parameter must be its master copy rounded to nearest, exactly. ``int8-state``
runs float32 parameters with 8-bit state (``state8_step``) against the reference's
``state8_step``, which defines the quantized update (dequantize, update, requantize): codes and
absmax exactly, the parameter within the float32 tolerance; the cases without 8-bit state are left
out of those rows.

The cases: ``OPTIMIZER_CASES`` (each optimizer's configurations: momentum, Nesterov, centered,
weight decay, AMSGrad, both conventions) and ``BATCHNORM_CASES`` (training and eval, with and
without the fused ReLU and the affine parameters, channels first and last). Batch-norm outputs are
NaN-filled before the kernel runs, so an element it leaves unwritten fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from . import dispatch, functional
from . import reference as ref
from .batchnorm import batchnorm_backward, batchnorm_forward

__all__ = ["BATCHNORM_CASES", "DTYPES", "LOW_PRECISION", "OPS", "OPTIMIZER_CASES", "TOLERANCE", "Result", "run"]

LOW_PRECISION = ("bfloat16", "float16", "int8-state")  # optimizer rows only
DTYPES = ("float32", "float64") + LOW_PRECISION

# (rtol, atol) by kind of operation and dtype. Optimizer updates are element-wise: a few roundings
# per element. Batch normalization reduces over the batch (means, variances, gradient sums) and its
# backward subtracts nearly equal terms, so it gets a looser float32 bound.
TOLERANCE: dict[str, dict[str, tuple[float, float]]] = {
    "optimizer": {"float32": (2e-5, 2e-6), "float64": (1e-12, 1e-14),
                  **{name: (2e-5, 2e-6) for name in LOW_PRECISION}},  # their float32 outputs
    "batchnorm": {"float32": (1e-4, 1e-5), "float64": (1e-11, 1e-13)},
}

OPTIMIZER_CASES: list[tuple[str, dict]] = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, convention="torch")),
    ("adagrad", dict(lr=0.1)),
    ("adagrad", dict(lr=0.1, eps=1e-3, weight_decay=0.01)),
    ("rmsprop", dict(lr=0.01)),
    ("rmsprop", dict(lr=0.01, momentum=0.9, nesterov=True)),
    ("rmsprop", dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.01)),
    ("rmsprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01, convention="torch")),
    ("adadelta", dict()),
    ("adadelta", dict(lr=0.5, weight_decay=0.01)),
    ("adadelta", dict(lr=0.5, convention="torch")),
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=1e-2, weight_decay=0.01, amsgrad=True)),
    ("adamw", dict(lr=1e-2)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("delta_bar_delta", dict(kappa=1e-3, phi=0.1, gamma=0.7)),
]

# (shape, channel_axis, training, relu, affine)
BATCHNORM_CASES: list[tuple[tuple, int, bool, bool, bool]] = [
    (shape, axis, training, relu, affine)
    for shape, axis in [((32, 16), 1), ((8, 6, 5, 7), 1), ((4, 9, 11), -1), ((16, 8, 24, 24), 1)]
    for training in (True, False)
    for relu in (False, True)
    for affine in (True, False)
    if affine or not relu
]

OPTIMIZER_SIZES = [(0,), (1,), (7,), (1000,), (65537,), (3, 5, 7)]
OPTIMIZER_STEPS = 5
BATCHNORM_STEPS = 3

OPS = tuple(dict.fromkeys(name for name, _ in OPTIMIZER_CASES)) + ("batchnorm_forward", "batchnorm_backward")


def _kind(op: str) -> str:
    return "batchnorm" if op.startswith("batchnorm") else "optimizer"


@dataclass
class Result:
    """One row of the table: the worst error of an operation on a backend in a dtype."""

    op: str
    backend: str
    dtype: str
    rtol: float
    atol: float
    error: float = 0.0
    checks: int = 0  # outputs compared
    worst: str = ""  # where the largest error was
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def record(self, what: str, actual, expected, dtype=None) -> None:
        """Compare one output (host arrays; of ``dtype``, by default the row's) and keep the worst error."""
        self.checks += 1
        actual = np.asarray(actual)
        expected = np.asarray(expected, dtype=np.float64)
        if actual.shape != expected.shape:
            e, detail = math.inf, f"shape {actual.shape} != {expected.shape}"
        elif actual.dtype != np.dtype(dtype or self.dtype):
            e, detail = math.inf, f"dtype {actual.dtype} != {np.dtype(dtype or self.dtype)}"
        elif actual.size == 0:
            e, detail = 0.0, ""
        else:
            finite = expected[np.isfinite(expected)]
            scale = float(np.sqrt(np.mean(finite * finite))) if finite.size else 0.0
            floor = scale * self.atol / self.rtol
            with np.errstate(invalid="ignore", divide="ignore"):
                err = np.abs(actual.astype(np.float64) - expected) / (np.abs(expected) + floor)
            err = np.where(actual.astype(np.float64) == expected, 0.0, err)  # exact (0 = 0, inf = inf)
            err = np.where(np.isnan(err), np.inf, err)
            i = np.unravel_index(np.argmax(err), err.shape)
            e = float(err[i])
            index = ", ".join(str(int(k)) for k in i)
            detail = f"at [{index}]: {float(actual[i]):.9g} vs reference {float(expected[i]):.17g}"
        if e >= self.error:
            self.error, self.worst = e, f"{what} {detail}".strip()
        if not e <= self.rtol:
            self.failures.append(f"{what}: relative error {e:.3g} > {self.rtol:g} {detail}".strip())


# ---------------------------------------------------------------------------------------------
# moving arrays to a backend's device and back


def _upload(backend: str) -> Callable[[np.ndarray], object]:
    if backend == "cupy":
        import cupy

        return cupy.asarray
    if backend == "numba-cuda":
        from numba import cuda

        return cuda.to_device
    return lambda a: a


def _download(backend: str) -> Callable[[object], np.ndarray]:
    if backend in ("numpy", "numba"):
        return np.asarray
    # a GPU backend module provides to_numpy (docs/backends.md); resolve finds the module
    return dispatch.resolve(backend, _upload(backend)(np.zeros(1))).to_numpy


# ---------------------------------------------------------------------------------------------
# optimizers


def _optimizer_initial_state(name: str, shape, dtype) -> dict:
    spec = functional.SPECS[name]
    state = {s: np.zeros(shape, dtype) for s in spec.state}
    if name == "adagrad":
        state["accumulator"][...] = 0.1
    if name == "delta_bar_delta":
        state["rates"][...] = 0.01
    return state


def _verify_optimizer(result: Result, name: str, hyper: dict, rng: np.random.Generator) -> None:
    spec = functional.SPECS[name]
    step_fn = getattr(functional, f"{name}_step")
    ref_fn = getattr(ref, spec.kernel)
    ref_hyper = spec.check(**hyper)
    used = spec.uses(ref_hyper)
    dtype = np.dtype(result.dtype)
    up, down = _upload(result.backend), _download(result.backend)
    label = name + "".join(f" {k}={v}" for k, v in hyper.items())
    for shape in OPTIMIZER_SIZES:
        host_param = rng.standard_normal(shape).astype(dtype)
        param = up(host_param)
        state = {k: up(v) for k, v in _optimizer_initial_state(name, shape, dtype).items()}
        for t in range(1, OPTIMIZER_STEPS + 1):
            grad = rng.standard_normal(shape).astype(dtype)
            if hyper.get("weight_decay"):
                # g with θ's sign, so g + λθ never cancels to ~δ, where δ-sensitive updates would
                # measure the rounding of the inputs rather than the kernel
                grad = np.copysign(grad, down(param))
            expected = down(param).astype(np.float64)
            expected_state = {k: down(v).astype(np.float64) for k, v in state.items()}
            step_kw = {"step": t} if spec.step_count else {}
            ref_fn(expected, grad.astype(np.float64), *(expected_state[k] for k in spec.state),
                   **ref_hyper, **step_kw)
            step_fn(param, up(grad), **{k: state[k] for k in spec.state}, **hyper, **step_kw,
                    backend=result.backend)
            where = f"{label}, shape {shape}, step {t}"
            result.record(f"{where}: param", down(param), expected)
            for k in used:
                result.record(f"{where}: {k}", down(state[k]), expected_state[k])


def _low_precision_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _verify_mixed(result: Result, name: str, hyper: dict, rng: np.random.Generator) -> None:
    """16-bit parameters with master weights: the backend's ``mixed_step`` step by step against
    the float64 reference started from the backend's master copy and state."""
    spec = functional.SPECS[name]
    ref_fn = getattr(ref, spec.kernel)
    checked = spec.check(**hyper)
    used = spec.uses(checked)
    module = dispatch.resolve(result.backend, _upload(result.backend)(np.zeros(1, np.float32)))
    dtype = _low_precision_dtype(result.dtype)
    up, down = _upload(result.backend), _download(result.backend)
    label = name + "".join(f" {k}={v}" for k, v in hyper.items())
    for shape in OPTIMIZER_SIZES:
        host = rng.standard_normal(shape).astype(dtype)
        param, master = up(host), up(host.astype(np.float32))
        state = {k: up(v) for k, v in _optimizer_initial_state(name, shape, np.float32).items()}
        for t in range(1, OPTIMIZER_STEPS + 1):
            grad = rng.standard_normal(shape).astype(dtype)
            expected = down(master).astype(np.float64)
            expected_state = {k: down(v).astype(np.float64) for k, v in state.items()}
            step_kw = {"step": t} if spec.step_count else {}
            ref_fn(expected, grad.astype(np.float64), *(expected_state[k] for k in spec.state), **checked, **step_kw)
            module.mixed_step(spec.kernel, [param], [up(grad)], [master], [tuple(state[k] for k in spec.state)],
                              None, **checked, **step_kw)
            where = f"{label}, shape {shape}, step {t}"
            result.record(f"{where}: master", down(master), expected, np.float32)
            rounded = ref.lowp.round_nearest(down(master), dtype)
            result.record(f"{where}: param = master rounded to nearest", down(param), rounded.astype(np.float64),
                          dtype)
            for k in used:
                result.record(f"{where}: {k}", down(state[k]), expected_state[k], np.float32)


def _verify_state8(result: Result, name: str, hyper: dict, rng: np.random.Generator) -> None:
    """Float32 parameters with 8-bit state: the backend's ``state8_step`` against the reference's."""
    spec = functional.SPECS[name]
    checked = spec.check(**hyper)
    module = dispatch.resolve(result.backend, _upload(result.backend)(np.zeros(1, np.float32)))
    up, down = _upload(result.backend), _download(result.backend)
    label = name + "".join(f" {k}={v}" for k, v in hyper.items())
    for shape in OPTIMIZER_SIZES:
        keywords = dict(checked, step=1) if spec.step_count else dict(checked)
        layout = ref.state8_layout(spec.kernel, **keywords)
        n = int(np.prod(shape))
        host = rng.standard_normal(shape).astype(np.float32)
        ref_param, param = host.copy(), up(host)
        ref_states, states = [None] * len(spec.state), [None] * len(spec.state)
        for slot, signed in layout:
            codes, absmax = np.empty(shape, np.uint8), np.empty(-(-n // 256), np.float32)
            value = 0.1 if name == "adagrad" else 0.0
            ref.quantize_blockwise(np.full(shape, value, np.float32), codes, absmax, signed=signed, block=256)
            ref_states[slot] = (codes, absmax)
            states[slot] = (up(codes.copy()), up(absmax.copy()))
        for t in range(1, OPTIMIZER_STEPS + 1):
            grad = rng.standard_normal(shape).astype(np.float32)
            keywords = dict(checked, step=t) if spec.step_count else dict(checked)
            ref.state8_step(spec.kernel, [ref_param], [grad], [tuple(ref_states)], None, **keywords)
            module.state8_step(spec.kernel, [param], [up(grad)], [tuple(states)], None, **keywords)
            where = f"{label}, shape {shape}, step {t}"
            result.record(f"{where}: param", down(param), ref_param.astype(np.float64), np.float32)
            for slot, _ in layout:
                name_k = spec.state[slot]
                result.record(f"{where}: {name_k} codes", down(states[slot][0]), ref_states[slot][0], np.uint8)
                result.record(f"{where}: {name_k} absmax", down(states[slot][1]), ref_states[slot][1], np.float32)


# ---------------------------------------------------------------------------------------------
# batch normalization


def _channel_view(vector: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(vector, dtype=np.float64).reshape(shape)


def _away_from_kink(x, weight, bias, running_mean, running_var, axis, dtype, rng, eps=1e-5):
    """Redraw the elements of x whose pre-activation (with batch or running statistics) lies
    within rounding distance of the ReLU's kink, where float32 and float64 may disagree on the
    mask. Returns x (a new array)."""
    x = x.copy()
    ndim = x.ndim
    axes = tuple(a for a in range(ndim) if a != axis)
    margin = 1e-4 if dtype == np.float32 else 1e-9
    gamma = _channel_view(np.ones(x.shape[axis]) if weight is None else weight, ndim, axis)
    beta = _channel_view(np.zeros(x.shape[axis]) if bias is None else bias, ndim, axis)
    for _ in range(100):
        x64 = x.astype(np.float64)
        mean = x64.mean(axis=axes, keepdims=True)
        invstd = 1.0 / np.sqrt(x64.var(axis=axes, keepdims=True) + eps)
        pre_train = gamma * (x64 - mean) * invstd + beta
        pre_eval = (gamma * (x64 - _channel_view(running_mean, ndim, axis))
                    / np.sqrt(_channel_view(running_var, ndim, axis) + eps) + beta)
        close = (np.abs(pre_train) < margin) | (np.abs(pre_eval) < margin)
        if not close.any():
            return x
        x[close] = (x[close] + rng.uniform(0.1, 0.5, close.sum()) * rng.choice([-1, 1], close.sum())).astype(dtype)
    raise RuntimeError("could not draw batch-norm inputs away from the ReLU kink")


def _verify_batchnorm(result: Result, case, rng: np.random.Generator) -> None:
    shape, axis, training, relu, affine = case
    backend, dtype = result.backend, np.dtype(result.dtype)
    up, down = _upload(backend), _download(backend)
    ndim = len(shape)
    axis %= ndim
    channels = shape[axis]
    forward = result.op == "batchnorm_forward"
    label = (f"{'training' if training else 'eval'}{' relu' if relu else ''}{'' if affine else ' no-affine'} "
             f"shape {shape} channel_axis {axis if axis != ndim - 1 else -1}")
    offset = rng.normal(0.0, 1.0, channels)
    spread = rng.uniform(0.5, 2.0, channels)
    weight = (rng.choice([-1.0, 1.0], channels) * rng.uniform(0.5, 1.5, channels)).astype(dtype) if affine else None
    bias = rng.normal(0.0, 0.5, channels).astype(dtype) if affine else None
    running_mean = (offset + rng.normal(0.0, 0.3, channels)).astype(dtype)
    running_var = (spread**2 * rng.uniform(0.7, 1.3, channels)).astype(dtype)
    dev = {"weight": None if weight is None else up(weight), "bias": None if bias is None else up(bias),
           "running_mean": up(running_mean), "running_var": up(running_var)}
    f64 = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731

    def poisoned():
        """NaN-filled outputs (full-size, per-channel, per-channel): an unwritten element fails."""
        return (up(np.full(shape, np.nan, dtype)), up(np.full(channels, np.nan, dtype)),
                up(np.full(channels, np.nan, dtype)))
    for t in range(1, BATCHNORM_STEPS + 1):
        x = (rng.standard_normal(shape) * _channel_view(spread, ndim, axis)
             + _channel_view(offset, ndim, axis)).astype(dtype)
        rm, rv = down(dev["running_mean"]), down(dev["running_var"])
        if relu:
            x = _away_from_kink(x, weight, bias, rm, rv, axis, dtype, rng)
        dy = rng.standard_normal(shape).astype(dtype)
        where = f"{label}, step {t}"
        if forward:
            exp_rm, exp_rv = f64(rm), f64(rv)
            exp = ref.batchnorm_forward  # the reference in float64, outputs allocated here
            y64, mean64, invstd64 = np.empty(shape), np.empty(channels), np.empty(channels)
            exp(f64(x), f64(weight), f64(bias), exp_rm, exp_rv, y64, mean64, invstd64, training=training,
                momentum=0.1, eps=1e-5, channel_axis=axis, relu=relu)
            y, mean, invstd = batchnorm_forward(up(x), dev["weight"], dev["bias"], dev["running_mean"],
                                                dev["running_var"], training=training, channel_axis=axis,
                                                relu=relu, backend=backend, out=poisoned())
            result.record(f"{where}: y", down(y), y64)
            result.record(f"{where}: saved_mean", down(mean), mean64)
            result.record(f"{where}: saved_invstd", down(invstd), invstd64)
            result.record(f"{where}: running_mean", down(dev["running_mean"]), exp_rm)
            result.record(f"{where}: running_var", down(dev["running_var"]), exp_rv)
        else:
            # the statistics backward reads come from the backend's own forward, in the dtype
            _, mean, invstd = batchnorm_forward(up(x), dev["weight"], dev["bias"], dev["running_mean"],
                                                dev["running_var"], training=training, channel_axis=axis,
                                                relu=relu, backend=backend)
            dx64, dw64, db64 = np.empty(shape), np.empty(channels), np.empty(channels)
            ref.batchnorm_backward(f64(dy), f64(x), f64(weight), f64(bias), f64(down(mean)), f64(down(invstd)),
                                   dx64, dw64, db64, training=training, channel_axis=axis, relu=relu)
            dx, dw, db = batchnorm_backward(up(dy), up(x), dev["weight"], mean, invstd, bias=dev["bias"],
                                            training=training, channel_axis=axis, relu=relu, backend=backend,
                                            out=poisoned())
            result.record(f"{where}: dx", down(dx), dx64)
            result.record(f"{where}: dweight", down(dw), dw64)
            result.record(f"{where}: dbias", down(db), db64)


# ---------------------------------------------------------------------------------------------
# the driver


def cases(op: str, dtype: str = "float32") -> list:
    """The cases ``run`` checks for ``op`` in ``dtype`` (a row of ``DTYPES``)."""
    if op in ("batchnorm_forward", "batchnorm_backward"):
        return list(BATCHNORM_CASES) if dtype not in LOW_PRECISION else []
    found = [hyper for name, hyper in OPTIMIZER_CASES if name == op]
    if dtype == "int8-state":
        spec = functional.SPECS[op]

        def supported(hyper):
            checked = spec.check(**hyper)
            return ref.state8_supported(spec.kernel, **(dict(checked, step=1) if spec.step_count else checked)) is None

        found = [hyper for hyper in found if supported(hyper)]
    return found


def plan(backends: list[str], ops: list[str], dtypes: list[str]) -> Iterator[tuple[str, str, str]]:
    """The (op, backend, dtype) rows that have cases; a backend without 16-bit parameters or 8-bit
    state (``mixed_step``/``state8_step``) has no such rows."""
    for op in ops:
        for backend in backends:
            for dtype in dtypes:
                if not cases(op, dtype):
                    continue
                if dtype in LOW_PRECISION:
                    needed = "state8_step" if dtype == "int8-state" else "mixed_step"
                    module = dispatch.resolve(backend, _upload(backend)(np.zeros(1, np.float32)))
                    if not hasattr(module, needed):
                        continue
                yield op, backend, dtype


def run(backends: list[str], ops: list[str] | None = None, dtypes: list[str] | None = None, *,
        rng: np.random.Generator, on_case: Callable[[], None] | None = None) -> list[Result]:
    """Verify ``ops`` (default: all of ``OPS``) on each of ``backends`` (names that must be
    available) in each of ``dtypes`` (default: float32 and float64). ``on_case`` is called after
    every case (for a progress bar). Returns one ``Result`` per (op, backend, dtype)."""
    ops = list(OPS) if ops is None else ops
    dtypes = list(DTYPES) if dtypes is None else dtypes
    results = []
    for op, backend, dtype in plan(backends, ops, dtypes):
        rtol, atol = TOLERANCE[_kind(op)][dtype]
        result = Result(op, backend, dtype, rtol, atol)
        for case in cases(op, dtype):
            try:
                if _kind(op) == "batchnorm":
                    _verify_batchnorm(result, case, rng)
                elif dtype == "int8-state":
                    _verify_state8(result, op, case, rng)
                elif dtype in LOW_PRECISION:
                    _verify_mixed(result, op, case, rng)
                else:
                    _verify_optimizer(result, op, case, rng)
            except Exception as exc:  # noqa: BLE001 - a backend that raises fails its row, with the reason
                result.error = math.inf
                result.failures.append(f"{op} {case}: raised {type(exc).__name__}: {exc}")
            if on_case is not None:
                on_case()
        results.append(result)
    return results


def case_count(ops: list[str], backends: list[str], dtypes: list[str]) -> int:
    return sum(len(cases(op, dtype)) for op, _, dtype in plan(backends, ops, dtypes))
