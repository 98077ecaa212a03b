"""pytest-benchmark: every row of ``fastopt bench`` × implementation (numba, the NumPy reference, torch).

Each benchmark builds the row exactly as ``fastopt bench`` does (``fastopt.benchmark.all_cases``),
verifies the kernel against the reference on the same inputs (a mismatch errors the benchmark),
warms up once, then times ``--bench-rounds`` calls. ``extra_info`` holds the compulsory bytes, so
GB/s follows from the JSON: bytes / stats.median. ``test_bandwidth`` times the in-place STREAM
kernel (``a[i] += s·b[i]``) that ``fastopt bench`` compares every row with.
"""

from __future__ import annotations

import pytest

from fastopt.benchmark import Skip, Stream, all_cases

CASES = all_cases()


@pytest.mark.parametrize("impl", ["numba", "numpy", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel(benchmark, bench_settings, bench_rounds, case, impl):
    try:
        prepared = case.build(bench_settings, "numpy" if impl == "numpy" else "numba")
    except Skip as exc:
        pytest.skip(str(exc))
    prepared.verify()  # before timing: a kernel that disagrees with the reference is not timed
    if impl == "torch":
        if prepared.torch is None:
            pytest.skip(prepared.torch_reason)
        prepared.torch_check()
        fn = prepared.torch
        benchmark.extra_info["torch_impl"] = prepared.torch_impl
    else:
        fn = prepared.run
    traffic = prepared.traffic()
    benchmark.extra_info.update(elements=prepared.elements, bytes=traffic.bytes(prepared.elements),
                                bytes_per_element=traffic.bytes_per_element, traffic=traffic.formula)
    benchmark.group = case.name
    # rows that fit in the cache time blocks of back-to-back calls, as ``fastopt bench`` does
    benchmark.pedantic(fn, rounds=bench_rounds, warmup_rounds=1, iterations=prepared.calls_per_sample)


def test_bandwidth(benchmark, bench_settings, bench_rounds):
    stream = Stream(bench_settings.n, bench_settings.dtype)
    benchmark.extra_info.update(elements=stream.n, bytes=stream.bytes, bytes_per_element=3 * stream.dtype.itemsize,
                                traffic="a[i] += s·b[i]: read a, b; write a (in place)")
    benchmark.group = "bandwidth"
    benchmark.pedantic(stream, rounds=bench_rounds, warmup_rounds=1, iterations=1)
