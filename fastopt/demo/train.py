"""Training the digits MLP with a fastopt optimizer, and comparing the optimizers.

``OPTIMIZERS`` maps each optimizer's name (the names of ``fastopt.functional.SPECS``) to its
class and to the hyperparameters this demo uses unless told otherwise; they were chosen so each
optimizer learns the digits in the default number of epochs.

``dtype`` is the dtype of the parameters the optimizer updates (``DTYPES``); with ``bfloat16`` or
``float16`` the optimizer holds 16-bit parameters (with float32 master weights unless
``master_weights=False``), and the MLP computes in float32 on copies cast up from them after
every step, its float32 gradients going to the optimizer as they are. ``state_dtype="int8"`` keeps
the optimizer's state 8-bit (block-wise quantized; see ``fastopt.precision``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import optim
from . import background
from .curriculum import CurriculumSampler, confidence
from .data import Digits, load_digits, require
from .mlp import MLP, softmax_cross_entropy

__all__ = ["DEFAULTS", "DTYPES", "OPTIMIZERS", "STATE_DTYPES", "TrainResult", "compare", "make_optimizer",
           "plot_losses", "train"]

# name -> (class, demo hyperparameters)
OPTIMIZERS: dict[str, tuple[type, dict]] = {
    "sgd": (optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adagrad": (optim.AdaGrad, dict(lr=0.05)),
    "rmsprop": (optim.RMSProp, dict(lr=1e-3)),
    "adadelta": (optim.AdaDelta, dict(lr=1.0)),
    "adam": (optim.Adam, dict(lr=3e-3)),
    "adamw": (optim.AdamW, dict(lr=3e-3, weight_decay=1e-2)),
    "delta_bar_delta": (optim.DeltaBarDelta, dict(lr=0.05, kappa=5e-3, phi=0.3, gamma=0.7)),
}

# the dtypes of the parameters the optimizer updates, and of its state
DTYPES = ("float32", "bfloat16", "float16")
STATE_DTYPES = ("float32", "int8")

# the defaults of ``train`` and of ``fastopt train``
DEFAULTS = dict(optimizer="adam", epochs=10, batch_size=64, init="glorot", hidden=(128, 64), seed=0, threads=None,
                dtype="float32", state_dtype="float32", master_weights=None)


def precision_options(state_dtype: str = DEFAULTS["state_dtype"], master_weights=DEFAULTS["master_weights"]) -> dict:
    """The optimizer keywords for ``state_dtype`` and ``master_weights``: only those that differ
    from the optimizers' defaults, so a float32 run passes none."""
    options = {}
    if state_dtype != "float32":
        options["state_dtype"] = state_dtype
    if master_weights is not None:
        options["master_weights"] = master_weights
    return options


def check_precision(dtype: str, state_dtype: str, master_weights) -> None:
    """``ValueError`` naming the argument for a ``dtype``/``state_dtype``/``master_weights`` the demo does
    not run; whether the optimizer takes them is the optimizer's own check."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {', '.join(STATE_DTYPES)}, got {state_dtype!r}")
    if master_weights is not None and dtype == "float32":
        raise ValueError(f"master_weights applies to bfloat16 and float16 parameters, not dtype={dtype!r}")


def param_dtype(name: str) -> np.dtype:
    """The NumPy dtype of ``DTYPES``' ``name`` (bfloat16 is ml_dtypes')."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_optimizer(name: str, params: list, hyper: dict | None = None, backend=None, comm=None, **precision):
    """The optimizer ``name`` over ``params`` with the demo's hyperparameters updated by ``hyper``.
    Raises ``ValueError`` for an unknown name; the class raises for bad hyperparameters. With
    ``comm``: data-parallel, sharded, gradients summed over the ranks (each rank's share of the
    minibatch's mean loss). ``precision``: the optimizer's ``state_dtype``/``master_weights``
    keywords (``precision_options``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    cls, defaults = OPTIMIZERS[name]
    parallel = {} if comm is None else dict(comm=comm, grad_reduce="sum")
    return cls(params, **{**defaults, **(hyper or {})}, backend=backend, **parallel, **precision)


@dataclass
class TrainResult:
    """One run of ``train``. ``compile_seconds``: the warm-up just before the first epoch, the
    first call of every kernel the training uses, which compiles it (or loads it from numba's disk
    cache); a kernel that already ran in this process (in an earlier run, LSUV or the curriculum's
    scoring) is ready and costs nothing here. ``seconds``: the epochs alone (each epoch's
    minibatch steps and its test-set evaluation), after the warm-up; the per-epoch ``seconds`` of
    ``history`` add up to about it. Neither includes loading the data, LSUV or the curriculum's
    scoring."""

    optimizer: str
    hyper: dict
    history: list[dict] = field(default_factory=list)  # per epoch: epoch, loss, train_accuracy, test_accuracy, seconds
    test_accuracy: float = float("nan")
    seconds: float = 0.0
    compile_seconds: float = 0.0


class _Params:
    """The parameters the optimizer updates: the model's own, or (``dtype`` 16-bit) copies of them
    in ``dtype``, which ``load`` casts up into the model's float32 arrays for the next forward."""

    def __init__(self, model: MLP, dtype: np.dtype):
        self.model = model
        self.copies = dtype != model.dtype
        self.arrays = [p.astype(dtype) for p in model.params] if self.copies else model.params

    def store(self) -> None:
        """After the model's weights changed outside the optimizer (LSUV): round them into ``arrays``."""
        if self.copies:
            for low, p in zip(self.arrays, self.model.params):
                low[...] = p
            self.load()

    def load(self) -> None:
        if self.copies:
            for p, low in zip(self.model.params, self.arrays):
                p[...] = low


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar only when stderr is a terminal
    return tqdm(total=total, desc=desc, leave=False, unit="step", file=sys.stderr,
                disable=None if progress else True, dynamic_ncols=True)


def train(*, optimizer: str = DEFAULTS["optimizer"], hyper: dict | None = None, epochs: int = DEFAULTS["epochs"],
          batch_size: int = DEFAULTS["batch_size"], backend=None, init: str = DEFAULTS["init"],
          hidden=DEFAULTS["hidden"], curriculum: bool = False, seed: int = DEFAULTS["seed"],
          data: Digits | None = None, log: Callable[[str], None] | None = None, progress: bool = False,
          threads: int | None = DEFAULTS["threads"], comm=None, dtype: str = DEFAULTS["dtype"],
          state_dtype: str = DEFAULTS["state_dtype"], master_weights: bool | None = DEFAULTS["master_weights"],
          ) -> TrainResult:
    """Train the MLP (64 → hidden... → 10, Linear → fastopt BatchNorm → ReLU per hidden layer) on
    the digits' training split with minibatches of ``batch_size`` (the last, incomplete one of an
    epoch is dropped), then score it on the test split. ``log`` receives one line per epoch.

    ``curriculum`` draws the epochs from ``CurriculumSampler`` (hard share rising over the first
    half of the epochs) instead of plain shuffled passes. ``seed`` fixes the initialization and
    the order of the examples; the test split is fixed.

    Just before the first epoch, a throwaway copy of the model (same shapes, backend and
    optimizer, its own weights) takes two steps and scores the test split, so every kernel the
    epochs call has been compiled (or loaded from numba's cache) before the clock starts:
    ``compile_seconds`` is that warm-up; ``seconds`` and the per-epoch times are training alone.
    The warm-up draws nothing from ``seed``'s generator, so the run is the same without it. On a
    first run (empty numba cache) it compiles the optimizer's kernels in a second process while
    this one compiles batch norm's (``fastopt.demo.background``).

    ``threads`` is the number of numba threads the kernels use while training (restored after;
    None, the default, leaves numba's setting). The kernels need no help here: this model's arrays
    are below the sizes where they open a parallel region (``kernels/numba_cpu``: serial twins),
    so they run on the calling thread whatever the thread count.

    ``comm`` (an mpi4py communicator; every rank calls ``train`` with the same arguments):
    data-parallel training. Every rank draws the same minibatches and takes its contiguous share
    of each; batch norm is synchronized over the ranks and the optimizer sharded (ZeRO-1), with
    each rank's gradient that of its share of the minibatch's mean loss, summed over the ranks:
    the same training as one process, up to rounding. Losses and accuracies are global.

    ``dtype`` (``DTYPES``) is the dtype of the parameters the optimizer holds and updates; for
    ``bfloat16`` and ``float16`` the MLP's forward and backward stay float32, on the parameters
    cast up after every step, and the optimizer receives the float32 gradients (with
    ``master_weights``, None or True, it keeps float32 master copies; False updates the 16-bit
    parameters themselves). ``state_dtype="int8"``: the optimizer's 8-bit state
    (``fastopt.precision``; only tensors of at least its ``min_8bit_size`` elements, which
    ``hyper`` may set). Both are the optimizer's keywords: it raises for what it does not take.
    With ``comm``, 16-bit parameters and 8-bit or bfloat16 state train as the optimizer's
    ``comm=`` takes them (float32 reductions, master copies and state sharded over the ranks,
    ``docs/distributed.md``).
    """
    import numba

    previous = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(threads)
    try:
        return _train(optimizer, hyper, epochs, batch_size, backend, init, hidden, curriculum, seed, data, log,
                      progress, comm, dtype, state_dtype, master_weights)
    finally:
        numba.set_num_threads(previous)


def _train(optimizer, hyper, epochs, batch_size, backend, init, hidden, curriculum, seed, data, log,
           progress, comm=None, dtype="float32", state_dtype="float32", master_weights=None) -> TrainResult:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (batch normalization needs a variance), got {batch_size}")
    check_precision(dtype, state_dtype, master_weights)
    precision = precision_options(state_dtype, master_weights)
    data = load_digits() if data is None else data
    n = len(data.y_train)
    if batch_size > n:
        raise ValueError(f"batch_size must be at most the {n} training examples, got {batch_size}")
    rng = np.random.default_rng(seed)
    model = MLP((data.x_train.shape[1], *hidden, data.classes), rng=rng, init=init, backend=backend)
    params = _Params(model, param_dtype(dtype))
    params.load()  # the model starts from the rounded weights
    # checks the hyperparameters first
    opt = make_optimizer(optimizer, params.arrays, hyper, backend, comm, **precision)
    if init == "lsuv":
        model.lsuv_(data.x_train[rng.choice(n, size=min(n, 256), replace=False)], rng)
        params.store()
    sampler = None
    if curriculum:
        scores = confidence(data.x_train, data.y_train, data.classes, backend=backend)
        sampler = CurriculumSampler(scores, ramp_epochs=max(1, epochs // 2), rng=rng)

    result = TrainResult(optimizer, {**OPTIMIZERS[optimizer][1], **(hyper or {})})
    steps = n // batch_size
    result.compile_seconds = _warm_up(optimizer, hyper, batch_size, backend, init, hidden, data, comm=comm,
                                      dtype=dtype, precision=precision)
    share = _Share(comm, batch_size, model)
    start = time.perf_counter()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = sampler.epoch(epoch) if sampler is not None else rng.permutation(n)
        model.train()
        loss_sum, correct = 0.0, 0
        with _bar(steps, f"epoch {epoch + 1}/{epochs}", progress) as bar:
            for i in range(steps):
                idx = share.of(order[i * batch_size:(i + 1) * batch_size])
                logits = model.forward(data.x_train[idx])
                loss, dlogits = share.loss(*softmax_cross_entropy(logits, data.y_train[idx]))
                model.backward(dlogits)
                opt.step(model.grads)
                params.load()
                loss, right = share.total(loss, int(np.sum(logits.argmax(axis=1) == data.y_train[idx])))
                loss_sum += loss
                correct += right
                bar.update()
        test_accuracy = float(np.mean(model.predict(data.x_test) == data.y_test))
        row = dict(epoch=epoch + 1, loss=loss_sum / steps, train_accuracy=correct / (steps * batch_size),
                   test_accuracy=test_accuracy, seconds=time.perf_counter() - t0)
        if sampler is not None:
            row["hard_share"] = sampler.hard_share(epoch)
        result.history.append(row)
        if log is not None:
            extra = f"  hard {row['hard_share']:4.0%}" if sampler is not None else ""
            log(f"epoch {epoch + 1:3d}/{epochs}  loss {row['loss']:.4f}  train {row['train_accuracy']:6.1%}  "
                f"test {test_accuracy:6.1%}{extra}  ({row['seconds']:.2f} s)")
    result.test_accuracy = result.history[-1]["test_accuracy"]
    result.seconds = time.perf_counter() - start
    return result


class _Share:
    """This rank's share of each minibatch (all of it without ``comm``)."""

    def __init__(self, comm, batch_size, model):
        self.comm = comm
        self.rank, self.world = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
        self.batch_size = batch_size
        self.sums = np.zeros(2)
        if comm is not None:  # set after LSUV and the curriculum's scoring, which run per rank
            for norm in model.norms:
                norm.comm = comm

    def of(self, idx):
        return idx[self.rank * len(idx) // self.world:(self.rank + 1) * len(idx) // self.world]

    def loss(self, loss, dlogits):
        """The local mean loss and its gradient, as this share's part of the minibatch's mean."""
        if self.comm is None:
            return loss, dlogits
        weight = len(dlogits) / self.batch_size
        dlogits *= dlogits.dtype.type(weight)
        return loss * weight, dlogits

    def total(self, loss, correct):
        if self.comm is None:
            return loss, correct
        from mpi4py import MPI

        self.sums[0], self.sums[1] = loss, correct
        self.comm.Allreduce(MPI.IN_PLACE, self.sums, op=MPI.SUM)
        return float(self.sums[0]), int(self.sums[1])


def _warm_up(optimizer, hyper, batch_size, backend, init, hidden, data, steps=2, comm=None, dtype="float32",
             precision=None) -> float:
    """Seconds taken by the first call of every kernel a ``train`` run uses (numba compiles a
    kernel, or loads it from its disk cache, at its first call): a throwaway model of the run's
    shapes, with the run's backend, optimizer and hyperparameters, takes ``steps`` minibatch steps
    (training-mode batch norm forward and backward, the optimizer's update) and predicts the test
    split (eval-mode batch norm), on the run's data. The few milliseconds of arithmetic are
    counted too. Its weights come from a fixed seed of its own: the run's generator is untouched.
    ``dtype`` and ``precision`` (the optimizer's keywords) are the run's.

    When ``background.worthwhile`` (a first run on the numba backend with a core to spare), a
    worker process compiles the optimizer's kernels meanwhile, and the first optimizer step waits
    for it after batch norm's forward and backward have compiled here: the step then loads them
    from the cache."""
    start = time.perf_counter()
    n = len(data.y_train)
    sizes = (data.x_train.shape[1], *hidden, data.classes)
    worker = None
    if background.worthwhile(backend, comm):
        worker = background.start(optimizer=optimizer, hyper=hyper, backend=backend, sizes=sizes, dtype=dtype,
                                  precision=precision or {})
    try:
        model = MLP(sizes, rng=np.random.default_rng(0), init=init, backend=backend)
        params = _Params(model, param_dtype(dtype))
        params.load()
        opt = make_optimizer(optimizer, params.arrays, hyper, backend, comm, **(precision or {}))
        for norm in model.norms if comm is not None else ():
            norm.comm = comm
        model.train()
        for i in range(steps):
            idx = np.arange(i * batch_size, (i + 1) * batch_size) % n  # fancy indexing, as in the loop: a copy
            _, dlogits = softmax_cross_entropy(model.forward(data.x_train[idx]), data.y_train[idx])
            model.backward(dlogits)
            if worker is not None:  # batch norm's kernels are compiled; the optimizer's are, or are coming, on disk
                worker, waited = None, worker
                waited.wait()
            opt.step(model.grads)
            params.load()
    finally:
        if worker is not None:
            worker.stop()
    model.predict(data.x_test)
    return time.perf_counter() - start


def plot_losses(results: list[TrainResult], path: str, title: str = "fastopt: digits MLP") -> None:
    """A PNG with each run's training loss per epoch (log scale) and its test accuracy."""
    require("matplotlib", "plotting the loss curves")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for r in results:
        epochs = [h["epoch"] for h in r.history]
        loss_ax.plot(epochs, [h["loss"] for h in r.history], marker=".", label=r.optimizer)
        acc_ax.plot(epochs, [100 * h["test_accuracy"] for h in r.history], marker=".", label=r.optimizer)
    loss_ax.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    acc_ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def compare(names: list[str], *, output: str, log: Callable[[str], None] | None = None, **options) -> list[TrainResult]:
    """Train once per optimizer in ``names`` (each with its demo hyperparameters and the same
    seed, data and ``options`` of ``train``), plot the loss curves to ``output`` (PNG). Each
    result's ``compile_seconds`` and ``seconds`` are apart (see ``TrainResult``): kernels the
    optimizers share (batch norm's) count in the first optimizer's compile time only."""
    require("matplotlib", "plotting the loss curves")  # fail before training, not after
    data = options.pop("data", None) or load_digits()
    results = []
    for name in names:
        if log is not None:
            log(f"-- {name}")
        results.append(train(optimizer=name, data=data, log=log, **options))
    plot_losses(results, output)
    return results
