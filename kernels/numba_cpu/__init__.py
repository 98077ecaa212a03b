"""The ``"numba"`` backend: parallel CPU kernels compiled with numba.

Exposes every operation of the backend contract (``docs/backends.md``) under its public name:
the optimizer updates with the training-step extras and ``multi_step`` (``optim``, over the tensor
lists of ``multi``), the gradient reductions (``reduce``), batch normalization (``batchnorm``), block-wise quantization (``quantize``), and
the array helpers of the NumPy-array backends (``fastopt._host_arrays``).

``KERNELS`` lists, per operation, the compiled kernels it may launch (what ``fastopt compile``
compiles ahead of time); each compiles per dtype at its first call otherwise (``_jit``).
"""

from ..._host_arrays import (
    copy_from_numpy,
    empty,
    empty_like,
    from_numpy,
    full_like,
    owns,
    to_numpy,
    zeros_like,
)
from .batchnorm import batchnorm_backward, batchnorm_forward
from .bn_lowp import batchnorm_backward as batchnorm_backward_lowp, batchnorm_forward as batchnorm_forward_lowp
from .bnstats import batchnorm_statistics
from .mixed import mixed_step, mixed_sumsq
from .state8 import state8_layout, state8_step, state8_supported
from .optim import (
    adadelta_step,
    adagrad_step,
    adam_step,
    delta_bar_delta_step,
    multi_step,
    rmsprop_step,
    sgd_step,
)
from .quantize import dequantize_blockwise, quantize_blockwise
from .reduce import grad_multiplier, grad_sumsq, scale_grads_
from . import batchnorm as _bn
from . import bnstats as _bnstats
from . import bn_lowp as _bn_lowp
from . import mixed as _mixed
from . import multi as _multi
from . import optim as _optim
from . import state8 as _state8
from . import quantize as _quantize
from . import reduce as _reduce
from . import runners as _runners
from . import tasks as _tasks


def _with_twin(name: str, k) -> dict:
    """``k`` under ``name``, and its serial twin (``_jit``) under ``name.serial`` if it has one; a
    task kernel (``tasks``) as its shell and the shell's twin, and its body under ``name.tasks``; a
    launched part runner (``runners.Launched``) as the runner, and the launcher with its twin."""
    if isinstance(k, _runners.Launched):
        return {name: k.runner, **_with_twin("launch_parts", _runners.launch_parts)}
    if isinstance(k, _tasks.TaskKernel):
        return {**_with_twin(name, k.shell), f"{name}.tasks": k.body}
    return {name: k, f"{name}.serial": k.serial} if k.serial is not k else {name: k}


def _update_kernels(*kernels) -> dict:
    """Optimizer updates' part runners in both variants (the plain update and the one with the
    Polyak average), and the launcher that runs them, with its serial twin (``runners``)."""
    return {**{f"{k.__name__.lstrip('_')}.{variant}": getattr(k, variant) for k in kernels
               for variant in ("plain", "averaged")},
            **_with_twin("launch_parts", _runners.launch_parts)}


def _named(*kernels) -> dict:
    return {name: twin for k in kernels for name, twin in _with_twin(k.__name__.lstrip("_"), k).items()}


# optimizer (named as in fastopt.verify; adamw runs Adam's kernels) -> its float32 update kernels
_UPDATES = {
    "sgd": (_optim._sgd, _optim._sgd_momentum, _optim._sgd_nesterov, _optim._sgd_nesterov_torch),
    "adagrad": (_optim._adagrad,),
    "rmsprop": (_optim._rmsprop, _optim._rmsprop_centered, _optim._rmsprop_momentum, _optim._rmsprop_momentum_centered,
                _optim._rmsprop_nesterov, _optim._rmsprop_nesterov_centered),
    "adadelta": (_optim._adadelta,),
    "adam": (_optim._adam, _optim._adam_amsgrad),
    "adamw": (_optim._adam, _optim._adam_amsgrad),
    "delta_bar_delta": (_optim._delta_bar_delta,),
}

# the tensor-table readers every optimizer step runs (``multi``; one signature for every dtype)
_READERS = {"gather_objects": _multi._gather_objects, "grads_match_objects": _multi._grads_match_objects}

# operation -> {kernel name: kernel}: every kernel the operation may launch, whatever its options
# (an optimizer's configurations and the Polyak average; batch norm's layouts; training mode and
# evaluation; the serial twin of each parallel kernel, launched for small inputs), for float32 and
# float64 arrays (an optimizer's ``_READERS``: one signature for both). The low-precision kernels
# are listed by ``low_precision_kernels``.
KERNELS: dict[str, dict] = {
    **{op: {**_update_kernels(*kernels), **_READERS} for op, kernels in _UPDATES.items()},
    "batchnorm_forward": _named(_bn._stats_channel_first, _bn._stats_channels_last, _bn._merge_statistics,
                                _bn._running_statistics, _bn._forward_coefficients, _bn._normalize_channel_first,
                                _bn._normalize_channels_last),
    "batchnorm_backward": _named(_bn._mask_coefficients, _bn._reduce_channel_first, _bn._reduce_channels_last,
                                 _bn._backward_coefficients, _bn._input_grad_channel_first,
                                 _bn._input_grad_channels_last),
    "batchnorm_statistics": _named(_bn._stats_channel_first, _bn._stats_channels_last, _bnstats._merge_mean_m2),
    "grad_sumsq": {**_with_twin("sumsq", _reduce._sumsq), "gather_objects": _multi._gather_objects},
    "scale_grads_": {**_with_twin("scale", _reduce._scale), "gather_objects": _multi._gather_objects},
    "quantize_blockwise": {**_with_twin("quantize", _quantize._quantize),
                           **_with_twin("dequantize", _quantize._dequantize)},
}

# optimizer -> its kernels with 8-bit (or bfloat16) state (``state8.py``)
_STATE8 = {
    "sgd": (_state8._sgd_momentum8, _state8._sgd_nesterov8, _state8._sgd_nesterov_torch8),
    "adagrad": (_state8._adagrad8,),
    "rmsprop": (_state8._rmsprop8, _state8._rmsprop_momentum8, _state8._rmsprop_nesterov8),
    "adam": (_state8._adam8,),
    "adamw": (_state8._adam8,),
}
LOW_DTYPES = ("bfloat16", "float16")
STATE_DTYPES = ("float32", "int8", "bfloat16")


def low_precision_kernels(op: str, dtype: str, state_dtype: str = "float32") -> dict:
    """{kernel name: kernel} that ``op`` launches for parameters of ``dtype`` ("float32" or one of
    ``LOW_DTYPES``) with ``state_dtype`` state, other than the float32 kernels of ``KERNELS``:
    an optimizer's low-precision variants in the defaults of ``fastopt.precision`` (master weights,
    rounding to nearest), plain and averaged, for 16-bit parameters with gradients of their dtype
    and with float32 gradients (``.float32-grads``: what a model that computes in float32 hands
    over, as the digits demo does), each with its serial twin; batch norm's conversion kernels for
    16-bit x (it runs the float32 kernels between them), and the gradient reader of ``multi``
    (every step's check). Empty when ``op`` has no such kernels (8-bit state for AdaDelta); every
    other variant compiles at its first use."""
    if dtype not in ("float32", *LOW_DTYPES) or state_dtype not in STATE_DTYPES:
        raise ValueError(f"no low-precision kernels for dtype {dtype!r} with state_dtype {state_dtype!r}")
    half = dtype == "float16"
    low = dtype != "float32"
    out = {}
    if op.startswith("batchnorm_"):
        if low and state_dtype == "float32":
            for k in _bn_lowp.conversion_kernels(dtype):
                out.update(_with_twin(f"{k.__name__.lstrip('_')}", k))
        return out
    grad_kinds = (False, True) if low else (False,)  # float32 gradients for 16-bit parameters too
    if state_dtype != "float32":
        for k in _STATE8.get(op, ()):
            for grad32 in grad_kinds:
                for averaged in (False, True):
                    variant = k.variant(averaged, low, low, False, low and not grad32, half, state_dtype == "bfloat16")
                    tag = f"{dtype}.{state_dtype}-state.{'float32-grads.' if grad32 else ''}" \
                          f"{'averaged' if averaged else 'plain'}"
                    out.update(_with_twin(f"{k.__name__.lstrip('_')}.{tag}", variant))
    elif low:
        for k in _UPDATES.get(op, ()):
            for grad32 in grad_kinds:
                for averaged in (False, True):
                    variant = _mixed.mixed_kernel(k).variant(averaged, True, False, grad32, half)
                    tag = f"{dtype}.{'float32-grads.' if grad32 else ''}{'averaged' if averaged else 'plain'}"
                    out.update(_with_twin(f"{k.__name__.lstrip('_')}.{tag}", variant))
    if out:  # every optimizer step tests its gradients with the reader
        out["grads_match_objects"] = _multi._grads_match_objects
    return out


__all__ = [
    "KERNELS",
    "LOW_DTYPES",
    "STATE_DTYPES",
    "low_precision_kernels",
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "batchnorm_backward",
    "batchnorm_backward_lowp",
    "batchnorm_forward",
    "batchnorm_forward_lowp",
    "batchnorm_statistics",
    "copy_from_numpy",
    "delta_bar_delta_step",
    "dequantize_blockwise",
    "empty",
    "empty_like",
    "from_numpy",
    "full_like",
    "grad_multiplier",
    "grad_sumsq",
    "mixed_step",
    "mixed_sumsq",
    "multi_step",
    "owns",
    "quantize_blockwise",
    "rmsprop_step",
    "scale_grads_",
    "sgd_step",
    "state8_layout",
    "state8_step",
    "state8_supported",
    "to_numpy",
    "zeros_like",
]
