"""The benchmark cases: what each row runs, how it is verified, and what it is compared with.

A ``Case`` names a row and knows how to ``build`` it for a backend: allocate the inputs, and return
a ``Prepared`` with the timed call, its verification against the NumPy reference on the same
inputs, the reference's own call (timed for the speed-up), torch's fastest equivalent where torch
is installed, and the compulsory traffic (``traffic``). The command line (``fastopt bench``) and the
pytest-benchmark suites in ``bench/`` both build their rows from ``all_cases()``, so they time
exactly the same calls.

Rows:

* ``optimizer``: one step of each optimizer configuration over one array of ``n`` elements
  (``convention="torch"`` where torch has the optimizer, so torch runs the same update).
* ``batchnorm``: forward (training, eval) and backward (training) of an (N, C, H, W) input, in
  NCHW (``channel_axis=1``) and NHWC (``channel_axis=-1``, torch's channels_last) layouts; ``out=``
  preallocated; torch is ``torch.nn.functional.batch_norm`` and autograd through it.
* ``many-tensors``: an Adam step over ResNet-50's 161 parameter tensors (with, timed alongside, a
  step over one tensor of the same total size), and over 200 tensors of 1,000 elements (3.2 MB of
  data, cache-resident: timed as blocks of back-to-back steps, and also cold, see ``Prepared``).
* ``training-step``: clip-by-global-norm + AdamW + EMA (``fastopt.AdamW(..., clip_grad_norm=1.0,
  polyak=0.999)``) against ``clip_grad_norm_(foreach=True)`` + ``AdamW(fused=True)`` +
  ``torch._foreach_lerp_``; skipped, with the reason, while ``AdamW`` does not take those keywords.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import fastopt

from . import traffic as _traffic
from .verify import VerificationError, compare

__all__ = ["Case", "Prepared", "Settings", "Skip", "all_cases", "resnet50_shapes"]


class Skip(Exception):
    """A row that cannot run here; the message says why."""


@dataclass
class Settings:
    """Sizes and environment shared by every case of one run."""

    n: int = 2**24  # elements of the single-tensor optimizer rows
    bn_shape: tuple[int, int, int, int] = (64, 64, 56, 56)  # N, C, H, W
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    seed: int = 0
    torch: object = None  # the torch module, or None
    torch_reason: str = "torch is not installed"  # why torch is None
    full_size_many_tensors: bool = True  # False: scale the many-tensor rows down (tests)


@dataclass
class Prepared:
    """One row, built for one backend, ready to verify and time."""

    run: Callable[[], object]  # the timed call
    verify: Callable[[], None]  # kernel vs reference on the same inputs; raises VerificationError
    traffic: Callable[[], _traffic.Traffic]  # after verify (counts the state the step allocated)
    elements: int
    reference: Callable[[], object] | None = None  # the NumPy reference on equal inputs
    torch: Callable[[], object] | None = None
    torch_impl: str | None = None
    torch_reason: str | None = None  # why there is no torch column
    torch_check: Callable[[], None] | None = None  # torch vs kernel; raises VerificationError
    baseline: Callable[[], object] | None = None  # timed alongside (many-tensors: one big tensor)
    baseline_label: str | None = None
    baseline_competes: bool = False  # the baseline is another library's step: noted as "its ms: speed-up"
    info: dict = field(default_factory=dict)
    # A row whose data fits in the last-level cache measures a per-call cost, not bandwidth: every
    # contestant is timed as blocks of ``calls_per_sample`` calls back to back (a training loop's
    # steady state), and, with ``time_cold``, the kernel also as single calls right after the STREAM
    # kernel has evicted the caches.
    calls_per_sample: int = 1
    time_cold: bool = False


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    description: str
    build: Callable[[Settings, str], Prepared]
    quick: bool = False  # part of ``--quick``


# ---------------------------------------------------------------------------------------------
# helpers


def _rng(settings: Settings, salt: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, salt])


def _normal(rng, shape, dtype, scale=1.0, loc=0.0) -> np.ndarray:
    a = rng.standard_normal(shape, dtype=np.float64 if dtype == np.float64 else np.float32)
    if scale != 1.0:
        a *= scale
    if loc:
        a += loc
    return a


def _state_arrays(opt, index: int = 0) -> dict[str, np.ndarray]:
    return {k: v for k, v in opt.state[index].items() if isinstance(v, np.ndarray)}


def _compare_optimizers(label: str, params, ref_params, opt, ref) -> None:
    for k, (p, r) in enumerate(zip(params, ref_params)):
        compare(f"{label}: params[{k}]", p, r)
        ours, theirs = _state_arrays(opt, k), _state_arrays(ref, k)
        if sorted(ours) != sorted(theirs):
            raise VerificationError(f"{label}: state[{k}] holds {sorted(ours)}, the reference's {sorted(theirs)}")
        for name in ours:
            compare(f"{label}: state[{k}][{name!r}]", ours[name], theirs[name])


def _full_size_state(opt, size: int) -> int:
    return sum(1 for v in opt.state[0].values() if isinstance(v, np.ndarray) and v.size == size)


def _torch_dtype(torch, dtype):
    return getattr(torch, np.dtype(dtype).name)


def _torch_optimizer(torch, name: str, kwargs: dict, tensors, dtype):
    """torch's fastest CPU implementation of optimizer ``name``: fused where it has one, else foreach."""
    cls = getattr(torch.optim, name)
    for impl in ("fused", "foreach"):
        probe = torch.zeros(8, dtype=_torch_dtype(torch, dtype))
        probe.grad = torch.ones_like(probe)
        try:
            cls([probe], **kwargs, **{impl: True}).step()
        except (RuntimeError, TypeError, ValueError):
            continue  # no such implementation of this optimizer on the CPU
        return cls(tensors, **kwargs, **{impl: True}), impl
    return cls(tensors, **kwargs), "for-loop"


# ---------------------------------------------------------------------------------------------
# optimizer steps

# (name, fastopt class, kwargs, torch class or None, torch kwargs, in --quick)
OPTIMIZERS = [
    ("sgd", "SGD", dict(lr=0.01), "SGD", dict(lr=0.01), True),
    ("sgd-momentum", "SGD", dict(lr=0.01, momentum=0.9), "SGD", dict(lr=0.01, momentum=0.9), True),
    ("sgd-nesterov", "SGD", dict(lr=0.01, momentum=0.9, nesterov=True), "SGD",
     dict(lr=0.01, momentum=0.9, nesterov=True), False),
    ("adagrad", "AdaGrad", dict(lr=0.01), "Adagrad", dict(lr=0.01, eps=1e-7), False),
    ("rmsprop", "RMSProp", dict(lr=0.01), "RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-6), False),
    ("rmsprop-centered-momentum", "RMSProp", dict(lr=0.01, momentum=0.9, centered=True), "RMSprop",
     dict(lr=0.01, alpha=0.9, eps=1e-6, momentum=0.9, centered=True), False),
    ("adadelta", "AdaDelta", dict(lr=1.0), "Adadelta", dict(lr=1.0, rho=0.9, eps=1e-6), False),
    ("adam", "Adam", dict(lr=1e-3), "Adam", dict(lr=1e-3), True),
    ("adam-amsgrad", "Adam", dict(lr=1e-3, amsgrad=True), "Adam", dict(lr=1e-3, amsgrad=True), False),
    ("adamw", "AdamW", dict(lr=1e-3), "AdamW", dict(lr=1e-3), True),
    ("delta-bar-delta", "DeltaBarDelta", dict(lr=1e-3, kappa=1e-4, phi=0.1, gamma=0.7), None, None, False),
]


def _optimizer_builder(name, cls_name, kwargs, torch_name, torch_kwargs):
    def build(settings: Settings, backend: str) -> Prepared:
        dtype, n = settings.dtype, settings.n
        rng = _rng(settings, 1)
        p0 = _normal(rng, n, dtype)
        g = _normal(rng, n, dtype, scale=0.1)
        cls = getattr(fastopt, cls_name)
        conv = {} if torch_name is None else {"convention": "torch"}  # the update torch computes
        p = p0.copy()
        opt = cls([p], **kwargs, **conv, backend=backend)
        p_ref = p0.copy()
        ref = cls([p_ref], **kwargs, **conv, backend="numpy")
        after = {}

        def run():
            opt.step([g])

        def reference():
            ref.step([g])

        def verify():
            for _ in range(2):  # two steps: the second reads the state the first wrote
                run()
                reference()
            _compare_optimizers(name, [p], [p_ref], opt, ref)
            if prepared.torch is not None:
                after["p"] = p.copy()

        prepared = Prepared(run=run, verify=verify, elements=n, reference=reference,
                            traffic=lambda: _traffic.optimizer(_full_size_state(opt, n), dtype.itemsize))
        torch = settings.torch
        if torch_name is None:
            prepared.torch_reason = "torch has no such optimizer"
        elif torch is None:
            prepared.torch_reason = settings.torch_reason
        else:
            tp = torch.from_numpy(p0.copy())
            tp.grad = torch.from_numpy(g)  # only read
            topt, impl = _torch_optimizer(torch, torch_name, torch_kwargs, [tp], dtype)
            prepared.torch, prepared.torch_impl = topt.step, impl

            def torch_check():
                for _ in range(2):
                    topt.step()
                compare(f"{name}: torch.optim.{torch_name}({impl}) param vs fastopt", tp.numpy(), after["p"],
                        loose=10.0)

            prepared.torch_check = torch_check
        return prepared

    return build


# ---------------------------------------------------------------------------------------------
# low precision: 8-bit state, 16-bit parameters (fastopt.precision)

# (name, fastopt keywords, parameter dtype name, torch's comparison: its parameter dtype)
LOW_PRECISION = [
    ("adam-8bit-state", dict(state_dtype="int8"), "float32", "float32"),
    ("adam-bf16-master", dict(), "bfloat16", "bfloat16"),
    ("adam-bf16-stochastic", dict(master_weights=False, rounding="stochastic"), "bfloat16", "bfloat16"),
]


def _codes_apart(a, b) -> int:
    def line(x):
        bits = x.view(np.uint16).astype(np.int64)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)
    return int(np.max(np.abs(line(a) - line(b)), initial=0))


def _bitsandbytes_baseline(prepared: Prepared, torch, p0, g) -> None:
    """bitsandbytes' ``Adam8bit`` on the CPU, timed alongside where it is installed (the row's
    note says so where it is not)."""
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001 - any failure to import means: no such column
        prepared.info["note"] = f"bitsandbytes not installed ({type(exc).__name__})"
        return
    tp = torch.from_numpy(p0.copy())
    tp.grad = torch.from_numpy(g)
    bnb = bitsandbytes.optim.Adam8bit([tp], lr=1e-3, min_8bit_size=4096)
    bnb.step()  # creates its state
    prepared.baseline, prepared.baseline_label, prepared.baseline_competes = bnb.step, "bitsandbytes Adam8bit", True


def _low_precision_builder(name, options, dtype_name, torch_dtype_name):
    def build(settings: Settings, backend: str) -> Prepared:
        n = settings.n
        if settings.dtype != np.float32:
            raise Skip("the low-precision rows run with --dtype float32 (their own dtypes are fixed)")
        dtype = np.dtype(np.float32) if dtype_name == "float32" else np.dtype(getattr(__import__("ml_dtypes"), dtype_name))
        rng = _rng(settings, 5)
        p0 = _normal(rng, n, np.float32).astype(dtype)
        g = _normal(rng, n, np.float32, scale=0.1).astype(dtype)
        p, p_ref = p0.copy(), p0.copy()
        opt = fastopt.Adam([p], lr=1e-3, backend=backend, **options)
        ref = fastopt.Adam([p_ref], lr=1e-3, backend="numpy", **options)

        def run():
            opt.step([g])

        def reference():
            ref.step([g])

        def verify():
            for _ in range(2):
                run()
                reference()
            if dtype.itemsize == 2:  # one float32 rounding apart can round to the neighbouring code
                if _codes_apart(p, p_ref) > 1:
                    raise VerificationError(f"{name}: params differ from the reference by more than one code")
                ours = {k: v for k, v in _state_arrays(opt).items()}
                for key, value in ours.items():
                    compare(f"{name}: state[{key!r}]", value, _state_arrays(ref)[key])
            else:  # 8-bit state: the fused kernel equals dequantize → update → requantize
                _compare_optimizers(name, [p], [p_ref], opt, ref)

        if dtype.itemsize == 2:
            master = options.get("master_weights", True)
            traffic = lambda: _traffic.low_precision_optimizer(2, 2, master)  # noqa: E731
        else:
            traffic = lambda: _traffic.eight_bit_optimizer(2, fastopt.precision.BLOCK)  # noqa: E731
        prepared = Prepared(run=run, verify=verify, elements=n, reference=reference, traffic=traffic)
        torch = settings.torch
        if torch is None:
            prepared.torch_reason = settings.torch_reason
        else:
            tdtype = getattr(torch, torch_dtype_name)
            tp = torch.from_numpy(p0.astype(np.float32)).to(tdtype)
            tp.grad = torch.from_numpy(g.astype(np.float32)).to(tdtype)
            topt, impl = _torch_optimizer(torch, "Adam", dict(lr=1e-3), [tp], np.float32)
            prepared.torch, prepared.torch_impl = topt.step, f"{impl} {torch_dtype_name}"
            if options.get("state_dtype") == "int8":
                _bitsandbytes_baseline(prepared, torch, p0, g)
        return prepared

    return build


# ---------------------------------------------------------------------------------------------
# batch normalization

LAYOUTS = {"nchw": 1, "nhwc": -1}


def _bn_inputs(settings: Settings, layout: str):
    n, c, h, w = settings.bn_shape
    shape = (n, c, h, w) if layout == "nchw" else (n, h, w, c)
    dtype = settings.dtype
    rng = _rng(settings, 2)
    x = _normal(rng, shape, dtype, scale=2.0, loc=0.5)
    dy = _normal(rng, shape, dtype)
    weight = _normal(rng, c, dtype, scale=0.1, loc=1.0)
    bias = _normal(rng, c, dtype, scale=0.1)
    running_mean = _normal(rng, c, dtype, scale=0.1)
    running_var = (1.0 + np.abs(_normal(rng, c, dtype, scale=0.1))).astype(dtype)
    return x, dy, weight, bias, running_mean, running_var


def _bn_torch(torch, x, dy, weight, bias, running_mean, running_var, axis, pass_name):
    """(timed call, check returning torch's outputs in our layout) for torch's batch norm."""
    import torch.nn.functional as F

    def to_torch(a):
        t = torch.from_numpy(a)
        return t.permute(0, t.ndim - 1, *range(1, t.ndim - 1)) if axis == -1 else t

    def to_numpy(t):
        return (t.permute(0, *range(2, t.ndim), 1) if axis == -1 else t).detach().numpy()

    tx, tdy = to_torch(x), to_torch(dy)
    tw, tb = torch.from_numpy(weight.copy()), torch.from_numpy(bias.copy())
    trm, trv = torch.from_numpy(running_mean.copy()), torch.from_numpy(running_var.copy())
    if pass_name.startswith("forward"):
        training = pass_name == "forward-train"

        def call():
            with torch.no_grad():
                return F.batch_norm(tx, trm, trv, tw, tb, training=training, momentum=0.1, eps=1e-5)

        return call, lambda: (to_numpy(call()),)
    leaf = tx.detach().requires_grad_()
    tw.requires_grad_()
    tb.requires_grad_()
    y = F.batch_norm(leaf, None, None, tw, tb, training=True, momentum=0.1, eps=1e-5)

    def backward():
        return torch.autograd.grad(y, (leaf, tw, tb), tdy, retain_graph=True)

    def outputs():
        dx, dw, db = backward()
        return to_numpy(dx), dw.numpy(), db.numpy()

    return backward, outputs


def _batchnorm_builder(layout: str, pass_name: str):
    axis = LAYOUTS[layout]

    def build(settings: Settings, backend: str) -> Prepared:
        dtype = settings.dtype
        x, dy, weight, bias, running_mean, running_var = _bn_inputs(settings, layout)
        c = x.shape[axis]
        training = pass_name == "forward-train"
        ours = dict(rm=running_mean.copy(), rv=running_var.copy(),
                    out=(np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)))
        theirs = dict(rm=running_mean.copy(), rv=running_var.copy(),
                      out=(np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)))
        if pass_name.startswith("forward"):
            def call(side, name):
                return fastopt.batchnorm_forward(x, weight, bias, side["rm"], side["rv"], training=training,
                                                 momentum=0.1, eps=1e-5, channel_axis=axis, backend=name,
                                                 out=side["out"])

            def outputs(side):
                return (*side["out"], side["rm"], side["rv"])

            names = ("y", "saved_mean", "saved_invstd", "running_mean", "running_var")
        else:
            _, mean, invstd = fastopt.batchnorm_forward(x, weight, bias, None, None, training=True, eps=1e-5,
                                                        channel_axis=axis, backend="numpy")

            def call(side, name):
                return fastopt.batchnorm_backward(dy, x, weight, mean, invstd, training=True, channel_axis=axis,
                                                  backend=name, out=side["out"])

            def outputs(side):
                return side["out"]

            names = ("dx", "dweight", "dbias")
        label = f"batchnorm {pass_name} {layout}"

        def verify():
            call(ours, backend)
            call(theirs, "numpy")
            for what, a, r in zip(names, outputs(ours), outputs(theirs)):
                compare(f"{label}: {what}", a, r)

        prepared = Prepared(run=lambda: call(ours, backend), reference=lambda: call(theirs, "numpy"),
                            verify=verify, elements=x.size,
                            traffic=lambda: _traffic.batchnorm(pass_name, dtype.itemsize),
                            info=dict(shape=list(x.shape), channel_axis=axis))
        torch = settings.torch
        if torch is None:
            prepared.torch_reason = settings.torch_reason
        else:
            prepared.torch, torch_outputs = _bn_torch(torch, x, dy, weight, bias, running_mean, running_var,
                                                      axis, pass_name)
            prepared.torch_impl = "F.batch_norm" if pass_name.startswith("forward") else "autograd"

            def torch_check():
                for what, t, a in zip(names, torch_outputs(), outputs(ours)):
                    compare(f"{label}: torch {what} vs fastopt", t, a, loose=10.0)

            prepared.torch_check = torch_check
        return prepared

    return build


# ---------------------------------------------------------------------------------------------
# many tensors


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The shapes of ResNet-50's 161 parameter tensors (torchvision's ``resnet50()``, 25,557,032
    values): convolution weights, batch-norm weights and biases, the final linear layer."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if block == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]
    return shapes


def _many_shapes(kind: str, settings: Settings) -> list[tuple[int, ...]]:
    if kind == "resnet50":
        shapes = resnet50_shapes()
        if not settings.full_size_many_tensors:  # same count of tensors, ~1/1000 of the values
            shapes = [(max(1, math.prod(s) // 1000),) for s in shapes]
        return shapes
    count, size = (200, 1000) if settings.full_size_many_tensors else (20, 10)
    return [(size,)] * count


SMALL_CALLS_PER_SAMPLE = 20


def _many_builder(kind: str):
    def build(settings: Settings, backend: str) -> Prepared:
        dtype = settings.dtype
        shapes = _many_shapes(kind, settings)
        total = sum(math.prod(s) for s in shapes)
        rng = _rng(settings, 3)
        starts = [_normal(rng, s, dtype) for s in shapes]
        grads = [_normal(rng, s, dtype, scale=0.1) for s in shapes]
        params = [a.copy() for a in starts]
        opt = fastopt.Adam(params, lr=1e-3, backend=backend)
        ref_params = [a.copy() for a in starts]
        ref = fastopt.Adam(ref_params, lr=1e-3, backend="numpy")
        # the same step over one tensor of the same total size, timed alongside
        one = np.concatenate([a.ravel() for a in starts])
        one_grad = np.concatenate([a.ravel() for a in grads])
        one_opt = fastopt.Adam([one], lr=1e-3, backend=backend)
        one_ref_param = one.copy()
        one_ref = fastopt.Adam([one_ref_param], lr=1e-3, backend="numpy")
        after = {}

        def run():
            opt.step(grads)

        def verify():
            for _ in range(2):
                run()
                ref.step(grads)
                one_opt.step([one_grad])
                one_ref.step([one_grad])
            _compare_optimizers(f"adam over {len(shapes)} tensors", params, ref_params, opt, ref)
            _compare_optimizers("adam over one tensor", [one], [one_ref_param], one_opt, one_ref)
            if prepared.torch is not None:
                after["params"] = [p.copy() for p in params]

        prepared = Prepared(
            run=run, verify=verify, elements=total, reference=lambda: ref.step(grads),
            traffic=lambda: _traffic.optimizer(_full_size_state(opt, params[0].size), dtype.itemsize),
            baseline=lambda: one_opt.step([one_grad]), baseline_label=f"one tensor of {total:,}",
            info=dict(tensors=len(shapes), total_elements=total))
        if kind == "small":  # 3.2 MB of θ, g, m, v: it stays in the caches of a training loop
            prepared.calls_per_sample, prepared.time_cold = SMALL_CALLS_PER_SAMPLE, True
        torch = settings.torch
        if torch is None:
            prepared.torch_reason = settings.torch_reason
        else:
            tps = [torch.from_numpy(a.copy()) for a in starts]
            for tp, g in zip(tps, grads):
                tp.grad = torch.from_numpy(g)
            topt, impl = _torch_optimizer(torch, "Adam", dict(lr=1e-3), tps, dtype)
            prepared.torch, prepared.torch_impl = topt.step, impl

            def torch_check():
                for _ in range(2):
                    topt.step()
                for k, (tp, p) in enumerate(zip(tps, after["params"])):
                    compare(f"torch Adam({impl}) params[{k}] vs fastopt", tp.numpy(), p, loose=10.0)

            prepared.torch_check = torch_check
        return prepared

    return build


# ---------------------------------------------------------------------------------------------
# training step: clip-by-global-norm + AdamW + EMA

TRAINING_STEP = dict(lr=1e-3, clip_grad_norm=1.0, polyak=0.999)


def _training_step_builder(settings: Settings, backend: str) -> Prepared:
    dtype, n = settings.dtype, settings.n
    rng = _rng(settings, 4)
    p0 = _normal(rng, n, dtype)
    g = _normal(rng, n, dtype)  # global norm ≈ √n ≫ 1: the clip is active
    p = p0.copy()
    try:
        opt = fastopt.AdamW([p], **TRAINING_STEP, backend=backend)
    except TypeError as exc:
        raise Skip(f"fastopt.AdamW does not accept clip_grad_norm=/polyak= yet ({exc})") from None
    p_ref = p0.copy()
    ref = fastopt.AdamW([p_ref], **TRAINING_STEP, backend="numpy")
    after = {}

    def run():
        opt.step([g])

    def verify():
        for _ in range(2):
            run()
            ref.step([g])
        _compare_optimizers("clip + adamw + ema", [p], [p_ref], opt, ref)
        if prepared.torch is not None:
            after["p"] = p.copy()

    # m, v and the EMA copy θ̂ at least, wherever the optimizer keeps θ̂
    prepared = Prepared(run=run, verify=verify, elements=n, reference=lambda: ref.step([g]),
                        traffic=lambda: _traffic.training_step(max(3, _full_size_state(opt, n)), dtype.itemsize))
    torch = settings.torch
    if torch is None:
        prepared.torch_reason = settings.torch_reason
        return prepared
    tp = torch.from_numpy(p0.copy())
    tp.grad = torch.from_numpy(g.copy())  # clip_grad_norm_ scales it in place
    ema = tp.detach().clone()
    topt, impl = _torch_optimizer(torch, "AdamW", dict(lr=1e-3), [tp], dtype)
    weight = 1.0 - TRAINING_STEP["polyak"]

    def torch_step():
        torch.nn.utils.clip_grad_norm_([tp], TRAINING_STEP["clip_grad_norm"], foreach=True)
        topt.step()
        torch._foreach_lerp_([ema], [tp.detach()], weight)

    def torch_check():
        for _ in range(2):
            torch_step()
        compare("clip + adamw + ema: torch param vs fastopt", tp.detach().numpy(), after["p"], loose=10.0)

    prepared.torch, prepared.torch_impl, prepared.torch_check = torch_step, f"clip(foreach)+{impl}+lerp", torch_check
    return prepared


# ---------------------------------------------------------------------------------------------


def all_cases() -> list[Case]:
    """Every row, in report order."""
    cases = []
    for name, cls_name, kwargs, torch_name, torch_kwargs, quick in OPTIMIZERS:
        cases.append(Case(name, "optimizer", f"one {cls_name} step over n elements",
                          _optimizer_builder(name, cls_name, kwargs, torch_name, torch_kwargs), quick))
    for layout in LAYOUTS:
        for pass_name in _traffic.BATCHNORM_PASSES:
            cases.append(Case(f"batchnorm-{pass_name}-{layout}", "batchnorm",
                              f"batch norm {pass_name}, {layout.upper()}",
                              _batchnorm_builder(layout, pass_name), pass_name != "forward-eval"))
    cases.append(Case("adam-resnet50-161-tensors", "many-tensors",
                      "one Adam step over ResNet-50's 161 parameter tensors", _many_builder("resnet50"), True))
    cases.append(Case("adam-200x1000", "many-tensors", "one Adam step over 200 tensors of 1,000 elements",
                      _many_builder("small"), True))
    for name, options, dtype_name, torch_dtype_name in LOW_PRECISION:
        cases.append(Case(name, "low-precision", f"one Adam step over n elements, {dtype_name} parameters, {options}",
                          _low_precision_builder(name, options, dtype_name, torch_dtype_name), False))
    cases.append(Case("training-step", "training-step", "clip-by-global-norm + AdamW + EMA over n elements",
                      _training_step_builder, True))
    return cases
