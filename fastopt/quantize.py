"""Block-wise dynamic quantization: the public ``quantize_blockwise`` and ``dequantize_blockwise``.

The 8-bit optimizer state of issue 13 will be stored this way (Dettmers et al., "8-bit Optimizers
via Block-wise Quantization", ICLR 2022; bitsandbytes' ``quantize_blockwise``): the flattened array
(C order) is cut into blocks of ``block`` elements (the last one partial), each block keeps one
float32 absmax a_b = max|x_i|, and each element one uint8 code, the index of the value of the
dynamic (tree) map nearest to x_i / a_b; the map is signed (for first moments) or unsigned (for
second moments). The equations, the tie rule, the handling of zeros, NaN and ±inf and the error
bound are in ``docs/algorithms.md``, "Block-wise dynamic quantization".

    codes, absmax = quantize_blockwise(x, signed=True)    # codes uint8 (x's shape), absmax float32 (blocks,)
    y = dequantize_blockwise(codes, absmax, signed=True)  # float32, codes' shape (a float64 out= for float64)

Backend contract: a backend module implements

    quantize_blockwise(x, codes, absmax, *, signed, block) -> None
    dequantize_blockwise(codes, absmax, out, *, signed, block) -> None

and receives validated, C-contiguous NumPy arrays: ``x`` and ``out`` float32 or float64, ``codes``
uint8 of x's (out's) shape, ``absmax`` float32 of shape (ceil(size / block),); written arrays share
no memory with read ones; ``signed`` a bool, ``block`` an int ≥ 1. The backends are ``"numpy"``
(the reference) and ``"numba"``; the GPU backends do not implement it yet and raise.
"""

from __future__ import annotations

import numbers

import numpy as np

from . import dispatch
from ._checks import check_bool, check_disjoint, is_device_array, kind_name

__all__ = ["BLOCK", "dequantize_blockwise", "dynamic_map", "quantize_blockwise"]

BLOCK = 256  # elements per block (docs/algorithms.md: why 256)

_GPU = ("numba-cuda", "cupy")


def _check_block(block) -> int:
    if isinstance(block, (bool, np.bool_)) or not isinstance(block, numbers.Integral):
        raise TypeError(f"block must be an int, got {type(block).__name__} {block!r}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return int(block)


def _check_host(name: str, array, dtypes: tuple, *, writeable: bool) -> np.ndarray:
    """A C-contiguous NumPy array of one of ``dtypes`` (writeable when written)."""
    if not isinstance(array, np.ndarray):
        if is_device_array(array):
            raise TypeError(f"{name}: block-wise quantization is not implemented yet for CUDA device arrays "
                            f"(backends 'numba-cuda' and 'cupy'; issue 13), got {kind_name(array)}")
        raise TypeError(f"{name} must be a numpy.ndarray, got {kind_name(array) if array is not None else 'None'}")
    if array.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {array.dtype}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray), got strides {array.strides}")
    if writeable and not array.flags.writeable:
        raise ValueError(f"{name} must be writeable: it is written")
    return array


def _check_absmax(name: str, absmax, size: int, block: int, *, writeable: bool) -> np.ndarray:
    _check_host(name, absmax, (np.dtype(np.float32),), writeable=writeable)
    blocks = -(-size // block)
    if absmax.shape != (blocks,):
        raise ValueError(f"{name} must have shape ({blocks},), one float32 per block of {block} elements "
                         f"of {size} elements, got {absmax.shape}")
    return absmax


def _backend(backend, x):
    """The backend module; a GPU backend named explicitly raises (not implemented yet)."""
    dispatch.check_backend_name(backend)
    if backend in _GPU:
        raise dispatch.BackendUnavailableError(
            f"backend {backend!r} does not implement block-wise quantization yet (issue 13); "
            "use backend='numba' or 'numpy' on NumPy arrays")
    return dispatch.resolve(backend, x)


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def dynamic_map(signed) -> np.ndarray:
    """The 256 values of the dynamic map, sorted, float32 (a new array): code q stands for map[q]."""
    from .reference.quantize import dynamic_map as reference_map

    return reference_map(check_bool("signed", signed)).copy()


def quantize_blockwise(x, *, signed, block=BLOCK, out=None, backend=None):
    """Quantize ``x`` block by block; returns ``(codes, absmax)``.

    ``x``: a C-contiguous float32 or float64 NumPy array, any shape. ``codes``: uint8, x's shape,
    the index of the map value nearest to x_i / a_b (ties: the smaller value); ``absmax``: float32,
    shape (ceil(x.size / block),), a_b = max|x_i| of each block (0 for an all-zero block, NaN for a
    block holding NaN or ±inf). ``signed``: the signed map (first moments) or the unsigned one
    (second moments: x ≥ 0; a negative value gets the zero code). ``out=(codes, absmax)`` writes
    into preallocated arrays (either may be None). Every argument is checked before anything is
    written."""
    dispatch.check_backend_name(backend)
    _check_host("x", x, _FLOATS, writeable=False)
    signed = check_bool("signed", signed)
    block = _check_block(block)
    codes, absmax = None, None
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            length = f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""
            raise TypeError(f"out must be None or a tuple (codes, absmax) of 2 arrays (or None), got "
                            f"{type(out).__name__}{length}")
        codes, absmax = out
        if codes is not None:
            _check_host("out[0] (codes)", codes, (np.dtype(np.uint8),), writeable=True)
            if codes.shape != x.shape:
                raise ValueError(f"out[0] (codes) must have the shape of x {x.shape}, got {codes.shape}")
        if absmax is not None:
            _check_absmax("out[1] (absmax)", absmax, x.size, block, writeable=True)
    check_disjoint({"out[0] (codes)": codes, "out[1] (absmax)": absmax}, {"x": x})
    module = _backend(backend, x)
    codes = np.empty(x.shape, np.uint8) if codes is None else codes
    absmax = np.empty(-(-x.size // block), np.float32) if absmax is None else absmax
    module.quantize_blockwise(x, codes, absmax, signed=signed, block=block)
    return codes, absmax


def dequantize_blockwise(codes, absmax, *, signed, block=BLOCK, out=None, backend=None):
    """The values the codes stand for: y_i = m[codes_i] · absmax of its block; returns ``y``.

    ``codes``: C-contiguous uint8, any shape; ``absmax``: float32, shape (ceil(codes.size / block),);
    ``signed`` and ``block`` as given to ``quantize_blockwise``. ``y`` is float32 of codes' shape,
    or ``out`` (float32 or float64, codes' shape) when given. Every argument is checked before
    anything is written."""
    dispatch.check_backend_name(backend)
    _check_host("codes", codes, (np.dtype(np.uint8),), writeable=False)
    signed = check_bool("signed", signed)
    block = _check_block(block)
    _check_absmax("absmax", absmax, codes.size, block, writeable=False)
    if out is not None:
        _check_host("out", out, _FLOATS, writeable=True)
        if out.shape != codes.shape:
            raise ValueError(f"out must have the shape of codes {codes.shape}, got {out.shape}")
    check_disjoint({"out": out}, {"codes": codes, "absmax": absmax})
    module = _backend(backend, codes)
    out = np.empty(codes.shape, np.float32) if out is None else out
    module.dequantize_blockwise(codes, absmax, out, signed=signed, block=block)
    return out
