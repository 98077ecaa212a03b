"""Optimizer updates with 8-bit state, the reference (``"numpy"`` backend): ``docs/algorithms.md``,
"Optimizers with 8-bit state" (Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
ICLR 2022), straight from its three steps, sharing no code with the kernels:

    for each tensor and each 8-bit state k (pair codes, absmax):
        s_k = dequantize_blockwise(codes_k, absmax_k)            float32 copies
    θ, s ← update(θ, g, s)                                       the reference float32 update
                                                                 (``optim.py``, with the extras)
    codes_k, absmax_k = quantize_blockwise(s_k)                  every state requantized

Signed map for first moments and momentum (Adam m, SGD velocity, RMSProp velocity), unsigned for
second moments (Adam v, AdaGrad accumulator, RMSProp square_avg). Same signature and the same
rules as ``kernels/numba_cpu/state8.py``:

    state8_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf,
                avg_weight=0.0, block=256, masters=None, rounding="nearest", seed=0, counter=0,
                indices=None, starts=None, state_dtype="int8", **hyper)

16-bit parameters (bfloat16, float16) are updated as ``mixed.py`` updates them: θ's float32 value
is the master copy (``masters``) or θ decoded, the gradient is decoded to float32, and θ is
stored rounded (``lowp``) after the same three steps.
"""

from __future__ import annotations

import math

import numpy as np

from . import lowp, optim
from .extras import with_step_extras
from .quantize import dequantize_blockwise, quantize_blockwise

__all__ = ["SUPPORTED", "state8_layout", "state8_step", "state8_supported"]

SUPPORTED = {
    "adam_step": "Adam and AdamW (m signed, v unsigned); not amsgrad",
    "sgd_step": "SGD with momentum or Nesterov, both conventions (velocity signed); not momentum = 0",
    "adagrad_step": "AdaGrad (accumulator unsigned)",
    "rmsprop_step": "RMSProp, plain or with momentum / Nesterov (textbook) (square_avg unsigned, "
                    "velocity signed); not centered",
}

_KEYWORDS = {
    "adam_step": {"step", "lr", "beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay",
                  "amsgrad"},
    "sgd_step": {"lr", "momentum", "nesterov", "weight_decay", "convention"},
    "adagrad_step": {"lr", "eps", "weight_decay"},
    "rmsprop_step": {"lr", "rho", "eps", "momentum", "nesterov", "centered", "weight_decay",
                     "convention"},
}
_STATE_LENGTH = {"adam_step": 3, "sgd_step": 1, "adagrad_step": 1, "rmsprop_step": 3}


def state8_supported(op, **hyper) -> str | None:
    """None when ``op`` with these hyperparameters has 8-bit state, else the reason why not."""
    if op not in _KEYWORDS:
        return (f"op {op!r} has no 8-bit state; supported: {', '.join(_KEYWORDS)} (AdaDelta's two "
                "second moments and delta-bar-delta's rates are not quantized, see docs/algorithms.md)")
    missing = _KEYWORDS[op] - set(hyper)
    extra = set(hyper) - _KEYWORDS[op]
    if missing or extra:
        return (f"{op} takes the hyperparameters {sorted(_KEYWORDS[op])}; missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}")
    if op == "adam_step" and hyper["amsgrad"]:
        return ("amsgrad=True: v_max ← max(v_max, v) of two independently quantized states is "
                "not monotone after requantization; not supported in 8 bits")
    if op == "sgd_step" and hyper["momentum"] == 0:
        return "sgd_step with momentum=0 has no state to quantize"
    if op == "rmsprop_step":
        if hyper["centered"]:
            return ("centered=True: the variance r − s⊙s is a difference of two 8-bit states whose "
                    "quantization errors (up to 0.7% of their block's absmax) exceed it when the "
                    "gradient's mean dominates, giving √ of a negative number; not supported")
        if hyper["momentum"] != 0 and hyper["nesterov"] and hyper["convention"] != "textbook":
            return "nesterov=True is defined for convention='textbook' only"
    return None


def state8_layout(op, **hyper) -> tuple[tuple[int, bool], ...]:
    """(state-tuple index, signed map) of each 8-bit state of ``op`` with these hyperparameters."""
    reason = state8_supported(op, **hyper)
    if reason is not None:
        raise ValueError(reason)
    if op == "adam_step":
        return ((0, True), (1, False))  # m, v
    if op == "sgd_step":
        return ((0, True),)  # velocity
    if op == "adagrad_step":
        return ((0, False),)  # accumulator
    if hyper["momentum"] == 0:
        return ((0, False),)  # square_avg
    return ((0, False), (2, True))  # square_avg, velocity


def _check(array, where, dtype, shape):
    if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
        raise ValueError(f"{where} must be a numpy.ndarray of dtype {np.dtype(dtype)} and shape "
                         f"{shape}, got {type(array).__name__} {getattr(array, 'dtype', None)} "
                         f"{getattr(array, 'shape', None)}")
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise ValueError(f"{where} must be C-contiguous and writeable")


def _bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16, imported at the first bfloat16-state step (the import takes ~0.6 s)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _low(dtype) -> bool:
    return np.dtype(dtype).itemsize == 2 and np.dtype(dtype).name in ("bfloat16", "float16")


def state8_step(op, params, grads, states, avgs, *, grad_mul=1.0, grad_clip=math.inf,
                avg_weight=0.0, block=256, masters=None, rounding="nearest", seed=0, counter=0, indices=None,
                starts=None, state_dtype="int8", **hyper) -> None:
    """``op`` with 8-bit state, tensor by tensor: dequantize, reference update, requantize.
    Raises ValueError before writing anything for an unsupported configuration or bad argument.
    Stochastic rounding numbers tensor t's elements from ``starts[t]`` (0 without ``starts``): the
    tensor is then the piece of a parameter that begins there (``mixed.py``)."""
    layout = state8_layout(op, **hyper)
    if state_dtype not in ("int8", "bfloat16"):
        raise ValueError(f"state_dtype must be 'int8' or 'bfloat16', got {state_dtype!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    for t, param in enumerate(params):
        shape = getattr(param, "shape", None)
        low = _low(param.dtype) if isinstance(param, np.ndarray) else False
        _check(param, f"params[{t}]", param.dtype if low else np.float32, shape)
        wanted = (param.dtype, np.float32) if low else (np.float32,)
        if not isinstance(grads[t], np.ndarray) or grads[t].dtype not in wanted or grads[t].shape != shape:
            raise ValueError(f"grads[{t}] must be a numpy.ndarray of shape {shape} and dtype "
                             f"{' or '.join(str(np.dtype(d)) for d in wanted)}")
        if masters is not None:
            _check(masters[t], f"masters[{t}]", np.float32, shape)
        if avgs is not None:
            _check(avgs[t], f"avgs[{t}]", np.float32, shape)
        for slot, _ in layout:
            if state_dtype == "bfloat16":
                _check(states[t][slot], f"states[{t}][{slot}] (bfloat16 state)", _bfloat16(), shape)
                continue
            codes, absmax = states[t][slot]
            _check(codes, f"states[{t}][{slot}][0] (codes)", np.uint8, shape)
            _check(absmax, f"states[{t}][{slot}][1] (absmax)", np.float32, (-(-param.size // block),))

    update = with_step_extras(getattr(optim, op))
    for t, (param, grad) in enumerate(zip(params, grads)):
        full = [None] * _STATE_LENGTH[op]
        for slot, signed in layout:
            if state_dtype == "bfloat16":  # decoded exactly
                full[slot] = states[t][slot].astype(np.float32)
                continue
            codes, absmax = states[t][slot]
            full[slot] = np.empty(param.shape, np.float32)
            dequantize_blockwise(codes, absmax, full[slot], signed=signed, block=block)
        low = _low(param.dtype)
        value = (masters[t] if masters is not None else param.astype(np.float32)) if low else param
        update(value, grad.astype(np.float32), *full, grad_mul=grad_mul, grad_clip=grad_clip,
               avg=None if avgs is None else avgs[t], avg_weight=avg_weight, **hyper)
        if low and rounding == "stochastic":
            key = lowp.tensor_key(seed, counter, t if indices is None else indices[t])
            first = 0 if starts is None else int(starts[t])
            index = np.arange(first, first + param.size, dtype=np.int64).reshape(param.shape)
            param[...] = lowp.round_stochastic(value, param.dtype, key, index)
        elif low:
            param[...] = lowp.round_nearest(value, param.dtype)
        for slot, signed in layout:
            if state_dtype == "bfloat16":  # rounded to nearest even
                states[t][slot][...] = lowp.round_nearest(full[slot], _bfloat16())
                continue
            codes, absmax = states[t][slot]
            quantize_blockwise(full[slot], codes, absmax, signed=signed, block=block)
