"""Low-precision training inside the optimizers: 16-bit parameters with float32 master weights or
stochastic rounding, and 8-bit optimizer state (``docs/algorithms.md``, "Low-precision
parameters" and "Optimizers with 8-bit state").

The optimizer classes (``fastopt.optim``) take these keywords and hand every bucket of bfloat16
or float16 parameters to the backend's ``mixed_step``, one fused pass per bucket:

* ``master_weights`` (default: on for 16-bit parameters): the optimizer keeps a float32 copy of
  each 16-bit parameter in its state (``state["master"]``), updates the copy, and writes the
  rounded parameter in the same pass. ``False`` updates the 16-bit parameter itself.
* ``rounding``: how a 16-bit parameter without master weights is stored, ``"nearest"`` (ties to
  even) or ``"stochastic"`` (unbiased; element i of parameter k at its t-th step draws from a
  counter-based stream keyed by ``(seed, t, k)``, so runs repeat and resume bit for bit).
* State arrays of a 16-bit parameter are float32; gradients have the parameter's dtype or float32.
* ``state_dtype="int8"`` (SGD with momentum, AdaGrad, RMSProp, Adam, AdamW; float32, bfloat16 or
  float16 parameters, a 16-bit one with its master copy or rounding as above):
  each state array of a parameter with at least ``min_8bit_size`` elements (default 4096, as
  bitsandbytes) is kept as block-wise quantized codes, ``state[name]`` (uint8, the parameter's
  shape) and ``state[name + "_absmax"]`` (float32, one per block of 256), and the backend's
  ``state8_step`` dequantizes, updates and requantizes each block in the one fused pass. Smaller
  parameters keep float32 state. ``state_dict`` holds codes and absmax as they are.
* ``state_dtype="bfloat16"`` (the same optimizers and parameters): every state array of every
  parameter is bfloat16, decoded exactly and stored rounded to nearest even in the same pass. On
  the host it is an ``ml_dtypes.bfloat16`` array; on a GPU backend (``"cupy"``,
  ``"numba-cuda"``), whose device arrays have no bfloat16 dtype, it is held as its bits in a
  uint16 array (``device_bfloat16``), and ``state_dict`` returns it as bfloat16 on the host.

The host backends (``"numba"``, the reference ``"numpy"``) take bfloat16 and float16 arrays. The
GPU backends take float16 parameters (``"cupy"`` also bfloat16 ones whose dtype it recognizes,
such as torch's) and 8-bit or bfloat16 state; what a backend lacks raises ``TypeError`` naming it
(``mixed_module``, ``compact_module``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ._checks import check_array, check_same_kind, dtype_of, shape_of

__all__ = ["LOW_PRECISION", "Precision", "check_options", "is_low", "sumsq"]

LOW_PRECISION = ("bfloat16", "float16")
ROUNDINGS = ("nearest", "stochastic")
STATE_DTYPES = ("float32", "bfloat16", "int8")
EIGHT_BIT = ("sgd", "adagrad", "rmsprop", "adam", "adamw")  # optimizers (spec names) with 8-bit or bfloat16 state
BLOCK = 256  # elements per absmax of 8-bit state (docs/algorithms.md: why 256)
ABSMAX = "_absmax"  # suffix of the state entry that holds a quantized state's absmax
_FLOAT32 = np.dtype(np.float32)


def is_low(dtype) -> bool:
    """Whether ``dtype`` is a 16-bit float the optimizers store with float32 arithmetic."""
    dtype = np.dtype(dtype)
    return dtype.itemsize == 2 and dtype.name in LOW_PRECISION


@dataclass(frozen=True)
class Precision:
    """The low-precision options of one optimizer, checked."""

    master_weights: bool | None = None
    rounding: str = "nearest"
    seed: int = 0
    state_dtype: str = "float32"
    min_8bit_size: int = 4096

    def master(self, dtype) -> bool:
        """Whether parameters of ``dtype`` keep a float32 master copy."""
        return is_low(dtype) and self.master_weights is not False

    def compact(self, param) -> bool:
        """Whether ``param``'s state is kept in 8 bits (``state_dtype="int8"``, a parameter of at
        least ``min_8bit_size`` elements) or in bfloat16 (``state_dtype="bfloat16"``, any size)."""
        if self.state_dtype == "bfloat16":
            return True
        return self.state_dtype == "int8" and int(np.prod(shape_of(param))) >= self.min_8bit_size


def check_options(spec_name, master_weights, rounding, seed, state_dtype, min_8bit_size) -> Precision:
    """The keywords of every optimizer, checked (``ValueError``/``TypeError`` naming the argument)."""
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
    if state_dtype != "float32" and spec_name not in EIGHT_BIT:
        raise ValueError(f"state_dtype={state_dtype!r} is for SGD with momentum, AdaGrad, RMSProp, Adam and AdamW, not {spec_name}: "
                         "AdaDelta's two second moments and delta-bar-delta's per-element rates are not quantized "
                         "(docs/algorithms.md, 'Optimizers with 8-bit state')")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, numbers.Integral) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
    if master_weights is not None and not isinstance(master_weights, bool):
        raise TypeError(f"master_weights must be None (on for 16-bit parameters), True or False, got {master_weights!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "stochastic" and master_weights is not False:
        raise ValueError("rounding='stochastic' rounds the 16-bit parameter itself: it needs master_weights=False "
                         "(with master weights the parameter is the float32 copy rounded to nearest)")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return Precision(master_weights, rounding, int(seed), state_dtype, int(min_8bit_size))


def check_grad(name: str, grad, param_name: str, param) -> None:
    """A gradient for ``param``: its shape and kind, and its dtype or, for a 16-bit parameter, float32."""
    check_array(name, grad, writeable=False, low_precision=True)
    check_same_kind(name, grad, param_name, param)
    if shape_of(grad) != shape_of(param):
        raise ValueError(f"{name} must have the shape of {param_name} {shape_of(param)}, got {shape_of(grad)}")
    wanted = dtype_of(param)
    if dtype_of(grad) != wanted and not (is_low(wanted) and dtype_of(grad) == _FLOAT32):
        allowed = f"{wanted} or float32" if is_low(wanted) else str(wanted)
        raise TypeError(f"{name} must have the dtype of {param_name} ({allowed}), got {dtype_of(grad)}")


def state_array(module, param, value: float):
    """A new state array for ``param``: the parameter's dtype, or float32 for a 16-bit parameter
    (on the parameter's device)."""
    if is_low(dtype_of(param)):
        return module.from_numpy(np.full(shape_of(param), value, _FLOAT32), param)
    return module.zeros_like(param) if value == 0.0 else module.full_like(param, value)


def master_copy(module, param):
    """The float32 master copy of a 16-bit parameter, exact, on its device."""
    return module.from_numpy(module.to_numpy(param).astype(_FLOAT32), param)


def mixed_module(module, backend):
    """``module`` if it takes 16-bit parameters, else ``TypeError``."""
    if not hasattr(module, "mixed_step"):
        raise TypeError(f"backend {backend!r} does not take bfloat16 or float16 parameters")
    return module


def sumsq(module, grads) -> float:
    """Σ g² over gradients of any dtypes: 16-bit ones through the backend's ``mixed_sumsq``."""
    low = [g for g in grads if is_low(dtype_of(g))]
    if not low:
        return module.grad_sumsq(grads)
    rest = [g for g in grads if not is_low(dtype_of(g))]
    total = 0.0
    for dtype in {dtype_of(g) for g in low}:
        total += module.mixed_sumsq([g for g in low if dtype_of(g) == dtype])
    if rest:
        value = module.grad_sumsq(rest)
        total += value if isinstance(value, float) else float(module.to_numpy(value).reshape(-1)[0])
    return total


# ---------------------------------------------------------------------------------------------
# 8-bit state
# ---------------------------------------------------------------------------------------------


def compact_module(module, backend, state_dtype: str = "int8", low: bool = False):
    """``module`` if its ``state8_step`` takes ``state_dtype`` (and, with ``low``, 16-bit
    parameters), else ``TypeError`` naming the backend."""
    if not hasattr(module, "state8_step"):
        raise TypeError(f"backend {backend!r} has no 8-bit optimizer state; use 'numba' or 'numpy'")
    import inspect

    takes = inspect.signature(module.state8_step).parameters
    if state_dtype == "bfloat16" and "state_dtype" not in takes:
        raise TypeError(f"backend {backend!r} has no bfloat16 optimizer state; use 'numba' or 'numpy'")
    if low and "masters" not in takes:
        raise TypeError(f"backend {backend!r} has no {state_dtype} state for 16-bit parameters; use 'numba' or 'numpy'")
    return module


def check_compact(module, kernel: str, hyper: dict, group_index: int, state_dtype: str) -> None:
    """``ValueError`` when this configuration has no 8-bit or bfloat16 state (``state8_supported``)."""
    reason = module.state8_supported(kernel, **hyper)
    if reason is not None:
        raise ValueError(f"param group {group_index}: state_dtype={state_dtype!r}: {reason}")


def check_compact_param(name: str, param, state_dtype: str) -> None:
    if dtype_of(param) != _FLOAT32 and not is_low(dtype_of(param)):
        raise TypeError(f"{name} has dtype {dtype_of(param)}: state_dtype={state_dtype!r} is for float32, "
                        "bfloat16 and float16 parameters")


def bfloat16_state(module, param, value: float):
    """A new bfloat16 state array of ``param`` filled with ``value`` (rounded to nearest)."""
    from .reference.lowp import round_nearest

    return device_bfloat16(module, round_nearest(np.full(shape_of(param), value, _FLOAT32), bfloat16_dtype()), param)


def device_bfloat16(module, host: np.ndarray, param):
    """The bfloat16 host array ``host`` as a state array beside ``param``: a copy of it for a NumPy
    parameter; on a GPU its bits, as uint16 (CuPy and numba's device arrays have no bfloat16)."""
    if isinstance(param, np.ndarray):
        return module.from_numpy(host, param)
    return module.from_numpy(host.view(np.uint16), param)


def host_array(module, array) -> np.ndarray:
    """A host copy of a state array; bfloat16 state held as bits on a GPU comes back as bfloat16."""
    host = module.to_numpy(array)
    return host.view(bfloat16_dtype()) if host.dtype == np.uint16 else host


def bfloat16_dtype() -> np.dtype:
    """ml_dtypes' bfloat16 (imported when first needed)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def quantized_state(module, param, value: float, signed: bool):
    """(codes, absmax) of a new state array of ``param`` filled with ``value``, on its device (the
    quantization of a constant, done on the host by the reference quantizer)."""
    from .reference import quantize_blockwise

    shape = shape_of(param)
    codes = np.empty(shape, np.uint8)
    absmax = np.empty(-(-int(np.prod(shape)) // BLOCK), np.float32)
    quantize_blockwise(np.full(shape, value, np.float32), codes, absmax, signed=signed, block=BLOCK)
    return module.from_numpy(codes, param), module.from_numpy(absmax, param)
