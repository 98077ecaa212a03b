"""Device arrays of the ``"numba-cuda"`` backend: kinds, allocation, flat views, streams, scratch.

Kinds of array accepted (one kind per call): numba device arrays, CuPy arrays, torch CUDA tensors
and any other object exposing ``__cuda_array_interface__``. Arrays the backend allocates for the
caller (``empty``, ``empty_like``, ``zeros_like``, ``full_like``, ``from_numpy``, the reductions'
results) are of the kind of the input: CuPy in, CuPy out (on the input's device); torch in, torch
out (``device=`` the input's); a numba device array or any other kind in, a numba device array out.

Kernels see numba device arrays: ``flat(a)`` is a 1-D numba view of ``a``'s memory (no copy). It is
built from the ``__cuda_array_interface__`` without the exporter's stream, so no synchronization
happens (numba's own conversion, used when a foreign array is passed straight to a kernel,
synchronizes the exporter's stream with the host). Kernels are launched on the stream the input
advertises (``stream_of``): a numba array's own stream, or the ``stream`` entry of the interface
(1: the legacy default stream, 2: the per-thread default stream, otherwise that stream), else the
default stream. So work is ordered with the caller's other work on that stream, without waiting.

Scratch buffers (per-block partial sums, per-channel coefficients, a converted ``grad_mul``) are
numba device arrays kept per (host thread, stream, name, dtype) and only grown, so steady-state
calls allocate nothing; kernels of one stream run in order, so reusing them between calls is safe.
Everything runs on the current CUDA device (numba's current context). torch tensors that require
grad are read through ``detach()`` (torch refuses their interface otherwise).
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import cuda, types

from ._jit import SIMULATOR, THREADS, blocks_for, kernel

__all__ = [
    "address",
    "as_numpy_dtype",
    "copy_from_numpy",
    "dtype_of",
    "empty",
    "empty_like",
    "fill",
    "flat",
    "from_numpy",
    "full_like",
    "owns",
    "shape_of",
    "stream_of",
    "to_numpy",
    "unavailable_reason",
    "workspace",
    "zeros_like",
]


# ---------------------------------------------------------------------------------------------
# kinds


def _kind(array) -> str:
    """"numba", "cupy", "torch" or "cai" (another ``__cuda_array_interface__`` exporter)."""
    if getattr(array, "__cuda_ndarray__", False):
        return "numba"
    package = type(array).__module__.split(".")[0]
    if package in ("cupy", "torch"):
        return package
    return "cai"


def owns(array) -> bool:
    """True for a numba device array or any object exposing ``__cuda_array_interface__``."""
    if isinstance(array, np.ndarray):
        return False
    if getattr(array, "__cuda_ndarray__", False):
        return True
    try:
        return hasattr(array, "__cuda_array_interface__")
    except Exception:  # a torch CPU tensor raises something other than AttributeError in some versions
        return False


def _interface(array) -> dict:
    if _kind(array) == "torch" and array.requires_grad:
        array = array.detach()  # torch refuses the interface of a tensor that requires grad
    return array.__cuda_array_interface__


def shape_of(array) -> tuple:
    return tuple(array.shape)


def as_numpy_dtype(dtype) -> np.dtype:
    """A NumPy dtype from a NumPy dtype, type or name, or a torch dtype (``torch.float32``)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(str(dtype).rsplit(".", 1)[-1])


def dtype_of(array) -> np.dtype:
    """The NumPy dtype (a torch tensor's dtype is read from its array interface)."""
    dtype = getattr(array, "dtype", None)
    if isinstance(dtype, np.dtype):
        return dtype
    return np.dtype(_interface(array)["typestr"])


def address(array) -> int:
    """The device address of the array's first element (an integer)."""
    if SIMULATOR:
        return int(array._ary.ctypes.data)  # the simulator's device memory is a host ndarray
    kind = _kind(array)
    if kind == "numba":
        return int(array.device_ctypes_pointer.value or 0)
    if kind == "torch":  # much cheaper than building the interface dict (multi_step reads many)
        return int(array.data_ptr())
    if kind == "cupy":
        return int(array.data.ptr)
    return int(_interface(array)["data"][0])


def flat(array):
    """A 1-D numba device array over ``array``'s memory (C-contiguous), without synchronizing."""
    if getattr(array, "__cuda_ndarray__", False):
        return array if array.ndim == 1 else array.reshape(array.size)
    interface = _interface(array)
    size = math.prod(interface["shape"])
    description = {"shape": (size,), "strides": None, "typestr": interface["typestr"],
                   "data": interface["data"], "version": 2}  # no "stream": nothing to synchronize
    return cuda.from_cuda_array_interface(description, owner=array, sync=False)


# ---------------------------------------------------------------------------------------------
# streams


_external_streams: dict[int, object] = {}
_default_stream = None


def stream_of(array):
    """The stream to launch on for ``array`` (see the module docstring); 0 under the simulator."""
    global _default_stream
    if SIMULATOR:
        return 0
    if _kind(array) == "numba":
        stream = array.stream
    else:
        handle = _interface(array).get("stream")
        if not handle:  # absent (or a non-conforming 0): no stream to follow
            stream = 0
        elif handle == 1:
            stream = cuda.legacy_default_stream()
        elif handle == 2:
            stream = cuda.per_thread_default_stream()
        else:
            stream = _external_streams.get(handle)
            if stream is None:
                stream = _external_streams.setdefault(handle, cuda.external_stream(handle))
    if not stream:
        if _default_stream is None:
            _default_stream = cuda.default_stream()
        stream = _default_stream
    return stream


def stream_key(stream) -> int:
    return 0 if SIMULATOR else int(stream)


# ---------------------------------------------------------------------------------------------
# allocation


def _numba_empty(shape, dtype, stream=0):
    return cuda.device_array(shape, dtype=np.dtype(dtype), stream=stream)


def empty(shape, dtype, like):
    """An uninitialized array of ``shape`` and ``dtype``, of the kind (and device) of ``like``."""
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    dtype = as_numpy_dtype(dtype)
    kind = _kind(like)
    if kind == "cupy":
        import cupy

        with like.device:
            return cupy.empty(shape, dtype=np.dtype(dtype))
    if kind == "torch":
        import torch

        torch_dtype = torch.from_numpy(np.empty(0, np.dtype(dtype))).dtype
        return torch.empty(shape, dtype=torch_dtype, device=like.device)
    return _numba_empty(shape, dtype, stream_of(like))


def empty_like(array):
    return empty(shape_of(array), dtype_of(array), array)


def full_like(array, value):
    """An array like ``array`` filled with ``value`` (rounded to its dtype), without synchronizing."""
    kind = _kind(array)
    if kind == "cupy":
        import cupy

        with array.device:
            return cupy.full(shape_of(array), value, dtype=dtype_of(array))
    if kind == "torch":
        import torch

        return torch.full_like(array, float(value))
    out = empty_like(array)
    fill(out, value)
    return out


def zeros_like(array):
    return full_like(array, 0.0)


def to_numpy(array) -> np.ndarray:
    """A host copy (synchronizes; for tests, verification and state_dict)."""
    kind = _kind(array)
    if kind == "numba":
        return array.copy_to_host()
    if kind == "cupy":
        return array.get()
    if kind == "torch":
        return array.detach().cpu().numpy().copy()
    return cuda.as_cuda_array(array).copy_to_host()


def from_numpy(host, like=None):
    """A device copy of the NumPy array ``host``, of the kind (and device) of ``like``; a numba
    device array on the current device when ``like`` is None."""
    host = np.ascontiguousarray(host)
    kind = _kind(like)
    if kind == "cupy":
        import cupy

        with like.device:
            return cupy.asarray(host)
    if kind == "torch":
        import torch

        return torch.from_numpy(host.copy()).to(like.device)
    return cuda.to_device(host)


def copy_from_numpy(array, host) -> None:
    """Write the host array ``host`` (``array``'s shape) into ``array`` in place (synchronous)."""
    flat(array).copy_to_device(np.ascontiguousarray(host, dtype_of(array)).reshape(-1))


_unavailable: str | None = None


def unavailable_reason() -> str:
    """"" when numba-cuda can use a CUDA device here (or the simulator is on), else why not."""
    global _unavailable
    if _unavailable == "":
        return ""
    if SIMULATOR:
        _unavailable = ""
        return ""
    try:
        available = cuda.is_available()
    except Exception as exc:  # noqa: BLE001 - any driver failure is a reason
        return f"numba-cuda cannot use CUDA: {type(exc).__name__}: {exc}"
    if available:
        _unavailable = ""
        return ""
    try:
        cuda.gpus[0]
    except Exception as exc:  # noqa: BLE001
        detail = " ".join(str(exc).split())
        detail = detail.rstrip(" :")
        return f"no usable CUDA device: {detail}" if detail else "no usable CUDA device"
    return "no usable CUDA device (numba.cuda.is_available() is False)"


# ---------------------------------------------------------------------------------------------
# scratch


_workspaces: dict[tuple, object] = {}
_workspace_lock = threading.Lock()


def workspace(name: str, shape, dtype, stream):
    """A scratch numba device array of ``shape``, reused by later calls on this thread and stream.

    Contents are undefined; the buffer behind it only grows (to the next power of two)."""
    shape = tuple(int(s) for s in shape)
    size = max(1, math.prod(shape))
    dtype = np.dtype(dtype)
    key = (threading.get_ident(), stream_key(stream), name, dtype)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.size < size:
        with _workspace_lock:
            buffer = _numba_empty(1 << (size - 1).bit_length(), dtype, stream)
            _workspaces[key] = buffer
    return buffer[:math.prod(shape)].reshape(shape)


# ---------------------------------------------------------------------------------------------
# fill


@kernel(lambda dt: types.void(dt[::1], dt), name="arrays.fill")
def _fill(out, value):
    """out[i] = value (grid-stride)."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = value


def fill(array, value) -> None:
    """Set every element of a device array (any kind) to ``value``, on its stream."""
    dtype = dtype_of(array)
    view = flat(array)
    n = view.shape[0]
    if n:
        _fill[dtype][blocks_for(n), THREADS, stream_of(array)](view, dtype.type(value))
