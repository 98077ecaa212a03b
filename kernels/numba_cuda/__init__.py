"""The ``"numba-cuda"`` backend: CUDA kernels compiled with numba-cuda.

Implements the backend contract of ``docs/backends.md`` on CUDA device arrays (numba device arrays,
CuPy arrays, torch CUDA tensors, anything exposing ``__cuda_array_interface__``): the optimizer
updates with the training-step extras (``optim``), tensor lists in one launch (``multi_step``),
the gradient reductions (``reduce``), batch normalization (``batchnorm``; float16 x and dy in
``bn_lowp``: ``batchnorm_forward_lowp``, ``batchnorm_backward_lowp``), float16 parameters (``lowp``:
``mixed_step``, ``mixed_sumsq``) and 8-bit optimizer state (``state8``, for float32 and float16
parameters).

Importing needs no GPU: kernels compile on first use (``_jit.KERNELS``), and ``unavailable_reason()``
says whether a CUDA device is usable. Under numba-cuda's simulator (``NUMBA_ENABLE_CUDASIM=1``) the
same kernels run as Python threads; the package then adds the ``cuda.shfl_down_sync`` the simulator
lacks (``_simulator``). No function synchronizes with the host or copies between host and device,
except ``to_numpy``, ``from_numpy`` and ``copy_from_numpy``, whose job that is. Which stream each
launch goes to and what it waits on: ``docs/backends.md``, "Streams" (``_arrays.stream_plan``).
"""

from ._jit import SIMULATOR as _SIMULATOR

if _SIMULATOR:
    from ._simulator import install as _install_simulator_shuffle

    _install_simulator_shuffle()

from ._arrays import (  # noqa: E402
    copy_from_numpy,
    empty,
    empty_like,
    from_numpy,
    full_like,
    owns,
    to_numpy,
    unavailable_reason,
    zeros_like,
)
from .batchnorm import batchnorm_backward, batchnorm_forward  # noqa: E402
from .bn_lowp import batchnorm_backward_lowp, batchnorm_forward_lowp  # noqa: E402
from .lowp import mixed_step, mixed_sumsq  # noqa: E402
from .optim import (  # noqa: E402
    adadelta_step,
    adagrad_step,
    adam_step,
    delta_bar_delta_step,
    multi_step,
    rmsprop_step,
    sgd_step,
)
from .reduce import grad_multiplier, grad_sumsq, scale_grads_  # noqa: E402
from .state8 import state8_layout, state8_step, state8_supported  # noqa: E402

__all__ = [
    "adadelta_step",
    "adagrad_step",
    "adam_step",
    "batchnorm_backward",
    "batchnorm_backward_lowp",
    "batchnorm_forward",
    "batchnorm_forward_lowp",
    "copy_from_numpy",
    "delta_bar_delta_step",
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
    "rmsprop_step",
    "scale_grads_",
    "sgd_step",
    "state8_layout",
    "state8_step",
    "state8_supported",
    "to_numpy",
    "unavailable_reason",
    "zeros_like",
]
