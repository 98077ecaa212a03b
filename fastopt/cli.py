"""The ``fastopt`` command (also ``python -m fastopt``).

    fastopt info      versions, backends (and why one is unavailable), threads, numba cache, GPU
    fastopt verify    every kernel on every available backend against the float64 reference
    fastopt bench     the benchmark harness (``fastopt.benchmark``)
    fastopt train     an MLP with batch normalization on the digits, entirely on fastopt
    fastopt compile   compile the CPU kernels ahead of time into numba's disk cache

Exit status: 0 success, 1 a verification (or a kernel's compilation) failed, 2 a usage error
(unknown optimizer or option, a bad hyperparameter, an unavailable backend, a missing optional
extra), printed as one line.
Progress bars go to stderr and only when it is a terminal.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import sys
import time
import warnings

import numpy as np

__all__ = ["main"]

PROG = "fastopt"


class CLIError(Exception):
    """A problem the user can fix; printed as ``fastopt: error: <message>``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (``fastopt train``'s full usage is a screenful)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------------------------------
# fastopt info


def _version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cupy_version() -> str:
    from importlib import metadata

    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "cupy" or name.startswith("cupy-"):
            return f"{dist.version} ({dist.metadata['Name']})"
    return "not installed"


def _numba_cache_dir() -> str:
    """Where numba caches fastopt's compiled CPU kernels: NUMBA_CACHE_DIR when set, else the
    ``__pycache__`` folder beside the kernel sources when writable, else numba's per-user cache."""
    import numba

    if numba.config.CACHE_DIR:
        return f"{numba.config.CACHE_DIR} (NUMBA_CACHE_DIR)"
    try:
        from .kernels import numba_cpu

        folder = os.path.dirname(numba_cpu.__file__)
    except ImportError as exc:
        return f"unknown (the numba kernels do not import: {exc})"
    in_tree = os.path.join(folder, "__pycache__")
    if os.access(in_tree if os.path.isdir(in_tree) else folder, os.W_OK):
        return in_tree
    try:
        from numba.misc.appdirs import AppDirs

        user_dir = AppDirs(appname="numba", appauthor=False).user_cache_dir
        return f"{user_dir} (numba's per-user cache: {folder} is read-only)"
    except ImportError:
        return f"numba's per-user cache ({folder} is read-only)"


def _threading_layer() -> str:
    """The threading layer numba uses, after one tiny kernel launch (numba picks the layer at the
    first parallel launch)."""
    import numba

    from . import functional

    try:
        functional.sgd_step(np.zeros(1, np.float32), np.zeros(1, np.float32), lr=0.0, backend="numba")
        layer = numba.threading_layer()
    except Exception as exc:  # report, never fail: info is for diagnosing broken installs too
        return f"unknown ({type(exc).__name__}: {exc})"
    if layer == "workqueue":
        layer += " (not thread-safe: fastopt serializes kernel calls)"
    return layer


def _gpu_name() -> str:
    from .dispatch import _not_installed

    if not _not_installed("numba-cuda"):  # without numba-cuda, numba's own numba.cuda would answer
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from numba import cuda

                if cuda.is_available():
                    name = cuda.get_current_device().name
                    return name.decode() if isinstance(name, bytes) else str(name)
                return "none (numba-cuda finds no CUDA driver or device)"
        except ImportError:
            pass
        except Exception as exc:
            return f"unknown ({type(exc).__name__}: {exc})"
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        return props["name"].decode()
    except ImportError:
        return "unknown (neither numba-cuda nor cupy is installed)"
    except Exception as exc:
        return f"none (cupy: {exc})"


def cmd_info(args) -> int:
    import numba

    import fastopt

    print(f"fastopt      {fastopt.__version__}  ({os.path.dirname(fastopt.__file__)})")
    print(f"python       {platform.python_version()}  ({sys.executable})")
    for name in ("numpy", "numba", "numba-cuda"):
        print(f"{name:13s}{_version(name)}")
    print(f"{'cupy':13s}{_cupy_version()}")
    for name in ("torch", "tqdm", "scikit-learn", "matplotlib"):
        print(f"{name:13s}{_version(name)}")
    print()
    print("backends:")
    for name, info in fastopt.backends().items():
        status = "available" if info.available else f"unavailable: {info.reason}"
        print(f"  {name:11s} {info.array_type:20s} {status}")
    print()
    print(f"threads          {numba.get_num_threads()} (numba; NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}, "
          f"{os.cpu_count()} CPUs)")
    print(f"threading layer  {_threading_layer()}")
    print(f"numba cache      {_numba_cache_dir()}")
    print(f"GPU              {_gpu_name()}")
    from .distributed import describe_mpi

    print(f"MPI              {describe_mpi()}")
    return 0


# ---------------------------------------------------------------------------------------------
# fastopt verify


def _bar(total: int, desc: str, unit: str):
    from tqdm.auto import tqdm

    # disable=None: the bar shows only when stderr is a terminal
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, disable=None,
                dynamic_ncols=True)


def cmd_verify(args) -> int:
    import fastopt

    from . import verify

    report = fastopt.backends()
    if args.backend:
        backends = list(dict.fromkeys(args.backend))
        for name in backends:
            if not report[name].available:
                raise CLIError(f"backend {name!r} is unavailable: {report[name].reason}")
    else:
        backends = [name for name, info in report.items() if info.available]
        for name, info in report.items():
            if not info.available:
                print(f"skipping backend {name}: {info.reason}")
    ops = list(dict.fromkeys(args.op)) if args.op else list(verify.OPS)
    dtypes = [args.dtype] if args.dtype else list(verify.DTYPES)
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed} (rerun with --seed {seed} for the same inputs)")
    with _bar(verify.case_count(ops, backends, dtypes), "verifying", "case") as bar:
        results = verify.run(backends, ops, dtypes, rng=np.random.default_rng(seed), on_case=bar.update)

    header = f"{'op':20s} {'backend':10s} {'dtype':8s} {'max rel error':>13s} {'tolerance':>9s}  result"
    print(header)
    print("-" * len(header))
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        print(f"{r.op:20s} {r.backend:10s} {r.dtype:8s} {r.error:13.2e} {r.rtol:9.0e}  {verdict}")
    failed = [r for r in results if not r.passed]
    for r in failed:
        print(f"\nFAIL {r.op} on {r.backend} ({r.dtype}): {len(r.failures)} of {r.checks} outputs out of tolerance")
        for line in r.failures[:5]:
            print(f"  {line}")
        if len(r.failures) > 5:
            print(f"  ... and {len(r.failures) - 5} more")
    checks = sum(r.checks for r in results)
    if failed:
        print(f"\n{len(failed)} of {len(results)} rows FAILED")
        return 1
    print(f"\nall {len(results)} rows passed ({checks} outputs compared)")
    return 0


# ---------------------------------------------------------------------------------------------
# fastopt bench


def cmd_bench(args, extra: list[str]) -> int:
    try:
        from . import benchmark
    except ImportError as exc:
        raise CLIError(f"fastopt bench is not available: importing fastopt.benchmark failed ({exc})") from None
    if not (hasattr(benchmark, "add_arguments") and hasattr(benchmark, "run")):
        raise CLIError("fastopt bench is not available in this build: fastopt.benchmark has no "
                       "add_arguments()/run()")
    parser = _Parser(prog=f"{PROG} bench", description=_BENCH_HELP)
    benchmark.add_arguments(parser)
    return int(benchmark.run(parser.parse_args(extra)) or 0)


_BENCH_HELP = "Benchmark the kernels: verify, warm up, then time; bytes moved, GB/s, JSON out."


# ---------------------------------------------------------------------------------------------
# fastopt compile


def cmd_compile(args, parser) -> int:
    from . import precompile

    if args.list:
        print(f"{'operation':20s} kernels (each for {' and '.join(precompile.DTYPES)})")
        for op, table in precompile.kernels().items():
            print(f"{op:20s} {', '.join(table)}")
        return 0
    try:
        jobs = precompile.jobs(args.op, [args.dtype] if args.dtype else None, args.state_dtype)
    except ValueError as exc:
        parser.error(f"{'--op' if str(exc).startswith('unknown operation') else '--state-dtype'}: {exc}")
    if not jobs:
        parser.error(f"--state-dtype: {', '.join(args.op or ['no operation'])} has no kernels for "
                     f"{args.dtype or 'float32'} parameters with {args.state_dtype} state")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    workers = args.jobs if args.jobs is not None else precompile.default_workers(jobs)
    ops = ", ".join(dict.fromkeys(args.op)) if args.op else "every operation"
    dtypes = " and ".join(dict.fromkeys(job.label() for job in jobs if not job.any_dtype)) or args.dtype or "float32"
    kernels = len({id(job.kernel) for job in jobs})
    processes = f", {workers} processes" if workers > 1 else ""
    print(f"compiling {len(jobs)} signatures of {kernels} kernels ({ops}; {dtypes}{processes}) into numba's cache "
          f"at {_numba_cache_dir()}")
    start = time.perf_counter()
    with _bar(len(jobs), "compiling", "signature") as bar:
        def report(result):
            bar.update()
            status = "loaded from the cache" if result.cached else "compiled"
            if result.error:
                status = f"FAILED: {result.error}"
            bar.write(f"{result.job.name:44s} {result.job.label():8s} {result.seconds:7.2f} s  {status}",
                      file=sys.stdout)

        results = precompile.compile_kernels(jobs, report, workers=workers)
    failed = [r for r in results if r.error]
    cached = sum(r.cached for r in results)
    print(f"{len(results) - len(failed)} of {len(results)} signatures ready in {time.perf_counter() - start:.1f} s "
          f"({len(results) - len(failed) - cached} compiled, {cached} loaded from the cache)")
    if failed:
        print(f"{len(failed)} signatures FAILED to compile")
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# fastopt train

# option -> (dest, argparse keywords, help); dest is the optimizer's keyword argument
_HYPER_OPTIONS = [
    ("--lr", "lr", dict(type=float), "learning rate ε (delta_bar_delta: the initial rate)"),
    ("--momentum", "momentum", dict(type=float), "momentum α (sgd, rmsprop)"),
    ("--nesterov", "nesterov", dict(action="store_true", default=None), "Nesterov momentum (sgd, rmsprop)"),
    ("--weight-decay", "weight_decay", dict(type=float), "weight decay λ (L2; decoupled for adamw)"),
    ("--eps", "eps", dict(type=float), "δ, the small constant for numerical stability"),
    ("--rho", "rho", dict(type=float), "decay rate ρ (rmsprop, adadelta)"),
    ("--betas", "betas", dict(type=float, nargs=2, metavar=("BETA1", "BETA2")), "Adam's decay rates (adam, adamw)"),
    ("--amsgrad", "amsgrad", dict(action="store_true", default=None), "AMSGrad (adam, adamw)"),
    ("--centered", "centered", dict(action="store_true", default=None), "centered RMSProp"),
    ("--initial-accumulator-value", "initial_accumulator_value", dict(type=float), "AdaGrad's initial r"),
    ("--kappa", "kappa", dict(type=float), "delta-bar-delta's additive rate increase κ"),
    ("--phi", "phi", dict(type=float), "delta-bar-delta's multiplicative rate decrease φ"),
    ("--gamma", "gamma", dict(type=float), "delta-bar-delta's gradient-average weight γ"),
    ("--convention", "convention", dict(choices=("textbook", "torch")), "update convention (docs/algorithms.md)"),
]


def _hyperparameters(cls) -> list[str]:
    skip = {"self", "params", "backend"}
    return [p for p in inspect.signature(cls.__init__).parameters if p not in skip]


def _given_hyper(args) -> dict:
    hyper = {}
    for option, dest, _, _ in _HYPER_OPTIONS:
        value = getattr(args, dest)
        if value is not None:
            hyper[dest] = tuple(value) if dest == "betas" else value
    return hyper


def _option(dest: str) -> str:
    return next(option for option, d, _, _ in _HYPER_OPTIONS if d == dest)


def _format_hyper(hyper: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hyper.items())


def _check_optimizer(name: str, hyper: dict, backend, parser, dtype: str = "float32", precision=None) -> None:
    """Unknown options are usage errors; bad values are fastopt's own errors, before any data is loaded."""
    from .demo import OPTIMIZERS, make_optimizer
    from .demo.train import param_dtype
    from .dispatch import BackendUnavailableError

    allowed = _hyperparameters(OPTIMIZERS[name][0])
    for dest in hyper:
        if dest not in allowed:
            known = {d for _, d, _, _ in _HYPER_OPTIONS}
            parser.error(f"{_option(dest)} does not apply to {name} (its options: "
                         f"{', '.join(_option(d) for d in allowed if d in known)})")
    try:
        probe = dict(precision or {})
        if probe.get("state_dtype", "float32") != "float32":
            probe["min_8bit_size"] = 1  # the probe's one element gets 8-bit state: its rules are checked too
        make_optimizer(name, [np.zeros(1, param_dtype(dtype))], hyper, backend, **probe)
    except BackendUnavailableError as exc:
        raise CLIError(str(exc)) from None
    except (ValueError, TypeError) as exc:
        message = str(exc)
        if message.startswith("param group 0: "):
            message = message[len("param group 0: "):]
        if message.startswith("params[0] has dtype"):  # the probe's name for what --dtype set
            message = "--dtype: the parameters have dtype" + message[len("params[0] has dtype"):]
        raise CLIError(f"{name}: {message}") from None


def _train_torch(args, parser) -> int:
    """``fastopt train --framework torch``: examples/torch_cnn.py's CNN in torch, with fastopt.torch's
    AdamW and fused BatchNormReLU2d (fastopt.torch.demo)."""
    unused = [flag for flag, given in (("--compare", args.compare is not None), ("--curriculum", args.curriculum),
                                       ("--backend", args.backend is not None),
                                       ("--optimizer", args.optimizer != "adam"),
                                       ("--dtype", args.dtype != "float32"),
                                       ("--state-dtype", args.state_dtype != "float32"),
                                       ("--[no-]master-weights", args.master_weights is not None)) if given]
    if unused:
        parser.error(f"--framework torch trains the CNN of examples/torch_cnn.py with fastopt.torch.AdamW; "
                     f"{', '.join(unused)} apply to the NumPy MLP only")
    try:
        from .torch import demo as torch_demo
    except ImportError as exc:
        parser.error(f"--framework torch needs PyTorch: pip install 'fastopt[torch,demo]' ({exc})")
    from . import demo

    data = demo.load_digits()
    print(f"digits: {len(data.y_train)} training and {len(data.y_test)} test images (8x8); CNN in torch, "
          "Conv -> fastopt.torch.BatchNormReLU2d (x2) -> MaxPool -> Linear; fastopt.torch.AdamW")
    result = torch_demo.train_cnn(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, data=data,
                                  log=print)
    print(f"train {result.seconds:.2f} s (including the first call of each kernel)")
    print(f"test accuracy: {100 * result.test_accuracy:.1f}%")
    return 0


def _launched_comm(args, parser):
    """Under mpiexec with several ranks: ``MPI.COMM_WORLD`` (data-parallel training; ranks other
    than 0 print nothing), else None."""
    from .distributed import launched_comm

    comm = launched_comm()
    if comm is None:
        return None
    if getattr(args, "framework", "numpy") == "torch" or args.compare is not None:
        parser.error("under mpiexec, fastopt train runs the numpy framework's single run (no --compare)")
    if comm.Get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 reports for the job
    return comm


def cmd_train(args, parser) -> int:
    from . import demo

    comm = _launched_comm(args, parser)

    if getattr(args, "framework", "numpy") == "torch":
        if args.epochs < 1 or args.batch_size < 2:
            parser.error("--epochs must be >= 1 and --batch-size >= 2")
        return _train_torch(args, parser)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 2:
        parser.error(f"--batch-size must be >= 2 (batch normalization needs a variance), got {args.batch_size}")
    import numba

    if args.threads is not None and not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (NUMBA_NUM_THREADS), "
                     f"got {args.threads}")
    if any(h < 1 for h in args.hidden):
        parser.error(f"--hidden sizes must be >= 1, got {args.hidden}")
    if args.master_weights is not None and args.dtype == "float32":
        parser.error(f"--{'' if args.master_weights else 'no-'}master-weights applies to --dtype bfloat16 or "
                     "float16 (the float32 copy of 16-bit parameters), not to float32 parameters")
    from .demo.train import precision_options

    precision = precision_options(args.state_dtype, args.master_weights)
    hyper = _given_hyper(args)
    if args.compare is not None:
        if hyper:
            parser.error(f"--compare trains each optimizer with its own demo hyperparameters; drop "
                         f"{', '.join(_option(d) for d in hyper)}")
        if args.compare == "all":
            names = list(demo.OPTIMIZERS)
        else:
            names = [n.strip() for n in args.compare.split(",") if n.strip()]
        unknown = [n for n in names if n not in demo.OPTIMIZERS]
        if unknown or not names:
            parser.error(f"--compare: unknown optimizer {', '.join(map(repr, unknown)) or '(none given)'} "
                         f"(choose from {', '.join(demo.OPTIMIZERS)})")
        for name in names:
            _check_optimizer(name, {}, args.backend, parser, args.dtype, precision)
        demo.data.require("matplotlib", "--compare's plot")  # before any data is loaded or trained on
    else:
        _check_optimizer(args.optimizer, hyper, args.backend, parser, args.dtype, precision)

    data = demo.load_digits()
    hidden = tuple(args.hidden)
    sizes = "-".join(map(str, (data.x_train.shape[1], *hidden, data.classes)))
    print(f"digits: {len(data.y_train)} training and {len(data.y_test)} test images (8x8); "
          f"MLP {sizes}, Linear -> fastopt BatchNorm -> ReLU; init {args.init}"
          f"{', curriculum' if args.curriculum else ''}; backend {args.backend or 'numba (default)'}"
          f"{f'; data-parallel on {comm.Get_size()} MPI ranks' if comm is not None else ''}")
    if (args.dtype, args.state_dtype) != ("float32", "float32"):  # a float32 run prints what it always did
        codes = " (8-bit block-wise codes for tensors of at least 4096 elements)" if args.state_dtype == "int8" else ""
        print(f"parameters {args.dtype}{_master_note(args)}; optimizer state {args.state_dtype}{codes}")
    options = dict(epochs=args.epochs, batch_size=args.batch_size, backend=args.backend, init=args.init,
                   hidden=hidden, curriculum=args.curriculum, seed=args.seed, data=data, log=print, progress=True,
                   threads=args.threads, comm=comm, dtype=args.dtype, state_dtype=args.state_dtype,
                   master_weights=args.master_weights)
    if args.compare is None:
        print(f"optimizer {args.optimizer} ({_format_hyper({**demo.OPTIMIZERS[args.optimizer][1], **hyper})})")
        result = demo.train(optimizer=args.optimizer, hyper=hyper, **options)
        print(f"compile {result.compile_seconds:.2f} s, train {result.seconds:.2f} s ({_TIMES})")
        print(f"test accuracy: {100 * result.test_accuracy:.1f}%")
        return 0

    start = time.perf_counter()
    results = demo.compare(names, output=args.output, **options)
    print()
    header = (f"{'optimizer':16s} {'hyperparameters':44s} {'final loss':>10s} {'test accuracy':>13s} "
              f"{'compile':>7s} {'train':>7s}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.optimizer:16s} {_format_hyper(r.hyper):44s} {r.history[-1]['loss']:10.4f} "
              f"{100 * r.test_accuracy:12.1f}% {r.compile_seconds:6.2f}s {r.seconds:6.2f}s")
    print(f"({_TIMES}; kernels shared by the optimizers, batch norm's, compile in the first one's time)")
    print(f"\nloss curves written to {args.output} ({time.perf_counter() - start:.1f} s in all)")
    return 0


# what ``fastopt train`` reports as compile and train times (``fastopt.demo.TrainResult``)
_TIMES = ("compile: the first call of each kernel, which compiles it or loads it from numba's cache; "
          "train: the epochs alone")


def _master_note(args) -> str:
    if args.dtype == "float32":
        return ""
    if args.master_weights is False:
        return " (no master weights: the optimizer updates the 16-bit parameters)"
    return " (float32 master weights in the optimizer; forward and backward in float32)"


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer sizes such as 128,64, got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one hidden layer size")
    return sizes


# ---------------------------------------------------------------------------------------------
# the parser


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from .dispatch import BACKEND_NAMES

    parser = _Parser(
        prog=PROG, description="Fused optimizer and batch-norm kernels: inspect, verify, benchmark, train a demo.",
        epilog="Run 'fastopt COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("info", help="versions, backends, threads, numba cache, GPU",
                   description="Print versions, which backends are available (and why not), the thread "
                               "count and threading layer, the numba cache location and the GPU.")

    p_verify = sub.add_parser(
        "verify", help="check every kernel against the float64 reference",
        description="Run every kernel on every available backend against the NumPy reference in float64 on "
                    "fresh random inputs (several sizes, several steps); print op, backend, dtype, max relative "
                    "error, tolerance, PASS/FAIL. Exit status 1 if anything fails.")
    p_verify.add_argument("--backend", action="append", choices=BACKEND_NAMES,
                          help="backend to verify (repeatable; default: every available backend)")
    from .verify import DTYPES, OPS

    p_verify.add_argument("--op", action="append", choices=OPS, metavar="NAME",
                          help=f"operation to verify (repeatable; default: all): {', '.join(OPS)}")
    p_verify.add_argument("--dtype", choices=DTYPES, help="dtype to verify (default: all; bfloat16, float16 and int8-state are the optimizers' low-precision rows)")
    p_verify.add_argument("--seed", type=int, help="seed of the random inputs (default: fresh, printed)")

    sub.add_parser("bench", help="benchmark the kernels (fastopt bench --help for options)", add_help=False,
                   description=_BENCH_HELP)

    from .demo.mlp import INITS
    from .demo.train import DEFAULTS, DTYPES, OPTIMIZERS, STATE_DTYPES

    p_train = sub.add_parser(
        "train", help="train an MLP with batch norm on the digits, entirely on fastopt",
        description="Train a multi-layer perceptron (Linear -> fastopt BatchNorm -> ReLU) on the scikit-learn "
                    "digits (1,797 8x8 images) with a fastopt optimizer, and report the held-out test accuracy. "
                    "Times are reported apart: compile (a warm-up that makes the first call of every kernel the "
                    "run uses, compiling it or loading it from numba's cache) and train (the epochs alone). "
                    "Needs the demo extra: pip install 'fastopt[demo]'.",
        epilog="Hyperparameters not given take the demo's value for the optimizer: "
               + "; ".join(f"{n}: {_format_hyper(h)}" for n, (_, h) in OPTIMIZERS.items()))
    p_train.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=DEFAULTS["optimizer"],
                         help=f"optimizer (default: {DEFAULTS['optimizer']})")
    p_train.add_argument("--framework", choices=("numpy", "torch"), default="numpy",
                         help="numpy (default): the MLP above, entirely on fastopt; torch: the CNN of "
                              "examples/torch_cnn.py in PyTorch with fastopt.torch's AdamW and batch norm "
                              "(needs the torch extra; takes --epochs, --batch-size, --seed)")
    hyper = p_train.add_argument_group("optimizer hyperparameters (each applies to the optimizers that take it)")
    for option, dest, kwargs, help_text in _HYPER_OPTIONS:
        hyper.add_argument(option, dest=dest, help=help_text, **kwargs)
    p_train.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help=f"default: {DEFAULTS['epochs']}")
    p_train.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                         help=f"default: {DEFAULTS['batch_size']}")
    p_train.add_argument("--hidden", type=_hidden, default=list(DEFAULTS["hidden"]), metavar="SIZES",
                         help="hidden layer sizes, comma-separated (default: "
                              f"{','.join(map(str, DEFAULTS['hidden']))})")
    p_train.add_argument("--backend", choices=("numba", "numpy"),
                         help="backend for batch norm and the optimizer (default: numba); the demo's arrays are "
                              "NumPy arrays, so the CPU backends only")
    p_train.add_argument("--init", choices=INITS, default=DEFAULTS["init"],
                         help=f"weight initialization, see fastopt.init (default: {DEFAULTS['init']})")
    p_train.add_argument("--curriculum", action="store_true",
                         help="stochastic curriculum: mostly easy examples first (ranked by a softmax regression's "
                              "confidence), more hard ones each epoch until the data's own mix at half the epochs")
    p_train.add_argument("--dtype", choices=DTYPES, default=DEFAULTS["dtype"],
                         help="dtype of the parameters the optimizer updates (default: float32); bfloat16 and "
                              "float16 keep float32 master weights in the optimizer, the MLP computing in float32 "
                              "on the parameters cast up")
    p_train.add_argument("--state-dtype", choices=STATE_DTYPES, default=DEFAULTS["state_dtype"],
                         help="dtype of the optimizer's state (default: float32); int8: block-wise quantized 8-bit "
                              "state (sgd with momentum, adagrad, rmsprop, adam, adamw; float32 parameters) for "
                              "tensors of at least 4096 elements")
    p_train.add_argument("--master-weights", action=argparse.BooleanOptionalAction, default=DEFAULTS["master_weights"],
                         help="with --dtype bfloat16 or float16: keep float32 master weights (default) or, with "
                              "--no-master-weights, update the 16-bit parameters themselves")
    p_train.add_argument("--seed", type=int, default=DEFAULTS["seed"], help=f"default: {DEFAULTS['seed']}")
    p_train.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                         help="numba threads for the kernels (default: numba's; the kernels run small arrays such "
                              "as the demo's on the calling thread by themselves)")
    p_train.add_argument("--compare", nargs="?", const="all", metavar="NAMES",
                         help="train once per optimizer (all, or a comma-separated list) with the demo "
                              "hyperparameters; write a PNG of the loss curves (needs matplotlib) and a table "
                              "(final loss, test accuracy, compile and train times apart)")
    p_train.add_argument("--output", default="fastopt-compare.png", metavar="PNG",
                         help="the file --compare writes (default: fastopt-compare.png)")
    p_compile = sub.add_parser(
        "compile", help="compile the CPU kernels ahead of time into numba's disk cache",
        description="Compile the numba backend's CPU kernels into numba's disk cache ahead of time (for example "
                    "in a container build), so that a program's first run loads them instead of compiling: every "
                    "kernel of the selected operations (every configuration of an optimizer, with and without the "
                    "Polyak average; batch norm in both layouts), for each selected dtype. Compile where the "
                    "program runs, or on the same CPU model, with the same NUMBA_CACHE_DIR (or numba's default "
                    "cache) and the same versions of fastopt, numba and Python. Exit status 1 if a kernel fails "
                    "to compile.")
    which = p_compile.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="every operation (the default)")
    which.add_argument("--op", action="append", metavar="NAME",
                       help="operation to compile (repeatable): an optimizer (sgd, adam, ...), batchnorm_forward, "
                            "batchnorm_backward, grad_sumsq, scale_grads_; --list shows them with their kernels")
    p_compile.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                           help="dtype of the parameters (and of batch norm's x) to compile for (default: float32 and "
                                "float64); bfloat16 and float16 compile the 16-bit kernels with master weights, "
                                "rounding to nearest and gradients of the parameter's dtype or float32 (other "
                                "variants compile at their first use)")
    p_compile.add_argument("--state-dtype", choices=("float32", "int8", "bfloat16"), default="float32",
                           help="the optimizers' state (default: float32); int8 and bfloat16 compile the kernels with "
                                "that state, for float32 parameters or those of --dtype, and the float32-state kernels "
                                "the same optimizers run on tensors under min_8bit_size elements")
    p_compile.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                           help="compile in N processes (LLVM compiles on one core; default: one per available "
                                "core, at most 8, and one per 4 kernel functions selected: 1 for a few kernels)")
    p_compile.add_argument("--list", action="store_true", help="list the operations and their kernels, compile nothing")
    return parser, {"verify": p_verify, "train": p_train, "compile": p_compile}


def main(argv=None) -> int:
    """Run the ``fastopt`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from .demo.data import MissingExtraError
    from .dispatch import BackendUnavailableError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser, subparsers = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "bench":
            subparsers.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "info":
            return cmd_info(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "bench":
            return cmd_bench(args, extra)
        if args.command == "compile":
            return cmd_compile(args, subparsers["compile"])
        return cmd_train(args, subparsers["train"])
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2), already printed
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except (CLIError, MissingExtraError, BackendUnavailableError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. fastopt verify | head: stop quietly, also at interpreter exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
