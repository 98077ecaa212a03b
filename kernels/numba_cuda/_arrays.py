"""Device arrays of the ``"numba-cuda"`` backend: kinds, allocation, flat views, streams, scratch.

Kinds of array accepted (one kind per call): numba device arrays, CuPy arrays, torch CUDA tensors
and any other object exposing ``__cuda_array_interface__``. Arrays the backend allocates for the
caller (``empty``, ``empty_like``, ``zeros_like``, ``full_like``, ``from_numpy``, the reductions'
results) are of the kind of the input: CuPy in, CuPy out (on the input's device); torch in, torch
out (``device=`` the input's); a numba device array or any other kind in, a numba device array out.

Kernels see numba device arrays: ``flat(a)`` is a 1-D numba view of ``a``'s memory (no copy). It is
built from the ``__cuda_array_interface__`` without the exporter's stream, so no synchronization
happens (numba's own conversion, used when a foreign array is passed straight to a kernel,
synchronizes the exporter's stream with the host).

Streams (``stream_of``, the choice itself in the pure function ``stream_plan``; docs/backends.md,
"Streams"): torch tensors run on torch's current stream of their device (torch exports interface
version 2, without a stream, and orders its own work on that stream; under ``torch.cuda.graph``
that is the capture stream, so the launches are captured). Any other kind runs on the first
stream its arrays name (a numba array's own stream, or the interface's ``stream``: 1 the legacy
default stream, 2 the per-thread default stream, otherwise that stream), after that stream has
been made to wait (an event, never the host) on every other stream the arrays name; when none
names a stream, on numba's default stream. Numba arrays allocated for the caller are bound to the
launch stream and export it, except the default stream, which they export as no stream (v3
forbids 0). ``to_numpy`` copies on the array's stream and waits for it.

Scratch buffers (per-block partial sums, per-channel coefficients, a converted ``grad_mul``) are
numba device arrays kept per (host thread, stream, name, dtype) and only grown, so steady-state
calls allocate nothing; kernels of one stream run in order, so reusing them between calls is safe.
On torch's streams scratch comes from torch's caching allocator instead (stream-ordered, and
graph-safe). Everything runs on the current CUDA device (numba's current context). torch tensors
that require grad are read through ``detach()`` (torch refuses their interface otherwise).
"""

from __future__ import annotations

import math
import threading
import numpy as np
from numba import cuda, types

from .._streams import (LEGACY_STREAM, PER_THREAD_STREAM, StreamPlan, advertised_stream, device_arrays,
                       stream_plan)
from ._jit import SIMULATOR, THREADS, blocks_for, kernel

__all__ = [
    "LEGACY_STREAM",
    "PER_THREAD_STREAM",
    "StreamPlan",
    "address",
    "advertised_stream",
    "as_numpy_dtype",
    "copy_from_numpy",
    "dtype_of",
    "empty",
    "empty_like",
    "fill",
    "flat",
    "from_numpy",
    "full_like",
    "is_capturing",
    "new_event",
    "output_stream",
    "owns",
    "plan_for",
    "shape_of",
    "stream_key",
    "stream_of",
    "stream_plan",
    "to_numpy",
    "torch_device_of",
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
#
# The rules are those of ``__cuda_array_interface__`` v3 (a consumer must wait on the stream an
# array names before using it, or run on it) and of torch (work on a tensor goes to torch's current
# stream of its device). ``stream_plan`` (``kernels/_streams.py``, shared with the cupy backend) is
# the choice itself, a pure function of what the arrays advertise; ``stream_of`` gathers that, makes
# the CUDA stream objects and issues the waits.


def _is_torch(array) -> bool:
    """True for a torch tensor, told by its type's module, so torch is never imported otherwise."""
    return type(array).__module__.split(".")[0] == "torch"


def _torch_current_stream(tensor) -> int:
    """The handle of torch's current stream on the tensor's device (imports torch: only called
    with a torch tensor, so torch is already loaded)."""
    import torch

    return int(torch.cuda.current_stream(tensor.device).cuda_stream)


def _advertised(kind: str, arrays) -> list:
    """What each array of one call names: a numba array its own stream, a CuPy array CuPy's
    current stream (all of them the same, so only the first is read), another exporter its
    interface's ``stream``."""
    if kind == "numba":
        return [int(a.stream) if a.stream else None for a in arrays]
    if kind == "cupy":
        return [advertised_stream(_interface(arrays[0]))]
    return [advertised_stream(_interface(a)) for a in arrays]


def plan_for(arrays) -> StreamPlan:
    """The stream plan for a call on ``arrays`` (of one kind; None entries and numbers skipped)."""
    arrays = device_arrays(arrays)
    if not arrays:
        return StreamPlan(None, ())
    kind = _kind(arrays[0])
    if kind == "torch":
        return stream_plan(kind, (), _torch_current_stream(arrays[0]))
    return stream_plan(kind, _advertised(kind, arrays))


class _SimulatedStream:
    """A stream under the CUDA simulator, where nothing is asynchronous: it carries the handle the
    plan chose, so the simulator suite can see where each launch went."""

    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self):
        return self.handle

    def __repr__(self):
        return f"<simulated stream {self.handle}>"

    def synchronize(self):
        pass


_streams: dict[tuple, object] = {}


def _stream_object(handle: int | None, torch_device=None):
    """The stream object for a planned handle (None: numba's default stream); cached. A stream
    chosen for torch tensors carries ``torch_device``, so that scratch memory of launches on it
    comes from torch's allocator (``workspace``)."""
    key = (handle, torch_device)
    stream = _streams.get(key)
    if stream is None:
        if SIMULATOR:
            stream = _SimulatedStream(0 if handle is None else handle)
        elif handle is None:
            stream = cuda.default_stream()
        elif handle == LEGACY_STREAM and torch_device is None:
            stream = cuda.legacy_default_stream()
        elif handle == PER_THREAD_STREAM and torch_device is None:
            stream = cuda.per_thread_default_stream()
        else:
            stream = cuda.external_stream(handle)
        if torch_device is not None:
            stream.torch_device = torch_device
        stream = _streams.setdefault(key, stream)
    return stream


def new_event():
    """A CUDA event without timing (the simulator's events take no arguments)."""
    return cuda.event() if SIMULATOR else cuda.event(timing=False)


def _wait(stream, on) -> None:
    """Make ``stream`` wait for the work queued so far on ``on`` (an event; the host never waits)."""
    event = new_event()
    event.record(stream=on)
    event.wait(stream=stream)


def stream_of(*arrays):
    """The stream to launch a call's kernels on, given the arrays it reads and writes (see
    ``stream_plan``): torch's current stream for torch tensors, else the first stream an array
    names, else numba's default stream. It is first made to wait on the other streams the arrays
    name (no host synchronization)."""
    arrays = device_arrays(arrays)
    plan = plan_for(arrays)
    torch_device = arrays[0].device if arrays and _is_torch(arrays[0]) else None
    stream = _stream_object(plan.launch, torch_device)
    for handle in plan.waits:
        _wait(stream, _stream_object(handle))
    return stream


def output_stream(like):
    """The stream a numba device array allocated for a call on ``like`` is bound to (and exports
    as its interface's ``stream``): the launch stream when the inputs name one, else 0, so that an
    array on the default stream names no stream (version 3 forbids exporting 0)."""
    plan = plan_for((like,))
    if plan.launch is None or plan.launch == LEGACY_STREAM:
        return 0
    return _stream_object(plan.launch)


def stream_key(stream):
    """What identifies a stream in the per-stream caches: its handle, and for the per-thread
    default stream (one handle, a different stream in every thread) also the thread."""
    handle = int(stream)
    if handle == PER_THREAD_STREAM:
        return (handle, threading.get_ident())
    return handle


def torch_device_of(stream):
    """The torch device a launch stream was chosen for (torch tensors), else None."""
    return getattr(stream, "torch_device", None)


def is_capturing(stream) -> bool:
    """True while torch captures a CUDA graph on the current stream and ``stream`` was chosen for
    torch tensors (then nothing may allocate with numba, upload, or wait on another stream)."""
    if torch_device_of(stream) is None:
        return False
    import torch

    return bool(torch.cuda.is_current_stream_capturing())


# ---------------------------------------------------------------------------------------------
# allocation


def _numba_empty(shape, dtype, stream=0):
    return cuda.device_array(shape, dtype=np.dtype(dtype), stream=stream)


def _torch_dtype(dtype):
    import torch

    return torch.from_numpy(np.empty(0, np.dtype(dtype))).dtype


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

        return torch.empty(shape, dtype=_torch_dtype(dtype), device=like.device)
    return _numba_empty(shape, dtype, output_stream(like))


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
    if kind == "numba":  # on the array's own stream (the one its kernels ran on), then wait for it
        host = array.copy_to_host()
        if array.stream:
            array.stream.synchronize()
        return host
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
    """Write the host array ``host`` (``array``'s shape) into ``array`` in place (synchronous),
    on the array's stream, after the work already queued there."""
    stream = stream_of(array)
    flat(array).copy_to_device(np.ascontiguousarray(host, dtype_of(array)).reshape(-1), stream=stream)
    stream.synchronize()


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

    Contents are undefined; the buffer behind it only grows (to the next power of two). On a
    stream chosen for torch tensors the memory is a fresh torch tensor instead, from torch's
    caching allocator on that stream: torch hands it out again only to later work on the same
    stream, and while torch captures a CUDA graph it comes from the graph's private pool (numba's
    allocator may not run during a capture, and the graph must own what its kernels use)."""
    shape = tuple(int(s) for s in shape)
    size = max(1, math.prod(shape))
    dtype = np.dtype(dtype)
    torch_device = torch_device_of(stream)
    if torch_device is not None:
        import torch

        scratch = torch.empty(size, dtype=_torch_dtype(dtype), device=torch_device)
        return flat(scratch)[:math.prod(shape)].reshape(shape)
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
