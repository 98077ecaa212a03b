"""Device arrays of any kind for the ``"cupy"`` backend: what they point to, where outputs come
from, which stream kernels run on, and whether a device is usable at all.

The backend takes CuPy arrays and any object exposing ``__cuda_array_interface__`` (a torch CUDA
tensor, a numba device array). Kernels never need a CuPy view of an input: they take raw device
pointers (``.data.ptr``, ``.data_ptr()``, or the interface's ``data`` field), so nothing is copied
and nothing synchronizes. (``cupy.asarray`` on a foreign array would synchronize the host with the
producer's stream when the interface names one, CuPy's default ``CUPY_CUDA_ARRAY_INTERFACE_SYNC=1``;
reading the pointer avoids that.)

Kinds, told apart by type, and where their work goes (``stream_plan``, a pure function; the
rules of ``__cuda_array_interface__`` v3 and of torch, docs/backends.md "Streams"):

* ``"torch"``: outputs and scratch memory come from torch's caching allocator on the tensor's
  device, and kernels run on torch's current stream of that device, so they are ordered with the
  torch work around them (and captured under ``torch.cuda.graph``);
* ``"cupy"``: CuPy's memory pool and CuPy's current stream (CuPy's own rule);
* ``"numba"`` and any other interface object (``"other"``): the first stream the arrays name (a
  numba array's own stream, or the interface's ``stream``), made CuPy's current stream for the
  call, so that CuPy's pool orders scratch memory and outputs on it too, after it has waited (an
  event, not the host) on every other stream they name; when none names one, CuPy's current
  stream. Outputs of numba inputs are numba device arrays wrapping CuPy memory (zero-copy, no
  synchronization) that export the stream they were written on (no stream for the legacy default
  stream; v3 forbids 0); outputs of other exporters are CuPy arrays.

CuPy is imported on first use, not at import: ``import fastopt.kernels.cupy`` works on any machine
and ``unavailable_reason()`` says why the backend cannot run where it cannot.
Validated input is assumed (docs/backends.md): C-contiguous arrays of one kind and device per call.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple
import numpy as np

from .._streams import (LEGACY_STREAM, PER_THREAD_STREAM, StreamPlan, advertised_stream, device_arrays,
                       stream_plan)

__all__ = [
    "LEGACY_STREAM",
    "PER_THREAD_STREAM",
    "Place",
    "StreamPlan",
    "advertised_stream",
    "copy_from_numpy",
    "dtype_of",
    "empty",
    "empty_like",
    "from_numpy",
    "full_like",
    "kind",
    "owns",
    "place",
    "plan_for",
    "pointer",
    "size_of",
    "stream_plan",
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


# ---------------------------------------------------------------------------------------------
# streams: the rules of __cuda_array_interface__ v3 and of torch (docs/backends.md, "Streams");
# the choice itself is ``stream_plan`` of ``kernels/_streams.py``, shared with numba-cuda


def _advertised(k: str, arrays) -> list:
    """The stream each array of a call names: none for CuPy arrays (they follow CuPy's current
    stream), a numba array's own stream, another exporter's interface ``stream``."""
    if k == "cupy":
        return []
    if k == "numba":
        return [int(a.stream) if a.stream else None for a in arrays]
    return [advertised_stream(_interface(a)) for a in arrays]


def plan_for(arrays) -> StreamPlan:
    """The stream plan for a call on ``arrays`` (of one kind). Imports torch only for torch tensors."""
    arrays = device_arrays(arrays)
    if not arrays:
        return StreamPlan(None, ())
    k = kind(arrays[0])
    if k == "torch":
        import torch

        return stream_plan(k, (), torch.cuda.current_stream(arrays[0].device).cuda_stream)
    return stream_plan(k, _advertised(k, arrays))


class _StreamPointer(NamedTuple):
    """What cupy.cuda.function.Function needs of a stream: its handle, ``ptr``."""

    ptr: int


def _cupy_stream(handle: int):
    """A CuPy stream object for a v3 stream handle."""
    cuda = _cupy().cuda
    if handle == LEGACY_STREAM:
        return cuda.Stream.null
    if handle == PER_THREAD_STREAM:
        return cuda.Stream.ptds
    return cuda.ExternalStream(handle)


def _wait(stream, on) -> None:
    """Make ``stream`` wait for the work queued so far on ``on`` (an event; the host never waits)."""
    event = _cupy().cuda.Event(disable_timing=True)
    event.record(on)
    stream.wait_event(event)


class Place:
    """Where one call's work goes, from its arrays (``like`` first; None: CuPy on its current
    device): the device, the stream plan (``stream``: None for CuPy's current stream, else an
    object with the handle as ``ptr``), and the allocator for scratch memory and outputs."""

    def __init__(self, like, *others):
        self.kind = "cupy" if like is None else kind(like)
        self.device = _cupy().cuda.runtime.getDevice() if like is None else device_of(like)
        self.like = like
        self.plan = plan_for((like, *others))
        self.stream = None if self.plan.launch is None else _StreamPointer(self.plan.launch)

    def scratch(self, shape, dtype):
        """Uninitialized device memory for this call's own use (a CuPy or torch array), from the
        allocator of the launch stream: torch's for torch tensors, else CuPy's pool, which
        ``place`` has made current on the launch stream."""
        if self.kind == "torch":
            import torch

            return torch.empty(shape, dtype=_torch_dtype(dtype), device=self.like.device)
        return _cupy().empty(shape, dtype)

    def output(self, shape, dtype):
        """An uninitialized output array of the kind of the inputs."""
        if self.kind == "numba":
            return self.as_numba(_cupy().empty(shape, dtype))
        return self.scratch(shape, dtype)

    def as_numba(self, array):
        """A numba device array over the CuPy array ``array`` (zero-copy, no synchronization) that
        exports the stream it is written on: the launch stream, as no stream when that is the
        legacy default stream (v3 forbids 0)."""
        from numba import cuda

        handle = self.plan.launch if self.plan.launch is not None else _cupy().cuda.get_current_stream().ptr
        interface = dict(array.__cuda_array_interface__)
        interface["stream"] = None if handle in (0, LEGACY_STREAM) else int(handle)
        return cuda.from_cuda_array_interface(interface, owner=array, sync=False)


@contextlib.contextmanager
def place(like, *others):
    """Make the device of ``like`` current (for CuPy's pool and the kernels' per-device
    functions), and for arrays that name a stream make it CuPy's current stream after it has waited
    on the other streams they name; yield the call's Place. ``others``: the call's other arrays."""
    where = Place(like, *others)
    with _cupy().cuda.Device(where.device):
        if where.kind == "torch" or where.plan.launch is None:
            yield where
            return
        stream = _cupy_stream(where.plan.launch)
        with stream:
            for handle in where.plan.waits:
                _wait(stream, _cupy_stream(handle))
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
    with place(array) as where:
        filled = _cupy().full(tuple(array.shape), value, dtype=dtype_of(array))
        return where.as_numba(filled) if k == "numba" else filled


def zeros_like(array):
    return full_like(array, 0.0)


def to_numpy(array) -> np.ndarray:
    """A host copy (tests, verification, state_dict; synchronizes)."""
    k = kind(array)
    if k == "cupy":
        return array.get()
    if k == "torch":
        return array.detach().cpu().numpy().copy()
    if k == "numba":  # on the array's own stream, then wait for it
        host = array.copy_to_host()
        if array.stream:
            array.stream.synchronize()
        return host
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
    with place(like) as where:
        copy = _cupy().asarray(host)
        return where.as_numba(copy) if k == "numba" else copy


def copy_from_numpy(array, host) -> None:
    """Write the host array ``host`` (``array``'s shape) into ``array`` in place (synchronous)."""
    host = np.ascontiguousarray(host, dtype_of(array))
    if kind(array) == "torch":  # on torch's current stream, like the kernels
        import torch

        with torch.no_grad():
            array.copy_(torch.from_numpy(host.reshape(tuple(array.shape))))
        return
    with place(array):  # on the array's stream (CuPy's current one for CuPy arrays)
        view = array if kind(array) == "cupy" else _cupy().asarray(array)  # a view, through the interface
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
