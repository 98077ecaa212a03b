"""``fastopt compile``: the ``"numba"`` backend's CPU kernels compiled ahead of time, on disk.

A kernel compiles for one dtype at its first call (``fastopt.kernels.numba_cpu._jit``) and numba
keeps the result on disk (``cache=True``), so a program's first run pays for compiling and later
runs load. ``fastopt compile`` pays it up front, for example in a container build: every kernel
of the selected operations (``KERNELS`` of ``fastopt.kernels.numba_cpu``: an optimizer's every
configuration and its averaged variant, batch norm in both layouts), for each selected dtype. The
cache must be the one the program will use: the same ``NUMBA_CACHE_DIR``, or numba's default
(the ``__pycache__`` folders beside the kernel sources when writable, else a per-user folder), on
the same CPU model and with the same versions of fastopt, numba and Python.

LLVM compiles on one core; ``workers`` > 1 compiles in that many processes, each kernel function
(both dtypes, both variants of an optimizer kernel) in one of them: numba's cache index of a
function is read, updated and rewritten by the process that compiles it, and two processes
writing one index at once could lose an entry.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Iterable

__all__ = ["DTYPES", "Job", "Result", "compile_kernels", "kernels", "jobs"]

DTYPES = ("float32", "float64")


def kernels() -> dict[str, dict]:
    """Operation -> {kernel name: kernel} (imports the numba backend)."""
    from .kernels.numba_cpu import KERNELS

    return KERNELS


@dataclass(frozen=True)
class Job:
    """One kernel to compile for one dtype; ``ops`` are the selected operations that use it."""

    name: str
    dtype: str
    kernel: object
    ops: tuple[str, ...]

    def key(self) -> tuple[str, str, str]:
        """(operation, kernel name, dtype): finds the job in another process."""
        return self.ops[0], self.name, self.dtype


@dataclass
class Result:
    """``cached``: numba loaded the kernel from its disk cache instead of compiling it."""

    job: Job
    seconds: float
    cached: bool
    error: str | None = None


def jobs(ops: Iterable[str] | None = None, dtypes: Iterable[str] | None = None) -> list[Job]:
    """The (kernel, dtype) pairs of ``ops`` (default: every operation), each kernel once, in
    operation order. Raises ValueError naming an unknown operation or dtype."""
    table = kernels()
    ops = list(dict.fromkeys(ops)) if ops else list(table)
    unknown = [op for op in ops if op not in table]
    if unknown:
        raise ValueError(f"unknown operation {', '.join(map(repr, unknown))} (choose from {', '.join(table)})")
    dtypes = list(dict.fromkeys(dtypes)) if dtypes else list(DTYPES)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtype {', '.join(map(repr, bad))} (choose from {', '.join(DTYPES)})")
    users: dict[tuple, list] = {}
    named: dict[tuple, tuple] = {}
    for op in ops:
        for name, k in table[op].items():
            for dtype in dtypes:
                if dtype in k.dtypes:
                    key = (id(k), dtype)
                    named.setdefault(key, (name, k))
                    users.setdefault(key, []).append(op)
    return [Job(named[key][0], key[1], named[key][1], tuple(users[key])) for key in named]


def _compile(job: Job) -> Result:
    start = time.perf_counter()
    try:
        dispatchers = job.kernel.compile(job.dtype)
    except Exception as exc:  # noqa: BLE001 - reported per kernel, the others still compile
        return Result(job, time.perf_counter() - start, False, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - start
    cached = all(not d.stats.cache_misses and d.stats.cache_hits for d in dispatchers)
    return Result(job, seconds, cached)


def _compile_in_worker(keys: list[tuple[str, str, str]]) -> list[tuple[float, bool, str | None]]:
    table = kernels()
    results = []
    for op, name, dtype in keys:
        r = _compile(Job(name, dtype, table[op][name], (op,)))
        results.append((r.seconds, r.cached, r.error))
    return results


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
        futures = {pool.submit(_compile_in_worker, [j.key() for j in group]): group for group in groups.values()}
        for future in as_completed(futures):
            for job, (seconds, cached, error) in zip(futures[future], future.result()):
                done[job] = Result(job, seconds, cached, error)
                if on_result is not None:
                    on_result(done[job])
    return [done[job] for job in selected]
