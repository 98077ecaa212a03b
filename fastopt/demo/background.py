"""The optimizer's kernels compiled in a second process while the first compiles batch norm's.

numba compiles on one core, and a first ``train`` run on an empty cache spends most of its warm-up
compiling: batch norm's kernels (forward, backward) about 6 s, the optimizer's (its update and the
tensor-table readers) about 3.5 s on the 2-core machine of ``bench/RESULTS.md``. The two sets do
not depend on each other, so ``start`` launches a fresh interpreter that builds the run's
optimizer over a model of the run's shapes and steps it twice (zero gradients), which compiles
exactly the optimizer kernels the run will call into numba's disk cache; the run compiles batch
norm's meanwhile, ``wait``s, and its own first step loads the optimizer's from the cache.

The worker is started only when it can pay for itself (``worthwhile``): the run uses the numba
CPU backend, not under MPI (every rank is a process already), with a second core free, and the
cache holds no compiled tensor-table reader under the current sources, the sign of a first run
(later runs load every kernel in a fraction of a second, less than a worker takes to start).

It is an optimization only: the run's results do not depend on it. If the worker fails, the run
compiles the optimizer's kernels itself, as it would without one, and says so in a
``RuntimeWarning`` that carries the worker's error.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
import warnings

from .. import precompile

__all__ = ["Worker", "start", "worthwhile"]

TIMEOUT = 300.0  # seconds: far above the ~5 s the worker takes; past it the run compiles itself


def worthwhile(backend, comm) -> bool:
    """Whether a background compile can shorten this run's warm-up (see the module docstring)."""
    # backend None is numba for the demo's NumPy arrays
    if comm is not None or precompile.available_cores() < 2 or backend not in (None, "numba"):
        return False
    from ..kernels.numba_cpu import multi

    return not multi.readers_cached()


class Worker:
    """A started background compile; ``wait`` before the run's first optimizer step."""

    def __init__(self, process: subprocess.Popen, errors):
        self.process = process
        self.errors = errors  # a temporary file: the worker's stderr

    def wait(self, timeout: float = TIMEOUT) -> bool:
        """Wait for the worker; True when it compiled everything. On a failure or after
        ``timeout`` seconds (the worker is then killed) it warns and returns False."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            warnings.warn(f"the background compile of the optimizer's kernels took over {timeout:g} s and was "
                          "stopped; the run compiles them itself", RuntimeWarning, stacklevel=2)
            return False
        self.errors.seek(0)
        tail = self.errors.read().decode(errors="replace").strip().splitlines()[-3:]
        self.errors.close()
        if self.process.returncode != 0:
            warnings.warn(f"the background compile of the optimizer's kernels failed (exit status "
                          f"{self.process.returncode}: {' / '.join(tail)}); the run compiles them itself",
                          RuntimeWarning, stacklevel=2)
            return False
        return True

    def stop(self) -> None:
        """Kill the worker if it still runs (the run ended or failed before ``wait``)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.errors.close()


def start(**run) -> Worker:
    """Start the worker for the run described by ``run`` (the keywords of ``_compile_optimizer``)."""
    import fastopt

    errors = tempfile.TemporaryFile()  # a file, not a pipe: nothing to drain while the worker runs
    # the same interpreter and environment; main() checks that it imported this fastopt
    process = subprocess.Popen([sys.executable, "-c", "from fastopt.demo.background import main; main()"],
                               stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors)
    # a few hundred bytes, less than a pipe holds: writing them does not wait for the child
    process.stdin.write(pickle.dumps({**run, "package": fastopt.__file__}))
    process.stdin.close()
    return Worker(process, errors)


def _compile_optimizer(*, optimizer, hyper, backend, sizes, dtype, precision) -> None:
    """Two steps of the run's optimizer (name, hyperparameters, backend, parameter dtype and
    precision keywords) on zero gradients of an MLP of ``sizes``: the run's optimizer kernels,
    called with the run's types, compile into numba's disk cache."""
    import numpy as np

    from .mlp import MLP
    from .train import _Params, make_optimizer, param_dtype

    model = MLP(sizes, rng=np.random.default_rng(0), backend=backend)
    params = _Params(model, param_dtype(dtype))
    params.load()
    opt = make_optimizer(optimizer, params.arrays, hyper, backend, None, **precision)
    for _ in range(2):
        opt.step(model.grads)
        params.load()


def main() -> None:
    """The worker's entry: the run's description, pickled, on stdin."""
    import fastopt

    run = pickle.loads(sys.stdin.buffer.read())
    package = run.pop("package")
    if fastopt.__file__ != package:  # another fastopt would fill the cache for other kernels
        raise RuntimeError(f"the worker imported fastopt from {fastopt.__file__}, the run from {package}")
    _compile_optimizer(**run)
