"""Small inputs run each parallel kernel's serial twin (``kernels/numba_cpu/_jit.py``), large ones
the parallel kernel, and both give the same bits: the twin runs the same parts or tasks in the same
order on the calling thread. Thresholds: ``multi.SERIAL_BELOW`` for the tensor-list kernels
(optimizer updates, gradient reductions), ``batchnorm._SERIAL_BELOW`` for batch norm."""

from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.kernels import numba_cpu
from fastopt.kernels.numba_cpu import batchnorm as bn
from fastopt.kernels.numba_cpu import multi, optim, reduce


class _Spy:
    """Stands in for a kernel (or its twin), recording each call before running it."""

    def __init__(self, kernel, calls, label):
        self.kernel, self.calls, self.label = kernel, calls, label
        self.serial = self

    def __call__(self, *args):
        self.calls.append(self.label)
        return self.kernel(*args)


def _spy_on(monkeypatch, holder, name, calls):
    """Replace ``holder.name`` (a parallel kernel) by a spy whose ``.serial`` spies on the twin."""
    kernel = getattr(holder, name)
    parallel = _Spy(kernel, calls, "parallel")
    parallel.serial = _Spy(kernel.serial, calls, "serial")
    monkeypatch.setattr(holder, name, parallel)


@pytest.mark.parametrize("total, expected", [(multi.SERIAL_BELOW - 1, "serial"), (multi.SERIAL_BELOW, "parallel")])
def test_an_update_runs_serially_below_the_threshold(monkeypatch, total, expected):
    calls = []
    _spy_on(monkeypatch, optim, "launch_parts", calls)
    sizes = (total // 3, total // 3, total - 2 * (total // 3))
    params = [np.ones(n, np.float32) for n in sizes]
    states = [(np.zeros(n, np.float32), np.zeros(n, np.float32), None) for n in sizes]
    numba_cpu.multi_step("adam_step", params, [p.copy() for p in params], states, None, step=1, lr=1e-3,
                         beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                         amsgrad=False)
    assert calls == [expected]


@pytest.mark.parametrize("size, expected", [(bn._SERIAL_BELOW - 16, "serial"), (bn._SERIAL_BELOW, "parallel")])
def test_batchnorm_runs_serially_below_the_threshold(monkeypatch, size, expected):
    calls = []
    for name in ("_stats_channels_last", "_normalize_channels_last", "_reduce_channels_last",
                 "_input_grad_channels_last"):
        _spy_on(monkeypatch, bn, name, calls)
    x = np.random.default_rng(0).standard_normal((size // 16, 16)).astype(np.float32)
    y, mean, invstd = fastopt.batchnorm_forward(x, None, None, None, None, backend="numba")
    fastopt.batchnorm_backward(x, x, None, mean, invstd, backend="numba")
    assert calls == [expected] * 4


def _force(monkeypatch, mode):
    """Make every launch pick the serial twin (mode "serial") or the parallel kernel."""
    below = 1 << 62 if mode == "serial" else 0
    monkeypatch.setattr(optim, "SERIAL_BELOW", below)
    monkeypatch.setattr(reduce, "SERIAL_BELOW", below)
    monkeypatch.setattr(bn, "_SERIAL_BELOW", below)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_twins_give_the_same_bits_on_a_list_of_several_parts(monkeypatch, dtype):
    rng = np.random.default_rng(1)
    sizes = (5, 40_001, 17, 33_333)  # 9 parts of the flat range, starting and ending inside tensors
    start = [rng.standard_normal(n).astype(dtype) for n in sizes]
    grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
    results = {}
    for mode in ("serial", "parallel"):
        _force(monkeypatch, mode)
        params = [p.copy() for p in start]
        m = [np.full(n, 0.1, dtype) for n in sizes]
        v = [np.full(n, 0.2, dtype) for n in sizes]
        avgs = [p.copy() for p in start]
        numba_cpu.multi_step("adam_step", params, grads, list(zip(m, v, [None] * 4)), avgs, step=3, lr=1e-2,
                             beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.01, decoupled_weight_decay=True,
                             amsgrad=False, grad_mul=0.5, grad_clip=1.5, avg_weight=0.25)
        sumsq = numba_cpu.grad_sumsq(grads)
        scaled = [g.copy() for g in grads]
        numba_cpu.scale_grads_(scaled, 0.3)
        results[mode] = (params, m, v, avgs, [np.array(sumsq)], scaled)
    for serial, parallel in zip(*results.values()):
        for a, b in zip(serial, parallel):
            assert a.tobytes() == b.tobytes()
    assert not np.array_equal(results["serial"][0][1], start[1])  # the update ran


@pytest.mark.parametrize("shape, axis", [((70_000 // 16, 16), 1), ((6, 5, 50, 47), 1), ((6, 50, 47, 5), 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_twins_give_the_same_bits(monkeypatch, shape, axis, dtype):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    weight, bias = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    results = {}
    for mode in ("serial", "parallel"):
        _force(monkeypatch, mode)
        running = (np.zeros(c, dtype), np.ones(c, dtype))
        y, mean, invstd = fastopt.batchnorm_forward(x, weight, bias, *running, channel_axis=axis, relu=True,
                                                    backend="numba")
        grads = fastopt.batchnorm_backward(dy, x, weight, mean, invstd, bias=bias, channel_axis=axis, relu=True,
                                           backend="numba")
        results[mode] = (y, mean, invstd, *running, *grads)
    for a, b in zip(*results.values()):
        assert a.tobytes() == b.tobytes()
