"""Timing: interleaved medians, and the in-place STREAM kernel that measures the memory bandwidth.

Absolute times on a shared machine drift from second to second (another process takes a core, the
host moves the memory bandwidth), so every row of a benchmark is timed by one call of
``sample_interleaved``: warm-up calls first, then rounds in which each contestant (the kernel, the
bandwidth kernel, torch, the NumPy reference) runs once, in an order that rotates from round to
round. A drift then hits all contestants alike, and the ratios of their medians (speed-up over
torch, % of the bandwidth) are far steadier than the medians themselves.

A contestant also changes the machine for the next one: after the single-threaded NumPy reference
the idle virtual CPU has been descheduled and the next parallel call waits for it, and torch's
OpenMP threads spin for a while after each parallel region. So each parallel contestant gets, right
before each timed call and untimed, a small parallel call of its own runtime (``setups``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import numba
import numpy as np

__all__ = ["STREAM_FORMULA", "IdleGate", "median", "repeated", "sample_interleaved", "stream_in_place", "Stream",
           "torch_wake"]

STREAM_FORMULA = "a[i] += s·b[i]: read a, read b, write a (in place) = 3 × itemsize"


@numba.njit(["void(float32[::1], float32[::1], float32)", "void(float64[::1], float64[::1], float64)"],
            parallel=True, cache=True)
def stream_in_place(a, b, s):
    """a[i] += s·b[i], in parallel: 3 × itemsize bytes per element, every byte moved counted.

    A classic triad into a separate output (c[i] = a[i] + s·b[i]) also counts 3 × itemsize, but moves
    4: the output's cache lines are read before they are written (write-allocate), so it reports a
    quarter less bandwidth than the memory delivers and flatters every ratio against it.
    """
    for i in numba.prange(a.size):
        a[i] += s * b[i]


class Stream:
    """The bandwidth reference: ``stream_in_place`` over two arrays of ``n`` elements of ``dtype``."""

    def __init__(self, n: int, dtype):
        self.dtype = np.dtype(dtype)
        self.n = int(n)
        self.a = np.zeros(self.n, self.dtype)
        self.b = np.ones(self.n, self.dtype)
        self.s = self.dtype.type(0.0)  # a stays 0: the values never grow into denormals or inf
        self.bytes = 3 * self.dtype.itemsize * self.n

    def __call__(self) -> None:
        stream_in_place(self.a, self.b, self.s)

    def gbps(self, seconds: float) -> float:
        return self.bytes / seconds / 1e9


def torch_wake(torch) -> Callable[[], object]:
    """A small parallel call in torch's thread pool (an in-place add over 2**20 float32 values,
    above torch's grain size, so every thread takes part): run untimed before each timed torch
    call, as ``Stream(2**16)`` is before numba's (see ``sample_interleaved``'s ``setups``)."""
    buffer = torch.zeros(1 << 20)
    return lambda: buffer.add_(0.0)


def median(samples) -> float:
    return float(np.median(np.asarray(samples, dtype=float)))


class IdleGate:
    """Waits, before a timing round, until the rest of the machine is idle (Linux ``/proc/stat``).

    On a machine shared with other jobs, a parallel kernel whose thread is descheduled waits for it,
    so one busy neighbour can double a time. Before each round the gate samples the CPU time all
    processes used during ``window`` seconds, while this process sleeps; when that is below
    ``threshold`` of the machine it returns at once, otherwise it samples again, for at most
    ``patience`` seconds, and then lets the round run anyway. ``rounds`` and ``idle_rounds`` count
    how many rounds asked and how many started on an idle machine.

    Waiting idles this process's cores too, and on a virtual machine the host deschedules idle
    virtual CPUs: the first parallel call after the wait then waits milliseconds for them (seen
    here as single samples of 11–14 ms in a row whose median is 4). ``wake`` (e.g. the STREAM
    kernel), called ``wake_calls`` times after each wait, untimed, gets them running again.
    """

    def __init__(self, patience: float, threshold: float = 0.1, window: float = 0.05,
                 wake: Callable[[], object] | None = None, wake_calls: int = 2):
        self.patience, self.threshold, self.window = patience, threshold, window
        self.wake, self.wake_calls = wake, wake_calls
        self.rounds = self.idle_rounds = 0

    @staticmethod
    def _busy_and_total() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return sum(ticks) - idle, sum(ticks)

    def busy_fraction(self) -> float | None:
        first = self._busy_and_total()
        if first is None:
            return None
        time.sleep(self.window)
        second = self._busy_and_total()
        return (second[0] - first[0]) / max(1, second[1] - first[1])

    def __call__(self) -> None:
        self.rounds += 1
        self._wait()
        for _ in range(self.wake_calls if self.wake is not None else 0):
            self.wake()

    def _wait(self) -> None:
        deadline = time.perf_counter() + self.patience
        while True:
            busy = self.busy_fraction()
            if busy is None:
                return
            if busy < self.threshold:
                self.idle_rounds += 1
                return
            if time.perf_counter() >= deadline:
                return


def repeated(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    """``fn`` called ``calls`` times back to back, as one contestant (divide its times by ``calls``)."""
    if calls == 1:
        return fn

    def block() -> None:
        for _ in range(calls):
            fn()

    return block


def sample_interleaved(contestants: dict[str, Callable[[], object]], repeats: dict[str, int],
                       warmup: int = 1, before_round: Callable[[], object] | None = None,
                       setups: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Wall times (seconds) of each contestant: ``warmup`` untimed calls each, then rounds in which
    every contestant still short of its ``repeats`` runs once, in an order that rotates per round.

    ``before_round`` (e.g. an ``IdleGate``) runs before each round, outside the timings;
    ``setups[name]`` (e.g. the STREAM kernel, to evict the caches) right before each timed call of
    that contestant, outside its timing. The garbage collector is off while timing (as ``timeit``
    does).
    """
    setups = setups or {}
    names = list(contestants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            contestants[name]()
    rounds = max((repeats.get(name, 0) for name in names), default=0)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            if before_round is not None:
                before_round()
            k = r % len(names)
            for name in names[k:] + names[:k]:
                if len(samples[name]) < repeats.get(name, 0):
                    if name in setups:
                        setups[name]()
                    t0 = time.perf_counter()
                    contestants[name]()
                    samples[name].append(time.perf_counter() - t0)
    finally:
        if enabled:
            gc.enable()
    return samples
