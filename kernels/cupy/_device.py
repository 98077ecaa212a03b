"""Device arrays of any kind for the ``"cupy"`` backend: what they point to, where outputs come
from, which stream kernels run on, and whether a device is usable at all.

The backend takes CuPy arrays and any object exposing ``__cuda_array_interface__`` (a torch CUDA
tensor, a numba device array). Kernels never need a CuPy view of an input: they take raw device
pointers (``.data.ptr``, ``.data_ptr()``, or the interface's ``data`` field), so nothing is copied
and nothing synchronizes. (``cupy.asarray`` on a foreign array would synchronize the host with the
producer's stream when the interface names one, CuPy's default ``CUPY_CUDA_ARRAY_INTERFACE_SYNC=1``;
reading the pointer avoids that.)

Kinds, told apart by type:

* ``"torch"``: outputs and scratch memory come from torch's caching allocator on the tensor's
  device, and kernels run on torch's current stream of that device, so they are ordered with the
  torch work around them;
* ``"cupy"`` and any other interface object (``"other"``): CuPy's memory pool and CuPy's current
  stream;
* ``"numba"``: as CuPy (numba's default stream and CuPy's are both the legacy default stream
  unless a program changes them); outputs are numba device arrays wrapping CuPy memory
  (``numba.cuda.as_cuda_array(..., sync=False)``: zero-copy, no synchronization).

CuPy is imported on first use, not at import: ``import fastopt.kernels.cupy`` works on any machine
and ``unavailable_reason()`` says why the backend cannot run where it cannot.
Validated input is assumed (docs/backends.md): C-contiguous arrays of one kind and device per call.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import numpy as np

__all__ = [
    "Place",
    "copy_from_numpy",
    "dtype_of",
    "empty",
    "empty_like",
    "from_numpy",
    "full_like",
    "kind",
    "owns",
    "place",
    "pointer",
    "size_of",
    "to_numpy",
    "unavailable_reason",
    "zeros_like",
]


def _cupy():
    import cupy

    return cupy


def kind(array) -> str:
    """"cupy", "torch", "numba" or "other" (another ``__cuda_array_interface__`` exporter)."""
    package = type(array).__module__.split(".")[0]
    if package in ("cupy", "torch"):
        return package
    if getattr(array, "__cuda_ndarray__", False):
        return "numba"
    return "other"


def owns(array) -> bool:
    """CuPy arrays and any object exposing ``__cuda_array_interface__`` (torch CUDA tensors,
    numba device arrays); never a NumPy array."""
    if kind(array) == "cupy":
        return True
    if isinstance(array, np.ndarray):
        return False
    try:
        return hasattr(array, "__cuda_array_interface__")
    except Exception:  # a torch CPU tensor raises in the property; anything else: not ours
        return False


def _interface(array) -> dict:
    if kind(array) == "torch" and array.requires_grad:
        array = array.detach()  # torch refuses the interface of a tensor that requires grad
    return array.__cuda_array_interface__


def pointer(array) -> int:
    """The device address of the first element."""
    k = kind(array)
    if k == "cupy":
        return int(array.data.ptr)
    if k == "torch":
        return int(array.data_ptr())
    if k == "numba":
        return int(array.device_ctypes_pointer.value or 0)
    return int(_interface(array)["data"][0])


def as_numpy_dtype(dtype) -> np.dtype:
    """A NumPy dtype from a NumPy dtype, type or name, or a torch dtype (``torch.float32``)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(str(dtype).rsplit(".", 1)[-1])


def dtype_of(array) -> np.dtype:
    dtype = getattr(array, "dtype", None)
    if isinstance(dtype, np.dtype):
        return dtype
    if dtype is not None:
        return as_numpy_dtype(dtype)
    return np.dtype(_interface(array)["typestr"])


def size_of(array) -> int:
    return math.prod(array.shape)


def device_of(array) -> int:
    k = kind(array)
    if k == "cupy":
        return array.device.id
    if k == "torch":
        return array.device.index
    runtime = _cupy().cuda.runtime
    ptr = pointer(array)
    if ptr == 0:
        return runtime.getDevice()
    return runtime.pointerGetAttributes(ptr).device


class _StreamPointer(NamedTuple):
    """What cupy.cuda.function.Function needs of a stream: its handle, ``ptr``."""

    ptr: int


class Place:
    """Where one call's work goes: the device, the stream (None: CuPy's current stream), and the
    allocator for scratch memory and outputs, all taken from the kind of the call's first array
    (``like`` None: CuPy on its current device)."""

    def __init__(self, like):
        self.kind = "cupy" if like is None else kind(like)
        self.device = _cupy().cuda.runtime.getDevice() if like is None else device_of(like)
        self.like = like
        self.stream = None
        if self.kind == "torch":
            import torch

            self.stream = _StreamPointer(torch.cuda.current_stream(like.device).cuda_stream)

    def scratch(self, shape, dtype):
        """Uninitialized device memory for this call's own use (a CuPy or torch array)."""
        if self.kind == "torch":
            import torch

            return torch.empty(shape, dtype=_torch_dtype(dtype), device=self.like.device)
        return _cupy().empty(shape, dtype)

    def output(self, shape, dtype):
        """An uninitialized output array of the kind of the inputs."""
        if self.kind == "numba":
            from numba import cuda

            return cuda.as_cuda_array(_cupy().empty(shape, dtype), sync=False)
        return self.scratch(shape, dtype)


@contextlib.contextmanager
def place(like):
    """Make the device of ``like`` current (for CuPy's pool and the kernels' per-device
    functions) and yield its Place."""
    where = Place(like)
    with _cupy().cuda.Device(where.device):
        yield where


def _torch_dtype(dtype):
    import torch

    return torch.from_numpy(np.empty(0, as_numpy_dtype(dtype))).dtype


def empty(shape, dtype, like):
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    with place(like) as where:
        return where.output(shape, as_numpy_dtype(dtype))


def empty_like(array):
    return empty(tuple(array.shape), dtype_of(array), array)


def full_like(array, value):
    """An array like ``array`` filled with ``value`` (rounded to its dtype), without synchronizing."""
    k = kind(array)
    if k == "torch":
        import torch

        return torch.full_like(array, float(value))
    cupy = _cupy()
    with cupy.cuda.Device(device_of(array)):
        filled = cupy.full(tuple(array.shape), value, dtype=dtype_of(array))
    if k == "numba":
        from numba import cuda

        return cuda.as_cuda_array(filled, sync=False)
    return filled


def zeros_like(array):
    return full_like(array, 0.0)


def to_numpy(array) -> np.ndarray:
    """A host copy (tests, verification, state_dict; synchronizes)."""
    k = kind(array)
    if k == "cupy":
        return array.get()
    if k == "torch":
        return array.detach().cpu().numpy().copy()
    if k == "numba":
        return array.copy_to_host()
    cupy = _cupy()
    with cupy.cuda.Device(device_of(array)):
        return cupy.asnumpy(cupy.asarray(array))


def from_numpy(host, like=None):
    """A device copy of the NumPy array ``host``, of the kind (and device) of ``like``; a CuPy
    array on the current device when ``like`` is None."""
    host = np.ascontiguousarray(host)
    if like is None:
        return _cupy().asarray(host)
    k = kind(like)
    if k == "torch":
        import torch

        return torch.from_numpy(host.copy()).to(like.device)
    cupy = _cupy()
    with cupy.cuda.Device(device_of(like)):
        copy = cupy.asarray(host)
    if k == "numba":
        from numba import cuda

        return cuda.as_cuda_array(copy, sync=False)
    return copy


def copy_from_numpy(array, host) -> None:
    """Write the host array ``host`` (``array``'s shape) into ``array`` in place (synchronous)."""
    cupy = _cupy()
    host = np.ascontiguousarray(host, dtype_of(array))
    with cupy.cuda.Device(device_of(array)):
        view = array if kind(array) == "cupy" else cupy.asarray(array)  # a view, through the interface
        view.set(host.reshape(view.shape))


_usable = False


def unavailable_reason() -> str:
    """"" when CuPy is installed and can use a CUDA device here, else why not (checked again on
    every call until a device has been found)."""
    global _usable
    if _usable:
        return ""
    try:
        cupy = _cupy()
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); pip install cupy-cuda12x"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver, or one older than CuPy's runtime
        return f"no usable CUDA device: {type(exc).__name__}: {' '.join(str(exc).split())}"
    if count == 0:
        return "no CUDA device"
    _usable = True
    return ""
