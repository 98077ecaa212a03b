"""The ``"cupy"`` backend: fused CUDA C kernels compiled with NVRTC through ``cupy.RawModule``.

Implements the backend contract of ``docs/backends.md`` on GPU arrays: CuPy arrays, or any object
exposing ``__cuda_array_interface__`` (torch CUDA tensors, numba device arrays), used in place
without copies; outputs the backend allocates are of the kind of the inputs. Every operation
launches asynchronously (torch's current stream for torch tensors, else the stream the arrays name,
else CuPy's current stream; ``docs/backends.md``, "Streams") and never synchronizes with the host.

Layout:

* ``common.cuh``, ``optim.cu``, ``reduce.cu``, ``batchnorm.cu``: the kernels (templates over
  float and double), each file's header comment states its equations and design;
* ``_sources``: what is compiled (generated preamble, layout checks, name expressions, options),
  which ``tests/test_cuda_sources.py`` compiles with NVRTC anywhere;
* ``_loader``: one ``cupy.RawModule`` per (device, module), compiled on first use, never at import;
* ``_device``: pointers, kinds, allocation and streams of the arrays;
* ``optim``, ``reduce``, ``batchnorm``: the host functions (per-step scalars, grids, launches);
* ``lowp.cu`` / ``lowp``: 16-bit parameters (``mixed_step``, ``mixed_sumsq``) and 8-bit state
  (``state8_step``, ``state8_supported``, ``state8_layout``; float32 or 16-bit parameters);
  ``lowbits.cuh``: the 16-bit formats and stochastic rounding they share with ``convert.cu``;
* ``convert.cu`` / ``bn_lowp``: 16-bit batch norm (``batchnorm_forward_lowp``,
  ``batchnorm_backward_lowp``): float32 decode, the float32 batch-norm kernels, encode (not fused).

Importing works on any machine: CuPy is imported on first use, nothing is compiled or allocated
at import, and ``unavailable_reason()`` says why the backend cannot run here ("" when it can: CuPy
installed and a CUDA device usable), which ``fastopt.dispatch`` reports.

Numerics: float32 kernels compute in float32 (no ``.f64`` instruction in their PTX, checked by
``tests/test_cuda_sources.py``), except the reductions that accumulate in float64 by design
(``_sources.FLOAT64_BY_DESIGN``). No FMA contraction (``--fmad=false``). CuPy compiles every
RawModule with ``-ftz=true``: float32 subnormals are flushed to zero (float64 is not affected),
unlike NumPy and the CPU backend.
"""

from ._device import (
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
from .batchnorm import batchnorm_backward, batchnorm_forward
from .bn_lowp import batchnorm_backward_lowp, batchnorm_forward_lowp
from .lowp import mixed_step, mixed_sumsq, state8_layout, state8_step, state8_supported
from .optim import (
    adadelta_step,
    adagrad_step,
    adam_step,
    delta_bar_delta_step,
    multi_step,
    rmsprop_step,
    sgd_step,
)
from .reduce import grad_multiplier, grad_sumsq, scale_grads_

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
