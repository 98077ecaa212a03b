"""``fastopt compile``: the ``"numba"`` backend's CPU kernels compiled ahead of time, on disk.

A kernel compiles for one dtype at its first call (``fastopt.kernels.numba_cpu._jit``) and numba
keeps the result on disk (``cache=True``), so a program's first run pays for compiling and later
runs load. ``fastopt compile`` pays it up front, for example in a container build: every kernel
of the selected operations (``KERNELS`` of ``fastopt.kernels.numba_cpu``: an optimizer's every
configuration and its averaged variant, batch norm in both layouts), for each selected dtype (the
optimizers' tensor-table readers, whose one signature serves every dtype, once), and
on request the low-precision kernels (16-bit parameters, 8-bit or bfloat16 state) in the
defaults of ``fastopt.precision`` (``low_precision_kernels`` of the backend). The
cache must be the one the program will use: the same ``NUMBA_CACHE_DIR``, or numba's default
(the ``__pycache__`` folders beside the kernel sources when writable, else a per-user folder), on
the same CPU model and with the same versions of fastopt, numba and Python.

LLVM compiles on one core; ``workers`` > 1 compiles in that many processes, each kernel function
(both its dtypes) in one of them: numba's cache index of a function is read, updated and
rewritten by the process that compiles it, and two processes writing one index at once could
lose an entry.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Iterable

__all__ = ["DTYPES", "LOW_DTYPES", "STATE_DTYPES", "Job", "Result", "available_cores", "compile_kernels",
           "default_workers", "kernels", "jobs"]

DTYPES = ("float32", "float64")  # the default: what ``KERNELS`` holds
LOW_DTYPES = ("bfloat16", "float16")  # 16-bit parameters: asked for by name
STATE_DTYPES = ("float32", "int8", "bfloat16")


def kernels() -> dict[str, dict]:
    """Operation -> {kernel name: kernel} (imports the numba backend)."""
    from .kernels.numba_cpu import KERNELS

    return KERNELS


def _table(op: str, precision: tuple | None) -> dict:
    """{kernel name: kernel} of ``op``: ``KERNELS``'s, or for ``precision`` = (parameter dtype,
    state dtype) the low-precision kernels (``low_precision_kernels``)."""
    if precision is None:
        return kernels()[op]
    from .kernels.numba_cpu import low_precision_kernels

    return low_precision_kernels(op, *precision)


@dataclass(frozen=True)
class Job:
    """One kernel to compile for one dtype; ``ops`` are the selected operations that use it.
    ``precision``: (parameter dtype, state dtype) of a low-precision kernel, whose one signature
    computes in ``dtype`` float32; None for the kernels of ``KERNELS``."""

    name: str
    dtype: str
    kernel: object
    ops: tuple[str, ...]
    precision: tuple | None = None

    def key(self) -> tuple:
        """(operation, kernel name, dtype, precision): finds the job in another process."""
        return self.ops[0], self.name, self.dtype, self.precision

    @property
    def any_dtype(self) -> bool:
        """A kernel with one signature for every dtype (no float argument: the tensor-table readers)."""
        return self.dtype not in DTYPES

    def label(self) -> str:
        """The dtype as a user asked for it: "float32", or "bfloat16", "float32/int8-state", ...;
        "any" for a kernel that serves every dtype."""
        if self.any_dtype:
            return "any"
        if self.precision is None:
            return self.dtype
        dtype, state = self.precision
        return dtype if state == "float32" else f"{dtype}/{state}-state"


@dataclass
class Result:
    """``cached``: numba loaded the kernel from its disk cache instead of compiling it."""

    job: Job
    seconds: float
    cached: bool
    error: str | None = None


def jobs(ops: Iterable[str] | None = None, dtypes: Iterable[str] | None = None,
         state_dtype: str = "float32") -> list[Job]:
    """The (kernel, dtype) pairs of ``ops`` (default: every operation), each kernel once, in
    operation order. ``dtypes``: of ``DTYPES`` (the default: both) and ``LOW_DTYPES`` (16-bit
    parameters); ``state_dtype`` "int8" or "bfloat16": the optimizers' kernels with that state, for
    float32 parameters (or the 16-bit ``dtypes``), and those with float32 state that the same
    optimizer runs on its tensors under ``min_8bit_size`` elements. Raises ValueError naming an
    unknown operation or dtype."""
    table = kernels()
    ops = list(dict.fromkeys(ops)) if ops else list(table)
    unknown = [op for op in ops if op not in table]
    if unknown:
        raise ValueError(f"unknown operation {', '.join(map(repr, unknown))} (choose from {', '.join(table)})")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"unknown state dtype {state_dtype!r} (choose from {', '.join(STATE_DTYPES)})")
    dtypes = list(dict.fromkeys(dtypes)) if dtypes else list(DTYPES if state_dtype == "float32" else ["float32"])
    bad = [d for d in dtypes if d not in DTYPES + LOW_DTYPES]
    if bad:
        raise ValueError(f"unknown dtype {', '.join(map(repr, bad))} (choose from {', '.join(DTYPES + LOW_DTYPES)})")
    if state_dtype != "float32" and "float64" in dtypes:
        raise ValueError(f"state_dtype {state_dtype!r} is for float32, bfloat16 and float16 parameters, not float64")
    users: dict[tuple, list] = {}
    named: dict[tuple, tuple] = {}
    for op in ops:
        for dtype in dtypes:
            precisions = [(dtype, state_dtype)]
            if dtype in DTYPES and state_dtype == "float32":
                precisions = [None]
            elif dtype in LOW_DTYPES and op.startswith("batchnorm"):  # 16-bit x: float32 kernels in between
                precisions.append(None)
            elif state_dtype != "float32" and _table(op, (dtype, state_dtype)):
                # tensors under min_8bit_size keep float32 state: the kernels they launch too
                precisions.append(None if dtype in DTYPES else (dtype, "float32"))
            for precision in precisions:
                compiled = "float32" if dtype in LOW_DTYPES or precision else dtype
                for name, k in _table(op, precision).items():
                    if compiled in k.dtypes:
                        key = (id(k), compiled)
                    elif not any(d.startswith("float") for d in k.dtypes):  # one signature for every dtype
                        key = (id(k), k.dtypes[0])
                    else:
                        continue
                    named.setdefault(key, (name, k, precision))
                    users.setdefault(key, []).append(op)
    return [Job(named[key][0], key[1], named[key][1], tuple(users[key]), named[key][2]) for key in named]


def _compile(job: Job) -> Result:
    start = time.perf_counter()
    try:
        dispatchers = job.kernel.compile(job.dtype)
    except Exception as exc:  # noqa: BLE001 - reported per kernel, the others still compile
        return Result(job, time.perf_counter() - start, False, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - start
    cached = all(not d.stats.cache_misses and d.stats.cache_hits for d in dispatchers)
    return Result(job, seconds, cached)


def _compile_in_worker(keys: list[tuple]) -> list[tuple[float, bool, str | None]]:
    results = []
    for op, name, dtype, precision in keys:
        r = _compile(Job(name, dtype, _table(op, precision)[name], (op,), precision))
        results.append((r.seconds, r.cached, r.error))
    return results


MAX_WORKERS = 8  # each worker is a Python process with numba and LLVM loaded, ~200 MB
FUNCTIONS_PER_WORKER = 4  # a worker's start (a new interpreter importing numba and fastopt, ~1.5 s) pays
                          # for itself once it has a few kernel functions (0.2-2 s each) to compile


def default_workers(selected: list[Job]) -> int:
    """Processes for ``selected`` when the user names none: one per available core, at most
    ``MAX_WORKERS``, and only as many as give each ``FUNCTIONS_PER_WORKER`` kernel functions (a
    function's jobs compile in one process)."""
    functions = len({id(job.kernel.py_func) for job in selected})
    return max(1, min(available_cores(), MAX_WORKERS, functions // FUNCTIONS_PER_WORKER))


def available_cores() -> int:
    """The cores this process may run on (its affinity mask on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def compile_kernels(selected: list[Job], on_result: Callable[[Result], None] | None = None, *,
                    workers: int = 1) -> list[Result]:
    """Compile (or load from the disk cache) each job, in this process or in ``workers`` new
    ones; ``on_result`` is called after each job (from a worker: after each kernel function).
    Returns the results in the order of ``selected``."""
    if workers <= 1:
        results = []
        for job in selected:
            result = _compile(job)
            results.append(result)
            if on_result is not None:
                on_result(result)
        return results
    import multiprocessing

    groups: dict[int, list[Job]] = {}
    for job in selected:
        groups.setdefault(id(job.kernel.py_func), []).append(job)
    done: dict[Job, Result] = {}
    # spawn: a fresh interpreter per worker, nothing of this process's numba state inherited
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        # the parallel kernels' groups first (numba's parfor lowering makes them the longest jobs,
        # 1-2 s each; the shells of runners.py and tasks.py are shorter): the longest jobs started
        # first leave short ones to even out the workers' ends
        ordered = sorted(groups.values(), key=lambda group: not group[0].kernel.parallel)
        futures = {pool.submit(_compile_in_worker, [j.key() for j in group]): group for group in ordered}
        for future in as_completed(futures):
            for job, (seconds, cached, error) in zip(futures[future], future.result()):
                done[job] = Result(job, seconds, cached, error)
                if on_result is not None:
                    on_result(done[job])
    return [done[job] for job in selected]
