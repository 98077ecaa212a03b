"""fastopt.demo.background: the optimizer's kernels compiled in a second process during a first
``train`` warm-up, and the warm-up waiting for them before its first optimizer step."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from fastopt.demo import background

train_module = importlib.import_module("fastopt.demo.train")  # ``fastopt.demo.train`` is the function


def test_a_worker_only_for_a_first_numba_run_with_a_second_core(monkeypatch):
    from fastopt.kernels.numba_cpu import multi

    monkeypatch.setattr(background.precompile, "available_cores", lambda: 2)
    monkeypatch.setattr(multi, "readers_cached", lambda: False)
    assert background.worthwhile(None, None) and background.worthwhile("numba", None)
    assert not background.worthwhile("numpy", None)  # nothing to compile
    assert not background.worthwhile(None, object())  # MPI: every rank is a process already
    monkeypatch.setattr(multi, "readers_cached", lambda: True)
    assert not background.worthwhile(None, None)  # not a first run: loading beats starting a worker
    monkeypatch.setattr(multi, "readers_cached", lambda: False)
    monkeypatch.setattr(background.precompile, "available_cores", lambda: 1)
    assert not background.worthwhile(None, None)


# In a new process with an empty cache: a worker for an Adam run, then the run's own optimizer (same
# shapes): does numba compile anything? And a configuration the worker did not see, which must.
_WORKER_THEN_RUN = """
import json
import numpy as np
from numba.core import event
from fastopt.demo import background
from fastopt.demo.mlp import MLP
from fastopt.demo.train import _Params, make_optimizer, param_dtype
from fastopt.kernels.numba_cpu import KERNELS, multi

background.precompile.available_cores = lambda: 2
assert not multi.readers_cached() and background.worthwhile(None, None)
worker = background.start(optimizer="adam", hyper={"lr": 0.01}, backend=None, sizes=(8, 16, 4), dtype="float32",
                          precision={})
assert worker.wait()
assert multi.readers_cached() and not background.worthwhile(None, None)

compiled = []

class Compiled(event.Listener):  # numba:compile fires on a cache miss only
    def on_start(self, event):
        compiled.append(event.data["dispatcher"].py_func.__qualname__)

    def on_end(self, event):
        pass

counts = {}
with event.install_listener("numba:compile", Compiled()):
    for name, hyper in (("adam", {"lr": 0.01}), ("sgd", {"lr": 0.1, "momentum": 0.5})):
        model = MLP((8, 16, 4), rng=np.random.default_rng(1))
        params = _Params(model, param_dtype("float32"))
        opt = make_optimizer(name, params.arrays, hyper)
        before = [p.copy() for p in params.arrays]
        model.grads[0][...] = 1.0
        opt.step(model.grads)
        assert not np.array_equal(before[0], params.arrays[0]), "the step did not update"
        missed = [k.__name__ for table in KERNELS.values() for k in table.values()
                  for d in k.dispatchers.values() if d.stats.cache_misses]
        counts[name], compiled[:] = {"events": list(compiled), "missed": sorted(set(missed))}, []
print(json.dumps(counts))
"""


def test_the_worker_fills_the_cache_with_exactly_the_runs_optimizer_kernels(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _WORKER_THEN_RUN], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["adam"] == {"events": [], "missed": []}, counts  # loaded from the cache the worker filled
    # the control: a kernel the worker never ran, compiled here (its cache miss; a part runner is a C
    # function, whose compile fires no numba:compile event, and it compiles none of numba's overloads)
    assert counts["sgd"]["missed"] == ["_sgd_momentum_run"], counts


def test_a_failed_worker_warns_with_its_error_and_the_run_goes_on():
    worker = background.start(optimizer="nope", hyper=None, backend=None, sizes=(8, 4), dtype="float32",
                              precision={})
    with pytest.warns(RuntimeWarning, match=r"background compile .* failed \(exit status 1: .*optimizer must be one "
                                            r"of .*got 'nope'.*the run compiles them itself"):
        assert worker.wait() is False


def test_a_worker_past_its_timeout_is_stopped():
    worker = background.start(optimizer="adam", hyper=None, backend=None, sizes=(8, 4), dtype="float32",
                              precision={})
    with pytest.warns(RuntimeWarning, match=r"took over 0\.01 s and was stopped"):
        assert worker.wait(timeout=0.01) is False
    assert worker.process.returncode is not None  # not left running


class _FakeWorker:
    def __init__(self, log):
        self.log = log

    def wait(self):
        self.log.append("wait")
        return True

    def stop(self):
        self.log.append("stop")


def test_the_warm_up_waits_for_the_worker_after_batch_norm_and_before_the_first_step(monkeypatch):
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn (the demo extra)")
    from fastopt.demo import load_digits

    log, started = [], []
    monkeypatch.setattr(background, "worthwhile", lambda backend, comm: True)
    monkeypatch.setattr(background, "start", lambda **run: started.append(run) or _FakeWorker(log))
    real_backward = train_module.MLP.backward
    monkeypatch.setattr(train_module.MLP, "backward", lambda self, d: log.append("backward") or real_backward(self, d))
    real_make = train_module.make_optimizer

    def make(*args, **kwargs):
        opt = real_make(*args, **kwargs)
        real_step = opt.step
        opt.step = lambda grads: log.append("step") or real_step(grads)
        return opt

    monkeypatch.setattr(train_module, "make_optimizer", make)
    data = load_digits()
    train_module._warm_up("adagrad", {"lr": 0.1}, 32, None, "glorot", (16,), data, dtype="float32", precision={})
    assert log == ["backward", "wait", "step", "backward", "step"], log  # no stop: it was waited for
    assert started == [dict(optimizer="adagrad", hyper={"lr": 0.1}, backend=None, sizes=(64, 16, 10),
                            dtype="float32", precision={})]


def test_a_warm_up_that_fails_stops_the_worker(monkeypatch):
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn (the demo extra)")
    from fastopt.demo import load_digits

    log = []
    monkeypatch.setattr(background, "worthwhile", lambda backend, comm: True)
    monkeypatch.setattr(background, "start", lambda **run: _FakeWorker(log))

    def broken(self, d):
        raise RuntimeError("backward broke")

    monkeypatch.setattr(train_module.MLP, "backward", broken)
    with pytest.raises(RuntimeError, match="backward broke"):
        train_module._warm_up("adam", None, 32, None, "glorot", (16,), load_digits())
    assert log == ["stop"]
