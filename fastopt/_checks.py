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


def check_array(name: str, array, *, writeable: bool) -> np.ndarray:
    """A C-contiguous float32/float64 NumPy array (writeable when the operation writes it)."""
    if array is None:
        raise TypeError(f"{name} must be a numpy.ndarray, got None")
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(array).__module__}.{type(array).__name__}")
    if array.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray), got strides {array.strides}")
    if writeable and not array.flags.writeable:
        raise ValueError(f"{name} must be writeable: it is updated in place")
    return array


def check_like(name: str, array: np.ndarray, ref_name: str, ref: np.ndarray) -> None:
    """``array`` has the shape and dtype of ``ref``."""
    if array.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {ref.shape}, got {array.shape}")
    if array.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {array.dtype}")


def check_disjoint(written: dict[str, np.ndarray | None], read: dict[str, np.ndarray | None] = {}) -> None:
    """No written array shares memory with any other array (arrays only read may share).

    An in-place update must not read what it has just written. The arrays are C-contiguous
    (checked before), so each occupies one byte interval; one sweep over the sorted intervals
    finds any overlap in O(n log n), which keeps a step over many tensors cheap.
    """
    spans = sorted(
        (a.__array_interface__["data"][0], a.nbytes, name, is_written)
        for is_written, arrays in ((True, written), (False, read))
        for name, a in arrays.items()
        if a is not None and a.nbytes
    )
    reach_any = reach_written = (0, "")  # furthest end seen so far, and whose
    for start, size, name, is_written in spans:
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
