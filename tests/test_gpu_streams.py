"""Streams on a real GPU: the GPU backends order their work with the producers of their inputs.

Marked ``gpu``; every test skips with the reason where it cannot run (no CUDA device, torch without
CUDA, CuPy not installed, the CUDA simulator). Each runs a step through the public API on device
arrays and compares with the same calls on float64 NumPy copies with ``backend="numpy"``.

* torch tensors under ``torch.cuda.stream(side)`` whose gradient is written on ``side`` only after a
  long ``torch.cuda._sleep``: the update, the non-finite check (``nonfinite="skip"``, which reads
  the norm on the host), ``clip_grad_norm_`` and batch norm must all see the written values;
* ``torch.cuda.graph`` capture of a whole optimizer step (tensor list, fused norm clipping), then
  replays with new gradients;
* CuPy arrays on a non-blocking CuPy stream, and numba device arrays bound to a numba stream while
  CuPy's current stream is another one, each produced after a spinning kernel;
* two host threads stepping at once, each on its own stream (torch side streams; CuPy's per-thread
  default stream), sharing one list of gradients (one cached tensor table, two streams).

The stream rules themselves are tested without a GPU in tests/test_cuda_streams.py.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import fastopt

from conftest import assert_close

BACKENDS = ["numba-cuda", "cupy"]
SLEEP_CYCLES = 200_000_000  # ~0.1 s of a spinning GPU thread: far longer than queuing the step takes
SPIN_SOURCE = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
"""


def _simulated() -> str:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1: the simulator is not a GPU"
    return ""


def _backend_reason(name: str) -> str:
    info = fastopt.backends()[name]
    return "" if info.available else f"backend {name!r}: {info.reason}"


def _torch_reason() -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return "" if torch.cuda.is_available() else "torch has no CUDA device (CPU build or no GPU)"


def _cupy_reason() -> str:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    return _backend_reason("cupy")


def reasons(backend: str, *, torch=False, cupy=False) -> str:
    """Why a test of ``backend`` (with torch tensors, with CuPy arrays) cannot run here, or "": the
    first reason found (torch is imported only when the backend can run)."""
    checks = [_simulated, lambda: _backend_reason(backend)]
    checks += [_torch_reason] if torch else []
    checks += [_cupy_reason] if cupy else []
    for check in checks:
        reason = check()
        if reason:
            return reason
    return ""


def skip_unless(reason: str):
    if reason:
        pytest.skip(f"no GPU: {reason}")


pytestmark = pytest.mark.gpu


# ---------------------------------------------------------------------------------------------
# helpers


def to_host(a) -> np.ndarray:
    """A float64 host copy of a torch tensor, CuPy array or numba device array (synchronizes)."""
    if type(a).__module__.split(".")[0] == "torch":
        return a.detach().cpu().numpy().astype(np.float64)
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get().astype(np.float64)
    return a.copy_to_host().astype(np.float64)


def reference_adam(p0, g0, *, step=1, lr=1e-2):
    p, m, v = p0.astype(np.float64), np.zeros(p0.shape), np.zeros(p0.shape)
    fastopt.functional.adam_step(p, g0.astype(np.float64), m, v, step=step, lr=lr, backend="numpy")
    return p, m, v


def check_adam(p, m, v, p0, g0, what):
    rp, rm, rv = reference_adam(p0, g0)
    assert_close(to_host(p).astype(np.float32), rp, np.float32, f"{what}: param", before=p0)
    assert_close(to_host(m).astype(np.float32), rm, np.float32, f"{what}: m")
    assert_close(to_host(v).astype(np.float32), rv, np.float32, f"{what}: v")


# ---------------------------------------------------------------------------------------------
# torch side streams


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_waits_for_a_slow_producer_on_torchs_side_stream(backend, rng):
    skip_unless(reasons(backend, torch=True))
    import torch

    n = (1 << 20) + 3
    p0, g0 = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    p, source = torch.from_numpy(p0).cuda(), torch.from_numpy(g0).cuda()
    g, m, v = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)  # the producer is slow ...
        g.copy_(source)  # ... and writes the gradient only then, on the side stream
        fastopt.functional.adam_step(p, g, m, v, step=1, lr=1e-2, backend=backend)
    side.synchronize()
    check_adam(p, m, v, p0, g0, f"{backend} on a torch side stream")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_skip_and_clipping_read_the_norm_of_the_written_gradient(backend, rng):
    """The norm goes to the host (``nonfinite="skip"``, ``clip_grad_norm_``'s return value): the
    host must wait for the kernel that computed it, on the side stream, after the producer."""
    skip_unless(reasons(backend, torch=True))
    import torch

    n = 100_003
    p0, g0 = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    p, g = torch.from_numpy(p0).cuda(), torch.from_numpy(g0).cuda()
    opt = fastopt.Adam([p], lr=1e-2, nonfinite="skip", backend=backend)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        g.fill_(float("nan"))  # written late: a stale norm would be finite
        opt.step([g])
    torch.cuda.synchronize()
    assert opt.skipped_steps == 1
    np.testing.assert_array_equal(to_host(p), p0.astype(np.float64))

    g.copy_(torch.from_numpy(g0).cuda())
    scaled = torch.zeros(n, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        scaled.copy_(g)
        norm = fastopt.clip_grad_norm_([scaled], 0.5, backend=backend)
    torch.cuda.synchronize()
    expected = float(np.sqrt(np.sum(g0.astype(np.float64) ** 2)))
    assert norm == pytest.approx(expected, rel=1e-9)
    reference = g0.astype(np.float64) * (0.5 / (expected + 1e-6))
    assert_close(to_host(scaled).astype(np.float32), reference, np.float32, f"{backend}: clipped gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_waits_for_a_slow_producer_on_torchs_side_stream(backend, rng):
    skip_unless(reasons(backend, torch=True))
    import torch

    shape = (32, 16, 33, 17)
    x0 = (2 * rng.standard_normal(shape) + 0.5).astype(np.float32)
    source = torch.from_numpy(x0).cuda()
    x = torch.zeros(shape, device="cuda")
    weight, bias = torch.ones(16, device="cuda"), torch.zeros(16, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        x.copy_(source)
        y, mean, invstd = fastopt.batchnorm_forward(x, weight, bias, None, None, training=True, backend=backend)
    side.synchronize()
    ry, rmean, rinvstd = fastopt.batchnorm_forward(x0.astype(np.float64), np.ones(16), np.zeros(16), None, None,
                                                   training=True, backend="numpy")
    tol = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_host(mean), rmean, **tol)
    np.testing.assert_allclose(to_host(invstd), rinvstd, **tol)
    np.testing.assert_allclose(to_host(y), ry, **tol)


# ---------------------------------------------------------------------------------------------
# CUDA graphs


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_captured_step_replays_the_update(backend, rng):
    """A whole step (two tensors in one tensor-list launch, the norm and its clip factor computed
    on the device) captured under ``torch.cuda.graph`` after one warm-up step, then replayed with new
    gradients copied into the same tensors: each replay is one more step of the reference."""
    skip_unless(reasons(backend, torch=True))
    import torch

    shapes = [(1000,), (3, 70_001)]
    hyper = dict(lr=0.05, momentum=0.9, clip_grad_norm=1.0)
    host_params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params = [torch.from_numpy(a).cuda() for a in host_params]
    grads = [torch.zeros(s, device="cuda") for s in shapes]
    ref_params = [a.astype(np.float64) for a in host_params]
    opt = fastopt.SGD(params, backend=backend, **hyper)
    ref = fastopt.SGD(ref_params, backend="numpy", **hyper)

    def new_grads():
        values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        for g, value in zip(grads, values):
            g.copy_(torch.from_numpy(value).cuda())
        return [value.astype(np.float64) for value in values]

    ref.step(new_grads())
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())  # after the gradients' copies
    with torch.cuda.stream(warm):  # the warm-up torch asks for: compiles, uploads the tables
        opt.step(grads)
    torch.cuda.current_stream().wait_stream(warm)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step(grads)
    torch.cuda.synchronize()
    for a, r in zip(params, ref_params):  # capturing runs nothing
        assert_close(to_host(a).astype(np.float32), r, np.float32, f"{backend}: after capture")
    for replay in range(3):
        expected_grads = new_grads()
        torch.cuda.synchronize()
        graph.replay()
        ref.step(expected_grads)
        torch.cuda.synchronize()
        for k, (a, r) in enumerate(zip(params, ref_params)):
            assert_close(to_host(a).astype(np.float32), r, np.float32, f"{backend}: replay {replay}, param {k}")


# ---------------------------------------------------------------------------------------------
# CuPy streams, numba streams


def _spin(cupy, stream, cycles=SLEEP_CYCLES):
    """A one-thread kernel on ``stream`` that spins for ``cycles`` clock cycles."""
    kernel = cupy.RawKernel(SPIN_SOURCE, "spin")
    with stream:  # RawKernel launches on CuPy's current stream
        kernel((1,), (1,), (np.int64(cycles),))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cupy_arrays_on_a_non_blocking_stream(backend, rng):
    skip_unless(reasons(backend, cupy=True))
    import cupy

    n = (1 << 20) + 3
    p0, g0 = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    p, source = cupy.asarray(p0), cupy.asarray(g0)
    g, m, v = cupy.zeros(n, np.float32), cupy.zeros(n, np.float32), cupy.zeros(n, np.float32)
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        _spin(cupy, stream)
        g[...] = source  # written on the non-blocking stream after the spin
        fastopt.functional.adam_step(p, g, m, v, step=1, lr=1e-2, backend=backend)
    stream.synchronize()
    check_adam(p, m, v, p0, g0, f"{backend} on a non-blocking CuPy stream")


@pytest.mark.parametrize("backend", BACKENDS)
def test_numba_arrays_bound_to_a_stream_other_than_cupys(backend, rng):
    """numba device arrays bound to a numba stream, written there after a spinning kernel, while
    CuPy's current stream is a non-blocking one: the step must follow the arrays' stream."""
    skip_unless(reasons(backend, cupy=True))
    import cupy
    from numba import cuda

    n = (1 << 20) + 3
    p0, g0 = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    producer = cuda.stream()
    p = cuda.to_device(p0, stream=producer)
    g = cuda.device_array(n, np.float32, stream=producer)
    m = cuda.to_device(np.zeros(n, np.float32), stream=producer)
    v = cuda.to_device(np.zeros(n, np.float32), stream=producer)
    producer.synchronize()
    with cupy.cuda.Stream(non_blocking=True):
        _spin(cupy, cupy.cuda.ExternalStream(int(producer)))
        g.copy_to_device(g0, stream=producer)  # queued on the producer's stream after the spin
        fastopt.functional.adam_step(p, g, m, v, step=1, lr=1e-2, backend=backend)
    producer.synchronize()
    check_adam(p, m, v, p0, g0, f"{backend} on numba arrays bound to a stream")


# ---------------------------------------------------------------------------------------------
# two host threads


def _two_threads(work) -> None:
    """Run work(0) and work(1) in two threads that start together; re-raise the first error."""
    errors = []
    barrier = threading.Barrier(2)

    def run(k):
        try:
            barrier.wait()
            work(k)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _threads_case(rng, shapes):
    """Per thread its own parameters; one list of gradients shared (read-only) by both."""
    params = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(2)]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]  # per step
    return params, grads


def _reference_threads(params, grads, hyper):
    expected = []
    for own in params:
        ref_params = [a.astype(np.float64) for a in own]
        ref = fastopt.Adam(ref_params, backend="numpy", **hyper)
        for step_grads in grads:
            ref.step([g.astype(np.float64) for g in step_grads])
        expected.append(ref_params)
    return expected


THREAD_HYPER = dict(lr=1e-2, clip_grad_norm=2.0, nonfinite="skip")
THREAD_SHAPES = [(70_001,), (300,), (5, 7)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_on_their_own_torch_streams(backend, rng):
    skip_unless(reasons(backend, torch=True))
    import torch

    host_params, host_grads = _threads_case(rng, THREAD_SHAPES)
    params = [[torch.from_numpy(a).cuda() for a in own] for own in host_params]
    steps = [[torch.from_numpy(g).cuda() for g in step] for step in host_grads]
    opts = [fastopt.Adam(own, backend=backend, **THREAD_HYPER) for own in params]
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()

    def work(k):
        with torch.cuda.stream(streams[k]):
            for step in steps:
                opts[k].step(step)  # the shared gradients: one cached table used on two streams
        streams[k].synchronize()

    _two_threads(work)
    for k, expected in enumerate(_reference_threads(host_params, host_grads, THREAD_HYPER)):
        for j, (a, r) in enumerate(zip(params[k], expected)):
            assert_close(to_host(a).astype(np.float32), r, np.float32, f"{backend}: thread {k}, param {j}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_on_cupys_per_thread_default_stream(backend, rng):
    """CuPy arrays exported with stream 2 (the per-thread default stream): one handle, a different
    stream in each thread; a table uploaded by one thread must be waited on by the other."""
    skip_unless(reasons(backend, cupy=True))
    import cupy

    host_params, host_grads = _threads_case(rng, THREAD_SHAPES)
    params = [[cupy.asarray(a) for a in own] for own in host_params]
    steps = [[cupy.asarray(g) for g in step] for step in host_grads]
    opts = [fastopt.Adam(own, backend=backend, **THREAD_HYPER) for own in params]
    cupy.cuda.Device().synchronize()

    def work(k):
        cupy.cuda.Stream.ptds.use()  # this thread's current stream (thread-local)
        try:
            for step in steps:
                opts[k].step(step)
            cupy.cuda.get_current_stream().synchronize()
        finally:
            cupy.cuda.Stream.null.use()

    _two_threads(work)
    for k, expected in enumerate(_reference_threads(host_params, host_grads, THREAD_HYPER)):
        for j, (a, r) in enumerate(zip(params[k], expected)):
            assert_close(to_host(a).astype(np.float32), r, np.float32, f"{backend}: thread {k}, param {j}")
