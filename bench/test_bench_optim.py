"""pytest-benchmark timings of one optimizer step, over size × backend (and torch where installed).

Not part of the test suite (``testpaths`` is ``tests``). Run:

    python -m pytest bench/test_bench_optim.py --benchmark-json=bench.json

Each benchmark warms up (JIT compile, first-touch of the state) before timing, and records the
bytes moved per step in ``extra_info`` so GB/s can be computed from the JSON.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from traffic import bytes_per_element

SIZES = [2**16, 2**20, 2**24]
CONFIGS = {
    "sgd-momentum": ("SGD", "sgd", dict(lr=0.01, momentum=0.9), "SGD"),
    "rmsprop": ("RMSProp", "rmsprop", dict(lr=0.01), "RMSprop"),
    "adam": ("Adam", "adam", dict(lr=1e-3), "Adam"),
}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["numba", "numpy", "torch"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_step(benchmark, config, impl, n):
    cls_name, spec_name, kwargs, torch_name = CONFIGS[config]
    p = np.zeros(n, np.float32)
    g = np.full(n, 1e-3, np.float32)
    if impl == "torch":
        torch = pytest.importorskip("torch", reason="torch is not installed")
        tp = torch.from_numpy(p)
        tp.grad = torch.from_numpy(g)
        torch_kwargs = {"alpha" if k == "rho" else k: v for k, v in kwargs.items()}
        opt = getattr(torch.optim, torch_name)([tp], **torch_kwargs, foreach=True)
        run = opt.step
    else:
        opt = getattr(fastopt, cls_name)([p], **kwargs, backend=impl)
        run = lambda: opt.step([g])  # noqa: E731
    run()  # warm-up: compile and allocate state before timing
    benchmark.extra_info["bytes_per_step"] = bytes_per_element(spec_name, kwargs, 4) * n
    benchmark(run)
