"""Array kinds at the API boundary: host vs device arrays, default backends, no hidden copies.

A device array here is a stand-in object exposing ``__cuda_array_interface__`` (what CuPy arrays,
numba device arrays and torch CUDA tensors expose); nothing dereferences its pointer, because every
check below fails before a kernel could run.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastopt
from fastopt import dispatch, functional


class FakeDeviceArray:
    """The interface of a C-contiguous CUDA array, with a made-up device pointer."""

    _next_pointer = 1 << 40

    def __init__(self, shape, dtype=np.float32, strides=None, readonly=False):
        dtype = np.dtype(dtype)
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": dtype.str, "data": (FakeDeviceArray._next_pointer, readonly),
            "strides": strides, "version": 3,
        }
        FakeDeviceArray._next_pointer += 1 << 20


def test_default_backend_by_kind():
    assert dispatch.default_backend(np.zeros(2)) == "numba"
    assert dispatch.default_backend(FakeDeviceArray((2,))) == "numba-cuda"


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_host_backend_refuses_a_device_array(backend):
    with pytest.raises(TypeError, match=f"backend '{backend}' works on numpy.ndarrays, got a CUDA device array"):
        functional.sgd_step(FakeDeviceArray((3,)), FakeDeviceArray((3,)), lr=0.1, backend=backend)


@pytest.mark.parametrize("backend", ["cupy", "numba-cuda"])
def test_gpu_backend_refuses_a_host_array(backend):
    param = np.zeros(3)
    with pytest.raises(TypeError, match=f"backend '{backend}' works on CUDA device arrays, got numpy.ndarray; "
                                        "fastopt never copies"):
        functional.sgd_step(param, np.ones(3), lr=0.1, backend=backend)
    assert (param == 0).all()


def test_mixing_host_and_device_arrays_is_refused_before_anything_runs():
    param = np.zeros(3)
    with pytest.raises(TypeError, match=r"grad is a .*FakeDeviceArray but param is a numpy.ndarray: host and device "
                                        "arrays cannot be mixed"):
        functional.sgd_step(param, FakeDeviceArray((3,), np.float64), lr=0.1)
    with pytest.raises(TypeError, match="cannot be mixed"):
        fastopt.SGD([FakeDeviceArray((3,)), np.zeros(3, np.float32)], lr=0.1)
    opt = fastopt.SGD([param], lr=0.1)
    with pytest.raises(TypeError, match=r"grads\[0\] is a .*FakeDeviceArray but params\[0\] is a numpy.ndarray"):
        opt.step([FakeDeviceArray((3,), np.float64)])
    assert (param == 0).all()


def test_batchnorm_refuses_mixed_kinds():
    x = np.ones((4, 3))
    with pytest.raises(TypeError, match=r"weight is a .*FakeDeviceArray but x is a numpy.ndarray"):
        fastopt.batchnorm_forward(x, FakeDeviceArray((3,), np.float64), None, None, None)


@pytest.mark.parametrize("interface, error, match", [
    (dict(shape=(3,), dtype=np.int32), TypeError, "dtype float32 or float64, got int32"),
    (dict(shape=(2, 3), strides=(4, 8)), ValueError, "must be C-contiguous"),
    (dict(shape=(3,), readonly=True), ValueError, "must be writeable"),
])
def test_device_array_facts_are_checked(interface, error, match):
    with pytest.raises(error, match=match):
        functional.sgd_step(FakeDeviceArray(**interface), FakeDeviceArray((3,)), lr=0.1)


def test_explicit_c_strides_count_as_contiguous_and_overlap_is_found():
    a = FakeDeviceArray((2, 3), strides=(12, 4))
    same = FakeDeviceArray((2, 3))
    same.__cuda_array_interface__ = dict(a.__cuda_array_interface__)  # same memory as a
    with pytest.raises(ValueError, match="must not share memory"):
        functional.sgd_step(a, FakeDeviceArray((2, 3)), same, lr=0.1, momentum=0.9)


def test_a_gpu_backend_without_a_device_is_unavailable_with_a_reason():
    report = fastopt.backends()
    if report["cupy"].available and report["numba-cuda"].available:
        pytest.skip("both GPU backends are available on this machine")
    for name in ("cupy", "numba-cuda"):
        if not report[name].available:
            assert report[name].reason
            with pytest.raises(fastopt.BackendUnavailableError, match=name):
                functional.sgd_step(FakeDeviceArray((3,)), FakeDeviceArray((3,)), lr=0.1, backend=name)
    for name in ("cupy", "numba-cuda"):
        if not report[name].available:
            with pytest.raises(fastopt.BackendUnavailableError, match=name):
                fastopt.BatchNorm(4, backend=name)  # the layer allocates on the device up front


@pytest.fixture
def numba_cuda_not_importable(monkeypatch):
    """The numba-cuda backend's module fails to import, as it does with numba alone; nothing is
    remembered from earlier loads. Returns a function that sets whether numba-cuda is installed."""
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_failed", {})
    _, array_type, not_implemented = dispatch._MODULES["numba-cuda"]
    monkeypatch.setitem(dispatch._MODULES, "numba-cuda",
                        ("fastopt.kernels.no_such_module", array_type, not_implemented))

    def set_installed(installed: bool):
        package, _, install = dispatch._PACKAGES["numba-cuda"]
        module = "numpy" if installed else "no_such_package_for_this_test"  # a module that is there, or not
        monkeypatch.setitem(dispatch._PACKAGES, "numba-cuda", (package, module, install))

    return set_installed


def test_a_missing_numba_cuda_is_named_with_the_pip_command(numba_cuda_not_importable):
    numba_cuda_not_importable(installed=False)
    reason = fastopt.backends()["numba-cuda"].reason
    assert reason.startswith("numba-cuda is not installed") and "pip install 'numba-cuda[cu12]'" in reason, reason
    assert "importing" not in reason, reason
    message = re.escape(f"backend 'numba-cuda' is unavailable: {reason}")
    with pytest.raises(fastopt.BackendUnavailableError, match=message):  # named explicitly: still raises
        functional.sgd_step(FakeDeviceArray((3,)), FakeDeviceArray((3,)), lr=0.1, backend="numba-cuda")
    with pytest.raises(fastopt.BackendUnavailableError, match=message):  # picked for a device array
        functional.sgd_step(FakeDeviceArray((3,)), FakeDeviceArray((3,)), lr=0.1)
    with pytest.raises(fastopt.BackendUnavailableError, match=message):
        fastopt.BatchNorm(4, backend="numba-cuda")


def test_an_installed_numba_cuda_that_fails_to_import_reports_the_import_error(numba_cuda_not_importable):
    numba_cuda_not_importable(installed=True)
    reason = fastopt.backends()["numba-cuda"].reason
    assert reason.startswith("importing fastopt.kernels.no_such_module failed: "), reason
    with pytest.raises(fastopt.BackendUnavailableError, match="importing fastopt.kernels.no_such_module failed"):
        functional.sgd_step(FakeDeviceArray((3,)), FakeDeviceArray((3,)), lr=0.1, backend="numba-cuda")


def test_a_backend_whose_import_breaks_otherwise_is_unavailable_with_the_error(monkeypatch):
    """An installed dependency can fail inside its own import with something other than an
    ImportError (numba-cuda 0.30.4 under NumPy 2.5: AttributeError for np.row_stack, seen on an
    H200). fastopt.backends() still reports every backend, naming the error, and a call that
    needs the backend raises BackendUnavailableError with it, never the AttributeError itself."""
    import importlib

    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_failed", {})
    real_import = importlib.import_module

    def import_module(name, *args):
        if name == "fastopt.kernels.numba_cuda":
            raise AttributeError("module 'numpy' has no attribute 'row_stack'")
        return real_import(name, *args)

    monkeypatch.setattr(dispatch.importlib, "import_module", import_module)
    report = fastopt.backends()
    reason = report["numba-cuda"].reason
    assert not report["numba-cuda"].available
    assert reason == ("importing fastopt.kernels.numba_cuda failed: AttributeError: module 'numpy' has no "
                      "attribute 'row_stack'"), reason
    assert report["numba"].available and report["numpy"].available
    with pytest.raises(fastopt.BackendUnavailableError, match=re.escape(reason)):
        functional.sgd_step(FakeDeviceArray((3,)), FakeDeviceArray((3,)), lr=0.1, backend="numba-cuda")
    monkeypatch.setattr(dispatch, "_failed", {})  # a first load chains the original error
    with pytest.raises(fastopt.BackendUnavailableError, match=re.escape(reason)) as raised:
        functional.sgd_step(FakeDeviceArray((3,)), FakeDeviceArray((3,)), lr=0.1, backend="numba-cuda")
    assert isinstance(raised.value.__cause__, AttributeError)


def test_clip_grad_norm_refuses_mixed_kinds_before_anything_changes():
    grad = np.full(3, 10.0)
    with pytest.raises(TypeError, match=r"grads\[1\] is a .*FakeDeviceArray but grads\[0\] is a numpy.ndarray"):
        fastopt.clip_grad_norm_([grad, FakeDeviceArray((3,), np.float64)], 1.0)
    assert (grad == 10.0).all()


@pytest.mark.parametrize("name", dispatch.BACKEND_NAMES)
def test_every_backend_module_provides_the_array_helpers(name):
    """The helpers docs/backends.md lists for every backend module (the GPU modules import without
    a GPU or CuPy)."""
    import importlib

    module = importlib.import_module(dispatch._MODULES[name][0])
    helpers = ["owns", "zeros_like", "full_like", "empty_like", "empty", "to_numpy", "from_numpy", "copy_from_numpy"]
    missing = [h for h in helpers if not callable(getattr(module, h, None))]
    assert not missing, f"{name} lacks {missing}"


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_host_backends_copy_from_numpy_in_place(name):
    module = dispatch._load(name)
    target = np.zeros(4, np.float32)
    module.copy_from_numpy(target, np.arange(4.0))
    np.testing.assert_array_equal(target, np.arange(4.0, dtype=np.float32))
    assert isinstance(module.from_numpy(np.ones(2)), np.ndarray)
