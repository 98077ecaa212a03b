"""Argument checks shared by the API layer. Kernels assume their input passed these.

Every check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, bad value)
with a message naming the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
CONVENTIONS = ("textbook", "torch")


def check_real(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """A finite real number in the given interval, returned as a Python float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_step(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (the count of this update, 1 on the first), got {value!r}")
    return int(value)


def check_convention(value) -> str:
    if value not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {value!r}")
    return value


def _simulated(array) -> bool:
    """A device array of numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1): a numba device array
    without ``__cuda_array_interface__``, whose "device" memory is a host ndarray."""
    return getattr(array, "__cuda_ndarray__", False) and type(array).__module__.startswith("numba.cuda.simulator")


def is_device_array(array) -> bool:
    """A CUDA device array: CuPy, numba device arrays, torch CUDA tensors, ... (anything exposing
    ``__cuda_array_interface__``), and the device arrays of numba's CUDA simulator."""
    return not isinstance(array, np.ndarray) and (hasattr(array, "__cuda_array_interface__") or _simulated(array))


def _interface(array) -> dict:
    """A device array's ``__cuda_array_interface__``; for a simulated one, the same description of
    the host memory behind it."""
    if _simulated(array):
        return array._ary.__array_interface__
    return array.__cuda_array_interface__


def kind_name(array) -> str:
    return "numpy.ndarray" if isinstance(array, np.ndarray) else f"{type(array).__module__}.{type(array).__name__}"


def shape_of(array) -> tuple:
    if isinstance(array, np.ndarray):
        return array.shape
    return tuple(_interface(array)["shape"])


def dtype_of(array) -> np.dtype:
    if isinstance(array, np.ndarray):
        return array.dtype
    return np.dtype(_interface(array)["typestr"])


def span_of(array) -> tuple[int, int]:
    """(first byte address, size in bytes) of a C-contiguous array, host or device."""
    if isinstance(array, np.ndarray):
        return array.__array_interface__["data"][0], array.nbytes
    interface = _interface(array)
    return interface["data"][0], math.prod(interface["shape"]) * np.dtype(interface["typestr"]).itemsize


def _device_facts(array) -> tuple[np.dtype, bool, bool]:
    """(dtype, C-contiguous, writeable) of a device array, from its ``__cuda_array_interface__``."""
    interface = _interface(array)
    dtype = np.dtype(interface["typestr"])
    shape, strides = tuple(interface["shape"]), interface.get("strides")
    contiguous = strides is None
    if not contiguous:  # explicit strides may still describe a C-contiguous layout
        expected, step = [], dtype.itemsize
        for n in reversed(shape):
            expected.append(step)
            step *= n
        contiguous = all(n <= 1 or s == e for n, s, e in zip(shape, strides, reversed(expected)))
    return dtype, contiguous, not interface["data"][1]


def check_array(name: str, array, *, writeable: bool, low_precision: bool = False):
    """A C-contiguous float32/float64 array (writeable when the operation writes it): a NumPy
    array, or a CUDA device array (``__cuda_array_interface__``) for the GPU backends.
    ``low_precision`` also admits NumPy arrays of bfloat16 and float16 (``fastopt.precision``)."""
    if isinstance(array, np.ndarray):
        dtype, contiguous, can_write = array.dtype, array.flags.c_contiguous, array.flags.writeable
    elif is_device_array(array):
        dtype, contiguous, can_write = _device_facts(array)
    elif array is None:
        raise TypeError(f"{name} must be a numpy.ndarray or a CUDA device array, got None")
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or a CUDA device array, got {kind_name(array)}")
    if dtype not in FLOAT_DTYPES:
        if not (low_precision and dtype.itemsize == 2 and dtype.name in ("bfloat16", "float16")):
            raise TypeError(f"{name} must have dtype float32 or float64"
                            + (", or bfloat16 or float16 on the host" if low_precision else "") + f", got {dtype}")
    if not contiguous:
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray), got strides "
                         f"{getattr(array, 'strides', None)}")
    if writeable and not can_write:
        raise ValueError(f"{name} must be writeable: it is updated in place")
    return array


def check_same_kind(name: str, array, ref_name: str, ref) -> None:
    """``array`` and ``ref`` are both host arrays or both device arrays."""
    if isinstance(array, np.ndarray) is not isinstance(ref, np.ndarray):
        raise TypeError(f"{name} is a {kind_name(array)} but {ref_name} is a {kind_name(ref)}: host and device "
                        "arrays cannot be mixed in one call (fastopt never copies between them)")


def check_like(name: str, array, ref_name: str, ref) -> None:
    """``array`` has the shape, dtype and kind (host or device) of ``ref``."""
    check_same_kind(name, array, ref_name, ref)
    if shape_of(array) != shape_of(ref):
        raise ValueError(f"{name} must have the shape of {ref_name} {shape_of(ref)}, got {shape_of(array)}")
    if dtype_of(array) != dtype_of(ref):
        raise TypeError(f"{name} must have the dtype of {ref_name} ({dtype_of(ref)}), got {dtype_of(array)}")


def check_disjoint(written: dict[str, np.ndarray | None], read: dict[str, np.ndarray | None] = {}) -> None:
    """No written array shares memory with any other array (arrays only read may share).

    An in-place update must not read what it has just written. The arrays are C-contiguous
    (checked before), so each occupies one byte interval; one sweep over the sorted intervals
    finds any overlap in O(n log n), which keeps a step over many tensors cheap.
    """
    spans = sorted(
        (*span_of(a), name, is_written)
        for is_written, arrays in ((True, written), (False, read))
        for name, a in arrays.items()
        if a is not None
    )
    reach_any = reach_written = (0, "")  # furthest end seen so far, and whose
    for start, size, name, is_written in spans:
        if not size:
            continue
        blocker = reach_any if is_written else reach_written
        if start < blocker[0]:
            raise ValueError(f"{name} and {blocker[1]} must not share memory (are they the same array?)")
        end = start + size
        if end > reach_any[0]:
            reach_any = (end, name)
        if is_written and end > reach_written[0]:
            reach_written = (end, name)


def check_update_arrays(param, grad, state: dict[str, np.ndarray | None]) -> None:
    """The arrays of one fused update: param and its state written, grad read; all alike, disjoint."""
    check_array("param", param, writeable=True)
    check_array("grad", grad, writeable=False)
    check_like("grad", grad, "param", param)
    for name, array in state.items():
        if array is not None:
            check_array(name, array, writeable=True)
            check_like(name, array, "param", param)
    check_disjoint({"param": param, **state}, {"grad": grad})
