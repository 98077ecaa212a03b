"""Stream choice of the GPU backends, without a GPU: the ``__cuda_array_interface__`` v3 rules.

A consumer of an array that names a stream must run on that stream or make its own stream wait on
it; "no stream" (interface version 2, or ``"stream": None``) needs nothing; 1 is the legacy default
stream, 2 the per-thread default stream, 0 is forbidden (read here as no stream). torch tensors
export version 2 without a stream: their work belongs on torch's current stream.

1. ``stream_plan`` (the pure choice, the same rule in both GPU backends) over every kind of
   advertised stream, alone and mixed, and for torch tensors.
2. ``plan_for`` on producer objects of our own (v2, v3 with None, 1, 2, 0 and explicit handles;
   numba-, CuPy- and torch-like), and torch is never imported for a non-torch array.
3. numba-cuda's ``stream_of`` with a recording stand-in for ``numba.cuda``: which stream each
   launch gets, which waits are issued, which stream outputs are bound to (and export); the cupy
   backend's launches (``adam_step``) and ``place`` with a recording stand-in for ``cupy``.
4. The tensor-table cache (``_tensors.table``) with a recording upload: one upload per table, one
   event wait per other stream (and per thread on the per-thread stream), under concurrent threads;
   under torch graph capture no upload and no wait, and a table a graph used is never dropped.
5. Under the CUDA simulator (a subprocess, ``NUMBA_ENABLE_CUDASIM=1``): the numba-cuda launchers
   (update, tensor list, reductions, batch norm) launch on the stream their arrays are bound to and
   still compute the reference's result.
Real streams (torch side streams, graph capture, CuPy non-blocking streams, two host threads) are
checked on a GPU by tests/test_gpu_streams.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

ROOT = Path(__file__).resolve().parents[1]

LEGACY, PER_THREAD = 1, 2  # the v3 handles of the legacy and per-thread default streams
S1, S2, S3 = 0x7F00_1000, 0x7F00_2000, 0x7F00_3000  # explicit stream handles


def _backends():
    from fastopt.kernels.cupy import _device
    from fastopt.kernels.numba_cuda import _arrays

    return {"numba-cuda": _arrays, "cupy": _device}


@pytest.fixture(params=["numba-cuda", "cupy"])
def streams(request):
    """The module of one GPU backend that holds its stream choice."""
    return _backends()[request.param]


# ---------------------------------------------------------------------------------------------
# producer objects


class Producer:
    """An array exporter of our own: ``__cuda_array_interface__`` of version 2 (no ``stream`` key)
    or 3 with the given ``stream`` entry."""

    def __init__(self, stream="absent", version=3, shape=(4,)):
        self.shape = shape
        self.dtype = np.dtype(np.float32)
        self._interface = {"shape": shape, "typestr": "<f4", "data": (0x1000, False), "strides": None,
                           "version": version}
        if stream != "absent":
            self._interface["stream"] = stream
        self.reads = 0

    @property
    def __cuda_array_interface__(self):
        self.reads += 1
        return dict(self._interface)


def v2():
    return Producer(version=2)


class CupyLike(Producer):
    """Told apart as a CuPy array by its type's module."""


CupyLike.__module__ = "cupy._core.core"


class NumbaLike:
    """Told apart as a numba device array by ``__cuda_ndarray__``; ``stream`` as numba keeps it
    (0, or a stream object whose int() is the handle)."""

    __cuda_ndarray__ = True

    def __init__(self, stream=0):
        self.stream = stream
        self.shape = (4,)
        self.dtype = np.dtype(np.float32)
        self.device_ctypes_pointer = types.SimpleNamespace(value=0x2000)
        self.copies, self.synchronized = [], 0

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<f4", "data": (0x2000, False), "version": 3,
                "stream": int(self.stream) if self.stream else None}

    def copy_to_host(self):
        self.copies.append(self.stream)
        return np.zeros(self.shape, np.float32)


TorchDevice = namedtuple("TorchDevice", "type index")  # hashable, as torch.device is


class TensorLike:
    """Told apart as a torch tensor by its type's module; torch exports interface version 2."""

    requires_grad = False

    def __init__(self, index=0):
        self.device = TorchDevice("cuda", index)
        self.shape = (4,)

    def data_ptr(self):
        return 0x3000

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<f4", "data": (0x3000, False), "version": 2}


TensorLike.__module__ = "torch"


class HandleStream:
    """A stream object as numba keeps one: int() is its handle."""

    def __init__(self, handle):
        self.handle = handle
        self.synchronized = 0

    def __int__(self):
        return self.handle

    def synchronize(self):
        self.synchronized += 1


def fake_torch(current=S3, capturing=False):
    """A stand-in ``torch`` module: what the backends ask torch (the current stream's handle,
    whether it captures a graph), recording the devices asked about."""
    asked = []

    def current_stream(device):
        asked.append(device)
        return types.SimpleNamespace(cuda_stream=current)

    module = types.ModuleType("torch")
    module.cuda = types.SimpleNamespace(current_stream=current_stream,
                                        is_current_stream_capturing=lambda: capturing)
    module.asked = asked
    return module


# ---------------------------------------------------------------------------------------------
# 1. the pure choice


# (kind, what the arrays advertise, torch's current stream) -> (launch, waits)
PLANS = [
    ("cai", [], None, (None, ())),
    ("cai", [None], None, (None, ())),
    ("cai", [0], None, (None, ())),  # 0 is forbidden by v3: read as no stream
    ("cai", [None, 0, None], None, (None, ())),
    ("cai", [LEGACY], None, (LEGACY, ())),
    ("cai", [PER_THREAD], None, (PER_THREAD, ())),
    ("cai", [S1], None, (S1, ())),
    ("cai", [S1, S1, S1], None, (S1, ())),
    ("cai", [None, S1], None, (S1, ())),  # the first stream named, wherever it is
    ("cai", [S1, S2], None, (S1, (S2,))),
    ("cai", [S1, None, S2, S1, S2, LEGACY, 0], None, (S1, (S2, LEGACY))),
    ("cai", [LEGACY, PER_THREAD], None, (LEGACY, (PER_THREAD,))),
    ("cai", [PER_THREAD, S1], None, (PER_THREAD, (S1,))),
    ("numba", [None, S2], None, (S2, ())),
    ("cupy", [S1], None, (S1, ())),
    ("torch", [], S1, (S1, ())),
    ("torch", [], 0, (LEGACY, ())),  # torch's default stream is the legacy default stream
    ("torch", [S2, None], S1, (S1, ())),  # torch tensors name no stream; torch's current one rules
]


@pytest.mark.parametrize("kind, advertised, torch_stream, expected", PLANS)
def test_stream_plan_follows_the_v3_rules(streams, kind, advertised, torch_stream, expected):
    plan = streams.stream_plan(kind, advertised, torch_stream)
    assert (plan.launch, plan.waits) == expected
    assert plan.launch not in plan.waits


def test_stream_plan_needs_torchs_stream_for_torch(streams):
    with pytest.raises(ValueError, match="torch_stream"):
        streams.stream_plan("torch", [])


def test_both_backends_choose_alike():
    """One rule, two copies: every combination of up to three advertised streams plans alike."""
    numba_cuda, cupy = _backends().values()
    values = [None, 0, LEGACY, PER_THREAD, S1, S2]
    combos = [[a, b, c] for a in values for b in values for c in values]
    for advertised in combos:
        assert numba_cuda.stream_plan("cai", advertised) == cupy.stream_plan("other", advertised), advertised
    for handle in (0, LEGACY, S1):
        assert numba_cuda.stream_plan("torch", [], handle) == cupy.stream_plan("torch", [], handle)


@pytest.mark.parametrize("interface, expected", [
    ({"version": 2}, None), ({"version": 3, "stream": None}, None), ({"version": 3, "stream": 0}, None),
    ({"version": 3, "stream": LEGACY}, LEGACY), ({"version": 3, "stream": PER_THREAD}, PER_THREAD),
    ({"version": 3, "stream": S1}, S1),
])
def test_advertised_stream_reads_the_interface(streams, interface, expected):
    assert streams.advertised_stream(interface) == expected


# ---------------------------------------------------------------------------------------------
# 2. plans from producer objects


@pytest.mark.parametrize("arrays, expected", [
    (lambda: [v2(), v2()], (None, ())),
    (lambda: [Producer(None), Producer(0)], (None, ())),
    (lambda: [Producer(LEGACY)], (LEGACY, ())),
    (lambda: [Producer(PER_THREAD), v2()], (PER_THREAD, ())),
    (lambda: [v2(), Producer(S1), None, Producer(S2), Producer(S1)], (S1, (S2,))),
    (lambda: [NumbaLike(), NumbaLike(HandleStream(S2)), NumbaLike(HandleStream(S1))], (S2, (S1,))),
    (lambda: [NumbaLike(HandleStream(0))], (None, ())),  # numba's default stream object: int 0
])
def test_plan_for_other_exporters_in_both_backends(streams, arrays, expected):
    plan = streams.plan_for(arrays() + [None, 1.0])  # absent arrays and host numbers are skipped
    assert (plan.launch, plan.waits) == expected


def test_cupy_arrays_follow_cupys_current_stream():
    """numba-cuda reads the stream a CuPy array exports (CuPy's current stream, the same for every
    CuPy array of a call, so only the first is read); the cupy backend uses CuPy's current stream."""
    numba_cuda, cupy = _backends().values()
    arrays = [CupyLike(S1), CupyLike(S1), CupyLike(S1)]
    assert numba_cuda.plan_for(arrays) == (S1, ())
    assert [a.reads for a in arrays] == [1, 0, 0]
    assert cupy.plan_for(arrays) == (None, ())
    assert [a.reads for a in arrays] == [1, 0, 0]


def test_torch_tensors_run_on_torchs_current_stream(streams, monkeypatch):
    torch = fake_torch(current=S3)
    monkeypatch.setitem(sys.modules, "torch", torch)
    tensors = [TensorLike(1), TensorLike(1)]
    assert streams.plan_for(tensors) == (S3, ())
    assert torch.asked == [tensors[0].device]  # the current stream of the tensors' device
    monkeypatch.setitem(sys.modules, "torch", fake_torch(current=0))
    assert streams.plan_for(tensors) == (LEGACY, ())


@pytest.mark.parametrize("arrays", [
    lambda: [v2(), Producer(S1)], lambda: [CupyLike(S1)], lambda: [NumbaLike(HandleStream(S2))], lambda: []])
def test_torch_is_not_imported_for_other_arrays(streams, arrays, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # any ``import torch`` now raises ImportError
    streams.plan_for(arrays())
    assert sys.modules["torch"] is None


# ---------------------------------------------------------------------------------------------
# 3. numba-cuda: streams made, waits issued, outputs bound


class RecordingCuda:
    """A stand-in for ``numba.cuda`` that records streams, events, allocations and copies."""

    def __init__(self):
        self.log = []

    def default_stream(self):
        return HandleStream(0)

    def legacy_default_stream(self):
        return HandleStream(LEGACY)

    def per_thread_default_stream(self):
        return HandleStream(PER_THREAD)

    def external_stream(self, handle):
        return HandleStream(handle)

    def event(self, timing=True):
        log = self.log

        class Event:
            def record(self, stream):
                log.append(("record", int(stream)))

            def wait(self, stream):
                log.append(("wait", int(stream)))

        return Event()

    def device_array(self, shape, dtype, stream=0):
        self.log.append(("alloc", int(stream) if stream else None))
        return NumbaLike(stream)


@pytest.fixture
def numba_cuda(monkeypatch):
    """numba-cuda's _arrays with ``numba.cuda`` replaced by a recorder, as if not simulated."""
    from fastopt.kernels.numba_cuda import _arrays

    recorder = RecordingCuda()
    monkeypatch.setattr(_arrays, "cuda", recorder)
    monkeypatch.setattr(_arrays, "SIMULATOR", False)
    monkeypatch.setattr(_arrays, "_streams", {})
    _arrays.recorder = recorder
    yield _arrays
    del _arrays.recorder


def test_launch_stream_and_waits(numba_cuda):
    stream = numba_cuda.stream_of(Producer(S1), v2(), Producer(S2), Producer(LEGACY), Producer(S2))
    assert int(stream) == S1
    # one event per other stream: recorded on it, waited on by the launch stream
    assert numba_cuda.recorder.log == [("record", S2), ("wait", S1), ("record", LEGACY), ("wait", S1)]


@pytest.mark.parametrize("arrays, handle", [
    (lambda: [v2(), Producer(None)], 0),  # numba's default stream
    (lambda: [Producer(LEGACY)], LEGACY),
    (lambda: [Producer(PER_THREAD)], PER_THREAD),
    (lambda: [NumbaLike(HandleStream(S1)), NumbaLike()], S1),
])
def test_one_stream_launches_there_without_waits(numba_cuda, arrays, handle):
    assert int(numba_cuda.stream_of(*arrays())) == handle
    assert numba_cuda.recorder.log == []


def test_torch_launch_stream_carries_the_device(numba_cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", fake_torch(current=S3))
    tensors = [TensorLike(0), TensorLike(0)]
    stream = numba_cuda.stream_of(*tensors)
    assert int(stream) == S3 and numba_cuda.torch_device_of(stream) is tensors[0].device
    assert numba_cuda.recorder.log == []
    # the same handle reached through another exporter is not a torch stream
    assert numba_cuda.torch_device_of(numba_cuda.stream_of(Producer(S3))) is None
    monkeypatch.setitem(sys.modules, "torch", fake_torch(current=S3, capturing=True))
    assert numba_cuda.is_capturing(stream) and not numba_cuda.is_capturing(numba_cuda.stream_of(Producer(S3)))


@pytest.mark.parametrize("like, bound", [
    (lambda: v2(), None), (lambda: Producer(None), None), (lambda: Producer(0), None),
    (lambda: Producer(LEGACY), None),  # the default stream is exported as no stream, never as 0
    (lambda: Producer(PER_THREAD), PER_THREAD), (lambda: Producer(S1), S1),
    (lambda: NumbaLike(), None), (lambda: NumbaLike(HandleStream(S2)), S2),
])
def test_outputs_are_bound_to_the_launch_stream(numba_cuda, like, bound):
    out = numba_cuda.empty((3,), np.float32, like())
    assert numba_cuda.recorder.log == [("alloc", bound)]
    assert out.__cuda_array_interface__["stream"] == bound
    assert numba_cuda.plan_for([out]).launch == bound  # work on the output follows it there


def test_to_numpy_waits_for_the_arrays_stream(numba_cuda):
    stream = HandleStream(S1)
    array = NumbaLike(stream)
    numba_cuda.to_numpy(array)
    assert array.copies == [stream] and stream.synchronized == 1


class FakeCupy(types.ModuleType):
    """A stand-in ``cupy`` module: CuPy's current stream (thread-local in CuPy; one thread here) as
    a stack of stream contexts, and a log of event records, waits and launches."""

    def __init__(self):
        super().__init__("cupy")
        self.log = []
        self.current = [self.make_stream(0)]  # CuPy's null stream is current at first
        fake = self

        class Device:
            def __init__(self, device_id=0):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class Event:
            def __init__(self, disable_timing=False):
                pass

            def record(self, stream):
                fake.log.append(("record", stream.ptr))

        class Stream:
            null = fake.make_stream(0)
            ptds = fake.make_stream(PER_THREAD)

        self.cuda = types.SimpleNamespace(
            Device=Device, Event=Event, Stream=Stream, ExternalStream=self.make_stream,
            get_current_stream=lambda: self.current[-1],
            runtime=types.SimpleNamespace(getDevice=lambda: 0,
                                          pointerGetAttributes=lambda ptr: types.SimpleNamespace(device=0)))

    def make_stream(self, ptr):
        fake = self

        class FakeStream:
            def __init__(self):
                self.ptr = ptr

            def __enter__(self):
                fake.current.append(self)
                return self

            def __exit__(self, *exc):
                fake.current.pop()
                return False

            def wait_event(self, event):
                fake.log.append(("wait", self.ptr))

        return FakeStream()


@pytest.fixture
def cupy_backend(monkeypatch):
    """The cupy backend with a stand-in ``cupy`` and a recording launcher: each launch logs the
    stream it was given (None: CuPy's current one) and CuPy's current stream at that moment."""
    from fastopt.kernels.cupy import _loader, optim

    cupy = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)

    def launch(module_name, name, grid, block, args, stream):
        cupy.log.append(("launch", None if stream is None else stream.ptr, cupy.current[-1].ptr))

    monkeypatch.setattr(_loader, "launch", launch)
    monkeypatch.setattr(_loader, "grid", lambda module_name, name, units, block: 1)
    return optim, cupy


def _adam(optim, arrays):
    p, g, m, v = arrays
    optim.adam_step(p, g, m, v, None, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                    decoupled_weight_decay=False, amsgrad=False)


@pytest.mark.parametrize("arrays, log", [
    # other exporters: the stream θ names, made CuPy's current one for the call (its pool, its launches)
    (lambda: [Producer(S1), v2(), v2(), v2()], [("launch", S1, S1)]),
    (lambda: [v2(), Producer(None), Producer(0), v2()], [("launch", None, 0)]),  # none named: CuPy's current
    (lambda: [Producer(LEGACY)] * 4, [("launch", LEGACY, 0)]),  # the legacy stream is CuPy's null stream
    (lambda: [NumbaLike(HandleStream(S3))] + [NumbaLike()] * 3, [("launch", S3, S3)]),
    (lambda: [NumbaLike()] * 4, [("launch", None, 0)]),
])
def test_cupy_backend_launches_where_the_producers_stream_says(cupy_backend, arrays, log):
    optim, cupy = cupy_backend
    _adam(optim, arrays())
    assert cupy.log == log
    assert [s.ptr for s in cupy.current] == [0]  # CuPy's current stream is restored


def test_cupy_place_waits_on_the_other_named_streams(cupy_backend):
    from fastopt.kernels.cupy import _device

    _, cupy = cupy_backend
    with _device.place(Producer(S1), v2(), Producer(S2), Producer(LEGACY), Producer(S2), 1.0, None) as where:
        assert where.stream.ptr == S1 and cupy.current[-1].ptr == S1
    assert cupy.log == [("record", S2), ("wait", S1), ("record", 0), ("wait", S1)]
    assert [s.ptr for s in cupy.current] == [0]


def test_cupy_backend_puts_torch_tensors_on_torchs_current_stream(cupy_backend, monkeypatch):
    optim, cupy = cupy_backend
    monkeypatch.setitem(sys.modules, "torch", fake_torch(current=S2))
    _adam(optim, [TensorLike() for _ in range(4)])
    assert cupy.log == [("launch", S2, 0)]


# ---------------------------------------------------------------------------------------------
# 4. the tensor-table cache


class Upload:
    """A recording stand-in for ``_tensors._upload``: each upload returns a fresh device token and
    an event that records who waited on it."""

    def __init__(self, seconds=0.0):
        self.seconds = seconds
        self.uploads = []
        self.waits = []
        self.lock = threading.Lock()

    def __call__(self, host, stream):
        time.sleep(self.seconds)  # a slow upload widens the window a missing lock would leave open
        waits = self.waits

        class Event:
            def wait(self, stream):
                waits.append((stream, threading.get_ident()))

        with self.lock:
            self.uploads.append((host.copy(), stream))
        return object(), Event()


@pytest.fixture
def tables(monkeypatch):
    from fastopt.kernels.numba_cuda import _tensors

    upload = Upload()
    monkeypatch.setattr(_tensors, "_upload", upload)
    monkeypatch.setattr(_tensors, "_cache", type(_tensors._cache)())
    monkeypatch.setattr(_tensors, "is_capturing", lambda stream: False)
    _tensors.upload = upload
    yield _tensors
    del _tensors.upload


ROWS = [(10, 0xA000, 0xB000), (0, 0xC000, 0xD000), (70, 0xE000, 0xF000)]


def test_a_table_is_uploaded_once_and_waited_on_once_per_other_stream(tables):
    a, b = HandleStream(S1), HandleStream(S2)
    device, chunks = tables.table(ROWS, a)
    assert chunks == -(-10 // tables.CHUNK) + -(-70 // tables.CHUNK)
    host, stream = tables.upload.uploads[0]
    assert stream is a and host[:, tables.N].tolist() == [10, 70]  # the empty tensor is dropped
    assert tables.table(ROWS, a)[0] is device and tables.upload.waits == []
    assert tables.table(ROWS, b)[0] is device
    assert [w for w, _ in tables.upload.waits] == [b]  # b waits for the upload made on a, once
    tables.table(ROWS, b)
    tables.table(ROWS, a)
    assert len(tables.upload.uploads) == 1 and len(tables.upload.waits) == 1
    tables.table(ROWS[:1], a)  # other rows: another table
    assert len(tables.upload.uploads) == 2


def test_a_table_is_not_shared_unwaited_between_threads(tables):
    """Eight threads on their per-thread default streams (one handle, eight streams) ask for one
    table at once: one upload, and every other thread's stream waits on it before using it."""
    tables.upload.seconds = 0.05
    results, errors = [], []
    barrier = threading.Barrier(8)

    def step():
        try:
            barrier.wait()
            results.append((tables.table(ROWS, HandleStream(PER_THREAD))[0], threading.get_ident()))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=step) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(tables.upload.uploads) == 1
    assert len({id(device) for device, _ in results}) == 1
    waited = {ident for _, ident in tables.upload.waits}
    assert len(tables.upload.waits) == 7 and len(waited) == 7  # every thread but the uploader, once


def test_graph_capture_uploads_and_waits_nothing_and_keeps_its_tables(tables, monkeypatch):
    capturing = [False]
    monkeypatch.setattr(tables, "is_capturing", lambda stream: capturing[0])
    monkeypatch.setattr(tables, "TABLE_CACHE", 2)
    warm, capture = HandleStream(S1), HandleStream(S2)
    device, _ = tables.table(ROWS, warm)  # the warm-up step, before the capture
    capturing[0] = True
    with pytest.raises(RuntimeError, match="before capturing"):
        tables.table([(5, 0x1, 0x2)], capture)  # unseen: nothing may be uploaded now
    assert tables.table(ROWS, capture)[0] is device
    assert len(tables.upload.uploads) == 1 and tables.upload.waits == []  # no wait inside a capture
    capturing[0] = False
    for k in range(5):  # more tables than the cache keeps: the graph's table stays
        tables.table([(k + 1, 0x100 * (k + 1), 0x1)], warm)
    assert tables.table(ROWS, capture)[0] is device
    assert len(tables.upload.uploads) == 6
    assert len(tables._cache) == 3  # two unpinned + the pinned one
    assert [w for w, _ in tables.upload.waits] == [capture]  # outside the capture it waits again


# ---------------------------------------------------------------------------------------------
# 5. the launchers under the CUDA simulator (a subprocess)


def test_launchers_use_the_planned_stream_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "simulated launches: ok" in output, output[-6000:]


def _simulated_launches() -> None:
    """Run with NUMBA_ENABLE_CUDASIM=1: every kernel launch of the numba-cuda backend, on arrays
    bound to a stream, goes to that stream; on arrays bound to none, to the default stream."""
    from numba import cuda

    import fastopt.kernels.numba_cuda as backend
    import fastopt.reference as reference
    from fastopt.kernels.numba_cuda import _arrays, _jit

    assert _jit.SIMULATOR
    launches = []
    checked = _jit._SignatureChecked.__getitem__

    def recording(self, configuration):
        launches.append((self.name, int(configuration[2]) if len(configuration) > 2 else None))
        return checked(self, configuration)

    _jit._SignatureChecked.__getitem__ = recording
    rng = np.random.default_rng(0)
    hyper = dict(step=2, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, amsgrad=False)

    def on(values, stream):
        array = cuda.to_device(np.ascontiguousarray(values))
        return array if stream is None else array.bind(stream)

    def adam_case(stream, n=150):
        p0, g0, m0 = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
        v0 = np.abs(rng.standard_normal(n)).astype(np.float32)
        return (p0, g0, m0, v0), [on(a, stream) for a in (p0, g0, m0, v0)]

    def bound(array):
        return int(array.stream) if array.stream else 0

    # arrays bound to a stream: every launcher, the reductions' outputs, batch norm's outputs
    side = _arrays._SimulatedStream(S1)
    (p0, g0, m0, v0), (p, g, m, v) = adam_case(side)
    sumsq = backend.grad_sumsq([g])
    mul = backend.grad_multiplier(sumsq, 1.0, 1.0, np.float32)
    backend.adam_step(p, g, m, v, None, grad_mul=mul, **hyper)
    backend.multi_step("adam_step", [p], [g], [(m, v, None)], None, **hyper)
    x = on(rng.standard_normal((6, 3, 5)).astype(np.float32), side)
    y = backend.empty_like(x)
    mean, invstd = backend.empty((3,), np.float32, x), backend.empty((3,), np.float32, x)
    weight, bias = on(np.ones(3, np.float32), side), on(np.zeros(3, np.float32), side)
    backend.batchnorm_forward(x, weight, bias, None, None, y, mean, invstd, training=True, momentum=0.1,
                              eps=1e-5, channel_axis=1, relu=False)
    names = {name for name, _ in launches}
    assert {"optim.adam", "optim.adam.multi", "reduce.sumsq_partial", "reduce.sumsq_total",
            "reduce.multiplier"} <= names, names
    assert any(name.startswith("batchnorm.") for name in names), names
    assert {h for _, h in launches} == {S1}, launches
    assert [bound(out) for out in (sumsq, mul, y, mean, invstd)] == [S1] * 5
    # and the results are the reference's: clip to norm 1, then two Adam steps
    p64, m64, v64 = p0.astype(np.float64), m0.astype(np.float64), v0.astype(np.float64)
    total = float(np.sum(g0.astype(np.float64) ** 2))
    np.testing.assert_allclose(backend.to_numpy(sumsq)[0], total, rtol=1e-12)
    scale = float(np.float32(min(1.0, 1.0 / (np.sqrt(total) + 1e-6))))
    reference.adam_step(p64, g0.astype(np.float64), m64, v64, None, grad_mul=scale, **hyper)
    reference.adam_step(p64, g0.astype(np.float64), m64, v64, None, **hyper)
    np.testing.assert_allclose(backend.to_numpy(p), p64, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(y).mean(axis=(0, 2)), 0.0, atol=1e-5)

    # arrays bound to no stream: numba's default stream, and outputs that name no stream
    launches.clear()
    (p0, g0, m0, v0), (p, g, m, v) = adam_case(None)
    backend.adam_step(p, g, m, v, None, **hyper)
    backend.multi_step("adam_step", [p], [g], [(m, v, None)], None, **hyper)
    filled = backend.full_like(p, 2.0)
    assert {name for name, _ in launches} == {"optim.adam", "optim.adam.multi", "arrays.fill"}, launches
    assert {h for _, h in launches} == {0}, launches
    assert bound(filled) == 0 and bound(backend.empty_like(p)) == 0
    p64, m64, v64 = p0.astype(np.float64), m0.astype(np.float64), v0.astype(np.float64)
    for _ in range(2):
        reference.adam_step(p64, g0.astype(np.float64), m64, v64, None, **hyper)
    np.testing.assert_allclose(backend.to_numpy(p), p64, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(backend.to_numpy(filled), np.full(p0.shape, 2.0, np.float32))
    print("simulated launches: ok")


if __name__ == "__main__":
    _simulated_launches()
