"""pytest-benchmark suites over the rows of ``fastopt.benchmark`` (the same calls ``fastopt bench`` times).

Not part of the test suite (``testpaths`` is ``tests``). Run, for example:

    python -m pytest bench/ --benchmark-only -p no:cacheprovider
    python -m pytest bench/ --benchmark-only -k "adam and numba" --benchmark-json=bench.json
    python -m pytest bench/ --benchmark-only --bench-small      # tiny sizes: checks the suites only

Options: ``--bench-small`` (the sizes of ``fastopt bench --small``), ``--bench-rounds N`` (timed
rounds per benchmark, default 11).
"""

from __future__ import annotations

import numba
import pytest

from fastopt.benchmark import Settings
from fastopt.benchmark.cli import SMALL


def pytest_addoption(parser):
    group = parser.getgroup("fastopt bench")
    group.addoption("--bench-small", action="store_true", help="tiny sizes (the timings mean nothing)")
    group.addoption("--bench-rounds", type=int, default=11, help="timed rounds per benchmark (default 11)")


@pytest.fixture(scope="session")
def bench_settings(request) -> Settings:
    settings = Settings()
    if request.config.getoption("--bench-small"):
        settings.n, settings.bn_shape, settings.full_size_many_tensors = SMALL["n"], SMALL["bn_shape"], False
    try:
        import torch
    except ImportError:
        pass
    else:
        torch.set_num_threads(numba.get_num_threads())
        settings.torch = torch
    return settings


@pytest.fixture(scope="session")
def bench_rounds(request) -> int:
    return request.config.getoption("--bench-rounds")
